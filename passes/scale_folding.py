"""Folding a per-channel factor into whatever produces a tensor: the planners SmoothQuant and AWQ share.

Both passes rewrite ``X @ W`` as ``(X / s) @ (diag(s) W)`` and must divide ``X`` by ``s`` without a new op
where they can: the factor goes into the constants of ``X``'s producer (a norm's weight, a bias, the
previous projection's output columns), also through reshapes, transposes, an attention MatMul (o_proj's
input folds into the V projection) and a grouped-query attention's repeat of the KV heads (the query
heads sharing a KV head must then share their factors, :func:`channel_ties`).

A factor is an array with the tensor's rank, each dim 1 or the tensor's size there: "multiply this tensor
by factor (broadcast)". The planners return the constant edits that achieve it, or None when impossible.
They never mutate the graph, so a failed plan leaves nothing half-done; the caller applies the edits
(each pass its own way: SmoothQuant counts what it folded into, AWQ rescales already-quantized columns).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

__all__ = [
    "ScaleEdit", "Ties", "apply_edit", "channel_ties", "float_constant", "plan_node", "plan_producer", "value_readers",
]  # fmt: skip


@dataclass
class ScaleEdit:
    """Multiply (or divide) input ``index`` of ``node``, a constant, by ``factor`` (broadcast)."""

    node: gs.Node
    index: int
    factor: np.ndarray
    divide: bool = False
    where: str = ""


def apply_edit(e: ScaleEdit, fresh: Callable[[str], str], suffix: str) -> None:
    """Scale the constant ``e`` names: in place, or, when other nodes also read it, as a new constant
    (named by ``fresh`` from the old name + ``suffix``) that only ``e.node`` reads, so they keep the original.
    A factor with as many values as the constant keeps the constant's shape (a ``[D]`` norm weight stays
    ``[D]``, not the factor's ``[1, 1, D]``)."""
    c = e.node.inputs[e.index]
    assert isinstance(c, gs.Constant)
    values = np.asarray(c.values / e.factor if e.divide else c.values * e.factor, dtype=c.values.dtype)
    if values.size == c.values.size:
        values = values.reshape(c.values.shape)
    if len(c.outputs) > 1:
        e.node.inputs[e.index] = gs.Constant(fresh(f"{c.name}{suffix}"), values)
    else:
        c.values = values


Ties = list[tuple[np.ndarray, np.ndarray]]
"""Pairs of equally shaped factor slices that must be equal for a plan to exist (see :func:`plan_node`)."""


def _plan(t: gs.Tensor, f: np.ndarray, ties: Ties | None = None) -> list[ScaleEdit] | None:
    """Edits that scale tensor ``t`` by ``f``; ``t`` must have exactly one reader (the caller)."""
    if not isinstance(t, gs.Variable) or len(value_readers(t)) != 1 or not t.inputs:
        return None
    return plan_producer(t, f, ties)


def plan_producer(t: gs.Variable, f: np.ndarray, ties: Ties | None = None) -> list[ScaleEdit] | None:
    """Edits to the constants of ``t``'s producer (or, recursively, of its producers) that turn ``t`` into
    ``t * f``; None when no such edits exist (``t`` is a graph input, or the producer cannot absorb ``f``).
    Other readers of ``t`` see the change too: the caller checks that only the layers it scales read it."""
    if not t.inputs:
        return None
    return plan_node(t.inputs[0], t, f, ties)


def plan_node(p: gs.Node, t: gs.Variable, f: np.ndarray, ties: Ties | None = None) -> list[ScaleEdit] | None:
    """Edits to ``p``'s constants (or, recursively, its producers) so that ``p``'s output ``t`` becomes ``t * f``.

    An ``Expand`` that broadcasts an axis (a grouped-query attention repeating each KV head for several
    query heads) can only be scaled by an ``f`` constant along that axis. With ``ties`` (a list), a plan
    is made anyway: the slices of ``f`` that would have to be equal are appended to it as pairs, and the
    first slice is planned (:func:`channel_ties` uses this to learn which channels must share a factor)."""
    if len(p.outputs) != 1 and not (p.op in _NORM_SCALES and _only_normalized_output(p, t)):
        return None
    planner = _PLANNERS.get(p.op)
    return None if planner is None else planner(p, t, f, ties)


def _last_only(f: np.ndarray) -> bool:
    """True when the factor varies along the last axis only (a per-channel vector)."""
    return all(d == 1 for d in f.shape[:-1])


#: Normalizations over the last axis: the input index of their scale (gamma), and of their bias (beta) if any.
#: ``SimplifiedLayerNormalization`` (RMSNorm, the default domain) and the com.microsoft ``Skip*`` forms are
#: onnxruntime's, as onnxruntime-genai's model builder writes them.
_NORM_SCALES = {"LayerNormalization": (1, 2), "SimplifiedLayerNormalization": (1, None),
                "SkipLayerNormalization": (2, 3), "SkipSimplifiedLayerNormalization": (2, None)}


