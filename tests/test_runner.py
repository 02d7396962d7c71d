"""Tests for the calibration runner: histogram methods see whole tensors, batch by batch, in groups when
the exposed tensors would exceed the memory budget; min-max methods keep the in-graph reduction."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from helpers import model_from_text
from onnxq.calibration import runner
from onnxq.calibration.observers import make_observer
from onnxq.calibration.runner import CalibrationSession, tensor_groups
from onnxq.calibration.sources import CalibrationSource
from onnxq.errors import CalibrationError
from onnxq.recipe import CalibrationSpec

MODEL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 16] x) => (float[N, 16] y) {
    c = Constant <value = float[1] {3.0}> ()
    r = Relu(x)
    t = Mul(x, c)
    y = Add(r, t)
}
"""


class ListSource(CalibrationSource):
    """Feeds from a list; counts how often it is iterated."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        for f in self.feeds:
            yield {k: v.copy() for k, v in f.items()}

    def __len__(self) -> int:
        return len(self.feeds)

    def describe(self) -> str:
        return f"{len(self.feeds)} test feeds"


def make_feeds(n: int = 6, seed: int = 0) -> list[dict[str, np.ndarray]]:
    g = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        x = (g.standard_normal((1, 16)) * (1 + 3 * i)).astype(np.float32)  # the range grows: re-binning
        if i == 2:
            x[0, :2] = [np.nan, np.inf]
        feeds.append({"x": x})
    return feeds


def direct(method: str, feeds: list[dict[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """The same observers fed with the tensors computed in numpy."""
    obs = {n: make_observer(method) for n in ("x", "r", "t", "y")}
    for f in feeds:
        x = f["x"]
        with np.errstate(invalid="ignore"):
            vals = {"x": x, "r": np.maximum(x, np.float32(0)), "t": x * np.float32(3)}
        vals["r"] = np.where(np.isnan(x), x, vals["r"])  # Relu propagates NaN
        vals["y"] = vals["r"] + vals["t"]
        for n, v in vals.items():
            obs[n].observe(v)
    return {n: o.compute_range() for n, o in obs.items()}


@pytest.mark.parametrize("method", ["mse", "percentile", "entropy", "mse-percentile", "minmax"])
def test_session_matches_numpy_observers(method):
    feeds = make_feeds()
    source = ListSource(feeds)
    sess = CalibrationSession(source, CalibrationSpec(method=method, device="cpu"), progress=False)
    got = sess.ranges(model_from_text(MODEL), ["x", "r", "t", "y"])
    ref = direct(method, feeds)
    for n in ref:
        assert got[n] == pytest.approx(ref[n], rel=1e-6, abs=1e-6), n
    assert sess.samples_seen == len(feeds)


def test_histogram_groups_give_the_same_ranges(monkeypatch):
    feeds = make_feeds()
    model = onnx.shape_inference.infer_shapes(model_from_text(MODEL))
    whole = CalibrationSession(ListSource(feeds), CalibrationSpec(method="mse", device="cpu"), progress=False)
    one = whole.ranges(model, ["r", "t", "y", "x"])
    monkeypatch.setattr(runner, "EXPOSE_BUDGET_BYTES", 16 * 4)  # one [1, 16] float tensor per group
    source = ListSource(feeds)
    grouped = CalibrationSession(source, CalibrationSpec(method="mse", device="cpu"), progress=False)
    assert grouped.ranges(model, ["r", "t", "y", "x"]) == one
    assert source.passes == 1 + 3  # the first sample to size the groups, then one pass per group


def test_batches_of_several_samples():
    feeds = make_feeds(6, seed=3)
    model = model_from_text(MODEL)
    spec = CalibrationSpec(method="percentile", device="cpu", batch_size=4)
    got = CalibrationSession(ListSource(feeds), spec, progress=False).ranges(model, ["y"])
    assert got["y"] == pytest.approx(direct("percentile", feeds)["y"], rel=1e-6)


@pytest.mark.parametrize("annotated", [True, False])
def test_tensor_groups_estimates_sizes_from_shapes(annotated):
    model = model_from_text(MODEL)
    if annotated:
        model = onnx.shape_inference.infer_shapes(model)
    assert len(model.graph.value_info) == (3 if annotated else 0)  # else tensor_groups infers them
    feed = {"x": np.zeros((8, 16), np.float32)}  # N = 8: 512 bytes per tensor
    assert tensor_groups(model, ["r", "t", "y"], feed, 1 << 20) == [["r", "t", "y"]]
    assert tensor_groups(model, ["r", "t", "y"], feed, 1024) == [["r", "t"], ["y"]]
    assert tensor_groups(model, ["r", "t", "y"], feed, 10) == [["r"], ["t"], ["y"]]


def test_all_nan_tensor_is_an_error():
    feeds = [{"x": np.full((1, 16), np.nan, np.float32)}]
    sess = CalibrationSession(ListSource(feeds), CalibrationSpec(method="mse", device="cpu"), progress=False)
    with pytest.raises(CalibrationError, match="no finite values"):
        sess.ranges(model_from_text(MODEL), ["y"])


# -------------------------------------------------------------------------------------------------
# batching and the worker thread

FIXED_RESHAPE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 16] x) => (float[1, 16] y) {
    s = Constant <value = int64[2] {1, 16}> ()
    r = Relu(x)
    y = Reshape(r, s)
}
"""

