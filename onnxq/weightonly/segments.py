"""Sequential calibration for GPTQ/AWQ: run the graph segment by segment, keeping only boundary activations.

GPTQ and AWQ quantize one layer at a time, and each layer must see its input as the *already quantized*
earlier layers produce it (the papers' sequential scheme). Re-running the whole model up to every layer
would cost layers x forward passes. Instead the graph (in topological order) is cut just before the
next weight MatMul still to be quantized; everything between the previous cut and this one is one
segment, run once per calibration sample on the activations stored at the previous cut. Only tensors
*live* at a cut (produced before it, read after it: the residual stream, the normalised input of the
next projections, the attention mask, RoPE tables) are kept, so the work is one forward pass over the
calibration set in total and memory is bounded by one cut's live tensors times the number of samples.

A *wave* is every not-yet-quantized weight MatMul whose activation input is already available at the
cut: the Q/K/V projections (one input), gate/up, then o_proj, down_proj, ... . The caller quantizes a
wave's weights in place (the graph's constants change), so the next segment computes with them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxq._memory import release
from onnxq._ort import make_session
from onnxq.calibration.sources import CalibrationSource
from onnxq.errors import CalibrationError

__all__ = ["Wave", "SegmentRunner"]

logger = logging.getLogger(__name__)


@dataclass
class Wave:
    """Weight MatMuls whose inputs are ready, and those inputs (one array per calibration sample)."""

    nodes: list[gs.Node]
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def rows(self, name: str) -> Iterator[np.ndarray]:
        """The activation ``name`` as ``[rows, K]`` blocks (one per sample)."""
        for x in self.inputs[name]:
            yield x.reshape(-1, x.shape[-1])


def _reads(node: gs.Node) -> list[str]:
    """Names of the tensors ``node`` reads, including outer-scope tensors read by its subgraphs."""
    names = [t.name for t in node.inputs if t is not None and t.name]
    for attr in node.attrs.values():
        subs = attr if isinstance(attr, list) else [attr]
        for sub in subs:
            if isinstance(sub, gs.Graph):
                inner = {t.name for n in sub.nodes for t in n.outputs} | {t.name for t in sub.inputs}
                for n in sub.nodes:
                    names.extend(r for r in _reads(n) if r not in inner)
    return names


class SegmentRunner:
    """Walks ``targets`` (weight MatMuls) wave by wave, feeding each wave its inputs.

    Args:
        graph: the graph being quantized (constants may change between waves).
        targets: the MatMul nodes to quantize; input 0 is the activation.
        source: calibration samples (feed dicts for the graph's inputs).
        providers: ONNX Runtime providers for the segment sessions.
    """

    def __init__(self, graph: gs.Graph, targets: list[gs.Node], source: CalibrationSource, *, providers: list[str]) -> None:
        graph.toposort()
        self.graph = graph
        self.order: list[gs.Node] = list(graph.nodes)
        index = {id(n): i for i, n in enumerate(self.order)}
        missing = [t.name for t in targets if id(t) not in index]
        if missing:
            raise ValueError(f"weight-only targets not in the graph: {missing[:3]}")
        self.targets = sorted(targets, key=lambda n: index[id(n)])
        self.index = index
        self.providers = providers
        n = len(self.order)
        self.producer: dict[str, int] = {}
        for i, node in enumerate(self.order):
            for t in node.outputs:
                self.producer[t.name] = i
        self.last_use: dict[str, int] = {}
        for i, node in enumerate(self.order):
            for name in _reads(node):
                self.last_use[name] = i
        for t in graph.outputs:
            self.last_use[t.name] = n
        self.store: dict[str, list[np.ndarray]] = {}
        self.samples = 0
        inputs = [t.name for t in graph.inputs]
        for feed in source:
            extra = set(feed) - set(inputs)
            if extra:
                raise CalibrationError(f"calibration sample has inputs the model does not: {sorted(extra)}")
            for name in inputs:
                if name in feed:
                    self.store.setdefault(name, []).append(np.asarray(feed[name]))
            self.samples += 1
        if not self.samples:
            raise CalibrationError(f"the calibration source yielded no samples ({source.describe()})")
        self.cut = 0
        self.segments_run = 0

    def _activation(self, node: gs.Node) -> str:
        return node.inputs[0].name

    def waves(self) -> Iterator[Wave]:
        """Yield the waves in order; quantize each before asking for the next."""
        remaining = list(self.targets)
        while remaining:
            p = self.index[id(remaining[0])]
            wave = [m for m in remaining if self.producer.get(self._activation(m), -1) < p]
            self._advance(p)
            names = list(dict.fromkeys(self._activation(m) for m in wave))
            for name in names:
                if name not in self.store:
                    raise CalibrationError(
                        f"activation '{name}' of '{wave[0].name}' was not computed from the calibration inputs "
                        "(is it fed by an optional model input the calibration source does not provide?)"
                    )
            yield Wave(wave, {name: self.store[name] for name in names})
            done = {id(m) for m in wave}
            remaining = [m for m in remaining if id(m) not in done]

    def scale_stored(self, name: str, factor: np.ndarray) -> None:
        """Multiply the stored activation ``name`` by ``factor`` (broadcast), after an exact fold of a
        scale into what produces it (AWQ), so the next segments see what the changed graph computes."""
        f = np.asarray(factor, np.float32)
        self.store[name] = [(x * f).astype(x.dtype) for x in self.store[name]]

    # -- running one segment -------------------------------------------------------------------------

    def _advance(self, p: int) -> None:
        """Run nodes ``[cut, p)`` on the stored activations; keep what is live at ``p``."""
        nodes = self.order[self.cut : p]
        produced = {t.name for n in nodes for t in n.outputs}
        keep_new = [name for name in dict.fromkeys(t.name for n in nodes for t in n.outputs) if self.last_use.get(name, -1) >= p]
        if nodes and keep_new:
            reads = [r for n in nodes for r in _reads(n)]
            tensors = self.graph.tensors()
            # constants may have been added since __init__ (a weight replaced by a new constant after its wave)
            feeds = [r for r in dict.fromkeys(reads)
                     if r not in produced and not isinstance(tensors.get(r), gs.Constant)]  # fmt: skip
            absent = [r for r in feeds if r not in self.store]
            if absent:
                raise CalibrationError(
                    f"segment before '{self.order[p].name if p < len(self.order) else 'the end'}' needs "
                    f"{absent[:3]}, which the calibration samples do not provide"
                )
            sess = make_session(self._segment_model(nodes, feeds, keep_new).SerializeToString(), providers=self.providers)
            results: dict[str, list[np.ndarray]] = {name: [] for name in keep_new}
            for i in range(self.samples):
                feed = {r: self.store[r][i] for r in feeds}
                try:
                    outs = sess.run(keep_new, feed)
                except Exception as exc:  # noqa: BLE001 - ORT raises many types
                    raise CalibrationError(f"running the segment {self.cut}..{p} on sample {i} failed: {exc}") from exc
                for name, value in zip(keep_new, outs):
                    results[name].append(value)
            self.store.update(results)
            self.segments_run += 1
        self.store = {k: v for k, v in self.store.items() if self.last_use.get(k, -1) >= p}
        self.cut = p
        release()  # the segment session and dropped activations: give the heap pages back

    def _segment_model(self, nodes: list[gs.Node], feeds: list[str], outputs: list[str]) -> onnx.ModelProto:
        tensors = self.graph.tensors()
        seg = gs.Graph(
            nodes=nodes,
            inputs=[tensors[name] for name in feeds],
            outputs=[tensors[name] for name in outputs],
            opset=self.graph.opset,
            import_domains=self.graph.import_domains,
        )
        model = gs.export_onnx(seg, do_type_check=False)
        del model.graph.input[:]
        for name in feeds:
            x = self.store[name][0]
            model.graph.input.append(
                helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(x.dtype), [None] * x.ndim)
            )
        del model.graph.output[:]
        for name in outputs:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
        model.ir_version = min(model.ir_version, 10)
        return model