def _only_normalized_output(p: gs.Node, t: gs.Variable) -> bool:
    """``t`` is the normalized output 0 and the statistics outputs are unused; a Skip* norm's output 3 (the
    residual sum input + skip, which the scale does not touch) may be read."""
    stats = p.outputs[1:3] if p.op.startswith("Skip") else p.outputs[1:]
    return p.outputs[0] is t and all(not o.outputs for o in stats)


def scaled_outputs(node: gs.Node) -> list[gs.Tensor]:
    """The outputs of an edited node that a :class:`ScaleEdit` changes: all, except a Skip* norm's residual
    sum (output 3), which its scale does not touch."""
    return node.outputs[:1] if node.op in _NORM_SCALES and node.op.startswith("Skip") else list(node.outputs)


def _plan_layer_norm(p: gs.Node, t: gs.Variable, f: np.ndarray, ties: Ties | None) -> list[ScaleEdit] | None:
    """A normalization over the last axis (:data:`_NORM_SCALES`): scale its weight (and bias)."""
    axis = int(p.attrs.get("axis", -1))
    scale, bias = _NORM_SCALES[p.op]
    if not _last_only(f) or axis not in (-1, f.ndim - 1) or len(p.inputs) <= scale or not float_constant(p.inputs[scale]):
        return None
    vec = f.reshape(-1)
    edits = [ScaleEdit(p, scale, _fit(vec, p.inputs[scale]), where="LayerNormalization")]
    if bias is not None and len(p.inputs) > bias and p.inputs[bias] is not None and not _empty(p.inputs[bias]):
        if not float_constant(p.inputs[bias]):
            return None
        edits.append(ScaleEdit(p, bias, _fit(vec, p.inputs[bias]), where="LayerNormalization"))
    return edits


def _plan_mul_div(p: gs.Node, t: gs.Variable, f: np.ndarray, ties: Ties | None) -> list[ScaleEdit] | None:
    """Mul/Div: scale a broadcastable constant operand, else (recursively) a same-shaped variable operand
    (either side of a Mul, the numerator of a Div)."""
    a, b = p.inputs[0], p.inputs[1]
    if float_constant(b) and _broadcasts(b, f, t):
        return [ScaleEdit(p, 1, f, divide=p.op == "Div", where=p.op)]
    if p.op == "Mul" and float_constant(a) and _broadcasts(a, f, t):
        return [ScaleEdit(p, 0, f, where="Mul")]
    if p.op == "Mul":
        for side in (b, a):
            if _same_shape(side, t):
                edits = _plan(side, f, ties)
                if edits is not None:
                    return edits
    elif _same_shape(a, t):
        return _plan(a, f, ties)
    return None


def _plan_add_sub(p: gs.Node, t: gs.Variable, f: np.ndarray, ties: Ties | None) -> list[ScaleEdit] | None:
    """Add/Sub: both operands must be scaled (a constant directly, a variable through its producer)."""
    edits: list[ScaleEdit] = []
    for i, side in enumerate(p.inputs[:2]):
        if float_constant(side):
            if not _broadcasts(side, f, t):
                return None
            edits.append(ScaleEdit(p, i, f, where="Add"))
        else:
            sub = _plan(side, f, ties) if _same_shape(side, t) else None
            if sub is None:
                return None
            edits.extend(sub)
    return edits


def _plan_matmul(p: gs.Node, t: gs.Variable, f: np.ndarray, ties: Ties | None) -> list[ScaleEdit] | None:
    """MatMul: scale a 2-D constant weight's output columns, or the right operand's producer when ``f`` is
    constant along the rows (an attention MatMul: o_proj's input folds into the V projection)."""
    b = p.inputs[1]
    if float_constant(b) and b.values.ndim == 2 and _last_only(f):
        return [ScaleEdit(p, 1, f.reshape(1, -1), where="MatMul")]
    if not float_constant(b) and f.ndim >= 2 and f.shape[-2] == 1 and _same_rank(b, t) and _static_where(b, t, f):
        return _plan(b, f, ties)  # (A @ B) * f == A @ (B * f) when f is constant along the rows
    return None


def _plan_gemm(p: gs.Node, t: gs.Variable, f: np.ndarray, ties: Ties | None) -> list[ScaleEdit] | None:
    """Gemm: scale the constant weight's output columns (rows with transB) and the bias."""
    b = p.inputs[1]
    if not float_constant(b) or not _last_only(f):
        return None
    vec = f.reshape(-1)
    trans = int(p.attrs.get("transB", 0))
    edits = [ScaleEdit(p, 1, vec[:, None] if trans else vec[None, :], where="Gemm")]
    if len(p.inputs) > 2 and not _empty(p.inputs[2]):
        c = p.inputs[2]
        if not float_constant(c) or c.values.shape not in ((), (1,), (vec.size,), (1, vec.size)):
            return None
        edits.append(ScaleEdit(p, 2, vec if c.values.ndim <= 1 else vec.reshape(1, -1), where="Gemm"))
    return edits


