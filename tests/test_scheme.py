"""Bit-exact tests of the ``onnxq.scheme`` primitives against independent oracles.

Oracles:

1. onnxruntime's CPU QuantizeLinear / DequantizeLinear kernels on one-node models (graph
   optimisations off). ORT supports every dtype x granularity used here, blocked int8..uint4
   included (opset 21). Its Python API cannot return int4/uint4 tensors, so 4-bit QuantizeLinear
   models end in an exact ``Cast`` to int8.
2. ``onnx.reference.ReferenceEvaluator`` on the same models. It casts ``rint(x / scale)`` to int32
   unchecked, so NaN, +-Inf and ``|x / scale| >= 2**31`` give platform garbage (e.g. +Inf -> -128):
   those elements are left out of the comparison with it (ORT is the oracle for them).
3. The conformance cases shipped in ``onnx.backend.test.case.node.{quantize,dequantize}linear``
   (collected by swapping their ``expect`` for a recorder; the data files are not installed).
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxq.scheme import (
    PerBlock,
    PerChannel,
    PerTensor,
    QuantDtype,
    QuantScheme,
    Symmetry,
    choose_qparams,
    choose_qparams_from_range,
    dequantize,
    fake_quantize,
    quantize,
)

F32 = np.finfo(np.float32)
SHAPE = (24, 172)  # 24 and 172 are multiples of neither 16 nor 32: every PerBlock has a partial block
GRANULARITIES = [
    PerTensor(),
    PerChannel(0),
    PerChannel(1),
    PerBlock(0, 16),
    PerBlock(0, 32),
    PerBlock(1, 16),
    PerBlock(1, 32),
]
SYMMETRIES = list(Symmetry)
ALL_SCHEMES = [
    QuantScheme(dt, sym, g, rr)
    for dt, g, sym, rr in itertools.product(QuantDtype, GRANULARITIES, SYMMETRIES, [False, True])
]
PER_TENSOR_SCHEMES = [
    QuantScheme(dt, sym, PerTensor(), rr)
    for dt, sym, rr in itertools.product(QuantDtype, SYMMETRIES, [False, True])
]


def _id(s: QuantScheme) -> str:
    return str(s).replace(" ", "-")


def limits(dtype: QuantDtype) -> tuple[int, int]:
    """Saturation limits of the storage type."""
    b = dtype.bits
    return (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if dtype.signed else (0, 2**b - 1)


# --------------------------------------------------------------------------------------------------
# one-node models and the two runtimes


def _attrs(scheme: QuantScheme) -> dict[str, int]:
    g = scheme.granularity
    if isinstance(g, PerChannel):
        return {"axis": g.axis}
    if isinstance(g, PerBlock):
        return {"axis": g.axis, "block_size": g.block_size}
    return {}


def _opset(scheme: QuantScheme, opset: int | None) -> int:
    if opset is not None:
        return opset
    return 21 if scheme.dtype.min_opset == 21 or isinstance(scheme.granularity, PerBlock) else 19


def _model(
    nodes: list[onnx.NodeProto], out_type: int, shape: tuple[int, ...], inits: dict, opset: int
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [],
        [helper.make_tensor_value_info("y", out_type, shape)],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def q_model(x, scale, zp, scheme: QuantScheme, opset: int | None = None) -> onnx.ModelProto:
    """QuantizeLinear(x, scale, zp) with everything as initializers (4-bit: + Cast to int8)."""
    four = scheme.dtype.bits == 4
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q" if four else "y"], **_attrs(scheme))]
    if four:
        nodes.append(helper.make_node("Cast", ["q"], ["y"], to=TensorProto.INT8))
    inits = {
        "x": np.asarray(x, np.float32),
        "s": np.asarray(scale, np.float32),
        "z": np.asarray(zp).astype(scheme.dtype.numpy_dtype),
    }
    out = TensorProto.INT8 if four else scheme.dtype.onnx_type
    return _model(nodes, out, np.shape(x), inits, _opset(scheme, opset))


def dq_model(q, scale, zp, scheme: QuantScheme, opset: int | None = None) -> onnx.ModelProto:
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **_attrs(scheme))]
    inits = {
        "q": np.asarray(q).astype(scheme.dtype.numpy_dtype),
        "s": np.asarray(scale, np.float32),
        "z": np.asarray(zp).astype(scheme.dtype.numpy_dtype),
    }
    return _model(nodes, TensorProto.FLOAT, np.shape(q), inits, _opset(scheme, opset))


def run_ort(model: onnx.ModelProto) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1  # thread pools cost more than these tiny kernels
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {})[0]


def run_ref(model: onnx.ModelProto) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # its unchecked int32 cast of NaN/Inf
        return ReferenceEvaluator(model).run(None, {})[0]


def as_int(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.int64)


def assert_codes_equal(
    ours: np.ndarray, theirs: np.ndarray, x: np.ndarray, mask: np.ndarray | None = None
) -> None:
    o, t = as_int(ours), as_int(theirs)
    bad = o != t
    if mask is not None:
        bad &= mask
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{bad.sum()} codes differ; first at {i}: x={x[i]!r} ours={o[i]} theirs={t[i]}")


def assert_floats_equal(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == np.float32 and theirs.dtype == np.float32
    # bitwise: also distinguishes -0.0 / +0.0 and compares inf
    same = np.array_equal(ours.view(np.int32), theirs.view(np.int32))
    assert same, f"{(ours.view(np.int32) != theirs.view(np.int32)).sum()} values differ"


# --------------------------------------------------------------------------------------------------
# probe data


def expand(param: np.ndarray, shape: tuple[int, ...], granularity) -> np.ndarray:
    """A scale / zero point repeated to the full tensor shape (ONNX broadcasting rules)."""
    p = np.asarray(param)
    if isinstance(granularity, PerTensor):
        return np.broadcast_to(p.reshape(()), shape)
    axis = granularity.axis % len(shape)
    if isinstance(granularity, PerChannel):
        return np.broadcast_to(p.reshape([-1 if i == axis else 1 for i in range(len(shape))]), shape)
    return np.repeat(p, granularity.block_size, axis=axis)[tuple(slice(0, d) for d in shape)]


def _data(seed: int = 0) -> np.ndarray:
    """Normal data, rows of very different magnitude; the first rows and columns all >= 0 (an affine
    zero point at the end of the range)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE) * rng.uniform(0.01, 10, (SHAPE[0], 1))
    x[:2], x[:, :3] = np.abs(x[:2]), np.abs(x[:, :3])
    return x.astype(np.float32)


