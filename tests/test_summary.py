"""Tests for onnxq.summary: op census, dtype sizes, MACs and the quantized share (what `onnxq inspect` shows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper
from rich.console import Console

from onnxq.errors import ModelLoadError
from onnxq.summary import ModelSummary, render_summary, share_line, summarize
from conftest import asset
from helpers import initializer, run_ort

RNG = np.random.default_rng(0)
CONV_MACS = 1 * 4 * 6 * 6 * 3 * 3 * 3  # N*Cout*OH*OW * Cin*KH*KW for 1x3x8x8 -> 1x4x6x6, 3x3 kernel


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           inits: list[onnx.TensorProto], opset: int = 13, ms: bool = False, check: bool = True) -> onnx.ModelProto:
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=ops)
    if check:
        onnx.checker.check_model(model, full_check=not ms)
    return model


def float_conv(batch: int | str = 1) -> onnx.ModelProto:
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    return _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv1"), helper.make_node("Relu", ["y"], ["z"])],
                  [helper.make_tensor_value_info("x", T.FLOAT, [batch, 3, 8, 8])],
                  [helper.make_tensor_value_info("z", T.FLOAT, [batch, 4, 6, 6])],
                  [initializer("w", w), initializer("b", np.zeros(4, np.float32))])


def qdq_conv(activation_qdq: bool = True) -> onnx.ModelProto:
    """DQ(int8 weight) -> Conv, with Q -> DQ (uint8) on the activation when asked."""
    wq = RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="conv1/w/DequantizeLinear")]
    x = "x"
    if activation_qdq:
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="conv1/QuantizeLinear"),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="conv1/DequantizeLinear")]
        x = "xd"
    nodes.append(helper.make_node("Conv", [x, "w", "b"], ["y"], name="conv1"))
    inits = [initializer("wq", wq), initializer("ws", np.float32(0.01)), initializer("xs", np.float32(0.02)),
             initializer("xz", np.uint8(128)), initializer("b", np.zeros(4, np.float32))]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 6, 6])], inits)


def matmul_nbits() -> onnx.ModelProto:
    """MatMulNBits (K=64, N=32, 4 bits, block 32) followed by a float MatMul 32x16 on its output."""
    k, n, block = 64, 32, 32
    nodes = [helper.make_node("MatMulNBits", ["a", "bq", "scales"], ["h"], name="fc1", domain="com.microsoft",
                              K=k, N=n, bits=4, block_size=block),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    inits = [initializer("bq", RNG.integers(0, 256, (n, k // block, block // 2)).astype(np.uint8)),
             initializer("scales", np.full(n * k // block, 0.01, np.float32)),
             initializer("w2", RNG.standard_normal((n, 16)).astype(np.float32))]
    return _model(nodes, [helper.make_tensor_value_info("a", T.FLOAT, [1, 3, k])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [1, 3, 16])], inits, ms=True)


def test_float_conv_is_not_quantized() -> None:
    s = summarize(float_conv())
    assert s.op_counts == {"Conv": 1, "Relu": 1}
    assert [(op.name, op.op_type, op.macs, op.precision, op.quantized) for op in s.compute_ops] == [
        ("conv1", "Conv", CONV_MACS, "float32", False)]
    assert s.quantized_mac_share == 0.0 and s.total_macs == CONV_MACS and s.qdq_pairs == 0
    assert s.initializer_bytes_by_dtype == {"float32": (108 + 4) * 4}
    assert s.initializer_counts_by_dtype == {"float32": 2} and s.total_parameters == 112
    assert [(t.name, t.dtype, t.shape) for t in s.inputs] == [("x", "float32", [1, 3, 8, 8])]


def test_qdq_conv_is_fully_quantized() -> None:
    model = qdq_conv()
    run_ort(model, {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)})  # a valid, runnable QDQ graph
    s = summarize(model)
    (op,) = s.compute_ops
    assert (op.op_type, op.macs, op.precision, op.quantized, op.weight_only) == ("Conv", CONV_MACS, "int8", True, False)
    assert s.quantized_mac_share == 1.0 and s.qdq_pairs == 1
    assert s.op_counts == {"DequantizeLinear": 2, "Conv": 1, "QuantizeLinear": 1}
    assert s.initializer_bytes_by_dtype["int8"] == 108


def test_weight_only_dq_conv_counts_as_weight_only() -> None:
    (op,) = summarize(qdq_conv(activation_qdq=False)).compute_ops
    assert (op.precision, op.quantized, op.weight_only) == ("int8", True, True)


def test_blocked_int4_dq_matmul() -> None:
    wq = RNG.integers(-8, 8, (64, 16)).astype(np.int8)
    w4 = helper.make_tensor("wq", T.INT4, [64, 16], wq.flatten().tolist())
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0, block_size=32),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm")]
    inits = [w4, initializer("ws", np.full((2, 16), 0.1, np.float32)), initializer("xs", np.float32(0.02)), initializer("xz", np.int8(0))]
    model = _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [2, 64])],
                   [helper.make_tensor_value_info("y", T.FLOAT, [2, 16])], inits, opset=21)
    s = summarize(model)
    (op,) = s.compute_ops
    assert (op.macs, op.precision, op.quantized, op.weight_only) == (2 * 64 * 16, "int4", True, False)
    assert s.initializer_bytes_by_dtype["int4"] == 64 * 16 // 2  # two values a byte


def test_matmulinteger() -> None:
    nodes = [helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"], name="mmi")]
    inits = [initializer("b", RNG.integers(-127, 128, (16, 8)).astype(np.int8)), initializer("az", np.uint8(128)), initializer("bz", np.int8(0))]
    model = _model(nodes, [helper.make_tensor_value_info("a", T.UINT8, [2, 16])],
                   [helper.make_tensor_value_info("y", T.INT32, [2, 8])], inits, opset=13)
    s = summarize(model)
    (op,) = s.compute_ops
    assert (op.op_type, op.macs, op.precision, op.quantized) == ("MatMulInteger", 2 * 16 * 8, "int8", True)
    assert s.quantized_mac_share == 1.0


def test_matmulnbits_int4_and_shapes_past_contrib_ops() -> None:
    model = matmul_nbits()
    y = run_ort(model, {"a": RNG.standard_normal((1, 3, 64)).astype(np.float32)})[0]
    assert y.shape == (1, 3, 16)
    s = summarize(model)
    nbits, fc2 = s.compute_ops
    assert (nbits.op_type, nbits.precision, nbits.quantized, nbits.weight_only) == ("com.microsoft.MatMulNBits", "int4", True, True)
    assert nbits.macs == 3 * 64 * 32  # rows * K * N from the attributes
    assert (fc2.macs, fc2.precision, fc2.quantized) == (3 * 32 * 16, "float32", False)  # shape found past MatMulNBits
    assert s.quantized_mac_share == pytest.approx(6144 / (6144 + 1536))
    assert s.op_counts == {"MatMul": 1, "com.microsoft.MatMulNBits": 1}
    assert s.opset_imports == {"ai.onnx": 13, "com.microsoft": 1}
    assert s.total_parameters == 64 * 32 + 64 + 32 * 16  # packed B counts as K*N weights


@pytest.mark.parametrize(("node", "inputs", "inits", "out", "expected"), [
    (helper.make_node("Gemm", ["a", "b"], ["y"], transB=1), [("a", [2, 5])], [("b", (3, 5))], [2, 3], 2 * 5 * 3),
    (helper.make_node("Conv", ["a", "b"], ["y"], group=4, pads=[1, 1, 1, 1]), [("a", [1, 4, 8, 8])], [("b", (4, 1, 3, 3))],
     [1, 4, 8, 8], 4 * 8 * 8 * 1 * 3 * 3),
    (helper.make_node("ConvTranspose", ["a", "b"], ["y"]), [("a", [1, 2, 4, 4])], [("b", (2, 3, 3, 3))], [1, 3, 6, 6],
     2 * 4 * 4 * 3 * 3 * 3),
    (helper.make_node("MatMul", ["a", "b"], ["y"]), [("a", [2, 3, 4, 5])], [("b", (5, 6))], [2, 3, 4, 6], 2 * 3 * 4 * 5 * 6),
    (helper.make_node("MatMul", ["a", "c"], ["y"]), [("a", [2, 4, 5]), ("c", [2, 5, 7])], [], [2, 4, 7], 2 * 4 * 5 * 7),
], ids=["gemm-transB", "depthwise-conv", "conv-transpose", "batched-matmul", "matmul-two-activations"])
def test_macs_by_hand(node: onnx.NodeProto, inputs: list, inits: list, out: list, expected: int) -> None:
    model = _model([node], [helper.make_tensor_value_info(n, T.FLOAT, s) for n, s in inputs],
                   [helper.make_tensor_value_info("y", T.FLOAT, out)],
                   [initializer(n, np.ones(s, np.float32)) for n, s in inits])
    assert [op.macs for op in summarize(model).compute_ops] == [expected]


def test_symbolic_batch_taken_as_one() -> None:
    s = summarize(float_conv(batch="N"))
    assert s.assumed_dims == {"N": 1} and s.total_macs == CONV_MACS
    assert s.inputs[0].shape == ["N", 3, 8, 8]


def test_unknown_shapes_count_by_number_only() -> None:
    model = _model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                   [helper.make_tensor_value_info("a", T.FLOAT, None), helper.make_tensor_value_info("b", T.FLOAT, None)],
                   [helper.make_tensor_value_info("y", T.FLOAT, None)], [], check=False)
    s = summarize(model)
    assert [op.macs for op in s.compute_ops] == [None] and s.total_macs == 0
    assert "MACs unknown for 1" in share_line(s)


def test_ir3_initializers_listed_as_inputs() -> None:
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8]), helper.make_tensor_value_info("w", T.FLOAT, [4, 3, 3, 3])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 6, 6])], [initializer("w", w)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    onnx.checker.check_model(model)
    s = summarize(model)
    assert s.ir_version == 3 and [t.name for t in s.inputs] == ["x"]
    assert s.total_macs == CONV_MACS and s.total_parameters == 108


def test_reshape_target_from_shape_arithmetic_in_old_opset() -> None:
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape (opset 11 has no data propagation) -> MatMul."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n"], ["n1"], axes=[0]), helper.make_node("Concat", ["n1", "m1"], ["t"], axis=0),
             helper.make_node("Reshape", ["x", "t"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"], name="head")]
    inits = [initializer("i0", np.int64(0)), initializer("m1", np.array([-1], np.int64)), initializer("w", np.ones((48, 10), np.float32))]
    model = _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["batch", 3, 4, 4])],
                   [helper.make_tensor_value_info("y", T.FLOAT, ["batch", 10])], inits, opset=11)
    assert [op.macs for op in summarize(model).compute_ops] == [48 * 10]


def test_file_bytes_counts_external_data(tmp_path: Path) -> None:
    model = float_conv()
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    on_disk = path.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert summarize(onnx.load(str(path)), path).file_bytes == on_disk  # data loaded into memory
    assert summarize(onnx.load(str(path), load_external_data=False), path).file_bytes == on_disk
    s = summarize(onnx.load(str(path), load_external_data=False), path)
    assert s.initializer_bytes_by_dtype == {"float32": 112 * 4} and s.total_macs == CONV_MACS


def test_model_is_left_unchanged_and_bad_path_is_a_clear_error(tmp_path: Path) -> None:
    model = float_conv(batch="N")
    before = model.SerializeToString()
    summarize(model)
    assert model.SerializeToString() == before
    with pytest.raises(ModelLoadError, match="missing.onnx"):
        summarize(model, tmp_path / "missing.onnx")


def test_to_dict_is_json() -> None:
    s = summarize(matmul_nbits())
    d = json.loads(json.dumps(s.to_dict()))
    assert d["quantized_mac_share"] == pytest.approx(0.8) and d["op_counts"]["com.microsoft.MatMulNBits"] == 1
    assert d["compute_ops"][0]["precision"] == "int4" and d["total_macs"] == 7680


def test_render_summary() -> None:
    console = Console(record=True, width=100)
    render_summary(summarize(qdq_conv()), console)
    text = console.export_text()
    for word in ("Conv", "QuantizeLinear", "DequantizeLinear", "int8", "float32", "QDQ pairs: 1"):
        assert word in text
    assert "quantized compute: 100.0% of 3.9 K MACs (1 of 1 Conv/Gemm/MatMul ops)" in text


def test_render_many_op_types_and_markup_like_names() -> None:
    nodes = [helper.make_node(op, ["[bold]x" if i == 0 else f"t{i}"], [f"t{i + 1}"]) for i, op in
             enumerate(["Relu", "Sigmoid", "Tanh", "Abs", "Neg", "Exp", "Log", "Sqrt", "Floor", "Ceil", "Sin", "Cos", "Erf"])]
    model = _model(nodes, [helper.make_tensor_value_info("[bold]x", T.FLOAT, ["batch_size", 4])],
                   [helper.make_tensor_value_info("t13", T.FLOAT, None)], [], check=False)
    console = Console(record=True, width=100)
    render_summary(summarize(model), console)
    text = console.export_text()
    assert "[bold]x" in text and "[batch_size, 4]" in text and "Erf" in text
    assert "quantized compute: no Conv/Gemm/MatMul ops" in text


@pytest.mark.assets
def test_zoo_int8_mobilenetv2(assets: Path) -> None:
    path = asset(assets, "cnn/mobilenetv2-12-int8-zoo/model.onnx")
    s = summarize(onnx.load(str(path)), path)
    assert s.op_counts["QLinearConv"] == 52 and s.op_counts["com.microsoft.QLinearAdd"] == 11
    assert s.quantized_mac_share > 0.95
    assert all(op.quantized and op.precision in ("int8", "uint8") for op in s.compute_ops)
    assert all(op.macs is not None for op in s.compute_ops)  # shapes found past QLinearGlobalAveragePool
    assert 280e6 < s.total_macs < 320e6 and s.file_bytes == path.stat().st_size


@pytest.mark.assets
def test_fp32_mobilenetv2(assets: Path) -> None:
    path = asset(assets, "cnn/mobilenetv2-7/model.onnx")
    s = summarize(onnx.load(str(path)), path)
    assert s.quantized_mac_share == 0.0 and s.op_counts["Conv"] == 52 and s.op_counts["Gemm"] == 1
    assert 280e6 < s.total_macs < 320e6  # about 300 M MACs at batch 1
    assert s.assumed_dims == {"N": 1} and s.initializer_bytes_by_dtype.keys() == {"float32"}
    console = Console(record=True, width=100)
    render_summary(s, console)
    assert "quantized compute: 0.0% of 300.8 M MACs (0 of 53 Conv/Gemm/MatMul ops)" in console.export_text()


@pytest.mark.assets
def test_fp16_squeezenet_ir3(assets: Path) -> None:
    path = asset(assets, "cnn/squeezenet1.1-fp16/model.onnx")
    s = summarize(onnx.load(str(path)), path)
    assert s.ir_version == 3 and [t.name for t in s.inputs] == ["data_0"]
    assert {op.precision for op in s.compute_ops} == {"float16"} and s.initializer_bytes_by_dtype.keys() == {"float16"}
    assert all(op.macs for op in s.compute_ops) and isinstance(s, ModelSummary)
