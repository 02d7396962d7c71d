"""Per-channel statistics: streamed results equal a direct numpy computation over all samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import asset
from helpers import make_model, value_info

from onnxq.calibration.channel_stats import collect_channel_stats, weight_op_inputs
from onnxq.calibration.sources import ArrayFolderSource, input_specs, open_source
from onnxq.errors import CalibrationError


def _model(opset: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        onnx.helper.make_node("Relu", ["h"], ["r"], name="relu"),
        onnx.helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        onnx.helper.make_node("MatMul", ["x", "xt"], ["z"], name="act_by_act"),  # not a weight op
    ]
    inits = {"w1": rng.normal(size=(4, 6)).astype(np.float32), "w2": rng.normal(size=(6, 5)).astype(np.float32)}
    return make_model(nodes, [value_info("x", ["N", 3, 4]), value_info("xt", ["N", 4, 3])],
                      [value_info("y", ["N", 3, 5]), value_info("z", ["N", 3, 3])], inits, opset, check=False)  # fmt: skip


@pytest.mark.parametrize("opset", [13, 18])
def test_absmax_and_gram_match_numpy(tmp_path: Path, opset: int) -> None:
    model = _model(opset)
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(7, 1, 3, 4)).astype(np.float32) * np.array([1, 10, 0.1, 3], np.float32)
    for i, x in enumerate(xs):
        np.savez(tmp_path / f"s{i}.npz", x=x, xt=np.zeros((1, 4, 3), np.float32))
    source = ArrayFolderSource(tmp_path, input_specs(model))
    graph = gs.import_onnx(model)
    names = weight_op_inputs(graph)
    assert names == ["x", "r"]
    stats = collect_channel_stats(graph, names, source, device="cpu", gram=True)
    flat = xs.reshape(-1, 4)
    np.testing.assert_array_equal(stats["x"].absmax, np.abs(flat).max(axis=0))
    np.testing.assert_allclose(stats["x"].gram, flat.astype(np.float64).T @ flat, rtol=1e-10)
    assert stats["x"].rows == 21
    r = np.maximum(flat @ onnx.numpy_helper.to_array(model.graph.initializer[0]), 0)
    np.testing.assert_allclose(stats["r"].absmax, np.abs(r).max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["r"].hessian, 2 * r.astype(np.float64).T @ r / 21, rtol=1e-5)


def test_gram_refuses_nan(tmp_path: Path) -> None:
    model = _model(13)
    x = np.ones((1, 3, 4), np.float32)
    x[0, 0, 0] = np.nan
    np.savez(tmp_path / "s.npz", x=x, xt=np.zeros((1, 4, 3), np.float32))
    source = ArrayFolderSource(tmp_path, input_specs(model))
    stats = collect_channel_stats(model, ["x"], source, device="cpu")
    assert np.isfinite(stats["x"].absmax).all()
    with pytest.raises(CalibrationError, match="'x'.*NaN"):
        collect_channel_stats(model, ["x"], source, device="cpu", gram=True)


@pytest.mark.assets
def test_minilm_linear_inputs(assets: Path) -> None:
    model = onnx.load(asset(assets, "minilm/model.onnx"))
    source = open_source(str(asset(assets, "sts/sts-dev.csv")), model, tokenizer=str(asset(assets, "minilm/tokenizer.json")), limit=4)
    names = weight_op_inputs(gs.import_onnx(model))
    assert len(names) >= 24  # 36 linears; Q/K/V share one input per layer
    stats = collect_channel_stats(model, names, source, device="cpu")
    widths = {s.absmax.shape for s in stats.values()}
    assert widths <= {(384,), (1536,)}
    ratio = max(float(s.absmax.max() / np.median(s.absmax)) for s in stats.values())
    assert ratio > 10, "transformer activations have outlier channels (why SmoothQuant exists)"
