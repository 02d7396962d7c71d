"""AWQ: per-input-channel weight scales and per-block clipping chosen from the activation statistics.

Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration";
reference mit-han-lab/llm-awq ``awq/quantize/auto_scale.py`` (scale search) and ``auto_clip.py``
(clip search). A MatMul ``Y = X W`` (``W`` is ``[K, N]``) is rewritten as ``Y = (X / s) (diag(s) W)``:
input channels with large activations get their weight rows scaled up before rounding, so their
relative rounding error shrinks; ``1/s`` is folded into whatever produces ``X`` (a norm's weight, the
previous MatMul's output columns) or applied with a Mul. All MatMuls reading the same ``X`` (Q, K and
V) must share one ``s``.

Scale search (:func:`awq_scale_search`). The candidates are the reference's: ``s = mean|X| ** r``
(mean over all tokens, per channel), clamped at ``1e-4`` and divided by ``sqrt(max(s) * min(s))``, for
``r = 0, 1/n_grid, ..., (n_grid - 1)/n_grid``. Each candidate's weights ``Q(diag(s) W) / s`` are scored by

* the output of the module the weights open, as the paper does (``module2inspect``: for Q/K/V the
  attention output after o_proj, for gate/up the MLP output after down_proj), through a ``score``
  such as :func:`output_error`; the weight-only pass runs the module on the stored calibration
  activations with the candidate weights fed in
  (:meth:`~onnxq.weightonly.segments.SegmentRunner.probe`). Softmax, RoPE and the SiLU gate decide
  which errors matter, which a linear's own output cannot tell;
* otherwise the output error of each linear, from ``H = X^T X`` alone (``||X D||^2 = tr(D^T H D)``),
  which is exact for a linear that closes its module itself (o_proj, down_proj, lm_head).

With ``clip`` (the pass's default for method ``awq``) each candidate is scored with its clips applied,
as the weights will be quantized in the end; the reference searches the scale for unclipped RTN and
clips afterwards, which changes the weights the scale was chosen for. This only pays together with
the module-output loss: clip-aware scoring of each linear's own output picked worse scales than before.

Clip search (:func:`awq_clip_search`), like the reference's, compares each block's partial output on
its own rows of ``H`` (``d_b^T H_bb d_b``) for every candidate clip ``absmax * (1 - i / n_grid)``,
``i < max_shrink * n_grid``. Unlike the reference, q/k are clipped too: skipping them (the reference's
``if any([_ in name for _ in ["q_", "k_"]])``) measured worse on stories260K (ppl 3.825 vs 3.813 with
module-output scales; no clipping at all: 3.885).

Measured on stories260K (int4 asymmetric, block 128, windows of 512 tokens; perplexity on the 43 pieces
of the TinyStories file: fp32 3.520, RTN 3.906; "recovery" is the share of the RTN - fp32 gap closed;
KL is the mean KL(fp32 || quantized) of the next-token distributions, which ranks variants more
steadily than perplexity: moving the calibration windows moves perplexity by about 0.02). "main" is
calibrated on 32 windows spread over the file; "mean" averages KL over four calibration sets (those 32,
16 spread windows, the first 21, the last 21):

=========================================================  =========  ========  =========  =========
variant                                                    ppl main   recovery  KL main    KL mean
=========================================================  =========  ========  =========  =========
each linear's own output (before)                          3.817      23%       0.0806     0.0794
module output                                              3.813      24%       0.0769     0.0783
each linear's own output, candidates clipped               3.815      24%       0.0817     0.0824
module output, candidates clipped (10 clip candidates)     3.779      33%       0.0733     0.0755
module output, candidates clipped (5; the pass's default)  3.795      29%       0.0758     0.0753
GPTQ, for comparison                                       3.733      45%       0.0611
=========================================================  =========  ========  =========  =========

Over the four calibration sets the default's perplexity is 3.794 on average (29% recovery; before:
3.823, 21%). Held out (calibrated on the first 21 windows, scored on pieces 21..42; fp32 3.599, RTN
3.970): 3.922 (13%) before, 3.864 (29%) now, GPTQ 3.824 (39%). Tried on the 3.779 variant (main set) and not kept: a 2-D clip search shrinking min and max separately (lower per-layer error, ppl 3.815, KL
0.0737); ``sqrt(mean x^2)`` instead of ``mean |x|`` (3.806); AutoAWQ's duo scaling (3.799); 40 clip
candidates (3.790); the module scored on 8 of the 32 windows (3.816).

On the benchmark's own calibration (``benchmarks/bench_int4.py``: the first 32 windows; held out: the
first 21, scored on pieces 21..42), KL over all 43 pieces: the default above 3.809 (25%), KL 0.0771,
held out 3.864 (29%); with o_proj of stories260K's grouped-query attention scaled too (scales tied
per KV head, folded into v_proj) 3.793 (29%), KL 0.0751, held out 3.871 (27%; KL on pieces 21..42
0.0762 vs 0.0751 unscaled): within the calibration noise. Not kept there: 10 clip candidates while
scoring (3.810, KL 0.0768, held out 3.895); a 40-ratio grid (3.805); calibration activations from the
float model for every layer, as the reference computes them, instead of from the quantized earlier
layers (3.784, held out 3.900). GPTQ on the same windows: 3.729 (46%), KL 0.0607, held out 3.824 (39%).

Where the rest of the gap to GPTQ lies (stories260K, benchmark protocol, ``benchmarks/RESULTS.md`` 14:40): quantizing
one projection type with GPTQ on the AWQ-scaled weights instead of clipped RTN gains 0.018 (q/k/v), 0.022
(gate/up), 0.026 (down), nothing for o_proj or the int8 lm_head, 0.063 for all of them (3.793 -> 3.731): the
shortfall is spread evenly, i.e. it is GPTQ's error compensation, which scales and clips cannot replace.

The searches evaluate candidates with array operations or one probe run per candidate; the Python
loops are over the ``n_grid`` candidates (one ``K x K x N`` product per scale candidate on ``H``; the
clip search scores all its candidates with one product per block, unpadded: a K = 64 weight at block
128 costs a 64 x 64 product, not 128 x 128).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from onnxq.scheme import reduce_for_granularity
from onnxq.weightonly.grid import QuantizedWeight, WeightGrid, rtn, weight_and_hessian

__all__ = [
    "ScaleSearch", "AWQResult", "awq_candidate_scales", "awq_fake_quantize", "output_error", "awq_scale_search",
    "awq_clip_search", "awq", "tie_channels",
]


@dataclass
class ScaleSearch:
    """The result of :func:`awq_scale_search`.

    Attributes:
        scales: the best ``s`` (float32 ``[K]``): weights are multiplied by it (row ``j`` by ``s[j]``) and
            the activation divided by it.
        ratio: the exponent ``r`` of the best candidate ``s = x_absmean ** r`` (0 means no scaling).
        ratios: every candidate ratio, ``i / n_grid``.
        losses: the loss of every candidate: ``sum_i tr(D_i^T H D_i)`` in ``H``'s units, or the module
            output error of a ``score``; ``losses[0]`` (ratio 0, ``s = 1``) is the unscaled weights
            quantized as the search quantizes (RTN, or RTN with clips).
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
        """The loss without scaling (ratio 0; see ``losses``)."""
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
        rtn_loss: the same for plain RTN of the original weights (no scale, no clip).
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