def _probe(x: np.ndarray, scale: np.ndarray, scheme: QuantScheme, seed: int = 1) -> np.ndarray:
    """``x`` overwritten with hard cases: exact .5 ties of ``x / scale`` and their float32 neighbours
    (where ``x * (1 / scale)`` would round differently), huge values that saturate, +-0, NaN, +-Inf."""
    rng = np.random.default_rng(seed)
    s = expand(scale, x.shape, scheme.granularity).astype(np.float64)
    k = rng.integers(-20, 20, x.shape)
    ties = ((k + 0.5) * s).astype(np.float32)
    nudge = rng.integers(-1, 2, x.shape)  # -1 ulp, the tie, +1 ulp
    ties = np.where(nudge < 0, np.nextafter(ties, -np.inf), ties)
    ties = np.where(nudge > 0, np.nextafter(ties, np.inf), ties)
    probe = np.where(rng.random(x.shape) < 0.5, ties, x).astype(np.float32)
    specials = [np.nan, np.inf, -np.inf, 1e30, -1e30, F32.max, -F32.max, 0.0, -0.0, 1e-44]
    specials = np.array(specials, np.float32)
    idx = rng.choice(probe.size, 4 * specials.size, replace=False)
    probe.flat[idx] = np.tile(specials, 4)
    probe.flat[-1] = np.nan  # the vector kernels' tail
    return probe


def _all_codes(scheme: QuantScheme, shape: tuple[int, ...], seed: int = 2) -> np.ndarray:
    lo, hi = limits(scheme.dtype)
    q = np.random.default_rng(seed).integers(lo, hi + 1, shape)
    q.flat[:2] = [lo, hi]
    return q.astype(scheme.dtype.numpy_dtype)


