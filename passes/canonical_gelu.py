"""Rewrite every exact (erf) GELU into the one form ONNX Runtime fuses into a single ``Gelu`` kernel.

``gelu(x) = x * 0.5 * (1 + erf(x / sqrt(2)))`` reaches ONNX as five elementwise nodes, written in
whichever order the exporter chose: ``x * 0.7071`` or ``x / 1.4142``; ``0.5`` applied to ``x``, to
``1 + erf`` or to the product. ONNX Runtime's GeluFusion (then BiasGelu, which also takes the bias Add
before it) only recognises::

    Div(x, 1.4142) -> Erf -> Add(1) -> Mul(x, .) -> Mul(., 0.5)

so a model written another way (MiniLM's ``Mul(x, 0.5) * (Erf(Mul(x, 0.7071)) + 1)``) runs five
passes over the widest activation of every layer (MiniLM: [batch, seq, 1536]) instead of one fused
kernel. Measured on MiniLM-L6, batch 32 x 64 tokens, 2-core AVX2 CPU (benchmarks/RESULTS.md): the five
nodes cost ~45 ms of fp32's ~460 ms, the fused BiasGelu ~25 ms; in the int8 models, where the matrix
products got cheaper, they are a larger share. The rewrite keeps the graph standard ONNX (every opset,
every runtime; TensorRT has its own fusion for the same pattern); it changes results by at most one
float rounding (``x / sqrt(2)`` instead of ``x * (1 / sqrt(2))``).

A GELU is rewritten only when its inner tensors have no other reader and are not graph outputs, its
constants are scalars within 1e-4 (float16: two units of its precision) of the
expected values, and it is float32 or float16; anything else is
left alone. The output keeps its tensor name. The tanh approximation (FastGelu) is not touched.

SmoothQuant may later fold a per-channel factor into the trailing ``0.5`` (when it smooths a GELU output,
which it rarely does: MiniLM's FFN2 inputs stay unsmoothed); the constant is then a vector, ORT no longer
fuses that GELU and runs the five nodes as before. Correct, only slower.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.pipeline import Pass, PassContext, PassResult

__all__ = ["CanonicalGeluPass", "canonical_gelu"]

logger = logging.getLogger(__name__)

_SQRT2 = math.sqrt(2.0)
_RTOL = 1e-4


@dataclass(frozen=True)
class _Gelu:
    """One matched GELU: its input, output, the nodes that compute it, and whether it is already canonical."""

    x: gs.Variable
    y: gs.Variable
    nodes: tuple[gs.Node, ...]
    canonical: bool
    dtype: np.dtype


def _values(t: gs.Tensor) -> np.ndarray | None:
    """The values of a constant: an initializer or a Constant node's output; None for anything else."""
    if not isinstance(t, gs.Constant):
        src = t.inputs[0] if len(t.inputs) == 1 else None
        if src is None or src.op != "Constant" or not isinstance(src.attrs.get("value"), gs.Constant):
            return None
        t = src.attrs["value"]
    return np.asarray(t.values)


def _scalar(t: gs.Tensor) -> tuple[float, float] | None:
    """The value of a one-element float constant and the tolerance its dtype allows, else None."""
    v = _values(t)
    if v is None or v.size != 1 or v.dtype.kind != "f":
        return None
    return float(v.reshape(-1)[0]), max(_RTOL, 2.0 * float(np.finfo(v.dtype).eps))


def _near(scalar: tuple[float, float] | None, expected: float) -> bool:
    return scalar is not None and abs(scalar[0] - expected) <= scalar[1] * abs(expected)


def _split(node: gs.Node, expected: float) -> gs.Tensor | None:
    """For a binary Mul/Add with a scalar constant ``expected`` on either side: the other input."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if _near(_scalar(b), expected):
        return a
    if _near(_scalar(a), expected):
        return b
    return None


def _only_reader(t: gs.Tensor, graph_outputs: set[int]) -> gs.Node | None:
    """The single node that reads ``t`` when ``t`` has exactly one reader and is not a graph output."""
    return t.outputs[0] if len(t.outputs) == 1 and id(t) not in graph_outputs else None


def _other(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """The input of binary ``node`` that is not ``t``."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    return b if a is t else a if b is t else None


def _dtype(x: gs.Tensor, scale: gs.Node) -> np.dtype:
    """The dtype of ``x``; without one (shape inference may not have run) that of the constant ``scale``
    multiplies or divides it by, which must have it too."""
    if x.dtype is not None:
        return np.dtype(x.dtype)
    const = _values(_other(scale, x))
    assert const is not None  # _match matched scale's other input as a scalar constant
    return const.dtype


