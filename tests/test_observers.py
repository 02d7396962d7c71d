"""Tests for the streaming observers: every one against a direct, all-in-memory numpy computation.

Streamed min-max results must match exactly; histogram methods must land within one bin (of the final,
re-binned histogram) of the reference. The vectorised searches (MSE over candidate ranges, KL over
thresholds) are checked against plain loops on small histograms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxq.calibration.observers import (
    OBSERVERS,
    EMAMinMaxObserver,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    MSEPercentileObserver,
    PercentileObserver,
    entropy_threshold,
    fold_abs,
    kl_divergences,
    make_observer,
    mse_search,
    mse_table,
    needs_tensors,
)
from onnxq.errors import CalibrationError

HIST_METHODS = ("percentile", "mse", "entropy", "mse-percentile")


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def finite(batches: list[np.ndarray]) -> np.ndarray:
    x = np.concatenate([np.asarray(b, np.float64).ravel() for b in batches])
    return x[np.isfinite(x)]


def growing_batches(seed: int = 0, *, signed: bool = True) -> list[np.ndarray]:
    """Batches whose range grows on both sides (forcing several re-binnings), with NaN/Inf and a batch of one."""
    g = rng(seed)
    out = []
    for i, scale in enumerate((0.01, 0.5, 0.2, 3.0, 40.0, 2.0)):
        x = g.standard_normal((2, 3, 5, 7)).astype(np.float32) * scale + (0.3 if signed else 0)
        if not signed:
            x = np.maximum(x, 0)
        if i == 2:
            x.flat[:3] = [np.nan, np.inf, -np.inf]
        out.append(x)
    out.append(np.array([[5.0 if signed else 7.5]], np.float32))  # a batch of one value
    out.append(np.full((4, 4), np.nan, np.float32))  # nothing finite: ignored
    return out


def feed(obs, batches):
    for b in batches:
        obs.observe(b)
    return obs


def np_hist_on_grid(values: np.ndarray, obs: HistogramObserver) -> np.ndarray:
    """np.histogram of ``values`` on the observer's final grid (the direct, non-streaming histogram)."""
    edges = obs.edges
    h, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return h


# -------------------------------------------------------------------------------------------------
# registry and protocol


def test_registry_names_and_needs_tensors():
    for name in ("minmax", "ema-minmax", *HIST_METHODS):
        assert name in OBSERVERS
        assert make_observer(name).name == name
    assert not needs_tensors("minmax") and not needs_tensors("ema-minmax")
    assert all(needs_tensors(n) for n in HIST_METHODS)
    with pytest.raises(CalibrationError, match="valid: .*mse"):
        make_observer("nope")


@pytest.mark.parametrize("name", ["minmax", "ema-minmax", *HIST_METHODS])
def test_compute_before_observe_is_an_error(name):
    obs = make_observer(name)
    with pytest.raises(CalibrationError, match="no finite values"):
        obs.compute_range()
    obs.observe(np.array([np.nan, np.inf], np.float32))  # nothing finite: still nothing seen
    with pytest.raises(CalibrationError, match="no finite values"):
        obs.compute_range()


@pytest.mark.parametrize("name", HIST_METHODS)
def test_histogram_observers_refuse_minmax_only(name):
    with pytest.raises(CalibrationError, match="whole tensors"):
        make_observer(name).observe_minmax(0.0, 1.0)


@pytest.mark.parametrize("kwargs", [{"bins": 7}, {"bins": 2}])
def test_bad_bins(kwargs):
    with pytest.raises(CalibrationError):
        MSEObserver(**kwargs)


def test_bad_options():
    with pytest.raises(CalibrationError):
        PercentileObserver(percentile=30)
    with pytest.raises(CalibrationError):
        EntropyObserver(quantized_bins=1024)
    with pytest.raises(CalibrationError):
        EMAMinMaxObserver(averaging_constant=0)


# -------------------------------------------------------------------------------------------------
# min-max family: exact


def test_minmax_streamed_equals_all_in_memory():
    batches = growing_batches(1)
    lo, hi = feed(MinMaxObserver(), batches).compute_range()
    x = finite(batches)
    assert (lo, hi) == (float(x.min()), float(x.max()))


