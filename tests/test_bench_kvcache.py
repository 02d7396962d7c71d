"""benchmarks/_kvcache.py and its users (perplexity.py prefill windows, bench_decode.py's onnxruntime loop)
on a tiny KV-cache decoder built with onnx.helper, checked against a numpy reference of the same model.

The decoder has the Optimum layout (input_ids, attention_mask, position_ids, past_key_values.0.{key,value}
[batch, 2, past, 4] -> logits, present.0.{key,value}) and a cache that matters: position t's logits read the
sum of the keys of all tokens up to t, cached ones included, so a decode step only equals the prefill when
the past is fed back right and positions continue after it.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
VOCAB, DIM, HEADS, HD, MAXPOS = 16, 8, 2, 4, 32


sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their siblings (_kvcache, _harness) by name
ppl_script = importlib.import_module("perplexity")
decode_script = importlib.import_module("bench_decode")
kv = importlib.import_module("_kvcache")


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"E": rng.normal(size=(VOCAB, DIM)).astype(np.float32), "P": rng.normal(size=(MAXPOS, DIM)).astype(np.float32),
            "W": rng.normal(size=(DIM, VOCAB)).astype(np.float32)}


def _decoder(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x = E[ids] + P[pos]; k = heads of x [b, 2, s, 4]; c_t = sum of past keys + cumsum(k)_t; logits = (x + c / 4) W."""
    past = ["batch", HEADS, "past_sequence_length", HD]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["tok"]),
        helper.make_node("Gather", ["P", "position_ids"], ["pos"]),
        helper.make_node("Add", ["tok", "pos"], ["x"]),
        helper.make_node("Reshape", ["x", "heads_shape"], ["xh"]),
        helper.make_node("Transpose", ["xh"], ["k"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "k"], ["present.0.value"], axis=2),
        helper.make_node("ReduceSum", ["past_key_values.0.key", "axis2"], ["past_sum"], keepdims=1),
        helper.make_node("CumSum", ["k", "axis2_scalar"], ["k_cum"]),
        helper.make_node("Add", ["k_cum", "past_sum"], ["c"]),
        helper.make_node("Transpose", ["c"], ["c_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["c_t", "flat_shape"], ["c_flat"]),
        helper.make_node("Mul", ["c_flat", "quarter"], ["c_scaled"]),
        helper.make_node("Add", ["x", "c_scaled"], ["h"]),
        helper.make_node("MatMul", ["h", "W"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()] + [
        numpy_helper.from_array(np.array([0, 0, HEADS, HD], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([0, 0, DIM], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array(2, np.int64), "axis2_scalar"),
        numpy_helper.from_array(np.array(0.25, np.float32), "quarter")]
    graph = helper.make_graph(nodes, "tiny_kv_decoder", [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, past),
        helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, past),
    ], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB]),
        helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", HEADS, "total", HD]),
        helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, ["batch", HEADS, "total", HD])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _reference_logits(w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """numpy logits [s, vocab] of one sequence from position 0."""
    x = w["E"][ids] + w["P"][np.arange(len(ids))]
    return (x + np.cumsum(x, axis=0) / 4) @ w["W"]


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return lse - z[np.arange(len(targets)), targets]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, dict]:
    d = tmp_path_factory.mktemp("kv")
    wa, wb = _weights(0), _weights(0)
    wb["W"] = wb["W"] + np.random.default_rng(5).normal(scale=0.7, size=wb["W"].shape).astype(np.float32)
    onnx.save(_decoder(wa), d / "a.onnx")
    onnx.save(_decoder(wb), d / "b.onnx")
    return d / "a.onnx", d / "b.onnx", wa, wb


def test_perplexity_feeds_a_kv_cache_decoder_prefill_windows(models: tuple[Path, Path, dict, dict], tmp_path: Path) -> None:
    """Each piece is a prefill from position 0 with an empty past; --agreement compares argmax with a reference."""
    a, b, wa, wb = models
    seq = 6
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=3 * seq + 1)
    nll_a, nll_b, agree = [], [], 0
    for start in range(0, 3 * seq, seq):
        piece = tokens[start : start + seq + 1]
        la, lb = _reference_logits(wa, piece[:-1]), _reference_logits(wb, piece[:-1])
        nll_a.extend(_nll(la, piece[1:]))
        nll_b.extend(_nll(lb, piece[1:]))
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
    r = ppl_script.perplexity(b, tokens, seq_len=seq, batch=2, progress=False, reference=a)
    assert (r.pieces, r.tokens_scored) == (3, 3 * seq)
    assert r.ppl == pytest.approx(np.exp(np.mean(nll_b)), rel=1e-4)
    assert r.reference_ppl == pytest.approx(np.exp(np.mean(nll_a)), rel=1e-4)
    assert r.agreement == pytest.approx(agree / (3 * seq)) and 0 < r.agreement < 1
    plain = ppl_script.perplexity(a, tokens, seq_len=seq, progress=False)
    assert plain.agreement is None and plain.ppl == pytest.approx(r.reference_ppl, rel=1e-6)
    # an onnxruntime-genai folder is read for its decoder file
    (tmp_path / "a.onnx").write_bytes(a.read_bytes())
    (tmp_path / kv.GENAI_CONFIG).write_text(json.dumps({"model": {"decoder": {"filename": "a.onnx"}}}))
    assert ppl_script.perplexity(tmp_path, tokens, seq_len=seq, progress=False).ppl == pytest.approx(plain.ppl, rel=1e-6)
    (tmp_path / kv.GENAI_CONFIG).write_text(json.dumps({"model": {"decoder": {"filename": "gone.onnx"}}}))
    with pytest.raises(kv.KVCacheError, match="'gone.onnx' is not a file"):
        kv.model_file(tmp_path)


