"""Which tensor of a quantized model holds the counterpart of a float model's tensor.

:func:`match_tensors` pairs them by name and Q/DQ structure (QDQ, dynamic and MatMulNBits models), by the
QOperator naming (``<name>_quantized`` with the node's own output scale), or, when names were lost, by
aligning the weight-bearing nodes of both graphs in order. :mod:`onnxq.evaluate` compares the pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxq.errors import OnnxqError

__all__ = ["TensorMatch", "match_tensors"]

_WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
_Q_WEIGHT_OPS = {"QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3, "ConvInteger": 1, "MatMulInteger": 1}
# QOperator op -> (index of the output scale input, index of the output zero point input)
_Q_OUTPUT_PARAMS = {"QLinearConv": (6, 7), "QLinearMatMul": (6, 7), "QLinearAdd": (6, 7), "QLinearMul": (6, 7),
                    "QGemm": (7, 8), "QLinearGlobalAveragePool": (3, 4), "QLinearAveragePool": (3, 4),
                    "QLinearSigmoid": (3, 4), "QLinearLeakyRelu": (3, 4), "QLinearSoftmax": (3, 4),
                    "QLinearConcat": (0, 1), "QuantizeLinear": (1, 2)}  # fmt: skip
_Q_TO_FLOAT = {"QLinearAdd": "Add", "QLinearMul": "Mul", "QLinearGlobalAveragePool": "GlobalAveragePool",
               "QLinearAveragePool": "AveragePool", "QLinearConcat": "Concat", "QLinearSigmoid": "Sigmoid",
               "QLinearLeakyRelu": "LeakyRelu", "QLinearSoftmax": "Softmax"}  # fmt: skip
_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish"}


@dataclass(frozen=True)
class TensorMatch:
    """One float tensor and where its counterpart lives in the quantized model.

    ``scale``/``zero_point``: initializer names that dequantize an integer quantized tensor on the host
    (QOperator outputs); None when the quantized tensor is already float.
    """

    float_name: str
    quant_name: str
    node: str
    op_type: str
    scale: str | None = None
    zero_point: str | None = None


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {t: n for n in model.graph.node for t in n.output if t}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            if t:
                out.setdefault(t, []).append(n)
    return out


def _initializer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(i.dims) for i in model.graph.initializer}


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Node outputs of a float dtype (or unknown dtype: checked again when the values arrive)."""
    known: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless(model))
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
            known[vi.name] = vi.type.tensor_type.elem_type
    except Exception:  # noqa: BLE001 - best effort; values are checked at run time anyway
        pass
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    return {t for n in model.graph.node for t in n.output if t and known.get(t, onnx.TensorProto.FLOAT) in floats}


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference: large initializers become typed graph inputs (their shapes are enough)."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    g = m.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    listed = {vi.name for vi in model.graph.input}
    for init in model.graph.initializer:
        if np.prod(init.dims) <= 4096:
            g.initializer.append(init)
        elif init.name not in listed:
            g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return m


