"""Graph hygiene: drop nodes nothing uses, pass-through Identity and inference Dropout, then sort.

Exporters leave ``Identity`` nodes (renamed outputs, tied weights) and ``Dropout`` nodes that do nothing
at inference. Left in place they split a Conv from its Relu or a weight from its MatMul, so the
quantization passes would see a pattern they do not match. Other passes may also leave dead nodes behind
(the pipeline runs hygiene as its own pass).

Graph input and output names never change: an Identity whose output is a graph output is removed by
letting the producer write the graph output tensor directly; it is kept only when its input is a graph
input, a graph output or a constant (nothing else can produce the output under that name).
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from onnxq.pipeline import Pass, PassContext, PassResult

__all__ = ["RemoveDeadNodesPass", "remove_dead_nodes"]

logger = logging.getLogger(__name__)


def _is_passthrough(node: gs.Node, graph: gs.Graph) -> bool:
    """True for an Identity, or a Dropout that is a no-op (inference mode, mask output unused)."""
    if node.op == "Identity":
        return len(node.inputs) == 1 and len(node.outputs) == 1
    if node.op != "Dropout" or not node.inputs or node.attrs.get("is_test", 1) == 0:
        return False
    if any(m.outputs or m in graph.outputs for m in node.outputs[1:]):
        return False
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():  # opset 12+: training_mode input
        mode = node.inputs[2]
        return isinstance(mode, gs.Constant) and not bool(mode.values)
    return True


def _bypass(node: gs.Node, graph: gs.Graph) -> bool:
    """Remove a pass-through node, rewiring around it; False when it has to stay."""
    src, dst = node.inputs[0], node.outputs[0]
    if dst in graph.outputs:
        # The output keeps its name: the producer of ``src`` must write ``dst`` instead.
        if src in graph.inputs or src in graph.outputs or isinstance(src, gs.Constant) or len(src.inputs) != 1:
            return False
        producer = src.inputs[0]
        for consumer in list(src.outputs):
            if consumer is not node:
                _replace_input(consumer, src, dst)
        node.outputs.clear()
        node.inputs.clear()
        producer.outputs[producer.outputs.index(src)] = dst
        if dst.dtype is None:
            dst.dtype, dst.shape = src.dtype, src.shape
        return True
    for consumer in list(dst.outputs):
        _replace_input(consumer, dst, src)
    node.inputs.clear()
    node.outputs.clear()
    return True


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def _remove(graph: gs.Graph) -> dict[str, int]:
    n_before = len(graph.nodes)
    removed = {"Identity": 0, "Dropout": 0}
    for node in list(graph.nodes):
        if node.op in removed and _is_passthrough(node, graph) and _bypass(node, graph):
            removed[node.op] += 1  # now disconnected: cleanup() drops it
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return {
        "nodes_removed": n_before - len(graph.nodes),
        "identities_removed": removed["Identity"],
        "dropouts_removed": removed["Dropout"],
    }


class RemoveDeadNodesPass(Pass):
    """Remove dead nodes, Identity and inference-mode Dropout nodes, and sort the graph topologically.

    counts: ``nodes_removed`` (all nodes removed, the Identity/Dropout ones included),
    ``identities_removed``, ``dropouts_removed``.
    """

    name = "remove_dead_nodes"
    in_place = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts = _remove(graph)
        logger.debug("remove_dead_nodes: %s", counts)
        return PassResult(graph, counts["nodes_removed"] > 0, counts)


def remove_dead_nodes(graph: gs.Graph) -> gs.Graph:
    """Convenience form of :class:`RemoveDeadNodesPass`: clean ``graph`` in place and return it."""
    _remove(graph)
    return graph