def test_ort_decode_loop_equals_the_greedy_reference(models: tuple[Path, Path, dict, dict]) -> None:
    """bench_decode's onnxruntime loop: the past fed back and positions continued give the prefill's greedy tokens."""
    a, _, wa, _ = models
    prompt = [3, 9, 1, 14, 7]
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(_reference_logits(wa, np.array(seq))[-1].argmax()))
    runner = decode_script.make_runner(a, threads=1)
    g = runner.generate(prompt, 8)
    assert g.tokens == seq[len(prompt):]
    assert g.ttft_s > 0 and g.decode_s > 0


def test_symbolic_head_dim_is_read_from_group_query_attention(tmp_path: Path) -> None:
    """The builder's kv_cache_dim is symbolic: the head dim comes from the GQA node's packed q|k|v width."""
    gqa = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key_values.0.key", "past_key_values.0.value",
                                                   "seqlens_k", "total_len"], ["attn", "present.0.key", "present.0.value"],
                           domain="com.microsoft", num_heads=4, kv_num_heads=2)
    graph = helper.make_graph([gqa], "g", [], [], value_info=[
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["batch", "seq", 48])])  # (4 + 2 * 2) heads x 6
    path = tmp_path / "gqa.onnx"
    onnx.save(helper.make_model(graph), path)

    def arg(name: str, type_: str, shape: list) -> SimpleNamespace:
        return SimpleNamespace(name=name, type=type_, shape=shape)

    past = ["batch_size", 2, "past_sequence_length", "kv_cache_dim"]
    session = SimpleNamespace(
        get_inputs=lambda: [arg("input_ids", "tensor(int64)", ["b", "s"]), arg("attention_mask", "tensor(int64)", ["b", "t"]),
                            arg("past_key_values.0.key", "tensor(float)", past),
                            arg("past_key_values.0.value", "tensor(float16)", past)],
        get_outputs=lambda: [arg("logits", "tensor(float)", []), arg("present.0.key", "tensor(float)", []),
                             arg("present.0.value", "tensor(float)", [])])
    plan = kv.kv_cache_feeds(session, path)
    assert dict(plan.past_shapes) == {"past_key_values.0.key": (1, 2, 0, 6), "past_key_values.0.value": (1, 2, 0, 6)}
    assert not plan.has_positions and plan.present_names() == ["present.0.key", "present.0.value"]
    f = plan.feeds(np.array([[5, 6, 7]]), plan.empty_past(), 0)
    assert f["attention_mask"].shape == (1, 3) and f["past_key_values.0.value"].dtype == np.float16
    assert f["past_key_values.0.key"].shape == (1, 2, 0, 6)
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [])), path)  # no GQA node: the dim cannot be resolved
    with pytest.raises(kv.KVCacheError, match="symbolic head dim 'kv_cache_dim'"):
        kv.kv_cache_feeds(session, path)
