"""qoperator: QDQ node units lowered to QLinear* / *Integer ops: op types left, ORT numerics (the lowered
model within one output quantization step of the QDQ model run without fusion), full checker, and the
units it must leave alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from conftest import asset
from helpers import full_check, make_ctx, make_model, run_ort

from onnxq.cli import main
from onnxq.errors import PassError
from onnxq.model import to_model
from onnxq.passes import PASSES, QOperatorPass
from onnxq.pipeline import Pipeline

DATA = Path(__file__).resolve().parent / "data"
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _reseed() -> None:
    RNG.bit_generator.state = np.random.default_rng(0).bit_generator.state


class QDQ:
    """Builds a small QDQ model: float input(s), Q/DQ pairs, int8 weights behind DQ, float ops."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.inputs: list[onnx.ValueInfoProto] = []

    def input(self, name: str, shape: list[int], *, batch: bool = True) -> str:
        """A float graph input; with ``batch`` its first dimension is symbolic ("N")."""
        dims: list[int | str] = ["N", *shape[1:]] if batch else list(shape)
        self.inputs.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
        return name

    def const(self, name: str, value: Any) -> str:
        self.inits[name] = np.asarray(value)
        return name

    def qdq(self, x: str, scale: float, zp: int = 0, dtype: Any = np.uint8) -> str:
        """x -> QuantizeLinear -> DequantizeLinear; returns the dequantized tensor."""
        s, z = self.const(f"{x}_s", np.float32(scale)), self.const(f"{x}_z", np.asarray(zp, dtype))
        self.node("QuantizeLinear", [x, s, z], f"{x}_q")
        return self.node("DequantizeLinear", [f"{x}_q", s, z], f"{x}_dq")

    def weight(self, name: str, codes: np.ndarray, scale: Any, zp: Any = 0, axis: int | None = None) -> str:
        """Integer initializer -> DequantizeLinear (per tensor, or per channel along ``axis``)."""
        scale = np.asarray(scale, np.float32)
        zp = np.broadcast_to(np.asarray(zp), scale.shape).astype(codes.dtype)
        self.const(f"{name}_codes", codes)
        attrs = {"axis": axis} if axis is not None else {}
        return self.node("DequantizeLinear", [f"{name}_codes", self.const(f"{name}_s", scale), self.const(f"{name}_z", zp)],
                         f"{name}_dq", **attrs)  # fmt: skip

    def node(self, op: str, inputs: list[str], out: str, domain: str = "", **attrs: Any) -> str:
        self.nodes.append(onnx.helper.make_node(op, inputs, [out], name=f"{out}_node", domain=domain, **attrs))
        return out

    def model(self, outputs: list[str], opset: int = 13) -> onnx.ModelProto:
        outs = [onnx.helper.make_empty_tensor_value_info(o) for o in outputs]
        return make_model(self.nodes, self.inputs, outs, self.inits, opset, infer_shapes=True)


def _codes(shape: tuple[int, ...], lo: int = -60, hi: int = 60, dtype: Any = np.int8) -> np.ndarray:
    return RNG.integers(lo, hi + 1, shape).astype(dtype)


