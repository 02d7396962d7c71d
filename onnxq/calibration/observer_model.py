"""The observer model the calibration sessions run, and the grouping of its tensors to fit in memory.

:func:`build_observer_model` copies the model with the observed tensors as its outputs: reduced inside
the graph to a ``ReduceMin`` and a ``ReduceMax`` each (the min-max calibrators), or whole (the histogram
calibrators). Whole tensors of one batch can exceed memory: :func:`tensor_groups` splits them into groups
within a byte budget, sizing each tensor from the model's shapes (:func:`tensor_sizes`). The session
loop that runs these models is :class:`onnxq.calibration.runner.CalibrationSession`.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

__all__ = ["build_observer_model", "split_groups", "tensor_groups", "tensor_sizes"]

logger = logging.getLogger(__name__)

_MIN, _MAX = "/onnxq_observe_min", "/onnxq_observe_max"


def build_observer_model(model: onnx.ModelProto, names: list[str], *, reduce: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are the observed tensors (reduced to min/max when ``reduce``)."""
    obs = onnx.ModelProto()
    obs.CopyFrom(model)
    g = obs.graph
    del g.output[:]
    for i, name in enumerate(names):
        if reduce:
            for op, suffix in (("ReduceMin", _MIN), ("ReduceMax", _MAX)):
                g.node.append(helper.make_node(op, [name], [name + suffix], name=f"onnxq_observe_{i}{suffix}", keepdims=0))
                g.output.append(helper.make_empty_tensor_value_info(name + suffix))
        else:
            g.output.append(helper.make_empty_tensor_value_info(name))
    return obs


def tensor_sizes(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, int | None]:
    """Bytes of each named tensor for one run on ``feed`` (None where its shape is unknown); see
    :func:`tensor_groups`."""
    infos = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}

    def has_shape(n: str) -> bool:
        vi = infos.get(n)
        return vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")

    if not all(has_shape(n) for n in names):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - too large for the in-memory API, or an op it cannot type
            logger.debug("shape inference failed while sizing observed tensors", exc_info=True)
        else:
            infos.update({vi.name: vi for vi in inferred.graph.value_info})
    dims: dict[str, int] = {}
    for vi in model.graph.input:
        if vi.name in feed and vi.type.HasField("tensor_type"):
            for d, size in zip(vi.type.tensor_type.shape.dim, np.shape(feed[vi.name])):
                if d.dim_param:
                    dims[d.dim_param] = int(size)
    sizes: dict[str, int | None] = {}
    for n in names:
        if not has_shape(n):
            sizes[n] = None
            continue
        tt = infos[n].type.tensor_type
        elems = 1
        for d in tt.shape.dim:
            elems *= d.dim_value if d.dim_value > 0 else dims.get(d.dim_param, 1)
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize if tt.elem_type else 4
        sizes[n] = elems * itemsize
    return sizes


def tensor_groups(
    model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray], budget: int
) -> list[list[str]]:
    """Split ``names`` into groups whose tensors for one batch (``feed``) fit in ``budget`` bytes.

    Sizes come from the model's shapes (ONNX shape inference fills in tensors the model does not
    annotate), with symbolic dims resolved from the feed's shapes where a graph input names them and
    other unknown dims taken as 1. A tensor of unknown shape counts as large as the largest known one
    (as nothing when no size is known). A single tensor over the budget gets a group of its own.
    """
    return split_groups(names, tensor_sizes(model, names, feed), budget)


def split_groups(names: list[str], sizes: dict[str, int | None], budget: int) -> list[list[str]]:
    """Consecutive groups of ``names`` within ``budget`` bytes (unknown sizes count as the largest known)."""
    known = [v for v in sizes.values() if v is not None]
    default = max(known) if known else 0
    groups: list[list[str]] = [[]]
    used = 0
    for n in names:
        size = default if (known_size := sizes[n]) is None else known_size
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += size
    return groups
