"""AWQ scale and clip searches (onnxq.weightonly.awq) against brute force with the activations themselves.

The fast code scores candidates through ``H = X^T X``; the brute force here recomputes every candidate's
output error with ``X`` explicitly, one (block, column, candidate) at a time for the clip search, with
the per-column quantizer (``qparams`` + ``quantize_rows``) instead of the vectorised ``rtn``. The
module-output score (``output_error``) is checked against a SwiGLU MLP written out in numpy, and the
clip-aware scale search against candidates clipped by the brute-force clip search.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.weightonly.awq import (
    awq, awq_candidate_scales, awq_clip_search, awq_scale_search, output_error, tie_channels,
)
from onnxq.weightonly.grid import WeightGrid, qparams, quantize_rows, rtn

GRIDS = [
    WeightGrid(4, False, 128),
    WeightGrid(4, True, 128),
    WeightGrid(4, False, 32),
    WeightGrid(4, True, 32),
    WeightGrid(8, False, None),
]


def outlier_x(rng: np.random.Generator, rows: int, k: int, n_outliers: int = 4, gain: float = 30.0) -> np.ndarray:
    """Activations with a few input channels much larger than the rest (as in LLMs)."""
    x = rng.standard_normal((rows, k)) * np.exp(rng.normal(0.0, 0.3, k))
    x[:, rng.choice(k, n_outliers, replace=False)] *= gain
    return x


def candidate(absmean: np.ndarray, ratio: float) -> np.ndarray:
    """The reference's candidate (auto_scale.py): x_mean ** ratio, clamped at 1e-4, over sqrt(max * min)."""
    s = np.maximum(absmean**ratio, 1e-4)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def brute_scale_losses(ws: list[np.ndarray], x: np.ndarray, grid: WeightGrid, n_grid: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """For every ratio: sum_i ||(X / s) @ dequant(rtn(diag(s) W_i)) - X @ W_i||^2, with s from the formula."""
    absmean = np.abs(x).mean(0)
    losses, scales = [], []
    for i in range(n_grid):
        s = candidate(absmean, i / n_grid)
        loss = 0.0
        for w in ws:
            q = rtn(w.astype(np.float32) * s[:, None], grid).dequantize().astype(np.float64)
            loss += np.linalg.norm((x / s.astype(np.float64)) @ q - x @ w.astype(np.float64)) ** 2
        losses.append(loss)
        scales.append(s)
    return np.asarray(losses), scales


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_scale_search_matches_brute_force(grid: WeightGrid) -> None:
    rng = np.random.default_rng(grid.bits + int(grid.symmetric) + (grid.block_size or 0))
    k = 172
    x = outlier_x(rng, 256, k)
    ws = [rng.standard_normal((k, n)).astype(np.float32) * 0.1 for n in (24, 24, 16)]  # Q, K, V sharing X
    res = awq_scale_search(ws, x.T @ x, np.abs(x).mean(0), grid, n_grid=20)
    brute, scales = brute_scale_losses(ws, x, grid, 20)
    np.testing.assert_allclose(res.losses, brute, rtol=1e-6)
    assert int(np.argmin(res.losses)) == int(np.argmin(brute))
    best = int(np.argmin(brute))
    np.testing.assert_array_equal(res.scales, scales[best])
    assert res.scales.dtype == np.float32 and res.scales.shape == (k,)
    assert res.ratio == best / 20 and res.loss == res.losses[best]
    np.testing.assert_array_equal(scales[0], 1.0)  # ratio 0 is no scaling: plain RTN
    rtn_loss = sum(np.linalg.norm(x @ (rtn(w, grid).dequantize() - w)) ** 2 for w in ws)
    np.testing.assert_allclose(res.rtn_loss, rtn_loss, rtol=1e-6)
    assert res.loss <= res.rtn_loss


def test_tied_channels_share_their_scale() -> None:
    """With ``ties`` every candidate (and the result) holds one value per label: the scale of the label's
    mean |x|, which is the search on the tied statistic; labels need not be contiguous."""
    rng = np.random.default_rng(5)
    k, grid = 32, WeightGrid(4, False, 128)
    x = outlier_x(rng, 128, k)
    ws = [rng.standard_normal((k, 16)).astype(np.float32) * 0.1]
    ties = np.tile(np.arange(8), 4) * 4 % 13  # 8 labels, each on 4 scattered channels
    xm = np.abs(x).mean(0)
    tied = tie_channels(xm, ties)
    for label in np.unique(ties):
        np.testing.assert_allclose(tied[ties == label], xm[ties == label].mean())
    res = awq_scale_search(ws, x.T @ x, xm, grid, n_grid=10, ties=ties)
    assert res.ratio > 0
    for label in np.unique(ties):
        assert len(np.unique(res.scales[ties == label])) == 1
    ref = awq_scale_search(ws, x.T @ x, tied, grid, n_grid=10)
    np.testing.assert_array_equal(res.scales, ref.scales)
    np.testing.assert_allclose(res.losses, ref.losses)
    with pytest.raises(ValueError, match="one label per channel"):
        tie_channels(xm, ties[:-1])


def test_candidate_scales_formula() -> None:
    xm = np.array([0.0, 0.5, 2.0, 8.0])
    np.testing.assert_array_equal(awq_candidate_scales(xm, 0.0), 1.0)
    s = awq_candidate_scales(xm, 0.5)
    raw = np.maximum(xm**0.5, 1e-4)
    np.testing.assert_allclose(s, raw / np.sqrt(raw.max() * raw.min()), rtol=1e-7)
    assert s.dtype == np.float32


def brute_clip(w: np.ndarray, x: np.ndarray, grid: WeightGrid, n_grid: int, max_shrink: float) -> np.ndarray:
    """errs[cand, block, col]: the block's partial output error ||X_b d_b||^2 for each clip candidate."""
    k, n = w.shape
    b = grid.block(k)
    nb = grid.n_blocks(k)
    n_cand = int(max_shrink * n_grid)
    errs = np.empty((n_cand, nb, n))
    for blk in range(nb):
        rows = slice(blk * b, min((blk + 1) * b, k))
        xb = x[:, rows]
        for col in range(n):
            wb = w[rows, col].astype(np.float32)
            absmax = float(np.abs(wb).max())
            for i in range(n_cand):
                c = np.float32(absmax * (1 - i / n_grid))
                lo, hi = max(float(wb.min()), -c), min(float(wb.max()), c)
                sc, zp = qparams(np.array([lo]), np.array([hi]), grid, k)
                code = quantize_rows(wb[:, None], sc, zp, grid.qmax)[:, 0]
                deq = (code.astype(np.float32) - np.float32(zp[0])) * sc[0]
                errs[i, blk, col] = np.linalg.norm(xb @ (deq.astype(np.float64) - wb)) ** 2
    return errs


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_clip_search_matches_brute_force(grid: WeightGrid) -> None:
    rng = np.random.default_rng(10 + grid.bits + int(grid.symmetric))
    k, n = 172, 12
    x = outlier_x(rng, 200, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.integers(0, k, 6), rng.integers(0, n, 6)] *= 8.0  # a few weight outliers worth clipping
    w[:, 3] = 0.0  # an all-zero column: every candidate is 0
    clip = awq_clip_search(w, x.T @ x, grid, n_grid=20, max_shrink=0.5)
    nb = grid.n_blocks(k)
    assert clip.shape == (nb, n) and clip.dtype == np.float32
    errs = brute_clip(w, x, grid, 20, 0.5)
    best = errs.argmin(0)
    lo, hi = np.empty((nb, n)), np.empty((nb, n))
    for blk in range(nb):
        rows = w[blk * grid.block(k) : (blk + 1) * grid.block(k)]
        lo[blk], hi[blk] = rows.min(0), rows.max(0)
    absmax = np.maximum(-lo, hi)
    expected = (absmax * (1 - best / 20)).astype(np.float32)
    cands = np.stack([(absmax * (1 - i / 20)).astype(np.float32) for i in range(errs.shape[0])])
    assert np.all((cands == clip).any(0)), "every clip must be one of the candidates"
    chosen = np.argmax(cands == clip, axis=0)
    np.testing.assert_array_equal(np.take_along_axis(errs, chosen[None], 0)[0] <= errs.min(0) * (1 + 1e-9) + 1e-12, True)
    n_same = int((clip == expected).sum())
    print(f"{grid}: clip equals the brute-force argmin for {n_same} of {clip.size} (block, column) pairs")
    assert n_same >= clip.size - 1  # only a floating-point near-tie could differ
    assert (best > 0).any(), "the test should exercise actual clipping"
    np.testing.assert_array_equal(clip[:, 3], 0.0)
    # clipping never raises any block's partial error over plain RTN (candidate 0)
    d = rtn(w, grid, clip=clip).dequantize().astype(np.float64) - w
    d0 = rtn(w, grid).dequantize().astype(np.float64) - w
    b = grid.block(k)
    for blk in range(nb):
        xb = x[:, blk * b : (blk + 1) * b]
        e = np.linalg.norm(xb @ d[blk * b : (blk + 1) * b], axis=0) ** 2
        e0 = np.linalg.norm(xb @ d0[blk * b : (blk + 1) * b], axis=0) ** 2
        assert np.all(e <= e0 * (1 + 1e-9))


@pytest.mark.parametrize("grid", [WeightGrid(4, False, 128), WeightGrid(4, True, 32), WeightGrid(4, False, None)], ids=str)
def test_awq_helps_with_outlier_channels(grid: WeightGrid) -> None:
    rng = np.random.default_rng(20)
    k = 172
    x = outlier_x(rng, 512, k, n_outliers=4, gain=40.0)
    ws = [rng.standard_normal((k, 32)).astype(np.float32) for _ in range(3)]
    h = x.T @ x
    res = awq(ws, h, np.abs(x).mean(0), grid)
    print(f"{grid}: ratio {res.search.ratio}, scaled/RTN {res.search.loss / res.rtn_loss:.3f}, "
          f"scaled+clip/RTN {res.loss / res.rtn_loss:.3f}")  # fmt: skip
    assert res.search.ratio > 0
    assert res.search.loss < 0.8 * res.rtn_loss
    assert res.loss < 0.8 * res.rtn_loss
    # the quantized scaled weights, read back with the activation divided by s, give the reported loss
    s = res.scales.astype(np.float64)
    explicit = sum(np.linalg.norm((x / s) @ qw.dequantize() - x @ w) ** 2 for qw, w in zip(res.weights, ws))
    np.testing.assert_allclose(res.loss, explicit, rtol=1e-6)
    no_clip = awq(ws, h, np.abs(x).mean(0), grid, clip=False)
    assert no_clip.clips == [None, None, None]
    np.testing.assert_allclose(no_clip.loss, no_clip.search.loss, rtol=1e-9)


def test_awq_never_worse_than_rtn_without_outliers() -> None:
    """With isotropic activations there is nothing to protect: the search may keep s = 1 (ratio 0)."""
    rng = np.random.default_rng(21)
    k = 172
    x = rng.standard_normal((300, k))
    ws = [rng.standard_normal((k, 16)).astype(np.float32)]
    res = awq_scale_search(ws, x.T @ x, np.abs(x).mean(0), WeightGrid(4, False, 32))
    assert res.loss <= res.rtn_loss
    assert res.losses.shape == (20,) and res.ratios[0] == 0.0


def test_dead_channels_and_bad_arguments() -> None:
    rng = np.random.default_rng(22)
    k = 64
    x = outlier_x(rng, 100, k)
    x[:, :3] = 0.0  # dead channels: |X| mean 0, s clipped to 1e-4 before normalising
    w = rng.standard_normal((k, 8)).astype(np.float32)
    res = awq([w], x.T @ x, np.abs(x).mean(0), WeightGrid(4, False, 32))
    assert np.all(np.isfinite(res.scales)) and np.all(res.scales > 0)
    assert np.isfinite(res.loss) and res.search.loss <= res.rtn_loss
    with pytest.raises(ValueError, match="same K"):
        awq_scale_search([w, w[:10]], x.T @ x, np.abs(x).mean(0), WeightGrid(4, False, 32))
    with pytest.raises(ValueError, match="K = 64"):
        awq_scale_search([w], x.T @ x, np.ones(5), WeightGrid(4, False, 32))
    with pytest.raises(ValueError, match=r"\[64, 64\]"):
        awq_clip_search(w, np.eye(3), WeightGrid(4, False, 32))


# ------------------------------------------------------------------ scale search: clips, module output


def brute_clipped(w: np.ndarray, x: np.ndarray, grid: WeightGrid) -> np.ndarray:
    """``w`` quantized with the clips that minimise each block's partial output error (``brute_clip``)."""
    errs = brute_clip(w, x, grid, 20, 0.5)
    k = w.shape[0]
    absmax = np.stack([np.abs(w[b * grid.block(k) : (b + 1) * grid.block(k)]).max(0) for b in range(grid.n_blocks(k))])
    clip = (absmax * (1 - errs.argmin(0) / 20)).astype(np.float32)
    return rtn(w, grid, clip=clip).dequantize().astype(np.float64)


@pytest.mark.parametrize("grid", [WeightGrid(4, False, 128), WeightGrid(4, True, 32)], ids=str)
def test_clip_aware_scale_search_matches_brute_force(grid: WeightGrid) -> None:
    """clip=True: each ratio is scored with the scaled weights quantized with their own clip search (on the
    scaled activation X / s), as the pass quantizes them afterwards; brute force with X explicitly."""
    rng = np.random.default_rng(30 + grid.block_size)
    k = 64
    x = outlier_x(rng, 300, k)
    ws = [rng.standard_normal((k, n)).astype(np.float32) for n in (12, 8)]
    ws[0][rng.integers(0, k, 5), rng.integers(0, 12, 5)] *= 6.0  # weight outliers: clipping matters
    n_grid = 10
    res = awq_scale_search(ws, x.T @ x, np.abs(x).mean(0), grid, n_grid=n_grid, clip=True)
    absmean = np.abs(x).mean(0)
    brute = []
    for i in range(n_grid):
        s = candidate(absmean, i / n_grid)
        xs = x / s.astype(np.float64)
        brute.append(sum(np.linalg.norm(xs @ brute_clipped(w * s[:, None], xs, grid) - x @ w) ** 2 for w in ws))
    np.testing.assert_allclose(res.losses, brute, rtol=1e-6)
    assert res.ratio == int(np.argmin(brute)) / n_grid
    plain = awq_scale_search(ws, x.T @ x, absmean, grid, n_grid=n_grid)
    # clipping never costs (no clip is a candidate; the blocks' cross terms aside) and lowers the best loss here
    assert np.all(res.losses <= plain.losses * (1 + 1e-2)) and res.losses.min() < plain.losses.min()
    # awq() searches with its clips (on its own grid), so the search's best loss is the final loss
    full = awq(ws, x.T @ x, absmean, grid, n_grid=n_grid)
    np.testing.assert_allclose(full.loss, full.search.loss, rtol=1e-6)  # float32 vs float64 division by s
    np.testing.assert_allclose(full.search.losses, awq_scale_search(ws, x.T @ x, absmean, grid, n_grid=n_grid, clip=True,
                                                                    clip_grid=n_grid).losses, rtol=1e-12)
    np.testing.assert_allclose(full.rtn_loss, plain.rtn_loss, rtol=1e-9)


def swiglu(x: np.ndarray, wg: np.ndarray, wu: np.ndarray, wd: np.ndarray) -> np.ndarray:
    g = x @ wg
    return (g / (1 + np.exp(-g)) * (x @ wu)) @ wd


def test_module_output_score_matches_brute_force() -> None:
    """score=output_error(run, ws) with run = a SwiGLU MLP on three samples: every candidate's loss is the
    squared change of the MLP output when gate/up are replaced by Q(diag(s) W) / s, computed directly."""
    rng = np.random.default_rng(40)
    k, f = 48, 96
    samples = [outlier_x(rng, 100, k) for _ in range(3)]
    wg, wu = (rng.standard_normal((k, f)).astype(np.float32) / np.sqrt(k) for _ in range(2))
    wd = rng.standard_normal((f, k)) / np.sqrt(f)
    calls = []

    def run(ws: list[np.ndarray]) -> list[list[np.ndarray]]:
        calls.append(1)
        return [[swiglu(x, ws[0].astype(np.float64), ws[1].astype(np.float64), wd)] for x in samples]

    x = np.concatenate(samples)
    absmean = np.abs(x).mean(0)
    grid = WeightGrid(4, False, 32)
    score = output_error(run, [wg, wu])
    assert len(calls) == 1 and score([wg, wu]) == 0.0
    res = awq_scale_search([wg, wu], None, absmean, grid, n_grid=20, score=score)
    assert len(calls) == 2 + 20  # the reference once, then one run per candidate
    reference = [swiglu(xi, wg, wu, wd) for xi in samples]
    brute = []
    for i in range(20):
        s = candidate(absmean, i / 20)
        qg, qu = (rtn(w * s[:, None], grid).dequantize().astype(np.float64) / s[:, None] for w in (wg, wu))
        brute.append(sum(np.linalg.norm(swiglu(xi, qg, qu, wd) - r) ** 2 for xi, r in zip(samples, reference)))
    np.testing.assert_allclose(res.losses, brute, rtol=1e-6)
    np.testing.assert_array_equal(res.scales, candidate(absmean, res.ratio))
    assert res.ratio == int(np.argmin(brute)) / 20 and res.loss <= res.rtn_loss
    # the linear-output search minimises something else: its own losses are not the MLP's
    linear = awq_scale_search([wg, wu], x.T @ x, absmean, grid, n_grid=20)
    assert not np.allclose(linear.losses, res.losses, rtol=0.1)
    with pytest.raises(ValueError, match="needs H"):
        awq_scale_search([wg, wu], None, absmean, grid, score=score, clip=True)
    with pytest.raises(ValueError, match="needs H"):
        awq_scale_search([wg, wu], None, absmean, grid)
