"""Tests for the preprocessing passes: shape inference, constant folding, BatchNorm folding, dead-node
removal and float16 upcasting.

Each pass gets the triad (op types after the pass, numerical agreement in ORT with optimisations off,
onnx.checker full check) plus the cases where it must not fire. One test runs the whole preprocessing
chain on the real float16 SqueezeNet asset.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx.version_converter
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import asset
from helpers import full_check, initializer, make_ctx, make_model, model_from_text, op_types, run_ort, value_info
from onnxq.pipeline import Pipeline
from onnxq.passes.constant_folding import ConstantFoldingPass, fold_constants
from onnxq.passes.fold_batchnorm import FoldBatchNormPass, fold_batchnorm
from onnxq.passes.remove_dead_nodes import RemoveDeadNodesPass, remove_dead_nodes
from onnxq.passes.shape_inference import ShapeInferencePass, infer_shapes
from onnxq.passes.upcast_float16 import UpcastFloat16Pass, upcast_float16

RNG_SEED = 0


def _graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


# --------------------------------------------------------------------------------------- shape inference


SHAPE_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3, 4] x) => (float[6, 4] y) <int64[2] shape = {6, 4}> {
    r = Relu(x)
    t = Transpose<perm = [0, 2, 1]>(r)
    u = Transpose<perm = [0, 2, 1]>(t)
    y = Reshape(u, shape)
}
"""


def test_shape_inference_types_every_tensor() -> None:
    model = model_from_text(SHAPE_MODEL)
    graph = _graph(model)
    assert graph.tensors()["t"].shape is None
    ctx = make_ctx()
    result = ShapeInferencePass()(graph, ctx)
    tensors = graph.tensors()
    assert result.modified
    assert tensors["t"].shape == [2, 4, 3] and tensors["t"].dtype == np.float32
    assert result.counts["tensors_without_shape"] == 0
    assert result.counts["tensors_with_shape"] == 5  # x, r, t, u, y
    # (a) the graph itself is unchanged, (b) same numbers, (c) valid.
    assert op_types(graph) == ["Relu", "Transpose", "Transpose", "Reshape"]
    x = np.random.default_rng(RNG_SEED).standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(run_ort(graph, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=0, atol=0)
    full_check(graph)
    # Already inferred: a second run changes nothing.
    assert not ShapeInferencePass()(graph, ctx).modified


def test_shape_inference_keeps_going_past_an_unknown_op() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Mystery", ["r"], ["m"], name="mystery", domain="com.example"),
        helper.make_node("Relu", ["m"], ["y"], name="relu2"),
    ]
    graph_proto = helper.make_graph(nodes, "g", [value_info("x", [2, 3])], [value_info("y", None)])
    model = helper.make_model(
        graph_proto, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    graph = infer_shapes(_graph(model))
    assert graph.tensors()["r"].shape == [2, 3]
    result = ShapeInferencePass().run(graph, make_ctx())
    assert result.counts["tensors_without_shape"] >= 1
    assert result.counts["tensors_without_shape"] == 2  # m (custom op output) and y (its Relu)
    assert any("e.g. m, y" in note for note in result.notes), result.notes
    assert [n.name for n in graph.nodes] == ["relu", "mystery", "relu2"]


def test_shape_inference_failure_is_a_note_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> onnx.ModelProto:
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] simulated")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", broken)
    graph = _graph(model_from_text(SHAPE_MODEL))
    result = ShapeInferencePass()(graph, make_ctx())
    assert not result.modified
    assert any("simulated" in note for note in result.notes)
    assert op_types(graph) == ["Relu", "Transpose", "Transpose", "Reshape"]


# -------------------------------------------------------------------------------------- constant folding


