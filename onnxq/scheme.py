"""Quantization schemes and the numpy primitives ``choose_qparams`` / ``quantize`` / ``dequantize``.

A :class:`QuantScheme` says *how* a tensor is quantized: the integer dtype, symmetric or affine, the
granularity (:class:`PerTensor`, :class:`PerChannel`, :class:`PerBlock`) and whether the range is
reduced by one bit. The primitives follow ONNX ``QuantizeLinear`` / ``DequantizeLinear`` exactly:

* ``q = saturate(round_half_to_even(x / scale) + zero_point)``, computed in float32, as ONNX Runtime
  does (a division, not a multiplication by the reciprocal);
* ``x = (q - zero_point) * scale`` in float32.

Granularity and the shape of ``scale`` / ``zero_point`` (ONNX conventions):

============================  =====================================================================
granularity                   scale / zero_point shape for ``x`` of shape ``(d0, ..., dn)``
============================  =====================================================================
``PerTensor()``               ``()`` (a scalar)
``PerChannel(axis)``          ``(d_axis,)``
``PerBlock(axis, block)``     ``x.shape`` with ``d_axis`` replaced by ``ceil(d_axis / block)``; the
                              last block may be partial (ONNX opset-21 blocked DequantizeLinear)
============================  =====================================================================

Degenerate inputs never produce an invalid scale: NaN and +-Inf are ignored when choosing the range,
an all-zero (or empty) range gives ``scale = 1``, and zero is always inside the representable range so
that zero padding is exact.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Union

import ml_dtypes
import numpy as np
from onnx import TensorProto

__all__ = [
    "QuantDtype",
    "Symmetry",
    "PerTensor",
    "PerChannel",
    "PerBlock",
    "Granularity",
    "QuantScheme",
    "choose_qparams",
    "choose_qparams_from_range",
    "choose_qparams_mse",
    "quantize",
    "dequantize",
    "fake_quantize",
    "reduce_for_granularity",
]


class QuantDtype(enum.Enum):
    """Integer storage types onnxq can quantize to."""

    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    UINT16 = "uint16"
    INT4 = "int4"
    UINT4 = "uint4"

    @property
    def bits(self) -> int:
        return {"int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "int4": 4, "uint4": 4}[self.value]

    @property
    def signed(self) -> bool:
        return self.value in ("int8", "int16", "int4")

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy dtype of quantized arrays (``ml_dtypes`` for the 4-bit types)."""
        return np.dtype(
            {
                "int8": np.int8,
                "uint8": np.uint8,
                "int16": np.int16,
                "uint16": np.uint16,
                "int4": ml_dtypes.int4,
                "uint4": ml_dtypes.uint4,
            }[self.value]
        )

    @property
    def onnx_type(self) -> int:
        """The ``TensorProto`` element type."""
        return {
            "int8": TensorProto.INT8,
            "uint8": TensorProto.UINT8,
            "int16": TensorProto.INT16,
            "uint16": TensorProto.UINT16,
            "int4": TensorProto.INT4,
            "uint4": TensorProto.UINT4,
        }[self.value]

    @property
    def min_opset(self) -> int:
        """The first default-domain opset whose QuantizeLinear accepts this type."""
        return {"int8": 13, "uint8": 13, "int16": 21, "uint16": 21, "int4": 21, "uint4": 21}[self.value]


class Symmetry(enum.Enum):
    """``SYMMETRIC``: zero point fixed at the middle of the range; ``AFFINE``: range fitted to min..max."""

    SYMMETRIC = "symmetric"
    AFFINE = "affine"


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""

    def __str__(self) -> str:
        return "per-tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero point per index along ``axis`` (the output channel of a weight)."""

    axis: int = 0

    def __str__(self) -> str:
        return f"per-channel(axis={self.axis})"


