"""Feeding token ids to a model: which input gets what (:data:`TOKEN_INPUTS`), shared by the text and
token-file sources.

A decoder exported with a KV cache (onnxruntime-genai's builder, Optimum's ``text-generation-with-past``) also
takes ``past_key_values.{i}.{key,value}``: each window is fed as a prefill with an empty past (past length 0,
batch 1; :func:`empty_past_specs` resolves the other dimensions from the graph), ``attention_mask`` ones of the
window length and ``position_ids`` 0, 1, 2, ...."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxq.calibration.sources.base import InputSpec, shape_text
from onnxq.errors import CalibrationError, MissingDependencyError

#: The model inputs a text or token source fills, and with what.
TOKEN_INPUTS = {"input_ids": "token ids", "attention_mask": "ones", "token_type_ids": "zeros",
                "position_ids": "0, 1, 2, ..."}


#: The role of a KV-cache input (``past_key_values.*``): zeros of its empty-past shape (:func:`empty_past_specs`).
EMPTY_PAST = "empty past"
_PAST_PREFIXES = ("past_key_values.", "past_key_values_", "past.", "past_")


def is_past_input(spec: InputSpec) -> bool:
    """A KV-cache input: a float [batch, kv_heads, past, head_dim] input named like ``past_key_values.0.key``."""
    return spec.name.startswith(_PAST_PREFIXES) and np.issubdtype(spec.dtype, np.floating) and len(spec.shape) == 4


def kv_cache_inputs(graph: gs.Graph) -> set[int]:
    """ids of a graph's KV-cache inputs (:func:`is_past_input`)."""
    found = set()
    for t in graph.inputs:
        try:
            dtype = np.dtype(t.dtype)
        except TypeError:
            continue
        if is_past_input(InputSpec(t.name, dtype, tuple(t.shape or ()))):
            found.add(id(t))
    return found


def token_roles(specs: list[InputSpec], what: str) -> dict[str, str]:
    """Input name -> which :data:`TOKEN_INPUTS` entry feeds it (:data:`EMPTY_PAST` for a KV-cache input); raises
    for inputs a token source cannot fill.

    A model with a single integer input under another name (``tokens``, ``ids``) gets the token ids there.
    """
    past = {s.name: EMPTY_PAST for s in specs if is_past_input(s)}
    if past:
        return {**token_roles([s for s in specs if s.name not in past], what), **past}
    for s in specs:
        if s.dtype not in (np.dtype(np.int64), np.dtype(np.int32)):
            raise CalibrationError(f"model input '{s.name}' has dtype {s.dtype}; a {what} feeds int64/int32 token "
                                   f"inputs only ({', '.join(TOKEN_INPUTS)})")
    if len(specs) == 1 and specs[0].name not in TOKEN_INPUTS:
        return {specs[0].name: "input_ids"}
    unknown = [s.name for s in specs if s.name not in TOKEN_INPUTS]
    if unknown:
        names = ", ".join(f"'{n}'" for n in unknown)
        raise CalibrationError(f"model input{'s' if len(unknown) > 1 else ''} {names} cannot be filled by a {what}: "
                               f"it fills {', '.join(f'{k} ({v})' for k, v in TOKEN_INPUTS.items())}; give .npz "
                               "files keyed by input name instead")
    if "input_ids" not in (s.name for s in specs):
        raise CalibrationError(f"the model has no 'input_ids' input (its inputs are {[s.name for s in specs]}); "
                               f"a {what} needs one to feed the token ids")
    return {s.name: s.name for s in specs}


def static_seq_len(specs: list[InputSpec]) -> int | None:
    """The static sequence length (dim 1 of a rank-2 token input), if any input has one."""
    for s in specs:
        if len(s.shape) == 2 and isinstance(s.shape[1], int) and s.shape[1] > 0:
            return s.shape[1]
    return None


def token_feed(specs: list[InputSpec], roles: dict[str, str], ids: Any, mask: Any = None,
                type_ids: Any = None) -> dict[str, np.ndarray]:
    """One feed (batch 1) from a token-id sequence; mask/type ids default to ones/zeros."""
    n = len(ids)
    feed = {}
    for s in specs:
        role = roles[s.name]
        if role == EMPTY_PAST:
            shape = [d for d in s.shape if isinstance(d, int)]
            if len(shape) != len(s.shape):
                raise CalibrationError(f"KV-cache input '{s.name}' has dynamic dims {shape_text(s.shape)}; a token "
                                       "source feeds it only after empty_past_specs resolved them")
            feed[s.name] = np.zeros(shape, s.dtype)
            continue
        if role == "input_ids":
            x = np.asarray(ids)
        elif role == "attention_mask":
            x = np.ones(n, np.int64) if mask is None else np.asarray(mask)
        elif role == "token_type_ids":
            x = np.zeros(n, np.int64) if type_ids is None else np.asarray(type_ids)
        else:
            x = np.arange(n)
        feed[s.name] = np.ascontiguousarray(x.astype(s.dtype, copy=False)[None])
    return feed


