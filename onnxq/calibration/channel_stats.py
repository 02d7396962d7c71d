"""Per-channel statistics of weight-op inputs, streamed batch by batch through ONNX Runtime.

Two statistics later passes need, for each activation that feeds a MatMul / Gemm with a constant
weight (the input channel is the last axis, the K of ``X @ W``):

* ``absmax``: ``max |X[..., j]|`` per input channel j, what SmoothQuant's smoothing factor
  ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` needs. It is reduced inside the graph
  (``ReduceMax(Abs(x))`` over every axis but the last), so only a K-vector crosses to the host.
* ``gram``: ``X^T X`` summed over all rows (K x K, float64) and the row count, the Hessian
  ``H = 2 X^T X / n`` of GPTQ's layer-wise objective and the input statistics AWQ's scale search uses.
  Accumulated on the host one batch at a time: memory is K x K per tensor plus one batch.

Both stream like the range calibrators: memory never grows with the number of samples. Non-finite
values are ignored (absmax) or make the statistic fail with a message naming the tensor (gram, where a
NaN would poison every later GPTQ update).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxq._ort import make_session
from onnxq.calibration.runner import choose_providers
from onnxq.calibration.sources import CalibrationSource
from onnxq.errors import CalibrationError
from onnxq.progress import progress_bar

__all__ = ["ChannelStats", "weight_op_inputs", "collect_channel_stats"]

logger = logging.getLogger(__name__)

_ABSMAX = "/onnxq_channel_absmax"


@dataclass
class ChannelStats:
    """Per-input-channel statistics of one activation tensor."""

    absmax: np.ndarray  # [K] float32
    gram: np.ndarray | None = None  # [K, K] float64, sum of x x^T over all rows
    rows: int = 0
    sample: np.ndarray | None = None  # [<=sample_rows, K] float32, a uniform random sample of the rows

    @property
    def hessian(self) -> np.ndarray:
        """GPTQ's ``H = 2 X^T X / n`` (needs ``gram``)."""
        if self.gram is None or self.rows == 0:
            raise CalibrationError("no Gram statistics were collected for this tensor (collect with gram=True)")
        return 2.0 * self.gram / self.rows


def weight_op_inputs(graph: gs.Graph) -> list[str]:
    """Activations feeding MatMul (constant B) or Gemm (constant B, transA = 0): their input channel is last."""
    names: list[str] = []
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            continue
        if isinstance(w, gs.Constant) and isinstance(x, gs.Variable) and x.name not in names:
            names.append(x.name)
    return names


def _stats_model(model: onnx.ModelProto, names: list[str], gram: bool) -> onnx.ModelProto:
    obs = onnx.ModelProto()
    obs.CopyFrom(model)
    g = obs.graph
    del g.output[:]
    opset = next(o.version for o in obs.opset_import if o.domain in ("", "ai.onnx"))
    for i, name in enumerate(names):
        absname = f"{name}/onnxq_abs"
        g.node.append(helper.make_node("Abs", [name], [absname], name=f"onnxq_channel_abs_{i}"))
        # all axes but the last: reshape to [rows, K] (K read from the tensor's shape), whatever the rank
        p_ = f"{name}/onnxq"
        consts = {f"{p_}_minus1": [-1], f"{p_}_last": [-1], f"{p_}_end": [np.iinfo(np.int64).max]}
        for cname, value in consts.items():
            g.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.int64), cname))
        g.node.extend([
            helper.make_node("Shape", [absname], [f"{p_}_shape"], name=f"onnxq_channel_shape_{i}"),
            helper.make_node("Slice", [f"{p_}_shape", f"{p_}_last", f"{p_}_end"], [f"{p_}_k"], name=f"onnxq_channel_k_{i}"),
            helper.make_node("Concat", [f"{p_}_minus1", f"{p_}_k"], [f"{p_}_rows_k"], name=f"onnxq_channel_rows_k_{i}", axis=0),
            helper.make_node("Reshape", [absname, f"{p_}_rows_k"], [f"{p_}_flat"], name=f"onnxq_channel_flat_{i}"),
        ])  # fmt: skip
        flat = f"{p_}_flat"
        out = name + _ABSMAX
        if opset >= 18:
            axes = f"{name}/onnxq_axes"
            g.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), axes))
            g.node.append(helper.make_node("ReduceMax", [flat, axes], [out], name=f"onnxq_channel_max_{i}", keepdims=0))
        else:
            g.node.append(helper.make_node("ReduceMax", [flat], [out], name=f"onnxq_channel_max_{i}", axes=[0], keepdims=0))
        g.output.append(helper.make_empty_tensor_value_info(out))
        if gram:
            g.output.append(helper.make_empty_tensor_value_info(name))
    return obs


