"""Make a float16 / bfloat16 model compute in float32 while keeping its float16 interface.

Calibration statistics and quantization parameters are float32 arithmetic, ONNX Runtime's CPU kernels
for float16 are few and slow, and the quantization passes expect float32 weights. Rather than asking the
user to convert the model first, this pass upcasts it inside the pipeline:

* every float16 (or bfloat16) initializer, ``Constant`` node value and tensor-valued attribute becomes
  float32, ``Cast(to=FLOAT16)`` becomes ``Cast(to=FLOAT)`` (likewise ``dtype`` attributes), and every
  float16 Variable is retyped float32;
* each float16 graph input keeps its type and gets a ``Cast(to=FLOAT)`` node named
  ``<input>/cast_to_float32`` that its consumers read from;
* each float16 graph output keeps its name and type: its producer now writes ``<output>/float32`` and a
  ``Cast`` node named ``<output>/cast_to_float16`` (``cast_to_bfloat16``) produces the output.

The source dtype is recorded in ``ctx.source_float_dtype`` (``"float16"`` or ``"bfloat16"``)
so a later pass can convert back. A model without float16/bfloat16 is left untouched.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.pipeline import Pass, PassContext, PassResult

__all__ = ["UpcastFloat16Pass", "upcast_float16"]

logger = logging.getLogger(__name__)

_HALF: dict[int, str] = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def _half_kind(dtype: object) -> str | None:
    """'float16' / 'bfloat16' for a half-precision gs dtype (numpy dtype or ONNX enum), else None."""
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)):
        return _HALF.get(int(dtype))
    name = np.dtype(dtype).name  # type: ignore[call-overload]
    return name if name in ("float16", "bfloat16") else None


def _all_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    yield graph
    for sub in graph.subgraphs(recursive=True):
        yield sub


def _upcast_constant(c: gs.Constant) -> None:
    c.values = np.asarray(c.values).astype(np.float32)
    c.export_dtype = None


def _replace(tensors: list[gs.Tensor], old: gs.Tensor, new: gs.Tensor) -> None:
    """Replace ``old`` by ``new`` in a node's inputs or outputs (by identity; gs compares names)."""
    for k, t in enumerate(tensors):
        if t is old:
            tensors[k] = new


def _scan(graph: gs.Graph) -> str | None:
    """The half dtype the model uses (first found), or None."""
    for g in _all_graphs(graph):
        for t in g.tensors().values():
            if kind := _half_kind(t.dtype):
                return kind
        for node in g.nodes:
            for key, val in node.attrs.items():
                if isinstance(val, gs.Constant) and (kind := _half_kind(val.dtype)):
                    return kind
                if key in ("to", "dtype") and isinstance(val, int) and val in _HALF:
                    return _HALF[val]
    return None


def _upcast(graph: gs.Graph) -> tuple[str | None, dict[str, int]]:
    """Upcast ``graph`` in place; returns the half kind it had (None: nothing to do) and the counts."""
    kind = _scan(graph)
    counts = {"initializers_upcast": 0, "casts_inserted": 0, "attributes_changed": 0}
    if kind is None:
        return None, counts
    half_dtype = onnx.TensorProto.FLOAT16 if kind == "float16" else onnx.TensorProto.BFLOAT16
    io_types = {id(t): t.dtype for t in list(graph.inputs) + list(graph.outputs)}
    for g in _all_graphs(graph):
        _upcast_inside(g, counts)
    _cast_inputs(graph, io_types, counts)
    _cast_outputs(graph, io_types, kind, half_dtype, counts)
    graph.toposort()
    return kind, counts


def _upcast_inside(g: gs.Graph, counts: dict[str, int]) -> None:
    """Every half tensor of ``g`` becomes float32 (constants converted), and so do Cast/dtype attributes."""
    for t in g.tensors().values():
        if not _half_kind(t.dtype):
            continue
        if isinstance(t, gs.Constant):
            _upcast_constant(t)
            counts["initializers_upcast"] += 1
        else:
            t.dtype = np.dtype(np.float32)
    for node in g.nodes:
        for key, val in node.attrs.items():
            if isinstance(val, gs.Constant) and _half_kind(val.dtype):
                _upcast_constant(val)  # Constant.value, ConstantOfShape.value
                counts["initializers_upcast"] += 1
            elif key in ("to", "dtype") and isinstance(val, int) and val in _HALF:
                node.attrs[key] = onnx.TensorProto.FLOAT
                counts["attributes_changed"] += 1


def _cast_inputs(graph: gs.Graph, io_types: dict[int, Any], counts: dict[str, int]) -> None:
    """A half graph input keeps its type; its readers get a float32 Cast of it."""
    for inp in graph.inputs:
        half = io_types[id(inp)]
        if not _half_kind(half):
            continue
        inp.dtype = half
        f32 = gs.Variable(f"{inp.name}/float32", np.dtype(np.float32), inp.shape)
        for node in list(inp.outputs):
            _replace(node.inputs, inp, f32)
        graph.nodes.append(gs.Node("Cast", f"{inp.name}/cast_to_float32", {"to": onnx.TensorProto.FLOAT}, [inp], [f32]))
        counts["casts_inserted"] += 1


def _cast_outputs(graph: gs.Graph, io_types: dict[int, Any], kind: str, half_dtype: int, counts: dict[str, int]) -> None:
    """A half graph output keeps its name and type: it becomes a Cast of the float32 value computed inside."""
    done = {id(t) for t in graph.inputs}  # a graph input passed straight through keeps its type untouched
    for i, out in enumerate(graph.outputs):
        half = io_types[id(out)]
        if not _half_kind(half) or id(out) in done:
            continue
        done.add(id(out))
        if isinstance(out, gs.Constant):
            # An initializer that is also an output: internal users keep it (float32, renamed) and the
            # output, under the original name, is a cast of it.
            f32, name = out, out.name
            f32.name = f"{name}/float32"
            graph.outputs[i] = out = gs.Variable(name, half, f32.shape)
        else:
            f32 = gs.Variable(f"{out.name}/float32", np.dtype(np.float32), out.shape)
            for node in list(out.outputs):
                _replace(node.inputs, out, f32)
            for producer in list(out.inputs):
                _replace(producer.outputs, out, f32)
            out.dtype = half
        graph.nodes.append(gs.Node("Cast", f"{out.name}/cast_to_{kind}", {"to": half_dtype}, [f32], [out]))
        counts["casts_inserted"] += 1


class UpcastFloat16Pass(Pass):
    """Compute a float16/bfloat16 model in float32, keeping its half-precision inputs and outputs.

    counts: ``initializers_upcast`` (initializers and Constant values), ``casts_inserted`` (at the
    graph's inputs and outputs), ``attributes_changed`` (``Cast.to`` / ``dtype`` attributes).
    Writes ``ctx.source_float_dtype`` when it fires.
    """

    name = "upcast_float16"
    reported_counts = ("casts_inserted",)
    in_place = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        kind, counts = _upcast(graph)
        if kind is None:
            return PassResult(graph, False, counts)
        ctx.source_float_dtype = kind
        note = f"{kind} model computed in float32 inside the pipeline; inputs/outputs keep {kind}"
        logger.info("upcast_float16: %s (%s)", note, counts)
        return PassResult(graph, True, counts, [note])


def upcast_float16(graph: gs.Graph) -> gs.Graph:
    """Convenience form of :class:`UpcastFloat16Pass`: upcast in place and return ``graph``."""
    _upcast(graph)
    return graph
