"""Tiny decoder LLM graphs in the two forms people export (no torch): onnxruntime-genai's model builder and Optimum.

Both mirror the wiring of the real SmolLM2 exports (see issue 17): hidden 64, 4 query heads and 2 KV heads of
dimension 16, 2 layers, vocabulary 128, random weights from a fixed seed, and a KV cache (inputs
``past_key_values.{i}.{key,value}`` [batch, kv_heads, past, head_dim], outputs ``logits`` and
``present.{i}.{key,value}``).

* :func:`builder_llm`: opset 22 + com.microsoft. Layer 0's input norm is ``SimplifiedLayerNormalization``
  (default domain, an op only onnxruntime knows), the later norms ``SkipSimplifiedLayerNormalization``
  (output 3 = the residual sum); one fused QKV MatMul per layer feeding ``GroupQueryAttention`` (do_rotary=1,
  cos/sin caches inside, ``seqlens_k`` and ``total_sequence_length`` made from ``attention_mask`` as the builder
  does); SwiGLU with Sigmoid/Mul; the tied ``lm_head.MatMul.weight`` [hidden, vocab] read by the lm_head MatMul and
  by ``Transpose -> Gather`` for the embedding. The head dimension of the past inputs is symbolic
  (``kv_cache_dim``) as in the builder's graph. No ``position_ids``. Every intermediate tensor has a value info
  with its element type, as the builder writes them.
* :func:`optimum_llm`: opset 18, plain ONNX: ``position_ids`` input, RMSNorm decomposed (Pow/ReduceMean/Add/
  Sqrt/Div/Mul), separate q/k/v projections, rotary from ``position_ids`` (Cos/Sin/Neg/Slice/Concat), attention
  with MatMul/Softmax and a causal + padding mask (Range/LessOrEqual/And/Where), past and present concatenated,
  KV heads repeated by Tile, the tied embedding ``model.embed_tokens.weight`` [vocab, hidden] read by the Gather
  and, through a Transpose, by the lm_head MatMul.

:func:`run_prefill` / :func:`run_decode` feed either form (prefill with an empty past; one decode step with the
past of a prefill), which is how the tests check a KV-cache graph: the last logits of a decode step must equal
those of a prefill of the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class LlmShape:
    """The tiny decoder's sizes."""

    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    vocab: int = 128
    intermediate: int = 128
    context: int = 64  # rows of the builder's cos/sin caches
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class _Graph:
    """Collects nodes and initializers with unique names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def op(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs: object) -> list[str]:  # fmt: skip
        outs = outputs if outputs is not None else [f"{name}/out{i}" if n_out > 1 else f"{name}/out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        s = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        return self.const(name, (self.rng.standard_normal(shape) * s).astype(np.float32))

    def gamma(self, name: str, n: int) -> str:
        return self.const(name, (1.0 + 0.1 * self.rng.standard_normal(n)).astype(np.float32))


def _kv_io(cfg: LlmShape, head_dim: int | str) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """past_key_values.* inputs and present.* outputs, [batch, kv_heads, length, head_dim]."""
    past, present = [], []
    for i in range(cfg.layers):
        for kv in ("key", "value"):
            past.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT,
                                                      ["batch_size", cfg.kv_heads, "past_sequence_length", head_dim]))
            present.append(helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT,
                                                         ["batch_size", cfg.kv_heads, "total_sequence_length", head_dim]))
    return past, present


def _swiglu(g: _Graph, x: str, cfg: LlmShape, p: str) -> str:
    """gate/up MatMuls, silu(gate) * up as Sigmoid/Mul, down MatMul."""
    gate = g.op("MatMul", [x, g.weight(f"{p}.mlp.gate_proj.weight", (cfg.hidden, cfg.intermediate))], f"/{p}/mlp/gate_proj/MatMul")[0]
    up = g.op("MatMul", [x, g.weight(f"{p}.mlp.up_proj.weight", (cfg.hidden, cfg.intermediate))], f"/{p}/mlp/up_proj/MatMul")[0]
    sig = g.op("Sigmoid", [gate], f"/{p}/mlp/act_fn/Sigmoid")[0]
    silu = g.op("Mul", [gate, sig], f"/{p}/mlp/act_fn/Mul")[0]
    act = g.op("Mul", [silu, up], f"/{p}/mlp/Mul")[0]
    return g.op("MatMul", [act, g.weight(f"{p}.mlp.down_proj.weight", (cfg.intermediate, cfg.hidden))], f"/{p}/mlp/down_proj/MatMul")[0]


def builder_llm(cfg: LlmShape = LlmShape(), seed: int = 0) -> onnx.ModelProto:
    """The onnxruntime-genai builder form (see the module docstring)."""
    g = _Graph(seed)
    hd, qkv_n = cfg.head_dim, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
    lm_w = g.weight("lm_head.MatMul.weight", (cfg.hidden, cfg.vocab), scale=0.5)
    emb_t = g.op("Transpose", [lm_w], "/model/embed_tokens/Transpose", perm=[1, 0])[0]
    x = g.op("Gather", [emb_t, "input_ids"], "/model/embed_tokens/Gather")[0]
    # seqlens_k = sum(attention_mask) - 1 (int32), total_sequence_length = attention_mask.shape[1] (int32 scalar)
    red = g.op("ReduceSum", ["attention_mask", g.const("/model/constant_nodes/INT64/[1]", np.array([1], np.int64))],
               "/model/attn_mask_reformat/attn_mask_subgraph/ReduceSum", keepdims=0)[0]
    sub = g.op("Sub", [red, g.const("/model/constant_nodes/INT64/1", np.array(1, np.int64))],
               "/model/attn_mask_reformat/attn_mask_subgraph/Sub")[0]
    seqlens_k = g.op("Cast", [sub], "/model/attn_mask_reformat/attn_mask_subgraph/Sub/Cast", to=TensorProto.INT32)[0]
    shape = g.op("Shape", ["attention_mask"], "/model/attn_mask_reformat/attn_mask_subgraph/Shape")[0]
    tot = g.op("Gather", [shape, g.const("/model/constant_nodes/INT64/1b", np.array(1, np.int64))],
               "/model/attn_mask_reformat/attn_mask_subgraph/Gather", axis=0)[0]
    total = g.op("Cast", [tot], "/model/attn_mask_reformat/attn_mask_subgraph/Gather/Cast", to=TensorProto.INT32)[0]
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    freqs = np.outer(np.arange(cfg.context, dtype=np.float64), inv_freq)
    cos = g.const("cos_cache", np.cos(freqs).astype(np.float32))
    sin = g.const("sin_cache", np.sin(freqs).astype(np.float32))
    normed = g.op("SimplifiedLayerNormalization", [x, g.gamma("model.layers.0.input_layernorm.weight", cfg.hidden)],
                  "/model/layers.0/input_layernorm/LayerNorm", epsilon=cfg.eps, axis=-1, stash_type=1)[0]
    residual = x
    for i in range(cfg.layers):
        p = f"model.layers.{i}"
        qkv = g.op("MatMul", [normed, g.weight(f"{p}.attn.qkv_proj.MatMul.weight", (cfg.hidden, qkv_n))],
                   f"/model/layers.{i}/attn/qkv_proj/MatMul")[0]
        attn = g.op("GroupQueryAttention", [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                            seqlens_k, total, cos, sin],
                    f"/model/layers.{i}/attn/GroupQueryAttention", domain="com.microsoft",
                    outputs=[f"/model/layers.{i}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
                    num_heads=cfg.heads, kv_num_heads=cfg.kv_heads, scale=1.0 / np.sqrt(hd), local_window_size=-1,
                    softcap=0.0, do_rotary=1, rotary_interleaved=0)[0]  # fmt: skip
        o = g.op("MatMul", [attn, g.weight(f"{p}.attn.o_proj.MatMul.weight", (cfg.hidden, cfg.hidden))],
                 f"/model/layers.{i}/attn/o_proj/MatMul")[0]
        normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [residual, o, g.gamma(f"{p}.post_attention_layernorm.weight", cfg.hidden)],
                                      f"/model/layers.{i}/post_attention_layernorm/SkipLayerNorm", domain="com.microsoft",
                                      outputs=[f"/model/layers.{i}/post_attention_layernorm/output_0", "", "",
                                               f"/model/layers.{i}/post_attention_layernorm/output_3"], epsilon=cfg.eps)  # fmt: skip
        down = _swiglu(g, normed, cfg, f"model.layers.{i}")
        last = i == cfg.layers - 1
        gamma = g.gamma("model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight", cfg.hidden)
        where = "/model/norm" if last else f"/model/layers.{i + 1}/input_layernorm"
        normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [residual, down, gamma], f"{where}/SkipLayerNorm",
                                      domain="com.microsoft", outputs=[f"{where}/output_0", "", "", f"{where}/output_3"],
                                      epsilon=cfg.eps)  # fmt: skip
    g.op("MatMul", [normed, lm_w], "/lm_head/MatMul", outputs=["logits"])
    past, present = _kv_io(cfg, "kv_cache_dim")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              *past]  # fmt: skip
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab]), *present]
    graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="onnxruntime-genai")  # fmt: skip
    model.ir_version = 10
    return _with_value_info(model, cfg)


def _with_value_info(model: onnx.ModelProto, cfg: LlmShape) -> onnx.ModelProto:
    """Record the type and shape of every intermediate tensor, as the builder does (onnx's shape inference cannot
    see through the contrib ops): found by running a 3-token prefill, batch and sequence dims made symbolic."""
    graph_outputs = {o.name for o in model.graph.output}
    names = [o for n in model.graph.node for o in n.output if o and o not in graph_outputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    sess = session(probe)
    ids = np.zeros((1, 3), np.int64)
    past = {i.name: np.zeros((1, cfg.kv_heads, 0, cfg.head_dim), np.float32) for i in sess.get_inputs() if i.name.startswith("past")}
    values = sess.run(names, {"input_ids": ids, "attention_mask": np.ones((1, 3), np.int64), **past})
    for name, v in zip(names, values):
        dims: list[int | str] = list(v.shape)
        if v.ndim == 3:
            dims[:2] = ["batch_size", "sequence_length"]
        model.graph.value_info.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), dims))
    return model


def _rms_norm(g: _Graph, x: str, gamma: str, where: str, eps: float) -> str:
    """RMSNorm as Optimum exports it: x * (1 / sqrt(mean(x^2) + eps)) * gamma."""
    pw = g.op("Pow", [x, g.const(f"{where}/two", np.array(2.0, np.float32))], f"{where}/Pow")[0]
    mean = g.op("ReduceMean", [pw, g.const(f"{where}/axes", np.array([-1], np.int64))], f"{where}/ReduceMean", keepdims=1)[0]
    add = g.op("Add", [mean, g.const(f"{where}/eps", np.array(eps, np.float32))], f"{where}/Add")[0]
    sq = g.op("Sqrt", [add], f"{where}/Sqrt")[0]
    inv = g.op("Div", [g.const(f"{where}/one", np.array(1.0, np.float32)), sq], f"{where}/Div")[0]
    xn = g.op("Mul", [x, inv], f"{where}/Mul")[0]
    return g.op("Mul", [gamma, xn], f"{where}/Mul_1")[0]


def _heads(g: _Graph, x: str, n: int, hd: int, where: str) -> str:
    """[B, S, n*hd] -> [B, n, S, hd]."""
    r = g.op("Reshape", [x, g.const(f"{where}/shape", np.array([0, 0, n, hd], np.int64))], f"{where}/Reshape")[0]
    return g.op("Transpose", [r], f"{where}/Transpose", perm=[0, 2, 1, 3])[0]


def _rotary(g: _Graph, x: str, cos: str, sin: str, hd: int, where: str) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x[..., hd/2:], x[..., :hd/2])."""
    h = hd // 2
    axis = g.const(f"{where}/axis", np.array([-1], np.int64))
    x1 = g.op("Slice", [x, g.const(f"{where}/s0", np.array([0], np.int64)), g.const(f"{where}/e0", np.array([h], np.int64)), axis],
              f"{where}/Slice")[0]  # fmt: skip
    x2 = g.op("Slice", [x, g.const(f"{where}/s1", np.array([h], np.int64)), g.const(f"{where}/e1", np.array([hd], np.int64)), axis],
              f"{where}/Slice_1")[0]  # fmt: skip
    neg = g.op("Neg", [x2], f"{where}/Neg")[0]
    rot = g.op("Concat", [neg, x1], f"{where}/Concat", axis=-1)[0]
    a = g.op("Mul", [x, cos], f"{where}/Mul")[0]
    b = g.op("Mul", [rot, sin], f"{where}/Mul_1")[0]
    return g.op("Add", [a, b], f"{where}/Add")[0]