VAR_LEN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, L] x) => (float[N, L] y) {
    c = Constant <value = float[1] {2.0}> ()
    y = Mul(x, c)
}
"""


class RunSpy:
    """Wraps CalibrationSession._session so that every run's feed shapes are recorded."""

    def __init__(self, monkeypatch):
        self.shapes: list[tuple[int, ...]] = []
        make = CalibrationSession._session
        spy = self

        class Proxy:
            def __init__(self, sess):
                self.sess = sess

            def run(self, names, feed):
                spy.shapes.append(next(iter(feed.values())).shape)
                return self.sess.run(names, feed)

        def session(sess_self, model, **kw):
            return Proxy(make(sess_self, model, **kw))

        monkeypatch.setattr(CalibrationSession, "_session", session)


def bin_width(method: str, feeds, name: str) -> float:
    """The final histogram bin width of tensor ``name`` fed one sample at a time."""
    o = make_observer(method)
    for f in feeds:
        x = f["x"]
        with np.errstate(invalid="ignore"):
            v = {"x": x, "t": x * np.float32(3), "r": np.where(np.isnan(x), x, np.maximum(x, np.float32(0)))}
        v["y"] = v["r"] + v["t"]
        o.observe(v[name])
    return o.width


@pytest.mark.parametrize("method", ["mse", "percentile", "mse-percentile"])
@pytest.mark.parametrize("how", ["recipe", "auto"])
def test_batched_calibration_matches_batch_one(method, how, monkeypatch):
    feeds = make_feeds(11, seed=5)  # the range grows sample after sample: the grids are re-binned
    model = model_from_text(MODEL)
    names = ["x", "r", "t", "y"]
    one = CalibrationSession(ListSource(feeds), CalibrationSpec(method=method, device="cpu"), progress=False)
    ref = one.ranges(model, names)
    spy = RunSpy(monkeypatch)
    if how == "auto":
        monkeypatch.setattr(runner, "AUTO_BATCH", 4)
        spec = CalibrationSpec(method=method, device="cpu")
    else:
        spec = CalibrationSpec(method=method, device="cpu", batch_size=4)
    sess = CalibrationSession(ListSource(feeds), spec, progress=False)
    got = sess.ranges(model, names)
    # the first sample alone (the histogram grids start from it, as with batch 1), then batches of 4
    assert [s[0] for s in spy.shapes] == [1, 4, 4, 2]
    assert sess.samples_seen == len(feeds)
    for n in names:
        w = bin_width(method, feeds, n)
        assert got[n][0] == pytest.approx(ref[n][0], abs=w) and got[n][1] == pytest.approx(ref[n][1], abs=w), n


def test_batched_entropy_equals_batch_one_when_the_grid_does_not_grow(monkeypatch):
    # entropy's KL minimum can move by many bins when the grid is re-binned differently, so batching is
    # exact for it only where the first sample (which runs alone) already spans the range
    g = np.random.default_rng(6)
    feeds = [{"x": (g.standard_normal((1, 16)) * 8).clip(-30, 30).astype(np.float32)} for _ in range(9)]
    feeds[0]["x"][0, :2] = [-40.0, 40.0]  # the first sample spans every later one
    model = model_from_text(MODEL)
    ref = CalibrationSession(ListSource(feeds), CalibrationSpec(method="entropy", device="cpu"), progress=False)
    ref = ref.ranges(model, ["r", "t", "y"])
    spec = CalibrationSpec(method="entropy", device="cpu", batch_size=3)
    assert CalibrationSession(ListSource(feeds), spec, progress=False).ranges(model, ["r", "t", "y"]) == ref


