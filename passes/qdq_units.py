"""Reading a QDQ *node unit*: the quantized tensors around one float op (for :mod:`.qoperator`).

A QDQ graph says what is quantized with ``DequantizeLinear -> op -> QuantizeLinear``. These functions
match that pattern without changing the graph: :func:`dequantized` reads the codes, scale, zero point,
dtype and axis behind an op's input (a :class:`QTensor`), and :func:`unit_output` follows the op's output
to its ``QuantizeLinear``, through a Relu/Clip the quantization already performs (:func:`absorbable`) and
one data-movement op (:data:`MOVES`), or accepts a float output. Each returns a string saying why when
the pattern is not there, so the lowering can report why a unit stays QDQ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

__all__ = [
    "ABSORBABLE", "MOVES", "QTensor", "S8", "U8", "UnitOutput", "absorbable", "const_value", "dequantized",
    "is_dequantized", "present_input", "producer", "qparams", "tensor_rank", "unit_output",
]  # fmt: skip

U8, S8 = np.dtype(np.uint8), np.dtype(np.int8)
ABSORBABLE = frozenset({"Relu", "Clip"})
"""Activations a unit's output quantization can perform itself (when its zero point is the lowest code)."""
MOVES = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose"})
"""Data-movement ops allowed between a unit's op and its QuantizeLinear (Q commutes with them)."""


@dataclass(frozen=True)
class QTensor:
    """A quantized tensor as an integer op reads it: the codes and their scale and zero point."""

    codes: gs.Tensor
    scale: gs.Tensor
    zero_point: gs.Tensor | None
    scale_v: np.ndarray
    zp_v: np.ndarray
    dtype: np.dtype
    axis: int | None  # None: per tensor

    @property
    def is_const(self) -> bool:
        """Whether the codes are an initializer (a weight)."""
        return isinstance(self.codes, gs.Constant)

    def same_params(self, other: QTensor) -> bool:
        """Whether both are per-tensor with the same dtype, scale and zero point."""
        return (
            self.axis is None and other.axis is None and self.dtype == other.dtype
            and np.array_equal(self.scale_v.reshape(-1), other.scale_v.reshape(-1))
            and np.array_equal(self.zp_v.reshape(-1).astype(np.int64), other.zp_v.reshape(-1).astype(np.int64))
        )  # fmt: skip


def const_value(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor (an initializer or a ``Constant`` node's output), else None."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Identity":  # exporters alias shared initializers this way
        return const_value(t.inputs[0].inputs[0])
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        attrs = t.inputs[0].attrs
        if isinstance(attrs.get("value"), gs.Constant):
            return np.asarray(attrs["value"].values)
        for key in ("value_float", "value_int"):
            if key in attrs:
                return np.asarray(attrs[key])
    return None


def producer(t: gs.Tensor) -> gs.Node | None:
    """The node that writes ``t`` (None for an initializer or a graph input)."""
    return t.inputs[0] if len(t.inputs) == 1 else None


def present_input(node: gs.Node, i: int) -> gs.Tensor | None:
    """Input ``i`` of ``node``, or None when it is absent or the empty name (an omitted optional input)."""
    if i < len(node.inputs) and not node.inputs[i].is_empty():
        return node.inputs[i]
    return None


def tensor_rank(t: gs.Tensor) -> int | None:
    """The rank of ``t`` when known."""
    if isinstance(t, gs.Constant):
        return t.values.ndim
    return len(t.shape) if t.shape is not None else None


def qparams(node: gs.Node, codes: gs.Tensor) -> QTensor | str:
    """Scale, zero point, dtype and axis of a Q or DQ node whose integer side is ``codes``."""
    scale_v, zp_t = const_value(node.inputs[1]), present_input(node, 2)
    if scale_v is None:
        return f"the scale of '{node.name}' is not a constant"
    zp_v = const_value(zp_t) if zp_t is not None else None
    if zp_t is not None and zp_v is None:
        return f"the zero point of '{node.name}' is not a constant"
    if node.attrs.get("block_size", 0):
        return f"'{node.name}' is block-quantized (no QOperator form)"
    if zp_v is not None:
        dtype = np.dtype(zp_v.dtype)
    elif node.op == "QuantizeLinear" and node.attrs.get("output_dtype"):
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["output_dtype"])))
    elif isinstance(codes, gs.Constant):
        dtype = np.dtype(codes.values.dtype)
    elif node.op == "DequantizeLinear" and codes.dtype is not None:
        dtype = np.dtype(codes.dtype)
    else:
        dtype = U8
    if zp_v is None:
        zp_v = np.zeros(scale_v.shape, dtype)
    axis = None
    if scale_v.size > 1:
        rank = tensor_rank(codes)
        axis = int(node.attrs.get("axis", 1))
        if axis < 0:
            if rank is None:
                return f"'{node.name}' has a negative axis on a tensor of unknown rank"
            axis += rank
    return QTensor(codes, node.inputs[1], zp_t, scale_v.astype(np.float32), zp_v, dtype, axis)