def _optimum_mask(g: _Graph) -> str:
    """Additive attention mask [B, 1, S, T]: key j is visible from query position p when j <= p and mask[j] == 1."""
    shape = g.op("Shape", ["attention_mask"], "/model/mask/Shape")[0]
    total = g.op("Gather", [shape, g.const("/model/mask/one", np.array(1, np.int64))], "/model/mask/Gather", axis=0)[0]
    keys = g.op("Range", [g.const("/model/mask/zero", np.array(0, np.int64)), total, g.const("/model/mask/step", np.array(1, np.int64))],
                "/model/mask/Range")[0]  # fmt: skip
    q_pos = g.op("Unsqueeze", ["position_ids", g.const("/model/mask/axes_q", np.array([1, 3], np.int64))], "/model/mask/Unsqueeze")[0]
    causal = g.op("LessOrEqual", [keys, q_pos], "/model/mask/LessOrEqual")[0]
    pad = g.op("Unsqueeze", ["attention_mask", g.const("/model/mask/axes_m", np.array([1, 2], np.int64))], "/model/mask/Unsqueeze_1")[0]
    pad_b = g.op("Cast", [pad], "/model/mask/Cast", to=TensorProto.BOOL)[0]
    ok = g.op("And", [causal, pad_b], "/model/mask/And")[0]
    return g.op("Where", [ok, g.const("/model/mask/zero_f", np.array(0.0, np.float32)),
                          g.const("/model/mask/min_f", np.array(np.finfo(np.float32).min, np.float32))], "/model/mask/Where")[0]


