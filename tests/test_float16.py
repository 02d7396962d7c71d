"""Tests for the float16 / bfloat16 conversion pass and the ``fp16`` preset.

The triad for each case (op types and dtypes after the pass, ORT numerics against the float32 model
within float16 tolerance, onnx.checker full check), the cases where it must not fire, recipe loading,
the CLI, and the real MobileNetV2 and MiniLM (marker ``assets``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx.reference
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import asset
from helpers import full_check, initializer, make_ctx, make_model, model_from_text, op_types, run_ort, value_info
from onnxq.errors import RecipeError
from onnxq.passes import PASSES
from onnxq.passes.float16 import DEFAULT_BLOCK_LIST, Float16Pass, convert_float16
from onnxq.pipeline import Pipeline
from onnxq.quantization import quantize_model
from onnxq.recipe import Float16Spec, preset, recipe_from_dict

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
RNG = np.random.default_rng(0)


def _convert(model: onnx.ModelProto, **kwargs):
    graph = gs.import_onnx(model)
    result = Float16Pass(**kwargs)(graph, make_ctx())
    return graph, result


def _dtypes(graph: gs.Graph) -> dict[str, object]:
    return {name: t.dtype for name, t in graph.tensors().items()}


def _cnn() -> onnx.ModelProto:
    """Conv -> Clip(0, 6) -> Add(residual) -> GlobalAveragePool -> Flatten -> Gemm (same weights every call)."""
    rng = np.random.default_rng(1)
    inits = [
        initializer("w", (rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32)),
        initializer("b", rng.standard_normal(4).astype(np.float32)),
        initializer("lo", np.array(0.0, np.float32)),
        initializer("hi", np.array(6.0, np.float32)),
        initializer("fc_w", rng.standard_normal((5, 4)).astype(np.float32)),
        initializer("fc_b", rng.standard_normal(5).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="clip"),
        helper.make_node("Add", ["r", "x"], ["s"], name="residual"),
        helper.make_node("GlobalAveragePool", ["s"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, [value_info("x", [1, 4, 8, 8])], [value_info("y", [1, 5])], inits, 13)


ATTENTION = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4, 8] x) => (float[2, 4, 8] y, float[2, 4] m) <float[8] g1 = {1.0, 0.5, 2.0, 1.5, 0.8, 1.2, 0.9, 1.1},
  float[8] b1 = {0.0, 1e-9, 0.1, -0.2, 0.0, 0.3, 0.0, -0.1}, float[1] scale = {0.35}> {
    ln = LayerNormalization<axis = -1>(x, g1, b1)
    xt = Transpose<perm = [0, 2, 1]>(ln)
    qk = MatMul(ln, xt)
    qs = Mul(qk, scale)
    p = Softmax<axis = -1>(qs)
    y = MatMul(p, ln)
    m = ReduceMean<axes = [2], keepdims = 0>(y)
}
"""


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Name each node after its first output (ONNX text syntax leaves node names empty)."""
    for node in model.graph.node:
        node.name = node.name or node.output[0]
    return model


def _attention() -> onnx.ModelProto:
    return _named(model_from_text(ATTENTION))


# ------------------------------------------------------------------------------------------ the triad


def test_cnn_computes_in_float16_with_float32_interface() -> None:
    model = _cnn()
    graph, result = _convert(model)
    assert result.modified
    # (a) ops and dtypes: the compute is float16, the interface float32 behind two named Casts
    assert op_types(graph) == ["Cast", "Conv", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm", "Cast"]
    casts = [n for n in graph.nodes if n.op == "Cast"]
    assert [n.name for n in casts] == ["x/cast_to_float16", "y/cast_to_float32"]
    dt = _dtypes(graph)
    assert dt["x"] == F32 and dt["y"] == F32
    assert all(dt[n] == F16 for n in ("w", "b", "lo", "hi", "c", "r", "s", "p", "f", "fc_w", "fc_b", "y/float16"))
    assert result.counts == {"initializers_converted": 6, "values_clamped": 0, "values_flushed_to_zero": 0,
                             "casts_inserted": 2, "nodes_converted": 6, "nodes_kept_float32": 0}  # fmt: skip
    # (b) numerics within float16 tolerance, (c) valid
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(graph, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-2, atol=1e-2)
    full_check(graph)


def test_block_list_keeps_layernorm_softmax_and_reductions_float32() -> None:
    model = _attention()
    graph, result = _convert(model)
    nodes = {n.name: n for n in graph.nodes}
    kept = [n for n in graph.nodes if n.op in ("LayerNormalization", "Softmax", "ReduceMean")]
    for node in kept:
        assert all(t.dtype == F32 for t in node.inputs + node.outputs), node
    # Casts around each kept node, named after it; the LayerNorm's own weights stay float32 (only it reads them)
    # (x feeds only the LayerNorm: no Cast; y's output Cast also feeds the ReduceMean)
    cast_names = sorted(n.name for n in graph.nodes if n.op == "Cast")
    assert cast_names == ["ln/cast_to_float16", "m/cast_to_float32", "p/cast_to_float16", "p/cast_to_float32"]
    assert graph.outputs[0].inputs[0].name == "m/cast_to_float32" and nodes["m"].inputs[0] is graph.outputs[0]
    assert nodes["ln"].inputs[1].dtype == F32 and nodes["ln"].inputs[1].name == "g1"
    assert nodes["qk"].inputs[0].dtype == F16 and nodes["qs"].inputs[1].dtype == F16
    assert result.counts["nodes_kept_float32"] == 3
    assert result.counts["nodes_converted"] == 4  # Transpose, MatMul, Mul, MatMul
    assert any("LayerNormalization x1 (block list)" in note for note in result.notes)
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    for got, want in zip(run_ort(graph, {"x": x}), run_ort(model, {"x": x})):
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    full_check(graph)


def test_empty_block_list_converts_everything_the_schema_allows() -> None:
    graph, result = _convert(_attention(), op_block_list=())
    assert result.counts["nodes_kept_float32"] == 0
    assert op_types(graph).count("Cast") == 3  # x in, y and m out
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    for got, want in zip(run_ort(graph, {"x": x}), run_ort(_attention(), {"x": x})):
        np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2)
    full_check(graph)


def test_node_block_list_keeps_named_node_float32() -> None:
    graph, result = _convert(_cnn(), node_block_list=("fc",))
    fc = next(n for n in graph.nodes if n.name == "fc")
    assert all(t.dtype == F32 for t in fc.inputs + fc.outputs)
    assert [n.name for n in graph.nodes if n.op == "Cast"] == ["x/cast_to_float16", "fc/cast_to_float32"]
    assert result.counts["nodes_kept_float32"] == 1
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(graph, {"x": x})[0], run_ort(_cnn(), {"x": x})[0], rtol=1e-2, atol=1e-2)
    full_check(graph)


def test_out_of_range_initializers_are_clamped_and_tiny_ones_flushed() -> None:
    big = np.array([1e5, -7e4, 3.0, 1e-9, 0.0, np.inf], np.float32)
    model = make_model(
        [helper.make_node("Add", ["x", "c"], ["s"], name="add"), helper.make_node("Relu", ["s"], ["y"], name="relu")],
        [value_info("x", [6])], [value_info("y", [6])], [initializer("c", big)],
    )  # fmt: skip
    graph, result = _convert(model)
    assert result.counts["values_clamped"] == 2 and result.counts["values_flushed_to_zero"] == 1
    c = graph.tensors()["c"]
    np.testing.assert_array_equal(np.asarray(c.values), np.array([65504, -65504, 3, 0, 0, np.inf], np.float16))
    x = np.zeros(6, np.float32)
    got = run_ort(graph, {"x": x})[0]
    np.testing.assert_array_equal(got, np.array([65504, 0, 3, 0, 0, np.inf], np.float32))  # finite where fp32 was
    full_check(graph)


@pytest.mark.parametrize("keep", [True, False])
def test_keep_io_types(keep: bool) -> None:
    model = _cnn()
    graph, result = _convert(model, keep_io_types=keep)
    want = F32 if keep else F16
    assert graph.inputs[0].dtype == want and graph.outputs[0].dtype == want
    assert graph.inputs[0].name == "x" and graph.outputs[0].name == "y"
    assert op_types(graph).count("Cast") == (2 if keep else 0)
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    got = run_ort(graph, {"x": x.astype(want)})[0]
    assert got.dtype == want
    np.testing.assert_allclose(got.astype(np.float32), run_ort(model, {"x": x})[0], rtol=1e-2, atol=1e-2)
    full_check(graph)


def test_kept_node_feeding_output_without_keep_io_types_gets_output_cast() -> None:
    graph, _ = _convert(_attention(), keep_io_types=False)
    assert graph.outputs[1].name == "m" and graph.outputs[1].dtype == F16
    producer = graph.outputs[1].inputs[0]
    assert producer.op == "Cast" and producer.name == "m/cast_to_float16"
    x = RNG.standard_normal((2, 4, 8)).astype(np.float16)
    want = run_ort(_attention(), {"x": x.astype(np.float32)})
    for got, ref in zip(run_ort(graph, {"x": x}), want):
        np.testing.assert_allclose(got.astype(np.float32), ref, rtol=3e-2, atol=3e-2)
    full_check(graph)


CAST_AND_CONSTANTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[2, 3] ids, float[2, 3] x) => (float[2, 3] y) {
    f = Cast<to = 1>(ids)
    k = Constant<value_float = 0.5>()
    shp = Shape(x)
    z = ConstantOfShape(shp)
    o = ConstantOfShape<value = float[1] {2.0}>(shp)
    a = Mul(f, k)
    b = Add(a, z)
    c = Mul(b, o)
    y = Add(c, x)
}
"""


