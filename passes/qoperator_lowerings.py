"""The per-op lowerings of :mod:`onnxq.passes.qoperator`: one QDQ node unit -> one QOperator op.

Each ``_lower_<op>`` function checks everything a unit needs (dtypes ORT has kernels for, per-channel
axes, bias, saturation on the target) before it changes the graph, then rewrites the unit in place and
returns :class:`Done` naming the op it produced, or returns the reason the unit stays QDQ. :data:`LOWERINGS`
maps op types to them. :class:`Lowering` holds the state of one run (graph, target, fresh names, counts).
The pass itself (target checks, the graph-level steps around the lowerings, the loop over nodes, counts
and notes) is in :mod:`onnxq.passes.qoperator`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.graphs import FreshNames
from onnxq.target import TargetProfile

from .qdq_units import (
    S8, U8, QTensor, UnitOutput, absorbable, const_value, dequantized, is_dequantized, present_input, tensor_rank,
    unit_output,
)  # fmt: skip

__all__ = ["LOWERED_OPS", "LOWERINGS", "Done", "Lowering"]

_MS = "com.microsoft"
_ALL8 = {(U8, U8), (U8, S8), (S8, U8), (S8, S8)}
_GEMM8 = {(U8, U8), (U8, S8), (S8, S8)}
# (activation dtype, weight dtype) pairs ONNX Runtime's CPU provider has kernels for (checked with 1.32:
# QLinearConv / QLinearMatMul / QGemm have no int8 x uint8 kernel; ConvInteger's int8 kernels only
# arrived in late 2025, so it is kept to uint8 x uint8 for the onnxruntime versions onnxq supports).
_KERNELS: dict[str, set[tuple[np.dtype, np.dtype]]] = {
    "QLinearConv": _GEMM8, "QLinearMatMul": _GEMM8, "QGemm": _GEMM8,
    "MatMulInteger": _ALL8, "ConvInteger": {(U8, U8)},
}  # fmt: skip
_SHARED_PARAM_OPS = frozenset({
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Resize", "Gather", "Slice",
    "Identity", "Split", "Expand", "Tile", "Pad",
})  # fmt: skip
"""Ops that ORT runs on int8/uint8 tensors unchanged when input and output share scale and zero point."""
_SIMPLE_QLINEAR = {"GlobalAveragePool": "QLinearGlobalAveragePool", "AveragePool": "QLinearAveragePool",
                   "Sigmoid": "QLinearSigmoid", "LeakyRelu": "QLinearLeakyRelu", "Softmax": "QLinearSoftmax"}  # fmt: skip

LOWERED_OPS: tuple[str, ...] = (
    "Conv", "MatMul", "Gemm", "Add", "Mul", "Concat", *_SIMPLE_QLINEAR, *sorted(_SHARED_PARAM_OPS), "Relu", "Clip",
)  # fmt: skip
"""Op types this pass knows how to lower (each only where the checks in its lowering pass)."""


# --------------------------------------------------------------------------- rewriting


class Done(str):
    """What a lowering returns when it rewrote the unit: the op it produced. Any other string is the
    reason the unit stays QDQ (lowerings check everything before they change the graph)."""


class Lowering:
    """State of one run: the graph, the target, fresh names, counts and notes."""

    def __init__(self, graph: gs.Graph, target: TargetProfile, docs: dict[str, str]) -> None:
        self.graph = graph
        self.target = target
        self.docs = docs
        self.graph_outputs = {t.name for t in graph.outputs}
        self.fresh = FreshNames(graph)
        self.counts: Counter[str] = Counter()
        self.saturation_fixed: list[str] = []
        self._zeros: dict[tuple[str, tuple[int, ...]], gs.Constant] = {}
        self._converted: dict[tuple[str, str], QTensor] = {}
        self._scalars: dict[str, gs.Constant] = {}

    def const(self, name: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.fresh(name), np.asarray(values))

    def zero_point(self, q: QTensor) -> gs.Tensor:
        """``q``'s zero-point tensor, made explicit (QLinear ops require it; DQ/Q may omit it)."""
        if q.zero_point is not None:
            return self._scalar(q.zero_point, q.zp_v) if q.axis is None else q.zero_point
        key = (q.dtype.name, tuple(q.scale_v.shape) if q.axis is not None else ())
        if key not in self._zeros:
            self._zeros[key] = self.const(f"onnxq_zero_point_{q.dtype.name}", np.zeros(key[1], q.dtype))
        return self._zeros[key]

    def _scalar(self, t: gs.Tensor, value: np.ndarray) -> gs.Tensor:
        """A 0-d version of a one-element parameter (QLinear ops want scalars; exporters write [1])."""
        if value.ndim == 0:
            return t
        if t.name not in self._scalars:
            self._scalars[t.name] = self.const(f"{t.name}_scalar", value.reshape(()))
        return self._scalars[t.name]

    def params(self, q: QTensor) -> list[gs.Tensor]:
        """Scale and zero point of ``q`` as QLinear op inputs."""
        scale = self._scalar(q.scale, q.scale_v) if q.axis is None else q.scale
        return [scale, self.zero_point(q)]

    def qinputs(self, q: QTensor) -> list[gs.Tensor]:
        return [q.codes, *self.params(q)]

    def weight_for(self, node: gs.Node, w: QTensor, act_dtype: np.dtype, kernel: str) -> QTensor | str:
        """``w`` re-stored for a kernel ORT has: int8 <-> uint8 by shifting codes and zero point by 128.

        Shifting is exact ((w + 128) - (z + 128) == w - z). int8 weights become uint8 (a) where ORT has
        no kernel for the int8 form (int8 activations with uint8 weights go the other way), (b) on targets
        that store weights as uint8 (x86-avx2-u8), and (c) on x86-avx2 / generic when they use more than
        7 bits with uint8 activations: ORT's u8 x s8 kernels on x86 without VNNI add product pairs in a
        saturating int16 (see onnxq.target) and would not compute what the QDQ graph says, while its
        u8 x u8 kernels are exact. Depthwise convolutions accumulate in int32 and keep int8.
        """
        want = w.dtype
        if (act_dtype, w.dtype) not in _KERNELS[kernel]:
            want = S8 if w.dtype == U8 else U8
        elif act_dtype == U8 and w.dtype == S8 and (U8, U8) in _KERNELS[kernel] and w.is_const:
            if self.target.uint8_weight_storage or (self.target.weight_reduce_range and _may_saturate(node, w)):
                want = U8
        if want == w.dtype:
            return w
        if (act_dtype, want) not in _KERNELS[kernel]:
            return f"ORT CPU has no {kernel} kernel for {act_dtype.name} inputs with {w.dtype.name} weights"
        if not w.is_const:
            return f"ORT CPU has no {kernel} kernel for {act_dtype.name} x {w.dtype.name} and the second input is not a constant"
        key = (w.codes.name, want.name)
        if key not in self._converted:
            shift = 128 if want == U8 else -128
            codes = (np.asarray(w.codes.values, np.int16) + shift).astype(want)
            zp = (w.zp_v.astype(np.int16) + shift).astype(want)
            name = w.codes.name
            self._converted[key] = replace(
                w, codes=self.const(f"{name}_{want.name}", codes),
                zero_point=self.const(f"{name}_zero_point_{want.name}", zp), zp_v=zp, dtype=want,
            )
            if want == U8 and act_dtype == U8:
                self.counts["weights_to_uint8"] += 1
                if not self.target.uint8_weight_storage:
                    self.saturation_fixed.append(node.name)
        return self._converted[key]

    def out_tensor(self, out: UnitOutput) -> gs.Tensor:
        """The integer tensor a lowered op writes: the Q's output, or a new one that the moved
        data-movement op (Flatten, ...) reads before it writes the Q's output."""
        assert out.q is not None
        if out.target is None:
            out.target = out.q.codes
            if out.move is not None:
                name = self.fresh(f"{out.move.inputs[0].name}_quantized")
                out.target = gs.Variable(name, dtype=out.q.dtype, shape=out.move.inputs[0].shape)
        return out.target

    def replace(self, node: gs.Node, new: list[gs.Node], out: UnitOutput, doc: str) -> None:
        """Disconnect ``node`` (and the Q / absorbed nodes after it) and add ``new`` in its place."""
        for n in [node, *out.dead]:
            n.inputs.clear()
            n.outputs.clear()
        if out.move is not None and out.q is not None:
            out.move.inputs[0] = self.out_tensor(out)
            out.move.outputs[0] = out.q.codes
            self.counts["moves_on_integers"] += 1
        for n in new:
            n.name = n.name or self.fresh(f"{node.name or n.outputs[0].name}/{n.op}")
            self.docs[n.name] = doc
        self.graph.nodes.extend(new)
        self.counts["activations_absorbed"] += out.absorbed

    def result_tensor(self, node: gs.Node, out: UnitOutput) -> gs.Tensor:
        """The tensor the lowered op writes: integer (see ``out_tensor``), or the op's float output."""
        return self.out_tensor(out) if out.q is not None else node.outputs[0]


