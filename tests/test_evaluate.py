"""onnxq compare: tensor matching (QDQ names, QOperator structure), SQNR against a numpy oracle, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import asset
from helpers import run_ort, sqnr_db

from onnxq.calibration.sources import open_source
from onnxq.cli import main
from onnxq.evaluate import TensorStats, compare_models, match_tensors
from onnxq.quantization import quantize_model
from onnxq.recipe import preset


def _cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Add(residual) -> GlobalAveragePool -> Flatten -> Gemm, input [N, 4, 8, 8]."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.normal(0, 0.5, (4, 4, 3, 3)), "b1": rng.normal(0, 0.1, 4), "w2": rng.normal(0, 0.5, (4, 4, 3, 3)),
             "b2": rng.normal(0, 0.1, 4), "fc_w": rng.normal(0, 0.5, (6, 4)), "fc_b": rng.normal(0, 0.1, 6)}  # fmt: skip
    h = onnx.helper
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        h.make_node("Add", ["c2", "x"], ["s"], name="add"),
        h.make_node("GlobalAveragePool", ["s"], ["p"], name="gap"),
        h.make_node("Flatten", ["p"], ["f"], name="flatten"),
        h.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = h.make_graph(nodes, "cnn", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6])],
                         [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])  # fmt: skip
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _feeds(n: int = 12, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 4, 8, 8)).astype(np.float32)} for _ in range(n)]


def _ort_qoperator(model: onnx.ModelProto, tmp_path: Path, feeds: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """onnxruntime's own QOperator quantization of ``model`` (QLinearConv, QLinearAdd, ...)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):  # noqa: ANN202
            return next(self.it, None)

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QOperator, per_channel=False)
    return onnx.load(dst)


def test_tensor_stats_match_numpy_oracle() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 50)).astype(np.float32)
    b = a + rng.normal(0, 0.05, a.shape).astype(np.float32)
    st = TensorStats()
    st.update(a[:1], b[:1])
    st.update(a[1:], b[1:])
    assert st.sqnr_db == pytest.approx(sqnr_db(a, b), abs=1e-3)
    cos = float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))
    assert st.cosine == pytest.approx(cos, rel=1e-6)
    assert st.max_abs_err == pytest.approx(float(np.abs(a - b).max()))
    same = TensorStats()
    same.update(a, a)
    assert math.isinf(same.sqnr_db) and same.cosine == pytest.approx(1.0)


def test_qdq_matching_and_numbers() -> None:
    fm = _cnn()
    feeds = _feeds()
    qm = quantize_model(fm, preset("w8a8"), source=open_source("random:8", fm)).model
    matches, unmatched = match_tensors(fm, qm)
    by = {m.float_name: m for m in matches}
    assert unmatched == []
    assert {"r1", "c2", "s"} <= set(by)  # Q/DQ'd activations and quantized-node outputs
    assert by["r1"].quant_name.endswith("_dequantized") and by["r1"].scale is None
    c = compare_models(fm, qm, feeds, latency=False)
    assert c.samples == len(feeds) and c.forward_passes == 2 * len(feeds)
    # oracle: run both models with the tensor exposed, compute SQNR in numpy
    ref = np.concatenate([run_ort(_expose(fm, "r1"), f)[1] for f in feeds])
    got = np.concatenate([run_ort(_expose(qm, by["r1"].quant_name), f)[1] for f in feeds])
    row = next(r for r in c.tensors if r["float_name"] == "r1")
    assert row["sqnr_db"] == pytest.approx(sqnr_db(ref, got), abs=0.01)
    y_ref = np.concatenate([run_ort(fm, f)[0] for f in feeds])
    y_got = np.concatenate([run_ort(qm, f)[0] for f in feeds])
    assert c.outputs["y"]["sqnr_db"] == pytest.approx(sqnr_db(y_ref, y_got), abs=0.01)
    assert c.top1_agreement == pytest.approx(float(np.mean(y_ref.argmax(1) == y_got.argmax(1))))
    sq = [r["sqnr_db"] for r in c.tensors]
    assert sq == sorted(sq), "worst first"
    assert c.histograms and len(c.histograms[0]["counts"]) + 1 == len(c.histograms[0]["edges"])