def tie_channels(v: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """``v`` (``[K]``) with each entry replaced by the mean over the channels sharing its label in ``ties``."""
    labels = np.asarray(ties).reshape(-1)
    if labels.shape != np.shape(v):
        raise ValueError(f"ties must have one label per channel ({np.shape(v)}), got {labels.shape}")
    _, inv = np.unique(labels, return_inverse=True)
    means = np.bincount(inv, weights=np.asarray(v, np.float64)) / np.bincount(inv)
    return means[inv]


def awq_fake_quantize(
    ws: list[np.ndarray], s: np.ndarray, grid: WeightGrid, *, h: np.ndarray | None = None, n_grid: int = 20,
    max_shrink: float = 0.5,
) -> list[np.ndarray]:
    """``dequant(rtn(diag(s) W_i)) / s`` for each weight (float32 ``[K, N_i]``): what ``X W_i`` becomes once
    ``X`` is divided by ``s`` and the scaled weight quantized, written as a weight of the unchanged ``X``.

    With ``h`` (``X^T X``), each scaled weight is quantized with the clips :func:`awq_clip_search` chooses
    for it (on ``H / (s s^T)``, the Hessian of ``X / s``), as :func:`awq` quantizes it in the end."""
    s32 = np.asarray(s, np.float32)[:, None]
    h_scaled = None
    if h is not None:
        s64 = np.asarray(s, np.float64)
        h_scaled = np.asarray(h, np.float64) / np.outer(s64, s64)
    out = []
    for w in ws:
        scaled = np.asarray(w, np.float32) * s32
        clip = None if h_scaled is None else awq_clip_search(scaled, h_scaled, grid, n_grid=n_grid, max_shrink=max_shrink)
        out.append(rtn(scaled, grid, clip=clip).dequantize() / s32)
    return out


def output_error(
    run: Callable[[list[np.ndarray]], Iterable[list[np.ndarray]]], ws: list[np.ndarray]
) -> Callable[[list[np.ndarray]], float]:
    """A ``score`` for :func:`awq_scale_search`: ``run`` maps the weights to the outputs of the module they
    belong to (a list of arrays per calibration sample); the score of candidate weights is the summed
    squared difference between the module's outputs with them and with ``ws`` (computed once, here)."""
    reference = [list(outs) for outs in run(ws)]

    def score(candidate: list[np.ndarray]) -> float:
        total = 0.0
        for outs, refs in zip(run(candidate), reference, strict=True):
            for o, r in zip(outs, refs, strict=True):
                total += float(np.square(np.asarray(o, np.float64) - r).sum())
        return total

    return score


def awq_scale_search(
    ws: list[np.ndarray], h: np.ndarray | None, x_absmean: np.ndarray, grid: WeightGrid, *, n_grid: int = 20,
    duo: bool = False, clip: bool = False, clip_grid: int = 20, max_shrink: float = 0.5,
    score: Callable[[list[np.ndarray]], float] | None = None, ties: np.ndarray | None = None,
) -> ScaleSearch:
    """Search the shared input-channel scale ``s`` of the MatMuls ``ws`` (each ``[K, N_i]``) reading ``X``.

    Candidates are ``s = awq_candidate_scales(x_absmean, i / n_grid)`` for ``i = 0 .. n_grid - 1``, with
    ``x_absmean[j] = mean |X[:, j]|``. Each candidate's weights are ``awq_fake_quantize(ws, s, grid)``
    (``Q(diag(s) W_i) / s``; with ``clip``, quantized with the clips of :func:`awq_clip_search` with
    ``clip_grid`` and ``max_shrink``, as they will be in the end: the scale is chosen for the clipped
    weights, not for plain RTN, which the clips then change).

    ``score`` (a function of those weights, e.g. :func:`output_error` of the module the weights open:
    the paper's block-output loss) gives each candidate's loss. Without it the loss is the output
    error of every linear, ``sum_i ||X Q_i - X W_i||^2 = sum_i tr(D_i^T H D_i)`` with ``D_i = Q_i - W_i``
    and ``H = X^T X``; ``h`` is needed for this and for ``clip`` only.

    ``ties`` (a label per channel) makes channels with one label share their scale: their ``x_absmean``
    (and AutoAWQ's ``w_mean``) are replaced by the label's mean, so every candidate holds equal values
    there (e.g. the o_proj channels of the query heads reading one KV head, whose ``1/s`` is folded
    into that head's V columns).

    Ratio 0 is ``s = 1``, so the best loss is never above that of quantizing unscaled weights. ``duo``:
    candidates use AutoAWQ's duo scaling (see :func:`awq_candidate_scales`); ratio 0 is then not
    ``s = 1``, so ``s = 1`` is scored as well and kept when nothing beats it.
    """
    w_cat, h64, xm = _check(ws, h, x_absmean)
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1, got {n_grid}")
    if h64 is None and (clip or score is None):
        raise ValueError("the scale search needs H = X^T X for its own loss and for clip = True")
    wm = weight_row_means(ws, grid) if duo else None
    if ties is not None:
        xm = tie_channels(xm, ties)
        wm = None if wm is None else tie_channels(wm, ties)
    hc = h64 if clip else None
    h32 = None if h64 is None or score is not None else h64.astype(np.float32)

    def loss(s: np.ndarray) -> float:
        if score is not None:
            return float(score(awq_fake_quantize(ws, s, grid, h=hc, n_grid=clip_grid, max_shrink=max_shrink)))
        assert h64 is not None and h32 is not None  # refused above: no score needs H
        if not clip:
            return _scaled_loss(w_cat, h64, s, grid)
        qs = awq_fake_quantize(ws, s, grid, h=hc, n_grid=clip_grid, max_shrink=max_shrink)
        return sum(_quadratic(q - np.asarray(w, np.float32), h32) for q, w in zip(qs, ws))

    ratios = np.arange(n_grid) / n_grid
    losses = np.array([loss(awq_candidate_scales(xm, float(r), wm)) for r in ratios])
    best = int(np.argmin(losses))
    scales = awq_candidate_scales(xm, float(ratios[best]), wm)
    if duo:
        plain = loss(np.ones(xm.shape, np.float32))
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
    block = grid.block(k)
    spans = [(r, min(r + block, k)) for r in range(0, k, block)]
    # float32 products (half the time of float64; they dominate w4-awq on SmolLM2): a block's error sums at
    # most ``block`` terms per column, and candidates whose codes agree get identical errors (ties kept)
    hbs = [h64[a:b, a:b].astype(np.float32) for a, b in spans]
    out = np.empty((grid.n_blocks(k), n), np.float32)
    step = max(1, COLUMNS // n_cand)  # columns are independent: bounded temporaries on a wide lm_head
    for c0 in range(0, n, step):
        wc = w32[:, c0 : c0 + step]
        nc = wc.shape[1]
        lo, hi = reduce_for_granularity(wc, grid.scheme(k).granularity)
        absmax = np.maximum(-lo, hi).reshape(-1, nc).astype(np.float64)
        cands = np.stack([(absmax * (1 - i / n_grid)).astype(np.float32) for i in range(n_cand)])
        # every candidate at once (columns are quantized independently): the weight repeated n_cand times
        # side by side, candidate i clipping copy i; d is [K, n_cand * N], one product with each H_bb
        tiled = rtn(np.tile(wc, (1, n_cand)), grid, clip=cands.transpose(1, 0, 2).reshape(cands.shape[1], -1))
        d = tiled.dequantize() - np.tile(wc, (1, n_cand))
        errs = np.stack([np.einsum("kn,kn->n", d[a:b], hb @ d[a:b]).reshape(n_cand, nc) for (a, b), hb in zip(spans, hbs)], axis=1)
        best = np.argmin(errs, axis=0)  # [n_blocks, N]; argmin keeps the first (smallest shrink) of equal errors
        out[:, c0 : c0 + step] = np.take_along_axis(cands, best[None], axis=0)[0]
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
    ``H / (s s^T)``, as the reference searches clips after applying the scales; with ``clip`` the scale
    search already scores every candidate with its clips (see :func:`awq_scale_search`). Both searches
    use the linears' own output error (``H``).
    """
    w_cat, h64, xm = _check(ws, h, x_absmean)
    if h64 is None:
        raise ValueError("awq() needs H = X^T X")
    search = awq_scale_search(ws, h64, xm, grid, n_grid=n_grid, clip=clip, clip_grid=n_grid, max_shrink=max_shrink)
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
    rtn_loss = _scaled_loss(w_cat, h64, np.ones(xm.shape, np.float32), grid)
    return AWQResult(scales=s, search=search, weights=weights, clips=clips, loss=loss, rtn_loss=rtn_loss)


def _check(
    ws: list[np.ndarray], h: np.ndarray | None, x_absmean: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Validate shapes; returns the weights concatenated along N (float32), ``H`` (float64) and ``x_absmean``."""
    if not ws:
        raise ValueError("AWQ needs at least one weight")
    mats = [np.asarray(w, np.float32) for w in ws]
    k = mats[0].shape[0] if mats[0].ndim == 2 else -1
    for w in mats:
        if w.ndim != 2 or w.shape[0] != k:
            raise ValueError(f"AWQ weights sharing one input must all be [K, N_i] with the same K; got {[m.shape for m in mats]}")
    if h is None:
        return np.concatenate(mats, axis=1), None, _check_absmean(x_absmean, k)
    h64 = np.asarray(h, np.float64)
    if h64.shape != (k, k):
        raise ValueError(f"H must be [K, K] = [{k}, {k}], got {h64.shape}")
    return np.concatenate(mats, axis=1), h64, _check_absmean(x_absmean, k)


def _check_absmean(x_absmean: np.ndarray, k: int) -> np.ndarray:
    xm = np.asarray(x_absmean, np.float64).reshape(-1)
    if xm.shape != (k,):
        raise ValueError(f"x_absmean must have K = {k} entries, got {xm.shape}")
    if not (np.all(np.isfinite(xm)) and np.all(xm >= 0)):
        raise ValueError("x_absmean must be finite and >= 0 (it is mean |X| per input channel)")
    return xm


COLUMNS = 4096
"""Output columns scored at a time (both searches are independent per column)."""


def _quadratic(d: np.ndarray, h: np.ndarray) -> float:
    """``tr(D^T H D)`` for float32 ``D`` and ``H``: the product in float32, its sum in float64."""
    return float(np.einsum("kn,kn->", d, h @ d, dtype=np.float64))


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

