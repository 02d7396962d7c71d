"""The weight_only pass end to end: RTN packed as MatMulNBits and as opset-21 DequantizeLinear + MatMul (each
equal to the float model with dequantized weights), lm_head and embedding options, GPTQ better than RTN on
held-out tokens, AWQ's fold of 1/s into the norms and earlier projections, the [weight_only] recipe table,
the CLI flags, and stories260K through the CLI (perplexity-style NLL: GPTQ below RTN)."""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from conftest import asset
from helpers import full_check, make_ctx, node_named, op_types, run_cli, run_ort, sqnr_db
from test_segments import VOCAB, tiny_llama

from onnxq.calibration.runner import CalibrationSession
from onnxq.calibration.sources import TokenFileSource, input_specs
from onnxq.errors import PassError, RecipeError
from onnxq.model import to_model
from onnxq.passes import WeightOnlyPass
from onnxq.passes.weight_only import AWQ_SEARCH_CLIP_GRID
from onnxq.quantization import CalibrationOptions, QuantizeResult, quantize_model
from onnxq.recipe import Recipe, load_recipe, preset, recipe_from_dict
from onnxq.report import StepRecord
from onnxq.weightonly.awq import awq_candidate_scales, awq_clip_search
from onnxq.weightonly.grid import WeightGrid, rtn
from onnxq.weightonly.pack import MS_DOMAIN, MatMulNBitsArrays, unpack_matmulnbits

DIM, FFN, LAYERS = 32, 64, 2
PROJ = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "wg", "up_proj": "wu", "down_proj": "wd"}
WEIGHT = {f"layers.{i}/{p}": f"layers.{i}.{w}" for i in range(LAYERS) for p, w in PROJ.items()} | {"lm_head": "lm_head.weight"}
N_WEIGHT_MATMULS = len(WEIGHT)  # 15
N_ACTIVATION_MATMULS = 2 * LAYERS  # q @ k^T and probs @ v


@lru_cache(maxsize=None)
def _tiny() -> onnx.ModelProto:
    return tiny_llama(dim=DIM, ffn=FFN, layers=LAYERS)


def _recipe(name: str = "w4-rtn", fmt: str | None = None, samples: int = 16, **weight_only: object) -> Recipe:
    """A w4-* preset with [weight_only] changes and ``format``; block 16, accuracy_level 0 (fp32 compute) and
    lm_head "same" unless given, so that the tests do not depend on the presets' defaults."""
    r = preset(name)
    weight_only.setdefault("block_size", 16)
    weight_only.setdefault("accuracy_level", 0)
    weight_only.setdefault("lm_head", "same")
    r = r.with_(weight_only=dataclasses.replace(r.weight_only, **weight_only),
                calibration=dataclasses.replace(r.calibration, samples=samples))  # fmt: skip
    return r.with_(format=fmt) if fmt else r


def _step(result: QuantizeResult) -> StepRecord:
    return next(s for s in result.report.steps if s.name == "weight_only")


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _markov_tokens(n: int, seed: int) -> list[int]:
    """Token ids that walk up the vocabulary in small random steps: neighbouring tokens, correlated activations."""
    rng = np.random.default_rng(seed)
    t = [0]
    for step in rng.integers(1, 4, n - 1):
        t.append(int((t[-1] + step) % VOCAB))
    return t


def _held_out(seed: int = 100, windows: int = 4, seq: int = 48) -> list[dict[str, np.ndarray]]:
    ids = np.asarray(_markov_tokens(windows * seq, seed), np.int64).reshape(windows, 1, seq)
    return [{"input_ids": w} for w in ids]