def dequantized(t: gs.Tensor) -> QTensor | str:
    """The quantized tensor behind a ``DequantizeLinear`` output, or why ``t`` is not one."""
    dq = producer(t)
    if dq is None or dq.op != "DequantizeLinear":
        return f"input '{t.name}' does not come from a DequantizeLinear"
    return qparams(dq, dq.inputs[0])


def is_dequantized(t: gs.Tensor) -> bool:
    """Whether ``t`` is the output of a DequantizeLinear."""
    p = producer(t)
    return p is not None and p.op == "DequantizeLinear"


def absorbable(act: gs.Node, q: QTensor) -> bool:
    """Whether quantizing with ``q`` already does what the Relu / Clip ``act`` does (exactly)."""
    info = np.iinfo(q.dtype)
    if q.axis is not None or int(q.zp_v.reshape(-1)[0]) != info.min:
        return False
    if act.op == "Relu":
        return True
    if "min" in act.attrs or "max" in act.attrs:  # opset < 11
        lo, hi = act.attrs.get("min", -np.inf), act.attrs.get("max", np.inf)
    else:
        bounds = [const_value(present_input(act, i)) if present_input(act, i) is not None else None for i in (1, 2)]
        if any(present_input(act, i) is not None and b is None for i, b in zip((1, 2), bounds)):
            return False
        lo = float(bounds[0]) if bounds[0] is not None else -np.inf
        hi = float(bounds[1]) if bounds[1] is not None else np.inf
    if lo != 0.0:
        return False
    scale = np.float32(q.scale_v.reshape(-1)[0])
    return bool(hi == np.inf or np.rint(np.float32(hi) / scale) + info.min >= info.max)


@dataclass
class UnitOutput:
    """Where a unit's output goes: a QuantizeLinear (maybe through an absorbed Relu/Clip and then one
    data-movement op such as Flatten, which then runs on the integer tensor), or float (``q`` None)."""

    q: QTensor | None
    dead: list[gs.Node] = field(default_factory=list)  # nodes the lowering disconnects
    absorbed: int = 0
    move: gs.Node | None = None
    target: gs.Tensor | None = None  # what the lowered op writes (set by the lowering)


def unit_output(node: gs.Node, graph_outputs: set[str], *, allow_float: bool) -> UnitOutput | str:
    """Match the single output of ``node`` to a QuantizeLinear (or accept a float output)."""
    if len(node.outputs) != 1:
        return f"has {len(node.outputs)} outputs"
    y = node.outputs[0]
    float_out = UnitOutput(None)
    if y.name in graph_outputs:
        return float_out if allow_float else "its output is a float graph output"
    dead: list[gs.Node] = []
    absorbed = 0
    cur = y
    consumers = list(y.outputs)
    if len(consumers) == 1 and consumers[0].op in ABSORBABLE and consumers[0].inputs[0] is y:
        act = consumers[0]
        r = act.outputs[0]
        if r.name not in graph_outputs and len(r.outputs) == 1 and r.outputs[0].op in ("QuantizeLinear", *MOVES):
            dead.append(act)
            absorbed = 1
            cur, consumers = r, list(r.outputs)
    move = None
    if len(consumers) == 1 and consumers[0].op in MOVES and len(consumers[0].outputs) == 1:
        m, mid = consumers[0], consumers[0].outputs[0]
        only_q = len(mid.outputs) == 1 and mid.outputs[0].op == "QuantizeLinear"
        if m.inputs[0] is cur and mid.name not in graph_outputs and only_q:
            move, consumers = m, list(mid.outputs)
    if len(consumers) != 1 or consumers[0].op != "QuantizeLinear":
        if allow_float and not absorbed and all(c.op != "QuantizeLinear" for c in consumers):
            return float_out
        return "its output is not (only) quantized by one QuantizeLinear"
    q_node = consumers[0]
    q = qparams(q_node, q_node.outputs[0])
    if isinstance(q, str):
        return q
    if q.axis is not None or q.dtype not in (U8, S8):
        return f"its output QuantizeLinear '{q_node.name}' is not 8-bit per-tensor"
    if absorbed and not absorbable(dead[0], q):
        return (f"a {dead[0].op} sits before its QuantizeLinear and the output zero point is not the lowest code, "
                "so it cannot be absorbed")  # fmt: skip
    return UnitOutput(q, [*dead, q_node], absorbed, move)
