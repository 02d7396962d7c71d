"""Lower a QDQ graph to QOperator ops (QLinearConv, QLinearMatMul, QGemm, QLinearAdd, ...).

A QDQ model says *what* is quantized: ``DequantizeLinear`` nodes feed a float op whose output goes
through ``QuantizeLinear``. This pass rewrites each such *node unit* (DQ inputs -> op -> Q) into the
integer op ONNX Runtime's CPU provider runs, so the file itself holds the integer kernels. It works on
any QDQ model: onnxq's own, ``onnxruntime.quantization.quantize_static``'s, and PyTorch QAT exports,
whose weights are still float initializers behind a ``QuantizeLinear`` (folded here into int8).

What each unit becomes (only where ORT CPU has a kernel for the dtypes; see ``_KERNELS``; the lowerings
themselves are in :mod:`onnxq.passes.qoperator_lowerings`):

==========================  ====================================================================
unit                        lowered to
==========================  ====================================================================
Conv -> Q                   QLinearConv (weights per tensor or per output channel, int32 bias)
Conv, float output          ConvInteger + Cast + Mul (+ Add bias): uint8 x uint8 only
MatMul -> Q                 QLinearMatMul (B per tensor or per column)
MatMul, float output        MatMulInteger + Cast + Mul (ORT fuses it into MatMulIntegerToFloat)
Gemm (-> Q or float)        com.microsoft QGemm (float output when there is no Q)
Add / Mul -> Q              com.microsoft QLinearAdd / QLinearMul
Concat -> Q                 QLinearConcat; a plain integer Concat when every scale is the same
GlobalAveragePool,          com.microsoft QLinearGlobalAveragePool / QLinearAveragePool /
AveragePool, Sigmoid,       QLinearSigmoid / QLinearLeakyRelu / QLinearSoftmax
LeakyRelu, Softmax
Reshape, Transpose, ...     the same op on the integer tensor when input and output share scale and
                            zero point (``_SHARED_PARAM_OPS``); the DQ/Q around it disappear
Relu / Clip(0, c)           absorbed into the op before them when the output's zero point is the
                            lowest code (and ``c`` saturates), as in ``insert_qdq``; dropped when
                            they stand alone between equal parameters
==========================  ====================================================================

One data-movement op (Flatten, Reshape, Squeeze, Unsqueeze, Transpose) may sit between a unit's op and
its QuantizeLinear (PyTorch exports GlobalAveragePool -> Flatten -> Q): quantizing commutes with it, so
it then runs on the integer output.

A ``QuantizeLinear`` of a constant (QAT fake-quant weights) is folded into an integer initializer
first. After lowering, ``DequantizeLinear -> QuantizeLinear`` pairs with identical parameters are
removed, and so are nodes and initializers nothing uses. ``QuantizeLinear`` at graph inputs and
``DequantizeLinear`` before graph outputs stay. A unit that cannot be lowered stays QDQ (a valid
model that still runs) and the pass says which and why.

Targets (``ctx.target``): every CPU profile gets the ops above. Weights of uint8-activation
units are stored as uint8 (zero point + 128: the same values, so ORT runs its u8 x u8 kernels, which never
saturate) on ``x86-avx2-u8``, and on ``x86-avx2`` / ``generic`` where they use more than 7 bits outside a
depthwise convolution: there ORT's u8 x s8 kernels add product pairs in a saturating int16 (see
:mod:`onnxq.target`) and would not compute what the QDQ model says. ``x86-vnni`` and ``arm64`` keep int8.
``cuda`` is refused: the CUDA execution provider has no kernels for these ops, and TensorRT fuses QDQ
graphs itself.

counts: ``nodes_lowered``, ``units_kept_qdq``, ``weights_folded``, ``weights_to_uint8``,
``activations_absorbed``, ``moves_on_integers``, ``qdq_pairs_removed`` and one ``"<op>-><new op>"``
count per lowering (``"Conv->QLinearConv": 52``). Notes name each op type kept as QDQ with the reason.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.pipeline import Pass, PassContext, PassResult
from onnxq.target import refuse_cuda

from .qdq_units import ABSORBABLE, MOVES, S8, U8, const_value, is_dequantized, producer, qparams
from .qoperator_lowerings import LOWERED_OPS, LOWERINGS, Done, Lowering

__all__ = ["QOperatorPass", "lower_to_qoperator", "LOWERED_OPS"]

logger = logging.getLogger(__name__)

_CUDA_REFUSAL = (
    "the CUDA execution provider has no kernels for QOperator ops (QLinearConv, QLinearMatMul, "
    "QGemm, QLinearAdd, ConvInteger, ...), so ONNX Runtime would run them on the CPU. Keep the "
    "QDQ format (--format qdq): ORT's CUDA provider and TensorRT fuse Q/DQ pairs themselves"
)
"""Why the pass refuses the cuda target (see :func:`onnxq.target.refuse_cuda`)."""


# --------------------------------------------------------------------------- graph-level steps


def _fold_constant_quantize(lw: Lowering) -> None:
    """QuantizeLinear of a constant (QAT fake-quant weights) -> an integer initializer."""
    for q in [n for n in lw.graph.nodes if n.op == "QuantizeLinear"]:
        values = const_value(q.inputs[0])
        y = q.outputs[0]
        if values is None or y.name in lw.graph_outputs or not np.issubdtype(values.dtype, np.floating):
            continue
        p = qparams(q, q.inputs[0])
        if isinstance(p, str) or p.dtype not in (U8, S8, np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.int32)):
            continue
        shape = [1] * values.ndim
        if p.axis is not None:
            shape[p.axis] = -1
        info = np.iinfo(p.dtype)
        scaled = np.asarray(values, np.float32) / p.scale_v.reshape(shape)
        codes = np.rint(scaled).astype(np.float64) + p.zp_v.reshape(shape).astype(np.float64)
        codes = np.clip(codes, info.min, info.max).astype(p.dtype)
        name = q.inputs[0].name
        c = lw.const(f"{name}_quantized", codes)
        for consumer in list(y.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is y:
                    consumer.inputs[i] = c
        q.inputs.clear()
        q.outputs.clear()
        lw.counts["weights_folded"] += 1


def _remove_identity_pairs(lw: Lowering) -> None:
    """DequantizeLinear -> QuantizeLinear with identical parameters: consumers read the codes directly."""
    for q in [n for n in lw.graph.nodes if n.op == "QuantizeLinear" and n.inputs]:
        dq = producer(q.inputs[0])
        y = q.outputs[0]
        if dq is None or dq.op != "DequantizeLinear" or y.name in lw.graph_outputs:
            continue
        a, b = qparams(dq, dq.inputs[0]), qparams(q, y)
        if isinstance(a, str) or isinstance(b, str) or not a.same_params(b):
            continue
        for consumer in list(y.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is y:
                    consumer.inputs[i] = a.codes
        q.inputs.clear()
        q.outputs.clear()
        lw.counts["qdq_pairs_removed"] += 1


def _is_unit(node: gs.Node) -> bool:
    """A QDQ node unit: reads a dequantized tensor and is quantized at its output (directly, or through a
    Relu/Clip and/or a data-movement op), or is a Conv/MatMul/Gemm, which can also have a float output."""
    if node.op in ("QuantizeLinear", "DequantizeLinear") or not any(is_dequantized(t) for t in node.inputs):
        return False
    if node.op in ("Conv", "MatMul", "Gemm"):
        return True
    after = [c for y in node.outputs for c in y.outputs]
    after += [c for a in after if a.op in ABSORBABLE for y in a.outputs for c in y.outputs]
    after += [c for a in after if a.op in MOVES for y in a.outputs for c in y.outputs]
    return any(c.op == "QuantizeLinear" for c in after)


class QOperatorPass(Pass):
    """Lower QDQ node units to QOperator ops for the target's execution provider; see the module docstring."""

    name = "qoperator"
    reported_counts = ("activations_absorbed",)
    in_place = True

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        refuse_cuda(ctx.target, self.name, _CUDA_REFUSAL)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        target = ctx.target
        lw = Lowering(graph, target, ctx.doc_strings)
        _fold_constant_quantize(lw)
        kept: dict[tuple[str, str], list[str]] = {}
        lowered: Counter[str] = Counter()
        for node in list(graph.nodes):
            if not node.outputs or not _is_unit(node):
                continue  # already rewritten (an absorbed Relu, a removed Q), or not a QDQ unit
            lower = LOWERINGS.get(node.op)
            if lower is None:
                kept.setdefault((node.op, f"ORT has no QOperator kernel for {node.op}"), []).append(node.name)
                continue
            result = lower(lw, node)
            if isinstance(result, Done):
                lowered[f"{node.op}->{result}"] += 1
            else:
                kept.setdefault((node.op, result), []).append(node.name)
        _remove_identity_pairs(lw)
        n_lowered = sum(lowered.values())
        counts: dict[str, int] = {"nodes_lowered": n_lowered, "units_kept_qdq": sum(len(v) for v in kept.values())}
        counts.update({k: v for k, v in lw.counts.items() if v})
        counts.update(dict(sorted(lowered.items())))
        modified = bool(n_lowered or lw.counts["weights_folded"] or lw.counts["qdq_pairs_removed"])
        if modified:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        notes = self._notes(graph, lowered, kept, lw)
        logger.debug("qoperator on target %s: %s", target.name, counts)
        for note in notes:
            ctx.report.note(f"qoperator: {note}")
        return PassResult(graph, modified, counts, notes)

    @staticmethod
    def _notes(graph: gs.Graph, lowered: Counter[str], kept: dict[tuple[str, str], list[str]], lw: Lowering) -> list[str]:
        notes: list[str] = []
        if lowered:
            parts = ", ".join(f"{n} {k.replace('->', ' -> ')}" for k, n in sorted(lowered.items(), key=lambda kv: -kv[1]))
            notes.append(f"lowered {sum(lowered.values())} QDQ node units for target {lw.target.name}: {parts}")
        elif not kept:
            integer_ops = ("QGemm", "MatMulInteger", "ConvInteger")
            qops = Counter(n.op for n in graph.nodes if n.op.startswith("QLinear") or n.op in integer_ops)
            if qops:
                have = ", ".join(f"{op} x{n}" for op, n in qops.most_common())
                notes.append(f"nothing to lower: the model is already in QOperator form ({have})")
            else:
                notes.append("nothing to lower: no DequantizeLinear -> op -> QuantizeLinear units in the model")
        for (op, why), names in sorted(kept.items(), key=lambda kv: -len(kv[1])):
            notes.append(f"kept as QDQ: {len(names)} {op} ({why}), e.g. '{names[0]}'")
        if lw.saturation_fixed:
            notes.append(
                f"{len(lw.saturation_fixed)} Conv/MatMul/Gemm have int8 weights wider than 7 bits (e.g. "
                f"'{lw.saturation_fixed[0]}'): stored as uint8 (zero point + 128, same values) because on target "
                f"{lw.target.name} ORT's uint8 x int8 kernels add product pairs in a saturating int16 and would not compute "
                "what the QDQ model says; its uint8 x uint8 kernels are exact but slower. Use --target x86-vnni or "
                "arm64 to keep int8 weights for CPUs that accumulate in int32"
            )
        return notes


def lower_to_qoperator(graph: gs.Graph, ctx: PassContext) -> gs.Graph:
    """Convenience function: run :class:`QOperatorPass` on ``graph``."""
    return QOperatorPass()(graph, ctx).graph