def _optimum_attention(g: _Graph, x: str, cfg: LlmShape, i: int, cos: str, sin: str, mask: str) -> str:
    """q/k/v projections, rotary, past/present concat, repeated KV heads, masked softmax attention, o_proj."""
    p, w, hd = f"model.layers.{i}.self_attn", f"/model/layers.{i}/self_attn", cfg.head_dim
    proj = {n: g.op("MatMul", [x, g.weight(f"{p}.{n}_proj.weight", (cfg.hidden, k * hd))], f"{w}/{n}_proj/MatMul")[0]
            for n, k in (("q", cfg.heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads))}  # fmt: skip
    q = _rotary(g, _heads(g, proj["q"], cfg.heads, hd, f"{w}/q"), cos, sin, hd, f"{w}/q_rot")
    k = _rotary(g, _heads(g, proj["k"], cfg.kv_heads, hd, f"{w}/k"), cos, sin, hd, f"{w}/k_rot")
    v = _heads(g, proj["v"], cfg.kv_heads, hd, f"{w}/v")
    rep = cfg.heads // cfg.kv_heads
    repeated = []
    for name, t in (("key", k), ("value", v)):
        cat = g.op("Concat", [f"past_key_values.{i}.{name}", t], f"{w}/Concat_{name}", outputs=[f"present.{i}.{name}"], axis=2)[0]
        u = g.op("Unsqueeze", [cat, g.const(f"{w}/{name}_axis", np.array([2], np.int64))], f"{w}/Unsqueeze_{name}")[0]
        tiled = g.op("Tile", [u, g.const(f"{w}/{name}_rep", np.array([1, 1, rep, 1, 1], np.int64))], f"{w}/Tile_{name}")[0]
        repeated.append(g.op("Reshape", [tiled, g.const(f"{w}/{name}_shape", np.array([0, cfg.heads, -1, hd], np.int64))],
                             f"{w}/Reshape_{name}")[0])  # fmt: skip
    kt = g.op("Transpose", [repeated[0]], f"{w}/Transpose_k", perm=[0, 1, 3, 2])[0]
    scores = g.op("MatMul", [q, kt], f"{w}/MatMul")[0]
    scaled = g.op("Mul", [scores, g.const(f"{w}/scale", np.array(1.0 / np.sqrt(hd), np.float32))], f"{w}/Mul")[0]
    masked = g.op("Add", [scaled, mask], f"{w}/Add")[0]
    probs = g.op("Softmax", [masked], f"{w}/Softmax", axis=-1)[0]
    ctx = g.op("MatMul", [probs, repeated[1]], f"{w}/MatMul_1")[0]
    ctx_t = g.op("Transpose", [ctx], f"{w}/Transpose_ctx", perm=[0, 2, 1, 3])[0]
    flat = g.op("Reshape", [ctx_t, g.const(f"{w}/ctx_shape", np.array([0, 0, cfg.hidden], np.int64))], f"{w}/Reshape_ctx")[0]
    return g.op("MatMul", [flat, g.weight(f"{p}.o_proj.weight", (cfg.hidden, cfg.hidden))], f"{w}/o_proj/MatMul")[0]


