"""Histogram observers and their range searches: ``percentile``, ``mse``, ``entropy``, ``mse-percentile``.

:class:`HistogramObserver` keeps a streaming 2048-bin histogram anchored at zero whose range grows by
merging bins (exactly); the registered subclasses choose a range from it with the vectorised searches
defined here (:func:`percentile_range`, :func:`mse_table` / :func:`mse_search`, :func:`kl_divergences` /
:func:`entropy_threshold`), which evaluate every candidate range at once from prefix sums. Import the
observers from :mod:`onnxq.calibration.observers`, which re-exports these names.
"""

from __future__ import annotations

import abc
import functools
import math
import threading
from typing import ClassVar

import numpy as np

from onnxq.calibration.observer_base import Observer, extreme_threshold, register_observer
from onnxq.errors import CalibrationError

__all__ = [
    "EntropyObserver",
    "HistogramObserver",
    "MSEObserver",
    "MSEPercentileObserver",
    "PercentileObserver",
    "entropy_threshold",
    "fold_abs",
    "kl_divergences",
    "mse_search",
    "mse_table",
    "percentile_range",
]


# ---------------------------------------------------------------------------------------------------
# Histogram observers
# ---------------------------------------------------------------------------------------------------


_BLOCK = 1 << 17
"""Values binned per step: the block and its indices stay in the CPU cache between the passes."""

_tls = threading.local()


