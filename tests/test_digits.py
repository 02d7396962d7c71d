"""End to end on a real trained model that ships with the repository: the digits CNN (models/digits.py).

The CLI quantizes ``models/digits-cnn.onnx`` with ``calibration_data/digits/calib.npz``; fp32 and int8
are then evaluated in ONNX Runtime on the 497 held-out digits in ``calibration_data/digits/test.npz``.
Not marked ``assets``: everything it needs is committed and small, so it runs everywhere in about a second.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnxq.cli import main

ROOT = Path(__file__).parent.parent
MODEL = ROOT / "models" / "digits-cnn.onnx"
CALIB = ROOT / "calibration_data" / "digits" / "calib.npz"
TEST = ROOT / "calibration_data" / "digits" / "test.npz"


def _predict(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(path.as_posix(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})[0].argmax(1)


@pytest.fixture(scope="module")
def test_set() -> tuple[np.ndarray, np.ndarray]:
    with np.load(TEST, allow_pickle=False) as d:
        return d["image"], d["label"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "digits.int8.onnx"
    result = CliRunner().invoke(main, ["quantize", str(MODEL), "-o", str(out), "--calib", str(CALIB), "--no-progress"])
    assert result.exit_code == 0, f"exit code {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert out.is_file()
    return out


def test_artefacts_match_their_description(test_set: tuple[np.ndarray, np.ndarray]) -> None:
    model = onnx.load(MODEL)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert inp.name == "image" and outp.name == "logits"
    with np.load(CALIB, allow_pickle=False) as d:
        assert list(d.keys()) == ["image"], "calib.npz must hold only the model's input (quantize reads it as such)"
        calib = d["image"]
    assert calib.shape == (64, 1, 8, 8) and calib.dtype == np.float32
    x, y = test_set
    assert x.shape == (497, 1, 8, 8) and x.dtype == np.float32 and y.shape == (497,)
    assert 0.0 <= x.min() and x.max() <= 1.0 and 0.0 <= calib.min() and calib.max() <= 1.0
    assert sorted(set(y.tolist())) == list(range(10))


def test_quantized_graph_ops(quantized: Path) -> None:
    model = onnx.load(quantized)
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] >= 1 and ops["DequantizeLinear"] >= 1, ops
    assert "Relu" not in ops, f"Relu should be absorbed into the Conv output's quantization: {ops}"
    assert ops["Conv"] == 1 and ops["Gemm"] == 1, ops
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            producer = next(n for n in model.graph.node if node.input[1] in n.output)
            assert producer.op_type == "DequantizeLinear", f"{node.name}'s weight is not behind a DequantizeLinear"
            assert inits[producer.input[0]].data_type == onnx.TensorProto.INT8, f"{node.name}'s weight is not int8"


def test_int8_accuracy_matches_fp32(quantized: Path, test_set: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = test_set
    fp32, int8 = _predict(MODEL, x), _predict(quantized, x)
    acc32, acc8, agree = float((fp32 == y).mean()), float((int8 == y).mean()), float((fp32 == int8).mean())
    summary = f"fp32 {acc32:.2%}, int8 {acc8:.2%}, top-1 agreement {agree:.2%} on {len(y)} test digits"
    assert acc32 >= 0.95, f"the fp32 model is worse than it was built: {summary}"
    assert acc8 >= acc32 - 0.01, summary
    assert agree >= 0.98, summary