def optimum_llm(cfg: LlmShape = LlmShape(), seed: int = 1) -> onnx.ModelProto:
    """The Optimum form (see the module docstring)."""
    g = _Graph(seed)
    hd = cfg.head_dim
    emb = g.weight("model.embed_tokens.weight", (cfg.vocab, cfg.hidden), scale=0.5)
    x = g.op("Gather", [emb, "input_ids"], "/model/embed_tokens/Gather")[0]
    inv_freq = g.const("/model/rotary_emb/inv_freq", (1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))).astype(np.float32))
    pos = g.op("Cast", ["position_ids"], "/model/rotary_emb/Cast", to=TensorProto.FLOAT)[0]
    pos3 = g.op("Unsqueeze", [pos, g.const("/model/rotary_emb/axis", np.array([-1], np.int64))], "/model/rotary_emb/Unsqueeze")[0]
    freqs = g.op("Mul", [pos3, inv_freq], "/model/rotary_emb/Mul")[0]
    both = g.op("Concat", [freqs, freqs], "/model/rotary_emb/Concat", axis=-1)[0]
    axis1 = g.const("/model/rotary_emb/axis1", np.array([1], np.int64))
    cos = g.op("Unsqueeze", [g.op("Cos", [both], "/model/rotary_emb/Cos")[0], axis1], "/model/rotary_emb/Unsqueeze_cos")[0]
    sin = g.op("Unsqueeze", [g.op("Sin", [both], "/model/rotary_emb/Sin")[0], axis1], "/model/rotary_emb/Unsqueeze_sin")[0]
    mask = _optimum_mask(g)
    for i in range(cfg.layers):
        p, w = f"model.layers.{i}", f"/model/layers.{i}"
        normed = _rms_norm(g, x, g.gamma(f"{p}.input_layernorm.weight", cfg.hidden), f"{w}/input_layernorm", cfg.eps)
        o = _optimum_attention(g, normed, cfg, i, cos, sin, mask)
        x = g.op("Add", [x, o], f"{w}/Add")[0]
        normed = _rms_norm(g, x, g.gamma(f"{p}.post_attention_layernorm.weight", cfg.hidden), f"{w}/post_attention_layernorm", cfg.eps)
        x = g.op("Add", [x, _swiglu(g, normed, cfg, p)], f"{w}/Add_1")[0]
    normed = _rms_norm(g, x, g.gamma("model.norm.weight", cfg.hidden), "/model/norm", cfg.eps)
    emb_t = g.op("Transpose", [emb], "/lm_head/Transpose", outputs=["model.embed_tokens.weight_transposed"], perm=[1, 0])[0]
    g.op("MatMul", [normed, emb_t], "/lm_head/MatMul", outputs=["logits"])
    past, present = _kv_io(cfg, hd)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "past_sequence_length + sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              *past]  # fmt: skip
    for o in present:
        o.type.tensor_type.shape.dim[2].dim_param = "past_sequence_length + sequence_length"
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab]), *present]
    graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="pytorch")
    model.ir_version = 8
    return model


