"""insert_qdq: op types left, numerics in ORT (SQNR floors), full checker, and where it must not fire."""

from __future__ import annotations

import functools
import platform

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import full_check, make_ctx, make_model, op_types, run_ort, sqnr_db, value_info

from onnxq.calibration.runner import CalibrationSession
from onnxq.calibration.sources import RandomSource, input_specs
from onnxq.errors import CalibrationError
from onnxq.model import to_model
from onnxq.passes import InsertQDQPass
from onnxq.recipe import CalibrationSpec, ExcludeSpec, Recipe, WeightSpec
from onnxq.target import cpu_features, detect_target

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _reseed() -> None:
    """Every test sees the same random data whatever runs before it."""
    RNG.bit_generator.state = np.random.default_rng(0).bit_generator.state


_graph = functools.partial(make_model, opset=13, infer_shapes=True)  # opset 13 models with inferred shapes


def _quantize(model: onnx.ModelProto, recipe: Recipe | None = None, target: str = "x86-vnni", samples: int = 16):
    recipe = recipe or Recipe(calibration=CalibrationSpec(method="minmax", samples=samples, device="cpu"))
    source = RandomSource(input_specs(model), count=samples, seed=1)
    ctx = make_ctx(target, calibration=CalibrationSession(source, recipe.calibration, progress=False))
    graph = gs.import_onnx(model)
    result = InsertQDQPass.from_recipe(recipe)(graph, ctx)
    out = to_model(result.graph, template=model)
    full_check(out)
    return out, result, ctx


def _conv_relu_model(act: str = "Relu", clip: tuple[float, float] = (0.0, 6.0)) -> onnx.ModelProto:
    w = RNG.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3
    b = RNG.normal(size=(8,)).astype(np.float32) * 0.1
    inits = {"w": w, "b": b, "w2": RNG.normal(size=(4, 8, 1, 1)).astype(np.float32) * 0.3}
    nodes = [onnx.helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv1", pads=[1, 1, 1, 1])]
    if act == "Relu":
        nodes.append(onnx.helper.make_node("Relu", ["c"], ["r"], name="act"))
    else:
        inits["lo"], inits["hi"] = np.array(clip[0], np.float32), np.array(clip[1], np.float32)
        nodes.append(onnx.helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="act"))
    nodes.append(onnx.helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"))
    return _graph(nodes, [value_info("x", [1, 3, 8, 8])], [value_info("y", [1, 4, 8, 8])], inits)


def _feed(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("act", ["Relu", "Clip"])
def test_conv_relu_clip_absorbed_exactly(act: str) -> None:
    model = _conv_relu_model(act)
    q, result, _ = _quantize(model)
    ops = op_types(q)
    assert act not in ops, f"{act} should be absorbed into the quantization of its input: {ops}"
    assert ops.count("Conv") == 2 and ops.count("QuantizeLinear") == 2  # x and the conv1/act output
    assert result.counts["activations_absorbed"] == 1
    assert result.counts["biases_quantized"] == 1
    feed = _feed(model)
    ref, got = run_ort(model, feed)[0], run_ort(q, feed)[0]
    assert sqnr_db(ref, got) > 25, f"SQNR {sqnr_db(ref, got):.1f} dB"


def test_fused_kernels_match_exact_qdq_with_the_detected_profile() -> None:
    """With this CPU's own profile, ORT's fused integer kernels compute what the QDQ graph says."""
    model = _conv_relu_model("Relu")
    q, _, _ = _quantize(model, target=detect_target()[0].name)
    for seed in range(5):
        feed = {"x": np.random.default_rng(seed).normal(size=(1, 3, 8, 8)).astype(np.float32) * 3}
        exact, fused = run_ort(q, feed)[0], run_ort(q, feed, optimize=True)[0]
        step = np.abs(exact).max() / 64
        assert np.abs(exact - fused).max() <= step, f"fused differs by {np.abs(exact - fused).max():.3f}"


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or any(cpu_features()[k] for k in ("avx512_vnni", "avx_vnni", "amx_int8")),
    reason="the int16 saturation exists only on x86 CPUs without VNNI",
)
def test_full_range_weights_saturate_on_this_cpu() -> None:
    """The reason for the x86-avx2 profile: 8-bit weights make ORT's u8 x s8 kernels saturate here."""
    w = np.full((8, 16, 1, 1), 1.0, np.float32)
    w[:, ::2] = -1.0
    w[0, 0] = 1.0  # large same-sign neighbours: u8 * s8 pairs overflow int16
    nodes = [onnx.helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             onnx.helper.make_node("Relu", ["c"], ["y0"], name="r"),
             onnx.helper.make_node("Conv", ["y0", "w2"], ["y"], name="conv2")]  # fmt: skip
    inits = {"w": np.abs(w), "w2": np.ones((1, 8, 1, 1), np.float32)}
    model = _graph(nodes, [value_info("x", [1, 16, 4, 4])], [value_info("y", [1, 1, 4, 4])], inits)
    feed = {"x": np.full((1, 16, 4, 4), 4.0, np.float32)}
    errors = {}
    for target in ("x86-vnni", "x86-avx2"):
        q, _, _ = _quantize(model, target=target)
        errors[target] = float(np.abs(run_ort(q, feed)[0] - run_ort(q, feed, optimize=True)[0]).max())
    assert errors["x86-vnni"] > 10 * max(errors["x86-avx2"], 1e-3), errors


def test_clip_with_negative_floor_is_kept() -> None:
    model = _conv_relu_model("Clip", clip=(-1.0, 1.0))
    q, result, _ = _quantize(model)
    assert "Clip" in op_types(q)
    assert result.counts["activations_absorbed"] == 0
    feed = _feed(model)
    assert sqnr_db(run_ort(model, feed)[0], run_ort(q, feed)[0]) > 25


def test_symmetric_activations_do_not_absorb_relu() -> None:
    """With int8 symmetric activations the zero point is 0, so codes below it are negative: keep Relu."""
    model = _conv_relu_model("Relu")
    q, result, _ = _quantize(model, target="cuda")
    assert "Relu" in op_types(q) and result.counts["activations_absorbed"] == 0


def _matmul_model(shared: bool = True) -> onnx.ModelProto:
    w = RNG.normal(size=(16, 16)).astype(np.float32)
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
        onnx.helper.make_node("Relu", ["h"], ["r"], name="relu"),
        onnx.helper.make_node("MatMul", ["r", "w" if shared else "w2"], ["y"], name="mm2"),
    ]
    inits = {"w": w} if shared else {"w": w, "w2": w.copy()}
    return _graph(nodes, [value_info("x", [4, 16])], [value_info("y", [4, 16])], inits)