def collect_channel_stats(
    model: onnx.ModelProto | gs.Graph,
    names: list[str],
    source: CalibrationSource,
    *,
    device: str = "auto",
    gram: bool = False,
    sample_rows: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, ChannelStats]:
    """Stream ``source`` through the model once and return per-input-channel statistics of ``names``.

    Args:
        model: the model (or graph) whose tensors are observed.
        names: activation tensors whose last axis is the channel (see :func:`weight_op_inputs`).
        source: calibration samples, validated against the model's inputs.
        device: ``auto``, ``cpu`` or ``cuda`` (as for calibration).
        gram: also accumulate ``X^T X`` per tensor (K x K on the host).
        sample_rows: also keep a uniform random sample of up to this many rows per tensor (reservoir
            sampling: bounded memory whatever the number of samples), e.g. for SmoothQuant's alpha search.
        seed: seeds the row sampling (results are reproducible).
        progress: show a progress bar.
    """
    if isinstance(model, gs.Graph):
        model = gs.export_onnx(model, do_type_check=False)
    if not names:
        return {}
    full = gram or sample_rows > 0
    sess = make_session(_stats_model(model, names, full).SerializeToString(), providers=choose_providers(device))
    absmax: dict[str, np.ndarray] = {}
    grams: dict[str, np.ndarray] = {}
    rows: dict[str, int] = dict.fromkeys(names, 0)
    samplers = {n: _Reservoir(sample_rows, seed + i) for i, n in enumerate(names)} if sample_rows > 0 else {}
    per = 2 if full else 1
    with progress_bar(len(source), "channel statistics", enabled=progress) as advance:
        for feed in source:
            outs = sess.run(None, feed)
            for i, name in enumerate(names):
                m = np.asarray(outs[per * i], np.float32)
                m = np.where(np.isfinite(m), m, 0.0) if not np.isfinite(m).all() else m
                absmax[name] = m if name not in absmax else np.maximum(absmax[name], m)
                if gram:
                    x = np.asarray(outs[per * i + 1])
                    x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
                    if not np.isfinite(x2).all():
                        raise CalibrationError(
                            f"tensor '{name}' holds NaN/Inf on a calibration sample; GPTQ/AWQ statistics need finite inputs"
                        )
                    grams[name] = x2.T @ x2 if name not in grams else grams[name] + x2.T @ x2
                if full:
                    x = np.asarray(outs[per * i + 1])
                    rows[name] += int(np.prod(x.shape[:-1], dtype=np.int64))
                if samplers:
                    x = np.asarray(outs[per * i + 1], np.float32)
                    samplers[name].add(x.reshape(-1, x.shape[-1]))
            advance(1)
    if not absmax:
        raise CalibrationError(f"the calibration source yielded no samples ({source.describe()})")
    return {n: ChannelStats(absmax[n], grams.get(n), rows[n], samplers[n].rows() if samplers else None) for n in names}


class _Reservoir:
    """A uniform random sample of at most ``capacity`` rows from a stream of row blocks (Algorithm R)."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.buf: np.ndarray | None = None
        self.filled = 0
        self.seen = 0

    def add(self, block: np.ndarray) -> None:
        if self.buf is None:
            self.buf = np.empty((self.capacity, block.shape[1]), np.float32)
        take = min(self.capacity - self.filled, block.shape[0])
        if take:
            self.buf[self.filled : self.filled + take] = block[:take]
            self.filled += take
            self.seen += take
            block = block[take:]
        if block.shape[0]:
            # row t (0-based over the whole stream) replaces a random slot with probability capacity / (t + 1);
            # later rows overwrite earlier ones drawn to the same slot, as the sequential algorithm would
            t = self.seen + np.arange(block.shape[0])
            j = (self.rng.random(block.shape[0]) * (t + 1)).astype(np.int64)
            keep = j < self.capacity
            self.buf[j[keep]] = block[keep]
            self.seen += block.shape[0]

    def rows(self) -> np.ndarray:
        return np.zeros((0, 0), np.float32) if self.buf is None else self.buf[: self.filled].copy()
