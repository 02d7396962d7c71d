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
