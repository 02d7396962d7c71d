"""The CLI as a user meets it: happy paths, and bad input that must give one line, exit 1, no output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import run_cli


def _tiny_model(path: Path) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, input 'x' [N, 3, 8, 8]."""
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
        "fc_w": rng.normal(size=(5, 4)).astype(np.float32),
        "fc_b": rng.normal(size=(5,)).astype(np.float32),
    }
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["c"], ["r"], name="relu"),
        onnx.helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        onnx.helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        onnx.helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = onnx.helper.make_graph(
        nodes, "tiny",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5])],
        [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return _tiny_model(tmp_path / "tiny.onnx")


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1, f"exit code {code}, stderr: {err}"
    text = " ".join(err.split())
    assert text.startswith("error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


def test_quantize_tiny_model_random_calibration(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "tiny.int8.onnx"
    code, stdout, err = run_cli("quantize", str(tiny), "-o", str(out), "--calib", "random:4", "--no-progress",
                             "--report", str(tmp_path / "rep"), "--checked")  # fmt: skip
    assert code == 0, err
    assert out.exists() and "wrote" in stdout and "target profile" in stdout
    model = onnx.load(out)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "Relu" not in ops
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["onnxq.recipe"])["name"] == "w8a8" and "onnxq.input_sha256" in meta
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["info"]["target"]["profile"] and report["steps"][-1]["name"] == "insert_qdq"


def test_quantize_json_and_recipe_file(tiny: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('preset = "w8a8"\n[calibration]\nmethod = "minmax"\n[exclude]\nop_types = ["Gemm"]\n')
    code, stdout, err = run_cli("quantize", str(tiny), "-o", str(tmp_path / "o.onnx"), "--recipe", str(recipe),
                             "--calib", "random:2", "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    counts = next(s["counts"] for s in report["steps"] if s["name"] == "insert_qdq")
    assert counts["nodes_excluded"] == 1


def test_presets_and_inspect(tiny: Path) -> None:
    code, stdout, _ = run_cli("presets")
    assert code == 0 and "w8a8" in stdout
    code, stdout, err = run_cli("inspect", str(tiny))
    assert code == 0, err
    assert "Conv" in stdout and "quantized compute" in stdout


def test_help_explains() -> None:
    code, stdout, _ = run_cli("quantize", "--help")
    assert code == 0
    for flag in ("--calib", "--calib-preprocess", "--calib-size", "--preset", "--target", "--device"):
        assert flag in stdout


# ---- acceptance 4: bad input gets one clear line, a non-zero exit, and no output file ----


def test_missing_model(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    code, _, err = run_cli("quantize", str(tmp_path / "nope.onnx"), "-o", str(out), "--calib", "random")
    _assert_one_line_error(code, err, "not found", "nope.onnx")
    assert not out.exists()


def test_not_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "photo.onnx"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is a jpeg, not a model" * 20)
    out = tmp_path / "o.onnx"
    code, _, err = run_cli("quantize", str(bad), "-o", str(out), "--calib", "random")
    _assert_one_line_error(code, err, "photo.onnx")
    assert not out.exists()


def test_truncated_onnx(tiny: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    out = tmp_path / "o.onnx"
    code, _, err = run_cli("quantize", str(cut), "-o", str(out), "--calib", "random")
    _assert_one_line_error(code, err, "cut.onnx")
    assert not out.exists() and not list(tmp_path.glob("o.onnx*"))


def test_empty_calibration_folder(tiny: Path, tmp_path: Path) -> None:
    empty = tmp_path / "calib"
    empty.mkdir()
    out = tmp_path / "o.onnx"
    code, _, err = run_cli("quantize", str(tiny), "-o", str(out), "--calib", str(empty))
    _assert_one_line_error(code, err, "calib")
    assert not out.exists()


def test_calibration_arrays_with_wrong_name(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "s0.npz", image=np.zeros((1, 3, 8, 8), np.float32), extra=np.zeros(3, np.float32))
    out = tmp_path / "o.onnx"
    code, _, err = run_cli("quantize", str(tiny), "-o", str(out), "--calib", str(folder))
    _assert_one_line_error(code, err, "'x'")
    assert not out.exists()


def test_calibration_arrays_with_wrong_shape(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "s0.npz", x=np.zeros((1, 3, 16, 16), np.float32))
    out = tmp_path / "o.onnx"
    code, _, err = run_cli("quantize", str(tiny), "-o", str(out), "--calib", str(folder))
    _assert_one_line_error(code, err, "shape", "'x'")
    assert not out.exists()


def test_unknown_preset(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    code, _, err = run_cli("quantize", str(tiny), "-o", str(out), "--preset", "w3a3", "--calib", "random")
    _assert_one_line_error(code, err, "unknown preset 'w3a3'", "w8a8")
    assert not out.exists()


def test_recipe_with_unknown_key(tiny: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[weights]\ngranularty = "per-tensor"\n')
    out = tmp_path / "o.onnx"
    code, _, err = run_cli("quantize", str(tiny), "-o", str(out), "--recipe", str(recipe), "--calib", "random")
    _assert_one_line_error(code, err, "unknown key 'granularty'", "granularity")
    assert not out.exists()


def test_refuses_to_overwrite_input(tiny: Path) -> None:
    before = tiny.read_bytes()
    code, _, err = run_cli("quantize", str(tiny), "-o", str(tiny), "--calib", "random:2", "--no-progress")
    _assert_one_line_error(code, err, "tiny.onnx")
    assert tiny.read_bytes() == before


def test_static_preset_without_calibration(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    code, _, err = run_cli("quantize", str(tiny), "-o", str(out))
    _assert_one_line_error(code, err, "--calib")
    assert not out.exists()


def test_usage_error_exit_code_2(tiny: Path) -> None:
    code, _, _ = run_cli("quantize", str(tiny))
    assert code == 2


def test_calibrate_then_quantize_from_cache(tiny: Path, tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    code, stdout, err = run_cli("calibrate", str(tiny), "--calib", "random:3", "-o", str(stats), "--no-progress")
    assert code == 0, err
    cache = json.loads(stats.read_text())
    assert cache["format"] == "onnxq-calibration-cache" and cache["ranges"]
    direct, cached = tmp_path / "direct.onnx", tmp_path / "cached.onnx"
    assert run_cli("quantize", str(tiny), "-o", str(direct), "--calib", "random:3", "--no-progress")[0] == 0
    code, stdout, err = run_cli("quantize", str(tiny), "-o", str(cached), "--calib-cache", str(stats), "--no-progress")
    assert code == 0, err
    init = lambda p: {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in onnx.load(p).graph.initializer}  # noqa: E731
    assert init(direct) == init(cached), "the cache must reproduce the direct run's parameters exactly"


def test_calibration_cache_refused_for_other_model_or_settings(tiny: Path, tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    assert run_cli("calibrate", str(tiny), "--calib", "random:2", "-o", str(stats), "--no-progress")[0] == 0
    code, _, err = run_cli("quantize", str(tiny), "-o", str(tmp_path / "a.onnx"), "--calib-cache", str(stats), "--calibrator", "minmax")
    _assert_one_line_error(code, err, "different settings", "method")
    other = tmp_path / "other.onnx"
    model = onnx.load(tiny)
    model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))
    onnx.save(model, other)
    code, _, err = run_cli("quantize", str(other), "-o", str(tmp_path / "b.onnx"), "--calib-cache", str(stats))
    _assert_one_line_error(code, err, "different model")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_summary_counts_come_from_what_the_passes_declare() -> None:
    """The done: line sums each pass's declared counts in pipeline order, skipping zeros and internal counts."""
    from onnxq.cli import _reported_counts
    from onnxq.report import Report

    report = Report()
    report.add_step("constant_folding", 0.0, True, {"nodes_folded": 3}, [])
    report.add_step("insert_qdq", 0.0, True, {"qdq_pairs": 4, "nodes_excluded": 0, "shared_weights": 2, "nodes_quantized": 5}, [])
    report.add_step("qoperator", 0.0, True, {"activations_absorbed": 1, "nodes_lowered": 4}, [])
    report.add_step("shape_inference", 0.0, False, {"tensors_updated": 9}, [])
    counts = _reported_counts(report)
    assert list(counts.items()) == [("nodes_folded", 3), ("nodes_quantized", 5), ("qdq_pairs", 4), ("activations_absorbed", 1)]