def _scratch(dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's reusable block buffers: ``(values of dtype, intp indices, bool)``."""
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    key = np.dtype(dtype).str
    if key not in bufs or len(bufs[key][0]) != _BLOCK:
        bufs[key] = (np.empty(_BLOCK, dtype), np.empty(_BLOCK, np.intp), np.empty(_BLOCK, np.bool_))
    return bufs[key]


def _bin_index(c: np.ndarray, inv: np.floating, start: np.floating, fbuf: np.ndarray, ibuf: np.ndarray) -> np.ndarray:
    """``trunc(c * inv - start)`` as intp in ``ibuf``, the arithmetic in ``c``'s float type (one pass less
    when ``start`` is 0: the product is cast directly)."""
    i = ibuf[: c.size]
    if start == 0:
        np.multiply(c, inv, out=i, casting="unsafe")
    else:
        t = fbuf[: c.size]
        np.multiply(c, inv, out=t)
        np.subtract(t, start, out=i, casting="unsafe")
    return i


def _xlogx(v: np.ndarray) -> np.ndarray:
    """``v * log(v)`` elementwise, with ``0 log 0 = 0``."""
    v = np.asarray(v, np.float64)
    return v * np.log(np.where(v > 0, v, 1.0))


class HistogramObserver(Observer):
    """A streaming histogram with a fixed number of bins over a range that grows by merging bins.

    The grid is anchored at zero: bin ``k`` covers ``[(start + k) * width, (start + k + 1) * width)``
    for an integer ``start <= 0``, and zero is always inside the covered range (a quantization range
    always includes zero, so nothing of use is lost). When a batch falls outside the range, the width
    is multiplied by the smallest power of two ``f`` for which the old and new values fit, and old bin
    ``g`` (global index) is added to new bin ``floor(g / f)``: merging is exact, so the histogram is
    always what ``np.histogram`` of every value seen so far would give on the final grid. Values are
    binned block by block in the CPU cache (:meth:`_accumulate`). Exact zeros (ReLU outputs) are
    counted too. State: ``bins`` counts and a few scalars, whatever the number of
    samples. NaN and +-Inf are counted and left out, and so are extreme values (:meth:`_drop_extremes`);
    the exact min and max of what was binned are kept, and every computed range lies inside them.

    Subclasses pick the range from the histogram (:meth:`_select`). They need whole tensors:
    :meth:`observe_minmax` is an error (the runner exposes the tensors whole for them).
    """

    needs_tensors: ClassVar[bool] = True
    screen: ClassVar[bool] = True
    """Count and leave out extreme values (:func:`extreme_threshold`); False for histograms that only describe data."""

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if bins < 8 or bins % 2:
            raise CalibrationError(f"a histogram observer needs an even number of bins >= 8, got {bins}")
        self.bins = int(bins)
        self.hist = np.zeros(self.bins, np.int64)
        self.width = 0.0  # 0 until a non-zero value is seen
        self.start = 0  # global index of bin 0
        self.count = 0  # finite values seen
        self.zeros = 0  # of which exactly zero
        self.lo = math.inf
        self.hi = -math.inf

    # -- accumulation ------------------------------------------------------------------------------

    @property
    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges (float64)."""
        return (self.start + np.arange(self.bins + 1, dtype=np.float64)) * self.width

    def _zero_bin(self) -> int:
        return min(-self.start, self.bins - 1)

    def observe(self, x: np.ndarray, extremes: tuple[float, float] | None = None) -> None:
        """Add one batch. ``extremes``: its ``(min, max)`` when already known (the runner computes them
        on its worker thread); NaN or +-Inf there, as in the values, means "filter the non-finite"."""
        a = np.asarray(x)
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float32)
        a = a.reshape(-1)
        if a.size == 0:
            return
        mn, mx = extremes if extremes is not None else (float(a.min()), float(a.max()))
        if not (math.isfinite(mn) and math.isfinite(mx)):
            n = a.size
            a = a[np.isfinite(a)]
            self._flag()
            self.nonfinite += n - a.size
            if a.size == 0:
                return
            mn, mx = float(a.min()), float(a.max())
        if self.screen:
            cut = extreme_threshold(a, max(-mn, mx))
            if cut is not None:
                self._flag()
                a, mn, mx = self._drop_extremes(a, cut)
        self.batches += 1
        self.lo, self.hi = min(self.lo, mn), max(self.hi, mx)
        self.count += a.size
        lo, hi = min(mn, 0.0), max(mx, 0.0)
        if lo == hi:  # only zeros
            if self.width:
                self.hist[self._zero_bin()] += a.size
            self.zeros += a.size
            return
        if not self.width:
            self._init_grid(lo, hi)  # places the zeros seen so far
        elif lo < self.start * self.width or hi > (self.start + self.bins) * self.width:
            self._grow(lo, hi)
        inv = 1.0 / self.width
        if a.dtype == np.float32 and inv > 1e30:
            a = a.astype(np.float64)
        self._accumulate(a, inv)

    def _drop_extremes(self, a: np.ndarray, cut: float) -> tuple[np.ndarray, float, float]:
        """Count the values beyond ``+-cut`` and leave them out, as NaN is: neither the grid nor the range
        search sees them (counted at the edge instead, they would still pull a percentile or the MSE
        search towards the top of a heavy tail). Returns the rest and its min and max."""
        wild = (a > cut) | (a < -cut)
        self.extreme += int(np.count_nonzero(wild))
        self.peak = max(self.peak, float(np.max(np.abs(a[wild]))))
        rest = a[~wild]
        return rest, float(rest.min()), float(rest.max())

    def _accumulate(self, a: np.ndarray, inv: float) -> None:
        """Count the values of ``a`` (finite, inside the grid) into the histogram, block by block.

        Bin index ``trunc(x * inv - start)`` in ``a``'s float type (float32 stays float32: |t| <= 2 * bins,
        so the index error is ~1e-4 bin); the grid covers every value, so t > -1 (truncates to 0) and
        t <= bins (the top edge: folded into the last bin). Each block of ``_BLOCK`` values is binned
        and counted while it sits in the CPU cache; exact zeros are counted only in blocks whose zero
        bin is occupied.
        """
        nb = self.bins + 1
        zi = -self.start  # index of an exact zero
        dt = a.dtype.type
        inv_t, start_t = dt(inv), dt(self.start)
        fbuf, ibuf, zbuf = _scratch(a.dtype)
        counts = np.zeros(nb, np.int64)
        zeros = 0
        for s in range(0, a.size, _BLOCK):
            c = a[s : s + _BLOCK]
            cnt = np.bincount(_bin_index(c, inv_t, start_t, fbuf, ibuf), minlength=nb)
            if len(cnt) > nb:  # float rounding just past the top edge
                cnt[self.bins] += cnt[nb:].sum()
                cnt = cnt[:nb]
            counts += cnt
            if cnt[zi]:
                zeros += int(np.count_nonzero(np.equal(c, 0, out=zbuf[: c.size])))
        self.hist += counts[: self.bins]
        self.hist[-1] += counts[self.bins]
        self.zeros += zeros

    def observe_minmax(self, lo: float, hi: float) -> None:
        raise CalibrationError(f"the {self.name} calibrator needs whole tensors, not only their min and max")

    def _init_grid(self, lo: float, hi: float) -> None:
        # (bins - 1) bins of width w span [lo, hi]; flooring lo to the grid costs at most one more
        self.width = (hi - lo) / (self.bins - 1)
        self.start = math.floor(lo / self.width)
        if self.zeros:  # zeros seen before any non-zero value
            self.hist[self._zero_bin()] += self.zeros

    def _grow(self, lo: float, hi: float) -> None:
        """Merge bins (width x 2**k, the smallest k that fits) so the grid covers ``[lo, hi]`` too."""
        old_lo, old_hi = self.start, self.start + self.bins  # global edge indices
        f = 1
        while True:
            f *= 2
            w = self.width * f
            new_lo = min(old_lo // f, math.floor(lo / w))
            new_hi = max(-(-old_hi // f), math.ceil(hi / w))
            if new_hi - new_lo <= self.bins:
                break
        # floor(g / f) in float64 is exact for a power of two f, and never overflows as int64 // f could
        idx = np.floor(np.arange(old_lo, old_hi, dtype=np.float64) / f).astype(np.int64) - new_lo
        merged = np.zeros(self.bins, np.int64)
        np.add.at(merged, idx, self.hist)
        self.hist, self.width, self.start = merged, w, new_lo

    # -- range selection ---------------------------------------------------------------------------

    def _range(self) -> tuple[float, float]:
        if not self.width:  # only zeros
            return 0.0, 0.0
        lo, hi = self._select()
        lo, hi = max(float(lo), self.lo), min(float(hi), self.hi)
        return (lo, hi) if lo <= hi else (hi, hi)

    @abc.abstractmethod
    def _select(self) -> tuple[float, float]:
        """The range picked from the histogram (clamped to the observed min/max afterwards)."""


def percentile_range(
    hist: np.ndarray, edges: np.ndarray, percentile: float, zero_count: int = 0
) -> tuple[float, float]:
    """The ``(100 - p)``-th and ``p``-th percentiles of a histogram, linear within a bin.

    ``zero_count`` of the values in the bin that has zero as an edge are exact zeros: they sit at
    zero rather than spread over the bin (half of a ReLU output is zero).
    """
    h = np.asarray(hist, np.float64)
    e = np.asarray(edges, np.float64)
    if zero_count:
        z = int(np.flatnonzero(e == 0.0)[0])
        if z < len(h):  # zero is the bin's left edge: a zero-width bin at 0 before it
            h = np.concatenate([h[:z], [zero_count, h[z] - zero_count], h[z + 1 :]])
            e = np.concatenate([e[: z + 1], [0.0], e[z + 1 :]])
        else:  # zero is the top edge
            h = np.concatenate([h[:-1], [h[-1] - zero_count, zero_count]])
            e = np.concatenate([e, [0.0]])
    cum = np.concatenate([[0.0], np.cumsum(h)])
    total = cum[-1]

    def at(q: float) -> float:
        target = q * total
        k = int(np.clip(np.searchsorted(cum, target, side="left") - 1, 0, len(h) - 1))
        inside = (target - cum[k]) / h[k] if h[k] else 0.0
        return float(e[k] + min(max(inside, 0.0), 1.0) * (e[k + 1] - e[k]))

    return at(1.0 - percentile / 100.0), at(percentile / 100.0)


@register_observer("percentile")
class PercentileObserver(HistogramObserver):
    """Range from the ``100 - p`` and ``p`` percentiles of a streamed histogram (default p = 99.99).

    Each end is taken separately (uint8 affine activations are not symmetric), interpolated linearly
    within its bin (exact zeros sit at zero), so it lies within one bin of the percentile of all the
    values (``np.percentile(..., method="inverted_cdf")``).
    """

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        if not 50.0 < percentile <= 100.0:
            raise CalibrationError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = float(percentile)

    def _select(self) -> tuple[float, float]:
        return percentile_range(self.hist, self.edges, self.percentile, self.zeros)


def mse_table(
    hist: np.ndarray,
    start: int,
    zero_count: int,
    lo_idx: np.ndarray,
    hi_idx: np.ndarray,
    levels: int = 256,
    clip_weight: float = 1.0,
) -> np.ndarray:
    """Expected squared quantization error (in bin units, summed over values) of every candidate range.

    The histogram's bin ``k`` covers ``[start + k, start + k + 1)`` in bin units; its values sit at the
    bin centre. Candidate ``(i, j)`` is the range ``[start + lo_idx[i], start + hi_idx[j]]`` (edge
    indices, ``lo`` ends <= 0 <= ``hi`` ends) quantized to ``levels`` evenly spaced codes of step
    ``s = (hi - lo) / (levels - 1)``. Values below ``lo`` or above ``hi`` cost their squared distance to
    the end (clipping); the other values cost ``s**2 / 12`` (uniform rounding), except the
    ``zero_count`` exact zeros, which the grid always represents exactly. ``clip_weight`` scales the
    clipping part (1: plain MSE). Returns a ``(len(lo_idx), len(hi_idx))`` array, computed all at once
    from prefix sums.
    """
    h = np.asarray(hist, np.float64).copy()
    zb = min(-start, len(h) - 1)
    h[zb] -= zero_count
    centre = start + np.arange(len(h)) + 0.5
    c0 = np.concatenate([[0.0], np.cumsum(h)])
    c1 = np.concatenate([[0.0], np.cumsum(h * centre)])
    c2 = np.concatenate([[0.0], np.cumsum(h * centre * centre)])
    lo_idx, hi_idx = np.asarray(lo_idx), np.asarray(hi_idx)
    a = (start + lo_idx).astype(np.float64)
    b = (start + hi_idx).astype(np.float64)
    below = a * a * c0[lo_idx] - 2 * a * c1[lo_idx] + c2[lo_idx]
    n0, n1, n2 = c0[-1] - c0[hi_idx], c1[-1] - c1[hi_idx], c2[-1] - c2[hi_idx]
    above = b * b * n0 - 2 * b * n1 + n2
    inside = c0[hi_idx][None, :] - c0[lo_idx][:, None]
    step = (b[None, :] - a[:, None]) / (levels - 1)
    clipped = np.maximum(below, 0.0)[:, None] + np.maximum(above, 0.0)[None, :]
    return clip_weight * clipped + inside * step * step / 12.0


def mse_search(
    hist: np.ndarray, start: int, zero_count: int, levels: int = 256, clip_weight: float = 1.0, coarse: int = 256
) -> tuple[int, int]:
    """Edge indices ``(i, j)`` of the range with the least :func:`mse_table` error.

    Candidates: every edge <= 0 for the low end and every edge >= 0 for the high end. Where that is more
    than ``coarse`` per side, a grid with stride ``r`` is searched first, then every candidate within
    ``r`` edges of its best, each stage vectorised.
    """
    n = len(hist)
    z = -start  # the edge at zero
    lo_all, hi_all = np.arange(0, z + 1), np.arange(z, n + 1)
    stride = max(1, -(-max(len(lo_all), len(hi_all)) // coarse))
    lo_c = np.unique(np.concatenate([lo_all[::-1][::stride], [0]]))
    hi_c = np.unique(np.concatenate([hi_all[::stride], [n]]))
    err = mse_table(hist, start, zero_count, lo_c, hi_c, levels, clip_weight)
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    bi, bj = int(lo_c[i]), int(hi_c[j])
    if stride > 1:
        lo_c = np.arange(max(0, bi - stride), min(z, bi + stride) + 1)
        hi_c = np.arange(max(z, bj - stride), min(n, bj + stride) + 1)
        err = mse_table(hist, start, zero_count, lo_c, hi_c, levels, clip_weight)
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        bi, bj = int(lo_c[i]), int(hi_c[j])
    return bi, bj


@register_observer("mse")
class MSEObserver(HistogramObserver):
    """The clipping range that minimises the expected quantization MSE of the tensor (:func:`mse_search`).

    The error model is that of the uint8 affine grid (``levels = 256`` codes over ``[lo, hi]``, zero
    exact): clipping error of the values outside plus ``step**2 / 12`` rounding error of those inside.
    Candidate ends are the histogram's edges on each side of zero (searched coarse, then fine).
    """

    def __init__(self, levels: int = 256, bins: int = 2048) -> None:
        super().__init__(bins)
        if levels < 2:
            raise CalibrationError(f"mse levels must be >= 2, got {levels}")
        self.levels = int(levels)

    def _select(self) -> tuple[float, float]:
        i, j = mse_search(self.hist, self.start, self.zeros, self.levels)
        return (self.start + i) * self.width, (self.start + j) * self.width


def fold_abs(hist: np.ndarray, start: int) -> np.ndarray:
    """Histogram of ``|x|`` from a zero-anchored one: bin ``k`` covers ``[k, k + 1)`` in bin units."""
    z = -start
    out = np.zeros(max(z, len(hist) - z), np.int64)
    out[: len(hist) - z] += hist[z:]
    out[:z] += hist[:z][::-1]
    return out


def kl_divergences(hist: np.ndarray, quantized_bins: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """TensorRT's KL divergence for every threshold ``i`` in ``[quantized_bins, len(hist)]`` at once.

    For threshold ``i`` (keep bins ``[0, i)``): P is the histogram's first ``i`` bins with every count
    beyond added to bin ``i - 1``; Q quantizes the first ``i`` bins (without the outliers) into
    ``quantized_bins`` groups (group ``j`` is bins ``[ceil(j i / n), ceil((j + 1) i / n))``, as in
    NVIDIA's pytorch-quantization) and spreads each group's count evenly over its bins where P is
    non-zero. Returns ``(thresholds, KL(P || Q))``; a threshold where Q is zero where P is not gets
    ``inf``. Computed from prefix sums as one ``(thresholds, quantized_bins)`` array.
    """
    h = np.asarray(hist, np.float64)
    n, nq = len(h), quantized_bins
    if n < nq:
        raise CalibrationError(f"entropy calibration needs at least {nq} histogram bins, got {n}")
    total = h.sum()
    cum = np.concatenate([[0.0], np.cumsum(h)])
    nzc = np.concatenate([[0], np.cumsum(h > 0)])
    xl = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
    thr, bounds, width = _kl_groups(n, nq)
    q = np.diff(cum[bounds], axis=1)  # group sums of the kept bins (fancy indexing: far faster than take)
    nz = np.diff(nzc[bounds], axis=1)  # non-zero bins per group
    kept = cum[thr]
    out = total - kept  # outliers, folded into bin i - 1 of P
    last = h[thr - 1]
    nz[:, -1] += (last == 0) & (out > 0)
    # sum_k P_k log P_k over the kept bins (unnormalised), the last bin holding the outliers
    plogp = xl[thr - 1] + _xlogx(last + out)
    # sum_k P_k log Q_k: in group j, P sums to p_j (= q_j, plus the outliers in the last group) and Q is
    # q_j / (nz_j * kept) at each non-zero bin, so the sum is sum_j p_j (log q_j - log nz_j) - total log kept
    logq = np.log(np.where(q > 0, q, 1.0))
    lognz = np.log(np.arange(width + 2, dtype=np.float64).clip(1.0))[nz]
    cross = np.einsum("ij,ij->i", q, logq - lognz) + out * (logq[:, -1] - lognz[:, -1])
    with np.errstate(divide="ignore", invalid="ignore"):
        cross -= total * np.log(kept)
        kl = (plogp - cross) / total - np.log(total)
    # Q is zero where P is not: only possible in the last group (P = Q elsewhere), when it is empty
    bad = (q[:, -1] == 0) & (out > 0) | (kept == 0)
    kl[bad] = np.inf
    return thr, kl


@functools.lru_cache(maxsize=8)
def _kl_groups(n: int, nq: int) -> tuple[np.ndarray, np.ndarray, int]:
    """For thresholds ``nq..n``: the thresholds, the ``nq + 1`` group bounds of each (group ``j`` is
    bins ``[ceil(j i / nq), ceil((j + 1) i / nq))``), and the widest group."""
    thr = np.arange(nq, n + 1)
    bounds = -((-np.arange(nq + 1)[None, :] * thr[:, None]) // nq)
    thr.flags.writeable = bounds.flags.writeable = False
    return thr, bounds, int(np.diff(bounds, axis=1).max())


def entropy_threshold(abs_hist: np.ndarray, quantized_bins: int = 128) -> int:
    """The threshold (in bins of ``abs_hist``) with the least KL divergence; the largest among ties.

    As in NVIDIA's pytorch-quantization, bin 0 (which holds every exact zero, half of a ReLU output)
    counts as much as bin 1: a zero spike would otherwise make the thresholds whose groups are one bin
    wide look best, clipping ReLU outputs far too hard.
    """
    h = np.asarray(abs_hist, np.float64).copy()
    if len(h) > 1:
        h[0] = h[1]
    if h.sum() == 0:
        return len(h)
    thr, kl = kl_divergences(h, quantized_bins)
    if not np.isfinite(kl).any():
        return len(h)
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))
    return int(thr[best])


@register_observer("entropy")
class EntropyObserver(HistogramObserver):
    """TensorRT's entropy calibration: the threshold ``t`` on ``|x|`` that minimises KL(P || Q).

    The 2048-bin histogram is folded onto ``|x|`` and :func:`entropy_threshold` evaluates every
    threshold from ``quantized_bins`` bins up. ``quantized_bins`` (default 128) is the number of codes
    per side of zero; a tensor that is never negative (a ReLU output) gets all of uint8's codes on one
    side, so twice as many. The range is ``[-t, t]`` clamped to the observed min and max (``[0, t]``
    for ReLU outputs).
    """

    def __init__(self, quantized_bins: int = 128, bins: int = 2048) -> None:
        super().__init__(bins)
        if not 2 <= quantized_bins <= bins // 4:
            raise CalibrationError(f"entropy quantized_bins must be in [2, {bins // 4}], got {quantized_bins}")
        self.quantized_bins = int(quantized_bins)

    def _select(self) -> tuple[float, float]:
        nq = self.quantized_bins * (2 if self.lo >= 0 else 1)
        t = entropy_threshold(fold_abs(self.hist, self.start), nq) * self.width
        return -t, t


@register_observer("mse-percentile")
class MSEPercentileObserver(HistogramObserver):
    """MSE for tensors that are never negative, percentiles for signed ones (the w8a8 default).

    * A tensor whose observed minimum is >= 0 (a ReLU / Clip(0, c) output, a concatenation or pooling
      of them) gets the :class:`MSEObserver` range: its large values carry the signal (SqueezeNet's
      last ReLU output *is* the class scores), and the MSE-optimal range clips only a tail that costs
      less than the rounding it saves.
    * A signed tensor (a linear-bottleneck projection, a residual sum, the normalised image) gets the
      ``100 - p`` and ``p`` percentiles (default p = 99.95). MobileNetV2's residual stream has rare,
      very large values whose MSE-optimal range is wide (add_9: [-21, 28]), yet the network does
      better when they are clipped (the next 1x1 expansion + ReLU6 saturates on them anyway), which
      min-max and MSE cannot see.

    Measured (w8a8, target x86-avx2: 7-bit GEMM weights; 128 evenly spaced calibration images, 500
    images evaluated with ORT's fused kernels), top-1 agreement with fp32 / top-1:

    =================  =====================  =====================
    calibrator         MobileNetV2 (82.8)     SqueezeNet 1.1 (59.8)
    =================  =====================  =====================
    minmax             92.4 / 81.2            92.0 / 60.4
    ema-minmax         94.6 / 82.4            88.8 / 59.2
    percentile 99.99   94.6 / 82.0            90.0 / 59.4
    mse                93.6 / 82.2            91.0 / 59.8
    entropy            94.0 / 82.8            91.0 / 61.0
    mse-percentile     95.0 / 82.4            90.8 / 60.0
    =================  =====================  =====================

    On a mean output KL divergence to fp32 (less noisy than agreement over 500 images) it is the best
    or within 5% of the best histogram method on both models, on two different calibration subsets.
    With these 7-bit weights even 16-bit activations reach only 94.8% (MobileNetV2) and 91.4%
    (SqueezeNet) agreement: the weights, not the activation ranges, set most of the remaining error.
    """

    def __init__(self, percentile: float = 99.95, levels: int = 256, bins: int = 2048) -> None:
        super().__init__(bins)
        if not 50.0 < percentile <= 100.0:
            raise CalibrationError(f"percentile must be in (50, 100], got {percentile}")
        if levels < 2:
            raise CalibrationError(f"mse levels must be >= 2, got {levels}")
        self.percentile = float(percentile)
        self.levels = int(levels)

    def _select(self) -> tuple[float, float]:
        if self.lo >= 0:
            i, j = mse_search(self.hist, self.start, self.zeros, self.levels)
            return (self.start + i) * self.width, (self.start + j) * self.width
        return percentile_range(self.hist, self.edges, self.percentile, self.zeros)