def test_auto_batching_respects_the_memory_budget(monkeypatch):
    spy = RunSpy(monkeypatch)
    monkeypatch.setattr(runner, "AUTO_BATCH", 8)
    monkeypatch.setattr(runner, "BATCH_BUDGET_BYTES", 3 * 3 * 16 * 4)  # r, t, y: 3 samples of [1, 16] each
    feeds = make_feeds(6)
    sess = CalibrationSession(ListSource(feeds), CalibrationSpec(method="mse", device="cpu"), progress=False)
    sess.ranges(model_from_text(MODEL), ["r", "t", "y"])
    assert [s[0] for s in spy.shapes] == [1, 3, 2]


def test_minmax_methods_are_not_batched_automatically(monkeypatch):
    monkeypatch.setattr(runner, "AUTO_BATCH", 8)
    spy = RunSpy(monkeypatch)
    sess = CalibrationSession(ListSource(make_feeds(4)), CalibrationSpec(method="minmax", device="cpu"), progress=False)
    sess.ranges(model_from_text(MODEL), ["y"])
    assert [s[0] for s in spy.shapes] == [1, 1, 1, 1]


def test_a_model_that_refuses_batches_runs_one_sample_at_a_time(monkeypatch):
    feeds = make_feeds(7, seed=2)
    model = model_from_text(FIXED_RESHAPE)
    ref = CalibrationSession(ListSource(feeds), CalibrationSpec(method="percentile", device="cpu"), progress=False)
    ref = ref.ranges(model, ["y", "r"])
    monkeypatch.setattr(runner, "AUTO_BATCH", 4)
    sess = CalibrationSession(ListSource(feeds), CalibrationSpec(method="percentile", device="cpu"), progress=False)
    assert sess.ranges(model, ["y", "r"]) == ref
    assert sess.samples_seen == 7
    # an explicit batch size the model cannot take is an error naming the samples
    spec = CalibrationSpec(method="percentile", device="cpu", batch_size=4)
    with pytest.raises(CalibrationError, match="samples 1-4"):
        CalibrationSession(ListSource(feeds), spec, progress=False).ranges(model, ["y"])


def test_samples_of_different_shapes_are_not_concatenated(monkeypatch):
    g = np.random.default_rng(9)
    feeds = [{"x": g.standard_normal((1, n)).astype(np.float32)} for n in (5, 5, 5, 7, 7, 5, 5, 5, 5, 5)]
    model = model_from_text(VAR_LEN)
    spy = RunSpy(monkeypatch)
    monkeypatch.setattr(runner, "AUTO_BATCH", 4)
    sess = CalibrationSession(ListSource(feeds), CalibrationSpec(method="entropy", device="cpu"), progress=False)
    got = sess.ranges(model, ["y"])
    assert spy.shapes == [(1, 5), (2, 5), (2, 7), (4, 5), (1, 5)]
    obs = make_observer("entropy")
    for f in feeds:
        obs.observe(f["x"] * np.float32(2))
    assert got["y"] == pytest.approx(obs.compute_range(), rel=1e-6)


def test_a_failing_run_names_the_sample_and_stops_the_worker():
    feeds = make_feeds(5)
    feeds[3] = {"x": np.zeros((1, 15), np.float32)}  # wrong width: ORT refuses it
    source = ListSource(feeds)
    sess = CalibrationSession(source, CalibrationSpec(method="mse", device="cpu"), progress=False)
    with pytest.raises(CalibrationError, match="sample 3"):
        sess.ranges(model_from_text(MODEL), ["y"])
    import threading

    assert not [t for t in threading.enumerate() if t.name == "onnxq-calibration"]


def test_a_failing_source_raises_its_error():
    class Broken(ListSource):
        def __iter__(self):
            yield from list(super().__iter__())[:2]
            raise OSError("disk gone")

    sess = CalibrationSession(Broken(make_feeds(4)), CalibrationSpec(method="mse", device="cpu"), progress=False)
    with pytest.raises(OSError, match="disk gone"):
        sess.ranges(model_from_text(MODEL), ["y"])


def test_an_observer_error_stops_the_worker(monkeypatch):
    from onnxq.calibration import observers

    calls = []
    real = observers.HistogramObserver.observe

    def failing(self, x, extremes=None):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("observer broke")
        return real(self, x, extremes)

    monkeypatch.setattr(observers.HistogramObserver, "observe", failing)
    sess = CalibrationSession(ListSource(make_feeds(6)), CalibrationSpec(method="mse", device="cpu"), progress=False)
    with pytest.raises(RuntimeError, match="observer broke"):
        sess.ranges(model_from_text(MODEL), ["r", "y"])
    import threading

    assert not [t for t in threading.enumerate() if t.name == "onnxq-calibration"]
