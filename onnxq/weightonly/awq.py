"""AWQ: per-input-channel weight scales and per-block clipping chosen from the activation statistics.

Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration";
reference mit-han-lab/llm-awq ``awq/quantize/auto_scale.py`` (scale search) and ``auto_clip.py``
(clip search). A MatMul ``Y = X W`` (``W`` is ``[K, N]``) is rewritten as ``Y = (X / s) (diag(s) W)``:
input channels with large activations get their weight rows scaled up before rounding, so their
relative rounding error shrinks; ``1/s`` is folded into whatever produces ``X`` (a norm's weight, the
previous MatMul's output columns) or applied with a Mul. All MatMuls reading the same ``X`` (Q, K and
V) must share one ``s``.

Both searches score a candidate by the squared output error of each linear on the calibration rows,
computed from ``H = X^T X`` alone (``||X D||^2 = tr(D^T H D)``), so no activations are kept. The paper
(and the reference's scale search) measures the output of a whole transformer block instead; from
``H`` we can only see each linear's own output, which is what we minimise (summed over the linears
that share ``s``). The clip search, like the reference's, compares each block's partial output on its
own rows of ``H`` (``d_b^T H_bb d_b``).

All candidates are evaluated with array operations; the only Python loops are over the ``n_grid``
candidates (one ``K x K x N`` product per scale candidate, one blockwise product per clip candidate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxq.scheme import reduce_for_granularity
from onnxq.weightonly.grid import QuantizedWeight, WeightGrid, rtn, weight_and_hessian

__all__ = ["ScaleSearch", "AWQResult", "awq_candidate_scales", "awq_scale_search", "awq_clip_search", "awq"]


@dataclass
class ScaleSearch:
    """The result of :func:`awq_scale_search`.

    Attributes:
        scales: the best ``s`` (float32 ``[K]``): weights are multiplied by it (row ``j`` by ``s[j]``) and
            the activation divided by it.
        ratio: the exponent ``r`` of the best candidate ``s = x_absmean ** r`` (0 means no scaling).
        ratios: every candidate ratio, ``i / n_grid``.
        losses: the loss of every candidate, ``sum_i tr(D_i^T H D_i)`` in ``H``'s units; ``losses[0]``
            (ratio 0, ``s = 1``) is plain RTN.
    """

    scales: np.ndarray
    ratio: float
    ratios: np.ndarray
    losses: np.ndarray

    @property
    def loss(self) -> float:
        """The best candidate's loss."""
        return float(self.losses.min())

    @property
    def rtn_loss(self) -> float:
        """The loss without scaling (ratio 0)."""
        return float(self.losses[0])


@dataclass
class AWQResult:
    """The result of :func:`awq`: one shared ``s`` and the quantized scaled weights.

    Attributes:
        scales: float32 ``[K]``; ``weights[i]`` quantizes ``diag(scales) @ ws[i]``, so the MatMul's input
            must be divided by ``scales`` (fold ``1/scales`` into the producer of ``X``).
        search: the scale search, with every candidate's loss.
        weights: the quantized ``diag(s) W_i``, after clipping, one per input weight.
        clips: the clip chosen per (block, column) for each weight (``None`` when clipping is off).
        loss: ``sum_i tr(D_i^T H D_i)`` of the final result, ``D_i = dequant_i / s - W_i``.
        rtn_loss: the same for plain RTN of the original weights.
    """

    scales: np.ndarray
    search: ScaleSearch
    weights: list[QuantizedWeight]
    clips: list[np.ndarray | None]
    loss: float
    rtn_loss: float


def awq_candidate_scales(x_absmean: np.ndarray, ratio: float, w_mean: np.ndarray | None = None) -> np.ndarray:
    """The reference's candidate ``s`` for one ratio: ``clip(x_absmean ** ratio, 1e-4)``, divided by
    ``sqrt(max * min)`` so the scales are centred around 1 in log scale (float32 ``[K]``).

    With ``w_mean`` (AutoAWQ's "duo scaling") the candidate is ``x_absmean ** r / (w_mean ** (1 - r) + 1e-4)``:
    rows whose weights are already large relative to their block get less of a boost."""
    x = np.asarray(x_absmean, np.float64)
    if w_mean is None:
        s = np.maximum(x**ratio, 1e-4)
    else:
        s = np.maximum(x**ratio / (np.asarray(w_mean, np.float64) ** (1.0 - ratio) + 1e-4), 1e-4)
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def weight_row_means(ws: list[np.ndarray], grid: WeightGrid) -> np.ndarray:
    """AutoAWQ's ``w_mean``: ``|W|`` divided by its block's largest ``|W|`` (per column), averaged over
    every output column of the weights sharing the input (``[K]``)."""
    w = np.abs(np.concatenate([np.asarray(m, np.float32) for m in ws], axis=1))
    k = w.shape[0]
    b = grid.block(k)
    nb = grid.n_blocks(k)
    pad = np.pad(w, ((0, nb * b - k), (0, 0))).reshape(nb, b, -1)
    peak = pad.max(axis=1, keepdims=True)
    rel = np.where(peak > 0, pad / np.where(peak > 0, peak, 1.0), 0.0).reshape(nb * b, -1)[:k]
    return rel.mean(axis=1)


