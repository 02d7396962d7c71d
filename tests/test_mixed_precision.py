"""--accuracy-budget: parsing, the search on a planted-outlier model, int16 fallbacks, the report and
Netron's view of the output (names, doc strings, metadata)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import run_ort, sqnr_db

from onnxq.calibration.sources import open_source
from onnxq.cli import main
from onnxq.errors import OnnxqError
from onnxq.mixed_precision import AccuracyBudget
from onnxq.quantization import CalibrationOptions, quantize_file, quantize_model, with_levels
from onnxq.recipe import preset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
from outlier_mlp import PLANTED, build  # noqa: E402


@pytest.fixture(scope="module")
def outlier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    model, data, _ = build(tmp_path_factory.mktemp("outlier"))
    return model, data


def _output_sqnr(fm: onnx.ModelProto, qm: onnx.ModelProto, x: np.ndarray) -> float:
    return sqnr_db(run_ort(fm, {"input": x})[0], run_ort(qm, {"input": x})[0])


@pytest.mark.parametrize(("text", "metric", "value"), [
    ("agreement=0.99", "agreement", 0.99), ("agreement=99%", "agreement", 0.99), ("agreement=99", "agreement", 0.99),
    ("top1=0.9", "agreement", 0.9), ("sqnr=30", "sqnr", 30.0), ("cosine: 0.999", "cosine", 0.999),
])  # fmt: skip
def test_budget_parse(text: str, metric: str, value: float) -> None:
    b = AccuracyBudget.parse(text)
    assert (b.metric, b.threshold) == (metric, pytest.approx(value))
    assert b.met(value) and not b.met(value - 0.01)


@pytest.mark.parametrize("text", ["", "accuracy=0.9", "agreement", "cosine=2", "sqnr=abc"])
def test_budget_parse_errors(text: str) -> None:
    with pytest.raises(OnnxqError, match="accuracy-budget"):
        AccuracyBudget.parse(text)


def test_plain_w8a8_collapses_and_budget_restores_it(outlier: tuple[Path, Path]) -> None:
    """Acceptance 2: the planted layer is named first and the target holds after the fallback."""
    model, data = outlier
    fm = onnx.load(model)
    x = np.load(data)
    calib = CalibrationOptions(str(data))
    plain = quantize_model(fm, preset("w8a8"), calibration=calib).model
    assert _output_sqnr(fm, plain, x) < 15, "the planted outlier should break plain w8a8"
    res = quantize_model(fm, preset("w8a8"), calibration=calib, budget=AccuracyBudget.parse("sqnr=30"))
    mp = res.report.info["mixed_precision"]
    assert mp["ranking"][0]["node"] == PLANTED, mp["ranking"][:3]
    assert mp["met"] and mp["final"] >= 30 > mp["baseline"]
    assert PLANTED in {f["node"] for f in mp["fallbacks"]}
    assert len(mp["fallbacks"]) <= 3, mp["fallbacks"]
    assert mp["forward_passes"] > 0 and mp["builds"] > len(mp["ranking"])
    assert _output_sqnr(fm, res.model, x) >= 29.5  # the model returned is the one measured
    # the decisions are in the recipe recorded in the model (reproducible with --recipe)
    recipe = json.loads({p.key: p.value for p in res.model.metadata_props}["onnxq.recipe"])
    assert any(o.get("name") == PLANTED for o in recipe["override"])


def test_int16_level_widens_the_layer_inputs(outlier: tuple[Path, Path]) -> None:
    model, data = outlier
    fm = onnx.load(model)
    calib = CalibrationOptions(str(data))
    base = quantize_model(fm, preset("w8a8"), calibration=calib)
    # the planted layer and the bias Add in front of it (whose input carries the outlier too) at int16
    wide = quantize_model(fm, with_levels(preset("w8a8"), {PLANTED: "int16", "fc3_bias": "int16"}), calibration=calib,
                          calibration_session=base.calibration)  # fmt: skip
    reader = next(n for n in wide.model.graph.node if n.name == PLANTED)
    dq = next(n for n in wide.model.graph.node if n.output and n.output[0] == reader.input[0])
    assert dq.op_type == "DequantizeLinear"
    zp = next(i for i in wide.model.graph.initializer if i.name == dq.input[2])
    assert zp.data_type == onnx.TensorProto.INT16
    x = np.load(data)
    assert _output_sqnr(fm, wide.model, x) > _output_sqnr(fm, base.model, x) + 10


def test_budget_already_met_changes_nothing(outlier: tuple[Path, Path]) -> None:
    model, data = outlier
    res = quantize_model(onnx.load(model), preset("w8a8"), calibration=CalibrationOptions(str(data)),
                         budget=AccuracyBudget.parse("sqnr=1"))  # fmt: skip
    mp = res.report.info["mixed_precision"]
    assert mp["met"] and mp["levels"] == {} and mp["ranking"] == [] and "already meets" in mp["notes"][0]


def test_budget_refused_for_weight_only(outlier: tuple[Path, Path]) -> None:
    model, data = outlier
    with pytest.raises(OnnxqError, match="int8 recipes"):
        quantize_model(onnx.load(model), preset("w4-rtn"), calibration=CalibrationOptions(str(data)),
                       budget=AccuracyBudget.parse("sqnr=30"))  # fmt: skip


def test_agreement_needs_a_classifier(tmp_path: Path) -> None:
    h = onnx.helper
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32), "w")
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["m"], name="mm"), h.make_node("Relu", ["m"], ["y"], name="r")],
                     "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 8])], [w])  # fmt: skip
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    with pytest.raises(OnnxqError, match="classifier"):
        quantize_model(m, preset("w8a8"), calibration=CalibrationOptions("random:4"), budget=AccuracyBudget.parse("agreement=0.9"))


def test_cli_budget_report_and_netron_view(outlier: tuple[Path, Path], tmp_path: Path) -> None:
    """Acceptance 4: the output as Netron reads it (names, doc strings, metadata) and the report files."""
    model, data = outlier
    out, rep = tmp_path / "q.onnx", tmp_path / "report"
    r = CliRunner().invoke(main, ["quantize", str(model), "-o", str(out), "--calib", str(data), "--no-progress",
                                  "--accuracy-budget", "sqnr=30", "--report", str(rep)])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "accuracy budget" in r.stdout and "met" in r.stdout
    m = onnx.load(out)
    meta = {p.key: p.value for p in m.metadata_props}
    assert {"onnxq.version", "onnxq.recipe", "onnxq.input_sha256"} <= set(meta)
    names = {n.name for n in m.graph.node}
    assert len(names) == len(m.graph.node), "node names are unique"
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert qs
    for q in qs:
        assert q.name == f"{q.input[0]}/QuantizeLinear" or q.name.startswith(f"{q.input[0]}/QuantizeLinear")
        assert "calibration" in q.doc_string and "range [" in q.doc_string
    assert sum("measured SQNR" in q.doc_string for q in qs) >= len(qs) - 1
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized"):
            assert n.name.endswith("/DequantizeLinear") and "weight int8" in n.doc_string and "weight SQNR" in n.doc_string
    report = json.loads((rep / "report.json").read_text())
    assert report["info"]["mixed_precision"]["met"] and report["info"]["comparison"]["tensors"]
    assert report["info"]["histograms"] and all("range" in h for h in report["info"]["histograms"])
    html = (rep / "report.html").read_text()
    assert "Mixed precision" in html and PLANTED in html and "<html" in html


def test_report_without_calibration_data_says_why(tmp_path: Path, outlier: tuple[Path, Path]) -> None:
    model, _ = outlier
    rep = tmp_path / "r"
    quantize_file(model, tmp_path / "q.onnx", preset("int8-dynamic"), report_dir=rep)
    report = json.loads((rep / "report.json").read_text())
    assert "comparison" not in report["info"] and any("no accuracy comparison" in n for n in report["notes"])
    assert (rep / "report.html").is_file()


def test_eval_source_differs_from_calibration(outlier: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = outlier
    ev = tmp_path / "eval.npy"
    np.save(ev, np.random.default_rng(5).normal(size=(16, 64)).astype(np.float32))
    res = quantize_model(onnx.load(model), preset("w8a8"), calibration=CalibrationOptions(str(data)),
                         evaluation=CalibrationOptions(str(ev)), budget=AccuracyBudget.parse("sqnr=25"))  # fmt: skip
    assert res.report.info["evaluation"]["samples"] == 16
    assert str(ev) in res.report.info["evaluation"]["source"]
    _ = open_source  # the evaluation source is opened like a calibration source


def test_shared_input_gets_the_widest_reader_dtype() -> None:
    """One tensor read by an int8 layer and an int16 layer has one Q/DQ pair: the int16 one."""
    h = onnx.helper
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), n) for n in ("wa", "wb")]
    g = h.make_graph([h.make_node("MatMul", ["x", "wa"], ["a"], name="mm_a"), h.make_node("MatMul", ["x", "wb"], ["b"], name="mm_b"),
                      h.make_node("Add", ["a", "b"], ["y"], name="add")],
                     "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8])], inits)  # fmt: skip
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    for levels in ({"mm_a": "int16"}, {"mm_b": "int16"}):
        q = quantize_model(m, with_levels(preset("w8a8"), levels), calibration=CalibrationOptions("random:4")).model
        ql = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
        assert len(ql) == 1, "one pair on x, shared by both readers"
        zp = next(i for i in q.graph.initializer if i.name == ql[0].input[2])
        assert zp.data_type == onnx.TensorProto.INT16, levels


def test_agreement_measure_stops_early_when_out_of_reach(outlier: tuple[Path, Path]) -> None:
    from onnxq.mixed_precision import EvalSet

    model, data = outlier
    fm = onnx.load(model)
    plain = quantize_model(fm, preset("w8a8"), calibration=CalibrationOptions(str(data))).model
    ev = EvalSet(fm, open_source(str(data), fm))
    full = ev.measure(plain, "agreement")
    assert not ev.stopped_early and full < 0.9
    before = ev.forward_passes
    bound = ev.measure(plain, "agreement", floor=0.99)
    assert ev.stopped_early and full <= bound < 0.99
    assert ev.forward_passes - before < ev.samples
    assert ev.measure(fm, "agreement", floor=0.99) == 1.0 and not ev.stopped_early  # the float model itself
