"""ONNX shape inference, copied back onto the graph's tensors.

Later passes need dtypes and shapes on intermediate tensors: constant folding folds ``Shape`` chains only
when the shape is known, calibration needs to know which tensors are float, and the quantization passes
pick per-channel axes from ranks. This pass exports the graph, runs ``onnx.shape_inference.infer_shapes``
(``data_prop=True`` so shape arithmetic like ``Shape -> Gather -> Concat`` is propagated,
``strict_mode=False`` so an op it cannot type, e.g. a contrib op, only leaves its outputs untyped) and sets
``Variable.dtype`` / ``Variable.shape`` from the inferred value infos. The graph itself (nodes, names, doc
strings, inputs, outputs) is never rebuilt.

Large initializers are replaced by typed graph inputs before inference: their values are not needed to
infer shapes, and this keeps models over 2 GB under protobuf's serialisation limit.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

from onnxq.pipeline import Pass, PassContext, PassResult

__all__ = ["ShapeInferencePass", "infer_shapes", "infer_into_graph", "refine_static_dims"]

logger = logging.getLogger(__name__)

#: Initializers with more elements than this are handed to inference as typed inputs, without data.
_MAX_DATA_ELEMENTS = 1024


def _model_for_inference(graph: gs.Graph) -> onnx.ModelProto:
    """Export ``graph`` with its large initializers as typed graph inputs (values not needed).

    The large constants are exported as empty placeholders (their values swapped out for the duration of
    the export and restored after), so no copy of the weights is ever made: for a 2.5 GB model the export
    would otherwise double the process's memory.
    """
    swapped: dict[str, tuple[gs.Constant, Any, tuple[int, ...]]] = {}  # Any: a LazyValues or an array
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant):
            continue
        v = t._values  # noqa: SLF001 - a LazyValues or an array; reading .values would load lazy data
        shape = tuple(int(d) for d in v.shape)
        n_elements = 1
        for d in shape:
            n_elements *= d
        if n_elements > _MAX_DATA_ELEMENTS and isinstance(v.dtype, np.dtype):
            swapped[t.name] = (t, v, shape)
    try:
        for t, v, _shape in swapped.values():
            t._values = np.empty((0,), dtype=v.dtype)  # noqa: SLF001
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for t, v, _shape in swapped.values():
            t._values = v  # noqa: SLF001
    keep: list[onnx.TensorProto] = []
    typed: list[onnx.ValueInfoProto] = []
    for init in model.graph.initializer:
        n_elements = 1
        for d in init.dims:
            n_elements *= d
        if init.name in swapped:
            typed.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(swapped[init.name][2])))
        elif n_elements > _MAX_DATA_ELEMENTS:
            typed.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    if typed:
        input_names = {i.name for i in model.graph.input}
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        model.graph.input.extend(vi for vi in typed if vi.name not in input_names)
    return model


def infer_into_graph(graph: gs.Graph) -> tuple[int, list[str]]:
    """Infer dtypes/shapes and set them on ``graph``'s Variables; returns (tensors updated, notes).

    Never raises for an inference failure: the graph keeps what it had and the failure becomes a note.
    """
    notes: list[str] = []
    try:
        inferred = onnx.shape_inference.infer_shapes(
            _model_for_inference(graph), check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as exc:  # noqa: BLE001 - inference is best effort; the graph stays as it was
        logger.warning("ONNX shape inference failed on graph '%s': %s", graph.name, exc)
        notes.append(f"ONNX shape inference failed, shapes left as they were: {type(exc).__name__}: {exc}")
        return 0, notes

    found: dict[str, onnx.ValueInfoProto] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type != 0:
            found[vi.name] = vi
    updated = 0
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) or tensor.is_empty() or tensor.name not in found:
            continue
        new = OnnxImporter.import_tensor(found[tensor.name])
        changed = False
        if new.dtype is not None and tensor.dtype != new.dtype:
            tensor.dtype = new.dtype
            changed = True
        # Keep an existing shape when inference knows less (None) about it.
        if new.shape is not None and tensor.shape != new.shape:
            tensor.shape = new.shape
            changed = True
        updated += int(changed)
    return updated, notes


def refine_static_dims(graph: gs.Graph) -> int:
    """Fill in dims that ONNX inference left symbolic but ONNX Runtime's symbolic shape inference computes
    as integers; returns how many tensors gained a static dim.

    ONNX inference loses the size of a dim that comes out of shape arithmetic through ``Where``/``Equal``
    (an ``Expand`` repeating each KV head of a grouped-query attention: ``[b, s, 4, 1, 8] -> [b, s, 4, ?, 8]``);
    ORT's ``SymbolicShapeInference`` tracks it. Only a non-integer dim is replaced, only by an integer, and
    only where both agree on the rank, so nothing known is changed. Best effort: a failure changes nothing.
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError as exc:  # it needs sympy (an onnxq dependency) and onnxruntime
        logger.warning("symbolic shape inference unavailable (%s): install sympy and onnxruntime; dims that ONNX "
                       "inference leaves symbolic stay unknown", exc)  # fmt: skip
        return 0
    try:
        inferred = SymbolicShapeInference.infer_shapes(_model_for_inference(graph), auto_merge=True, guess_output_rank=False)
    except Exception as exc:  # noqa: BLE001 - best effort, as infer_into_graph
        logger.debug("symbolic shape inference failed on graph '%s': %s", graph.name, exc)
        return 0
    if inferred is None:
        return 0
    dims: dict[str, list[int | None]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    refined = 0
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) or tensor.shape is None or tensor.name not in dims:
            continue
        new = dims[tensor.name]
        if len(new) != len(tensor.shape):
            continue
        shape = [d if isinstance(d, int) or n is None else int(n) for d, n in zip(tensor.shape, new)]
        if shape != list(tensor.shape):
            tensor.shape = shape
            refined += 1
    return refined


def _shape_counts(graph: gs.Graph) -> dict[str, int]:
    variables = [t for t in graph.tensors().values() if isinstance(t, gs.Variable) and not t.is_empty()]
    with_shape = sum(1 for t in variables if t.shape is not None and t.dtype is not None)
    return {"tensors_with_shape": with_shape, "tensors_without_shape": len(variables) - with_shape}


class ShapeInferencePass(Pass):
    """Run ONNX shape inference and record dtypes and shapes on every Variable it can type.

    counts: ``tensors_with_shape`` / ``tensors_without_shape`` (Variables with / without a known dtype
    and shape after the pass), ``tensors_updated``.
    """

    name = "shape_inference"
    in_place = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        updated, notes = infer_into_graph(graph)
        counts = _shape_counts(graph)
        counts["tensors_updated"] = updated
        if counts["tensors_without_shape"]:
            untyped = [
                t.name
                for t in graph.tensors().values()
                if isinstance(t, gs.Variable) and not t.is_empty() and (t.shape is None or t.dtype is None)
            ]
            notes.append(
                f"{len(untyped)} tensor(s) have no inferred dtype/shape (e.g. {', '.join(untyped[:5])}); "
                "ops ONNX cannot type (custom domains) or data-dependent shapes leave them unknown"
            )
        logger.debug("shape inference: %s", counts)
        return PassResult(graph, updated > 0, counts, notes)


def infer_shapes(graph: gs.Graph) -> gs.Graph:
    """Convenience form of :class:`ShapeInferencePass`: infer and set shapes in place, return ``graph``."""
    infer_into_graph(graph)
    return graph