def awq_scale_search(
    ws: list[np.ndarray], h: np.ndarray, x_absmean: np.ndarray, grid: WeightGrid, *, n_grid: int = 20,
    duo: bool = False,
) -> ScaleSearch:
    """Search the shared input-channel scale ``s`` of the MatMuls ``ws`` (each ``[K, N_i]``) reading ``X``.

    Candidates are ``s = awq_candidate_scales(x_absmean, i / n_grid)`` for ``i = 0 .. n_grid - 1``, with
    ``x_absmean[j] = mean |X[:, j]|``. Each is scored by the output error of every linear,
    ``sum_i ||(X / s) Q(diag(s) W_i) - X W_i||^2 = sum_i tr(D_i^T H D_i)`` with
    ``D_i = dequant(rtn(diag(s) W_i)) / s[:, None] - W_i`` and ``H = X^T X`` (the paper scores a whole
    block's output; from ``H`` we see each linear's). Ratio 0 is ``s = 1``, plain RTN, so the best loss is
    never above RTN's. The weights share ``H`` and ``s``, so they are scored as one concatenated
    ``[K, sum N_i]`` weight (RTN blocks are per column, so this changes nothing). ``duo``: candidates
    use AutoAWQ's duo scaling (see :func:`awq_candidate_scales`); ratio 0 is then not ``s = 1``, so
    ``s = 1`` is scored as well and kept when nothing beats it.
    """
    w_cat, h64, xm = _check(ws, h, x_absmean)
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1, got {n_grid}")
    wm = weight_row_means(ws, grid) if duo else None
    ratios = np.arange(n_grid) / n_grid
    losses = np.empty(n_grid)
    for i, r in enumerate(ratios):
        s = awq_candidate_scales(xm, float(r), wm)
        losses[i] = _scaled_loss(w_cat, h64, s, grid)
    best = int(np.argmin(losses))
    scales = awq_candidate_scales(xm, float(ratios[best]), wm)
    if duo:
        plain = _scaled_loss(w_cat, h64, np.ones(xm.shape, np.float32), grid)
        if plain <= losses[best]:
            scales = np.ones(xm.shape, np.float32)
            losses = np.concatenate([[plain], losses])
            ratios = np.concatenate([[0.0], ratios])
            return ScaleSearch(scales=scales, ratio=0.0, ratios=ratios, losses=losses)
    return ScaleSearch(scales=scales, ratio=float(ratios[best]), ratios=ratios, losses=losses)


def awq_clip_search(
    w: np.ndarray, h: np.ndarray, grid: WeightGrid, *, n_grid: int = 20, max_shrink: float = 0.5
) -> np.ndarray:
    """Choose a clip ``c`` per (block, output column) of a ``[K, N]`` weight; returns ``[n_blocks, N]``.

    Candidates are ``c = absmax * (1 - i / n_grid)`` for ``i = 0 .. int(max_shrink * n_grid) - 1``, with
    ``absmax`` the block-column's largest ``|w|``; ``i = 0`` is no clipping. For each candidate the block's
    error is ``d_b^T H_bb d_b`` with ``d = dequant(rtn(w, clip=c)) - w`` restricted to block ``b`` and
    ``H_bb`` that block's rows and columns of ``H`` (the block's partial output error, as the reference
    compares per-group partial outputs; the cross-block terms of ``H`` are ignored). Ties keep the
    smaller shrink. Pass the result to ``rtn(w, grid, clip=...)``. For a scaled weight ``diag(s) W``, pass
    the scaled Hessian ``H / (s s^T)`` (the activation is ``X / s``).
    """
    w_in, h64 = weight_and_hessian(w, h, "AWQ's clip search")
    w32 = np.asarray(w_in, np.float32)
    k, n = w32.shape
    n_cand = int(max_shrink * n_grid)
    if n_cand < 1:
        raise ValueError(f"max_shrink * n_grid must be >= 1 (got {max_shrink} * {n_grid})")
    hb = _diagonal_blocks(h64, grid.block(k))
    out = np.empty((grid.n_blocks(k), n), np.float32)
    for c0 in range(0, n, COLUMNS):  # columns are independent: bounded temporaries on a wide lm_head
        wc = w32[:, c0 : c0 + COLUMNS]
        lo, hi = reduce_for_granularity(wc, grid.scheme(k).granularity)
        absmax = np.maximum(-lo, hi).reshape(-1, wc.shape[1]).astype(np.float64)
        w64 = wc.astype(np.float64)
        cands = np.stack([(absmax * (1 - i / n_grid)).astype(np.float32) for i in range(n_cand)])
        errs = np.empty((n_cand,) + absmax.shape)
        for i in range(n_cand):
            d = rtn(wc, grid, clip=cands[i]).dequantize().astype(np.float64) - w64
            errs[i] = _block_quadratic(d, hb)
        best = np.argmin(errs, axis=0)
        out[:, c0 : c0 + COLUMNS] = np.take_along_axis(cands, best[None], axis=0)[0]
    return out