def test_cast_to_float_and_float_attributes_are_converted() -> None:
    model = model_from_text(CAST_AND_CONSTANTS)
    graph, result = _convert(model)
    nodes = {n.outputs[0].name: n for n in graph.nodes}
    assert nodes["f"].attrs["to"] == TensorProto.FLOAT16
    assert "value_float" not in nodes["k"].attrs and nodes["k"].attrs["value"].dtype == F16
    assert nodes["z"].attrs["value"].dtype == F16 and nodes["o"].attrs["value"].dtype == F16
    assert all(graph.tensors()[n].dtype == F16 for n in ("f", "k", "z", "o", "a", "b", "c"))
    assert result.counts["initializers_converted"] == 2  # the two attribute values that were float32 tensors
    feeds = {"ids": np.arange(6, dtype=np.int64).reshape(2, 3), "x": RNG.standard_normal((2, 3)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(graph, feeds)[0], run_ort(model, feeds)[0], rtol=1e-3, atol=1e-3)
    full_check(graph)


def test_float32_only_inputs_of_converted_ops_stay_float32() -> None:
    """Resize's ``scales`` is tensor(float) in the spec; Range has no float16 at all (kept even unlisted)."""
    model = model_from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 1, 2, 2] x, float lim) => (float[1, 1, 4, 4] y, float[N] r) <float[4] sc = {1.0, 1.0, 2.0, 2.0}, float one = {1.0}, float zero = {0.0}> {
        y = Resize<mode = "nearest">(x, , sc)
        r = Range(zero, lim, one)
    }
    """)  # fmt: skip
    graph, result = _convert(model, op_block_list=())
    t = graph.tensors()
    assert t["sc"].dtype == F32 and t["y/float16"].dtype == F16
    rng_node = next(n for n in graph.nodes if n.op == "Range")
    assert all(i.dtype == F32 for i in rng_node.inputs) and result.counts["nodes_kept_float32"] == 1
    assert any("no float16 in the ONNX schema of Range" in n for n in result.notes)
    feeds = {"x": RNG.standard_normal((1, 1, 2, 2)).astype(np.float32), "lim": np.array(3.0, np.float32)}
    for got, want in zip(run_ort(graph, feeds), run_ort(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    full_check(graph)


def test_shared_initializer_gets_float32_copy_for_kept_reader() -> None:
    model = model_from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4] x) => (float[2, 4] y) <float[4] g1 = {1.0, 2.0, 0.5, 1.5}, float[4] b1 = {0.0, 0.1, 0.2, 0.3}> {
        m = Mul(x, g1)
        y = LayerNormalization<axis = -1>(m, g1, b1)
    }
    """)
    graph, _ = _convert(model)
    mul, ln = (next(n for n in graph.nodes if n.op == op) for op in ("Mul", "LayerNormalization"))
    assert mul.inputs[1].name == "g1" and mul.inputs[1].dtype == F16
    assert ln.inputs[1].name == "g1/float32" and ln.inputs[1].dtype == F32 and ln.inputs[2].dtype == F32
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(run_ort(graph, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-2, atol=1e-2)
    full_check(graph)


def test_decomposed_layernorm_square_stays_float32() -> None:
    """x - mean can exceed 256, whose square overflows float16 before the kept ReduceMean reads it."""
    model = model_from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 8] x) => (float[2, 8] y) <float two = {2.0}, float eps = {1e-5}> {
        mu = ReduceMean<axes = [-1]>(x)
        d = Sub(x, mu)
        sq = Pow(d, two)
        var = ReduceMean<axes = [-1]>(sq)
        ve = Add(var, eps)
        sd = Sqrt(ve)
        y = Div(d, sd)
    }
    """)
    graph, result = _convert(model)
    pow_node = next(n for n in graph.nodes if n.op == "Pow")
    assert pow_node.outputs[0].dtype == F32 and pow_node.inputs[1].dtype == F32
    assert result.counts["nodes_kept_float32"] == 3
    x = (RNG.standard_normal((2, 8)) * 1000).astype(np.float32)  # (x - mean)^2 ~ 1e6: inf in float16
    got, want = run_ort(graph, {"x": x})[0], run_ort(model, {"x": x})[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    full_check(graph)


def test_outer_values_read_in_subgraph_stay_float32() -> None:
    model = model_from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y) {
        r = Relu(x)
        y = If(c) <then_branch = t () => (float[2] a) { a = Add(r, r) }, else_branch = e () => (float[2] b) { b = Neg(r) }>
    }
    """)
    graph, result = _convert(model)
    assert graph.tensors()["r"].dtype == F16
    if_node = next(n for n in graph.nodes if n.op == "If")
    inner = if_node.attrs["then_branch"].nodes[0]
    assert inner.inputs[0].dtype == F32 and inner.inputs[0].name == "r/float32"
    assert "has subgraphs" in result.notes[0]
    for c in (True, False):
        feeds = {"x": np.array([-1.5, 2.25], np.float32), "c": np.array(c)}
        np.testing.assert_allclose(run_ort(graph, feeds)[0], run_ort(model, feeds)[0], rtol=1e-3)
    full_check(graph)


