"""onnxq batch: parallel workers, one failure does not stop the others, resumable, manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxq.cli import main

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits-cnn.onnx"
CALIB = REPO / "calibration_data" / "digits" / "calib.npz"


def _escaping_model(folder: Path) -> Path:
    """A model whose external data points outside its folder (../secret.data)."""
    model = onnx.load(DIGITS)
    t = model.graph.initializer[0]
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../secret.data"), ("offset", "0"), ("length", str(len(t.raw_data)))):
        t.external_data.add(key=k, value=v)
    (folder.parent / "secret.data").write_bytes(t.raw_data)
    t.ClearField("raw_data")
    path = folder / "escaping.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(DIGITS, models / "good_a.onnx")
    shutil.copy(DIGITS, models / "good_b.onnx")
    (models / "corrupt.onnx").write_bytes(DIGITS.read_bytes()[:2000])
    _escaping_model(models)
    return models


def _batch(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, ["batch", *args])
    return r.exit_code, r.stdout, r.stderr


def test_folder_batch_records_failures_and_resumes(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, _ = _batch(str(folder), "-o", str(out), "--calib", str(CALIB), "-j", "2", "--json")
    assert code == 1, "a failed model makes the exit code 1"
    outcomes = {o["name"]: o for o in json.loads(stdout)}
    assert outcomes["good_a"]["status"] == outcomes["good_b"]["status"] == "converted"
    assert outcomes["corrupt"]["status"] == "failed" and "corrupt" in outcomes["corrupt"]["reason"]
    assert outcomes["escaping"]["status"] == "failed"
    assert "'../secret.data'" in outcomes["escaping"]["reason"] and "outside the model's folder" in outcomes["escaping"]["reason"]
    for o in outcomes.values():
        assert "\n" not in o["reason"] and "Traceback" not in o["reason"]
    assert (out / "good_a.onnx").exists() and not (out / "corrupt.onnx").exists() and not (out / "escaping.onnx").exists()
    assert json.loads((out / "batch-summary.json").read_text())[0]["name"] == "corrupt"
    meta = {p.key: p.value for p in onnx.load(out / "good_a.onnx").metadata_props}
    assert "onnxq.batch_fingerprint" in meta

    code, stdout, _ = _batch(str(folder), "-o", str(out), "--calib", str(CALIB), "-j", "2", "--json")
    again = {o["name"]: o for o in json.loads(stdout)}
    assert again["good_a"]["status"] == again["good_b"]["status"] == "skipped", "second run does no work"
    assert code == 1

    code, stdout, _ = _batch(str(folder), "-o", str(out), "--calib", str(CALIB), "--calib-size", "8", "--preset", "w8a8", "--json")
    changed = {o["name"]: o for o in json.loads(stdout)}
    assert changed["good_a"]["status"] == "converted", "a different recipe is not up to date"


def test_manifest_with_per_model_settings(tmp_path: Path) -> None:
    shutil.copy(DIGITS, tmp_path / "digits.onnx")
    np.savez(tmp_path / "calib.npz", image=np.load(CALIB)["image"][:8])
    (tmp_path / "m.toml").write_text(
        '[defaults]\ncalib = "calib.npz"\n\n'
        '[[model]]\npath = "digits.onnx"\nname = "plain"\n\n'
        '[[model]]\npath = "digits.onnx"\nname = "no_gemm"\nexclude_op = ["Gemm"]\ncalib_size = 4\n\n'
        '[[model]]\npath = "digits.onnx"\nname = "random_calib"\ncalib = "random:2"\n'
    )
    out = tmp_path / "out"
    code, stdout, _ = _batch(str(tmp_path / "m.toml"), "-o", str(out), "-j", "2", "--json")
    assert code == 0, stdout
    assert {o["status"] for o in json.loads(stdout)} == {"converted"}
    gemm = next(n for n in onnx.load(out / "no_gemm.onnx").graph.node if n.op_type == "Gemm")
    assert not gemm.input[1].endswith("_dequantized"), "excluded op keeps its float weight"


@pytest.mark.parametrize(
    ("text", "message"),
    [('[[model]]\npath = "x.onnx"\nprest = "w8a8"\n', "unknown key 'prest'"),
     ("[[model]]\nname = 'x'\n", "has no path"),
     ('[setup]\nx = 1\n', "unknown key 'setup'"),
     ('[[model]]\npath = "a.onnx"\n[[model]]\npath = "b/a.onnx"\n', "output name 'a'")],  # fmt: skip
)
def test_manifest_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "m.toml").write_text(text)
    code, _, err = _batch(str(tmp_path / "m.toml"), "-o", str(tmp_path / "out"))
    assert code == 1 and message in " ".join(err.split())