def match_tensors(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> tuple[list[TensorMatch], list[str]]:
    """Pairs of (float tensor, quantized counterpart); and the float compute outputs left unmatched."""
    fprod, qprod = _producers(float_model), _producers(quant_model)
    fcons, qcons = _consumers(float_model), _consumers(quant_model)
    ffloat = _float_tensors(float_model)
    # 1. names and the Q/DQ structure; 2. QOperator outputs
    matches = _qdq_matches(float_model, quant_model, ffloat, qprod, qcons)
    matches.update(_qoperator_matches(float_model, quant_model, ffloat, fprod, fcons, qcons, matches))
    # 3. graph outputs, by name or in order, are compared as outputs, not as inner tensors
    fouts = _checked_float_outputs(float_model, quant_model)
    for f in fouts:
        matches.pop(f, None)
    order = {t: i for i, n in enumerate(float_model.graph.node) for t in n.output}
    result = sorted(matches.values(), key=lambda m: order.get(m.float_name, 0))
    matched = {m.float_name for m in result} | set(fouts)
    unmatched = [n.output[0] for n in float_model.graph.node
                 if n.op_type in _WEIGHT_OPS and n.output[0] not in matched and _followed(fcons, n) not in matched]  # fmt: skip
    return result, unmatched


def _dequantized_copy(qcons: dict[str, list[onnx.NodeProto]], name: str) -> str:
    """The output of the ``QuantizeLinear -> DequantizeLinear`` pair reading ``name``, else ``name`` itself."""
    for q in qcons.get(name, []):
        if q.op_type == "QuantizeLinear":
            for dq in qcons.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear":
                    return dq.output[0]
    return name


def _qdq_matches(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, ffloat: set[str],
                 qprod: dict[str, onnx.NodeProto], qcons: dict[str, list[onnx.NodeProto]]) -> dict[str, TensorMatch]:  # fmt: skip
    """Matches by name: tensors the quantized model quantizes (Q/DQ), the outputs of nodes reading
    dequantized tensors or running integer kernels, and float compute outputs that kept their name
    (dynamic quantization, MatMulNBits)."""
    wanted: list[str] = []
    dq_outputs = {n.output[0] for n in quant_model.graph.node if n.op_type == "DequantizeLinear"}
    for node in quant_model.graph.node:
        if node.op_type == "QuantizeLinear":
            wanted.append(node.input[0])
        elif node.op_type != "DequantizeLinear" and (
            any(t in dq_outputs for t in node.input) or node.op_type in ("MatMulNBits", "MatMulInteger", "ConvInteger")
            or node.domain == "com.microsoft" and node.op_type.startswith("DynamicQuantize")
        ):  # fmt: skip
            wanted.extend(t for t in node.output if t)
    for node in float_model.graph.node:
        if node.op_type in _WEIGHT_OPS and node.output[0] in qprod:
            wanted.append(node.output[0])
    matches: dict[str, TensorMatch] = {}
    for name in wanted:
        if name in ffloat and name in qprod and name not in matches and qprod[name].op_type != "DequantizeLinear":
            q = qprod[name]
            matches[name] = TensorMatch(name, _dequantized_copy(qcons, name), q.name, q.op_type)
    return matches


def _qoperator_matches(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, ffloat: set[str],
                       fprod: dict[str, onnx.NodeProto], fcons: dict[str, list[onnx.NodeProto]],
                       qcons: dict[str, list[onnx.NodeProto]], matches: dict[str, TensorMatch]) -> dict[str, TensorMatch]:  # fmt: skip
    """Matches for QOperator outputs: integer tensors with the node's own output scale and zero point.

    By name (``<float name>_quantized``) where at least half of them match that way, else by aligning the
    weight nodes of the two graphs. Float tensors already in ``matches`` are left alone.
    """
    qinits = {i.name for i in quant_model.graph.initializer}
    qop: list[tuple[onnx.NodeProto, str, str]] = []
    for node in quant_model.graph.node:
        idx = _Q_OUTPUT_PARAMS.get(node.op_type)
        if idx is None or node.op_type == "QuantizeLinear" or len(node.input) <= max(idx):
            continue
        s, z = node.input[idx[0]], node.input[idx[1]]
        if s in qinits:
            qop.append((node, s, z))
    by_name = {}
    for node, s, z in qop:
        out = node.output[0]
        base = out[: -len("_quantized")] if out.endswith("_quantized") else out
        if base in ffloat and base not in matches:
            # a ReLU/Clip fused into the integer op (its output range does the clipping): compare after it
            fused_act = base in fprod and not any(c.op_type in _ACTIVATIONS for c in qcons.get(out, []))
            fname = _followed(fcons, fprod[base]) if fused_act else base
            by_name[fname] = TensorMatch(fname, out, node.name, node.op_type, s, z or None)
    if qop and len(by_name) * 2 >= len(qop):
        return by_name
    if qop:
        return _align_weight_nodes(float_model, quant_model, ffloat, {id(n): (s, z) for n, s, z in qop})
    return {}


def _checked_float_outputs(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> list[str]:
    """The float model's output names, after checking that the quantized model's outputs pair with them
    (by name, else in order: see :func:`graph_output_pairs`)."""
    fouts = [o.name for o in float_model.graph.output]
    qouts = [o.name for o in quant_model.graph.output]
    if not set(fouts) <= set(qouts) and len(fouts) != len(qouts):
        raise OnnxqError(f"the models have different outputs (float: {', '.join(fouts)}; quantized: {', '.join(qouts)}): "
                         "compare needs the quantized model of this float model")  # fmt: skip
    return fouts


def _followed(consumers: dict[str, list[onnx.NodeProto]], node: onnx.NodeProto) -> str:
    """The output of ``node`` after a single ReLU/Clip-like consumer (what a fused QOperator node produces)."""
    cons = consumers.get(node.output[0], [])
    if len(cons) == 1 and cons[0].op_type in _ACTIVATIONS:
        return cons[0].output[0]
    return node.output[0]


def _weight_key(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(shape)) if len(shape) == 2 else shape


def _align_weight_nodes(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, ffloat: set[str],
                        qparams: dict[int, tuple[str, str]]) -> dict[str, TensorMatch]:  # fmt: skip
    """Pair the weight-bearing nodes of both graphs in topological order when their weight shapes agree."""
    finit, qinit = _initializer_shapes(float_model), _initializer_shapes(quant_model)
    fnodes = [n for n in float_model.graph.node if n.op_type in _WEIGHT_OPS and len(n.input) > 1 and n.input[1] in finit]
    qnodes = [n for n in quant_model.graph.node
              if n.op_type in _Q_WEIGHT_OPS and len(n.input) > _Q_WEIGHT_OPS[n.op_type] and n.input[_Q_WEIGHT_OPS[n.op_type]] in qinit]  # fmt: skip
    fkeys = [_weight_key(finit[n.input[1]]) for n in fnodes]
    qkeys = [_weight_key(qinit[n.input[_Q_WEIGHT_OPS[n.op_type]]]) for n in qnodes]
    if fkeys != qkeys:
        return {}
    fcons, qcons = _consumers(float_model), _consumers(quant_model)
    out: dict[str, TensorMatch] = {}
    used: set[int] = set()
    for fn, qn in zip(fnodes, qnodes):
        node = qn
        # a Gemm exported as QLinearMatMul + QLinearAdd(bias): compare after the bias
        cons = qcons.get(qn.output[0], [])
        if len(cons) == 1 and cons[0].op_type == "QLinearAdd" and id(cons[0]) in qparams:
            a, b = cons[0].input[0], cons[0].input[3]
            if (b if a == qn.output[0] else a) in qinit:
                node = cons[0]
        if id(node) not in qparams:
            continue
        s, z = qparams[id(node)]
        fused_act = not any(c.op_type in _ACTIVATIONS for c in qcons.get(node.output[0], []))
        fname = _followed(fcons, fn) if fused_act else fn.output[0]
        if fname in ffloat:
            out[fname] = TensorMatch(fname, node.output[0], node.name, node.op_type, s, z or None)
        used.add(id(node))
    # the other QOperator nodes (residual QLinearAdd, pooling, Concat, ...): op by op, in order, when the
    # two graphs have as many of each
    for qop, fop in _Q_TO_FLOAT.items():
        qs = [n for n in quant_model.graph.node if n.op_type == qop and id(n) in qparams and id(n) not in used]
        fs = [n for n in float_model.graph.node if n.op_type == fop and n.output[0] in ffloat
              and not all(t in finit for t in n.input[1:])]  # fmt: skip
        if not qs or len(qs) != len(fs):
            continue
        for fn, qn in zip(fs, qs):
            s, z = qparams[id(qn)]
            fused_act = not any(c.op_type in _ACTIVATIONS for c in qcons.get(qn.output[0], []))
            fname = _followed(fcons, fn) if fused_act else fn.output[0]
            out.setdefault(fname, TensorMatch(fname, qn.output[0], qn.name, qn.op_type, s, z or None))
    return out