def roles_text(roles: dict[str, str]) -> str:
    """The inputs a token source fills, as its description names them (KV-cache inputs counted, not listed)."""
    past = [n for n, r in roles.items() if r == EMPTY_PAST]
    names = [n for n, r in roles.items() if r != EMPTY_PAST]
    if past:
        names.append(f"{past[0].rsplit('.', 2)[0] if past[0].count('.') >= 2 else past[0]}.* ({len(past)} KV-cache "
                     "inputs, fed empty: past length 0)")
    return ", ".join(names)


def empty_past_specs(model: onnx.ModelProto, specs: list[InputSpec]) -> list[InputSpec]:
    """``specs`` with each KV-cache input's shape made static: batch 1, past length 0, the KV heads and head
    dimension from the input itself where static, else from the graph (:func:`_kv_dim`)."""
    out = []
    shapes: dict[str, list[int | None]] | None = None  # read from the graph once, when a dim needs it
    for s in specs:
        if not is_past_input(s):
            out.append(s)
            continue
        dims = list(s.shape)
        seq_axis = next((i for i, d in enumerate(dims) if isinstance(d, str) and "past" in d), 2)
        dims[0], dims[seq_axis] = 1, 0
        for axis in (i for i in range(1, 4) if i != seq_axis):
            dim = dims[axis]
            if not (isinstance(dim, int) and dim > 0):
                shapes = _static_shapes(model) if shapes is None else shapes
                dims[axis] = _kv_dim(model, shapes, s, axis)
        out.append(InputSpec(s.name, s.dtype, tuple(dims)))
    return out


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> shape (None for a dynamic dim) from the graph's value infos, inputs, outputs and initializers."""
    g = model.graph
    shapes: dict[str, list[int | None]] = {t.name: list(t.dims) for t in g.initializer}
    for vi in (*g.value_info, *g.input, *g.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return shapes


def _kv_dim(model: onnx.ModelProto, shapes: dict[str, list[int | None]], spec: InputSpec, axis: int) -> int:
    """Dimension ``axis`` (1: KV heads, 3: head dim) of a KV-cache input whose graph input leaves it symbolic: from
    the GroupQueryAttention reading it (``kv_num_heads``; head dim = width of its packed q|k|v input / (num_heads
    + 2 kv_num_heads), or of its query / num_heads), else from a reader's rank-4 output of the same layout.
    ``shapes``: :func:`_static_shapes` of the model."""
    for node in (n for n in model.graph.node if spec.name in n.input):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "GroupQueryAttention" and {"num_heads", "kv_num_heads"} <= attrs.keys():
            heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
            if axis == 1:
                return kv_heads
            packed = len(node.input) < 3 or not node.input[1]
            width = _last_dim(node.input[0], shapes, model)
            if width:
                return width // (heads + 2 * kv_heads) if packed else width // heads
        for out in node.output:
            shape = shapes.get(out)
            if shape is not None and len(shape) == 4 and shape[axis]:
                return int(shape[axis])  # type: ignore[arg-type]
    raise CalibrationError(f"cannot tell dimension {axis} of KV-cache input '{spec.name}' {shape_text(spec.shape)} from "
                           "the graph, so a text source cannot feed it an empty past; give .npz files keyed by input "
                           "name instead")


def _last_dim(name: str, shapes: dict[str, list[int | None]], model: onnx.ModelProto) -> int | None:
    """The static last dim of a tensor: its recorded shape, or the weight of the MatMul producing it."""
    shape = shapes.get(name)
    if shape and shape[-1]:
        return shape[-1]
    producer = next((n for n in model.graph.node if name in n.output), None)
    if producer is not None and producer.op_type == "MatMul" and len(producer.input) == 2:
        weight = shapes.get(producer.input[1])
        if weight and weight[-1]:
            return weight[-1]
    return None


def import_tokenizers() -> Any:
    """The ``tokenizers`` package, or a MissingDependencyError naming the extra to install."""
    try:
        import tokenizers
    except ImportError as e:
        raise MissingDependencyError('text calibration needs the tokenizers package: pip install "onnxq[text]"') from e
    return tokenizers


def is_number(cell: str) -> bool:
    """True when a CSV/TSV cell parses as a number (how the text column and a header row are told apart)."""
    try:
        float(cell)
    except ValueError:
        return False
    return True
