"""End-to-end w8a8 on the real models: MNIST, MobileNetV2, SqueezeNet and the float16 SqueezeNet.

Calibration and evaluation use different images. The thresholds are floors for small, fast subsets
(the full 500-image figures are in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import asset

from onnxq.calibration.sources import load_image
from onnxq.quantization import CalibrationOptions, quantize_file
from onnxq.recipe import preset

pytestmark = pytest.mark.assets


def _predict(model: str | Path | bytes, name: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model) if isinstance(model, Path) else model, providers=["CPUExecutionProvider"])
    batch = sess.get_inputs()[0].shape[0]
    step = 1 if isinstance(batch, int) else 25
    outs = [sess.run(None, {name: x[i : i + step]})[0] for i in range(0, len(x), step)]
    return np.concatenate(outs).reshape(len(x), -1).argmax(1)


def _eval_images(assets: Path, n: int, preprocess: str, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """n images spread over the 500, offset from the calibration picks (every 5th, starting at 2)."""
    rows = list(csv.DictReader(open(asset(assets, "imagenet/labels.csv"))))[2::5][:n]
    x = np.concatenate([load_image(assets / "imagenet" / r["file"], preprocess=preprocess, dtype=dtype) for r in rows])
    return x, np.array([int(r["label"]) for r in rows])


def _quantize(assets: Path, rel: str, out: Path, preprocess: str, samples: int = 32) -> None:
    recipe = preset("w8a8")
    recipe = recipe.with_(calibration=recipe.calibration.__class__(**{**recipe.calibration.__dict__, "samples": samples}))
    opts = CalibrationOptions(str(asset(assets, "imagenet")), preprocess=preprocess)
    quantize_file(asset(assets, rel), out, recipe, calibration=opts, checked=True)


def test_mnist(assets: Path, tmp_path: Path) -> None:
    data = np.load(asset(assets, "mnist/t10k-first5000.npz"))
    images, labels = data["images"].astype(np.float32)[:, None], data["labels"]
    np.savez(tmp_path / "calib.npz", Input3=images[:200])
    out = tmp_path / "mnist.int8.onnx"
    recipe = preset("w8a8").with_(calibration=preset("w8a8").calibration.__class__(samples=64))
    quantize_file(asset(assets, "mnist/model.onnx"), out, recipe, calibration=CalibrationOptions(str(tmp_path / "calib.npz")), checked=True)
    x, y = images[1000:2000], labels[1000:2000]
    fp = _predict(asset(assets, "mnist/model.onnx"), "Input3", x)
    q = _predict(out, "Input3", x)
    assert np.mean(q == y) >= np.mean(fp == y) - 0.01, f"int8 {np.mean(q == y):.3f} vs fp32 {np.mean(fp == y):.3f}"
    assert np.mean(q == fp) >= 0.98
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "Relu" not in ops


@pytest.mark.parametrize(
    ("rel", "floor"),
    [("cnn/mobilenetv2-7/model.onnx", 0.90), ("cnn/squeezenet1.1/model.onnx", 0.85)],
)
def test_fp32_cnn(assets: Path, tmp_path: Path, rel: str, floor: float) -> None:
    out = tmp_path / "q.onnx"
    _quantize(assets, rel, out, "torch")
    name = onnx.load(asset(assets, rel), load_external_data=False).graph.input[0].name
    x, _ = _eval_images(assets, 100, "torch")
    agree = np.mean(_predict(asset(assets, rel), name, x) == _predict(out, name, x))
    assert agree >= floor, f"top-1 agreement {agree:.3f} < {floor}"
    assert out.stat().st_size <= 0.30 * asset(assets, rel).stat().st_size


def test_fp16_squeezenet_quantizes_directly(assets: Path, tmp_path: Path) -> None:
    rel = "cnn/squeezenet1.1-fp16/model.onnx"
    out = tmp_path / "q.onnx"
    _quantize(assets, rel, out, "caffe_bgr")
    q = onnx.load(out)
    assert q.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert q.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    x, _ = _eval_images(assets, 100, "caffe_bgr", np.float16)
    agree = np.mean(_predict(asset(assets, rel), "data_0", x) == _predict(out, "data_0", x))
    assert agree >= 0.85, f"top-1 agreement {agree:.3f}"