def test_ema_minmax_matches_reference_loop():
    batches = [b for b in growing_batches(2) if np.isfinite(b).any()] * 30  # > 1/c batches: decay starts
    obs = feed(EMAMinMaxObserver(averaging_constant=0.01), batches)
    m_lo = m_hi = 0.0
    for t, b in enumerate(batches, start=1):
        f = b[np.isfinite(b)]
        c = max(0.01, 1.0 / t)
        m_lo += c * (float(f.min()) - m_lo)
        m_hi += c * (float(f.max()) - m_hi)
    assert obs.compute_range() == pytest.approx((m_lo, m_hi), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", ["minmax", "ema-minmax", *HIST_METHODS])
def test_constant_tensor(name):
    obs = feed(make_observer(name), [np.full((3, 4), 2.5, np.float32)] * 3)
    lo, hi = obs.compute_range()
    assert lo == pytest.approx(2.5) and hi == pytest.approx(2.5)


@pytest.mark.parametrize("name", ["minmax", *HIST_METHODS])
def test_all_zero_then_values(name):
    obs = make_observer(name)
    obs.observe(np.zeros(50, np.float32))
    if name != "minmax":
        assert obs.compute_range() == (0.0, 0.0)
    obs.observe(np.linspace(0, 1, 101, dtype=np.float32))
    lo, hi = obs.compute_range()
    assert lo == 0.0 and 0.5 < hi <= 1.0
    if isinstance(obs, HistogramObserver):
        assert obs.hist.sum() == 151 and obs.zeros == 51 and obs.hist[0] >= 51


# -------------------------------------------------------------------------------------------------
# the streaming histogram: re-binning is exact


@pytest.mark.parametrize("signed", [True, False])
def test_histogram_equals_numpy_histogram_on_final_grid(signed):
    batches = growing_batches(3, signed=signed)
    obs = feed(MSEObserver(), batches)
    x = finite(batches)
    assert obs.count == x.size and obs.hist.sum() == x.size
    assert obs.zeros == int(np.count_nonzero(x == 0))
    assert (obs.lo, obs.hi) == (float(x.min()), float(x.max()))
    assert obs.edges[0] <= min(x.min(), 0) and obs.edges[-1] >= max(x.max(), 0)
    assert obs.hist.shape == (2048,)
    ref = np_hist_on_grid(x, obs)
    # float32 bin indices may put a value lying on an edge into the neighbouring bin
    assert np.abs(obs.hist - ref).sum() <= max(2, x.size // 10000)
    assert 0 in np.round(obs.edges / obs.width)  # zero stays on an edge


def test_histogram_memory_is_fixed():
    obs = MSEObserver(bins=64)
    g = rng(4)
    for i in range(200):
        obs.observe(g.standard_normal(100).astype(np.float32) * (1 + i))
    assert obs.hist.shape == (64,) and obs.hist.sum() == 20000


def test_regrow_merges_in_powers_of_two():
    obs = PercentileObserver(bins=8)
    obs.observe(np.array([0.0, 1.0, 7.0], np.float32))
    w0 = obs.width
    obs.observe(np.array([-30.0], np.float32))
    assert math.log2(obs.width / w0) == int(math.log2(obs.width / w0)) >= 1
    assert obs.hist.sum() == 4


@pytest.mark.parametrize("signed", [True, False])
def test_large_batches_are_binned_block_by_block(signed, monkeypatch):
    from onnxq.calibration import histogram

    monkeypatch.setattr(histogram, "_BLOCK", 1000)  # many blocks, the last one partial
    g = rng(31)
    batches = []
    for scale in (1.0, 3.0, 0.5):
        x = (g.standard_normal(25_345) * scale).astype(np.float32)
        batches.append(x if signed else np.maximum(x, 0))
    blocked = feed(MSEObserver(), batches)
    monkeypatch.setattr(histogram, "_BLOCK", 1 << 20)  # one block each
    whole = feed(MSEObserver(), batches)
    assert np.array_equal(blocked.hist, whole.hist) and blocked.zeros == whole.zeros
    x = finite(batches)
    assert blocked.zeros == int(np.count_nonzero(x == 0)) and blocked.hist.sum() == x.size
    assert np.abs(blocked.hist - np_hist_on_grid(x, blocked)).sum() <= max(2, x.size // 10000)


def test_known_extremes_give_the_same_state():
    batches = [b for b in growing_batches(32) if b.size > 1]
    a, b = MSEObserver(), MSEObserver()
    for x in batches:
        a.observe(x)
        b.observe(x, extremes=(float(np.min(x)), float(np.max(x))))  # NaN where x holds one: filtered
    for k in ("width", "start", "count", "zeros", "lo", "hi", "batches"):
        assert getattr(a, k) == getattr(b, k), k
    assert np.array_equal(a.hist, b.hist)


def test_range_growing_by_many_orders_of_magnitude():
    obs = MSEObserver()
    obs.observe(np.array([-1e-12, 1e-12, 0.0], np.float32))
    obs.observe(np.array([3e25, -1.0], np.float32))
    assert obs.hist.sum() == 5 and obs.edges[-1] >= 3e25
    lo, hi = obs.compute_range()
    assert obs.lo <= lo <= hi <= obs.hi


# -------------------------------------------------------------------------------------------------
# percentile


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
@pytest.mark.parametrize("signed", [True, False])
def test_percentile_within_one_bin_of_numpy(p, signed):
    batches = growing_batches(5, signed=signed)
    obs = feed(PercentileObserver(percentile=p), batches)
    x = finite(batches)
    lo, hi = obs.compute_range()
    # the histogram's target rank p * n falls in the bin holding the ceil(p * n)-th smallest value
    assert lo == pytest.approx(np.percentile(x, 100 - p, method="inverted_cdf"), abs=obs.width)
    assert hi == pytest.approx(np.percentile(x, p, method="inverted_cdf"), abs=obs.width)


def test_percentile_large_sample_matches_numpy():
    g = rng(19)
    batches = [np.maximum(g.standard_normal(50_000) * (1 + k), -0.5).astype(np.float32) for k in range(4)]
    obs = feed(PercentileObserver(percentile=99.9), batches)
    x = finite(batches)
    lo, hi = obs.compute_range()
    assert lo == pytest.approx(np.percentile(x, 0.1, method="inverted_cdf"), abs=obs.width)
    assert hi == pytest.approx(np.percentile(x, 99.9, method="inverted_cdf"), abs=obs.width)


def test_percentile_100_is_minmax():
    batches = growing_batches(6)
    x = finite(batches)
    lo, hi = feed(PercentileObserver(percentile=100), batches).compute_range()
    assert (lo, hi) == (float(x.min()), float(x.max()))


# -------------------------------------------------------------------------------------------------
# MSE


def mse_loop(hist, start, zero_count, lo_idx, hi_idx, levels=256):
    """The error model of mse_table, one candidate and one bin at a time."""
    h = np.asarray(hist, np.float64).copy()
    h[min(-start, len(h) - 1)] -= zero_count
    out = np.zeros((len(lo_idx), len(hi_idx)))
    for a, i in enumerate(lo_idx):
        for b, j in enumerate(hi_idx):
            lo, hi = start + i, start + j
            step = (hi - lo) / (levels - 1)
            err = 0.0
            for k, c in enumerate(h):
                x = start + k + 0.5
                if k < i:
                    err += c * (lo - x) ** 2
                elif k >= j:
                    err += c * (x - hi) ** 2
                else:
                    err += c * step * step / 12
            out[a, b] = err
    return out


def test_mse_table_matches_loop():
    g = rng(7)
    hist = g.integers(0, 50, 40)
    hist[10] += 500  # zeros live in bin -start = 10
    start = -10
    lo_idx, hi_idx = np.arange(0, 11), np.arange(10, 41)
    ref = mse_loop(hist, start, 300, lo_idx, hi_idx, levels=16)
    assert np.allclose(mse_table(hist, start, 300, lo_idx, hi_idx, levels=16), ref, rtol=1e-9, atol=1e-6)


def test_mse_search_small_is_exhaustive():
    g = rng(8)
    for _ in range(5):
        hist = g.integers(0, 30, 60) * (g.random(60) < 0.7)
        start = -int(g.integers(0, 61))
        lo_idx, hi_idx = np.arange(0, -start + 1), np.arange(-start, 61)
        ref = mse_loop(hist, start, 0, lo_idx, hi_idx, levels=8)
        i, j = np.unravel_index(np.argmin(ref), ref.shape)
        got = mse_search(hist, start, 0, levels=8)
        assert ref[got[0] - lo_idx[0], got[1] - hi_idx[0]] == pytest.approx(ref[i, j], rel=1e-9)


def test_mse_search_coarse_then_fine_is_near_exhaustive():
    x = np.concatenate([rng(9).standard_normal(200_000), rng(10).standard_cauchy(2000)]).astype(np.float32)
    obs = feed(MSEObserver(), [x])
    start, n, z = obs.start, obs.bins, -obs.start
    full = mse_table(obs.hist, start, obs.zeros, np.arange(0, z + 1), np.arange(z, n + 1))
    i, j = mse_search(obs.hist, start, obs.zeros)
    assert full[i, j - z] <= full.min() * 1.001


def fake_quant_mse(x: np.ndarray, lo: float, hi: float, levels: int = 256) -> float:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / (levels - 1)
    zp = np.round(-lo / s)
    return float(np.mean(((np.clip(np.round(x / s) + zp, 0, levels - 1) - zp) * s - x) ** 2))


@pytest.mark.parametrize("signed", [True, False])
def test_mse_range_is_near_optimal_on_the_raw_values(signed):
    g = rng(11)
    batches = []
    for k in range(6):
        x = g.standard_normal(50_000) * (1 + k / 5)
        if k == 3:
            x[:2] = [-60.0, 60.0]  # one far outlier per side in 300k values: clipping it pays
        batches.append((x if signed else np.maximum(x, 0)).astype(np.float32))
    obs = feed(MSEObserver(), batches)
    x = finite(batches)
    lo, hi = obs.compute_range()
    ends = np.linspace(0.05, 1, 20)
    best = min(fake_quant_mse(x, a * x.min(), b * x.max()) for a in (ends if signed else [1.0]) for b in ends)
    assert fake_quant_mse(x, lo, hi) <= 1.02 * best
    assert hi < 0.9 * x.max()  # the outliers are clipped
    if signed:
        assert lo > 0.9 * x.min()


@pytest.mark.parametrize("signed", [True, False])
def test_mse_streamed_matches_direct(signed):
    batches = growing_batches(12, signed=signed)
    obs = feed(MSEObserver(bins=64), batches)
    x = finite(batches)
    # direct: np.histogram of all values on the final grid, every candidate range scored by the loop
    lo_idx, hi_idx = np.arange(0, -obs.start + 1), np.arange(-obs.start, obs.bins + 1)
    err = mse_loop(np_hist_on_grid(x, obs), obs.start, int(np.count_nonzero(x == 0)), lo_idx, hi_idx)
    i, j = np.unravel_index(np.argmin(err), err.shape)
    lo_ref, hi_ref = (obs.start + lo_idx[i]) * obs.width, (obs.start + hi_idx[j]) * obs.width
    lo, hi = obs.compute_range()
    assert lo == pytest.approx(max(lo_ref, x.min()), abs=obs.width)
    assert hi == pytest.approx(min(hi_ref, x.max()), abs=obs.width)


def test_mse_zeros_are_free():
    # a ReLU output: many exact zeros must not push the range towards a finer step
    x = np.maximum(rng(13).standard_normal(100_000), 0).astype(np.float32)
    obs = feed(MSEObserver(), [x])
    assert obs.zeros == int(np.count_nonzero(x == 0))
    without = mse_search(obs.hist, obs.start, 0)
    with_zeros = mse_search(obs.hist, obs.start, obs.zeros)
    assert with_zeros[1] >= without[1]


# -------------------------------------------------------------------------------------------------
# entropy


def kl_loop(hist: np.ndarray, nq: int) -> np.ndarray:
    """TensorRT's KL divergence, one threshold at a time (the definition in kl_divergences)."""
    h = np.asarray(hist, np.float64)
    out = []
    for i in range(nq, len(h) + 1):
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        q = np.zeros(i)
        for j in range(nq):
            a, b = math.ceil(j * i / nq), math.ceil((j + 1) * i / nq)
            nonzero = p[a:b] > 0
            if nonzero.any():
                q[a:b][nonzero] = h[a:b].sum() / nonzero.sum()
        if q.sum() == 0 or ((p > 0) & (q == 0)).any():
            out.append(np.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        out.append(float(np.sum(p[m] * np.log(p[m] / q[m]))))
    return np.array(out)


@pytest.mark.parametrize("seed", range(4))
def test_kl_divergences_match_loop(seed):
    g = rng(seed)
    h = (g.exponential(20, 96) * (g.random(96) < 0.8)).astype(np.int64)
    h[g.integers(0, 96, 3)] = 0
    thr, kl = kl_divergences(h, 8)
    ref = kl_loop(h, 8)
    assert list(thr) == list(range(8, 97))
    assert np.array_equal(np.isinf(kl), np.isinf(ref))
    fin = np.isfinite(ref)
    assert np.allclose(kl[fin], ref[fin], rtol=1e-9, atol=1e-12)


def test_fold_abs():
    h = np.arange(10)
    assert list(fold_abs(h, -3)) == [3 + 2, 4 + 1, 5 + 0, 6, 7, 8, 9]
    assert list(fold_abs(h, 0)) == list(h)
    assert list(fold_abs(h, -10)) == list(h[::-1])


@pytest.mark.parametrize("signed", [True, False])
def test_entropy_streamed_matches_direct(signed):
    batches = growing_batches(14, signed=signed)
    obs = feed(EntropyObserver(quantized_bins=16, bins=256), batches)
    x = finite(batches)
    lo, hi = obs.compute_range()
    # direct: |x| histogram on the same grid, the zero bin counted as bin 1, the loop's KL per threshold
    n_abs = max(-obs.start, obs.bins + obs.start)
    habs, _ = np.histogram(np.minimum(np.abs(x), n_abs * obs.width), bins=np.arange(n_abs + 1) * obs.width)
    habs = habs.astype(np.float64)
    habs[0] = habs[1]
    nq = 16 * (2 if x.min() >= 0 else 1)
    kl = kl_loop(habs, nq)
    t = (nq + len(kl) - 1 - int(np.argmin(kl[::-1]))) * obs.width  # the largest threshold among ties
    assert hi == pytest.approx(min(t, x.max()), abs=obs.width)
    assert lo == pytest.approx(max(-t, x.min()), abs=obs.width)


def test_entropy_clips_a_long_tail_but_not_a_relu_spike():
    g = rng(15)
    relu = np.maximum(g.standard_normal(200_000), 0).astype(np.float32)  # half exact zeros
    lo, hi = feed(EntropyObserver(), [relu]).compute_range()
    assert lo == 0.0 and hi > 2.5  # the zero spike does not drag the threshold down to ~1 sigma
    tail = g.lognormal(0.0, 1.0, 200_000).astype(np.float32)
    lo, hi = feed(EntropyObserver(), [tail]).compute_range()
    assert lo == float(tail.min()) and np.percentile(tail, 99) < hi < 0.5 * tail.max()


def test_entropy_threshold_on_empty_and_tiny():
    assert entropy_threshold(np.zeros(300), 128) == 300


# -------------------------------------------------------------------------------------------------
# mse-percentile


def test_mse_percentile_picks_by_sign():
    g = rng(16)
    relu = [np.maximum(g.standard_normal(5000), 0).astype(np.float32) for _ in range(3)]
    signed = [g.standard_normal(5000).astype(np.float32) for _ in range(3)]
    assert feed(MSEPercentileObserver(), relu).compute_range() == feed(MSEObserver(), relu).compute_range()
    assert feed(MSEPercentileObserver(percentile=99.9), signed).compute_range() == feed(
        PercentileObserver(percentile=99.9), signed
    ).compute_range()


@pytest.mark.parametrize("name", HIST_METHODS)
def test_ranges_lie_inside_observed_minmax(name):
    batches = growing_batches(17)
    x = finite(batches)
    lo, hi = feed(make_observer(name), batches).compute_range()
    assert x.min() <= lo <= hi <= x.max()


@pytest.mark.parametrize("name", HIST_METHODS)
def test_float16_and_float64_inputs(name):
    x = rng(18).standard_normal(1000)
    a = feed(make_observer(name), [x.astype(np.float16)]).compute_range()
    b = feed(make_observer(name), [x.astype(np.float16).astype(np.float64)]).compute_range()
    assert a == pytest.approx(b, abs=1e-3)
