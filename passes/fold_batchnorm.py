"""Fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it.

``BN(x) = (x - mean) / sqrt(var + eps) * scale + bias`` is an affine map per channel, so after a linear
op it can be absorbed: the weights of output channel ``c`` are multiplied by ``f_c = scale_c /
sqrt(var_c + eps)`` and the bias becomes ``(b_c - mean_c) * f_c + bias_c``. Quantizing the folded weights
is both faster (one op fewer) and more accurate (the scale is applied in float, once, instead of to a
quantized activation). The arithmetic is done in float64 and stored in the weights' own float dtype
(float16 models stay float16).

A BatchNormalization is kept (with a note saying why) when its producer is not a Conv / ConvTranspose /
Gemm, that producer's output has another consumer or is a graph output, a weight or BN parameter is not
a constant, or it runs in training mode.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.pipeline import Pass, PassContext, PassResult

__all__ = ["FoldBatchNormPass", "fold_batchnorm"]

logger = logging.getLogger(__name__)

_FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def _check(bn: gs.Node, graph: gs.Graph) -> str | None:
    """Return why ``bn`` cannot be folded, or None when it can."""
    if bn.attrs.get("training_mode", 0) or bn.attrs.get("spatial", 1) == 0 or len(bn.inputs) != 5:
        return "training mode, non-spatial or malformed BatchNormalization"
    if any(o.outputs or o in graph.outputs for o in bn.outputs[1:]):
        return "it has training outputs in use"
    params = bn.inputs[1:]
    if not all(isinstance(p, gs.Constant) for p in params):
        return "its scale/bias/mean/var are not constants (run constant folding first)"
    x = bn.inputs[0]
    if len(x.inputs) != 1 or x.inputs[0].op not in _FOLDABLE_PRODUCERS:
        producer = x.inputs[0].op if x.inputs else "a graph input"
        return f"its input comes from {producer}, not from a Conv/ConvTranspose/Gemm"
    prod = x.inputs[0]
    if len(x.outputs) != 1 or x in graph.outputs:
        return f"the output of {prod.op} '{prod.name}' has other consumers"
    w = prod.inputs[1]
    bias = prod.inputs[2] if len(prod.inputs) > 2 and not prod.inputs[2].is_empty() else None
    if not isinstance(w, gs.Constant) or (bias is not None and not isinstance(bias, gs.Constant)):
        return f"the weight or bias of {prod.op} '{prod.name}' is not a constant"
    if w.values.dtype.kind != "f":
        return f"the weight of {prod.op} '{prod.name}' is not a float tensor"
    if prod.op == "Gemm" and len(w.shape) != 2:
        return f"Gemm '{prod.name}' has a weight of rank {len(w.shape)}, not 2"
    return None


def _scale_weight(prod: gs.Node, w: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Multiply the weight of every output channel c by f[c]."""
    if prod.op == "Conv":  # W: [M, C/g, k...]
        return w * f.reshape((-1,) + (1,) * (w.ndim - 1))
    if prod.op == "ConvTranspose":  # W: [C, M/g, k...], output channel = group_index * M/g + j
        g = int(prod.attrs.get("group", 1))
        c, m_g = w.shape[0], w.shape[1]
        wg = w.reshape((g, c // g, m_g) + w.shape[2:])
        return (wg * f.reshape((g, 1, m_g) + (1,) * (w.ndim - 2))).reshape(w.shape)
    # Gemm: Y = alpha * A @ B' + beta * C, with B' = B ([K, M]) or B.T ([M, K]).
    return w * (f[:, None] if prod.attrs.get("transB", 0) else f[None, :])


def _set_values(node: gs.Node, index: int, values: np.ndarray, name: str) -> None:
    """Put ``values`` at ``node.inputs[index]``: in place if only this node uses the constant, else a copy."""
    old = node.inputs[index] if index < len(node.inputs) else None
    if isinstance(old, gs.Constant) and len(old.outputs) == 1:
        old.values = values
        return
    new = gs.Constant(name, values)
    if old is None:
        node.inputs.append(new)
    else:
        node.inputs[index] = new


def _fold_one(bn: gs.Node) -> None:
    x = bn.inputs[0]
    prod = x.inputs[0]
    scale, b_bn, mean, var = (np.asarray(p.values, np.float64) for p in bn.inputs[1:])
    w_tensor = prod.inputs[1]
    w = np.asarray(w_tensor.values)
    f = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    shift = b_bn - mean * f
    has_bias = len(prod.inputs) > 2 and not prod.inputs[2].is_empty()
    old_b = np.asarray(prod.inputs[2].values, np.float64) if has_bias else np.zeros_like(f)

    new_w = _scale_weight(prod, w.astype(np.float64), f).astype(w.dtype)
    if prod.op == "Gemm":
        beta = float(prod.attrs.get("beta", 1.0))
        if not has_bias or beta == 0.0:
            new_b, prod.attrs["beta"] = shift, 1.0
        else:
            new_b = old_b * f + shift / beta  # broadcasts a scalar or [1, M] / [N, M] bias over channels
    else:
        new_b = old_b * f + shift
    _set_values(prod, 1, new_w, f"{bn.name or w_tensor.name}/folded_weight")
    if len(prod.inputs) > 2 and prod.inputs[2].is_empty():
        del prod.inputs[2]  # an omitted optional bias ("") is replaced by a real one
    _set_values(prod, 2, new_b.astype(w.dtype), f"{bn.name or w_tensor.name}/folded_bias")

    # The producer now writes the BN's output tensor, which keeps its name (it may be a graph output).
    y = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    prod.outputs[0] = y


def _fold_all(graph: gs.Graph) -> tuple[int, list[str]]:
    folded, notes = 0, []
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        reason = _check(bn, graph)
        if reason is not None:
            notes.append(f"BatchNormalization '{bn.name}' kept: {reason}")
            logger.debug("BatchNormalization %s kept: %s", bn.name, reason)
            continue
        _fold_one(bn)  # leaves the BN disconnected: cleanup() drops it
        folded += 1
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return folded, notes


class FoldBatchNormPass(Pass):
    """Fold each foldable BatchNormalization into its Conv / ConvTranspose / Gemm producer.

    counts: ``batchnorms_folded``, ``batchnorms_kept``.
    """

    name = "fold_batchnorm"
    reported_counts = ("batchnorms_folded",)
    in_place = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        folded, notes = _fold_all(graph)
        return PassResult(graph, folded > 0, {"batchnorms_folded": folded, "batchnorms_kept": len(notes)}, notes)


def fold_batchnorm(graph: gs.Graph) -> gs.Graph:
    """Convenience form of :class:`FoldBatchNormPass`: fold in place and return ``graph``."""
    _fold_all(graph)
    return graph