SHAPE_CHAIN_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3, 4] x) => (float[2, 5] y) <float[5, 12] w_t, int64 zero = {0}, int64[1] axes = {0}, int64[1] minus1 = {-1}> {
    s = Shape(x)
    n = Gather(s, zero)
    n1 = Unsqueeze(n, axes)
    new_shape = Concat<axis = 0>(n1, minus1)
    flat = Reshape(x, new_shape)
    w = Transpose<perm = [1, 0]>(w_t)
    two = Constant<value = float {2.0}>()
    w2 = Mul(w, two)
    y = MatMul(flat, w2)
}
"""


def _text_with_weight(text: str, name: str, arr: np.ndarray) -> onnx.ModelProto:
    """Parse ONNX text whose ``<type[shape] name>`` declares an initializer without values; set them."""
    model = onnx.parser.parse_model(text)
    declared = [vi for vi in model.graph.value_info if vi.name == name]
    assert declared, f"{name} is not declared in the text"
    model.graph.value_info.remove(declared[0])
    model.graph.initializer.append(initializer(name, arr))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_constant_folding_folds_shape_chain_and_weight_arithmetic() -> None:
    rng = np.random.default_rng(RNG_SEED)
    model = _text_with_weight(SHAPE_CHAIN_MODEL, "w_t", rng.standard_normal((5, 12)).astype(np.float32))
    graph = _graph(model)
    result = ConstantFoldingPass()(graph, make_ctx())
    assert result.modified
    assert op_types(graph) == ["Reshape", "MatMul"]
    assert result.counts["nodes_folded"] == 7
    reshape_shape = graph.nodes[0].inputs[1]
    assert isinstance(reshape_shape, gs.Constant) and reshape_shape.values.tolist() == [2, -1]
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(run_ort(graph, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-6, atol=1e-6)
    full_check(graph)


def test_constant_folding_keeps_dequantize_of_int8_weight() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4] x) => (float[2, 3] y) <int8[3, 4] wq, float scale = {0.05}, int8 zp = {0}> {
        w = DequantizeLinear(wq, scale, zp)
        wt = Transpose<perm = [1, 0]>(w)
        y = MatMul(x, wt)
    }
    """
    rng = np.random.default_rng(RNG_SEED)
    model = _text_with_weight(text, "wq", rng.integers(-127, 128, (3, 4), dtype=np.int8))
    graph = _graph(model)
    result = ConstantFoldingPass()(graph, make_ctx())
    assert op_types(graph) == ["DequantizeLinear", "Transpose", "MatMul"]
    assert not result.modified and result.counts["nodes_folded"] == 0 and result.counts["qdq_kept"] == 1
    assert graph.nodes[0].inputs[0].values.dtype == np.int8
    x = rng.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(run_ort(graph, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=0, atol=0)
    full_check(graph)


def test_constant_folding_does_not_materialise_a_huge_expand() -> None:
    # Expand a [1, 4096] row to [8192, 4096] float32 = 128 MiB: computed at run time, never stored.
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[8192, 4096] x) => (float[8192, 4096] y) <float[1, 4096] row, int64[2] big = {8192, 4096}, int64[2] small = {4, 4096}> {
        e = Expand(row, big)
        y = Add(x, e)
        z = Expand(row, small)
    }
    """
    model = _text_with_weight(text, "row", np.linspace(-1, 1, 4096, dtype=np.float32)[None, :])
    model.graph.output.append(value_info("z", [4, 4096]))
    graph = _graph(model)
    result = ConstantFoldingPass()(graph, make_ctx())
    assert op_types(graph) == ["Expand", "Add"]  # the small Expand (z) is folded, the big one is not
    assert result.counts["nodes_folded"] == 1 and result.counts["nodes_kept_large"] == 1
    assert isinstance(graph.outputs[1], gs.Constant) and graph.outputs[1].shape == (4, 4096)
    assert any("Expand" in n and "128.0 MiB" in n for n in result.notes), result.notes
    assert all(not isinstance(t, gs.Constant) or t.values.nbytes < 1 << 20 for t in graph.tensors().values())
    # The graph (128 MiB input) is not run here; the kept Expand is the original node, unchanged.
    full_check(graph)
    # The convenience form does the same and is idempotent.
    assert op_types(fold_constants(graph)) == ["Expand", "Add"]


# ----------------------------------------------------------------------------------- BatchNorm folding


def _bn_params(rng: np.random.Generator, c: int, prefix: str = "bn") -> list[onnx.TensorProto]:
    return [
        initializer(f"{prefix}_scale", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        initializer(f"{prefix}_bias", rng.standard_normal(c).astype(np.float32)),
        initializer(f"{prefix}_mean", rng.standard_normal(c).astype(np.float32)),
        initializer(f"{prefix}_var", rng.uniform(0.5, 2.0, c).astype(np.float32)),
    ]


def _bn_node(x: str, y: str, prefix: str = "bn") -> onnx.NodeProto:
    names = [x] + [f"{prefix}_{p}" for p in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", names, [y], name=prefix, epsilon=1e-3)


def _conv_bn_model(rng: np.random.Generator, *, bias: bool, extra_consumer: bool = False) -> onnx.ModelProto:
    conv_inputs = ["x", "w"] + (["b"] if bias else [])
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]), _bn_node("c", "y")]
    outputs = [value_info("y", [1, 4, 5, 5])]
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
        outputs.append(value_info("r", [1, 4, 5, 5]))
    inits = [initializer("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))] + _bn_params(rng, 4)
    if bias:
        inits.append(initializer("b", rng.standard_normal(4).astype(np.float32)))
    return make_model(nodes, [value_info("x", [1, 3, 5, 5])], outputs, inits)


@pytest.mark.parametrize("bias", [True, False])
def test_fold_batchnorm_into_conv(bias: bool) -> None:
    rng = np.random.default_rng(RNG_SEED)
    model = _conv_bn_model(rng, bias=bias)
    graph = _graph(model)
    result = FoldBatchNormPass()(graph, make_ctx())
    assert result.modified and result.counts == {"batchnorms_folded": 1, "batchnorms_kept": 0}
    assert op_types(graph) == ["Conv"]
    assert graph.nodes[0].outputs[0].name == "y" and len(graph.nodes[0].inputs) == 3
    x = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run_ort(graph, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-5)
    full_check(graph)


def test_fold_batchnorm_into_grouped_conv_transpose() -> None:
    rng = np.random.default_rng(RNG_SEED)
    # ConvTranspose weight [C_in=4, M/group=3, k, k] with group=2 -> 6 output channels.
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="deconv", group=2, strides=[2, 2]),
        _bn_node("c", "y"),
    ]
    inits = [initializer("w", rng.standard_normal((4, 3, 2, 2)).astype(np.float32))] + _bn_params(rng, 6)
    model = make_model(nodes, [value_info("x", [1, 4, 3, 3])], [value_info("y", [1, 6, 6, 6])], inits)
    graph = fold_batchnorm(_graph(model))
    assert op_types(graph) == ["ConvTranspose"]
    x = rng.standard_normal((1, 4, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(run_ort(graph, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-5)
    full_check(graph)


@pytest.mark.parametrize(("trans_b", "with_c", "beta"), [(1, True, 1.0), (0, True, 0.5), (0, False, 1.0), (1, True, 0.0)])
def test_fold_batchnorm_into_gemm(trans_b: int, with_c: bool, beta: float) -> None:
    rng = np.random.default_rng(RNG_SEED)
    w_shape = (6, 5) if trans_b else (5, 6)
    inputs = ["x", "w"] + (["c"] if with_c else [])
    nodes = [
        helper.make_node("Gemm", inputs, ["g"], name="gemm", transB=trans_b, beta=beta, alpha=0.7),
        _bn_node("g", "y"),
    ]
    inits = [initializer("w", rng.standard_normal(w_shape).astype(np.float32))] + _bn_params(rng, 6)
    if with_c:
        inits.append(initializer("c", rng.standard_normal((1, 6)).astype(np.float32)))
    model = make_model(nodes, [value_info("x", [3, 5])], [value_info("y", [3, 6])], inits)
    graph = fold_batchnorm(_graph(model))
    assert op_types(graph) == ["Gemm"]
    x = rng.standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_allclose(run_ort(graph, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-5)
    full_check(graph)


def test_fold_batchnorm_float16_weights_stay_float16() -> None:
    rng = np.random.default_rng(RNG_SEED)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn_node("c", "y")]
    inits = [initializer("w", rng.standard_normal((4, 3, 1, 1)).astype(np.float16))]
    inits += [initializer(t.name, numpy_helper.to_array(t).astype(np.float16)) for t in _bn_params(rng, 4)]
    model = make_model(nodes, [value_info("x", [1, 3, 4, 4], TensorProto.FLOAT16)], [value_info("y", [1, 4, 4, 4], TensorProto.FLOAT16)], inits)
    graph = fold_batchnorm(_graph(model))
    assert op_types(graph) == ["Conv"]
    assert all(t.values.dtype == np.float16 for t in graph.nodes[0].inputs[1:])
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float16)
    np.testing.assert_allclose(
        run_ort(graph, {"x": x})[0].astype(np.float32), run_ort(model, {"x": x})[0].astype(np.float32), rtol=1e-2, atol=2e-2
    )
    full_check(graph)


def test_fold_batchnorm_must_not_fire_when_conv_output_has_another_consumer() -> None:
    rng = np.random.default_rng(RNG_SEED)
    model = _conv_bn_model(rng, bias=True, extra_consumer=True)
    graph = _graph(model)
    result = FoldBatchNormPass()(graph, make_ctx())
    assert not result.modified and result.counts == {"batchnorms_folded": 0, "batchnorms_kept": 1}
    assert "other consumers" in result.notes[0] and "'bn'" in result.notes[0]
    assert op_types(graph) == ["Conv", "BatchNormalization", "Relu"]
    assert np.array_equal(graph.nodes[0].inputs[1].values, numpy_helper.to_array(model.graph.initializer[0]))
    full_check(graph)


def test_fold_batchnorm_keeps_bn_on_graph_input_and_non_constant_params() -> None:
    rng = np.random.default_rng(RNG_SEED)
    nodes = [
        _bn_node("x", "a", prefix="bn_in"),
        helper.make_node("Conv", ["a", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "s", "bn_bias", "bn_mean", "bn_var"], ["y"], name="bn_var_scale"),
    ]
    inits = [initializer("w", rng.standard_normal((4, 3, 1, 1)).astype(np.float32))]
    inits += _bn_params(rng, 3, prefix="bn_in") + _bn_params(rng, 4)[1:]
    model = make_model(
        nodes,
        [value_info("x", [1, 3, 4, 4]), value_info("s", [4])],
        [value_info("y", [1, 4, 4, 4])],
        inits,
    )
    graph = _graph(model)
    result = FoldBatchNormPass()(graph, make_ctx())
    assert result.counts == {"batchnorms_folded": 0, "batchnorms_kept": 2}
    assert op_types(graph) == ["BatchNormalization", "Conv", "BatchNormalization"]
    assert any("graph input" in n for n in result.notes) and any("not constants" in n for n in result.notes)


# -------------------------------------------------------------------------------------- dead nodes


DEAD_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y, float[2, 3] x_copy) <float ratio = {0.5}, bool training = {0}> {
    a = Identity(x)
    r = Relu(a)
    d = Dropout(r, ratio, training)
    n = Neg(d)
    unused = Exp(n)
    y = Identity(n)
    x_copy = Identity(x)
}
"""


