"""The int4/int8 weight grid shared by RTN, GPTQ and AWQ, and the quantized weight they all produce.

A MatMul weight ``W`` has shape ``[K, N]`` (K input features, N outputs). Weight-only schemes group it
along K: blocks of ``block_size`` consecutive rows share one scale (and zero point) per output column,
so ``scales`` and ``zero_points`` have shape ``[ceil(K / block_size), N]``; the last block may be
partial (stories260K has K = 172). Per-channel is one block spanning all of K.

Codes are stored unsigned, ``0 .. 2**bits - 1``, as ``com.microsoft.MatMulNBits`` wants them:

* asymmetric: ``scale = (max - min) / (2**bits - 1)``, ``zero_point = round(-min / scale)``;
* symmetric: ``zero_point = 2**(bits - 1)`` (8 for int4) and ``scale = m / -2**(bits - 1)``, where ``m`` is the
  block's value of largest magnitude with its sign: ``m`` lands exactly on code 0, all 16 codes are used, zero is
  exact, and the other end saturates at ``-m * 7 / 8``. This is onnxruntime's own definition (MLAS
  ``MlasQ4GemmPackB``, ``matmul_nbits_quantizer``; llama.cpp's Q4_0 too): a step of ``|m| / 8`` instead of the
  ``|m| / 7`` of a grid symmetric around zero (SmolLM2 at the builder's block-32 format: wikitext perplexity
  43.45 with ``/ 7``; the scales may be negative).

Zero is always inside a block's range (as in GPTQ's reference quantizer and ONNX's QuantizeLinear), so
zero weights stay exactly zero. Dequantization is ``(q - zero_point) * scale`` in float32, bit for bit
what ONNX ``DequantizeLinear`` and MatMulNBits compute, which :meth:`QuantizedWeight.dequantize` returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxq.scheme import PerBlock, PerChannel, QuantDtype, QuantScheme, Symmetry, choose_qparams_from_range

__all__ = ["WeightGrid", "QuantizedWeight", "rtn", "qparams", "quantize_rows", "weight_and_hessian"]


@dataclass(frozen=True)
class WeightGrid:
    """How a weight is quantized: bit width, symmetry and block size along K (None = per output channel)."""

    bits: int = 4
    symmetric: bool = False
    block_size: int | None = 128

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"weight-only bits must be 4 or 8, got {self.bits}")
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two >= 16 (16, 32, 64, 128, ...), got {self.block_size}")

    def block(self, k: int) -> int:
        """The block length used for a weight with ``k`` input rows (``k`` itself when per-channel)."""
        return k if self.block_size is None else self.block_size

    def n_blocks(self, k: int) -> int:
        return max(1, math.ceil(k / self.block(k)))

    def scheme(self, k: int) -> QuantScheme:
        """The :class:`QuantScheme` of a ``[k, N]`` weight: unsigned codes, blocks along axis 0.

        Per-channel (and a single block covering all of K) is ``PerChannel(1)``, whose parameters have
        shape ``[N]``; :func:`rtn` and :meth:`QuantizedWeight.dequantize` keep them as ``[1, N]``."""
        dtype = QuantDtype.UINT4 if self.bits == 4 else QuantDtype.UINT8
        sym = Symmetry.SYMMETRIC if self.symmetric else Symmetry.AFFINE
        gran = PerChannel(1) if self.n_blocks(k) == 1 else PerBlock(0, self.block(k))
        return QuantScheme(dtype, sym, gran)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def __str__(self) -> str:
        gran = "per-channel" if self.block_size is None else f"block {self.block_size}"
        return f"int{self.bits} {'symmetric' if self.symmetric else 'asymmetric'} {gran}"


@dataclass
class QuantizedWeight:
    """A quantized ``[K, N]`` weight: codes ``q`` (uint8, ``[K, N]``, one code per byte, unpacked),
    ``scales`` (float32) and ``zero_points`` (uint8), both ``[n_blocks, N]``."""

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    grid: WeightGrid

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    @property
    def block_size(self) -> int:
        return self.grid.block(self.shape[0])

    def dequantize(self) -> np.ndarray:
        """``(q - zero_point) * scale`` in float32, ``[K, N]``: what every packed format computes.

        Computed block by block (``(q - z)`` is exact in float32), so the only full-size array is the result."""
        k, n = self.shape
        b = self.block_size
        out = np.empty((k, n), np.float32)
        for i in range(self.scales.shape[0]):
            rows = slice(i * b, min((i + 1) * b, k))
            out[rows] = (self.q[rows].astype(np.float32) - self.zero_points[i].astype(np.float32)) * self.scales[i]
        return out

    def scale_columns(self, factor: np.ndarray) -> None:
        """Multiply output column n by ``factor[n]`` (exact on the grid: only the scales change).

        Used when a later scale search folds ``1/s`` into this layer's outputs (AWQ)."""
        f = np.asarray(factor, np.float32).reshape(1, -1)
        self.scales = (self.scales * f).astype(np.float32)