# --------------------------------------------------------------------------------- must not fire


def test_float16_model_is_left_untouched() -> None:
    model = make_model([helper.make_node("Add", ["x", "b"], ["y"], name="add")], [value_info("x", [2, 3], TensorProto.FLOAT16)],
                       [value_info("y", [2, 3], TensorProto.FLOAT16)], [initializer("b", np.array([1, 2, 3], np.float16))])  # fmt: skip
    graph, result = _convert(model)
    assert not result.modified and result.counts == {}
    assert "already holds float16" in result.notes[0]
    assert gs.export_onnx(graph).graph == gs.export_onnx(gs.import_onnx(model)).graph


def test_converted_model_is_not_converted_twice() -> None:
    graph, _ = _convert(_cnn())
    before = gs.export_onnx(graph)
    result = Float16Pass()(graph, make_ctx())
    assert not result.modified and gs.export_onnx(graph) == before


def test_model_without_float_computation_is_left_untouched() -> None:
    model = model_from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[2, 3] x) => (int64[2, 3] y) { y = Add(x, x) }
    """)
    graph, result = _convert(model)
    assert not result.modified and op_types(graph) == ["Add"]


# -------------------------------------------------------------------------------------- bfloat16


def test_bfloat16_variant_checks_and_matches_reference() -> None:
    """ORT's CPU provider has no bfloat16 kernels for most ops: onnx.checker + ReferenceEvaluator only."""
    model = _cnn()
    graph = convert_float16(gs.import_onnx(model), dtype="bfloat16")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    convs = [n for n in graph.nodes if n.op == "Conv"]
    # Conv has no bfloat16 in opset 13 (it arrives in opset 22): kept float32 by the schema rule
    assert convs[0].inputs[1].dtype == F32
    assert graph.tensors()["r"].dtype == bf16 and graph.tensors()["fc_w"].dtype == bf16
    converted = full_check(graph)
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    got = onnx.reference.ReferenceEvaluator(converted).run(None, {"x": x})[0]
    want = run_ort(model, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2)