def _may_saturate(node: gs.Node, w: QTensor) -> bool:
    """uint8 x int8 weights wider than 7 bits in a GEMM-backed kernel (not a depthwise convolution)."""
    values = np.asarray(w.codes.values)
    if node.op == "Conv" and int(node.attrs.get("group", 1)) > 1 and values.ndim > 1 and values.shape[1] == 1:
        return False
    span = np.abs(values.astype(np.int32) - w.zp_v.astype(np.int32).reshape(_bshape(w))).max(initial=0)
    return bool(span > 64)


def _bshape(q: QTensor) -> tuple[int, ...]:
    """Shape that broadcasts ``q``'s per-axis parameters against its codes."""
    if q.axis is None or not q.is_const:
        return ()
    shape = [1] * q.codes.values.ndim
    shape[q.axis] = -1
    return tuple(shape)


def _int32_bias(lw: Lowering, node: gs.Node, index: int, acc_scale: np.ndarray, n_out: int) -> gs.Tensor | None | str:
    """Conv/Gemm bias as int32 with scale ``acc_scale`` (input scale x weight scale) and zero point 0.

    A DequantizeLinear of int32 that already has that scale is used as it is; any other constant bias
    (float, or dequantized with another scale) is quantized to it (error at most half an accumulator step).
    """
    b = present_input(node, index)
    if b is None:
        return None
    acc_scale = np.broadcast_to(acc_scale.reshape(-1), (n_out,)).astype(np.float32)
    bq = dequantized(b) if is_dequantized(b) else None
    if isinstance(bq, QTensor) and bq.is_const and bq.dtype == np.int32 and not bq.zp_v.any() and bq.codes.values.size == n_out:
        if np.allclose(np.broadcast_to(bq.scale_v.reshape(-1), (n_out,)), acc_scale, rtol=1e-6, atol=0):
            codes = np.asarray(bq.codes.values)
            return bq.codes if codes.ndim == 1 else lw.const(f"{bq.codes.name}_1d", codes.reshape(-1))
    values = _float_bias(node, index, n_out)
    if values is None or isinstance(values, str):
        return values
    q = np.clip(np.rint(values.reshape(-1) / acc_scale), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
    return lw.const(f"{b.name}_int32_{node.name}", q)


def _float_bias(node: gs.Node, index: int, n_out: int) -> np.ndarray | None | str:
    """A constant bias as the float values the QDQ graph adds (dequantized when it is quantized)."""
    b = present_input(node, index)
    if b is None:
        return None
    if is_dequantized(b):
        bq = dequantized(b)
        if isinstance(bq, str) or not bq.is_const:
            return "its bias is not a constant"
        shape = _bshape(bq)
        values = ((np.asarray(bq.codes.values, np.int64) - bq.zp_v.astype(np.int64).reshape(shape)).astype(np.float32)
                  * bq.scale_v.reshape(shape))  # fmt: skip
    else:
        v = const_value(b)
        if v is None:
            return "its bias is not a constant"
        values = np.asarray(v, np.float32)
    if values.size != n_out:
        return f"its bias has {values.size} values for {n_out} outputs"
    return values.reshape(-1).astype(np.float32)


def _per_channel_ok(w: QTensor, axis: int, what: str) -> str | None:
    if w.axis is not None and w.axis != axis:
        return f"its {what} is quantized along axis {w.axis}, not the output-channel axis {axis}"
    return None


def _operands(node: gs.Node) -> tuple[QTensor, QTensor] | str:
    """The dequantized first two inputs of a Conv / MatMul / Gemm unit, or why one is not dequantized."""
    a, b = dequantized(node.inputs[0]), dequantized(node.inputs[1])
    for q in (a, b):
        if isinstance(q, str):
            return q
    assert isinstance(a, QTensor) and isinstance(b, QTensor)
    return a, b


def _eight_bit_operands(node: gs.Node) -> tuple[QTensor, QTensor] | str:
    """The dequantized A and B of a MatMul / Gemm unit when the integer kernels take them (an 8-bit per-tensor
    A, an 8-bit B), or why not."""
    pair = _operands(node)
    if isinstance(pair, str):
        return pair
    a, b = pair
    if a.axis is not None or a.dtype not in (U8, S8) or b.dtype not in (U8, S8):
        return f"needs an 8-bit per-tensor A and an 8-bit B (got {a.dtype.name} / {b.dtype.name})"
    return a, b


def _output_like(lw: Lowering, node: gs.Node, a: QTensor) -> UnitOutput | str:
    """The unit's output (float, or quantized to ``a``'s dtype), or why it cannot be lowered."""
    out = unit_output(node, lw.graph_outputs, allow_float=True)
    if not isinstance(out, str) and out.q is not None and out.q.dtype != a.dtype:
        return f"its input A is {a.dtype.name} but its output {out.q.dtype.name}"
    return out


def _rescaled(lw: Lowering, product: gs.Node, scale: np.ndarray, name: str, result: gs.Tensor) -> list[gs.Node]:
    """The integer ``product`` (ConvInteger / MatMulInteger, its output not yet set) writing an int32
    accumulator, then Cast to float and Mul by ``scale`` (input scale x weight scale) into ``result``:
    the float output of a lowered unit. ``name`` is the base of the new tensors' names."""
    acc = gs.Variable(lw.fresh(f"{name}_int32"), dtype=np.int32)
    acc_f = gs.Variable(lw.fresh(f"{name}_int32_float"), dtype=np.float32)
    scale_c = lw.const(f"{product.name}_output_scale", scale)
    product.outputs.append(acc)
    return [product,
            gs.Node("Cast", "", attrs={"to": 1}, inputs=[acc], outputs=[acc_f]),
            gs.Node("Mul", "", inputs=[acc_f, scale_c], outputs=[result])]  # fmt: skip


def _lower_conv(lw: Lowering, node: gs.Node) -> str:
    pair = _operands(node)
    if isinstance(pair, str):
        return pair
    x, w = pair
    if not w.is_const:
        return "its weight is not a constant"
    if x.axis is not None or x.dtype not in (U8, S8) or w.dtype not in (U8, S8):
        return f"needs 8-bit per-tensor input and 8-bit weights (got {x.dtype.name} / {w.dtype.name})"
    if (why := _per_channel_ok(w, 0, "weight")) is not None:
        return why
    out = unit_output(node, lw.graph_outputs, allow_float=True)
    if isinstance(out, str):
        return out
    n_out = int(w.codes.values.shape[0])
    acc_scale = (np.float32(x.scale_v.reshape(-1)[0]) * w.scale_v.reshape(-1)).astype(np.float32)
    attrs = {k: v for k, v in node.attrs.items() if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")}
    if out.q is not None:
        if out.q.dtype != x.dtype:
            return f"its input is {x.dtype.name} but its output {out.q.dtype.name}"
        bias = _int32_bias(lw, node, 2, acc_scale, n_out)
        if isinstance(bias, str):
            return bias
        wk = lw.weight_for(node, w, x.dtype, "QLinearConv")
        if isinstance(wk, str):
            return wk
        inputs = [*lw.qinputs(x), *lw.qinputs(wk), *lw.params(out.q), *([bias] if bias is not None else [])]
        new = gs.Node("QLinearConv", node.name, attrs=attrs, inputs=inputs, outputs=[lw.out_tensor(out)])
        lw.replace(node, [new], out, _doc(node, x, wk))
        return Done("QLinearConv")
    # float output: ConvInteger (uint8 x uint8 only) and a float rescale
    if (x.dtype, w.dtype) not in _KERNELS["ConvInteger"]:
        return (f"its output is float, which needs ConvInteger, and ORT CPU runs ConvInteger for uint8 x uint8 only "
                f"(here {x.dtype.name} x {w.dtype.name})")  # fmt: skip
    if len(np.unique(w.zp_v)) > 1:
        return "its output is float (ConvInteger) and ConvInteger needs one weight zero point"
    bias_v = _float_bias(node, 2, n_out)
    if isinstance(bias_v, str):
        return bias_v
    y = node.outputs[0]
    node.outputs.clear()  # the new nodes write y
    spatial = (1, -1) + (1,) * (w.codes.values.ndim - 2)
    w_zp = lw.const(f"{w.codes.name}_zero_point_scalar", w.zp_v.reshape(-1)[:1].reshape(()))
    scaled = gs.Variable(lw.fresh(f"{y.name}_scaled"), dtype=np.float32) if bias_v is not None else y
    product = gs.Node("ConvInteger", node.name, attrs=attrs, inputs=[x.codes, w.codes, lw.zero_point(x), w_zp])
    nodes = _rescaled(lw, product, acc_scale.reshape(spatial), y.name, scaled)
    if bias_v is not None:
        nodes.append(gs.Node("Add", "", inputs=[scaled, lw.const(f"{node.name}_bias", bias_v.reshape(spatial))], outputs=[y]))
    lw.replace(node, nodes, out, _doc(node, x, w))
    return Done("ConvInteger")


def _lower_matmul(lw: Lowering, node: gs.Node) -> str:
    pair = _eight_bit_operands(node)
    if isinstance(pair, str):
        return pair
    a, b = pair
    if b.axis is not None and not (tensor_rank(b.codes) == 2 and b.axis == 1):
        return "its B is quantized per axis other than the columns of a 2-D matrix"
    out = _output_like(lw, node, a)
    if isinstance(out, str):
        return out
    bk = lw.weight_for(node, b, a.dtype, "QLinearMatMul" if out.q is not None else "MatMulInteger")
    if isinstance(bk, str):
        return bk
    if out.q is not None:
        new = gs.Node("QLinearMatMul", node.name, inputs=[*lw.qinputs(a), *lw.qinputs(bk), *lw.params(out.q)],
                      outputs=[lw.out_tensor(out)])  # fmt: skip
        lw.replace(node, [new], out, _doc(node, a, bk))
        return Done("QLinearMatMul")
    y = node.outputs[0]
    scale = (np.float32(a.scale_v.reshape(-1)[0]) * bk.scale_v.reshape(-1)).astype(np.float32)
    node.outputs.clear()
    product = gs.Node("MatMulInteger", node.name, inputs=[a.codes, bk.codes, lw.zero_point(a), lw.zero_point(bk)])
    nodes = _rescaled(lw, product, scale if scale.size > 1 else scale.reshape(()), y.name, y)
    lw.replace(node, nodes, out, _doc(node, a, bk))
    return Done("MatMulInteger")


def _lower_gemm(lw: Lowering, node: gs.Node) -> str:
    pair = _eight_bit_operands(node)
    if isinstance(pair, str):
        return pair
    a, b = pair
    if not b.is_const or b.codes.values.ndim != 2:
        return "its B is not a constant 2-D matrix"
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    if alpha != 1.0 or (beta != 1.0 and present_input(node, 2) is not None):
        return "alpha or beta is not 1"
    trans_b = int(node.attrs.get("transB", 0))
    n_axis = 0 if trans_b else 1
    if (why := _per_channel_ok(b, n_axis, "B")) is not None:
        return why
    out = _output_like(lw, node, a)
    if isinstance(out, str):
        return out
    n_out = int(b.codes.values.shape[n_axis])
    acc_scale = (np.float32(a.scale_v.reshape(-1)[0]) * b.scale_v.reshape(-1)).astype(np.float32)
    bias = _int32_bias(lw, node, 2, acc_scale, n_out)
    if isinstance(bias, str):
        return bias
    bk = lw.weight_for(node, b, a.dtype, "QGemm")
    if isinstance(bk, str):
        return bk
    empty = gs.Variable.empty()
    inputs = [*lw.qinputs(a), *lw.qinputs(bk), bias if bias is not None else empty]
    if out.q is not None:
        inputs += [*lw.params(out.q)]
    elif bias is None:
        inputs = inputs[:-1]
    target = lw.result_tensor(node, out)
    if out.q is None:
        node.outputs.clear()
    attrs = {"transA": int(node.attrs.get("transA", 0)), "transB": trans_b, "alpha": 1.0}
    new = gs.Node("QGemm", node.name, attrs=attrs, inputs=inputs, outputs=[target], domain=_MS)
    lw.replace(node, [new], out, _doc(node, a, bk))
    return Done("QGemm")


def _per_tensor_unit(lw: Lowering, node: gs.Node) -> tuple[list, Any] | str:
    """(dequantized inputs, quantized output) of a unit whose inputs and output are all per-tensor of one
    8-bit dtype (what QLinearAdd/Mul/Concat take), or why the unit is not one."""
    qs = [dequantized(t) for t in node.inputs]
    for q in qs:
        if isinstance(q, str):
            return q
    out = unit_output(node, lw.graph_outputs, allow_float=False)
    if isinstance(out, str):
        return out
    assert out.q is not None
    if any(q.axis is not None or q.dtype != out.q.dtype for q in qs):  # type: ignore[union-attr]
        return "its inputs and output are not all per-tensor of one 8-bit dtype"
    return qs, out


def _lower_binary(lw: Lowering, node: gs.Node) -> str:
    """Add / Mul -> com.microsoft QLinearAdd / QLinearMul."""
    unit = _per_tensor_unit(lw, node)
    if isinstance(unit, str):
        return unit
    qs, out = unit
    a, b = qs
    op = f"QLinear{node.op}"
    new = gs.Node(op, node.name, inputs=[*lw.qinputs(a), *lw.qinputs(b), *lw.params(out.q)],  # type: ignore[arg-type]
                  outputs=[lw.out_tensor(out)], domain=_MS)  # fmt: skip
    lw.replace(node, [new], out, _doc(node, a, None))  # type: ignore[arg-type]
    return Done(op)


def _lower_concat(lw: Lowering, node: gs.Node) -> str:
    unit = _per_tensor_unit(lw, node)
    if isinstance(unit, str):
        return unit
    qs, out = unit
    if all(q.same_params(out.q) for q in qs):  # type: ignore[union-attr]
        codes = [q.codes for q in qs]  # type: ignore[union-attr]
        new = gs.Node("Concat", node.name, attrs=dict(node.attrs), inputs=codes, outputs=[lw.out_tensor(out)])
        lw.replace(node, [new], out, _doc(node, qs[0], None))  # type: ignore[arg-type]
        return Done("Concat (integer)")
    inputs = [*lw.params(out.q)] + [t for q in qs for t in lw.qinputs(q)]  # type: ignore[arg-type]
    new = gs.Node("QLinearConcat", node.name, attrs={"axis": int(node.attrs["axis"])}, inputs=inputs,
                  outputs=[lw.out_tensor(out)], domain=_MS)  # fmt: skip
    lw.replace(node, [new], out, _doc(node, qs[0], None))  # type: ignore[arg-type]
    return Done("QLinearConcat")


def _lower_simple(lw: Lowering, node: gs.Node) -> str:
    """One-input ops with a com.microsoft QLinear kernel (pooling, Sigmoid, LeakyRelu, Softmax)."""
    x = dequantized(node.inputs[0])
    if isinstance(x, str):
        return x
    out = unit_output(node, lw.graph_outputs, allow_float=False)
    if isinstance(out, str):
        return out
    assert out.q is not None
    if x.axis is not None or x.dtype != out.q.dtype:
        return "its input and output are not per-tensor of one 8-bit dtype"
    op = _SIMPLE_QLINEAR[node.op]
    attrs: dict[str, object] = {}
    if node.op == "AveragePool":
        if any(d != 1 for d in node.attrs.get("dilations", [])):
            return "QLinearAveragePool has no dilations"
        keep = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")
        attrs = {k: v for k, v in node.attrs.items() if k in keep}
        attrs["channels_last"] = 0
    elif node.op == "GlobalAveragePool":
        attrs = {"channels_last": 0}
    elif node.op == "LeakyRelu":
        attrs = {"alpha": float(node.attrs.get("alpha", 0.01))}
    elif node.op == "Softmax":
        opset = int(lw.graph.opset)
        attrs = {"axis": int(node.attrs.get("axis", -1 if opset >= 13 else 1)), "opset": opset}
    new = gs.Node(op, node.name, attrs=attrs, inputs=[*lw.qinputs(x), *lw.params(out.q)],
                  outputs=[lw.out_tensor(out)], domain=_MS)  # fmt: skip
    lw.replace(node, [new], out, _doc(node, x, None))
    return Done(op)


def _lower_shared(lw: Lowering, node: gs.Node) -> str:
    """Ops that move or select values (Reshape, MaxPool, ...): run them on the integer tensor."""
    x = dequantized(node.inputs[0])
    if isinstance(x, str):
        return x
    refusal = _shared_refusal(lw, node, x)
    if refusal is not None:
        return refusal
    outs = _shared_outputs(lw, node, x)
    if isinstance(outs, str):
        return outs
    extra = _integer_pad_value(lw, node, x)
    if isinstance(extra, str):
        return extra
    for o in outs:
        for n in o.dead:
            n.inputs.clear()
            n.outputs.clear()
    node.inputs[0] = x.codes
    if extra:
        while len(node.inputs) < 3:
            node.inputs.append(gs.Variable.empty())
        node.inputs[2] = extra[0]
    for i, o in enumerate(outs):
        assert o.q is not None
        node.outputs[i] = o.q.codes
    lw.docs[node.name] = f"onnxq: runs on {x.dtype.name} codes (input and output share scale and zero point)"
    return Done(f"{node.op} (integer)")


def _shared_refusal(lw: Lowering, node: gs.Node, x: QTensor) -> str | None:
    """Why a value-moving op cannot run on ``x``'s codes (None: it can, as far as its input goes)."""
    if x.axis is not None or x.dtype not in (U8, S8):
        return "its input is not 8-bit per tensor"
    if any(is_dequantized(t) for t in node.inputs[1:]):
        return "more than its first input is dequantized"
    if node.op == "MaxPool" and (len(node.outputs) > 1 or int(lw.graph.opset) < 12):
        return "MaxPool with indices, or opset < 12, has no integer kernel"
    if node.op == "Pad" and "pads" in node.attrs:
        return "Pad before opset 11 (pad value as an attribute) is not lowered"
    return None


def _shared_outputs(lw: Lowering, node: gs.Node, x: QTensor) -> list[UnitOutput] | str:
    """The quantized outputs of a value-moving op, each with ``x``'s scale and zero point; else why not."""
    outs: list[UnitOutput] = []
    for y in node.outputs:
        o = unit_output(_OutputView(node, y), lw.graph_outputs, allow_float=False)  # type: ignore[arg-type]
        if isinstance(o, str):
            return o
        assert o.q is not None
        if o.absorbed or o.move is not None or not x.same_params(o.q):
            return "its input and output scales or zero points differ"
        outs.append(o)
    return outs


def _integer_pad_value(lw: Lowering, node: gs.Node, x: QTensor) -> list[gs.Tensor] | str:
    """For a constant-mode Pad, its pad value as a code of ``x``'s scheme (a one-item list; empty for other
    ops); else why not."""
    if node.op != "Pad" or node.attrs.get("mode", "constant") != "constant":
        return []
    v = const_value(present_input(node, 2)) if present_input(node, 2) is not None else np.zeros(())
    if v is None:
        return "its pad value is not a constant"
    info = np.iinfo(x.dtype)
    code = np.clip(np.rint(np.float32(v) / x.scale_v.reshape(-1)[0]) + int(x.zp_v.reshape(-1)[0]), info.min, info.max)
    return [lw.const(f"{node.name}_pad_value", np.asarray(code, x.dtype).reshape(()))]


class _OutputView:
    """Duck-typed node with a single output, for matching each output of a multi-output op."""

    def __init__(self, node: gs.Node, y: gs.Tensor) -> None:
        self.op, self.name, self.outputs = node.op, node.name, [y]


def _lower_activation(lw: Lowering, node: gs.Node) -> str:
    """A Relu / Clip standing alone between a DQ and a Q of the same parameters: drop it when exact."""
    x = dequantized(node.inputs[0])
    if isinstance(x, str):
        return x
    out = unit_output(node, lw.graph_outputs, allow_float=False)
    if isinstance(out, str):
        return out
    assert out.q is not None
    if out.absorbed or out.move is not None or not x.same_params(out.q) or not absorbable(node, out.q):
        return "its input and output parameters differ or the zero point is not the lowest code"
    y = out.q.codes
    for n in [node, *out.dead]:
        n.inputs.clear()
        n.outputs.clear()
    if y.name in lw.graph_outputs:
        lw.graph.nodes.append(gs.Node("Identity", node.name, inputs=[x.codes], outputs=[y]))
    else:
        for c in list(y.outputs):
            for i, t in enumerate(c.inputs):
                if t is y:
                    c.inputs[i] = x.codes
    return Done(f"{node.op} (removed)")


LOWERINGS: dict[str, Callable[[Lowering, gs.Node], str]] = {
    "Conv": _lower_conv, "MatMul": _lower_matmul, "Gemm": _lower_gemm, "Add": _lower_binary, "Mul": _lower_binary,
    "Concat": _lower_concat, **{op: _lower_simple for op in _SIMPLE_QLINEAR},
    **{op: _lower_shared for op in _SHARED_PARAM_OPS}, "Relu": _lower_activation, "Clip": _lower_activation,
}  # fmt: skip


def _doc(node: gs.Node, x: QTensor, w: QTensor | None) -> str:
    text = f"onnxq: lowered from QDQ {node.op}; {x.dtype.name} activations"
    if w is not None:
        text += f", {w.dtype.name} weights {'per tensor' if w.axis is None else f'per channel (axis {w.axis})'}"
    return text
