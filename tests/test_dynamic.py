"""dynamic: op types left, numerics in ORT vs float (SQNR floors), a numpy oracle of the integer arithmetic,
the reference evaluator, target weight ranges, exclusions, Gemm attributes, tied weights, names, the CLI."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnx.reference
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from conftest import asset
from helpers import full_check, make_ctx, make_model, node_named, op_types, run_ort, sqnr_db, value_info

from onnxq.cli import main
from onnxq.errors import PassError, RecipeError
from onnxq.model import to_model
from onnxq.passes import PASSES, DynamicQuantizePass
from onnxq.passes.dynamic import hadamard, hadamard_block
from onnxq.recipe import DynamicSpec, ExcludeSpec, Override, Recipe, WeightSpec, preset, recipe_from_dict

RNG = np.random.default_rng(0)
GRANULARITIES = ("per-tensor", "per-row")


@pytest.fixture(autouse=True)
def _reseed() -> None:
    """Every test sees the same random data whatever runs before it."""
    RNG.bit_generator.state = np.random.default_rng(0).bit_generator.state


_model = functools.partial(make_model, infer_shapes=True)  # the models here carry inferred shapes


def _linear_model(k: int = 32, n: int = 24, opset: int = 17) -> onnx.ModelProto:
    """x [B, M, K] -> MatMul(W [K, N]) -> Add(bias) -> y, with an activation x activation MatMul beside it."""
    inits = {"W": (RNG.normal(size=(k, n)) * 0.2).astype(np.float32), "bias": RNG.normal(size=(n,)).astype(np.float32)}
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
        onnx.helper.make_node("Add", ["h", "bias"], ["y"], name="fc_bias"),
        onnx.helper.make_node("Transpose", ["x"], ["xt"], name="t", perm=[0, 2, 1]),
        onnx.helper.make_node("MatMul", ["x", "xt"], ["gram"], name="gram"),
    ]
    return _model(nodes, [value_info("x", ["B", "M", k])], [value_info("y", ["B", "M", n]), value_info("gram", ["B", "M", "M"])], inits, opset)


def _recipe(granularity: str = "per-tensor", **changes: object) -> Recipe:
    """The int8-dynamic preset with ``granularity`` (other [dynamic] settings: the defaults), then ``changes``."""
    changes.setdefault("dynamic", DynamicSpec(activation_granularity=granularity))  # type: ignore[arg-type]
    return preset("int8-dynamic").with_(**changes)  # type: ignore[arg-type]


def _quantize(model: onnx.ModelProto, recipe: Recipe | None = None, target: str = "x86-avx2"):
    ctx = make_ctx(target)
    result = DynamicQuantizePass.from_recipe(recipe or _recipe())(gs.import_onnx(model), ctx)
    out = to_model(result.graph, template=model)
    full_check(out)
    return out, result, ctx


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _x(shape: tuple[int, ...] = (2, 5, 32)) -> np.ndarray:
    x = RNG.normal(size=shape).astype(np.float32)
    x[0, 1] *= 20.0  # one loud row, as LLM activations have
    return x


# ----------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_op_types_and_counts(granularity: str) -> None:
    model = _linear_model()
    q, result, ctx = _quantize(model, _recipe(granularity))
    ops = op_types(q)
    float_matmuls = [n.name for n in q.graph.node if n.op_type == "MatMul"]
    assert sorted(float_matmuls) == ["gram", "x/Hadamard"], f"only attention-like products and the rotation: {ops}"
    assert ops.count("MatMulInteger") == 1
    expected = {"DynamicQuantizeLinear"} if granularity == "per-tensor" else {"ReduceMin", "ReduceMax", "QuantizeLinear"}
    assert expected <= set(ops), ops
    assert result.counts["activations_rotated"] == 1
    assert result.counts["nodes_quantized"] == 1 and result.counts["weights_quantized"] == 1
    assert result.counts["activation_products"] == 1
    assert not any(t.name == "W" for t in q.graph.initializer), "the float weight must be gone"
    docs = ctx.doc_strings
    assert docs["fc/MatMulInteger"].startswith("onnxq: dynamic int8")
    assert node_named(q, "fc/MatMulInteger").op_type == "MatMulInteger"
    # graph outputs keep their names and float dtype
    assert [(o.name, o.type.tensor_type.elem_type) for o in q.graph.output] == [
        ("y", onnx.TensorProto.FLOAT), ("gram", onnx.TensorProto.FLOAT)]  # fmt: skip


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("target", ["x86-avx2", "x86-avx2-u8"])
def test_numerics_close_to_float(granularity: str, target: str) -> None:
    model = _linear_model()
    q, _, _ = _quantize(model, _recipe(granularity), target)
    x = _x()
    ref = run_ort(model, {"x": x})[0]
    for optimize in (False, True):  # unfused, and ORT's DynamicQuantizeMatMul / MatMulIntegerToFloat fusions
        got = run_ort(q, {"x": x}, optimize=optimize)[0]
        sqnr = sqnr_db(ref, got)
        floor = 30.0 if granularity == "per-tensor" else 34.0
        assert sqnr >= floor, f"{granularity}/{target} optimize={optimize}: SQNR {sqnr:.1f} dB < {floor} dB"


def test_per_row_beats_per_tensor_on_a_loud_row() -> None:
    model = _linear_model()
    x = _x()
    ref = run_ort(model, {"x": x})[0]
    quiet = np.ones(ref.shape[:2], bool)
    quiet[0, 1] = False
    sq = {}
    for g in GRANULARITIES:
        q, _, _ = _quantize(model, _recipe(g), "x86-avx2-u8")
        sq[g] = sqnr_db(ref[quiet], run_ort(q, {"x": x})[0][quiet])
    assert sq["per-row"] > sq["per-tensor"] + 10, f"quiet rows: per-row {sq['per-row']:.1f} dB, per-tensor {sq['per-tensor']:.1f} dB"


# ----------------------------------------------------------------------------------------- oracle


def _oracle(x: np.ndarray, w_q: np.ndarray, w_zp: np.ndarray, w_scale: np.ndarray, bias: np.ndarray, mode: str) -> np.ndarray:
    """The quantized arithmetic, written independently in numpy (ONNX semantics, float32 where ORT is)."""
    f32 = np.float32
    wi = w_q.astype(np.int64) - w_zp.astype(np.int64)
    if mode == "per-tensor":  # DynamicQuantizeLinear, ONNX definition
        lo, hi = min(f32(0), x.min()), max(f32(0), x.max())
        s = f32((hi - lo) / f32(255))
        zp = np.clip(np.rint(-lo / s), 0, 255)
        xq = np.clip(np.rint(x / s) + zp, 0, 255).astype(np.int64)
        acc = (xq - int(zp)) @ wi
        return acc.astype(f32) * (s * w_scale) + bias
    # per-row: symmetric rows, rescaled by (largest row scale) x (row factor)
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / f32(127), f32(1e-30))
    xq = np.clip(np.rint(x / s) + 128, 0, 255).astype(np.int64)
    acc = (xq - 128) @ wi
    top = s.max()
    return (acc.astype(f32) * (top * w_scale)) * (s / top) + bias


def _block_hadamard(k: int, b: int) -> np.ndarray:
    """Block-diagonal orthonormal Hadamard [k, k] from scipy (independent of the pass's construction)."""
    from scipy.linalg import block_diag, hadamard

    return block_diag(*[hadamard(b) / np.sqrt(b)] * (k // b))


@pytest.mark.parametrize("mode", ["per-tensor", "per-row"])
@pytest.mark.parametrize("rotate", [0, 16])
@pytest.mark.parametrize("target", ["x86-avx2", "x86-avx2-u8"])
def test_integer_arithmetic_matches_numpy_oracle_and_reference(mode: str, rotate: int, target: str) -> None:
    model = _linear_model()
    spec = DynamicSpec(activation_granularity=mode, hadamard_block=rotate)  # type: ignore[arg-type]
    q, _, _ = _quantize(model, _recipe(weights=WeightSpec(range_method="minmax")).with_(dynamic=spec), target)
    mmi = node_named(q, "fc/MatMulInteger")
    w = _init(q, mmi.input[1])
    w_zp = _init(q, mmi.input[3]) if len(mmi.input) > 3 else np.zeros((), np.int8)
    w_float = _init(model, "W").astype(np.float64)
    x = _x()
    if rotate:  # x @ W == (x R) @ (R^T W) for an orthonormal R
        r = _block_hadamard(w_float.shape[0], rotate)
        w_float = r.T @ w_float
        x_in = (x.astype(np.float64) @ r).astype(np.float32)
    else:
        x_in = x
    w_scale = (np.abs(w_float).max(axis=0) / (64 if target == "x86-avx2" else 127)).astype(np.float32)
    expect = _oracle(x_in, w, w_zp, w_scale, _init(model, "bias"), mode)
    tol = {"rtol": 1e-5, "atol": 1e-5 * np.abs(expect).max()}
    got = run_ort(q, {"x": x})[0]
    np.testing.assert_allclose(got, expect, **tol)
    np.testing.assert_allclose(onnx.reference.ReferenceEvaluator(q).run(None, {"x": x})[0], got, **tol)
    fused = run_ort(q, {"x": x}, optimize=True)[0]  # ORT's fused kernels compute the same integers
    np.testing.assert_allclose(fused, expect, **tol)


def test_hadamard_blocks() -> None:
    h = hadamard(64)
    np.testing.assert_allclose(h @ h.T, np.eye(64), atol=1e-12)
    assert [hadamard_block(k, 64) for k in (576, 1536, 384, 96, 172, 64, 8, 4)] == [64, 64, 64, 32, 0, 64, 8, 0]
    assert hadamard_block(576, 0) == 0 and hadamard_block(576, 16) == 16
    with pytest.raises(RecipeError, match="hadamard_block"):
        recipe_from_dict({"preset": "int8-dynamic", "dynamic": {"hadamard_block": 48}})
    r = recipe_from_dict({"preset": "int8-dynamic", "dynamic": {"activation_granularity": "per-tensor", "hadamard_block": 0}})
    assert r.dynamic.activation_granularity == "per-tensor" and r.dynamic.hadamard_block == 0


def test_rotation_spreads_an_outlier_channel() -> None:
    """A channel 50x louder than the rest (LLM residual streams have a few) sets every row's scale."""
    model = _linear_model()
    x = RNG.normal(size=(2, 5, 32)).astype(np.float32)
    x[..., 3] *= 50.0
    ref = run_ort(model, {"x": x})[0]
    sq = {}
    for block in (0, 32):
        q, _, _ = _quantize(model, _recipe("per-row", dynamic=DynamicSpec(hadamard_block=block)), "x86-avx2-u8")
        sq[block] = sqnr_db(ref, run_ort(q, {"x": x})[0])
    assert sq[32] > sq[0] + 6, f"rotated {sq[32]:.1f} dB vs plain {sq[0]:.1f} dB"


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_onnxruntime_fuses_the_integer_product(granularity: str, tmp_path: Path) -> None:
    """The rescaling stays in the form ORT folds into MatMulIntegerToFloat (what makes per-row fast)."""
    import onnxruntime as ort

    q, _, _ = _quantize(_linear_model(), _recipe(granularity))
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert "MatMulInteger" not in fused and {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"} & set(fused), fused


def test_per_row_zero_row_gives_zero_not_nan() -> None:
    model = _linear_model()
    q, _, _ = _quantize(model, _recipe("per-row"))
    x = _x()
    x[1, 2] = 0.0
    y = run_ort(q, {"x": x})[0]
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y[1, 2], _init(model, "bias"), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize(("target", "dtype", "lo", "hi"), [
    ("x86-avx2", np.int8, -64, 64), ("generic", np.int8, -64, 64), ("x86-vnni", np.int8, -127, 127),
    ("arm64", np.int8, -127, 127), ("x86-avx2-u8", np.uint8, 1, 255)])  # fmt: skip
def test_weight_range_follows_target(granularity: str, target: str, dtype: type, lo: int, hi: int) -> None:
    q, result, _ = _quantize(_linear_model(), _recipe(granularity, weights=WeightSpec(range_method="minmax")), target)
    mmi = node_named(q, "fc/MatMulInteger")
    w = _init(q, mmi.input[1])
    assert w.dtype == dtype and w.min() == lo and w.max() == hi, f"{target}: {w.dtype} [{w.min()}, {w.max()}]"
    if dtype is np.uint8:
        assert _init(q, mmi.input[3]).tolist() == 128, "uint8 weights are symmetric around zero point 128"
    else:
        assert len(mmi.input) == 3, "symmetric int8 weights need no b_zero_point"
    assert any(target in n for n in result.notes)


def test_reduce_range_setting_overrides_target() -> None:
    q, _, _ = _quantize(_linear_model(), _recipe(weights=WeightSpec(range_method="minmax", reduce_range=False)), "x86-avx2")
    assert np.abs(_init(q, node_named(q, "fc/MatMulInteger").input[1])).max() == 127
    q, _, _ = _quantize(_linear_model(), _recipe(weights=WeightSpec(range_method="minmax", reduce_range=True)), "x86-vnni")
    assert np.abs(_init(q, node_named(q, "fc/MatMulInteger").input[1])).max() == 64


def test_per_tensor_weights_and_affine_weights() -> None:
    model = _linear_model()
    q, _, _ = _quantize(model, _recipe(weights=WeightSpec(granularity="per-tensor", range_method="minmax")))
    x = _x()
    assert sqnr_db(run_ort(model, {"x": x})[0], run_ort(q, {"x": x})[0]) > 25
    q, _, _ = _quantize(model, _recipe("per-row", weights=WeightSpec(symmetric=False, range_method="minmax")), "x86-avx2")
    mmi = node_named(q, "fc/MatMulInteger")
    assert len(mmi.input) == 4 and _init(q, mmi.input[3]).shape == (24,), "affine weights: per-column zero points"
    assert sqnr_db(run_ort(model, {"x": x})[0], run_ort(q, {"x": x})[0]) > 30


def test_cuda_target_is_refused_with_the_fix() -> None:
    with pytest.raises(PassError, match=r"CUDA execution provider.*--target.*w8a8"):
        _quantize(_linear_model(), target="cuda")


def test_non_int8_weights_refused() -> None:
    with pytest.raises(PassError, match=r"int8"):
        _quantize(_linear_model(), _recipe(weights=WeightSpec(dtype="int4")))


# ----------------------------------------------------------------------------------------- which nodes


def _two_linears(tied: bool = False) -> onnx.ModelProto:
    inits = {"W1": RNG.normal(size=(16, 16)).astype(np.float32)}
    if not tied:
        inits["W2"] = RNG.normal(size=(16, 16)).astype(np.float32)
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "W1"], ["a"], name="first"),
        onnx.helper.make_node("MatMul", ["x", "W1" if tied else "W2"], ["b"], name="second"),
        onnx.helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    return _model(nodes, [value_info("x", [4, 16])], [value_info("y", [4, 16])], inits)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_tied_weights_and_shared_activation_quantized_once(granularity: str) -> None:
    model = _two_linears(tied=True)
    q, result, _ = _quantize(model, _recipe(granularity))
    assert result.counts["weights_quantized"] == 1 and result.counts["shared_weights"] == 1
    assert result.counts["activations_quantized"] == 1, "x feeds both nodes: quantized once"
    assert sum(t.data_type == onnx.TensorProto.INT8 and list(t.dims) == [16, 16] for t in q.graph.initializer) == 1
    x = RNG.normal(size=(4, 16)).astype(np.float32)
    assert sqnr_db(run_ort(model, {"x": x})[0], run_ort(q, {"x": x})[0]) > 30


def test_exclusions_and_overrides_respected() -> None:
    model = _two_linears()
    q, result, _ = _quantize(model, _recipe(exclude=ExcludeSpec(names=("first",))))
    assert node_named(q, "first").op_type == "MatMul" and op_types(q).count("MatMulInteger") == 1
    assert result.counts["nodes_excluded"] == 1 and result.counts["nodes_quantized"] == 1
    q, result, _ = _quantize(model, _recipe(overrides=(Override(name_regex="^sec", skip=True),)))
    assert node_named(q, "second").op_type == "MatMul" and result.counts["nodes_excluded"] == 1
    q, result, _ = _quantize(model, _recipe(op_types=("Conv",)))  # the recipe quantizes no MatMul
    assert not result.modified and op_types(q) == ["MatMul", "MatMul", "Add"]
    # a per-node override changes that node's weights only
    q, _, _ = _quantize(model, _recipe(overrides=(Override(name="second", weights={"granularity": "per-tensor"}),)))
    second_scale = _init(q, node_named(q, "second/MulScales").input[1])
    first_scale = _init(q, node_named(q, "first/MulScales").input[1])
    assert second_scale.shape == () and first_scale.shape == (16,)


def _gemm_model(trans_a: int, trans_b: int, alpha: float, beta: float, bias: str) -> onnx.ModelProto:
    k, n, m = 12, 10, 6
    w = RNG.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)
    inits = {"W": w}
    inputs = [value_info("x", [k, m] if trans_a else [m, k])]
    names = ["x", "W"]
    if bias == "const":
        inits["C"] = RNG.normal(size=(n,)).astype(np.float32)
        names.append("C")
    elif bias == "input":
        inputs.append(value_info("C", [m, n]))
        names.append("C")
    node = onnx.helper.make_node("Gemm", names, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    return _model([node], inputs, [value_info("y", [m, n])], inits)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize(("trans_a", "trans_b", "alpha", "beta", "bias"), [
    (0, 1, 1.0, 1.0, "const"), (0, 0, 0.5, 2.0, "const"), (1, 1, 1.5, 0.25, "input"), (0, 1, 1.0, 1.0, "none")])  # fmt: skip
def test_gemm_attributes_and_bias(granularity: str, trans_a: int, trans_b: int, alpha: float, beta: float, bias: str) -> None:
    model = _gemm_model(trans_a, trans_b, alpha, beta, bias)
    q, result, _ = _quantize(model, _recipe(granularity))
    ops = op_types(q)
    assert "Gemm" not in ops and "MatMulInteger" in ops
    assert any(n.name == "gemm/AddBias" for n in q.graph.node) == (bias != "none")
    assert ("Transpose" in ops) == bool(trans_a)
    feeds = {i.name: RNG.normal(size=[d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}  # fmt: skip
    sqnr = sqnr_db(run_ort(model, feeds)[0], run_ort(q, feeds)[0])
    assert sqnr > 28, f"Gemm transA={trans_a} transB={trans_b} alpha={alpha} beta={beta} bias={bias}: SQNR {sqnr:.1f} dB"


def test_gemm_excluded_by_dynamic_op_types() -> None:
    model = _gemm_model(0, 1, 1.0, 1.0, "const")
    q, result, _ = _quantize(model, _recipe(dynamic=DynamicSpec(op_types=("MatMul",))))
    assert op_types(q) == ["Gemm"] and not result.modified


def test_must_not_fire_on_unsupported_weights() -> None:
    inits = {"W3": RNG.normal(size=(2, 8, 4)).astype(np.float32)}
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "W3"], ["y"], name="batched_weight"),
        onnx.helper.make_node("MatMul", ["x", "z"], ["v"], name="two_activations"),
    ]
    model = _model(nodes, [value_info("x", [2, 3, 8]), value_info("z", [2, 8, 4])], [value_info("y", [2, 3, 4]), value_info("v", [2, 3, 4])], inits)
    q, result, _ = _quantize(model)
    assert op_types(q) == ["MatMul", "MatMul"] and not result.modified
    assert result.counts["nodes_skipped"] == 1 and any("rank 3" in n for n in result.notes)


@pytest.mark.parametrize("opset", [13, 18])
def test_per_row_on_old_and_new_reduce_max(opset: int) -> None:
    model = _linear_model(opset=opset)
    q, _, _ = _quantize(model, _recipe("per-row"))
    x = _x()
    assert sqnr_db(run_ort(model, {"x": x})[0], run_ort(q, {"x": x})[0]) > 34


def test_inserted_names_never_collide() -> None:
    """Tensors and nodes already called like the ones the pass would insert."""
    inits = {"W": RNG.normal(size=(8, 8)).astype(np.float32), "x_quantized": np.ones((8,), np.float32)}
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
        onnx.helper.make_node("Add", ["h", "x_quantized"], ["fc_int32"], name="fc/MatMulInteger"),
        onnx.helper.make_node("Relu", ["fc_int32"], ["y"], name="x/DynamicQuantizeLinear"),
    ]
    model = _model(nodes, [value_info("x", [3, 8])], [value_info("y", [3, 8])], inits)
    for g in GRANULARITIES:
        q, _, _ = _quantize(model, _recipe(g))
        names = [n.name for n in q.graph.node]
        assert len(names) == len(set(names))
        outs = [o for n in q.graph.node for o in n.output]
        assert len(outs) == len(set(outs))
        x = RNG.normal(size=(3, 8)).astype(np.float32)
        assert sqnr_db(run_ort(model, {"x": x})[0], run_ort(q, {"x": x})[0]) > 25


