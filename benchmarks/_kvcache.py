"""How the LLM benchmarks feed a decoder exported with a KV cache (onnxruntime-genai's builder, Optimum).

Both exports take ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq], optionally
``position_ids`` [batch, seq] (Optimum; the builder's GroupQueryAttention derives positions from the
mask), and one ``past_key_values.{i}.{key,value}`` [batch, kv_heads, past, head_dim] per layer; they
return ``logits`` and one ``present.{i}.{key,value}`` per past input, the past of the next step.

``KVCacheFeeds`` reads that layout from an onnxruntime session (and, for the builder's symbolic
``kv_cache_dim``, from the graph), makes the empty past (past length 0) a prefill needs and the feeds of
one step; ``model_file`` turns an onnxruntime-genai folder into its decoder's ``.onnx`` file.
``perplexity.py`` (prefill windows) and ``bench_decode.py`` (the plain onnxruntime decode loop) share
it. Nothing here needs onnxq, torch or onnxruntime-genai.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
GENAI_CONFIG = "genai_config.json"
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}


class KVCacheError(Exception):
    """A model whose inputs these benchmarks cannot fill; the message names the file, the input and the fix."""


def model_file(path: str | Path) -> Path:
    """The ``.onnx`` file of ``path``: the file itself, or the decoder an onnxruntime-genai folder's
    ``genai_config.json`` names (``model.decoder.filename``)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise KVCacheError(f"{path}: no such model file or folder")
    config = path / GENAI_CONFIG
    if not config.is_file():
        raise KVCacheError(f"{path} is a folder without {GENAI_CONFIG}; pass the .onnx file inside it")
    try:
        name = json.loads(config.read_text())["model"]["decoder"]["filename"]
    except (ValueError, KeyError, TypeError) as e:
        raise KVCacheError(f"{config}: no model.decoder.filename ({e!r}); is it an onnxruntime-genai config?") from e
    if not (path / name).is_file():
        raise KVCacheError(f"{config}: model.decoder.filename {name!r} is not a file in {path}")
    return path / name