def test_remove_dead_nodes_drops_identity_dropout_and_dead_branches() -> None:
    model = model_from_text(DEAD_MODEL)
    graph = _graph(model)
    result = RemoveDeadNodesPass()(graph, make_ctx())
    assert result.modified
    assert sorted(op_types(graph)) == ["Identity", "Neg", "Relu"]  # Identity x -> x_copy (input to output) stays
    assert result.counts == {"nodes_removed": 4, "identities_removed": 2, "dropouts_removed": 1}
    assert [t.name for t in graph.outputs] == ["y", "x_copy"] and [t.name for t in graph.inputs] == ["x"]
    assert next(n for n in graph.nodes if n.op == "Neg").outputs[0].name == "y"
    x = np.random.default_rng(RNG_SEED).standard_normal((2, 3)).astype(np.float32)
    for got, want in zip(run_ort(graph, {"x": x}), run_ort(model, {"x": x})):
        np.testing.assert_allclose(got, want, rtol=0, atol=0)
    full_check(graph)


def test_remove_dead_nodes_keeps_dropout_whose_mask_is_used() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y, bool[2, 3] mask) {
        y, mask = Dropout(x)
    }
    """
    graph = remove_dead_nodes(_graph(model_from_text(text)))
    assert op_types(graph) == ["Dropout"]
    result = RemoveDeadNodesPass()(graph, make_ctx())
    assert not result.modified and result.counts["nodes_removed"] == 0
    full_check(graph)


# ------------------------------------------------------------------------------------------ upcast


def _fp16_model(rng: np.random.Generator) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
        helper.make_node("Constant", [], ["k"], name="k", value=initializer("kv", np.array([0.5, -1.0, 2.0], np.float16))),
        helper.make_node("Add", ["m", "k"], ["a"], name="add"),
        helper.make_node("Cast", ["a"], ["a32"], name="to32", to=TensorProto.FLOAT),
        helper.make_node("Relu", ["a32"], ["r"], name="relu"),
        helper.make_node("Cast", ["r"], ["r16"], name="to16", to=TensorProto.FLOAT16),
        helper.make_node("Softmax", ["r16"], ["y"], name="softmax", axis=-1),
        helper.make_node("Neg", ["y"], ["z"], name="neg"),
    ]
    w = initializer("w", rng.standard_normal((4, 3)).astype(np.float16))
    return make_model(
        nodes,
        [value_info("x", [2, 4], TensorProto.FLOAT16)],
        [value_info("y", [2, 3], TensorProto.FLOAT16), value_info("z", [2, 3], TensorProto.FLOAT16)],
        [w],
    )


def test_upcast_float16_computes_in_float32_with_float16_interface() -> None:
    rng = np.random.default_rng(RNG_SEED)
    model = _fp16_model(rng)
    graph = _graph(model)
    ctx = make_ctx()
    result = UpcastFloat16Pass()(graph, ctx)
    assert result.modified and ctx.source_float_dtype == "float16"
    assert result.counts["initializers_upcast"] == 2 and result.counts["casts_inserted"] == 3
    assert op_types(graph).count("Cast") == 5
    names = {n.name for n in graph.nodes}
    assert {"x/cast_to_float32", "y/cast_to_float16", "z/cast_to_float16"} <= names
    # Interface unchanged: names and float16 types.
    exported = full_check(graph)
    assert [(v.name, v.type.tensor_type.elem_type) for v in exported.graph.input] == [("x", TensorProto.FLOAT16)]
    assert [(v.name, v.type.tensor_type.elem_type) for v in exported.graph.output] == [
        ("y", TensorProto.FLOAT16),
        ("z", TensorProto.FLOAT16),
    ]
    # Inside, everything is float32.
    assert all(t.values.dtype == np.float32 for t in graph.tensors().values() if isinstance(t, gs.Constant))
    assert all(n.attrs["to"] != TensorProto.FLOAT16 for n in graph.nodes if n.op == "Cast" and n.name == "to16")
    x = rng.standard_normal((2, 4)).astype(np.float16)
    got, want = run_ort(graph, {"x": x}), run_ort(model, {"x": x})
    for g, w in zip(got, want):
        assert g.dtype == np.float16
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=1e-2, atol=2e-3)


def test_upcast_bfloat16_keeps_bfloat16_interface() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    w = np.array([1.5, -2.0, 0.25], dtype=ml_dtypes.bfloat16)
    init = helper.make_tensor("w", TensorProto.BFLOAT16, [3], w.astype(np.float32).tolist())
    nodes = [helper.make_node("Mul", ["x", "w"], ["y"], name="mul")]
    model = make_model(nodes, [value_info("x", [3], TensorProto.BFLOAT16)], [value_info("y", [3], TensorProto.BFLOAT16)], [init])
    graph = _graph(model)
    ctx = make_ctx()
    result = UpcastFloat16Pass()(graph, ctx)
    assert result.modified and ctx.source_float_dtype == "bfloat16"
    assert op_types(graph) == ["Cast", "Mul", "Cast"]
    assert [n.name for n in graph.nodes if n.op == "Cast"] == ["x/cast_to_float32", "y/cast_to_bfloat16"]
    exported = full_check(graph)
    assert exported.graph.output[0].type.tensor_type.elem_type == TensorProto.BFLOAT16
    # ORT's Python API passes bfloat16 in only as an OrtValue of the raw uint16 bits, and cannot hand a
    # bfloat16 output back: read y through a test-only Cast to float32 appended to the exported model.
    probe = onnx.ModelProto()
    probe.CopyFrom(exported)
    probe.graph.node.append(helper.make_node("Cast", ["y"], ["y_probe"], to=TensorProto.FLOAT))
    probe.graph.output.append(value_info("y_probe", [3]))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.array([1.0, 3.0, -4.0], dtype=ml_dtypes.bfloat16)
    feed = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(x.view(np.uint16), TensorProto.BFLOAT16)
    got = sess.run_with_ort_values(["y_probe"], {"x": feed})[0].numpy()
    np.testing.assert_allclose(got, x.astype(np.float32) * w.astype(np.float32), rtol=1e-2, atol=0)


def test_upcast_initializer_that_is_also_an_output_keeps_its_name_and_type() -> None:
    w = np.array([0.5, -1.0, 2.0], np.float16)
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    outputs = [value_info("y", [3], TensorProto.FLOAT16), value_info("w", [3], TensorProto.FLOAT16)]
    model = make_model(nodes, [value_info("x", [3], TensorProto.FLOAT16)], outputs, [initializer("w", w)])
    graph = upcast_float16(_graph(model))
    exported = full_check(graph)
    assert [(v.name, v.type.tensor_type.elem_type) for v in exported.graph.output] == [
        ("y", TensorProto.FLOAT16),
        ("w", TensorProto.FLOAT16),
    ]
    assert [(i.name, i.data_type) for i in exported.graph.initializer] == [("w/float32", TensorProto.FLOAT)]
    x = np.array([1.0, 2.0, 3.0], np.float16)
    for got, want in zip(run_ort(graph, {"x": x}), run_ort(model, {"x": x})):
        assert got.dtype == np.float16
        np.testing.assert_allclose(got, want, rtol=0, atol=0)


def test_upcast_leaves_float32_model_untouched() -> None:
    model = model_from_text(SHAPE_MODEL)
    graph = _graph(model)
    before = gs.export_onnx(graph).SerializeToString()
    ctx = make_ctx()
    result = UpcastFloat16Pass()(graph, ctx)
    assert not result.modified and result.counts["casts_inserted"] == 0
    assert ctx.source_float_dtype is None
    assert gs.export_onnx(upcast_float16(graph)).SerializeToString() == before


# ------------------------------------------------------------------------------------ real asset


@pytest.mark.assets
def test_preprocess_squeezenet_fp16(assets) -> None:
    path = asset(assets, "cnn/squeezenet1.1-fp16/model.onnx")
    original = onnx.load(str(path))
    # IR 3 / opset 7 with initializers listed as graph inputs: drop those inputs, then go to opset 13.
    graph = gs.import_onnx(original)
    graph.inputs = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
    legacy = gs.export_onnx(graph)
    legacy.ir_version = 7  # IR 3 requires initializers to be graph inputs; IR 4+ does not
    upgraded = onnx.version_converter.convert_version(legacy, 13)
    graph = gs.import_onnx(upgraded)

    ctx = make_ctx()
    passes = [UpcastFloat16Pass(), ShapeInferencePass(), ConstantFoldingPass(), FoldBatchNormPass(), RemoveDeadNodesPass()]
    graph = Pipeline(passes, checked=True).run(graph, ctx)
    assert ctx.source_float_dtype == "float16"
    assert "Dropout" not in op_types(graph)
    assert op_types(graph).count("Conv") == 26

    final = full_check(graph)
    assert [(v.name, v.type.tensor_type.elem_type) for v in final.graph.input] == [("data_0", TensorProto.FLOAT16)]
    assert [v.type.tensor_type.elem_type for v in final.graph.output] == [TensorProto.FLOAT16]
    assert final.graph.output[0].name == original.graph.output[0].name
    dtypes = {init.data_type for init in final.graph.initializer}
    assert TensorProto.FLOAT16 not in dtypes and TensorProto.FLOAT in dtypes, "weights are float32 inside"

    x = np.random.default_rng(RNG_SEED).uniform(0.0, 1.0, (1, 3, 224, 224)).astype(np.float16)
    want = run_ort(original, {"data_0": x})[0]
    got = run_ort(final, {"data_0": x})[0]
    assert got.dtype == np.float16 and got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=0, atol=2e-2)
    assert int(np.argmax(got)) == int(np.argmax(want))


# ------------------------------------------------------------------- constant folding of LLM exports


def test_constant_folding_keeps_the_transpose_of_a_tied_weight_and_quantization_passes_fold_it() -> None:
    """Optimum's tied embedding: Gather reads the table, Transpose -> lm_head MatMul reads it transposed. Folding the
    Transpose would store the table twice (108 MiB for SmolLM2); it is kept, and folded by the weight passes."""
    from llm_graphs import optimum_llm, run_prefill, session, token_ids

    from onnxq.passes.constant_folding import materialize_weight_transposes

    model = optimum_llm()
    graph = _graph(model)
    result = ConstantFoldingPass(max_output_bytes=16 << 10)(graph, make_ctx())  # the table is 32 KiB
    kept = [n for n in graph.nodes if n.op == "Transpose" and isinstance(n.inputs[0], gs.Constant)]
    assert [n.name for n in kept] == ["/lm_head/Transpose"] and result.counts["nodes_kept_large"] == 1
    assert any("second copy of initializer 'model.embed_tokens.weight'" in n for n in result.notes), result.notes
    assert materialize_weight_transposes(graph, 64 << 20) == 0  # only what folding kept under the same limit
    assert materialize_weight_transposes(graph, 16 << 10) == 1
    lm_head = next(n for n in graph.nodes if n.name == "/lm_head/MatMul")
    assert isinstance(lm_head.inputs[1], gs.Constant) and lm_head.inputs[1].shape == (64, 128)
    ids = token_ids(6)
    want = run_prefill(session(model), ids, 16)[0]
    np.testing.assert_array_equal(run_prefill(session(gs.export_onnx(graph)), ids, 16)[0], want)


def test_constant_folding_folds_an_unshared_transposed_weight_over_the_limit() -> None:
    model = _text_with_weight("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 64] x) => (float[1, 128] y) <float[128, 64] w> {
        wt = Transpose<perm = [1, 0]>(w)
        y = MatMul(x, wt)
    }
    """, "w", np.ones((128, 64), np.float32))
    graph = _graph(model)
    result = ConstantFoldingPass(max_output_bytes=1 << 10)(graph, make_ctx())
    assert op_types(graph) == ["MatMul"] and result.counts["nodes_kept_large"] == 0


def test_constant_folding_evaluates_the_whole_graph_once_and_partitions_only_when_that_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real = gs.Graph.fold_constants

    def spy(self: gs.Graph, *args: object, **kwargs: object) -> gs.Graph:
        calls.append(kwargs.get("partitioning"))
        if kwargs.get("partitioning") is None and fail:
            raise RuntimeError("ORT cannot run the whole foldable subgraph")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gs.Graph, "fold_constants", spy)
    fail = False
    for fail in (False, True):
        calls.clear()
        weight = np.random.default_rng(RNG_SEED).standard_normal((5, 12)).astype(np.float32)
        graph = _graph(_text_with_weight(SHAPE_CHAIN_MODEL, "w_t", weight))
        result = ConstantFoldingPass()(graph, make_ctx())
        assert result.counts["nodes_folded"] == 7 and op_types(graph) == ["Reshape", "MatMul"], result.counts
        assert calls[:2] == ([None, "recursive"] if fail else [None, None])
