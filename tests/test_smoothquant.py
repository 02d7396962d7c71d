"""The smoothquant pass: exact in float, 1/s folded into producers (no Mul where avoidable), alpha rules."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnxq.cli import main
from onnxq.quantization import CalibrationOptions, quantize_model
from onnxq.recipe import SmoothQuantSpec, preset, recipe_from_dict
from onnxq.errors import RecipeError
import onnx_graphsurgeon as gs

from onnxq.passes.scale_folding import channel_ties, plan_producer
from onnxq.passes.smoothquant import smooth_factors

from conftest import asset
from helpers import full_check, make_model, run_ort, sqnr_db, value_info

RNG = np.random.default_rng(7)
K, N = 16, 12


def _outlier_scale() -> np.ndarray:
    """Per-channel gains with two outlier channels (what LayerNorm outputs of transformers look like)."""
    g = np.ones(K, np.float32)
    g[[3, 11]] = [25.0, -40.0]
    return g


def _w(k: int = K, n: int = N) -> np.ndarray:
    return (RNG.normal(size=(k, n)) * 0.2).astype(np.float32)


def _ln_qkv_model() -> onnx.ModelProto:
    """LayerNorm -> Q/K/V MatMuls sharing its output, plus a residual Add reading it too (BERT's pattern)."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["h", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["h", "wv"], ["v"], name="v_proj"),
        helper.make_node("Add", ["q", "k"], ["qk"], name="add_qk"),
        helper.make_node("Add", ["qk", "v"], ["qkv"], name="add_v"),
        helper.make_node("MatMul", ["qkv", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["h", "o"], ["y"], name="residual"),
    ]
    inits = {"gamma": _outlier_scale(), "beta": (RNG.normal(size=K) * 0.1).astype(np.float32),
             "wq": _w(K, K), "wk": _w(K, K), "wv": _w(K, K), "wo": _w(K, K)}  # fmt: skip
    return make_model(nodes, [value_info("x", [2, 5, K])], [value_info("y", [2, 5, K])], inits, check=False)


def _recipe(alpha: float | str = 0.5, quantize: bool = False, **sq: object):
    r = preset("w8a8-smoothquant")
    # without quantization the smoothed float model must equal the original: no lossy pass either
    passes = r.passes if quantize else tuple(p for p in r.passes if p not in ("insert_qdq", "int8_embeddings"))
    return r.with_(passes=passes, smoothquant=dataclasses.replace(r.smoothquant, alpha=alpha, **sq),
                   calibration=dataclasses.replace(r.calibration, samples=16), target="x86-vnni")  # fmt: skip


def _smooth(model: onnx.ModelProto, recipe=None):
    res = quantize_model(model, recipe or _recipe(), calibration=CalibrationOptions(source="random:16"), checked=True)
    step = next(s for s in res.report.steps if s.name == "smoothquant")
    return res.model, step


def _feed(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vi = model.graph.input[0]
    shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return {vi.name: RNG.normal(size=shape).astype(np.float32)}


def _assert_exact(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    feed = _feed(a)
    for x, y in zip(run_ort(a, feed), run_ort(b, feed)):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5 * float(np.abs(x).max()))


def test_smooth_factors_formula() -> None:
    x = np.array([4.0, 1.0, 0.0, 9.0], np.float32)
    w = np.array([1.0, 4.0, 2.0, 0.0], np.float32)
    s = smooth_factors(x, w, 0.5)
    np.testing.assert_allclose(s[:2], [2.0, 0.5], rtol=1e-6)
    assert s[2] == 1.0 and s[3] == 1.0, "a channel that never fires or has no weight is left alone"
    np.testing.assert_allclose(smooth_factors(x[:2], w[:2], 1.0), x[:2], rtol=1e-6)


def test_layernorm_with_residual_is_cloned_and_exact() -> None:
    model = _ln_qkv_model()
    out, step = _smooth(model)
    full_check(out)
    _assert_exact(model, out)
    assert step.counts["muls_inserted"] == 0
    assert step.counts["producers_cloned"] == 1, "the residual keeps the original LayerNorm"
    assert [n.op_type for n in out.graph.node].count("LayerNormalization") == 2
    lns = [n for n in out.graph.node if n.op_type == "LayerNormalization"]
    readers = {n.name: list(n.input) for n in out.graph.node}
    smoothed = next(n for n in lns if n.name != "ln").output[0]
    assert all(smoothed in readers[p] for p in ("q_proj", "k_proj", "v_proj"))
    assert "h" in readers["residual"]
    # Q/K/V share one s: their weights' rows were all multiplied by the same factors
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    orig = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    ratios = [inits[next(n for n in out.graph.node if n.name == p).input[1]][:, 0] / orig[w][:, 0]
              for p, w in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"))]  # fmt: skip
    np.testing.assert_allclose(ratios[0], ratios[1], rtol=1e-5)
    np.testing.assert_allclose(ratios[0], ratios[2], rtol=1e-5)


def test_rmsnorm_weight_mul_absorbs_and_swiglu_folds_into_up() -> None:
    nodes = [
        helper.make_node("Mul", ["x", "g"], ["h"], name="norm_weight"),
        helper.make_node("MatMul", ["h", "w_gate"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["h", "w_up"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sig"], name="sig"),
        helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
        helper.make_node("Mul", ["silu", "up"], ["act"], name="swiglu"),
        helper.make_node("MatMul", ["act", "w_down"], ["y"], name="down_proj"),
    ]
    inits = {"g": _outlier_scale(), "w_gate": _w(K, N), "w_up": _w(K, N), "w_down": _w(N, K)}
    model = make_model(nodes, [value_info("x", [1, 6, K])], [value_info("y", [1, 6, K])], inits, check=False)
    out, step = _smooth(model, _recipe(alpha=0.5))
    _assert_exact(model, out)
    assert step.counts["muls_inserted"] == 0 and step.counts["producers_cloned"] == 0
    docs = {n.name: n.doc_string for n in out.graph.node}
    for name, where in (("gate_proj", "Mul 'norm_weight'"), ("down_proj", "MatMul 'up_proj'")):
        assert "SmoothQuant" in docs[name] and where in docs[name], (name, docs[name])


def test_attention_output_projection_folds_into_v_through_reshape_transpose() -> None:
    heads, d = 2, K // 2
    nodes = [
        helper.make_node("MatMul", ["x", "wv"], ["v0"], name="v_proj"),
        helper.make_node("Add", ["v0", "bv"], ["v1"], name="v_bias"),
        helper.make_node("Reshape", ["v1", "shape4"], ["v2"], name="v_split"),
        helper.make_node("Transpose", ["v2"], ["v3"], name="v_heads", perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["p", "v3"], ["c0"], name="attn_v"),
        helper.make_node("Transpose", ["c0"], ["c1"], name="ctx_t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["c1", "shape3"], ["c2"], name="ctx_merge"),
        helper.make_node("MatMul", ["c2", "wo"], ["y"], name="o_proj"),
    ]
    wv = _w(K, K) * _outlier_scale()[None, :]  # outlier output channels of V become outlier inputs of o_proj
    inits = {"wv": wv, "bv": (RNG.normal(size=K) * 0.1).astype(np.float32), "wo": _w(K, K),
             "shape4": np.array([1, 4, heads, d], np.int64), "shape3": np.array([1, 4, K], np.int64)}  # fmt: skip
    model = make_model(nodes, [value_info("x", [1, 4, K]), value_info("p", [1, heads, 4, 4])], [value_info("y", [1, 4, K])], inits, check=False)
    out, step = _smooth(model, _recipe(alpha=0.5))
    feed = {"x": RNG.normal(size=(1, 4, K)).astype(np.float32), "p": RNG.random((1, heads, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(out, feed)[0], run_ort(model, feed)[0], rtol=1e-4, atol=1e-4)
    docs = {n.name: n.doc_string for n in out.graph.node}
    assert "SmoothQuant" in docs["o_proj"], "the outlier channels of V make o_proj's input worth smoothing"
    assert "MatMul 'v_proj'" in docs["o_proj"] and "Add 'v_bias'" in docs["o_proj"], docs["o_proj"]
    assert step.counts["muls_inserted"] == 0


def _gqa_attention(kv: int = 2, rep: int = 2, d: int = 4, t: int = 5) -> onnx.ModelProto:
    """V of a grouped-query attention as HF's ``repeat_kv`` exports it: v_proj -> Reshape [1, t, kv, d] ->
    Unsqueeze(3) -> Expand [1, t, kv, rep, d] -> Reshape [1, t, kv * rep, d] -> heads -> probs @ V ->
    Reshape [1, t, kv * rep * d] -> o_proj (query head h reads KV head h // rep)."""
    heads, dim = kv * rep, kv * rep * d
    nodes = [
        helper.make_node("MatMul", ["x", "wv"], ["v0"], name="v_proj"),
        helper.make_node("Reshape", ["v0", "kv_shape"], ["v1"], name="v_split"),
        helper.make_node("Unsqueeze", ["v1", "axis3"], ["v2"], name="v_unsqueeze"),
        helper.make_node("Expand", ["v2", "rep_shape"], ["v3"], name="v_repeat"),
        helper.make_node("Reshape", ["v3", "head_shape"], ["v4"], name="v_merge"),
        helper.make_node("Transpose", ["v4"], ["v5"], name="v_heads", perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["p", "v5"], ["c0"], name="attn_v"),
        helper.make_node("Transpose", ["c0"], ["c1"], name="ctx_t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["c1", "ctx_shape"], ["c2"], name="ctx_merge"),
        helper.make_node("MatMul", ["c2", "wo"], ["y"], name="o_proj"),
    ]
    inits = {"wv": _w(dim, kv * d), "wo": _w(dim, dim), "axis3": np.array([3], np.int64),
             "kv_shape": np.array([1, t, kv, d], np.int64), "rep_shape": np.array([1, t, kv, rep, d], np.int64),
             "head_shape": np.array([1, t, heads, d], np.int64), "ctx_shape": np.array([1, t, dim], np.int64)}  # fmt: skip
    return make_model(nodes, [value_info("x", [1, t, dim]), value_info("p", [1, heads, t, t])], [value_info("y", [1, t, dim])], inits, check=False)


def test_gqa_output_projection_ties_query_heads_and_folds_into_v() -> None:
    """o_proj's input channel h * d + j reads channel j of KV head h // rep: those channels are tied, a
    tied 1/s folds into v_proj's columns through the Expand that repeats the KV heads (the float model is
    unchanged once o_proj's rows are multiplied by s), and an untied one cannot be folded."""
    kv, rep, d = 2, 2, 4
    model = _gqa_attention(kv, rep, d)
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    x = graph.tensors()["c2"]
    ties = channel_ties(x)
    heads = np.arange(kv * rep).repeat(d)
    expected = (heads // rep) * rep * d + np.tile(np.arange(d), kv * rep)  # the first channel of each tie
    np.testing.assert_array_equal(ties, expected)

    rng = np.random.default_rng(3)
    s = np.exp(rng.normal(size=kv * rep * d)).astype(np.float32)
    assert plan_producer(x, (1.0 / s).reshape(1, 1, -1)) is None  # untied: not foldable
    s = s[ties]  # every channel takes its tie's first value
    edits = plan_producer(x, (1.0 / s).reshape(1, 1, -1))
    assert edits is not None and [e.node.name for e in edits] == ["v_proj"]
    for e in edits:
        c = e.node.inputs[e.index]
        c.values = np.asarray(c.values / e.factor if e.divide else c.values * e.factor, np.float32)
    wo = graph.tensors()["wo"]
    wo.values = (wo.values * s[:, None]).astype(np.float32)
    folded = gs.export_onnx(graph)
    feed = {"x": RNG.normal(size=(1, 5, kv * rep * d)).astype(np.float32),
            "p": RNG.random((1, kv * rep, 5, 5)).astype(np.float32)}  # fmt: skip
    np.testing.assert_allclose(run_ort(folded, feed)[0], run_ort(model, feed)[0], rtol=1e-4, atol=1e-5)
    wv0 = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "wv"))
    assert not np.allclose(graph.tensors()["wv"].values, wv0)  # the fold changed V, not an inserted op
    assert len(graph.nodes) == len(model.graph.node)


def test_graph_input_gets_an_explicit_mul() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    model = make_model(nodes, [value_info("x", [3, K])], [value_info("y", [3, N])], {"w": _w()}, check=False)
    out, step = _smooth(model, _recipe(alpha=1.0))
    _assert_exact(model, out)
    assert step.counts["groups_smoothed"] == 1 and step.counts["muls_inserted"] == 1, step.counts
    muls = [n for n in out.graph.node if n.op_type == "Mul"]
    assert len(muls) == 1 and "SmoothQuant" in muls[0].name and muls[0].input[0] == "x", "x has no producer to fold 1/s into"
    fc = next(n for n in out.graph.node if n.name == "fc")
    assert fc.input[0] == muls[0].output[0], "the MatMul reads the smoothed input"
    assert any("explicit Mul" in note for note in step.notes)


def test_smoothing_lowers_quantization_error_on_outlier_channels() -> None:
    model = _ln_qkv_model()
    plain = quantize_model(model, _recipe().with_(passes=tuple(p for p in _recipe(quantize=True).passes if p != "smoothquant")),
                           calibration=CalibrationOptions(source="random:16")).model  # fmt: skip
    smoothed = quantize_model(model, _recipe(quantize=True), calibration=CalibrationOptions(source="random:16")).model
    feed = _feed(model)
    ref = run_ort(model, feed)[0]
    a, b = sqnr_db(ref, run_ort(plain, feed)[0]), sqnr_db(ref, run_ort(smoothed, feed)[0])
    assert b > a + 3, f"SmoothQuant SQNR {b:.1f} dB should beat plain w8a8 {a:.1f} dB by > 3 dB"


def test_auto_alpha_picks_from_the_grid_and_reports_it() -> None:
    model = _ln_qkv_model()
    out, step = _smooth(model, _recipe(alpha="auto", alpha_grid=(0.25, 0.5, 0.75)))
    _assert_exact(model, out)
    assert step.counts["groups_smoothed"] == 2 and step.counts["groups_left_unsmoothed"] == 0, step.counts
    # every smoothed layer names its alpha, one of the grid's; Q/K/V share one (one input), o_proj has its own
    docs = {n.name: n.doc_string for n in out.graph.node if "SmoothQuant alpha" in n.doc_string}
    assert sorted(docs) == ["k_proj", "o_proj", "q_proj", "v_proj"], docs
    alpha = {k: float(re.search(r"SmoothQuant alpha ([0-9.]+),", d).group(1)) for k, d in docs.items()}  # type: ignore[union-attr]
    assert set(alpha.values()) <= {0.25, 0.5, 0.75}, alpha
    assert alpha["q_proj"] == alpha["k_proj"] == alpha["v_proj"], alpha
    # and the run's note reports the search and what it picked
    picked = [alpha["q_proj"], alpha["o_proj"]]
    note = f"alpha searched per layer over 3 values: median {np.median(picked):g}, range {min(picked):g}..{max(picked):g}"
    assert note in step.notes, step.notes


def test_excluded_layers_are_not_smoothed() -> None:
    model = _ln_qkv_model()
    r = _recipe()
    r = r.with_(exclude=dataclasses.replace(r.exclude, op_types=("MatMul",)))
    out, step = _smooth(model, r)
    assert step.counts["groups_smoothed"] == 0 and not step.modified


def test_recipe_validation() -> None:
    with pytest.raises(RecipeError, match="alpha"):
        SmoothQuantSpec(alpha=1.5)
    with pytest.raises(RecipeError, match="op_types"):
        SmoothQuantSpec(op_types=("Conv",))
    r = recipe_from_dict({"preset": "w8a8-smoothquant", "smoothquant": {"alpha": "auto", "alpha_grid": [0.3, 0.6]}})
    assert r.smoothquant.alpha == "auto" and r.smoothquant.alpha_grid == (0.3, 0.6)
    with pytest.raises(RecipeError, match="unknown key 'alfa'"):
        recipe_from_dict({"smoothquant": {"alfa": 0.5}})


def test_cli_alpha(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_ln_qkv_model(), src)
    runner = CliRunner()
    bad = runner.invoke(main, ["quantize", str(src), "-o", str(tmp_path / "a.onnx"), "--preset", "w8a8", "--alpha", "0.5", "--calib", "random:4"])
    assert bad.exit_code == 2 and "smoothquant" in bad.output.lower()
    bad = runner.invoke(main, ["quantize", str(src), "-o", str(tmp_path / "a.onnx"), "--preset", "w8a8-smoothquant", "--alpha", "high", "--calib", "random:4"])
    assert bad.exit_code == 2
    ok = runner.invoke(main, ["quantize", str(src), "-o", str(tmp_path / "b.onnx"), "--preset", "w8a8-smoothquant",
                              "--alpha", "auto", "--calib", "random:8", "--no-progress"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "b.onnx").exists()


@pytest.mark.assets
def test_minilm_smoothing_is_exact_without_mul_nodes(assets: Path) -> None:
    model = onnx.load(asset(assets, "minilm/model.onnx"))
    opts = CalibrationOptions(source=str(asset(assets, "sts/sts-dev.csv")), tokenizer=str(asset(assets, "minilm/tokenizer.json")))
    r = _recipe().with_(target="auto")
    r = r.with_(calibration=dataclasses.replace(r.calibration, samples=4))
    res = quantize_model(model, r, calibration=opts)
    step = next(s for s in res.report.steps if s.name == "smoothquant")
    assert step.counts["muls_inserted"] == 0 and step.counts["groups_smoothed"] >= 12
    ids = RNG.integers(1000, 20000, (2, 12)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    for a, b in zip(run_ort(model, feed), run_ort(res.model, feed)):
        assert float(np.abs(a - b).max() / np.abs(a).max()) < 1e-4