def test_registered_and_preset_needs_no_calibration() -> None:
    assert PASSES["dynamic"] is DynamicQuantizePass
    r = preset("int8-dynamic")
    assert not r.needs_calibration() and r.passes[-1] == "dynamic"


# ----------------------------------------------------------------------------------------- CLI and real model


def test_cli_quantize_int8_dynamic(tmp_path: Path) -> None:
    src, out = tmp_path / "lin.onnx", tmp_path / "lin.dyn.onnx"
    onnx.save(_linear_model(), src)
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--preset", "int8-dynamic",
                                       "--target", "x86-avx2", "--no-progress", "--checked"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    q = onnx.load(out)
    assert node_named(q, "fc/MatMulInteger").op_type == "MatMulInteger" and node_named(q, "gram").op_type == "MatMul"
    assert "dynamic int8" in node_named(q, "fc/MatMulInteger").doc_string
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(tmp_path / "c.onnx"), "--preset", "int8-dynamic",
                                       "--target", "cuda", "--no-progress"])  # fmt: skip
    assert result.exit_code == 1 and "--target" in result.stderr and not (tmp_path / "c.onnx").exists()


@pytest.mark.assets
def test_minilm_embeddings_close_to_fp32(assets: Path) -> None:
    from tokenizers import Tokenizer

    model = onnx.load(asset(assets, "minilm/model.onnx"))
    tok = Tokenizer.from_file(str(asset(assets, "minilm/tokenizer.json")))
    tok.no_padding()
    sentences = ["A man is playing a guitar.", "The cat sleeps on the warm windowsill all afternoon.",
                 "Stock markets fell sharply after the announcement.", "Two children are riding bicycles."]  # fmt: skip
    from onnxq.quantization import quantize_model

    recipe = preset("int8-dynamic").with_(target="x86-avx2", weights=WeightSpec(range_method="minmax"))
    q = quantize_model(model, recipe).model
    for s in sentences:
        ids = np.array([tok.encode(s).ids], np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        ref = run_ort(model, feeds)[1][0]
        got = run_ort(q, feeds, optimize=True)[1][0]
        cos = float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))
        assert cos >= 0.98, f"{s!r}: cosine {cos:.4f} to the fp32 embedding"