def session(model: onnx.ModelProto | bytes | str) -> ort.InferenceSession:
    """A CPU session of a model (proto, bytes or path)."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _kv_layout(sess: ort.InferenceSession) -> tuple[list[str], int, int]:
    """The past input names, the number of KV heads and the head dimension (from the present outputs' shapes
    when the past inputs' head dim is symbolic)."""
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    kv_heads = int(past[0].shape[1])
    hd = past[0].shape[3]
    return [p.name for p in past], kv_heads, int(hd) if isinstance(hd, int) else -1


def _feed(sess: ort.InferenceSession, ids: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    n = ids.shape[1]
    feed = {"input_ids": ids, "attention_mask": np.ones((1, past_len + n), np.int64), **past}
    if "position_ids" in names:
        feed["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None]
    return feed


def run_prefill(sess: ort.InferenceSession, ids: np.ndarray, head_dim: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits [1, n, vocab] of the tokens ``ids`` [1, n] fed with an empty past, and the past for the next step
    (the present outputs renamed)."""
    names, kv_heads, hd = _kv_layout(sess)
    empty = {p: np.zeros((1, kv_heads, 0, hd if hd > 0 else head_dim), np.float32) for p in names}
    outs = sess.run(None, _feed(sess, ids, empty, 0))
    out_names = [o.name for o in sess.get_outputs()]
    res = dict(zip(out_names, outs))
    past = {n: res[n.replace("past_key_values.", "present.")] for n in names}
    return res["logits"], past


def run_decode(sess: ort.InferenceSession, ids: np.ndarray, head_dim: int) -> np.ndarray:
    """The last logits [vocab] of ``ids`` [1, n] computed as a prefill of n-1 tokens then one step with the past."""
    _, past = run_prefill(sess, ids[:, :-1], head_dim)
    logits = sess.run(["logits"], _feed(sess, ids[:, -1:], past, ids.shape[1] - 1))[0]
    return logits[0, -1]


def token_ids(n: int, vocab: int = LlmShape.vocab, seed: int = 7) -> np.ndarray:
    """A fixed random token sequence [1, n]."""
    return np.random.default_rng(seed).integers(0, vocab, size=(1, n), dtype=np.int64)
