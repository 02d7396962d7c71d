"""Folders in, folders out: ``onnxq quantize GENAI_DIR -o OUT_DIR`` quantizes the decoder genai_config.json names
into OUT_DIR under the same name and copies the tokenizer and config files beside it, not the float data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import run_cli
from onnxq.errors import OnnxqError
from llm_graphs import builder_llm, run_decode, run_prefill, session, token_ids


def _genai_folder(root: Path) -> Path:
    folder = root / "genai-fp32"
    folder.mkdir()
    onnx.save(builder_llm(), folder / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_a_genai_folder_is_quantized_into_a_runnable_folder(tmp_path: Path) -> None:
    src, out = _genai_folder(tmp_path), tmp_path / "genai-int4"
    code, stdout, stderr = run_cli("quantize", str(src), "-o", str(out), "--preset", "w4-rtn", "--block-size", "32", "--no-progress")
    assert code == 0, stderr or stdout
    assert sorted(p.name for p in out.iterdir()) == ["genai_config.json", "model.onnx", "tokenizer.json"]
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(out / "model.onnx").graph.node)
    sess = session(str(out / "model.onnx"))
    ids = token_ids(8)
    np.testing.assert_allclose(run_decode(sess, ids, 16), run_prefill(sess, ids, 16)[0][0, -1], atol=1e-3)


def test_a_folder_output_must_be_new_or_empty(tmp_path: Path) -> None:
    src, out = _genai_folder(tmp_path), tmp_path / "taken"
    out.mkdir()
    (out / "x.txt").write_text("x")
    code, _, stderr = run_cli("quantize", str(src), "-o", str(out), "--preset", "w4-rtn", "--no-progress")
    assert code == 1 and "must be a new or empty folder" in stderr


def test_a_folder_cannot_be_quantized_into_itself_or_into_a_file_name(tmp_path: Path) -> None:
    src = _genai_folder(tmp_path)
    code, _, stderr = run_cli("quantize", str(src), "-o", str(src), "--preset", "w4-rtn", "--no-progress")
    assert code == 1 and "is the input model folder itself" in stderr
    code, _, stderr = run_cli("quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--preset", "w4-rtn", "--no-progress")
    assert code == 1 and "names a model file" in stderr and "model.onnx to write that one file" in " ".join(stderr.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genai-fp32"], "nothing was created"


def test_a_failed_folder_run_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxq.quantization as quantization

    def fail(*args: object, **kwargs: object) -> None:
        raise OnnxqError("a failure after the output folder was made")

    monkeypatch.setattr(quantization, "quantize_model", fail)
    src, out = _genai_folder(tmp_path), tmp_path / "deep" / "genai-int4"
    code, _, stderr = run_cli("quantize", str(src), "-o", str(out), "--preset", "w4-rtn", "--no-progress")
    assert code == 1 and "a failure after the output folder was made" in stderr
    assert not out.exists()


def test_the_summary_names_the_model_file_and_the_copies(tmp_path: Path) -> None:
    src, out = _genai_folder(tmp_path), tmp_path / "genai-int4"
    code, stdout, stderr = run_cli("quantize", str(src), "-o", str(out), "--preset", "w4-rtn", "--no-progress")
    assert code == 0, stderr
    text = "".join(stdout.split())  # rich wraps long lines anywhere
    assert f"wrote{out / 'model.onnx'}(" in text
    assert "copiedbesideitfromtheinputfolder:genai_config.json,tokenizer.json" in text