def _match(erf: gs.Node, outs: set[int]) -> _Gelu | None:
    """Match the GELU around ``erf`` in any of the exporters' orders; None when it is not one."""
    u = erf.inputs[0]
    # `reader is None` first: mypy would otherwise narrow erf to the reader's Optional type
    if len(u.inputs) != 1 or (reader := _only_reader(u, outs)) is None or reader is not erf:
        return None
    scale = u.inputs[0]
    if scale.op == "Div" and len(scale.inputs) == 2 and _near(_scalar(scale.inputs[1]), _SQRT2):
        x, div = scale.inputs[0], True
    elif scale.op == "Mul":
        x, div = _split(scale, 1.0 / _SQRT2), False
    else:
        return None
    if x is None or isinstance(x, gs.Constant):
        return None
    dtype = _dtype(x, scale)
    if dtype not in (np.float32, np.float16):
        return None
    add = _only_reader(erf.outputs[0], outs)
    if add is None or add.op != "Add" or _split(add, 1.0) is not erf.outputs[0]:
        return None
    a = add.outputs[0]
    m1 = _only_reader(a, outs)
    if m1 is None or m1.op != "Mul":
        return None
    first = _other(m1, a)
    if first is None:
        return None
    if first is x:  # x * (1 + erf) then * 0.5
        m2 = _only_reader(m1.outputs[0], outs)
        if m2 is None or m2.op != "Mul" or _split(m2, 0.5) is not m1.outputs[0]:
            return None
        return _Gelu(x, m2.outputs[0], (scale, erf, add, m1, m2), canonical=div, dtype=dtype)
    if _near(_scalar(first), 0.5):  # (1 + erf) * 0.5 then * x
        m2 = _only_reader(m1.outputs[0], outs)
        if m2 is None or m2.op != "Mul" or _other(m2, m1.outputs[0]) is not x:
            return None
        return _Gelu(x, m2.outputs[0], (scale, erf, add, m1, m2), canonical=False, dtype=dtype)
    # (x * 0.5) * (1 + erf)
    if (len(first.inputs) != 1 or first.inputs[0].op != "Mul"
            or (reader := _only_reader(first, outs)) is None or reader is not m1):
        return None
    half = first.inputs[0]
    if _split(half, 0.5) is not x:
        return None
    return _Gelu(x, m1.outputs[0], (scale, half, erf, add, m1), canonical=False, dtype=dtype)


def _rewrite(g: _Gelu, graph: gs.Graph) -> None:
    """Replace ``g``'s nodes by the canonical chain, which writes the same output tensor."""
    dtype = g.dtype
    base = g.nodes[-1].name or g.y.name
    for n in g.nodes:
        n.inputs.clear()
        n.outputs.clear()

    def const(name: str, v: float) -> gs.Constant:
        return gs.Constant(f"{base}/{name}", np.array(v, dtype=dtype))

    def var(name: str) -> gs.Variable:
        return gs.Variable(f"{base}/{name}", dtype=dtype, shape=g.x.shape)

    d, e, a, m = var("div_out"), var("erf_out"), var("add_out"), var("mul_out")
    graph.nodes.extend([
        gs.Node("Div", f"{base}/Div", inputs=[g.x, const("sqrt2", _SQRT2)], outputs=[d]),
        gs.Node("Erf", f"{base}/Erf", inputs=[d], outputs=[e]),
        gs.Node("Add", f"{base}/Add", inputs=[e, const("one", 1.0)], outputs=[a]),
        gs.Node("Mul", f"{base}/Mul", inputs=[g.x, a], outputs=[m]),
        gs.Node("Mul", f"{base}/Mul_half", inputs=[m, const("half", 0.5)], outputs=[g.y]),
    ])  # fmt: skip


def _canonicalize(graph: gs.Graph) -> tuple[int, int]:
    outs = {id(t) for t in graph.outputs}
    found = [g for g in (_match(n, outs) for n in graph.nodes if n.op == "Erf") if g is not None]
    todo = [g for g in found if not g.canonical]
    for g in todo:
        _rewrite(g, graph)
    if todo:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    logger.debug("GELU: %d rewritten, %d already canonical", len(todo), len(found) - len(todo))
    return len(todo), len(found) - len(todo)


class CanonicalGeluPass(Pass):
    """Rewrite exact GELUs into the form ONNX Runtime fuses (``Div -> Erf -> Add -> Mul -> Mul``).

    counts: ``gelus_rewritten``, ``gelus_canonical`` (already in that form).
    """

    name = "canonical_gelu"
    reported_counts = ("gelus_rewritten",)
    in_place = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        rewritten, canonical = _canonicalize(graph)
        return PassResult(graph, rewritten > 0, {"gelus_rewritten": rewritten, "gelus_canonical": canonical})


def canonical_gelu(graph: gs.Graph) -> gs.Graph:
    """Convenience form of :class:`CanonicalGeluPass`: rewrite in place and return ``graph``."""
    _canonicalize(graph)
    return graph