def test_bfloat16_opset22_converts_conv() -> None:
    model = onnx.version_converter.convert_version(_cnn(), 22)
    graph = convert_float16(gs.import_onnx(model), dtype="bfloat16")
    conv = next(n for n in graph.nodes if n.op == "Conv")
    assert conv.inputs[1].dtype == np.dtype(ml_dtypes.bfloat16)
    full_check(graph)


# -------------------------------------------------------------------------------- recipe, preset, CLI


def test_fp16_preset_runs_without_calibration() -> None:
    recipe = preset("fp16")
    assert not recipe.needs_calibration()
    assert recipe.passes[-1] == "float16" and "insert_qdq" not in recipe.passes
    assert recipe.float16 == Float16Spec() and recipe.float16.op_block_list == DEFAULT_BLOCK_LIST
    assert PASSES["float16"] is Float16Pass
    result = quantize_model(_attention(), recipe, checked=True)
    step = result.report.steps[-1]
    assert step.name == "float16" and step.modified and step.counts["nodes_kept_float32"] == 3
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    for got, want in zip(run_ort(result.model, {"x": x}), run_ort(_attention(), {"x": x})):
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


def test_float16_table_in_recipe_is_strict() -> None:
    r = recipe_from_dict({"preset": "fp16", "float16": {"dtype": "bfloat16", "keep_io_types": False,
                                                         "op_block_list": ["Softmax"], "node_block_list": ["fc"]}})  # fmt: skip
    assert r.float16 == Float16Spec("bfloat16", False, ("Softmax",), ("fc",))
    with pytest.raises(RecipeError, match="unknown key 'keep_io' in \\[float16\\]"):
        recipe_from_dict({"preset": "fp16", "float16": {"keep_io": False}})
    with pytest.raises(RecipeError, match=r"\[float16\] dtype = 'fp8' is not one of 'float16', 'bfloat16'"):
        recipe_from_dict({"float16": {"dtype": "fp8"}})


