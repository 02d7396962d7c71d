"""The package face (onnxq/api.py): ``import onnxq; onnxq.quantize(...)``, ``onnxq.compare(...)``, ``onnxq.preset``,
``onnxq.Recipe``, exactly as the README's "Library use" shows them (its python block is run here), on the
digits CNN that ships with the repository. Oracles: ONNX Runtime's own argmax for top-1 agreement, the
CLI's output file byte for byte, and the source's sample count."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import onnxq
from onnxq.api import choose_recipe
from onnxq.cli import main
from onnxq.errors import CalibrationError, OnnxqError, RecipeError
from onnxq.quantization import CalibrationOptions

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits-cnn.onnx"
CALIB = ROOT / "calibration_data" / "digits" / "calib.npz"


def _readme_python_block() -> str:
    """The one ```python block of the README's "Library use" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Library use\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Library use' section"
    blocks = re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)
    assert len(blocks) == 1, f"expected one python block in Library use, found {len(blocks)}"
    return str(blocks[0])


def _top1(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    sess = ort.InferenceSession(path.as_posix(), providers=["CPUExecutionProvider"])
    return np.array([sess.run(None, f)[0].argmax() for f in feeds])


def test_readme_library_use_runs_as_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    # the block's paths are relative to the repository root: give it one whose outputs land in tmp_path
    for folder in ("models", "calibration_data"):
        (tmp_path / folder).symlink_to(ROOT / folder, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(compile(_readme_python_block(), "README.md (Library use)", "exec"), scope)  # noqa: S102

    out = tmp_path / "digits.int8.onnx"
    result, comparison, in_memory, feeds = scope["result"], scope["comparison"], scope["in_memory"], scope["feeds"]
    assert isinstance(result, onnxq.QuantizeResult) and result.files == [out]
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(out).graph.node}
    assert result.report.to_dict()["info"]["target"]["profile"] in capsys.readouterr().out
    # compare's top-1 agreement is the share of the 100 digits on which ORT's argmax of both models agrees
    assert isinstance(comparison, onnxq.Comparison) and comparison.samples == 100
    agreement = float(np.mean(_top1(MODEL, feeds) == _top1(out, feeds)))
    assert comparison.top1_agreement == pytest.approx(agreement) and agreement >= 0.95
    # the recipe changed in code quantized only the Conv, and the in-memory run wrote nothing
    model = in_memory.model
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert {n.op_type for n in model.graph.node if dq_outputs & set(n.input)} == {"Conv"}
    assert in_memory.files == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "calibration_data", "digits.int8.onnx", "models"]


def test_the_face_writes_the_same_file_as_the_cli(tmp_path: Path) -> None:
    cli_out, face_out = tmp_path / "cli.onnx", tmp_path / "face.onnx"
    run = CliRunner().invoke(main, ["quantize", str(MODEL), "-o", str(cli_out), "--calib", str(CALIB),
                                    "--calib-size", "32", "--no-progress"])  # fmt: skip
    assert run.exit_code == 0, run.output
    result = onnxq.quantize(MODEL, face_out, calib=CALIB, calib_size=32)
    assert face_out.read_bytes() == cli_out.read_bytes()
    assert result.report.info["calibration"]["samples"] == 32 and result.recipe is not None
    assert result.recipe.name == "w8a8"


def test_in_memory_from_a_model_proto_with_calibration_settings() -> None:
    proto = onnx.load(MODEL)
    before = proto.SerializeToString()
    result = onnxq.quantize(proto, preset="w8a8", calib=str(CALIB), calib_size=16, seed=3)
    assert proto.SerializeToString() == before  # the caller's model is not modified
    assert result.files == [] and result.report.info["calibration"]["samples"] == 16
    assert "QuantizeLinear" in {n.op_type for n in result.model.graph.node}


def test_recipe_forms_name_the_same_recipe(tmp_path: Path) -> None:
    expected = onnxq.preset("w8a8")
    expected = expected.with_(calibration=dataclasses.replace(expected.calibration, method="minmax"))
    toml = tmp_path / "r.toml"
    toml.write_text('preset = "w8a8"\n[calibration]\nmethod = "minmax"\n', encoding="utf-8")
    assert choose_recipe(recipe={"preset": "w8a8", "calibration": {"method": "minmax"}}) == expected
    assert choose_recipe(recipe=toml) == expected == onnxq.load_recipe(toml)
    assert choose_recipe(recipe=expected) is expected
    assert choose_recipe() == onnxq.preset("w8a8") and choose_recipe("w4-rtn") == onnxq.preset("w4-rtn")
    assert isinstance(expected, onnxq.Recipe)


def test_compare_takes_a_source_spec_or_feeds_and_a_sample_count(tmp_path: Path) -> None:
    quant = onnxq.quantize(MODEL, calib=CALIB).model
    spec = onnxq.compare(MODEL, quant, CALIB, samples=10, latency=False, tensors=False)
    assert spec.samples == 10 and spec.tensors == [] and "latency_ms" not in spec.models["quant"]
    with np.load(CALIB) as d:
        feeds = [{"image": x[None]} for x in d["image"]]
    assert onnxq.compare(onnx.load(MODEL), quant, feeds, samples=5, latency=False).samples == 5
    full = onnxq.compare(MODEL, quant, iter(feeds), latency=False)
    assert full.samples == len(feeds) == 64 and full.tensors and full.models["float"]["bytes"] == MODEL.stat().st_size


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda out: onnxq.quantize(MODEL, out, preset="w8a8", recipe=onnxq.preset("w8a8")), RecipeError,
     "either preset='w8a8' or recipe"),
    (lambda out: onnxq.quantize(onnx.load(MODEL), out, calib=CALIB), OnnxqError, "needs the float model's path"),
    (lambda out: onnxq.quantize(MODEL, calib=CALIB, report_dir=out.parent / "report"), OnnxqError,
     "need output_path"),
    (lambda out: onnxq.quantize(MODEL, out, calib=CALIB, preprocessing="torch"), CalibrationError,
     "unknown calibration setting 'preprocessing'; valid: preprocess, resize"),
    (lambda out: onnxq.quantize(MODEL, out, preset="w4-rtn", preprocess="torch"), CalibrationError,
     "preprocess only apply to reading a source spec (a path or 'random'): no calib is given"),
    (lambda out: onnxq.quantize(MODEL, out, calib=CalibrationOptions(str(CALIB)), seed=1), CalibrationError,
     "calib is a CalibrationOptions: put them in it"),
    (lambda out: onnxq.quantize(MODEL, out, preset="w8a8"), CalibrationError, "needs calibration data"),
    (lambda out: onnxq.quantize(MODEL, out, preset="no-such"), RecipeError, "unknown preset 'no-such'"),
    (lambda out: onnxq.compare(MODEL, MODEL, CALIB, samples=0), CalibrationError, "samples=0"),
    (lambda out: onnxq.compare(MODEL, MODEL, [], resize=8), CalibrationError, "data is feed dicts, used as they are"),
])  # fmt: skip
def test_refusals_are_one_line_errors_and_write_nothing(tmp_path: Path, call: object, error: type[Exception],
                                                        message: str) -> None:  # fmt: skip
    with pytest.raises(error, match=re.escape(message)) as info:
        call(tmp_path / "out.onnx")  # type: ignore[operator]
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []


def test_import_onnxq_stays_light() -> None:
    """The CLI imports onnxq before every command: the face is imported on first use, not with the package."""
    code = ("import sys, onnxq\n"
            "print(sorted(m for m in ('numpy', 'onnx', 'onnxruntime', 'onnxq.api', 'onnxq.quantization') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                         check=False)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr[-2000:]


def test_onnxq_quantize_is_the_function_whatever_was_imported_first() -> None:
    """The library's run module is ``onnxq.quantization``: importing it (as the CLI and batch do) leaves the
    package face's ``onnxq.quantize`` the function, with no module of the same name to shadow it."""
    import onnxq.quantization as oq
    from onnxq.api import quantize

    assert onnxq.quantize is quantize and onnxq.quantize is not oq
    assert importlib.util.find_spec("onnxq.quantize") is None
    with pytest.raises(RecipeError, match="give either preset='w8a8' or recipe"):
        onnxq.quantize(MODEL, preset="w8a8", recipe="r.toml")


def test_all_names_resolve_and_are_listed() -> None:
    assert sorted(onnxq.__all__) == sorted(["__version__", *onnxq._FACE])  # the lazy table lists them all
    for name in onnxq.__all__:
        assert getattr(onnxq, name) is not None, name
        assert name in dir(onnxq)
    assert {"quantize", "compare", "preset", "Recipe", "load_recipe", "OnnxqError"} <= set(onnxq.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'quantise'"):
        onnxq.quantise  # noqa: B018


def test_calibration_rules_live_in_the_library(tmp_path: Path) -> None:
    """The LLM window default and the needs-calibration checks are library functions (the CLI calls them)."""
    from onnxq.api import calibration_defaults, check_calibration_given

    text = CalibrationOptions(source=str(tmp_path / "wiki.txt"), tokenizer="tok.json")
    assert calibration_defaults(onnxq.preset("w4-rtn"), text).seq_len == 512  # windows of running text
    assert calibration_defaults(onnxq.preset("w4-rtn"), dataclasses.replace(text, max_length=64)).seq_len is None
    assert calibration_defaults(onnxq.preset("w8a8"), text).seq_len is None  # not weight-only: one line per sample
    assert calibration_defaults(onnxq.preset("w4-rtn"), CalibrationOptions(source="tokens.json")).seq_len is None
    with pytest.raises(CalibrationError, match="runs GPTQ, which needs calibration text"):
        check_calibration_given(onnxq.preset("w4-gptq"), CalibrationOptions(), calib_cache="stats.json")
    with pytest.raises(CalibrationError, match="is static quantization and needs --calib"):
        check_calibration_given(onnxq.preset("w8a8"), None)
    check_calibration_given(onnxq.preset("w8a8"), CalibrationOptions(), calib_cache="stats.json")  # ranges cached
    check_calibration_given(onnxq.preset("w4-rtn"), None)  # data-free


def test_both_preset_and_recipe_is_a_conflict_error() -> None:
    """The CLI turns exactly this error (and no other RecipeError) into its usage error, exit 2."""
    from onnxq.errors import RecipeConflictError

    with pytest.raises(RecipeConflictError, match="not both"):
        choose_recipe("w8a8", onnxq.preset("w8a8"))
    code = CliRunner().invoke(main, ["quantize", str(MODEL), "-o", "x.onnx", "--preset", "w8a8", "--recipe", "r.toml"]).exit_code
    assert code == 2