def _lower(model: onnx.ModelProto, target: str = "x86-avx2", **expect: int) -> tuple[onnx.ModelProto, Any]:
    """Run shape inference + qoperator (checked: onnx.checker + ORT load after each pass)."""
    ctx = make_ctx(target)
    graph = gs.import_onnx(model)
    graph = Pipeline([PASSES["shape_inference"](), QOperatorPass()], checked=True).run(graph, ctx)
    result = ctx.report.steps[-1]
    out = to_model(graph, template=model)
    full_check(out)
    for key, value in expect.items():
        assert result.counts.get(key, 0) == value, (key, result.counts, result.notes)
    return out, result


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def _feeds(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value or batch for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = RNG.normal(size=shape).astype(np.float32)
    return feeds


def assert_within_steps(qdq: onnx.ModelProto, lowered: onnx.ModelProto, step: float, steps: float = 1.0, feeds: Any = None) -> None:
    """Every output of ``lowered`` within ``steps`` output quantization steps of ``qdq`` (ORT, no fusion)."""
    feeds = feeds or _feeds(qdq)
    for ref, out in zip(run_ort(qdq, feeds), run_ort(lowered, feeds)):
        worst = float(np.abs(ref.astype(np.float64) - out).max()) / step
        assert worst <= steps * (1 + 1e-5), f"lowered output differs by {worst:.3f} steps (allowed {steps})"


# ---- one unit per op type ------------------------------------------------------------------------


def test_conv_per_channel_with_int32_bias_and_absorbed_relu() -> None:
    b = QDQ()
    x = b.qdq(b.input("x", [2, 3, 8, 8]), 0.02, 128)
    w_s = RNG.uniform(0.005, 0.01, 8)
    w = b.weight("w", _codes((8, 3, 3, 3)), w_s, axis=0)
    bias = b.weight("b", RNG.integers(-500, 500, 8).astype(np.int32), np.float32(0.02) * w_s.astype(np.float32), axis=0)
    b.node("Conv", [x, w, bias], "c", pads=[1, 1, 1, 1])
    b.node("Relu", ["c"], "r")
    y = b.qdq("r", 0.01, 0)
    qdq = b.model([y])
    out, res = _lower(qdq, nodes_lowered=1, activations_absorbed=1, **{"Conv->QLinearConv": 1})
    assert _ops(out) == {"QuantizeLinear", "QLinearConv", "DequantizeLinear"}
    conv = next(n for n in out.graph.node if n.op_type == "QLinearConv")
    assert conv.name == "c_node" and len(conv.input) == 9
    bias_init = next(i for i in out.graph.initializer if i.name == conv.input[8])
    assert bias_init.data_type == onnx.TensorProto.INT32  # the int32 bias is used as it is
    assert_within_steps(qdq, out, 0.01)


def test_conv_per_tensor_uint8_weights_and_float_bias() -> None:
    b = QDQ()
    x = b.qdq(b.input("x", [1, 4, 6, 6]), 0.05, 10)
    w = b.weight("w", _codes((6, 4, 3, 3), 0, 255, np.uint8), 0.01, 128)
    b.const("bias", RNG.normal(size=6).astype(np.float32))
    b.node("Conv", [x, w, "bias"], "c", strides=[2, 2])
    y = b.qdq("c", 0.1, 128)
    qdq = b.model([y])
    out, _ = _lower(qdq, **{"Conv->QLinearConv": 1})
    assert "Conv" not in _ops(out)
    assert_within_steps(qdq, out, 0.1, feeds={"x": RNG.normal(size=(3, 4, 6, 6)).astype(np.float32)})


def test_full_range_int8_weights_become_uint8_where_the_kernels_saturate() -> None:
    """x86-avx2: u8 x s8 products over 7 bits would saturate in int16 -> weights stored as uint8 (exact)."""
    b = QDQ()
    x = b.qdq(b.input("x", [2, 16, 5, 5]), 0.05, 0)
    w = b.weight("w", _codes((8, 16, 3, 3), -127, 127), RNG.uniform(0.01, 0.02, 8), axis=0)
    b.node("Conv", [x, w], "c")
    y = b.qdq("c", 0.5, 128)
    qdq = b.model([y])
    feeds = {"x": np.abs(RNG.normal(size=(2, 16, 5, 5))).astype(np.float32) * 8}  # large codes: worst case
    out, res = _lower(qdq, "x86-avx2", weights_to_uint8=1)
    assert any("stored as uint8" in n for n in res.notes)
    w_init = next(i for i in out.graph.initializer if i.name.startswith("w_codes"))
    assert w_init.data_type == onnx.TensorProto.UINT8
    assert_within_steps(qdq, out, 0.5, feeds=feeds)
    kept, _ = _lower(qdq, "x86-vnni")  # int32-accumulating CPUs keep the int8 weights
    assert next(i for i in kept.graph.initializer if i.name.startswith("w_codes")).data_type == onnx.TensorProto.INT8


def test_conv_with_float_output_uses_conv_integer_for_uint8_only() -> None:
    def model(dtype: Any) -> onnx.ModelProto:
        b = QDQ()
        x = b.qdq(b.input("x", [1, 2, 5, 5]), 0.05, 3)
        codes = _codes((3, 2, 3, 3), 0, 255, np.uint8) if dtype == np.uint8 else _codes((3, 2, 3, 3))
        w = b.weight("w", codes, [0.01, 0.02, 0.03], 128 if dtype == np.uint8 else 0, axis=0)
        b.const("bias", np.array([0.5, -0.5, 0.1], np.float32))
        b.node("Conv", [x, w, "bias"], "y")  # a float graph output: no QuantizeLinear after the Conv
        return b.model(["y"])

    qdq = model(np.uint8)
    out, _ = _lower(qdq, **{"Conv->ConvInteger": 1})
    assert {"ConvInteger", "Cast", "Mul", "Add"} <= _ops(out) and "Conv" not in _ops(out)
    ref, got = run_ort(qdq, f := _feeds(qdq))[0], run_ort(out, f)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    qdq8 = model(np.int8)  # ORT CPU runs ConvInteger for uint8 x uint8 only (in the versions onnxq supports)
    out8, res = _lower(qdq8, nodes_lowered=0, units_kept_qdq=1)
    assert "Conv" in _ops(out8) and any("ConvInteger" in n and "uint8 x uint8" in n for n in res.notes)


@pytest.mark.parametrize("per_column", [False, True])
def test_matmul_to_qlinearmatmul(per_column: bool) -> None:
    b = QDQ()
    a = b.qdq(b.input("a", [2, 3, 16]), 0.05, 120)
    scale = RNG.uniform(0.01, 0.02, 5) if per_column else 0.015
    w = b.weight("w", _codes((16, 5)), scale, axis=1 if per_column else None)
    b.node("MatMul", [a, w], "m")
    y = b.qdq("m", 0.2, 128)
    qdq = b.model([y])
    out, _ = _lower(qdq, **{"MatMul->QLinearMatMul": 1})
    assert "MatMul" not in _ops(out) and "QLinearMatMul" in _ops(out)
    assert_within_steps(qdq, out, 0.2)


def test_matmul_with_float_output_to_matmulinteger() -> None:
    b = QDQ()
    a = b.qdq(b.input("a", [4, 16]), 0.05, 120)
    w = b.weight("w", _codes((16, 5)), RNG.uniform(0.01, 0.02, 5), axis=1)
    b.node("MatMul", [a, w], "y")
    qdq = b.model(["y"])
    out, _ = _lower(qdq, **{"MatMul->MatMulInteger": 1})
    assert {"MatMulInteger", "Cast", "Mul"} <= _ops(out)
    f = _feeds(qdq)
    np.testing.assert_allclose(run_ort(out, f)[0], run_ort(qdq, f)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_ort(out, f, optimize=True)[0], run_ort(qdq, f)[0], rtol=1e-5, atol=1e-5)


def test_activation_by_activation_matmul() -> None:
    b = QDQ()
    q = b.qdq(b.input("q", [2, 4, 8]), 0.04, 128)
    k = b.qdq(b.input("k", [2, 8, 4]), 0.03, 128)
    b.node("MatMul", [q, k], "s")
    y = b.qdq("s", 0.1, 128)
    qdq = b.model([y])
    out, _ = _lower(qdq, **{"MatMul->QLinearMatMul": 1})
    assert_within_steps(qdq, out, 0.1)


@pytest.mark.parametrize("quantized_output", [False, True])
def test_gemm_to_qgemm(quantized_output: bool) -> None:
    b = QDQ()
    a = b.qdq(b.input("a", [3, 16]), 0.05, 128)
    w_s = RNG.uniform(0.01, 0.02, 6)
    w = b.weight("w", _codes((6, 16)), w_s, axis=0)
    bias = b.weight("b", RNG.integers(-300, 300, 6).astype(np.int32), np.float32(0.05) * w_s.astype(np.float32), axis=0)
    b.node("Gemm", [a, w, bias], "g", transB=1)
    y = b.qdq("g", 0.1, 128) if quantized_output else "g"
    qdq = b.model([y])
    out, _ = _lower(qdq, **{"Gemm->QGemm": 1})
    qgemm = next(n for n in out.graph.node if n.op_type == "QGemm")
    assert qgemm.domain == "com.microsoft" and len(qgemm.input) == (9 if quantized_output else 7)
    if quantized_output:
        assert_within_steps(qdq, out, 0.1)
    else:
        f = _feeds(qdq)
        np.testing.assert_allclose(run_ort(out, f)[0], run_ort(qdq, f)[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_add_mul_to_qlinear(op: str) -> None:
    b = QDQ()
    x1 = b.qdq(b.input("x1", [2, 4, 3]), 0.03, 128)
    x2 = b.qdq(b.input("x2", [4, 3], batch=False), 0.02, 100)  # broadcast
    b.node(op, [x1, x2], "s")
    y = b.qdq("s", 0.05 if op == "Add" else 0.003, 128)
    qdq = b.model([y])
    out, _ = _lower(qdq, **{f"{op}->QLinear{op}": 1})
    assert f"QLinear{op}" in _ops(out) and op not in _ops(out)
    assert_within_steps(qdq, out, 0.05 if op == "Add" else 0.003)


@pytest.mark.parametrize("same_scale", [False, True])
def test_concat(same_scale: bool) -> None:
    b = QDQ()
    x1 = b.qdq(b.input("x1", [1, 2, 3]), 0.05, 128)
    x2 = b.qdq(b.input("x2", [1, 4, 3]), 0.05 if same_scale else 0.03, 128)
    b.node("Concat", [x1, x2], "c", axis=1)
    b.const("c_s", np.float32(0.05))
    b.const("c_z", np.uint8(128))
    b.node("QuantizeLinear", ["c", "c_s", "c_z"], "c_q")
    y = b.node("DequantizeLinear", ["c_q", "c_s", "c_z"], "c_dq")
    qdq = b.model([y])
    new = "Concat (integer)" if same_scale else "QLinearConcat"
    out, _ = _lower(qdq, **{f"Concat->{new}": 1})
    assert_within_steps(qdq, out, 0.05)


@pytest.mark.parametrize(
    ("op", "attrs", "new"),
    [
        ("GlobalAveragePool", {}, "QLinearGlobalAveragePool"),
        ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, "QLinearAveragePool"),
        ("Sigmoid", {}, "QLinearSigmoid"),
        ("LeakyRelu", {"alpha": 0.2}, "QLinearLeakyRelu"),
        ("Softmax", {"axis": -1}, "QLinearSoftmax"),
    ],
)
def test_single_input_qlinear_ops(op: str, attrs: dict[str, Any], new: str) -> None:
    b = QDQ()
    x = b.qdq(b.input("x", [2, 3, 4, 4]), 0.04, 128)
    b.node(op, [x], "o", **attrs)
    step = {"Sigmoid": 1 / 256, "Softmax": 1 / 256}.get(op, 0.03)
    y = b.qdq("o", step, 0 if op in ("Sigmoid", "Softmax") else 128)
    qdq = b.model([y])
    out, _ = _lower(qdq, **{f"{op}->{new}": 1})
    assert new in _ops(out) and op not in _ops(out)
    assert next(n for n in out.graph.node if n.op_type == new).domain == "com.microsoft"
    assert_within_steps(qdq, out, step)


@pytest.mark.parametrize("op", ["MaxPool", "Reshape", "Transpose", "Flatten"])
def test_ops_that_share_parameters_run_on_integers(op: str) -> None:
    b = QDQ()
    x = b.qdq(b.input("x", [2, 3, 4, 4]), 0.04, 128)
    extra = {"MaxPool": ([], {"kernel_shape": [2, 2]}), "Reshape": ([b.const("shape", np.array([2, -1], np.int64))], {}),
             "Transpose": ([], {"perm": [0, 2, 3, 1]}), "Flatten": ([], {})}[op]  # fmt: skip
    b.node(op, [x, *extra[0]], "o", **extra[1])
    b.node("QuantizeLinear", ["o", "x_s", "x_z"], "o_q")  # same scale and zero point as the input
    y = b.node("DequantizeLinear", ["o_q", "x_s", "x_z"], "o_dq")
    qdq = b.model([y])
    out, _ = _lower(qdq, **{f"{op}->{op} (integer)": 1})
    assert [n.op_type for n in out.graph.node] == ["QuantizeLinear", op, "DequantizeLinear"]
    assert_within_steps(qdq, out, 0.04)


@pytest.mark.parametrize(
    ("op", "attrs", "extra"),
    [
        ("Resize", {"mode": "linear"}, [("roi", np.zeros(0, np.float32)), ("scales", np.array([1, 1, 2, 2], np.float32))]),
        ("Resize", {"mode": "nearest"}, [("roi", np.zeros(0, np.float32)), ("scales", np.array([1, 1, 2, 2], np.float32))]),
        ("Pad", {}, [("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))]),
        ("Gather", {"axis": 1}, [("idx", np.array([2, 0], np.int64))]),
        ("Slice", {}, [("starts", np.array([1], np.int64)), ("ends", np.array([3], np.int64)), ("axes", np.array([2], np.int64))]),
    ],
)
def test_more_ops_that_share_parameters(op: str, attrs: dict[str, Any], extra: list[tuple[str, np.ndarray]]) -> None:
    b = QDQ()
    x = b.qdq(b.input("x", [2, 3, 4, 4]), 0.04, 128)
    b.node(op, [x, *(b.const(k, v) for k, v in extra)], "o", **attrs)
    b.node("QuantizeLinear", ["o", "x_s", "x_z"], "o_q")
    y = b.node("DequantizeLinear", ["o_q", "x_s", "x_z"], "o_dq")
    qdq = b.model([y])
    out, _ = _lower(qdq, **{f"{op}->{op} (integer)": 1})
    assert [n.op_type for n in out.graph.node] == ["QuantizeLinear", op, "DequantizeLinear"]
    assert_within_steps(qdq, out, 0.04)


def test_split_with_two_quantized_outputs() -> None:
    b = QDQ()
    x = b.qdq(b.input("x", [2, 4, 3]), 0.04, 128)
    b.nodes.append(onnx.helper.make_node("Split", [x], ["s0", "s1"], name="split", axis=1))
    outs = []
    for s in ("s0", "s1"):
        b.node("QuantizeLinear", [s, "x_s", "x_z"], f"{s}_q")
        outs.append(b.node("DequantizeLinear", [f"{s}_q", "x_s", "x_z"], f"{s}_dq"))
    qdq = b.model(outs)
    out, _ = _lower(qdq, **{"Split->Split (integer)": 1})
    assert sorted(n.op_type for n in out.graph.node) == ["DequantizeLinear", "DequantizeLinear", "QuantizeLinear", "Split"]
    assert_within_steps(qdq, out, 0.04)


def test_standalone_relu_between_equal_parameters_is_removed() -> None:
    b = QDQ()
    x = b.qdq(b.input("x", [2, 5]), 0.04, 0)
    b.node("Relu", [x], "r")
    b.node("QuantizeLinear", ["r", "x_s", "x_z"], "r_q")
    b.node("DequantizeLinear", ["r_q", "x_s", "x_z"], "r_dq")
    b.node("Sigmoid", ["r_dq"], "y")
    qdq = b.model(["y"])
    out, _ = _lower(qdq, **{"Relu->Relu (removed)": 1})
    assert "Relu" not in _ops(out)
    f = _feeds(qdq)
    np.testing.assert_allclose(run_ort(out, f)[0], run_ort(qdq, f)[0], rtol=0, atol=1e-6)


def test_int8_activations_with_uint8_weights_are_shifted_to_int8() -> None:
    """ORT CPU has no int8 x uint8 QLinearMatMul: the weights are re-stored as int8 (exact)."""
    b = QDQ()
    a = b.qdq(b.input("a", [3, 8]), 0.05, 0, np.int8)
    w = b.weight("w", _codes((8, 4), 60, 200, np.uint8), 0.01, 128)
    b.node("MatMul", [a, w], "m")
    y = b.qdq("m", 0.1, 0, np.int8)
    qdq = b.model([y])
    out, _ = _lower(qdq, **{"MatMul->QLinearMatMul": 1})
    mm = next(n for n in out.graph.node if n.op_type == "QLinearMatMul")
    assert next(i for i in out.graph.initializer if i.name == mm.input[3]).data_type == onnx.TensorProto.INT8
    assert_within_steps(qdq, out, 0.1)


# ---- QDQ models from other tools ----------------------------------------------------------------------


def test_fake_quant_float_weights_are_folded() -> None:
    """The QAT export pattern: a float weight initializer -> QuantizeLinear -> DequantizeLinear."""
    b = QDQ()
    a = b.qdq(b.input("a", [2, 8]), 0.05, 128)
    b.const("w", RNG.normal(size=(8, 4)).astype(np.float32) * 0.2)
    b.const("w_s", np.full(4, 0.005, np.float32))
    b.const("w_z", np.zeros(4, np.int8))
    b.node("QuantizeLinear", ["w", "w_s", "w_z"], "w_q", axis=1)
    b.node("DequantizeLinear", ["w_q", "w_s", "w_z"], "w_dq", axis=1)
    b.node("MatMul", [a, "w_dq"], "m")
    y = b.qdq("m", 0.05, 128)
    qdq = b.model([y])
    out, _ = _lower(qdq, weights_folded=1, **{"MatMul->QLinearMatMul": 1})
    assert all(i.data_type != onnx.TensorProto.FLOAT or i.dims in ([], [4]) for i in out.graph.initializer)
    assert_within_steps(qdq, out, 0.05)


def test_pytorch_qat_export_lowers() -> None:
    """tests/data/qat_tiny.onnx: PyTorch QAT (eager, fake quant exported as Q/DQ; make_qat_fixture.py)."""
    qdq = onnx.load(DATA / "qat_tiny.onnx")
    out, res = _lower(qdq, "x86-avx2", weights_folded=4, units_kept_qdq=0, activations_absorbed=2)
    assert res.counts["Conv->QLinearConv"] == 3 and res.counts["Gemm->QGemm"] == 1
    assert not {"Conv", "Gemm", "Add", "Relu", "GlobalAveragePool"} & _ops(out)
    assert [n.op_type for n in out.graph.node].count("QuantizeLinear") == 1  # only the graph input's
    assert all(i.data_type != onnx.TensorProto.FLOAT for i in out.graph.initializer if len(i.dims) > 1)
    scale = float(onnx.numpy_helper.to_array(next(i for i in qdq.graph.initializer if i.name == "fc.activation_post_process.scale"))[0])
    assert_within_steps(qdq, out, scale, feeds={"x": RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)})


def test_onnxruntime_quantize_static_model_lowers(tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from test_cli import _tiny_model

    src = _tiny_model(tmp_path / "tiny.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    dst = tmp_path / "tiny.qdq.onnx"
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    qdq = onnx.load(dst)
    out, res = _lower(qdq, "x86-avx2", units_kept_qdq=0)
    assert {"QLinearConv", "QLinearGlobalAveragePool", "QGemm"} <= _ops(out)
    assert not {"Conv", "Gemm", "GlobalAveragePool"} & _ops(out)
    out_dq = next(n for n in qdq.graph.node if n.output[0] == "y")
    step = float(onnx.numpy_helper.to_array(next(i for i in qdq.graph.initializer if i.name == out_dq.input[1])))
    assert_within_steps(qdq, out, step, feeds={"x": RNG.normal(size=(4, 3, 8, 8)).astype(np.float32)})


# ---- what must not fire --------------------------------------------------------------------------------


def test_cuda_target_is_refused() -> None:
    b = QDQ()
    a = b.qdq(b.input("a", [2, 8]), 0.05, 128)
    w = b.weight("w", _codes((8, 4)), 0.01)
    b.node("MatMul", [a, w], "y")
    qdq = b.model(["y"])
    ctx = make_ctx("cuda")
    with pytest.raises(PassError, match="CUDA execution provider has no kernels") as err:
        QOperatorPass()(gs.import_onnx(qdq), ctx)
    assert "--format qdq" in str(err.value) and "TensorRT" in str(err.value)


def _qoperator_model() -> onnx.ModelProto:
    b = QDQ()
    b.input("x", [1, 2, 4, 4])
    for name, v in {"s": np.float32(0.05), "z": np.uint8(128), "w": _codes((3, 2, 1, 1)), "ws": np.float32(0.01),
                    "wz": np.int8(0), "ys": np.float32(0.1)}.items():  # fmt: skip
        b.const(name, v)
    b.node("QuantizeLinear", ["x", "s", "z"], "xq")
    b.node("QLinearConv", ["xq", "s", "z", "w", "ws", "wz", "ys", "z"], "yq")
    b.node("DequantizeLinear", ["yq", "ys", "z"], "y")
    return b.model(["y"])


def test_already_qoperator_model_passes_through_untouched() -> None:
    model = _qoperator_model()
    graph = gs.import_onnx(model)
    ctx = make_ctx("x86-avx2")
    result = QOperatorPass()(graph, ctx)
    assert not result.modified and result.counts["nodes_lowered"] == 0
    assert any("already in QOperator form (QLinearConv x1)" in n for n in result.notes)
    assert [n.op for n in result.graph.nodes] == ["QuantizeLinear", "QLinearConv", "DequantizeLinear"]


def test_units_without_a_kernel_stay_qdq_and_say_why() -> None:
    b = QDQ()
    x = b.qdq(b.input("x", [2, 6]), 0.05, 128)
    b.node("Erf", [x], "e")  # no QOperator form
    e = b.qdq("e", 0.01, 128)
    b.node("Add", [e, x], "s")  # lowerable
    s = b.qdq("s", 0.05, 128)
    b.node("Softmax", [s], "p")  # float output: no QuantizeLinear, not a unit
    x16 = b.qdq(b.input("x16", [2, 6]), 0.001, 0, np.uint16)  # 16-bit activations have no QLinear kernels
    w = b.weight("w", _codes((6, 3)), 0.01)
    b.node("MatMul", [x16, w], "m")
    m = b.qdq("m", 0.05, 128)
    qdq = b.model(["p", m], opset=21)
    out, res = _lower(qdq, nodes_lowered=1, units_kept_qdq=2, **{"Add->QLinearAdd": 1})
    assert {"Erf", "MatMul", "Softmax"} <= _ops(out)
    notes = " ".join(res.notes)
    assert "kept as QDQ: 1 Erf (ORT has no QOperator kernel for Erf)" in notes
    assert "kept as QDQ: 1 MatMul" in notes and "uint16" in notes
    f = _feeds(qdq)
    for ref, got in zip(run_ort(qdq, f), run_ort(out, f)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=0.05 * 1.0001)


def test_relu_before_a_quantize_with_a_nonzero_floor_is_not_absorbed() -> None:
    b = QDQ()
    x = b.qdq(b.input("x", [2, 3, 4, 4]), 0.02, 128)
    w = b.weight("w", _codes((4, 3, 1, 1)), 0.01)
    b.node("Conv", [x, w], "c")
    b.node("Relu", ["c"], "r")
    y = b.qdq("r", 0.01, 128)  # zero point 128: codes below it mean negative values, Relu is not a no-op
    qdq = b.model([y])
    out, res = _lower(qdq, nodes_lowered=0, units_kept_qdq=1)
    assert {"Conv", "Relu"} <= _ops(out) and "cannot be absorbed" in " ".join(res.notes)


# ---- CLI ---------------------------------------------------------------------------------------------


def test_cli_preset_qoperator_lowers_a_qdq_file(tmp_path: Path) -> None:
    out = tmp_path / "qat.qop.onnx"
    result = CliRunner().invoke(main, ["quantize", str(DATA / "qat_tiny.onnx"), "-o", str(out), "--preset", "qoperator",
                                       "--target", "x86-avx2", "--no-progress", "--report", str(tmp_path / "rep")])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "qoperator: lowered 6 QDQ node units" in " ".join(result.stdout.split())
    ops = _ops(onnx.load(out))
    assert "QLinearConv" in ops and "Conv" not in ops
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["shape_inference", "qoperator"]


def test_cli_w8a8_format_qoperator(tmp_path: Path) -> None:
    from test_cli import _tiny_model

    src = _tiny_model(tmp_path / "tiny.onnx")
    out = tmp_path / "tiny.qop.onnx"
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--preset", "w8a8", "--format", "qoperator",
                                       "--calib", "random:4", "--no-progress", "--checked", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [s["name"] for s in report["steps"]][-2:] == ["insert_qdq", "qoperator"]
    model = onnx.load(out)
    ops = _ops(model)
    assert {"QLinearConv", "QGemm"} <= ops and not {"Conv", "Gemm"} & ops
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    assert run_ort(model, {"x": x})[0].shape == (2, 5)


# ---- real models ---------------------------------------------------------------------------------------


@pytest.mark.assets
def test_zoo_int8_mobilenetv2_passes_through(assets: Path) -> None:
    model = onnx.load(asset(assets, "cnn/mobilenetv2-12-int8-zoo/model.onnx"))
    ctx = make_ctx("x86-avx2")
    before = [n.op_type for n in model.graph.node]
    result = QOperatorPass()(gs.import_onnx(model), ctx)
    assert not result.modified and result.counts["nodes_lowered"] == 0 and result.counts["units_kept_qdq"] == 0
    assert any("already in QOperator form (QLinearConv x52" in n for n in result.notes)
    assert [n.op for n in result.graph.nodes] == before


@pytest.mark.assets
def test_onnxruntime_qdq_mobilenetv2_lowers(assets: Path, tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    src = asset(assets, "cnn/mobilenetv2-7/model.onnx")
    x = np.load(asset(assets, "cnn/mobilenetv2-7/test_data_set/0/input_0.npy")).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    dst = tmp_path / "mnv2.qdq.onnx"
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    qdq = onnx.load(dst)
    out, res = _lower(qdq, "x86-avx2", nodes_lowered=65, units_kept_qdq=0,
                      **{"Conv->QLinearConv": 52, "Add->QLinearAdd": 10, "Gemm->QGemm": 1})  # fmt: skip
    assert not {"Conv", "Add", "Gemm"} & _ops(out)
    ref, got = run_ort(qdq, {"input": x})[0], run_ort(out, {"input": x})[0]
    assert ref.argmax() == got.argmax()
    err = float(np.sqrt(np.mean((ref - got) ** 2)) / np.sqrt(np.mean(ref**2)))
    assert err < 0.1, f"relative RMS difference {err:.3f}"
