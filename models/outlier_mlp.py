"""A small MLP with a planted activation outlier channel, on which plain w8a8 collapses.

Six fully connected layers (``fc1`` .. ``fc6``, MatMul + Add + Relu, 64 wide, 10 logits out) with
random He-initialised weights. Channel 0 of ``fc3``'s output is scaled up ``OUTLIER`` times (its weight
column and bias multiplied) and ``fc4``'s matching weight row divided by the same factor, so the float
function is unchanged while the input of ``fc4`` has one channel ~300x larger than the rest: a
per-tensor int8 scale for that tensor leaves the other 63 channels a handful of levels. The layer whose
quantization breaks the model is therefore ``fc4`` (its input Q/DQ), which the mixed-precision ranking
must name first. Used by tests/test_mixed_precision.py and benchmarks/bench_mixed_precision.py.

Usage: python models/outlier_mlp.py OUT_DIR   (writes model.onnx and calib.npy)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build", "make_model", "OUTLIER", "PLANTED"]

OUTLIER = 300.0
PLANTED = "fc4"
WIDTH = 64


def make_model(seed: int = 0) -> onnx.ModelProto:
    """The planted-outlier MLP (see the module docstring)."""
    rng = np.random.default_rng(seed)
    dims = [WIDTH] * 6 + [10]
    weights = [rng.normal(0, np.sqrt(2.0 / dims[i]), (dims[i], dims[i + 1])).astype(np.float32) for i in range(6)]
    biases = [rng.normal(0, 0.05, dims[i + 1]).astype(np.float32) for i in range(6)]
    biases[2][0] = abs(biases[2][0]) + 0.5  # channel 0 of fc3 is active for every input
    weights[2][:, 0] *= OUTLIER
    biases[2][0] *= OUTLIER
    weights[3][0, :] /= OUTLIER
    nodes, inits = [], []
    x = "input"
    for i in range(6):
        name = f"fc{i + 1}"
        inits += [numpy_helper.from_array(weights[i], f"{name}.weight"), numpy_helper.from_array(biases[i], f"{name}.bias")]
        nodes.append(helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}_mm"], name=name))
        nodes.append(helper.make_node("Add", [f"{name}_mm", f"{name}.bias"], [f"{name}_out"], name=f"{name}_bias"))
        x = f"{name}_out"
        if i < 5:
            nodes.append(helper.make_node("Relu", [x], [f"{name}_relu"], name=f"{name}_relu"))
            x = f"{name}_relu"
    nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
    graph = helper.make_graph(nodes, "outlier_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", WIDTH])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxq-models")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def build(out_dir: str | Path, *, samples: int = 64, seed: int = 0) -> tuple[Path, Path, str]:
    """Write ``model.onnx`` and ``calib.npy`` (``samples`` x 64 normal inputs) into ``out_dir``.

    Returns (model path, calibration data path, name of the planted layer).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(make_model(seed), out / "model.onnx")
    x = np.random.default_rng(seed + 1).normal(0, 1, (samples, WIDTH)).astype(np.float32)
    np.save(out / "calib.npy", x)
    return out / "model.onnx", out / "calib.npy", PLANTED


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    print(build(sys.argv[1]))