def _range_mask(x: np.ndarray, scale: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """Elements the ReferenceEvaluator handles (finite, ``|x / scale|`` well inside int32)."""
    s = expand(scale, x.shape, scheme.granularity)
    with np.errstate(all="ignore"):
        return np.isfinite(x) & (np.abs(x / s) < 2**30)


# --------------------------------------------------------------------------------------------------
# oracle 1 and 2: the full matrix


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=_id)
def test_matches_onnxruntime(scheme: QuantScheme) -> None:
    x = _data()
    scale, zp = choose_qparams(x, scheme)
    _check_qparams(x, scheme, scale, zp)  # scale finite > 0, codes inside qrange, 0.0 exact
    probe = _probe(x, scale, scheme)
    q = quantize(probe, scale, zp, scheme)
    assert q.dtype == scheme.dtype.numpy_dtype and q.shape == probe.shape
    assert_codes_equal(q, run_ort(q_model(probe, scale, zp, scheme)), probe)

    codes = _all_codes(scheme, x.shape)
    for qq in (q, codes):
        assert_floats_equal(dequantize(qq, scale, zp, scheme), run_ort(dq_model(qq, scale, zp, scheme)))


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=_id)
def test_matches_reference_evaluator(scheme: QuantScheme) -> None:
    x = _data(3)
    scale, zp = choose_qparams(x, scheme)
    _check_qparams(x, scheme, scale, zp)
    probe = _probe(x, scale, scheme, seed=4)
    q = quantize(probe, scale, zp, scheme)
    theirs = run_ref(q_model(probe, scale, zp, scheme))
    assert_codes_equal(q, theirs, probe, mask=_range_mask(probe, scale, scheme))
    codes = _all_codes(scheme, x.shape, seed=5)
    assert_floats_equal(dequantize(codes, scale, zp, scheme), run_ref(dq_model(codes, scale, zp, scheme)))


@pytest.mark.parametrize("opset", [13, 19, 21])
@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(dt, sym, g) for dt in (QuantDtype.INT8, QuantDtype.UINT8) for sym in SYMMETRIES
     for g in (PerTensor(), PerChannel(0), PerChannel(1))],
    ids=_id,
)
def test_8bit_matches_onnxruntime_at_every_opset(scheme: QuantScheme, opset: int) -> None:
    x = _data(6)
    scale, zp = choose_qparams(x, scheme)
    probe = _probe(x, scale, scheme, seed=7)
    q = quantize(probe, scale, zp, scheme)
    assert_codes_equal(q, run_ort(q_model(probe, scale, zp, scheme, opset)), probe)
    assert_floats_equal(dequantize(q, scale, zp, scheme), run_ort(dq_model(q, scale, zp, scheme, opset)))


# --------------------------------------------------------------------------------------------------
# degenerate tensors


DEGENERATE = {
    "zeros": np.zeros(SHAPE, np.float32),
    "const_pos": np.full(SHAPE, 3.7, np.float32),
    "const_neg": np.full(SHAPE, -3.7, np.float32),
    "all_nan": np.full(SHAPE, np.nan, np.float32),
    "all_inf": np.where(np.arange(SHAPE[1]) % 2, np.inf, -np.inf) * np.ones(SHAPE, np.float32),
    "subnormal": np.full(SHAPE, 1e-44, np.float32),
    "near_subnormal": (np.random.default_rng(8).standard_normal(SHAPE) * 1e-38).astype(np.float32),
    "float32_max": np.where(np.arange(SHAPE[1]) % 2, F32.max, -F32.max) * np.ones(SHAPE, np.float32),
    "nonfinite_mix": np.where(np.random.default_rng(9).random(SHAPE) < 0.1, np.nan, _data(10)),
}
DEGENERATE = {k: v.astype(np.float32) for k, v in DEGENERATE.items()}
DEGENERATE["nonfinite_mix"].flat[::7] = np.inf
DEGENERATE["nonfinite_mix"].flat[3::11] = -np.inf


