"""GPTQ (onnxq.weightonly.gptq) against a direct, slow implementation of the paper's update rule.

The reference below is written from the paper (Eq. 2/3, the OBQ form), not from the fast code: rows are
taken one at a time with the *full* inverse Hessian (no Cholesky, no lazy batches), the optimal update
``-(w_i - q_i) / Hinv[i, i] * Hinv[:, i]`` is applied to the rows not yet quantized, and row ``i`` is then
eliminated from ``Hinv``. Both use the same preprocessing (dead rows zeroed with their diagonal set to
the mean live diagonal, damping ``damp * mean(diag H)``) and the same ONNX-exact row quantizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxq.weightonly.grid import QuantizedWeight, WeightGrid, qparams, quantize_rows, rtn
from onnxq.weightonly.gptq import HessianError, gptq, proxy_loss

from conftest import asset


def reference_gptq(
    w: np.ndarray, h: np.ndarray, grid: WeightGrid, *, damp: float = 0.01, act_order: bool = False, static: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The paper's row-by-row GPTQ with a full inverse Hessian; returns (codes, scales, zero points, loss)."""
    static = static or act_order
    k, n = w.shape
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    diag = np.diag(h).copy()
    dead = diag == 0
    w[dead] = 0.0
    h[dead, dead] = diag[~dead].mean() if (~dead).any() else 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.inv(h)
    b = grid.block(k)
    nb = grid.n_blocks(k)
    scales = np.zeros((nb, n), np.float32)
    zps = np.zeros((nb, n), np.uint8)
    if static:  # static groups: parameters of every block from the original weights
        for blk in range(nb):
            rows = w[blk * b : (blk + 1) * b]
            scales[blk], zps[blk] = qparams(rows.min(0), rows.max(0), grid, k)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    q = np.zeros((k, n), np.uint8)
    remaining = np.ones(k, bool)
    loss = 0.0
    for i in order:
        if not static and i % b == 0:
            rows = w[i : i + b]
            scales[i // b], zps[i // b] = qparams(rows.min(0), rows.max(0), grid, k)
        sc, zp = scales[i // b], zps[i // b]
        q[i] = quantize_rows(w[i], sc, zp, grid.qmax)
        deq = (q[i].astype(np.float32) - zp.astype(np.float32)) * sc
        err = w[i] - deq
        loss += float((err**2).sum() / hinv[i, i])
        remaining[i] = False
        w[remaining] -= np.outer(hinv[remaining, i] / hinv[i, i], err)
        w[i] = deq
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return q, scales, zps, loss


def correlated_x(rng: np.random.Generator, rows: int, k: int, rank: int | None = None) -> np.ndarray:
    """Activations with strongly correlated channels of very different magnitudes."""
    rank = rank or max(4, k // 4)
    z = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, k))
    z += 0.1 * rng.standard_normal((rows, k))
    return z * np.exp(rng.normal(0.0, 0.7, k))


def _compare(w, h, grid, *, act_order, lazy_block, damp=0.01, static=False):
    res = gptq(w, h, grid, act_order=act_order, lazy_block=lazy_block, damp=damp, static_groups=static)
    q_ref, s_ref, z_ref, loss_ref = reference_gptq(w, h, grid, damp=damp, act_order=act_order, static=static)
    n_diff = int((res.weight.q != q_ref).sum())
    print(f"{grid}, act_order={act_order}, static={static}, lazy_block={lazy_block}: {n_diff} of {q_ref.size} codes differ")
    return res, q_ref, s_ref, z_ref, loss_ref, n_diff


CASES = [
    # (K, N, grid, act_order, lazy_block)
    (172, 40, WeightGrid(4, False, 32), False, 50),
    (172, 40, WeightGrid(4, False, 32), True, 50),
    (256, 24, WeightGrid(4, True, 128), False, 96),  # blocks of 128 straddle lazy batches of 96
    (256, 24, WeightGrid(4, True, 128), True, 96),
    (172, 32, WeightGrid(8, False, None), False, 64),
    (172, 32, WeightGrid(8, True, None), True, 172),
    (172, 32, WeightGrid(4, True, 128), False, 7),
]


@pytest.mark.parametrize("k, n, grid, act_order, lazy_block", CASES)
def test_matches_reference(k: int, n: int, grid: WeightGrid, act_order: bool, lazy_block: int) -> None:
    rng = np.random.default_rng(k + n + grid.bits + int(act_order))
    x = correlated_x(rng, 3 * k, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    h = x.T @ x
    res, q_ref, s_ref, z_ref, loss_ref, n_diff = _compare(w, h, grid, act_order=act_order, lazy_block=lazy_block)
    assert n_diff <= 0.001 * q_ref.size
    np.testing.assert_allclose(res.weight.scales, s_ref, rtol=1e-5)
    if n_diff == 0:
        np.testing.assert_array_equal(res.weight.zero_points, z_ref)
        np.testing.assert_allclose(res.loss, loss_ref, rtol=1e-7)
    deq_ref = QuantizedWeight(q_ref, s_ref, z_ref, grid).dequantize()
    np.testing.assert_allclose(res.weight.dequantize(), deq_ref, atol=float(s_ref.max()) * 1.001)
    assert (res.perm is not None) == act_order
    assert res.static_groups == act_order


def test_static_groups_without_act_order_match_reference() -> None:
    rng = np.random.default_rng(11)
    k, n = 172, 24
    x = correlated_x(rng, 400, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    res, q_ref, s_ref, _, loss_ref, n_diff = _compare(w, x.T @ x, WeightGrid(4, False, 32), act_order=False, lazy_block=50, static=True)
    assert n_diff <= 0.001 * q_ref.size
    assert res.static_groups and res.perm is None
    np.testing.assert_array_equal(res.weight.scales, rtn(w, WeightGrid(4, False, 32)).scales)  # fixed up front
    np.testing.assert_allclose(res.loss, loss_ref, rtol=1e-6)


def test_loss_is_the_damped_proxy_error() -> None:
    """The summed OBS increments err^2 / Hinv_qq equal tr(dW^T (H + lambda I) dW): a whole-run invariant."""
    rng = np.random.default_rng(1)
    k, n = 172, 48
    x = correlated_x(rng, 400, k)
    h = x.T @ x
    w = rng.standard_normal((k, n)).astype(np.float32)
    for act_order in (False, True):
        res = gptq(w, h, WeightGrid(4, False, 32), act_order=act_order, lazy_block=64)
        d = res.weight.dequantize().astype(np.float64) - w
        lam = res.damp * np.mean(np.diag(h))
        np.testing.assert_allclose(res.loss, proxy_loss(w, res.weight.dequantize(), h) + lam * (d**2).sum(), rtol=1e-9)
        np.testing.assert_allclose(res.proxy_loss, np.linalg.norm(x @ d) ** 2, rtol=1e-9)


def test_lazy_block_does_not_change_the_result() -> None:
    rng = np.random.default_rng(2)
    k, n = 172, 16
    x = correlated_x(rng, 300, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    grid = WeightGrid(4, False, 32)
    ref = gptq(w, x.T @ x, grid, lazy_block=172)
    for lb in (1, 13, 32, 100):
        other = gptq(w, x.T @ x, grid, lazy_block=lb)
        assert (other.weight.q != ref.weight.q).sum() <= 0.001 * w.size
        np.testing.assert_allclose(other.weight.scales, ref.weight.scales, rtol=1e-5)


@pytest.mark.parametrize("grid", [WeightGrid(4, False, 32), WeightGrid(4, True, 128), WeightGrid(8, False, None)])
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn_on_correlated_inputs(grid: WeightGrid, act_order: bool) -> None:
    rng = np.random.default_rng(3)
    k, n = 172, 64
    x = correlated_x(rng, 600, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    res = gptq(w, x.T @ x, grid, act_order=act_order)
    rtn_loss = proxy_loss(w, rtn(w, grid).dequantize(), x.T @ x)
    print(f"{grid}, act_order={act_order}: GPTQ/RTN proxy loss {res.proxy_loss / rtn_loss:.3f}")
    np.testing.assert_allclose(res.rtn_proxy_loss, rtn_loss, rtol=1e-12)
    assert res.proxy_loss < 0.5 * rtn_loss
    assert res.gain_over_rtn is not None and res.gain_over_rtn > 2


def test_shapes_and_dtypes() -> None:
    rng = np.random.default_rng(4)
    k, n = 172, 9
    x = rng.standard_normal((200, k))
    res = gptq(rng.standard_normal((k, n)), x.T @ x, WeightGrid(4, False, 32), compare_rtn=False)
    qw = res.weight
    assert qw.q.shape == (k, n) and qw.q.dtype == np.uint8 and int(qw.q.max()) <= 15
    assert qw.scales.shape == (6, n) and qw.scales.dtype == np.float32
    assert qw.zero_points.shape == (6, n) and qw.zero_points.dtype == np.uint8
    assert res.rtn_proxy_loss is None and res.gain_over_rtn is None
    assert res.damp == 0.01 and res.damp_retries == 0 and res.dead_rows == 0


# --- degenerate inputs -------------------------------------------------------------------------------


def test_dead_input_rows_are_zeroed() -> None:
    rng = np.random.default_rng(5)
    k, n = 172, 20
    x = correlated_x(rng, 400, k)
    dead = [0, 33, 100, 171]
    x[:, dead] = 0.0
    w = rng.standard_normal((k, n)).astype(np.float32)
    h = x.T @ x
    for act_order in (False, True):
        res, q_ref, _, _, _, n_diff = _compare(w, h, WeightGrid(4, False, 32), act_order=act_order, lazy_block=50)
        assert n_diff <= 0.001 * q_ref.size
        assert res.dead_rows == len(dead)
        np.testing.assert_array_equal(res.weight.dequantize()[dead], 0.0)
        assert res.proxy_loss < res.rtn_proxy_loss


def test_singular_hessian_fewer_rows_than_k() -> None:
    """H = X^T X of rank 20 < K: damping makes it definite and the result still matches the reference."""
    rng = np.random.default_rng(6)
    k, n = 172, 16
    x = rng.standard_normal((20, k))
    w = rng.standard_normal((k, n)).astype(np.float32)
    h = x.T @ x
    res, q_ref, _, _, _, n_diff = _compare(w, h, WeightGrid(4, True, 32), act_order=False, lazy_block=64)
    assert n_diff <= 0.001 * q_ref.size
    assert res.damp_retries == 0
    assert res.proxy_loss < res.rtn_proxy_loss


def test_undamped_singular_hessian_retries_with_more_damping(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(7)
    k, n = 64, 8
    x = rng.standard_normal((10, k))
    w = rng.standard_normal((k, n)).astype(np.float32)
    res = gptq(w, x.T @ x, WeightGrid(4, False, 32), damp=0.0)
    assert res.damp_retries >= 1 and res.damp > 0
    assert "not positive definite" in caplog.text
    assert np.isfinite(res.loss) and res.proxy_loss < res.rtn_proxy_loss


def test_indefinite_or_non_finite_hessian_raises() -> None:
    k = 32
    h = np.eye(k)
    h[0, 1] = h[1, 0] = 100.0  # unit diagonal, yet an eigenvalue of -99: no damping up to 10x fixes that
    with pytest.raises(HessianError, match="not positive definite"):
        gptq(np.ones((k, 4)), h, WeightGrid(4, False, 16))
    h = np.eye(k)
    h[3, 3] = np.nan
    with pytest.raises(HessianError, match="NaN or Inf"):
        gptq(np.ones((k, 4)), h, WeightGrid(4, False, 16))
    with pytest.raises(HessianError, match="negative mean diagonal"):
        gptq(np.ones((k, 4)), -np.eye(k), WeightGrid(4, False, 16))
    with pytest.raises(ValueError, match=r"\[32, 32\]"):
        gptq(np.ones((k, 4)), np.eye(k + 1), WeightGrid(4, False, 16))


def test_zero_weight_rows_and_columns_stay_zero() -> None:
    rng = np.random.default_rng(8)
    k, n = 172, 12
    x = correlated_x(rng, 300, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:40] = 0.0  # a whole block (and more) of zero rows: their range is {0} until errors flow in
    w[:, 5] = 0.0  # a zero output column: nothing to compensate, stays exactly zero
    for grid in (WeightGrid(4, False, 32), WeightGrid(4, True, 32), WeightGrid(8, False, None)):
        res, q_ref, _, _, _, n_diff = _compare(w, x.T @ x, grid, act_order=False, lazy_block=64)
        assert n_diff <= 0.001 * q_ref.size
        deq = res.weight.dequantize()
        np.testing.assert_array_equal(deq[:, 5], 0.0)
        # usable scales: finite and nonzero (symmetric grids keep the block extreme's sign, as onnxruntime's do)
        assert np.all(np.isfinite(deq)) and np.all(np.abs(res.weight.scales) > 0)
    all_zero = gptq(np.zeros((k, n)), x.T @ x, WeightGrid(4, False, 32))
    np.testing.assert_array_equal(all_zero.weight.dequantize(), 0.0)
    assert all_zero.loss == 0.0 and all_zero.proxy_loss == 0.0


def test_no_calibration_signal_at_all() -> None:
    """An all-zero H (every row dead): the reference's rule zeroes the whole weight."""
    res = gptq(np.ones((64, 4)), np.zeros((64, 64)), WeightGrid(4, False, 32))
    assert res.dead_rows == 64
    np.testing.assert_array_equal(res.weight.dequantize(), 0.0)


# --- real weights: stories260K ----------------------------------------------------------------------

_MATMUL = "/layers.0/feed_forward/w2/MatMul"


def _stories_activations(assets: Path, windows: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """The real input rows of ``_MATMUL`` ([windows * seq, 172]) and its weight ([172, 64])."""
    import onnxruntime as ort

    model = onnx.load(str(asset(assets, "llm/stories260K/stories260K.onnx")))
    node = next(nd for nd in model.graph.node if nd.name == _MATMUL)
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    model.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    tokens = json.loads(asset(assets, "text/tokens/stories260K__tinystories_valid_shared.json").read_text())
    ids = np.asarray(tokens[: windows * seq], np.int64).reshape(windows, seq)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    act = sess.run([node.input[0]], {"input_ids": ids})[0]
    return act.reshape(-1, act.shape[-1]).astype(np.float64), onnx.numpy_helper.to_array(weight)


@pytest.mark.assets
def test_stories260k_real_activations(assets: Path) -> None:
    x, w = _stories_activations(assets, windows=8, seq=128)
    assert w.shape == (172, 64) and x.shape == (1024, 172)
    x_cal, x_eval = x[:512], x[512:]  # separate windows for H and for the held-out error
    h = x_cal.T @ x_cal
    for grid, act_order in [
        (WeightGrid(4, False, 32), False),
        (WeightGrid(4, False, 32), True),
        (WeightGrid(4, True, 128), False),
        (WeightGrid(4, True, 128), True),
        (WeightGrid(8, False, None), False),
    ]:
        res, q_ref, _, _, _, n_diff = _compare(w, h, grid, act_order=act_order, lazy_block=128)
        assert n_diff <= 0.001 * q_ref.size
        err_gptq = np.linalg.norm(x_eval @ (res.weight.dequantize() - w)) ** 2
        err_rtn = np.linalg.norm(x_eval @ (rtn(w, grid).dequantize() - w)) ** 2
        print(f"  held-out output error GPTQ / RTN = {err_gptq / err_rtn:.3f}")
        assert err_gptq < 0.9 * err_rtn


def test_quantize_rows_matches_onnx_quantizelinear_and_maps_non_finite_values() -> None:
    """The row quantizer GPTQ and AWQ share: finite values give ONNX QuantizeLinear's uint8 codes (half to even,
    saturation) before the clamp to ``qmax``; a zero scale's 0/0 gives code 0 and +-inf saturate to ``qmax`` / 0."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(3)
    w = (rng.normal(size=(6, 8)) * 3).astype(np.float32)
    w[0, :4] = [0.5, 1.5, 2.5, -0.5]  # exact halves: half to even
    w[1, 0], w[1, 1] = 1e6, -1e6  # saturation
    scale = rng.uniform(0.1, 1.0, 8).astype(np.float32)
    zp = rng.integers(0, 16, 8).astype(np.uint8)
    codes = quantize_rows(w, scale, zp, 15)
    node = onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=1)
    graph = onnx.helper.make_graph(
        [node], "q", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(w.shape))],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, list(w.shape))],
        [onnx.numpy_helper.from_array(scale, "s"), onnx.numpy_helper.from_array(zp, "z")],
    )  # fmt: skip
    (ref,) = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])).run(None, {"x": w})
    np.testing.assert_array_equal(codes, np.minimum(ref, 15))
    odd = np.array([[0.0, 1.0, -1.0, np.inf, -np.inf, np.nan]], np.float32)
    got = quantize_rows(odd, np.array([0, 0, 0, 1, 1, 1], np.float32), np.full(6, 8, np.uint8), 15)
    np.testing.assert_array_equal(got, [[0, 15, 0, 15, 0, 0]])