def _plan_transpose(p: gs.Node, t: gs.Variable, f: np.ndarray, ties: Ties | None) -> list[ScaleEdit] | None:
    """Transpose: plan the input with the factor permuted back."""
    perm = p.attrs.get("perm") or list(range(f.ndim))[::-1]
    return _plan(p.inputs[0], np.transpose(f, np.argsort(perm)), ties)


def _plan_reshape(p: gs.Node, t: gs.Variable, f: np.ndarray, ties: Ties | None) -> list[ScaleEdit] | None:
    """Reshape: plan the input with the factor reshaped to it, where that is possible."""
    fin = _reshape_factor(f, p.inputs[0], t)
    return None if fin is None else _plan(p.inputs[0], fin, ties)


def _plan_elementwise(p: gs.Node, t: gs.Variable, f: np.ndarray, ties: Ties | None) -> list[ScaleEdit] | None:
    """Identity/Relu: plan the input with the same factor (Relu(x) * f == Relu(x * f) for f > 0)."""
    return _plan(p.inputs[0], f, ties) if _same_shape(p.inputs[0], t) else None


def _plan_squeeze(p: gs.Node, t: gs.Variable, f: np.ndarray, ties: Ties | None) -> list[ScaleEdit] | None:
    """Squeeze/Unsqueeze: plan the input with the squeezed or unsqueezed factor."""
    fin = _squeeze_factor(p, f)
    return None if fin is None else _plan(p.inputs[0], fin, ties)


def _plan_expand(p: gs.Node, t: gs.Variable, f: np.ndarray, ties: Ties | None) -> list[ScaleEdit] | None:
    """Expand: plan the input with the factor folded over the broadcast axes (see :func:`plan_node`)."""
    fin = _expand_factor(p.inputs[0], t, f, ties)
    return None if fin is None else _plan(p.inputs[0], fin, ties)


_Planner = Callable[[gs.Node, gs.Variable, np.ndarray, Ties | None], list[ScaleEdit] | None]
_PLANNERS: dict[str, _Planner] = {
    **{op: _plan_layer_norm for op in _NORM_SCALES},
    "Mul": _plan_mul_div,
    "Div": _plan_mul_div,
    "Add": _plan_add_sub,
    "Sub": _plan_add_sub,
    "MatMul": _plan_matmul,
    "Gemm": _plan_gemm,
    "Transpose": _plan_transpose,
    "Reshape": _plan_reshape,
    "Identity": _plan_elementwise,
    "Relu": _plan_elementwise,
    "Unsqueeze": _plan_squeeze,
    "Squeeze": _plan_squeeze,
    "Expand": _plan_expand,
}
"""How each op's constants absorb a factor on its output; an op not listed cannot."""


def _squeeze_factor(p: gs.Node, f: np.ndarray) -> np.ndarray | None:
    """The factor on an Unsqueeze's (Squeeze's) input equivalent to ``f`` on its output: the inserted
    (removed) axes, of size 1, are dropped from (added to) ``f``."""
    if len(p.inputs) > 1 and p.inputs[1] is not None and not _empty(p.inputs[1]):
        if not isinstance(p.inputs[1], gs.Constant):
            return None
        axes = [int(a) for a in np.asarray(p.inputs[1].values).reshape(-1)]
    else:
        axes = [int(a) for a in p.attrs.get("axes", [])]
    src = p.inputs[0]
    if p.op == "Unsqueeze":
        axes = sorted(a % f.ndim for a in axes)
        if not axes or any(f.shape[a] != 1 for a in axes):
            return None
        return f.reshape([d for i, d in enumerate(f.shape) if i not in axes])
    if src.shape is None or not axes:
        return None
    rank = len(src.shape)
    axes = sorted(a % rank for a in axes)
    return np.expand_dims(f, axes)