def _check_qparams(x: np.ndarray, scheme: QuantScheme, scale: np.ndarray, zp: np.ndarray) -> None:
    """The invariants choose_qparams promises, for data ``x`` it was computed from."""
    assert scale.dtype == np.float32 and zp.dtype == scheme.dtype.numpy_dtype
    assert np.isfinite(scale).all() and (scale >= F32.tiny).all(), "scale must be finite, normal and > 0"
    qmin, qmax = scheme.qrange
    assert qmin <= as_int(zp).min() and as_int(zp).max() <= qmax
    with np.errstate(over="ignore"):
        q = quantize(x, scale, zp, scheme)
        xq = dequantize(q, scale, zp, scheme)
    finite = np.isfinite(x)
    if finite.any():
        qf = as_int(q)[finite]
        assert qmin <= qf.min() and qf.max() <= qmax, f"codes {qf.min()}..{qf.max()} outside {scheme.qrange}"
        assert np.isfinite(xq[finite]).all(), "finite input dequantized to +-inf"
    # zero is exact
    zeros = np.zeros(x.shape, np.float32)
    assert_floats_equal(dequantize(quantize(zeros, scale, zp, scheme), scale, zp, scheme), zeros)


@pytest.mark.parametrize("name", list(DEGENERATE))
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0), PerBlock(1, 32)], ids=str)
@pytest.mark.parametrize("dtype", list(QuantDtype), ids=lambda d: d.value)
def test_degenerate_tensors(name: str, granularity, dtype: QuantDtype) -> None:
    x = DEGENERATE[name]
    for sym, rr in itertools.product(SYMMETRIES, [False, True]):
        scheme = QuantScheme(dtype, sym, granularity, rr)
        with np.errstate(all="raise", under="ignore"):  # no division by zero, no NaN scale
            scale, zp = choose_qparams(x, scheme)
        _check_qparams(x, scheme, scale, zp)
        if name in ("zeros", "all_nan", "all_inf"):
            assert (scale == 1).all()
    # ORT agrees on the quantized values, NaN/Inf included (one scheme per dtype keeps this fast)
    scheme = QuantScheme(dtype, Symmetry.AFFINE, granularity)
    scale, zp = choose_qparams(x, scheme)
    with np.errstate(all="ignore"):
        q = quantize(x, scale, zp, scheme)
        xq = dequantize(q, scale, zp, scheme)
    assert_codes_equal(q, run_ort(q_model(x, scale, zp, scheme)), x)
    assert_floats_equal(xq, run_ort(dq_model(q, scale, zp, scheme)))


@pytest.mark.parametrize(
    "shape,granularity", [((1,), PerTensor()), ((1, 1), PerChannel(0)), ((1, 1), PerBlock(1, 16))], ids=str
)
@pytest.mark.parametrize("dtype", list(QuantDtype), ids=lambda d: d.value)
def test_single_element(dtype: QuantDtype, shape: tuple[int, ...], granularity) -> None:
    for value, sym, rr in itertools.product([0.0, -2.5, 1e-30, np.nan], SYMMETRIES, [False, True]):
        scheme = QuantScheme(dtype, sym, granularity, rr)
        x = np.full(shape, value, np.float32)
        scale, zp = choose_qparams(x, scheme)
        _check_qparams(x, scheme, scale, zp)
        q = quantize(x, scale, zp, scheme)
        xq = dequantize(q, scale, zp, scheme)
        assert_codes_equal(q, run_ort(q_model(x, scale, zp, scheme)), x)  # 4-bit: an odd element count
        assert_floats_equal(xq, run_ort(dq_model(q, scale, zp, scheme)))
        if np.isfinite(value) and value != 0 and dtype.bits >= 8:
            # a lone value sits on the end of the grid and is reproduced almost exactly
            assert xq.flat[0] == pytest.approx(value, rel=1e-6)