def test_tied_weights_quantized_once() -> None:
    q, result, _ = _quantize(_matmul_model(shared=True))
    weight_dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w_quantized"]
    assert len(weight_dqs) == 1 and result.counts["shared_weights"] == 1
    assert not any(i.name == "w" for i in q.graph.initializer), "float copy of the weight must be gone"
    consumers = [n.name for n in q.graph.node if weight_dqs[0].output[0] in n.input]
    assert consumers == ["mm1", "mm2"]


def test_graph_output_stays_float_and_per_channel_axis() -> None:
    model = _matmul_model(shared=False)
    q, _, _ = _quantize(model)
    out_producer = next(n for n in q.graph.node if "y" in n.output)
    assert out_producer.op_type == "MatMul", "the graph output must not pass through Q/DQ"
    w_dq = next(n for n in q.graph.node if n.name == "w/DequantizeLinear")
    assert onnx.helper.get_attribute_value(w_dq.attribute[0]) == 1  # MatMul weight [K, N]: per column
    feed = {"x": RNG.normal(size=(4, 16)).astype(np.float32)}
    assert sqnr_db(run_ort(model, feed)[0], run_ort(q, feed)[0]) > 25


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weight_axis_follows_transb(trans_b: int) -> None:
    w = RNG.normal(size=(10, 6) if trans_b else (6, 10)).astype(np.float32)
    nodes = [onnx.helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="fc", transB=trans_b),
             onnx.helper.make_node("Relu", ["g"], ["y"], name="r")]  # fmt: skip
    model = _graph(nodes, [value_info("x", [2, 6])], [value_info("y", [2, 10])], {"w": w, "b": np.ones(10, np.float32)})
    q, result, _ = _quantize(model)
    dq = next(n for n in q.graph.node if n.name == "w/DequantizeLinear")
    assert onnx.helper.get_attribute_value(dq.attribute[0]) == (0 if trans_b else 1)
    assert result.counts["biases_quantized"] == 1
    feed = {"x": RNG.normal(size=(2, 6)).astype(np.float32)}
    assert sqnr_db(run_ort(model, feed)[0], run_ort(q, feed)[0]) > 25


