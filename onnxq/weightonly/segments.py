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

AWQ scores a wave's candidate weights on the output of the module they open (attention up to o_proj,
the MLP up to down_proj): :meth:`SegmentRunner.module_outputs` finds that module from the graph, and
:meth:`SegmentRunner.probe` builds one session for the nodes after the cut that compute it, with the
wave's weights as inputs, so every candidate reuses the stored activations and the session.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxq._memory import release
from onnxq._ort import make_session
from onnxq.calibration.sources import CalibrationSource
from onnxq.errors import CalibrationError
from onnxq.graphs import downstream_tensors

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["Wave", "SegmentRunner", "Probe"]

logger = logging.getLogger(__name__)

RELEASE_BYTES = 64 << 20
"""Stored activations dropped before :func:`~onnxq._memory.release` runs (a garbage collection over the graph:
about 0.2 s on stories260K's 1500 nodes, which after every one of its 21 segments was 10% of w4-awq's time)."""


@dataclass
class Wave:
    """Weight MatMuls whose inputs are ready, and those inputs (one array per calibration sample)."""

    nodes: list[gs.Node]
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def rows(self, name: str) -> Iterator[np.ndarray]:
        """The activation ``name`` as ``[rows, K]`` blocks (one per sample)."""
        for x in self.inputs[name]:
            yield x.reshape(-1, x.shape[-1])