@pytest.mark.parametrize("dtype", list(QuantDtype), ids=lambda d: d.value)
def test_round_half_to_even(dtype: QuantDtype) -> None:
    scheme = QuantScheme(dtype, Symmetry.AFFINE, PerTensor())
    x = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 0.49999997, 0.50000006], np.float32)
    zp = np.array(1 if dtype.signed else 4).astype(dtype.numpy_dtype)
    expected = np.array([0, 2, 2, 4, 0, -2, -2, -4, 0, 1]) + int(zp)
    expected = np.clip(expected, *limits(dtype))
    q = quantize(x, np.float32(1.0), zp, scheme)
    np.testing.assert_array_equal(as_int(q), expected)
    assert_codes_equal(q, run_ort(q_model(x, np.float32(1.0), zp, scheme)), x)
    assert_codes_equal(q, run_ref(q_model(x, np.float32(1.0), zp, scheme)), x)
    # x / s is a float32 division, not x * (1 / s): here x / s == 6.5 exactly (-> 6), x * (1 / s) == 6.5000005
    s = np.float32(0.03)
    x = np.array([6.5 * np.float64(s)], np.float32)
    zero = np.array(0).astype(dtype.numpy_dtype)
    assert x[0] / s == 6.5 and x[0] * (np.float32(1) / s) > 6.5
    assert int(quantize(x, s, zero, scheme)[0]) == 6
    assert_codes_equal(quantize(x, s, zero, scheme), run_ort(q_model(x, s, zero, scheme)), x)


@pytest.mark.parametrize("dtype", list(QuantDtype), ids=lambda d: d.value)
def test_saturation_and_nonfinite(dtype: QuantDtype) -> None:
    """Huge values saturate to the storage limits; +Inf -> high, -Inf and NaN -> low (like ORT)."""
    lo, hi = limits(dtype)
    x = np.array([1e30, -1e30, F32.max, -F32.max, np.inf, -np.inf, np.nan, 1e6, -1e6], np.float32)
    expected = [hi, lo, hi, lo, hi, lo, lo, hi, lo]
    for zp_value in (0, 1):
        scheme = QuantScheme(dtype, Symmetry.AFFINE, PerTensor())
        zp = np.array(zp_value).astype(dtype.numpy_dtype)
        q = quantize(x, np.float32(0.01), zp, scheme)
        np.testing.assert_array_equal(as_int(q), expected)
        assert_codes_equal(q, run_ort(q_model(x, np.float32(0.01), zp, scheme)), x)


def test_choose_qparams_ignores_nonfinite() -> None:
    clean = _data(11)
    dirty = clean.copy()
    dirty.flat[::5] = np.nan
    dirty.flat[1::7] = np.inf
    dirty.flat[2::9] = -np.inf
    kept = clean.copy()
    kept[~np.isfinite(dirty)] = 0.0  # zero is always inside the range anyway
    for scheme in ALL_SCHEMES:
        s_dirty, z_dirty = choose_qparams(dirty, scheme)
        s_kept, z_kept = choose_qparams(kept, scheme)
        np.testing.assert_array_equal(s_dirty, s_kept)
        np.testing.assert_array_equal(as_int(z_dirty), as_int(z_kept))


@pytest.mark.parametrize("dtype", list(QuantDtype), ids=lambda d: d.value)
@pytest.mark.parametrize("symmetry", SYMMETRIES, ids=lambda s: s.value)
@pytest.mark.parametrize("reduce_range", [False, True])
def test_range_ends_stay_inside_qrange(dtype: QuantDtype, symmetry: Symmetry, reduce_range: bool) -> None:
    """20 000 random ranges, a third of them built so that ``rmin / scale`` is an exact .5 tie."""
    scheme = QuantScheme(dtype, symmetry, PerChannel(0), reduce_range)
    rng = np.random.default_rng(14)
    n = 20_000
    mag = 10.0 ** rng.uniform(-40, 38.5, n)
    lo = (-rng.random(n) * mag).astype(np.float32)
    hi = (rng.random(n) * mag).astype(np.float32)
    steps = scheme.qmax - scheme.qmin
    k = rng.integers(0, steps, n)
    unit = 10.0 ** rng.uniform(-30, 30, n)
    tie = rng.random(n) < 1 / 3
    lo[tie] = (-(k[tie] + 0.5) * unit[tie]).astype(np.float32)
    hi[tie] = ((steps - k[tie] - 0.5) * unit[tie]).astype(np.float32)
    scale, zp = choose_qparams_from_range(lo, hi, scheme)
    ends = np.stack([lo, hi, np.zeros_like(lo)], axis=1)
    _check_qparams(ends, scheme, scale, zp)
    if symmetry is Symmetry.AFFINE:
        assert (as_int(quantize(ends, scale, zp, scheme))[:, 0] == scheme.qmin).all()