def _rel_mse(reference: onnx.ModelProto, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    ref = [run_ort(reference, f)[0] for f in feeds]
    out = [run_ort(model, f)[0] for f in feeds]
    return float(sum(((a - b) ** 2).sum() for a, b in zip(ref, out)) / sum((a**2).sum() for a in ref))


def _tokens_file(tmp_path: Path, n: int = 16 * 16, seed: int = 0) -> Path:
    p = tmp_path / "tokens.json"
    p.write_text(json.dumps(_markov_tokens(n, seed)))
    return p


def _full_outputs(model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Intermediate tensors ``names`` of ``model`` (made graph outputs), one array per feed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    outs = [o.name for o in m.graph.output]
    runs = [dict(zip(outs, run_ort(m, f))) for f in feeds]
    return {n: [r[n] for r in runs] for n in names}


def _unpacked(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The float [K, N] weight of every MatMulNBits node, keyed by the original MatMul's name."""
    graph = gs.import_onnx(model)
    return {n.name.removesuffix("/MatMulNBits"): unpack_matmulnbits(MatMulNBitsArrays.from_node(n))
            for n in graph.nodes if n.op == "MatMulNBits"}  # fmt: skip


def _with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in weights:
            t.CopyFrom(onnx.numpy_helper.from_array(np.asarray(weights[t.name], np.float32), t.name))
    return out


# ------------------------------------------------------------------------------------------------ RTN


@lru_cache(maxsize=None)
def _rtn_models() -> dict[str, tuple[onnx.ModelProto, StepRecord]]:
    out = {}
    for fmt in ("matmulnbits", "qdq"):
        res = quantize_model(_tiny(), _recipe("w4-rtn", fmt, embeddings="float"), checked=True)
        out[fmt] = (res.model, _step(res))
    return out


def test_rtn_packs_every_weight_matmul_in_both_formats() -> None:
    nbits, step = _rtn_models()["matmulnbits"]
    full_check(nbits)
    ops = op_types(nbits)
    assert ops.count("MatMulNBits") == N_WEIGHT_MATMULS and ops.count("MatMul") == N_ACTIVATION_MATMULS
    assert {o.domain: o.version for o in nbits.opset_import} == {"": 17, MS_DOMAIN: 1}
    for name, w in WEIGHT.items():
        node = node_named(nbits, f"{name}/MatMulNBits")
        k, n = _inits(_tiny())[w].shape
        assert node.domain == MS_DOMAIN and node.output[0] == node_named(_tiny(), name).output[0]
        assert _attrs(node) == {"K": k, "N": n, "bits": 4, "block_size": 16}  # accuracy_level 0: left out
        assert node.doc_string.startswith("onnxq: RTN weight-only int4 asymmetric block 16")
    assert not any(w in _inits(nbits) for w in WEIGHT.values()), "a float weight was left in the model"
    assert step.counts["layers_quantized"] == N_WEIGHT_MATMULS and step.counts["segments_run"] == 0

    qdq, _ = _rtn_models()["qdq"]
    full_check(qdq)
    ops = op_types(qdq)
    assert {o.domain: o.version for o in qdq.opset_import} == {"": 21}
    assert ops.count("DequantizeLinear") == N_WEIGHT_MATMULS and ops.count("MatMul") == N_WEIGHT_MATMULS + N_ACTIVATION_MATMULS
    assert "MatMulNBits" not in ops
    inits = {t.name: t for t in qdq.graph.initializer}
    for name in WEIGHT:
        dq = node_named(qdq, f"{name}/DequantizeLinear")
        assert _attrs(dq) == {"axis": 0, "block_size": 16}
        assert inits[dq.input[0]].data_type == onnx.TensorProto.UINT4 and len(dq.input) == 3  # asymmetric: zero points
        assert node_named(qdq, name).input[1] == dq.output[0]


def test_rtn_output_is_the_float_model_with_dequantized_weights() -> None:
    """MatMulNBits (accuracy_level 0) = float model with W -> rtn(W).dequantize(); DequantizeLinear + MatMul
    agrees with it, unfused and fused by ORT at accuracy level 0 (the session option of test_weight_pack)."""
    grid = WeightGrid(4, False, 16)
    inits = _inits(_tiny())
    oracle = _with_weights(_tiny(), {w: rtn(inits[w], grid).dequantize() for w in WEIGHT.values()})
    nbits, qdq = _rtn_models()["matmulnbits"][0], _rtn_models()["qdq"][0]
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    fused = ort.InferenceSession(qdq.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for feed in _held_out(seed=3, windows=2, seq=24):
        want = run_ort(oracle, feed)[0]
        scale = float(np.abs(want).max())
        got_nbits = run_ort(nbits, feed)[0]
        np.testing.assert_allclose(got_nbits, want, rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(run_ort(qdq, feed)[0], got_nbits, rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(fused.run(None, feed)[0], got_nbits, rtol=1e-5, atol=1e-5 * scale)
        assert not np.allclose(run_ort(_tiny(), feed)[0], want, atol=1e-3)  # int4 did change the logits


def test_lm_head_float_and_int8() -> None:
    floated = quantize_model(_tiny(), _recipe(lm_head="float", embeddings="float"))
    head = node_named(floated.model, "lm_head")
    assert head.op_type == "MatMul"
    np.testing.assert_array_equal(_inits(floated.model)[head.input[1]], _inits(_tiny())["lm_head.weight"])
    assert op_types(floated.model).count("MatMulNBits") == N_WEIGHT_MATMULS - 1
    step = _step(floated)
    assert step.counts["layers_left_float"] == 1 and step.counts["layers_quantized"] == N_WEIGHT_MATMULS - 1
    assert any("'lm_head' left float" in n for n in step.notes)

    eight = quantize_model(_tiny(), _recipe(lm_head="int8", embeddings="float"))
    bits = {n.name: _attrs(n)["bits"] for n in eight.model.graph.node if n.op_type == "MatMulNBits"}
    assert bits.pop("lm_head/MatMulNBits") == 8 and set(bits.values()) == {4} and len(bits) == N_WEIGHT_MATMULS - 1
    step = _step(eight)
    assert step.counts["layers_int8"] == 1 and step.counts["layers_quantized"] == N_WEIGHT_MATMULS - 1
    # the int8 head is exactly the 8-bit grid of the same block size
    head_w = _unpacked(eight.model)["lm_head"]
    np.testing.assert_array_equal(head_w, rtn(_inits(_tiny())["lm_head.weight"], WeightGrid(8, False, 16)).dequantize())


def test_accuracy_level_auto_follows_the_target() -> None:
    """accuracy_level "auto": 0 (attribute left out, fp32) for the generic profile, 4 (int8 activations) for a CPU's."""
    for target, level in (("generic", None), ("x86-avx2", 4)):
        res = quantize_model(_tiny(), _recipe(accuracy_level="auto", embeddings="float").with_(target=target))
        levels = {_attrs(n).get("accuracy_level") for n in res.model.graph.node if n.op_type == "MatMulNBits"}
        assert levels == {level}, target


def test_lm_head_is_only_the_output_projection_with_kv_cache_outputs() -> None:
    """A decoder exported with its keys and values as outputs (present.*, as KV-cache exports have): the k/v
    projections are not output projections; lm_head = "float" must leave only lm_head float."""
    model = onnx.ModelProto()
    model.CopyFrom(_tiny())
    for i in range(LAYERS):
        for t in ("k", "v"):
            model.graph.output.append(onnx.helper.make_tensor_value_info(f"layers.{i}/{t}", onnx.TensorProto.FLOAT, None))
    res = quantize_model(model, _recipe(lm_head="float", embeddings="float"))
    floats = [n.name for n in res.model.graph.node if n.op_type == "MatMul" and n.input[1] in _inits(res.model)]
    assert floats == ["lm_head"]
    assert _step(res).counts["layers_quantized"] == N_WEIGHT_MATMULS - 1


def test_int8_embeddings_are_per_row_symmetric() -> None:
    """embeddings = "int8": the Gather reads int8 rows and one scale per row; its output equals
    q * scale with scale = max|row| / 127, q = clip(rint(row / scale), -127, 127), bit for bit."""
    model = onnx.ModelProto()
    model.CopyFrom(_tiny())
    model.graph.output.append(onnx.helper.make_tensor_value_info("embed/out", onnx.TensorProto.FLOAT, None))
    table = _inits(model)["embed.weight"].copy()
    table[5] = 0.0  # an all-zero row: scale 1, codes 0
    model.graph.initializer[[t.name for t in model.graph.initializer].index("embed.weight")].CopyFrom(
        onnx.numpy_helper.from_array(table, "embed.weight")
    )
    ids = np.asarray([[5, 0, 63, 7, 5, 31]], np.int64)

    res = quantize_model(model, _recipe(embeddings="int8"))
    assert _step(res).counts["embeddings_quantized"] == 1
    full_check(res.model)
    inits = _inits(res.model)
    assert "embed.weight" not in inits
    gathers = [n for n in res.model.graph.node if n.op_type == "Gather"]
    assert {inits[g.input[0]].dtype for g in gathers} == {np.dtype(np.int8), np.dtype(np.float32)}
    scale = np.where(np.abs(table).max(axis=1) > 0, np.abs(table).max(axis=1) / np.float32(127), 1).astype(np.float32)
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    expected = (q.astype(np.float32) * scale[:, None])[ids]
    got = run_ort(res.model, {"input_ids": ids})[1]
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got - table[ids]).max() <= np.abs(table).max() / 254 * 1.0001

    kept = quantize_model(model, _recipe(embeddings="float"))
    assert _step(kept).counts["embeddings_quantized"] == 0
    gather = node_named(kept.model, "embed/Gather")
    assert gather.input[0] == "embed.weight"
    np.testing.assert_array_equal(run_ort(kept.model, {"input_ids": ids})[1], table[ids])


def test_exclude_op_gather_keeps_the_embedding_float() -> None:
    recipe = _recipe(embeddings="int8")
    res = quantize_model(_tiny(), recipe.with_(exclude=dataclasses.replace(recipe.exclude, op_types=("Gather",))))
    assert _step(res).counts["embeddings_quantized"] == 0
    assert node_named(res.model, "embed/Gather").input[0] == "embed.weight"


# --------------------------------------------------------------------------------------- GPTQ and AWQ


def test_gptq_beats_rtn_on_held_out_tokens(tmp_path: Path) -> None:
    """GPTQ from 16 windows of a token file (TokenFileSource through CalibrationOptions): every layer GPTQ'd
    in 9 segments, each layer's calibration error small, and held-out logits closer to fp32 than RTN's."""
    tokens = _tokens_file(tmp_path)
    res = quantize_model(_tiny(), _recipe("w4-gptq", embeddings="float"), calibration=CalibrationOptions(source=str(tokens), seq_len=16))
    full_check(res.model)
    step = _step(res)
    assert step.counts["layers_quantized"] == N_WEIGHT_MATMULS and step.counts["segments_run"] == 9
    assert any(n.startswith("GPTQ: relative output error per layer") for n in step.notes)
    assert "token file" in res.report.info["calibration"]["source"] and res.report.info["calibration"]["samples"] == 16
    docs = [n.doc_string for n in res.model.graph.node if n.op_type == "MatMulNBits"]
    assert len(docs) == N_WEIGHT_MATMULS and all(d.startswith("onnxq: GPTQ weight-only int4") for d in docs)
    errors = [float(d.rsplit(" ", 1)[1]) for d in docs]
    assert all(0 < e < 0.01 for e in errors), errors

    rtn_model = _rtn_models()["matmulnbits"][0]
    feeds = _held_out()
    e_rtn, e_gptq = _rel_mse(_tiny(), rtn_model, feeds), _rel_mse(_tiny(), res.model, feeds)
    assert e_gptq < 0.8 * e_rtn, f"GPTQ {e_gptq:.4f} vs RTN {e_rtn:.4f}"


def test_gptq_pass_reports_every_layer_in_the_context(tmp_path: Path) -> None:
    """The pass run directly (ctx.calibration a CalibrationSession): ctx.weight_only_layers has the
    method, grid and relative error of every layer."""
    model = onnx.shape_inference.infer_shapes(_tiny())
    recipe = _recipe("w4-gptq", embeddings="float", bits=8, block_size=0, symmetric=True)
    source = TokenFileSource(_tokens_file(tmp_path), input_specs(model), seq_len=16, limit=8)
    ctx = make_ctx(calibration=CalibrationSession(source, recipe.calibration, progress=False))
    result = WeightOnlyPass.from_recipe(recipe)(gs.import_onnx(model), ctx)
    assert result.modified and result.counts["layers_quantized"] == N_WEIGHT_MATMULS
    info = ctx.weight_only_layers
    assert set(info) == set(WEIGHT)
    assert {v["method"] for v in info.values()} == {"gptq"} and {v["grid"] for v in info.values()} == {"int8 symmetric per-channel"}
    assert all(0 < v["rel_error"] < 1e-3 for v in info.values()), info
    out = to_model(result.graph, template=model)
    full_check(out)
    attrs = [_attrs(n) for n in out.graph.node if n.op_type == "MatMulNBits"]
    assert all(a["bits"] == 8 and a["block_size"] in (32, 64) for a in attrs)  # per-channel: next power of two >= K
    assert all(len(n.input) == 3 for n in out.graph.node if n.op_type == "MatMulNBits")  # symmetric: no zero points
    assert sqnr_db(run_ort(_tiny(), _held_out()[0])[0], run_ort(out, _held_out()[0])[0]) > 30


def test_awq_from_npz_runs_and_beats_rtn(tmp_path: Path) -> None:
    """AWQ from an .npz file of token windows: scales folded (norm weights and the v/up projections' columns
    absorb 1/s), the output runs and is closer to fp32 than RTN on held-out tokens."""
    ids = np.asarray(_markov_tokens(16 * 16, 0), np.int64).reshape(16, 16)
    np.savez(tmp_path / "calib.npz", input_ids=ids)
    res = quantize_model(_tiny(), _recipe("w4-awq", embeddings="float"), calibration=CalibrationOptions(source=str(tmp_path / "calib.npz")))
    full_check(res.model)
    step = _step(res)
    assert step.counts["awq_groups_scaled"] > 0 and step.counts["segments_run"] == 9
    assert step.counts["awq_groups_scaled"] + step.counts["awq_groups_unscaled"] == 9  # one group per wave input
    feeds = _held_out()
    assert _rel_mse(_tiny(), res.model, feeds) < _rel_mse(_tiny(), _rtn_models()["matmulnbits"][0], feeds)


@pytest.mark.parametrize("name, loss", [("w4-gptq-awq", "linear"), ("w4-awq", "linear")])
def test_awq_loss_linear_scores_every_layer_on_its_own_output(tmp_path: Path, name: str, loss: str) -> None:
    """awq_loss = "linear" (w4-gptq-awq's default, or set in a recipe): no module probe, every scale
    candidate scored on each linear's own output from H."""
    model = onnx.shape_inference.infer_shapes(_tiny())
    recipe = _recipe(name, embeddings="float")
    recipe = recipe.with_(weight_only=dataclasses.replace(recipe.weight_only, awq_loss=loss))
    assert preset("w4-gptq-awq").weight_only.awq_loss == "linear" and preset("w4-awq").weight_only.awq_loss == "module"
    source = TokenFileSource(_tokens_file(tmp_path), input_specs(model), seq_len=16, limit=8)
    ctx = make_ctx(calibration=CalibrationSession(source, recipe.calibration, progress=False))
    WeightOnlyPass.from_recipe(recipe)(gs.import_onnx(model), ctx)
    scored = {v["awq_scored_on"] for v in ctx.weight_only_layers.values() if "awq_scored_on" in v}
    assert scored == {"linear"}


def test_awq_scores_qkv_and_gate_up_on_their_module_output(tmp_path: Path) -> None:
    """The pass run directly: the scales of q/k/v and gate/up are searched on the output of the module they
    open (o_proj's, down_proj's), those of o_proj, down_proj and lm_head on their own output. Brute force
    for layer 0's q/k/v, whose input no quantized layer has touched: for every ratio, the float model with
    q/k/v replaced by their scaled weights quantized with the clips the search tries (divided by s)
    changes layers.0/o by some amount; the pass chose the ratio with the smallest change."""
    model = onnx.shape_inference.infer_shapes(_tiny())
    recipe = _recipe("w4-awq", embeddings="float")
    source = TokenFileSource(_tokens_file(tmp_path), input_specs(model), seq_len=16, limit=8)
    ctx = make_ctx(calibration=CalibrationSession(source, recipe.calibration, progress=False))
    WeightOnlyPass.from_recipe(recipe)(gs.import_onnx(model), ctx)
    info = ctx.weight_only_layers
    modules = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    assert {k: v["awq_scored_on"] for k, v in info.items()} == {
        k: "module" if k.split("/")[-1] in modules else "linear" for k in WEIGHT
    }

    feeds = list(source)
    x = _full_outputs(model, ["layers.0/attn_norm/out"], feeds)["layers.0/attn_norm/out"]
    rows = [np.asarray(a, np.float32).reshape(-1, DIM) for a in x]
    h = sum((r.T @ r).astype(np.float64) for r in rows)
    absmean = np.abs(np.concatenate(rows)).mean(0)
    grid = WeightGrid(4, False, 16)
    inits = _inits(model)
    names = ["layers.0.wq", "layers.0.wk", "layers.0.wv"]
    reference = _full_outputs(model, ["layers.0/o"], feeds)["layers.0/o"]
    losses = []
    for i in range(20):
        s = awq_candidate_scales(absmean, i / 20).astype(np.float64)
        weights = {}
        for name in names:
            scaled = (inits[name] * s[:, None]).astype(np.float32)
            clip = awq_clip_search(scaled, h / np.outer(s, s), grid, n_grid=AWQ_SEARCH_CLIP_GRID)
            weights[name] = rtn(scaled, grid, clip=clip).dequantize() / s[:, None]
        out = _full_outputs(_with_weights(model, weights), ["layers.0/o"], feeds)["layers.0/o"]
        losses.append(sum(float(((a.astype(np.float64) - b) ** 2).sum()) for a, b in zip(out, reference)))
    best = int(np.argmin(losses))
    print("layer 0 q/k/v: module loss per ratio / unscaled", np.round(np.asarray(losses) / losses[0], 3))
    assert best > 0 and losses[best] < 0.95 * losses[0], "the test should exercise a scale that matters"
    assert sorted(losses)[1] > losses[best] * (1 + 1e-4), "a near tie would make the comparison fragile"
    assert info["layers.0/q_proj"]["awq_ratio"] == best / 20


def test_gptq_awq_scales_then_gptq(tmp_path: Path) -> None:
    """w4-gptq-awq: the AWQ scales are folded (norm weights absorb 1/s) and every layer is then quantized by
    GPTQ on the scaled weights; the output is closer to fp32 than RTN on held-out tokens."""
    ids = np.asarray(_markov_tokens(16 * 16, 0), np.int64).reshape(16, 16)
    np.savez(tmp_path / "calib.npz", input_ids=ids)
    res = quantize_model(_tiny(), _recipe("w4-gptq-awq", embeddings="float"), calibration=CalibrationOptions(source=str(tmp_path / "calib.npz")))
    full_check(res.model)
    step = _step(res)
    assert step.counts["awq_groups_scaled"] > 0 and step.counts["layers_quantized"] == N_WEIGHT_MATMULS
    docs = [n.doc_string for n in res.model.graph.node if n.op_type == "MatMulNBits"]
    assert len(docs) == N_WEIGHT_MATMULS and all(d.startswith("onnxq: GPTQ weight-only") for d in docs)
    feeds = _held_out()
    assert _rel_mse(_tiny(), res.model, feeds) < _rel_mse(_tiny(), _rtn_models()["matmulnbits"][0], feeds)


def test_awq_fold_is_exact(tmp_path: Path) -> None:
    """AWQ at 8 bits (nearly lossless): the logits barely change, the RMSNorm weights absorbed 1/s
    (g' = g / s), and g' * W' matches g * W to 8-bit precision for every projection -- directly for
    q/k/gate, and through the next projection for v -> o and up -> down, whose columns absorbed the
    o/down scales. Without the fold (g' with the old W) the error would be large."""
    tokens = _tokens_file(tmp_path)
    res = quantize_model(_tiny(), _recipe("w4-awq", embeddings="float", bits=8),
                         calibration=CalibrationOptions(source=str(tokens), seq_len=16))  # fmt: skip
    step = _step(res)
    assert step.counts["layers_quantized"] == N_WEIGHT_MATMULS and step.counts["awq_groups_scaled"] > 0
    feeds = _held_out(windows=2)
    assert _rel_mse(_tiny(), res.model, feeds) < 1e-3

    before, after, w_new = _inits(_tiny()), _inits(res.model), _unpacked(res.model)
    changed = 0
    for i in range(LAYERS):
        for norm, direct, chained in (("attn_norm", ("q_proj", "k_proj"), ("v_proj", "o_proj")),
                                      ("mlp_norm", ("gate_proj",), ("up_proj", "down_proj"))):  # fmt: skip
            key = f"layers.{i}/{norm}.weight"
            g0, g1 = before[key], after[key].reshape(-1)
            if np.array_equal(g0, g1):
                continue
            changed += 1

            def rel(a: np.ndarray, b: np.ndarray) -> float:
                return float(np.linalg.norm(a - b) / np.linalg.norm(b))

            for p in direct:
                w0, w1 = before[WEIGHT[f"layers.{i}/{p}"]], w_new[f"layers.{i}/{p}"]
                assert rel(g1[:, None] * w1, g0[:, None] * w0) < 0.01, f"{key} -> {p}"
                assert rel(g1[:, None] * w0, g0[:, None] * w0) > 0.05  # s is not trivial
            first, second = (f"layers.{i}/{p}" for p in chained)
            prod0 = g0[:, None] * (before[WEIGHT[first]] @ before[WEIGHT[second]])
            prod1 = g1[:, None] * (w_new[first] @ w_new[second])
            assert rel(prod1, prod0) < 0.02, f"{key} -> {first} @ {second}"
    assert changed > 0, "no norm weight absorbed an AWQ scale"


def test_gptq_and_awq_without_calibration_are_refused() -> None:
    for name in ("w4-gptq", "w4-awq", "w4-gptq-awq"):
        with pytest.raises(PassError, match=r"needs calibration text.*--calib.*w4-rtn"):
            WeightOnlyPass.from_recipe(_recipe(name))(gs.import_onnx(_tiny()), make_ctx())


def test_gptq_with_a_weight_shared_by_two_layers(tmp_path: Path) -> None:
    """Tied weights: layers.1/q_proj reads layers.0's q weight. GPTQ should quantize it once and run."""
    model = onnx.ModelProto()
    model.CopyFrom(_tiny())
    node_named(model, "layers.1/q_proj").input[1] = "layers.0.wq"
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "layers.1.wq"))
    res = quantize_model(model, _recipe("w4-gptq", embeddings="float"),
                         calibration=CalibrationOptions(source=str(_tokens_file(tmp_path)), seq_len=16))  # fmt: skip
    assert op_types(res.model).count("MatMulNBits") == N_WEIGHT_MATMULS
    run_ort(res.model, _held_out()[0])


# ---------------------------------------------------------------------------------------------- recipe


def test_weight_only_table_loads_strictly(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('preset = "w4-gptq"\n[weight_only]\nblock_size = 32\nsymmetric = true\nlm_head = "int8"\n'
                    'embeddings = "float"\nact_order = true\n')  # fmt: skip
    r = load_recipe(path)
    wo = r.weight_only
    assert (wo.method, wo.bits, wo.block_size, wo.symmetric, wo.lm_head, wo.embeddings, wo.act_order) == (
        "gptq", 4, 32, True, "int8", "float", True)  # fmt: skip
    assert r.format == "matmulnbits" and r.needs_calibration() and not preset("w4-rtn").needs_calibration()
    path.write_text('preset = "w4-rtn"\n[weight_only]\ngroup_size = 32\n')
    with pytest.raises(RecipeError, match=r"unknown key 'group_size' in \[weight_only\].*block_size"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("table", "needles"),
    [
        ({"block_size": 48}, ("block_size", "power of two >= 16", "48")),
        ({"block_size": 8}, ("block_size", "power of two >= 16", "8")),
        ({"bits": 3}, ("[weight_only] bits = 3 is not one of 4, 8",)),
        ({"method": "foo"}, ("method = 'foo' is not one of 'rtn', 'gptq', 'awq'",)),
        ({"lm_head": "int4"}, ("lm_head = 'int4' is not one of 'same', 'int8', 'float'",)),
        ({"accuracy_level": 7}, ("accuracy_level = 7 must be in [0, 4] or 'auto'",)),
    ],
)
def test_invalid_weight_only_values(table: dict, needles: tuple[str, ...]) -> None:
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict({"preset": "w4-rtn", "weight_only": table})
    for needle in needles:
        assert needle in str(exc.value)


def test_per_channel_and_format_rules() -> None:
    assert recipe_from_dict({"preset": "w4-rtn", "weight_only": {"block_size": 0}}).weight_only.block_size == 0
    assert recipe_from_dict({"preset": "w4-awq", "format": "qdq"}).format == "qdq"
    with pytest.raises(RecipeError, match=r"matmulnbits.*weight-only preset.*w4-rtn"):
        recipe_from_dict({"preset": "w8a8", "format": "matmulnbits"})
    for name in ("w4-rtn", "w4-gptq", "w4-awq", "w4-gptq-awq"):
        with pytest.raises(RecipeError, match="no QOperator form"):
            recipe_from_dict({"preset": name, "format": "qoperator"})


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture()
def tiny_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny(), path)
    return path


def test_cli_gptq_needs_calib(tiny_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    code, _, err = run_cli("quantize", str(tiny_path), "-o", str(out), "--preset", "w4-gptq")
    text = " ".join(err.split())
    assert code == 1 and text.startswith("error:") and "Traceback" not in err
    assert "--calib" in text and "w4-rtn" in text and "GPTQ" in text
    assert not out.exists()


def test_cli_weight_only_flags_need_a_weight_only_preset(tiny_path: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("quantize", str(tiny_path), "-o", str(tmp_path / "o.onnx"), "--preset", "w8a8", "--block-size", "64",
                        "--calib", "random:1")  # fmt: skip
    assert code == 2 and "--block-size applies to weight-only presets" in " ".join(err.split())
    code, _, err = run_cli("quantize", str(tiny_path), "-o", str(tmp_path / "o.onnx"), "--preset", "w4-rtn", "--format", "qoperator")
    assert code == 1 and "no QOperator form" in " ".join(err.split())


def test_cli_w4_rtn_writes_the_recipe(tiny_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    code, stdout, err = run_cli("quantize", str(tiny_path), "-o", str(out), "--preset", "w4-rtn", "--block-size", "16", "--json")
    assert code == 0, err
    counts = next(s["counts"] for s in json.loads(stdout)["steps"] if s["name"] == "weight_only")
    assert counts["layers_quantized"] + counts["layers_int8"] == N_WEIGHT_MATMULS and counts["embeddings_quantized"] == 1
    model = onnx.load(str(out))
    full_check(model)
    meta = {p.key: p.value for p in model.metadata_props}
    recipe = json.loads(meta["onnxq.recipe"])
    assert recipe["name"] == "w4-rtn" and recipe["format"] == "matmulnbits"
    assert recipe["weight_only"]["method"] == "rtn" and recipe["weight_only"]["block_size"] == 16
    assert op_types(model).count("MatMulNBits") == N_WEIGHT_MATMULS
    assert run_ort(model, _held_out()[0])[0].shape == (1, 48, VOCAB)


def test_cli_awq_qdq_symmetric_float_head(tiny_path: Path, tmp_path: Path) -> None:
    """--format qdq --symmetric --lm-head float with AWQ from a token file: INT4 codes without zero points."""
    out = tmp_path / "o.onnx"
    code, _, err = run_cli("quantize", str(tiny_path), "-o", str(out), "--preset", "w4-awq", "--calib", str(_tokens_file(tmp_path)),
                        "--seq-len", "16", "--calib-size", "4", "--block-size", "16", "--symmetric", "--lm-head", "float",
                        "--format", "qdq", "--no-progress")  # fmt: skip
    assert code == 0, err
    model = onnx.load(str(out))
    full_check(model)
    inits = {t.name: t for t in model.graph.initializer}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == N_WEIGHT_MATMULS - 1 and node_named(model, "lm_head").input[1] == "lm_head.weight"
    assert all(len(n.input) == 2 and inits[n.input[0]].data_type == onnx.TensorProto.INT4 for n in dqs)
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    assert np.isfinite(run_ort(model, _held_out()[0], optimize=True)[0]).all()


def test_cli_presets_lists_weight_only() -> None:
    code, stdout, _ = run_cli("presets")
    assert code == 0
    for name in ("w4-rtn", "w4-gptq", "w4-awq"):
        assert name in stdout


# ------------------------------------------------------------------------------------------ stories260K

STORIES = "llm/stories260K/stories260K.onnx"
TOKENS = "text/tokens/stories260K__tinystories_valid_shared.json"


@pytest.fixture(scope="module")
def stories_outputs(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """stories260K through the CLI: w4-rtn and w4-gptq, both block 32 (GPTQ: 4 windows of 128 tokens)."""
    model, tokens = asset(assets, STORIES), asset(assets, TOKENS)
    folder = tmp_path_factory.mktemp("stories")
    runs = {
        "rtn": ["--preset", "w4-rtn"],
        "gptq": ["--preset", "w4-gptq", "--calib", str(tokens), "--seq-len", "128", "--calib-size", "4"],
    }
    out = {}
    for name, args in runs.items():
        path = folder / f"{name}.onnx"
        code, stdout, err = run_cli("quantize", str(model), "-o", str(path), "--block-size", "32", "--json", *args)
        assert code == 0, err
        out[name] = (path, json.loads(stdout))
    return out


@pytest.mark.assets
def test_stories260k_structure(stories_outputs: dict[str, tuple[Path, dict]]) -> None:
    for name, (path, report) in stories_outputs.items():
        model = onnx.load(str(path))
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == 36, name
        ks = [_attrs(n)["K"] for n in nbits]
        assert ks.count(172) == 5 and set(ks) == {64, 172}
        recipe = json.loads({p.key: p.value for p in model.metadata_props}["onnxq.recipe"])
        assert recipe["name"] == f"w4-{name}" and recipe["weight_only"]["block_size"] == 32
        head_bits = {"same": 4, "int8": 8}[recipe["weight_only"]["lm_head"]]
        bits = {n.name: _attrs(n)["bits"] for n in nbits}
        assert bits.pop("/output/MatMul/MatMulNBits") == head_bits and set(bits.values()) == {4}
        assert {_attrs(n)["block_size"] for n in nbits} == {32}
        assert all(n.input[1] not in {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
                   for n in model.graph.node if n.op_type == "MatMul"), "a float-weight MatMul was left"  # fmt: skip
        counts = next(s["counts"] for s in report["steps"] if s["name"] == "weight_only")
        assert counts["layers_quantized"] + counts["layers_int8"] == 36 and counts["embeddings_quantized"] == 1
        assert counts["segments_run"] == (21 if name == "gptq" else 0)
    assert stories_outputs["gptq"][1]["info"]["calibration"]["samples"] == 4


@pytest.mark.assets
def test_stories260k_gptq_nll_below_rtn(assets: Path, stories_outputs: dict[str, tuple[Path, dict]]) -> None:
    """Mean next-token NLL on two held-out windows of 256 tokens (after the calibration windows, which end
    at token 16640): fp32 < GPTQ < RTN, and both within 10% of fp32."""
    tokens = np.asarray(json.loads(asset(assets, TOKENS).read_text()), np.int64)

    def nll(path: Path) -> float:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        total = []
        for start in (17000, 19000):
            w = tokens[start : start + 257]
            logits = sess.run(None, {"input_ids": w[None, :-1]})[0][0].astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            total.append(-logp[np.arange(256), w[1:]])
        return float(np.concatenate(total).mean())

    fp32 = nll(asset(assets, STORIES))
    rtn_nll, gptq_nll = nll(stories_outputs["rtn"][0]), nll(stories_outputs["gptq"][0])
    assert np.isfinite([rtn_nll, gptq_nll]).all()
    assert fp32 < gptq_nll < rtn_nll, (fp32, gptq_nll, rtn_nll)
    assert rtn_nll < 1.1 * fp32 and gptq_nll < 1.1 * fp32


def test_cli_recipe_errors_keep_their_brackets(tiny_path: Path, tmp_path: Path) -> None:
    """An invalid block size is a one-line error naming the recipe table, printed literally (not as rich markup)."""
    code, _, err = run_cli("quantize", str(tiny_path), "-o", str(tmp_path / "o.onnx"), "--preset", "w4-rtn", "--block-size", "48")
    assert code == 1 and "[weight_only] block_size = 48 must be 0 (per-channel) or a power of two" in err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_text_calibration_is_cut_into_windows_for_llms(tiny_path: Path, tmp_path: Path) -> None:
    """GPTQ with a text file + --tokenizer and no --seq-len: the text is tokenized whole and cut into windows of
    512 tokens (not one short sample per line), as an LLM should be calibrated."""
    from test_sources import LINES, make_tokenizer

    tok = make_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "wiki.txt").write_text("\n".join(LINES * 120) + "\n")
    code, stdout, err = run_cli("quantize", str(tiny_path), "-o", str(tmp_path / "o.onnx"), "--preset", "w4-gptq",
                             "--calib", str(tmp_path / "wiki.txt"), "--tokenizer", str(tok), "--calib-size", "2", "--json")
    assert code == 0, err
    source = json.loads(stdout)["info"]["calibration"]["source"]
    assert "windows of 512 tokens" in source and "2 of " in source, source


@pytest.mark.assets
def test_stories260k_gqa_o_proj_fold_is_exact(assets: Path) -> None:
    """stories260K repeats its 4 KV heads for 8 query heads (Unsqueeze -> Expand -> Reshape, the Expand's
    shape computed through Where, which ONNX inference leaves symbolic). After refine_static_dims every
    o_proj input has 32 tied channel pairs (query heads 2g and 2g + 1 read KV head g), and a tied 1/s
    folded into v_proj's columns, with o_proj's rows multiplied by s, leaves the logits unchanged."""
    from onnxq.passes import PASSES
    from onnxq.passes.scale_folding import channel_ties, plan_producer
    from onnxq.passes.shape_inference import refine_static_dims
    from onnxq.pipeline import PassContext
    from onnxq.report import Report

    model = onnx.load(str(asset(assets, STORIES)))
    graph = gs.import_onnx(model)
    ctx = PassContext(report=Report(), progress=False)
    for name in ("shape_inference", "constant_folding", "remove_dead_nodes"):
        graph = PASSES[name]()(graph, ctx).graph
    o_inputs = [n.inputs[0] for n in graph.nodes if n.op == "MatMul" and n.name.endswith("attention/wo/MatMul")]
    assert len(o_inputs) == 5 and channel_ties(o_inputs[0]) is None  # the repeat's size is unknown to ONNX
    assert refine_static_dims(graph) > 0
    rng = np.random.default_rng(0)
    pairs = np.arange(64).reshape(8, 8)[[0, 2, 4, 6]].reshape(-1)  # the first channel of each tie
    for x in o_inputs:
        ties = channel_ties(x)
        assert ties is not None and len(np.unique(ties)) == 32
        np.testing.assert_array_equal(np.unique(ties), pairs)
        s = np.exp(rng.normal(size=64) * 0.5).astype(np.float32)[ties]
        edits = plan_producer(x, (1.0 / s).reshape(1, 1, -1))
        assert edits is not None and [e.node.name for e in edits] == [x.name.replace("Reshape_15_output_0", "wv/MatMul")]
        for e in edits:
            c = e.node.inputs[e.index]
            c.values = np.asarray(c.values * e.factor, np.float32)
        wo = next(n for n in x.outputs if n.op == "MatMul").inputs[1]
        wo.values = (wo.values * s[:, None]).astype(np.float32)
    folded = gs.export_onnx(graph)
    ids = {"input_ids": np.array([json.loads(asset(assets, TOKENS).read_text())[:64]], np.int64)}
    ref, out = run_ort(model, ids)[0], run_ort(folded, ids)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