def weight_and_hessian(w: np.ndarray, h: np.ndarray, who: str) -> tuple[np.ndarray, np.ndarray]:
    """``w`` as an array checked to be 2-D ``[K, N]`` and ``h`` as float64 checked to be ``[K, K]``
    (the inputs of GPTQ and of AWQ's clip search); ``who`` names the caller in the error."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{who} needs a 2-D [K, N] weight, got shape {w.shape}")
    k = w.shape[0]
    h64 = np.asarray(h, np.float64)
    if h64.shape != (k, k):
        raise ValueError(f"H must be [K, K] = [{k}, {k}] for a weight of shape {w.shape}, got {h64.shape}")
    return w, h64


def qparams(lo: np.ndarray, hi: np.ndarray, grid: WeightGrid, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points for blocks whose (finite) range is ``[lo, hi]`` (zero is added to the range).

    Any shape works (the parameters are elementwise in the range ends). Symmetric grids follow onnxruntime's
    definition (module docstring): the signed extreme ``m`` gives ``scale = m / -2**(bits - 1)``."""
    if not grid.symmetric:
        return choose_qparams_from_range(lo, hi, grid.scheme(k))
    lo32 = np.minimum(np.asarray(lo, np.float32), 0).astype(np.float32)
    hi32 = np.maximum(np.asarray(hi, np.float32), 0).astype(np.float32)
    extreme = np.where(-lo32 > hi32, lo32, hi32)  # MLAS keeps the first of equal magnitudes; here the positive one
    half = 2 ** (grid.bits - 1)
    scale = (extreme / np.float32(-half)).astype(np.float32)  # exact: a power-of-two division
    scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)  # an all-zero block: codes 8, exact
    return scale, np.full(scale.shape, half, np.uint8)


def quantize_rows(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmax: int) -> np.ndarray:
    """Codes of rows ``w`` (``[..., N]``) with one scale/zero point per column: ``clip(rint(w / s) + z, 0, qmax)``.

    The float32 division and half-to-even rounding of ONNX QuantizeLinear, so the codes match
    :func:`onnxq.scheme.quantize`; used where GPTQ quantizes one row at a time."""
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.rint(np.asarray(w, np.float32) / np.asarray(scale, np.float32)) + np.asarray(zero_point, np.float32)
    # fmax/fmin ignore NaN (a zero scale's 0/0 becomes code 0) and saturate +-inf: clip(nan_to_num(y)) in place
    np.fmax(y, 0, out=y)
    np.fmin(y, qmax, out=y)
    return y.astype(np.uint8)


ROWS = 256
"""Rows handled at a time where a whole-weight temporary is not needed (bounded memory on large weights)."""


def _finite_range(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise min and max of the finite values of rows ``w`` (0 for a column with none)."""
    finite = np.isfinite(w)
    if finite.all():
        return w.min(axis=0), w.max(axis=0)
    lo = np.where(finite, w, np.inf).min(axis=0)
    hi = np.where(finite, w, -np.inf).max(axis=0)
    return np.where(np.isfinite(lo), lo, 0.0).astype(np.float32), np.where(np.isfinite(hi), hi, 0.0).astype(np.float32)


def rtn(w: np.ndarray, grid: WeightGrid, *, clip: np.ndarray | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of a ``[K, N]`` weight on ``grid``.

    ``clip`` (optional, ``[n_blocks, N]``) shrinks each block's range to ``[max(min, -c), min(max, c)]``
    before choosing its parameters (AWQ's clip search chooses ``c``); values outside saturate. Works block
    by block (at most :data:`ROWS` rows of temporaries), so a ``[576, 49152]`` lm_head costs no more than
    its codes. The codes equal ONNX ``QuantizeLinear``'s (:func:`quantize_rows`).
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"a weight-only weight must be 2-D [K, N], got shape {w.shape}")
    k, n = w.shape
    b, nb = grid.block(k), grid.n_blocks(k)
    lo = np.empty((nb, n), np.float32)
    hi = np.empty((nb, n), np.float32)
    for i in range(nb):
        blo = np.full(n, np.inf, np.float32)
        bhi = np.full(n, -np.inf, np.float32)
        for r in range(i * b, min((i + 1) * b, k), ROWS):
            part_lo, part_hi = _finite_range(np.asarray(w[r : min(r + ROWS, (i + 1) * b, k)], np.float32))
            blo, bhi = np.minimum(blo, part_lo), np.maximum(bhi, part_hi)
        lo[i], hi[i] = blo, bhi
    if clip is not None:
        c = np.asarray(clip, np.float32).reshape(lo.shape)
        lo, hi = np.maximum(lo, -c), np.minimum(hi, c)
    scale, zp = qparams(lo, hi, grid, k)
    scale = np.asarray(scale, np.float32).reshape(nb, n)
    zp = np.asarray(zp).astype(np.uint8).reshape(nb, n)
    q = np.empty((k, n), np.uint8)
    for i in range(nb):
        for r in range(i * b, min((i + 1) * b, k), ROWS):
            rows = slice(r, min(r + ROWS, (i + 1) * b, k))
            q[rows] = quantize_rows(np.asarray(w[rows], np.float32), scale[i], zp[i], grid.qmax)
    return QuantizedWeight(q=q, scales=scale, zero_points=zp, grid=grid)