def test_choose_qparams_from_range_degenerate_inputs() -> None:
    scheme = QuantScheme(QuantDtype.INT8, Symmetry.AFFINE)
    for rmin, rmax in [(0, 0), (np.nan, np.nan), (-np.inf, np.inf), (5.0, -5.0), (-1e300, 1e300)]:
        scale, zp = choose_qparams_from_range(rmin, rmax, scheme)
        assert np.isfinite(scale) and scale > 0
        assert int(quantize(np.float32(0), scale, zp, scheme)) == int(zp)
    assert float(choose_qparams_from_range(0.0, 0.0, scheme)[0]) == 1.0


# --------------------------------------------------------------------------------------------------
# regressions: the discrepancies these tests found in choose_qparams_from_range


def test_regression_reduced_range_tie_gives_code_64() -> None:
    # rmin / scale == -1.5 exactly: the old zero point round(-64 + 1.5) = -62 (half to even) put
    # rmax = 125.5 on rint(125.5) - 62 = 64, outside [-64, 63]
    scheme = QuantScheme(QuantDtype.INT8, Symmetry.AFFINE, PerTensor(), reduce_range=True)
    scale, zp = choose_qparams(np.array([-1.5, 125.5], np.float32), scheme)
    q = as_int(quantize(np.array([-1.5, 125.5], np.float32), scale, zp, scheme))
    assert q[0] == -64 and q[1] <= 63  # the tie is broken by widening the scale one ulp: 62


def test_regression_zero_point_from_float32_scale() -> None:
    # the old zero point came from the float64 scale; quantize() divides by the float32 one, which put
    # rmin on code -5 of an int4 range [-4, 3]
    scheme = QuantScheme(QuantDtype.INT4, Symmetry.AFFINE, PerTensor(), reduce_range=True)
    x = np.array([-3.4e38, 3.4e38], np.float32)
    scale, zp = choose_qparams(x, scheme)
    q = as_int(quantize(x, scale, zp, scheme))
    assert q[0] == -4 and q[1] <= 3


def test_regression_subnormal_scale() -> None:
    # a subnormal scale (1e-44 / 3 rounds to 2 * 2**-149) put 1e-44 on code 4 of [-3, 3]
    scheme = QuantScheme(QuantDtype.INT4, Symmetry.SYMMETRIC, PerTensor(), reduce_range=True)
    x = np.full(4, 1e-44, np.float32)
    scale, zp = choose_qparams(x, scheme)
    assert scale >= F32.tiny
    assert -3 <= int(quantize(x, scale, zp, scheme)[0]) <= 3


def test_regression_fake_quantize_of_float32_max_is_finite() -> None:
    x = np.array([-F32.max, 0.0, F32.max], np.float32)
    for scheme in PER_TENSOR_SCHEMES:
        with np.errstate(over="raise"):
            assert np.isfinite(fake_quantize(x, scheme)).all(), scheme


# --------------------------------------------------------------------------------------------------
# the symmetric int8 contract


@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0), PerBlock(1, 16)], ids=str)
@pytest.mark.parametrize("reduce_range,bound", [(False, 127), (True, 64)])
def test_symmetric_int8(granularity, reduce_range: bool, bound: int) -> None:
    scheme = QuantScheme(QuantDtype.INT8, Symmetry.SYMMETRIC, granularity, reduce_range)
    assert scheme.qrange == (-bound, bound)
    x = _data(15)
    scale, zp = choose_qparams(x, scheme)
    assert (as_int(zp) == 0).all()
    q = as_int(quantize(x, scale, zp, scheme))
    assert q.min() >= -bound and q.max() <= bound
    assert max(-q.min(), q.max()) == bound  # the largest |x| lands on the end of the range


# --------------------------------------------------------------------------------------------------
# oracle 3: onnx's own conformance cases