class Probe:
    """A part of the graph after the cut, run on stored activations with some weights fed as inputs.

    Made by :meth:`SegmentRunner.probe`; :meth:`run` evaluates it for one set of weights on every sample
    kept, so trying many candidate weights costs one session."""

    def __init__(self, session: ort.InferenceSession, weights: list[gs.Constant], outputs: list[str], inputs: list[dict[str, np.ndarray]]) -> None:
        self.session = session
        self.weights = [(w.name, w.values.dtype) for w in weights]
        self.outputs = outputs
        self.inputs = inputs

    @property
    def samples(self) -> int:
        return len(self.inputs)

    def run(self, weights: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
        """The outputs on each sample with ``weights`` (one per weight of :meth:`SegmentRunner.probe`'s
        nodes, in order of first use)."""
        if len(weights) != len(self.weights):
            raise ValueError(f"the probe takes {len(self.weights)} weights, got {len(weights)}")
        fed = {name: np.ascontiguousarray(w, dtype) for (name, dtype), w in zip(self.weights, weights)}
        for feed in self.inputs:
            yield self.session.run(self.outputs, {**feed, **fed})


def _specialise(model: onnx.ModelProto, inputs: list[dict[str, np.ndarray]], max_baked: int = 64) -> None:
    """Fix what is the same on every sample a probe runs on, so ORT folds the shape arithmetic once.

    An input with one shape on every sample gets that static shape; a small integer input equal on every
    sample (a ``Shape`` output stored at the cut) becomes an initializer and leaves ``inputs``. A
    transformer's attention has hundreds of Shape/Gather/Concat/Where nodes per layer, which a probe would
    otherwise recompute for each sample and candidate (on stories260K, about half the time of a run).
    The results are unchanged: the same ops run on the same values, only earlier."""
    if not inputs:
        return
    baked: list[str] = []
    for vi in model.graph.input:
        if vi.name not in inputs[0]:
            continue  # a weight fed by the probe: its declared shape is already static
        first = inputs[0][vi.name]
        if any(feed[vi.name].shape != first.shape for feed in inputs[1:]):
            continue
        if np.issubdtype(first.dtype, np.integer) and first.size <= max_baked and \
                all(np.array_equal(feed[vi.name], first) for feed in inputs[1:]):  # fmt: skip
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(first), vi.name))
            baked.append(vi.name)
            continue
        vi.type.tensor_type.ClearField("shape")
        for d in first.shape:
            vi.type.tensor_type.shape.dim.add().dim_value = int(d)
    if baked:
        keep = [vi for vi in model.graph.input if vi.name not in baked]
        del model.graph.input[:]
        model.graph.input.extend(keep)
        for feed in inputs:
            for name in baked:
                del feed[name]


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
        tensors = graph.tensors()
        self.constant: set[str] = set()  # tensors computed from constants alone
        for node in self.order:
            if all(isinstance(tensors.get(r), gs.Constant) or r in self.constant for r in _reads(node)):
                self.constant.update(t.name for t in node.outputs)
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
        self._dropped = 0  # bytes of stored activations let go since the last release()

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
        self._dropped += sum(x.nbytes for x in self.store[name])
        self.store[name] = [(x * f).astype(x.dtype) for x in self.store[name]]

    # -- the module after a wave (AWQ's block-output scoring) ----------------------------------------

    def module_outputs(self, nodes: list[gs.Node]) -> list[gs.Tensor] | None:
        """The outputs of the module that the MatMuls ``nodes`` (reading one activation ``X``) open, or None.

        Everything computed from the nodes' outputs is followed forward up to the next target MatMuls
        that read it (the module's closing projections): for Q/K/V that is attention (RoPE, softmax, the
        product with V) up to o_proj, for gate/up the gated activation up to down_proj. The module must
        be self-contained: when anything computed from the nodes meets an activation ``X`` was computed
        from (:meth:`_sources`: the residual stream a norm's output comes from, met at the residual ``Add``
        after o_proj or down_proj) before reaching a target, the nodes close their module themselves and
        None is returned. Graph outputs on the way (a KV cache's ``present``) are
        not part of the module. None as well when a weight of ``nodes`` is also read by another node of
        the module (a probe feeds it to the nodes only). The returned tensors are the closing MatMuls'
        outputs, in graph order.
        """
        members = {id(n) for n in nodes}
        targets = {id(t) for t in self.targets} - members
        stream = self._sources(nodes[0].inputs[0])
        ends: dict[int, gs.Node] = {}
        for t in downstream_tensors([t for n in nodes for t in n.outputs], lambda r: id(r) not in targets):
            for reader in t.outputs:
                if id(reader) in targets:
                    ends[id(reader)] = reader
                elif any(isinstance(i, gs.Variable) and id(i) in stream for i in reader.inputs):
                    return None
        if not ends:
            return None
        outputs = [n.outputs[0] for n in sorted(ends.values(), key=lambda n: self.index[id(n)])]
        part = {id(n) for n in self._part([t.name for t in outputs])}
        if any(id(r) in part and id(r) not in members for n in nodes for r in n.inputs[1].outputs):
            return None
        return outputs

    def probe(self, nodes: list[gs.Node], outputs: list[gs.Tensor], *, max_macs: float | None = None) -> Probe:
        """A :class:`Probe` computing ``outputs`` (e.g. :meth:`module_outputs`) from the activations stored at
        the cut, with the weights of ``nodes`` (their input 1) fed as inputs.

        It runs on the first calibration samples whose rows (of the nodes' activation) times the
        multiply-adds per row of the part's weight MatMuls stay within ``max_macs`` (at least one
        sample; all without a limit)."""
        names = [t.name for t in outputs]
        part = self._part(names)
        ids = {id(n) for n in part}
        if not all(id(n) in ids for n in nodes):
            raise ValueError(f"{names} do not depend on all of {[n.name for n in nodes]} after the cut")
        weights = list({id(n.inputs[1]): n.inputs[1] for n in nodes}.values())
        produced = {t.name for n in part for t in n.outputs}
        tensors = self.graph.tensors()
        feeds = [r for r in dict.fromkeys(r for n in part for r in _reads(n))
                 if r not in produced and not isinstance(tensors.get(r), gs.Constant)]  # fmt: skip
        absent = [r for r in feeds if r not in self.store]
        if absent:
            raise CalibrationError(f"computing {names[:3]} needs {absent[:3]}, which are not stored at the cut")
        model = self._segment_model(part, feeds, names, weights)
        n = self.samples
        if max_macs is not None:
            per_row = sum(node.inputs[1].values.size for node in part
                          if node.op in ("MatMul", "Gemm") and isinstance(node.inputs[1], gs.Constant))  # fmt: skip
            rows = np.cumsum([x.size // max(x.shape[-1], 1) for x in self.store[nodes[0].inputs[0].name]])
            n = max(1, int(np.searchsorted(rows * float(per_row), max_macs, side="right")))
        inputs = [{r: self.store[r][i] for r in feeds} for i in range(n)]
        _specialise(model, inputs)
        return Probe(make_session(model.SerializeToString(), providers=self.providers), weights, names, inputs)

    def _sources(self, x: gs.Tensor) -> set[int]:
        """ids of the stored activations ``x`` is computed from: walking back from ``x``, the first tensors
        held at the cut (for a norm's output, the residual stream). What is computed from constants alone
        (a shared ``Constant`` node's output) and what only carries shapes (``Shape``) is not followed, so
        an attention mask or RoPE table that every layer reads is not taken for the stream."""
        found: set[int] = set()
        seen: set[int] = set()
        todo = deque(i for p in x.inputs for i in p.inputs)
        while todo:
            t = todo.popleft()
            if id(t) in seen or not isinstance(t, gs.Variable) or t.name in self.constant:
                continue
            seen.add(id(t))
            if t.name in self.store:
                found.add(id(t))
                continue
            for p in t.inputs:
                if p.op not in ("Shape", "Size"):
                    todo.extend(p.inputs)
        return found

    def _part(self, names: list[str]) -> list[gs.Node]:
        """The nodes at or after the cut that compute ``names`` (in graph order)."""
        needed: set[int] = set()
        seen: set[str] = set()
        todo = deque(names)
        while todo:
            name = todo.popleft()
            if name in seen:
                continue
            seen.add(name)
            i = self.producer.get(name, -1)
            if i >= self.cut:
                needed.add(i)
                todo.extend(_reads(self.order[i]))
        return [self.order[i] for i in sorted(needed)]

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
        kept = {k: v for k, v in self.store.items() if self.last_use.get(k, -1) >= p}
        self._dropped += sum(x.nbytes for k, v in self.store.items() if k not in kept for x in v)
        self.store = kept
        self.cut = p
        if self._dropped >= RELEASE_BYTES:
            release()  # the dropped activations: give the heap pages back
            self._dropped = 0

    def _segment_model(self, nodes: list[gs.Node], feeds: list[str], outputs: list[str],
                       fed_constants: Sequence[gs.Constant] = ()) -> onnx.ModelProto:  # fmt: skip
        """The nodes as a model reading ``feeds`` (stored activations) and, as float inputs in place of
        their initializers, ``fed_constants``."""
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
        fed = {c.name for c in fed_constants}
        kept = [t for t in model.graph.initializer if t.name not in fed]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        for c in fed_constants:
            model.graph.input.append(
                helper.make_tensor_value_info(c.name, helper.np_dtype_to_tensor_dtype(c.values.dtype), list(c.values.shape))
            )
        del model.graph.output[:]
        for name in outputs:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
        model.ir_version = min(model.ir_version, 10)
        return model