def test_bias_scale_is_input_scale_times_weight_scale() -> None:
    q, _, _ = _quantize(_conv_relu_model("Relu"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    bias_scale = next(v for k, v in inits.items() if k.startswith("b_scale"))
    np.testing.assert_allclose(bias_scale, inits["x_scale"] * inits["w_scale"], rtol=1e-6)
    assert next(v for k, v in inits.items() if k.startswith("b_quantized")).dtype == np.int32


def test_x86_avx2_profile_limits_gemm_weights_but_not_depthwise() -> None:
    dw = RNG.normal(size=(4, 1, 3, 3)).astype(np.float32)
    pw = RNG.normal(size=(8, 4, 1, 1)).astype(np.float32)
    nodes = [onnx.helper.make_node("Conv", ["x", "dw"], ["a"], name="dw", group=4, pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Relu", ["a"], ["r"], name="relu"),
             onnx.helper.make_node("Conv", ["r", "pw"], ["y"], name="pw")]  # fmt: skip
    model = _graph(nodes, [value_info("x", [1, 4, 6, 6])], [value_info("y", [1, 8, 6, 6])], {"dw": dw, "pw": pw})
    q, _, _ = _quantize(model, target="x86-avx2")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    assert np.abs(inits["pw_quantized"].astype(int)).max() == 64  # 7-bit: no int16 saturation in VPMADDUBSW
    assert np.abs(inits["dw_quantized"].astype(int)).max() == 127  # depthwise kernel accumulates in int32
    q_u8, _, _ = _quantize(model, target="x86-avx2-u8")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q_u8.graph.initializer}
    assert inits["pw_quantized"].dtype == np.uint8 and int(inits["pw_zero_point"][0]) == 128


def test_pass_through_shares_input_parameters() -> None:
    nodes = [onnx.helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             onnx.helper.make_node("Reshape", ["c", "shape"], ["f"], name="flat"),
             onnx.helper.make_node("MatMul", ["f", "m"], ["y"], name="fc")]  # fmt: skip
    inits = {"w": RNG.normal(size=(2, 3, 1, 1)).astype(np.float32), "shape": np.array([1, 32], np.int64),
             "m": RNG.normal(size=(32, 5)).astype(np.float32)}  # fmt: skip
    model = _graph(nodes, [value_info("x", [1, 3, 4, 4])], [value_info("y", [1, 5])], inits)
    q, _, _ = _quantize(model)
    inits_q = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    assert inits_q["f_scale"] == inits_q["c_scale"] and inits_q["f_zero_point"] == inits_q["c_zero_point"]


def test_exclusions_leave_nodes_float() -> None:
    model = _matmul_model(shared=False)
    recipe = Recipe(calibration=CalibrationSpec(method="minmax", samples=8, device="cpu"), exclude=ExcludeSpec(names=("mm2",)))
    q, result, _ = _quantize(model, recipe)
    assert result.counts["nodes_excluded"] == 1
    mm2 = next(n for n in q.graph.node if n.name == "mm2")
    assert mm2.input[1] == "w2", "excluded node keeps its float weight"
    assert mm2.input[0] == "r", "excluded node reads the float activation"


def test_does_not_fire_without_quantizable_ops() -> None:
    nodes = [onnx.helper.make_node("Softmax", ["x"], ["y"], name="sm")]
    model = _graph(nodes, [value_info("x", [2, 5])], [value_info("y", [2, 5])], {})
    q, result, _ = _quantize(model)
    assert not result.modified and op_types(q) == ["Softmax"]


def test_needs_calibration() -> None:
    model = _matmul_model()
    ctx = make_ctx()
    with pytest.raises(CalibrationError, match="--calib"):
        InsertQDQPass()(gs.import_onnx(model), ctx)


def test_per_tensor_weights_option() -> None:
    recipe = Recipe(calibration=CalibrationSpec(method="minmax", samples=8, device="cpu"), weights=WeightSpec(granularity="per-tensor"))
    q, _, _ = _quantize(_matmul_model(shared=False), recipe)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    assert inits["w_scale"].shape == ()


def _mixed_model() -> onnx.ModelProto:
    """Every op type insert_qdq handles, in one small graph."""
    w = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32) * 0.3
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["c"], ["r"], name="relu"),
        onnx.helper.make_node("MaxPool", ["r"], ["mp"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        onnx.helper.make_node("AveragePool", ["r"], ["ap"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]),
        onnx.helper.make_node("Concat", ["mp", "ap"], ["cat"], name="concat", axis=1),
        onnx.helper.make_node("Mul", ["cat", "k"], ["m"], name="mul"),
        onnx.helper.make_node("Resize", ["m", "", "scales"], ["up"], name="resize", mode="nearest"),
        onnx.helper.make_node("Conv", ["x", "w2"], ["r2"], name="conv_side", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Add", ["up", "r2"], ["a"], name="add"),
        onnx.helper.make_node("Transpose", ["a"], ["t"], name="transpose", perm=[0, 2, 3, 1]),
        onnx.helper.make_node("Unsqueeze", ["t", "ax"], ["u"], name="unsqueeze"),
        onnx.helper.make_node("Squeeze", ["u", "ax"], ["s"], name="squeeze"),
        onnx.helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
        onnx.helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        onnx.helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
        onnx.helper.make_node("Softmax", ["s"], ["z"], name="softmax"),
    ]
    inits = {"w": w, "w2": RNG.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3, "k": np.array(0.5, np.float32),
             "scales": np.array([1, 1, 2, 2], np.float32), "ax": np.array([1], np.int64),
             "fc": RNG.normal(size=(5, 8)).astype(np.float32)}  # fmt: skip
    return _graph(nodes, [value_info("x", [1, 3, 8, 8])], [value_info("y", [1, 5]), value_info("z", [1, 8, 8, 8])], inits)


def test_all_supported_ops_quantize_and_run() -> None:
    model = _mixed_model()
    q, result, _ = _quantize(model, target=detect_target()[0].name)
    ops = op_types(q)
    for op in ("MaxPool", "AveragePool", "Concat", "Mul", "Resize", "Add", "Transpose", "Gemm"):
        assert op in ops
    dq_inputs = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    for name in ("concat", "add", "resize", "maxpool"):
        node = next(n for n in q.graph.node if n.name == name)
        assert node.input[0] in dq_inputs, f"{name} should read a dequantized tensor"
    # Transpose -> Unsqueeze -> Squeeze -> Softmax ends in float: the chain reads the exact tensor, while the
    # quantized GlobalAveragePool reads the dequantized copy of the same tensor
    assert next(n for n in q.graph.node if n.name == "transpose").input[0] == "a"
    assert next(n for n in q.graph.node if n.name == "gap").input[0] == "a_dequantized"
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    assert inits["mp_scale"] == inits["r_scale"], "MaxPool shares its input's scale"
    assert inits["k_quantized"].dtype == np.uint8, "constant operand quantized with the activation scheme"
    feed = _feed(model)
    ref, got = run_ort(model, feed), run_ort(q, feed)
    for r, g in zip(ref, got):
        assert sqnr_db(r, g) > 18, f"SQNR {sqnr_db(r, g):.1f} dB (about six requantizations deep)"
    for r, g in zip(got, run_ort(q, feed, optimize=True)):
        assert sqnr_db(r, g) > 30, "ORT's fused kernels must compute what the QDQ graph says"


def test_uint16_activations_need_and_get_opset_21() -> None:
    from onnxq.quantization import quantize_model
    from onnxq.recipe import preset

    model = _conv_relu_model("Relu")
    source = RandomSource(input_specs(model), count=4, seed=0)
    result = quantize_model(model, preset("w8a16"), source=source, checked=True)
    assert next(o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert inits["x_zero_point"].dtype == np.uint16
    feed = _feed(model)
    assert sqnr_db(run_ort(model, feed)[0], run_ort(result.model, feed)[0]) > 20


def _attention_like_model() -> onnx.ModelProto:
    """x @ Wq and x @ Wk (weights), then their product (two activations), then a residual Add and a Softmax."""
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        onnx.helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        onnx.helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[1, 0]),
        onnx.helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        onnx.helper.make_node("Add", ["s", "mask"], ["sm"], name="mask_add"),
        onnx.helper.make_node("Softmax", ["sm"], ["y"], name="softmax"),
    ]
    inits = {"wq": RNG.normal(size=(8, 8)).astype(np.float32), "wk": RNG.normal(size=(8, 8)).astype(np.float32),
             "mask": np.where(np.tril(np.ones((6, 6))) > 0, 0.0, -1e4).astype(np.float32)}  # fmt: skip
    return _graph(nodes, [value_info("x", [6, 8])], [value_info("y", [6, 6])], inits)


def test_activation_matmuls_quantized_by_default_and_excludable() -> None:
    model = _attention_like_model()
    q, _, _ = _quantize(model)
    readers = {n.name: list(n.input) for n in q.graph.node}
    assert all(t.endswith("_dequantized") for t in readers["scores"][:2])
    # the attention-mask Add feeds a float Softmax: never quantized (its -1e4 would flatten the scores' grid)
    assert "s" in readers["mask_add"] and "mask" in readers["mask_add"]
    recipe = Recipe(calibration=CalibrationSpec(method="minmax", samples=16, device="cpu"),
                    exclude=ExcludeSpec(activation_matmuls=True))  # fmt: skip
    q2, _, _ = _quantize(model, recipe)
    readers = {n.name: list(n.input) for n in q2.graph.node}
    assert readers["scores"] == ["q", "kt"], "activation x activation MatMul left in float"
    assert readers["q_proj"][0].endswith("_dequantized"), "weight MatMuls still quantized"
