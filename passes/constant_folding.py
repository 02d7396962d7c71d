"""Constant folding: precompute every subgraph whose inputs are all constants.

Exporters leave shape arithmetic (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``), weight
transposes and ``Constant`` nodes in the graph. Folding them gives the quantization passes constant
weights to quantize and fewer nodes to reason about. The work is done by onnx-graphsurgeon's
``Graph.fold_constants`` (which evaluates the foldable part in ONNX Runtime and, with ``fold_shapes``,
folds ``Shape`` of statically shaped tensors), after ONNX shape inference so that those shapes are known.

Two things are never folded:

* ``QuantizeLinear`` / ``DequantizeLinear`` (and their consumers): a Q/DQ weight pair stored as an
  integer initializer behind a DequantizeLinear is the quantized model itself; folding it would store
  the weight in float again.
* a node whose output would be large (over ``max_output_bytes``, default 64 MiB) while its inputs are
  much smaller (``Expand`` / ``Tile`` / ``ConstantOfShape`` of a large shape): computing it at run time
  is cheaper than bloating the model. A folded transpose of a large weight is still folded, unless other
  nodes read that weight as it is (a tied embedding/lm_head): then folding stores the table twice, so the
  Transpose stays and the passes that quantize weights fold it (:func:`materialize_weight_transposes`).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.pipeline import Pass, PassContext, PassResult
from onnxq.passes.shape_inference import infer_into_graph

__all__ = ["ConstantFoldingPass", "fold_constants", "materialize_weight_transposes"]

logger = logging.getLogger(__name__)

_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
#: Ops whose output size is set by an input's *values*; unknown output size -> not folded.
_EXPANDING_OPS = frozenset({"Expand", "Tile", "ConstantOfShape", "Range", "Resize", "Upsample", "Pad", "OneHot"})
#: "Much smaller": the output must be this many times larger than all inputs together to count as a blow-up.
_BLOWUP_RATIO = 4
_MAX_ROUNDS = 3


def _itemsize(dtype: object) -> int | None:
    if dtype is None:
        return None
    if isinstance(dtype, int):  # gs keeps an ONNX enum for types numpy lacks (bfloat16, float8)
        try:
            return int(onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize)
        except Exception:  # noqa: BLE001
            return None
    return int(np.dtype(dtype).itemsize)  # type: ignore[call-overload]


def _nbytes(tensor: gs.Tensor) -> int | None:
    """Size in bytes from dtype and static shape; None when either is unknown."""
    size = _itemsize(tensor.dtype)
    shape = tensor.shape
    if size is None or shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return size * int(np.prod(shape, dtype=np.int64))


def _output_bytes(node: gs.Node) -> int | None:
    """Best estimate of the bytes ``node`` would produce, from inferred shapes or constant inputs."""
    known = [_nbytes(t) for t in node.outputs]
    if known and all(b is not None for b in known):
        return sum(b for b in known if b is not None)
    inp = node.inputs
    if node.op == "ConstantOfShape" and inp and isinstance(inp[0], gs.Constant):
        value = node.attrs.get("value")
        size = _itemsize(value.dtype) if isinstance(value, gs.Constant) else 4
        return int(np.prod(inp[0].values, dtype=np.int64)) * (size or 4)
    if node.op in {"Expand", "Tile"} and len(inp) >= 2 and isinstance(inp[1], gs.Constant):
        size = _itemsize(inp[0].dtype)
        if inp[0].shape is None or size is None:
            return None
        if node.op == "Tile":
            in_bytes = _nbytes(inp[0])
            return None if in_bytes is None else in_bytes * int(np.prod(inp[1].values, dtype=np.int64))
        try:
            shape = np.broadcast_shapes(tuple(inp[0].shape), tuple(int(d) for d in inp[1].values))
        except (TypeError, ValueError):
            return None
        return size * int(np.prod(shape, dtype=np.int64))
    return None


class ConstantFoldingPass(Pass):
    """Fold constant subgraphs (and static ``Shape`` chains) into initializers, then clean up.

    Args:
        max_output_bytes: a node whose output exceeds this while being ``_BLOWUP_RATIO`` times larger
            than its inputs is left to run at inference time.

    counts: ``nodes_folded`` (nodes gone from the graph, Constant nodes included), ``nodes_kept_large``
    (nodes not folded because of their output size), ``qdq_kept`` (Q/DQ nodes with constant inputs
    left in place).
    """

    name = "constant_folding"
    reported_counts = ("nodes_folded",)
    in_place = True

    def __init__(self, *, max_output_bytes: int = 64 << 20) -> None:
        self.max_output_bytes = max_output_bytes

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts, notes = _fold(graph, self.max_output_bytes)
        return PassResult(graph, counts["nodes_folded"] != 0, counts, notes)


def _fold(graph: gs.Graph, max_output_bytes: int) -> tuple[dict[str, int], list[str]]:
    """Fold ``graph`` in place; returns (counts, notes)."""
    notes: list[str] = []
    kept_large: dict[str, str] = {}

    def exclude(node: gs.Node) -> bool:
        # graphsurgeon calls this only for nodes whose inputs are all (foldable) constants. It already
        # refuses Q/DQ itself (before asking us); refuse them here too so that never depends on its version.
        if node.op in _QDQ_OPS:
            return True
        out_bytes = _output_bytes(node)
        if out_bytes is None:
            if node.op in _EXPANDING_OPS:
                kept_large[node.name] = f"{node.op} '{node.name}' not folded: its output size is unknown"
                return True
            return False
        in_bytes = sum(b or 0 for b in (_nbytes(t) for t in node.inputs if not t.is_empty()))
        if out_bytes > max_output_bytes and _copies_shared_weight(node):
            kept_large[node.name] = (
                f"{node.op} '{node.name}' not folded: its {out_bytes / 2**20:.1f} MiB output would be a second copy "
                f"of initializer '{node.inputs[0].name}', which other nodes read as it is (a tied embedding and "
                f"lm_head); the quantization passes read the weight through it"
            )
            return True
        if out_bytes > max_output_bytes and out_bytes > _BLOWUP_RATIO * in_bytes:
            kept_large[node.name] = (
                f"{node.op} '{node.name}' not folded: its output would be {out_bytes / 2**20:.1f} MiB "
                f"from {in_bytes / 2**20:.2f} MiB of inputs (limit {max_output_bytes / 2**20:.0f} MiB)"
            )
            return True
        return False

    n_before = len(graph.nodes)
    graph.toposort()
    for round_ in range(_MAX_ROUNDS):
        n_round = len(graph.nodes)
        _, inference_notes = infer_into_graph(graph)
        if round_ == 0:
            notes.extend(inference_notes)
        _fold_once(graph, exclude)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if len(graph.nodes) == n_round:
            break
    if n_before != len(graph.nodes):
        infer_into_graph(graph)  # folded Reshape targets etc. sharpen downstream shapes

    folded = n_before - len(graph.nodes)
    kept_qdq = {
        n.name
        for n in graph.nodes
        if n.op in _QDQ_OPS and all(isinstance(t, gs.Constant) for t in n.inputs if not t.is_empty())
    }
    notes.extend(sorted(kept_large.values()))
    if kept_qdq:
        notes.append(f"{len(kept_qdq)} QuantizeLinear/DequantizeLinear node(s) with constant inputs kept unfolded")
    logger.debug("constant folding: %d node(s) folded, %d kept for size", folded, len(kept_large))
    return {"nodes_folded": folded, "nodes_kept_large": len(kept_large), "qdq_kept": len(kept_qdq)}, notes


def _copies_shared_weight(node: gs.Node) -> bool:
    """A Transpose of an initializer that other nodes also read (Optimum's tied embedding/lm_head, the builder's
    tied lm_head/embedding): folding it stores the table twice; ONNX Runtime transposes it once at load."""
    table = node.inputs[0] if node.inputs else None
    return node.op == "Transpose" and isinstance(table, gs.Constant) and len(table.outputs) > 1


def _fold_once(graph: gs.Graph, exclude: Callable[[gs.Node], bool]) -> None:
    """One graphsurgeon folding round: the whole foldable subgraph in one ONNX Runtime session, and only when that
    fails the recursive partitioning (which always copies the whole graph and opens a session per output node of
    the foldable subgraph: 261 s instead of 3 s on Optimum's 7.4k-node SmolLM2 export, for the same folds).

    A failed first try leaves the graph as the recursive try expects it: graphsurgeon computes on a clone and
    replaces tensors only once all evaluation succeeded; its in-place shape-cast elision is repeatable.
    """
    try:
        graph.fold_constants(fold_shapes=True, partitioning=None, error_ok=False, should_exclude_node=exclude)
    except Exception as exc:  # noqa: BLE001 - any evaluation failure: the recursive partitioning isolates it
        logger.debug("whole-graph constant folding failed (%s: %s); folding by recursive partitioning",
                     type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        graph.fold_constants(fold_shapes=True, partitioning="recursive", error_ok=True, should_exclude_node=exclude)


def materialize_weight_transposes(graph: gs.Graph, max_output_bytes: int = 64 << 20) -> int:
    """Replace each Transpose constant folding keeps because it would copy a shared weight (over
    ``max_output_bytes``, see :func:`_copies_shared_weight`) by its transposed values, so that a quantization
    pass sees the weight it reads as a constant: run by the passes that quantize weights, which then store the
    transposed table quantized (a fraction of the float copy folding would have stored). Returns how many were
    replaced; the graph is unchanged when there are none."""
    done = 0
    for node in [n for n in graph.nodes if _copies_shared_weight(n)]:
        out = node.outputs[0]
        size = _nbytes(node.inputs[0])
        if size is None or size <= max_output_bytes or any(out is o for o in graph.outputs):
            continue
        values = np.ascontiguousarray(np.transpose(node.inputs[0].values, node.attrs.get("perm")))
        node.inputs.clear()
        node.outputs.clear()
        out.to_constant(values)
        graph.nodes.remove(node)
        done += 1
    return done


def fold_constants(graph: gs.Graph, *, max_output_bytes: int = 64 << 20) -> gs.Graph:
    """Convenience form of :class:`ConstantFoldingPass`: fold in place and return ``graph``."""
    _fold(graph, max_output_bytes)
    return graph