def _expose(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m


def test_qoperator_matched_by_name_and_by_structure(tmp_path: Path) -> None:
    fm = _cnn()
    feeds = _feeds()
    qm = _ort_qoperator(fm, tmp_path, feeds)
    assert "QLinearConv" in {n.op_type for n in qm.graph.node}
    matches, _ = match_tensors(fm, qm)
    by = {m.float_name: m for m in matches}
    assert by["r1"].op_type == "QLinearConv" and by["r1"].scale  # fused Relu: compared after the Relu
    # the same model with every tensor renamed (another exporter): matched by aligning weight shapes
    renamed = onnx.ModelProto()
    renamed.CopyFrom(qm)
    keep = {i.name for i in renamed.graph.input} | {o.name for o in renamed.graph.output}
    mapping = {t: f"t{i}" for i, t in enumerate({t for n in renamed.graph.node for t in n.output} - keep)}
    for n in renamed.graph.node:
        n.input[:] = [mapping.get(t, t) for t in n.input]
        n.output[:] = [mapping.get(t, t) for t in n.output]
    matches2, _ = match_tensors(fm, renamed)
    by2 = {m.float_name: m for m in matches2}
    assert by2["r1"].quant_name == mapping[by["r1"].quant_name]
    assert "s" in by2 and by2["s"].op_type == "QLinearAdd"
    c1 = compare_models(fm, qm, feeds, latency=False)
    c2 = compare_models(fm, renamed, feeds, latency=False)
    r1 = {r["float_name"]: r["sqnr_db"] for r in c1.tensors}
    r2 = {r["float_name"]: r["sqnr_db"] for r in c2.tensors}
    assert r1["r1"] == pytest.approx(r2["r1"]) and r1["r1"] > 20  # dequantized on the host with the node's own scale


def test_compare_cli_json_and_table(tmp_path: Path) -> None:
    fm = _cnn()
    onnx.save(fm, tmp_path / "f.onnx")
    qm = quantize_model(fm, preset("w8a8"), source=open_source("random:8", fm)).model
    onnx.save(qm, tmp_path / "q.onnx")
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), "--calib", "random:6", "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["samples"] == 6 and d["tensors"] and d["models"]["quant"]["bytes"] > 0
    assert d["models"]["float"]["latency_ms"] > 0
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), "--calib", "random:4", "--no-latency"])
    assert r.exit_code == 0 and "worst tensors" in r.stdout and "SQNR" in r.stdout


def test_compare_refuses_unrelated_models(tmp_path: Path) -> None:
    fm = _cnn()
    other = onnx.ModelProto()
    other.CopyFrom(fm)
    other.graph.output[0].name = "z"
    other.graph.node[-1].output[0] = "z"
    extra = onnx.helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, ["N", 6])
    other.graph.output.append(extra)
    other.graph.node.append(onnx.helper.make_node("Identity", ["z"], ["y2"]))
    onnx.save(fm, tmp_path / "f.onnx")
    onnx.save(other, tmp_path / "o.onnx")
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "f.onnx"), str(tmp_path / "o.onnx"), "--calib", "random:2"])
    assert r.exit_code == 1 and "different outputs" in r.stderr


@pytest.mark.assets
def test_compare_zoo_qoperator_mobilenet(assets: Path) -> None:
    """Acceptance 3: the zoo's int8 MobileNetV2 (QOperator, tensors numbered by another exporter) vs fp32."""
    fp = asset(assets, "cnn/mobilenetv2-7/model.onnx")
    zoo = asset(assets, "cnn/mobilenetv2-12-int8-zoo/model.onnx")
    fm, qm = onnx.load(fp), onnx.load(zoo)
    matches, unmatched = match_tensors(fm, qm)
    assert len(matches) >= 60 and unmatched == []  # 52 convolutions + 10 residual adds (the Gemm is the output)
    assert {m.op_type for m in matches} == {"QLinearConv", "QLinearAdd"}
    c = compare_models(fm, qm, open_source(str(asset(assets, "imagenet")), fm, preprocess="torch", limit=8), latency=False)
    assert c.top1_agreement is not None and c.top1_agreement >= 0.5
    first = next(r for r in c.tensors if r["float_name"] == "conv_0_relu6")
    assert first["sqnr_db"] > 12, first  # the first layer is close; errors accumulate with depth