def _collect_conformance() -> list[tuple[str, onnx.NodeProto, list[Any], list[Any]]]:
    from onnx.backend.test.case.node import dequantizelinear, quantizelinear

    cases: list[tuple[str, onnx.NodeProto, list[Any], list[Any]]] = []

    def record(node, inputs, outputs, name, **_kwargs):
        cases.append((name, node, list(inputs), list(outputs)))

    for module, cls in ((quantizelinear, quantizelinear.QuantizeLinear),
                        (dequantizelinear, dequantizelinear.DequantizeLinear)):
        saved = module.expect
        module.expect = record
        try:
            for attr in sorted(dir(cls)):
                if attr.startswith("export"):
                    getattr(cls, attr)()
        finally:
            module.expect = saved
    return cases


CONFORMANCE = _collect_conformance()
_DTYPES = {np.dtype(d.numpy_dtype): d for d in QuantDtype}


def _arr(v: Any) -> np.ndarray:
    return numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)


def test_conformance_cases_were_found() -> None:
    names = {c[0] for c in CONFORMANCE}
    assert {"test_quantizelinear", "test_quantizelinear_int4", "test_quantizelinear_blocked_asymmetric",
            "test_dequantizelinear", "test_dequantizelinear_blocked"} <= names


@pytest.mark.parametrize("case", CONFORMANCE, ids=[c[0] for c in CONFORMANCE])
def test_onnx_conformance_case(case) -> None:
    name, node, inputs, outputs = case
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    arrays = [_arr(v) for v in inputs]
    expected = _arr(outputs[0])
    quant = node.op_type == "QuantizeLinear"
    int_side = expected if quant else arrays[0]
    dtype = _DTYPES.get(int_side.dtype)
    if dtype is None:
        pytest.skip(f"{int_side.dtype} is not an onnxq QuantDtype (float8/float4/2-bit are unsupported)")
    if quant and attrs.get("output_dtype", dtype.onnx_type) != dtype.onnx_type:
        pytest.skip("output_dtype differs from the output's type")
    scale = arrays[1]
    if scale.dtype != np.float32:
        pytest.skip(f"scale of type {scale.dtype}: onnxq scales are float32")
    zp = arrays[2] if len(arrays) > 2 else np.zeros(scale.shape, dtype.numpy_dtype)
    axis = attrs.get("axis", 1)
    if attrs.get("block_size"):
        granularity = PerBlock(axis, attrs["block_size"])
    elif scale.size == 1:
        granularity, scale, zp = PerTensor(), scale.reshape(()), zp.reshape(())
    else:
        granularity = PerChannel(axis)
    scheme = QuantScheme(dtype, Symmetry.AFFINE, granularity)
    if quant:
        ours = quantize(arrays[0], scale, zp, scheme)
        assert ours.dtype == expected.dtype
        np.testing.assert_array_equal(as_int(ours), as_int(expected))
    else:
        ours = dequantize(arrays[0], scale, zp, scheme)
        assert_floats_equal(ours, expected.astype(np.float32))


@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(0), PerBlock(1, 16)])
def test_mse_qparams_never_worse_than_minmax_and_match_brute_force(gran: object) -> None:
    from onnxq.scheme import choose_qparams_mse

    rng = np.random.default_rng(3)
    x = rng.standard_t(3, size=(6, 40)).astype(np.float32)  # heavy tails: clipping pays
    scheme = QuantScheme(QuantDtype.INT8, Symmetry.SYMMETRIC, gran, reduce_range=True)

    def err(scale: np.ndarray, zp: np.ndarray) -> float:
        q = quantize(x, scale, zp, scheme, clip_to_scheme=True)
        return float(((dequantize(q, scale, zp, scheme) - x) ** 2).sum())

    s_mse, z_mse = choose_qparams_mse(x, scheme)
    assert err(s_mse, z_mse) <= err(*choose_qparams(x, scheme)) + 1e-6
    if isinstance(gran, PerTensor):  # brute force over the same ratio grid
        lo, hi = float(x.min()), float(x.max())
        best = min(err(*choose_qparams_from_range(lo * r, hi * r, scheme)) for r in np.linspace(1.0, 0.5, 51, dtype=np.float32))
        assert err(s_mse, z_mse) == pytest.approx(best, rel=1e-6)
    q = quantize(x, s_mse, z_mse, scheme, clip_to_scheme=True)
    assert np.abs(q.astype(int)).max() <= 64, "stored codes stay inside the 7-bit range"