def _expand_factor(src: gs.Tensor, out: gs.Variable, f: np.ndarray, ties: Ties | None) -> np.ndarray | None:
    """The factor on an Expand's input equivalent to ``f`` on its output.

    ``f`` must be constant along every axis the Expand broadcasts (input size 1, output larger), and the
    input's size must be static wherever ``f`` varies; with ``ties`` the slices that would have to be equal
    are recorded instead of failing (see :func:`plan_node`)."""
    if src.shape is None or out.shape is None or len(src.shape) > f.ndim:
        return None
    lead = f.ndim - len(src.shape)
    g = f
    for ax in range(f.ndim):
        if g.shape[ax] == 1:
            continue
        d = src.shape[ax - lead] if ax >= lead else 1
        if isinstance(d, int) and d == g.shape[ax]:
            continue  # not broadcast along this axis
        if d != 1:
            return None  # unknown or mismatched size where f varies
        first = g.take([0], axis=ax)
        for j in range(1, g.shape[ax]):
            other = g.take([j], axis=ax)
            if not np.array_equal(other, first):
                if ties is None:
                    return None
                ties.append((np.broadcast_to(first, other.shape).copy(), other))
        g = first
    return np.ascontiguousarray(g.reshape(g.shape[lead:]))


def channel_ties(x: gs.Variable) -> np.ndarray | None:
    """Which channels (last axis) of ``x`` must share one factor for ``x * f`` to fold into its producer.

    Returns a group label per channel (channels with the same label are tied: e.g. the channels of the
    query heads that read one KV head of a grouped-query attention's V), or None when no factor on ``x``
    can be folded (:func:`plan_producer` finds no producer to absorb it)."""
    if x.shape is None or not x.shape or not isinstance(x.shape[-1], int):
        return None
    k = int(x.shape[-1])
    labels = np.arange(k, dtype=np.float64).reshape((1,) * (len(x.shape) - 1) + (k,))
    ties: Ties = []
    if plan_producer(x, labels, ties) is None:
        return None
    parent = np.arange(k)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    for a, b in ties:
        for i, j in zip(a.reshape(-1).astype(np.int64), b.reshape(-1).astype(np.int64)):
            ri, rj = root(int(i)), root(int(j))
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    return np.array([root(i) for i in range(k)])


def value_readers(t: gs.Tensor) -> list[gs.Node]:
    """The nodes that read ``t``'s values (Shape and Size read only its shape, which scaling keeps)."""
    return [n for n in t.outputs if n.op not in ("Shape", "Size")]


def float_constant(t: gs.Tensor | None) -> bool:
    """Whether ``t`` is a floating-point constant (one a factor can be multiplied into)."""
    return isinstance(t, gs.Constant) and np.issubdtype(t.values.dtype, np.floating)


def _empty(t: gs.Tensor | None) -> bool:
    return t is None or (isinstance(t, gs.Variable) and t.name == "")


def _fit(vec: np.ndarray, c: gs.Constant) -> np.ndarray:
    return vec.reshape(c.values.shape) if c.values.size == vec.size else vec


def _broadcasts(c: gs.Constant, f: np.ndarray, t: gs.Variable) -> bool:
    """Whether ``c * f`` keeps the op's output shape (no rank or size growth beyond ``t``)."""
    try:
        shape = np.broadcast_shapes(c.values.shape, f.shape)
    except ValueError:
        return False
    if t.shape is None or len(shape) > len(t.shape):
        return False
    tail = list(t.shape)[len(t.shape) - len(shape):]
    return all(d == 1 or d == td for d, td in zip(shape, tail))


def _same_shape(a: gs.Tensor, t: gs.Variable) -> bool:
    return a.shape is not None and t.shape is not None and list(a.shape) == list(t.shape)


def _same_rank(a: gs.Tensor, t: gs.Variable) -> bool:
    return a.shape is not None and t.shape is not None and len(a.shape) == len(t.shape)


def _static_where(a: gs.Tensor, t: gs.Variable, f: np.ndarray) -> bool:
    """Every axis where ``f`` varies has the same static size in ``a`` and ``t`` (no broadcasting there)."""
    return all(d == 1 or (isinstance(ad, int) and ad == td) for d, ad, td in zip(f.shape, a.shape, t.shape))


def _reshape_factor(f: np.ndarray, src: gs.Tensor, out: gs.Variable) -> np.ndarray | None:
    """The factor on a Reshape's input equivalent to ``f`` on its output, when only trailing axes change."""
    if src.shape is None or out.shape is None:
        return None
    first = next(i for i, d in enumerate(f.shape) if d > 1) if any(d > 1 for d in f.shape) else len(f.shape) - 1
    block_out = list(out.shape)[first:]
    if not all(isinstance(d, int) and d > 0 for d in block_out):
        return None
    want = int(np.prod(block_out))
    src_shape = list(src.shape)
    prod, k = 1, 0
    while prod < want and k < len(src_shape):
        d = src_shape[-1 - k]
        if not isinstance(d, int) or d <= 0:
            return None
        prod *= d
        k += 1
    if prod != want:
        return None
    block = np.broadcast_to(f.reshape(f.shape[first:]), block_out).reshape(src_shape[len(src_shape) - k:])
    return np.ascontiguousarray(block.reshape((1,) * (len(src_shape) - k) + block.shape))