@dataclass(frozen=True)
class PerBlock:
    """One scale and zero point per ``block_size`` consecutive elements along ``axis``."""

    axis: int = 0
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.block_size < 2 or self.block_size & (self.block_size - 1):
            raise ValueError(
                f"PerBlock block_size must be a power of two >= 2 (16, 32, 64, 128), got {self.block_size}"
            )

    def __str__(self) -> str:
        return f"per-block(axis={self.axis}, block={self.block_size})"


Granularity = Union[PerTensor, PerChannel, PerBlock]


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor is quantized.

    Attributes:
        dtype: the integer storage type.
        symmetry: ``SYMMETRIC`` (zero point 0, or 2**(bits-1) for unsigned types) or ``AFFINE``.
        granularity: :class:`PerTensor`, :class:`PerChannel` or :class:`PerBlock`.
        reduce_range: use one bit less of range. For int8 symmetric weights this gives [-64, 64],
            which keeps every pair of u8 x s8 products inside int16 on x86 CPUs without VNNI
            (the VPMADDUBSW saturation that costs onnxruntime's default int8 models accuracy).
    """

    dtype: QuantDtype = QuantDtype.INT8
    symmetry: Symmetry = Symmetry.SYMMETRIC
    granularity: Granularity = field(default_factory=PerTensor)
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, QuantDtype):
            raise TypeError(f"QuantScheme.dtype must be a QuantDtype, e.g. QuantDtype.INT8; got {self.dtype!r}")
        if not isinstance(self.symmetry, Symmetry):
            raise TypeError(f"QuantScheme.symmetry must be a Symmetry; got {self.symmetry!r}")
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerBlock)):
            raise TypeError(
                f"QuantScheme.granularity must be PerTensor(), PerChannel(axis) or PerBlock(axis, size); "
                f"got {self.granularity!r}"
            )

    @property
    def qmin(self) -> int:
        """The smallest integer the scheme uses."""
        lo, _ = self.qrange
        return lo

    @property
    def qmax(self) -> int:
        """The largest integer the scheme uses."""
        _, hi = self.qrange
        return hi

    @property
    def qrange(self) -> tuple[int, int]:
        """(qmin, qmax) actually used: symmetric signed types drop the most negative value."""
        bits = self.dtype.bits - (1 if self.reduce_range else 0)
        if self.dtype.signed:
            if self.symmetry is Symmetry.SYMMETRIC:
                if self.reduce_range and self.dtype is QuantDtype.INT8:
                    return -64, 64
                half = 2 ** (bits - 1) - 1
                return -half, half
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if self.symmetry is Symmetry.SYMMETRIC:
            # unsigned symmetric: zero point in the middle, one code each side of it unused at the bottom
            return 0, 2**bits - 1
        return 0, 2**bits - 1

    def with_(self, **changes: object) -> QuantScheme:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def __str__(self) -> str:
        rr = ", reduced range" if self.reduce_range else ""
        return f"{self.dtype.value} {self.symmetry.value} {self.granularity}{rr}"


def _dtype_limits(dtype: QuantDtype) -> tuple[int, int]:
    """The saturation limits of the storage type (not the scheme's possibly narrower range)."""
    b = dtype.bits
    if dtype.signed:
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1
    return 0, 2**b - 1


def _normalise_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {ndim}")
    return axis % ndim


def reduce_for_granularity(x: np.ndarray, granularity: Granularity) -> tuple[np.ndarray, np.ndarray]:
    """Finite min and max of ``x`` at the given granularity (NaN and +-Inf ignored).

    Returns arrays shaped like the scale of that granularity (see the module docstring). A group with
    no finite value gives (0, 0).
    """
    xf = np.asarray(x, dtype=np.float32)
    finite = np.isfinite(xf)
    lo_src = np.where(finite, xf, np.inf)
    hi_src = np.where(finite, xf, -np.inf)
    if isinstance(granularity, PerTensor):
        lo, hi = (lo_src.min(), hi_src.max()) if xf.size else (np.inf, -np.inf)
        lo_a, hi_a = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    elif isinstance(granularity, PerChannel):
        axis = _normalise_axis(granularity.axis, xf.ndim)
        other = tuple(i for i in range(xf.ndim) if i != axis)
        lo_a = lo_src.min(axis=other) if xf.size else np.full(xf.shape[axis], np.inf, np.float32)
        hi_a = hi_src.max(axis=other) if xf.size else np.full(xf.shape[axis], -np.inf, np.float32)
    else:
        axis = _normalise_axis(granularity.axis, xf.ndim)
        lo_a = _block_reduce(lo_src, axis, granularity.block_size, np.inf, np.min)
        hi_a = _block_reduce(hi_src, axis, granularity.block_size, -np.inf, np.max)
    lo_a = np.where(np.isfinite(lo_a), lo_a, 0.0).astype(np.float32)
    hi_a = np.where(np.isfinite(hi_a), hi_a, 0.0).astype(np.float32)
    return lo_a, hi_a


def _block_reduce(x: np.ndarray, axis: int, block: int, pad: float, fn: object) -> np.ndarray:
    d = x.shape[axis]
    nblocks = max(1, math.ceil(d / block))
    padded = nblocks * block
    if padded != d:
        pad_width = [(0, 0)] * x.ndim
        pad_width[axis] = (0, padded - d)
        x = np.pad(x, pad_width, constant_values=pad)
    shape = x.shape[:axis] + (nblocks, block) + x.shape[axis + 1 :]
    return fn(x.reshape(shape), axis=axis + 1)  # type: ignore[operator]


def choose_qparams_from_range(
    rmin: np.ndarray | float, rmax: np.ndarray | float, scheme: QuantScheme
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (the scheme's dtype) covering ``[rmin, rmax]``.

    Zero is always made representable (``rmin <= 0 <= rmax``). Symmetric schemes use
    ``scale = max(|rmin|, |rmax|) / qmax_half`` and the zero point of the type's middle; affine schemes
    use ``scale = (rmax - rmin) / (qmax - qmin)`` and ``zero_point = round(qmin - rmin / scale)``. NaN
    and +-Inf ends are ignored (treated as 0); an empty or all-zero range gives ``scale = 1``.

    Guarantees, for every group:

    * ``scale`` is a finite, *normal* float32 ``> 0``: a subnormal scale loses precision in
      ``x / scale`` (codes far outside the range) and becomes 0 on runtimes that flush denormals, so
      it is raised to the smallest normal float32;
    * the zero point is computed from the float32 scale with the same float32 division that
      :func:`quantize` (and ONNX Runtime) use, so an affine ``quantize(rmin)`` is exactly ``qmin``;
    * ``quantize`` maps ``rmin`` and ``rmax`` inside the scheme's range (``qrange``; for symmetric
      schemes ``zero_point +- qmax_half``), and ``dequantize`` of those codes is finite. Where float32
      rounding of the scale or a round-half-to-even tie would put an end one code outside (e.g. 64
      for int8 affine reduced range), the scale is widened by an ulp or two (more only for ranges
      within a step of the float32 maximum).
    """
    f32max = float(np.finfo(np.float32).max)
    lo = np.nan_to_num(np.asarray(rmin, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    hi = np.nan_to_num(np.asarray(rmax, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = np.broadcast_arrays(lo, hi)
    # quantize() sees float32 values: work with the float32 ends of the range
    lo = np.clip(lo, -f32max, 0.0).astype(np.float32)
    hi = np.clip(hi, 0.0, f32max).astype(np.float32)
    qmin, qmax = scheme.qrange
    symmetric = scheme.symmetry is Symmetry.SYMMETRIC
    if symmetric:
        if scheme.dtype.signed:
            steps, zp_sym = qmax, 0
        else:
            half = (qmax - qmin + 1) // 2  # 128 for uint8: codes 1..255 used
            steps, zp_sym = half - 1, half
        scale64 = np.maximum(-lo.astype(np.float64), hi.astype(np.float64)) / steps
    else:
        steps, zp_sym = qmax - qmin, 0
        scale64 = (hi.astype(np.float64) - lo.astype(np.float64)) / steps
    with np.errstate(under="ignore"):
        scale = np.maximum(scale64.astype(np.float32), np.finfo(np.float32).tiny)
    scale = np.where(scale64 > 0, scale, np.float32(1.0)).astype(np.float32)

    def zero_point(s: np.ndarray) -> np.ndarray:
        if symmetric:
            return np.full(s.shape, zp_sym, np.float64)
        # float32 division exactly as in quantize(); qmin is even, so rint(qmin - b) == qmin + rint(-b)
        return np.clip(np.rint(np.float64(qmin) - (lo / s).astype(np.float64)), qmin, qmax)

    def needs_widening(s: np.ndarray, z: np.ndarray) -> np.ndarray:
        low, high = (z - steps, z + steps) if symmetric else (qmin, qmax)
        with np.errstate(over="ignore"):
            q_lo = np.rint(lo / s).astype(np.float64) + z
            q_hi = np.rint(hi / s).astype(np.float64) + z
            x_lo = (q_lo - z).astype(np.float32) * s
            x_hi = (q_hi - z).astype(np.float32) * s
        return (q_lo < low) | (q_hi > high) | ~np.isfinite(x_lo) | ~np.isfinite(x_hi)

    zp = zero_point(scale)
    for i in range(64):
        widen = needs_widening(scale, zp)
        if not widen.any():
            break
        # one ulp first; growing steps only for ranges within a step of the float32 maximum
        wider = np.maximum(
            np.nextafter(scale, np.float32(np.inf)), (scale * (1.0 + 2.0 ** (i - 23))).astype(np.float32)
        )
        scale = np.where(widen, wider, scale).astype(np.float32)
        zp = zero_point(scale)
    else:  # pragma: no cover - a few ulps always suffice
        raise AssertionError(f"choose_qparams_from_range: cannot fit the range into {scheme}")
    return np.asarray(scale, np.float32), np.asarray(zp).astype(scheme.dtype.numpy_dtype)


def choose_qparams(x: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point for tensor ``x`` under ``scheme`` (min-max of the finite values)."""
    lo, hi = reduce_for_granularity(x, scheme.granularity)
    return choose_qparams_from_range(lo, hi, scheme)


def _broadcast_params(
    param: np.ndarray, shape: tuple[int, ...], granularity: Granularity
) -> np.ndarray:
    """Expand a scale/zero point to ``shape`` following the granularity's ONNX convention."""
    p = np.asarray(param)
    if isinstance(granularity, PerTensor):
        return p.reshape(())
    axis = _normalise_axis(granularity.axis, len(shape))
    if isinstance(granularity, PerChannel):
        if p.shape != (shape[axis],):
            raise ValueError(f"per-channel parameter has shape {p.shape}, expected ({shape[axis]},)")
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return p.reshape(view)
    expected = list(shape)
    expected[axis] = max(1, math.ceil(shape[axis] / granularity.block_size))
    if list(p.shape) != expected:
        raise ValueError(f"per-block parameter has shape {p.shape}, expected {tuple(expected)}")
    return np.repeat(p, granularity.block_size, axis=axis).take(range(shape[axis]), axis=axis)


def quantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, scheme: QuantScheme, *, clip_to_scheme: bool = False
) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)``.

    ``x / scale`` is a float32 division (not a multiplication by the reciprocal) and rounding is half
    to even, so the result is bit-identical to onnxruntime's CPU kernel. Saturation is to the storage
    type's limits (as ONNX does); the scheme's narrower range only influences how the scale was
    chosen. Non-finite inputs follow onnxruntime's CPU kernel (every dtype and granularity): ``+Inf``
    saturates to the high limit, ``-Inf`` to the low limit, and ``NaN`` maps to the low limit
    (-128 for int8, 0 for uint8), whatever the zero point. (onnx's ``ReferenceEvaluator`` differs: it
    casts ``NaN``/``Inf``/``|x / scale| >= 2**31`` to int32 unchecked and returns platform garbage.)
    """
    xf = np.asarray(x, dtype=np.float32)
    s = _broadcast_params(np.asarray(scale, np.float32), xf.shape, scheme.granularity)
    z = _broadcast_params(np.asarray(zero_point).astype(np.int64), xf.shape, scheme.granularity)
    lo, hi = scheme.qrange if clip_to_scheme else _dtype_limits(scheme.dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        y = np.rint(xf / s).astype(np.float64) + z
    y = np.where(np.isnan(y), lo, y)
    y = np.clip(y, lo, hi)
    return np.asarray(y).astype(np.int64).astype(scheme.dtype.numpy_dtype)  # 0-d stays an ndarray


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, scheme: QuantScheme
) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` in float32."""
    qi = np.asarray(q).astype(np.int64)
    s = _broadcast_params(np.asarray(scale, np.float32), qi.shape, scheme.granularity)
    z = _broadcast_params(np.asarray(zero_point).astype(np.int64), qi.shape, scheme.granularity)
    return np.asarray((qi - z).astype(np.float32) * s, dtype=np.float32)


def fake_quantize(x: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """Quantize then dequantize ``x`` with min-max parameters: the float value the model will see."""
    scale, zp = choose_qparams(x, scheme)
    return dequantize(quantize(x, scale, zp, scheme), scale, zp, scheme)


def choose_qparams_mse(
    x: np.ndarray, scheme: QuantScheme, *, ratios: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point minimising the squared quantization error of ``x`` per group.

    For each group (tensor, channel or block) the min-max range is shrunk by every ratio in ``ratios``
    (default 1.00, 0.99, ..., 0.50) and the ratio whose quantize-dequantize round trip has the smallest
    squared error is kept. Clipping a few extreme weights buys a finer step for all the others, which
    matters most with few levels (7-bit or 4-bit weights). All ratios are evaluated at once per group.
    """
    if ratios is None:
        ratios = np.linspace(1.0, 0.5, 51, dtype=np.float32)
    xf = np.asarray(x, np.float32)
    lo, hi = reduce_for_granularity(xf, scheme.granularity)
    best_err = np.full(lo.shape, np.inf, np.float64)
    best_scale, best_zp = choose_qparams_from_range(lo, hi, scheme)
    finite = np.where(np.isfinite(xf), xf, 0.0).astype(np.float32)
    qmin, qmax = (np.float32(v) for v in scheme.qrange)
    for r in ratios:
        scale, zp = choose_qparams_from_range(lo * r, hi * r, scheme)
        s = _broadcast_params(scale, xf.shape, scheme.granularity)
        z = _broadcast_params(zp.astype(np.float32), xf.shape, scheme.granularity)
        # quantize(clip_to_scheme=True) then dequantize, in float32 (the same values, several times faster)
        fq = (np.clip(np.rint(finite / s) + z, qmin, qmax) - z) * s
        err_g = _group_sum(np.square(fq - finite), scheme.granularity, lo.shape)
        better = err_g < best_err
        best_err = np.where(better, err_g, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zp = np.where(better, zp, best_zp)
    return np.asarray(best_scale, np.float32), np.asarray(best_zp).astype(scheme.dtype.numpy_dtype)


def _group_sum(err: np.ndarray, granularity: Granularity, shape: tuple[int, ...]) -> np.ndarray:
    """Sum of ``err`` over each quantization group (the layout of the scale)."""
    if isinstance(granularity, PerTensor):
        return np.asarray(err.sum(dtype=np.float64))
    axis = _normalise_axis(granularity.axis, err.ndim)
    if isinstance(granularity, PerChannel):
        return err.sum(axis=tuple(i for i in range(err.ndim) if i != axis), dtype=np.float64)
    summed = _block_reduce(err.astype(np.float64), axis, granularity.block_size, 0.0, np.sum)
    return summed.reshape(shape)