def awq(
    ws: list[np.ndarray],
    h: np.ndarray,
    x_absmean: np.ndarray,
    grid: WeightGrid,
    *,
    n_grid: int = 20,
    clip: bool = True,
    max_shrink: float = 0.5,
) -> AWQResult:
    """AWQ for the MatMuls ``ws`` sharing the input ``X``: scale search, then (optionally) clip search.

    The clip search runs on the scaled weights ``diag(s) W_i`` with the Hessian of the scaled input,
    ``H / (s s^T)``, as the reference searches clips after applying the scales.
    """
    w_cat, h64, xm = _check(ws, h, x_absmean)
    search = awq_scale_search(ws, h64, xm, grid, n_grid=n_grid)
    s = search.scales
    s64 = s.astype(np.float64)
    h_scaled = h64 / np.outer(s64, s64)
    weights: list[QuantizedWeight] = []
    clips: list[np.ndarray | None] = []
    loss = 0.0
    for wi in ws:
        wi32 = np.asarray(wi, np.float32)
        scaled = wi32 * s[:, None]
        c = awq_clip_search(scaled, h_scaled, grid, n_grid=n_grid, max_shrink=max_shrink) if clip else None
        qw = rtn(scaled, grid, clip=c)
        d = qw.dequantize().astype(np.float64) / s64[:, None] - wi32.astype(np.float64)
        loss += float(np.einsum("kn,kn->", d, h64 @ d))
        weights.append(qw)
        clips.append(c)
    return AWQResult(scales=s, search=search, weights=weights, clips=clips, loss=loss, rtn_loss=search.rtn_loss)


def _check(ws: list[np.ndarray], h: np.ndarray, x_absmean: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate shapes; returns the weights concatenated along N (float32), ``H`` (float64) and ``x_absmean``."""
    if not ws:
        raise ValueError("AWQ needs at least one weight")
    mats = [np.asarray(w, np.float32) for w in ws]
    k = mats[0].shape[0] if mats[0].ndim == 2 else -1
    for w in mats:
        if w.ndim != 2 or w.shape[0] != k:
            raise ValueError(f"AWQ weights sharing one input must all be [K, N_i] with the same K; got {[m.shape for m in mats]}")
    h64 = np.asarray(h, np.float64)
    if h64.shape != (k, k):
        raise ValueError(f"H must be [K, K] = [{k}, {k}], got {h64.shape}")
    xm = np.asarray(x_absmean, np.float64).reshape(-1)
    if xm.shape != (k,):
        raise ValueError(f"x_absmean must have K = {k} entries, got {xm.shape}")
    if not (np.all(np.isfinite(xm)) and np.all(xm >= 0)):
        raise ValueError("x_absmean must be finite and >= 0 (it is mean |X| per input channel)")
    return np.concatenate(mats, axis=1), h64, xm


COLUMNS = 4096
"""Output columns scored at a time (both searches are independent per column)."""


def _scaled_loss(w: np.ndarray, h: np.ndarray, s: np.ndarray, grid: WeightGrid) -> float:
    """``tr(D^T H D)`` for ``D = dequant(rtn(diag(s) w)) / s - w`` (``w`` float32, ``s`` float32)."""
    total = 0.0
    s64 = s.astype(np.float64)[:, None]
    for c0 in range(0, w.shape[1], COLUMNS):
        wc = w[:, c0 : c0 + COLUMNS]
        q = rtn(wc * s[:, None], grid).dequantize().astype(np.float64)
        d = q / s64 - wc.astype(np.float64)
        total += float(np.einsum("kn,kn->", d, h @ d))
    return total


def _diagonal_blocks(h: np.ndarray, block: int) -> np.ndarray:
    """The ``[n_blocks, block, block]`` diagonal blocks of ``h``, zero-padded past ``K``."""
    k = h.shape[0]
    nb = max(1, math.ceil(k / block))
    pad = nb * block - k
    hp = np.pad(h, ((0, pad), (0, pad)))
    idx = np.arange(nb)
    return hp.reshape(nb, block, nb, block)[idx, :, idx, :]


def _block_quadratic(d: np.ndarray, hb: np.ndarray) -> np.ndarray:
    """``err[b, n] = d_b[:, n]^T H_bb d_b[:, n]`` for ``d`` ``[K, N]`` and the blocks ``hb`` of ``H``."""
    nb, block, _ = hb.shape
    k, n = d.shape
    dp = np.pad(d, ((0, nb * block - k), (0, 0))).reshape(nb, block, n)
    return np.einsum("bkn,bkn->bn", dp, hb @ dp)