def test_pass_takes_settings_from_recipe_unless_given() -> None:
    recipe = preset("fp16").with_(float16=Float16Spec(keep_io_types=False, node_block_list=("fc",)))
    graph = gs.import_onnx(_cnn())
    Pipeline([Float16Pass.from_recipe(recipe)], checked=True).run(graph, make_ctx())
    assert graph.inputs[0].dtype == F16
    assert next(n for n in graph.nodes if n.name == "fc").inputs[1].dtype == F32
    graph = gs.import_onnx(_cnn())
    Float16Pass(keep_io_types=True, spec=recipe.float16)(graph, make_ctx())
    assert graph.inputs[0].dtype == F32


def test_cli_quantize_fp16_needs_no_calib(tmp_path: Path) -> None:
    from onnxq.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "m.fp16.onnx"
    onnx.save(_cnn(), src)
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--preset", "fp16", "--no-progress"])
    assert result.exit_code == 0, result.output
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert {i.data_type for i in model.graph.initializer} == {TensorProto.FLOAT16}
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], run_ort(_cnn(), {"x": x})[0], rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------------------- real models


@pytest.mark.assets
def test_mobilenetv2_fp16_agrees_with_fp32(assets: Path) -> None:
    from onnxq.calibration.sources import load_image

    src = asset(assets, "cnn/mobilenetv2-7/model.onnx")
    result = quantize_model(onnx.load(src), preset("fp16"))
    counts = result.report.steps[-1].counts
    assert counts["nodes_kept_float32"] == 0 and counts["casts_inserted"] == 2
    model = result.model
    assert all(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    rows = list(csv.DictReader(open(asset(assets, "imagenet/labels.csv"))))[::10][:50]
    x = np.concatenate([load_image(assets / "imagenet" / r["file"]) for r in rows])
    s32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    s16 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    p32 = np.array([s32.run(None, {"input": x[i : i + 1]})[0].argmax() for i in range(len(x))])
    p16 = np.array([s16.run(None, {"input": x[i : i + 1]})[0].argmax() for i in range(len(x))])
    agreement = float((p32 == p16).mean())
    assert agreement >= 0.98, f"top-1 agreement fp16 vs fp32 {agreement:.3f} on {len(x)} images"


@pytest.mark.assets
def test_minilm_fp16_embeddings_match_fp32(assets: Path) -> None:
    from tokenizers import Tokenizer

    src = asset(assets, "minilm/model.onnx")
    result = quantize_model(onnx.load(src), preset("fp16"))
    counts = result.report.steps[-1].counts
    assert counts["nodes_kept_float32"] >= 13 + 6 + 3  # LayerNorms, Softmaxes, pooling sums
    tok = Tokenizer.from_file(str(asset(assets, "minilm/tokenizer.json")))
    tok.enable_padding()
    sentences = ["A man is playing a guitar.", "The weather is lovely today, isn't it?",
                 "Quantization shrinks models.", "Two dogs run across a snowy field chasing a red ball."]  # fmt: skip
    enc = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in enc], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
             "token_type_ids": np.zeros_like(ids)}  # fmt: skip
    e32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(["sentence_embedding"], feeds)[0]
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    e16 = sess.run(["sentence_embedding"], feeds)[0]
    assert e16.dtype == np.float32
    cos = (e32 * e16).sum(1) / np.linalg.norm(e32, axis=1) / np.linalg.norm(e16, axis=1)
    assert cos.min() >= 0.999, f"embedding cosine fp16 vs fp32: {np.round(cos, 5)}"


@pytest.mark.assets
def test_float16_source_model_is_left_as_is_by_fp16_preset(assets: Path) -> None:
    src = asset(assets, "cnn/squeezenet1.1-fp16/model.onnx")
    result = quantize_model(onnx.load(src), preset("fp16"))
    step = result.report.steps[-1]
    assert step.name == "float16" and not step.modified
    assert result.model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