def _graph_head_dims(model: Path) -> dict[str, int]:
    """{past input name: head dim} from the GroupQueryAttention nodes reading the past (the builder's
    ``kv_cache_dim`` is symbolic): the packed q|k|v width / (num_heads + 2 kv_num_heads), or the key
    input's width / kv_num_heads. Widths come from the graph's value_info (the builder writes it)."""
    import onnx

    if not model.is_file():
        raise KVCacheError(f"{model}: a symbolic head dim is read from the graph; pass the model's path, not a session")
    graph = onnx.load(str(model), load_external_data=False).graph
    widths = {}
    for vi in [*graph.value_info, *graph.input, *graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            widths[vi.name] = dims[-1].dim_value
    found: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        heads, kv_heads = int(attrs.get("num_heads", 0)), int(attrs.get("kv_num_heads", 0))
        ins = list(node.input) + [""] * 5
        if ins[1] and ins[1] in widths and kv_heads:
            head_dim = widths[ins[1]] // kv_heads
        elif ins[0] in widths and heads + 2 * kv_heads:
            head_dim = widths[ins[0]] // (heads + 2 * kv_heads)
        else:
            continue
        for past in ins[3:5]:
            if past:
                found[past] = head_dim
    return found


@dataclass(frozen=True)
class KVCacheFeeds:
    """What a decoder's inputs need: the ids input, mask / position inputs, and the past inputs with
    their [batch, heads, past, head_dim] layout (``past_shapes`` with batch 1 and past 0)."""

    ids_name: str
    has_mask: bool
    has_positions: bool
    past_shapes: Mapping[str, tuple[int, ...]]
    past_dtypes: Mapping[str, Any]
    past_axis: int
    logits_name: str

    @property
    def has_past(self) -> bool:
        """True for a KV-cache decoder."""
        return bool(self.past_shapes)

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        """The past of a prefill: every past input with past length 0."""
        return {name: np.zeros((batch, *shape[1:]), dtype=self.past_dtypes[name])
                for name, shape in self.past_shapes.items()}

    def feeds(self, ids: np.ndarray, past: Mapping[str, np.ndarray] | None = None, past_len: int = 0) -> dict[str, np.ndarray]:
        """The feeds of one run on ``ids`` [batch, seq] after ``past_len`` cached tokens (``past``; an empty
        past when None): attention_mask ones over past + seq, position_ids past_len .. past_len + seq - 1."""
        batch, seq = ids.shape
        f: dict[str, np.ndarray] = {self.ids_name: ids}
        if self.has_mask:
            f["attention_mask"] = np.ones((batch, past_len + seq), dtype=np.int64)
        if self.has_positions:
            f["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
        if self.has_past:
            f.update(self.empty_past(batch) if past is None else past)
        return f

    def present_names(self) -> list[str]:
        """The output that becomes each past input at the next step (``present.X`` for ``past_key_values.X``)."""
        return [PRESENT_PREFIX + name[len(PAST_PREFIX):] for name in self.past_shapes]

    def next_past(self, presents: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The past of the next step from the outputs named by ``present_names`` (same order)."""
        return dict(zip(self.past_shapes, presents))


def _past_axis(name: str, dims: Sequence[Any], model: str) -> int:
    """The past-length axis of a past input: the symbolic dim whose name says past/seq, else axis 2 of a rank-4 input."""
    for axis, d in enumerate(dims[1:], start=1):
        if isinstance(d, str) and ("past" in d or "seq" in d):
            return axis
    if len(dims) == 4:
        return 2
    raise KVCacheError(f"{model}: past input {name!r} has shape {list(dims)}; expected [batch, heads, past, head_dim]")


def kv_cache_feeds(session: Any, model: str | Path) -> KVCacheFeeds:
    """Read the decoder's input layout from ``session`` (an onnxruntime session of ``model``).

    Static dims are taken as they are, batch becomes 1 and the past length 0; a symbolic head dim (the
    builder's ``kv_cache_dim``) is read from the GroupQueryAttention node that consumes the input.
    Raises ``KVCacheError`` for inputs that are neither token inputs nor past inputs, or a dim it cannot resolve.
    """
    inputs = session.get_inputs()
    names = [i.name for i in inputs]
    if "input_ids" in names:
        ids_name = "input_ids"
    elif len(inputs) == 1 and inputs[0].type == "tensor(int64)":
        ids_name = names[0]
    else:
        raise KVCacheError(f"{model}: no 'input_ids' input (inputs: {names}); these benchmarks feed token ids only")
    unknown = [n for n in names if n != ids_name and n not in TOKEN_INPUTS and not n.startswith(PAST_PREFIX)]
    if unknown:
        raise KVCacheError(f"{model}: inputs {unknown} cannot be filled (only input_ids, attention_mask, position_ids "
                           f"and {PAST_PREFIX}*)")
    outs = [o.name for o in session.get_outputs()]
    past = [i for i in inputs if i.name.startswith(PAST_PREFIX)]
    shapes, dtypes, axis, head_dims = {}, {}, 2, None
    for inp in past:
        if PRESENT_PREFIX + inp.name[len(PAST_PREFIX):] not in outs:
            raise KVCacheError(f"{model}: past input {inp.name!r} has no matching output "
                               f"{PRESENT_PREFIX + inp.name[len(PAST_PREFIX):]!r}")
        if inp.type not in _NP_TYPES:
            raise KVCacheError(f"{model}: past input {inp.name!r} has type {inp.type}; expected float or float16")
        axis = _past_axis(inp.name, inp.shape, str(model))
        dims = []
        for k, d in enumerate(inp.shape):
            if k == 0 or k == axis:
                dims.append(1 if k == 0 else 0)
            elif isinstance(d, int) and d > 0:
                dims.append(d)
            elif k == len(inp.shape) - 1:
                head_dims = _graph_head_dims(Path(model)) if head_dims is None else head_dims
                if inp.name not in head_dims:
                    raise KVCacheError(f"{model}: past input {inp.name!r} has a symbolic head dim {d!r} and no "
                                       "GroupQueryAttention node with known widths reads it")
                dims.append(head_dims[inp.name])
            else:
                raise KVCacheError(f"{model}: past input {inp.name!r} has a symbolic dim {d!r} at axis {k}; "
                                   "only batch, past length and head dim may be symbolic")
        shapes[inp.name], dtypes[inp.name] = tuple(dims), _NP_TYPES[inp.type]
    return KVCacheFeeds(ids_name, "attention_mask" in names, "position_ids" in names, shapes, dtypes, axis,
                        "logits" if "logits" in outs else outs[0])
