"""The calibration runner: ONNX Runtime sessions over an observer model, batch by batch.

The observer model is the model being quantized with, for every tensor to observe, a ``ReduceMin``
and a ``ReduceMax`` added as graph outputs. The reduction runs inside the session (on the CPU or CUDA
execution provider), so only two scalars per tensor cross to the host per batch, and memory never grows
with the number of samples. When a reduced value is NaN or +-Inf (the tensor holds non-finite values),
that batch is re-run through a second model exposing those tensors whole, and their finite values are
used: min-max statistics ignore NaN/Inf exactly as the numpy observers do.

Histogram observers (``percentile``, ``mse``, ``entropy``) need the values themselves: for them the
observer model exposes the tensors whole and each batch's values go to :meth:`Observer.observe`, one
batch at a time. Where all tensors of one batch would exceed a memory budget (estimated from the
model's shapes), the tensors are observed in groups, one session and one pass over the source per
group, so at most one batch of one group's tensors is ever held.

The graph-optimisation level is ``all``: ORT's fusions never remove a tensor that is consumed by the
added reductions, so every observed tensor keeps its float meaning, and the session runs the model's
heavy ops with the fast (NCHWc) kernels.

:class:`CalibrationSession` is lazy and caches: ``ranges(graph, names)`` calibrates the first time
it is asked and answers later questions about the same tensors from the cache.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxq._ort import available_providers, make_session
from onnxq.calibration.observers import Observer, finite_minmax, make_observer, needs_tensors
from onnxq.errors import CalibrationError
from onnxq.progress import progress_bar

if TYPE_CHECKING:
    import onnxruntime as ort

    from onnxq.calibration.sources import CalibrationSource
    from onnxq.recipe import CalibrationSpec

__all__ = ["CalibrationSession", "choose_providers", "build_observer_model", "tensor_groups", "EXPOSE_BUDGET_BYTES"]

logger = logging.getLogger(__name__)

_MIN, _MAX = "/onnxq_observe_min", "/onnxq_observe_max"

EXPOSE_BUDGET_BYTES = 1 << 30
"""Most bytes of whole tensors one batch may expose at once (histogram observers); more go in groups."""


def choose_providers(device: str) -> list[str]:
    """Execution providers for ``--device auto|cpu|cuda``.

    ``auto`` prefers CUDA when onnxruntime-gpu is installed and sees a GPU; ``cuda`` insists on it.
    """
    have = available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    gpu = "CUDAExecutionProvider" in have
    if device == "cuda":
        if not gpu:
            raise CalibrationError(
                "--device cuda needs onnxruntime-gpu with a visible NVIDIA GPU; this onnxruntime offers "
                f"{', '.join(have)} (install \"onnxq[gpu]\", or use --device cpu)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise CalibrationError(f"unknown device '{device}'; valid: auto, cpu, cuda")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]


def build_observer_model(model: onnx.ModelProto, names: list[str], *, reduce: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are the observed tensors (reduced to min/max when ``reduce``)."""
    obs = onnx.ModelProto()
    obs.CopyFrom(model)
    g = obs.graph
    del g.output[:]
    for i, name in enumerate(names):
        if reduce:
            for op, suffix in (("ReduceMin", _MIN), ("ReduceMax", _MAX)):
                g.node.append(helper.make_node(op, [name], [name + suffix], name=f"onnxq_observe_{i}{suffix}", keepdims=0))
                g.output.append(helper.make_empty_tensor_value_info(name + suffix))
        else:
            g.output.append(helper.make_empty_tensor_value_info(name))
    return obs


class CalibrationSession:
    """Lazily computes and caches activation ranges over one calibration source.

    Args:
        source: where the samples come from (already validated against the model's inputs).
        spec: the recipe's calibration settings (method, sample count, device, batch size).
        progress: show a progress bar with samples/s and ETA.
    """

    def __init__(self, source: CalibrationSource, spec: CalibrationSpec, *, progress: bool = True) -> None:
        self.source = source
        self.spec = spec
        self.progress = progress
        self.providers = choose_providers(spec.device)
        self.provider_used: str | None = None
        self.samples_seen = 0
        self.seconds = 0.0
        self._cache: dict[str, tuple[float, float]] = {}

    @property
    def computed(self) -> dict[str, tuple[float, float]]:
        """Every range calibrated so far (what ``onnxq calibrate`` saves)."""
        return dict(self._cache)

    def ranges(self, graph: gs.Graph | onnx.ModelProto, names: list[str]) -> dict[str, tuple[float, float]]:
        """``(rmin, rmax)`` of each named tensor over the calibration samples."""
        todo = [n for n in dict.fromkeys(names) if n not in self._cache]
        if todo:
            model = graph if isinstance(graph, onnx.ModelProto) else gs.export_onnx(graph, do_type_check=False)
            self._cache.update(self._calibrate(model, todo))
        return {n: self._cache[n] for n in names}

    def _batches(self) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Feed dicts of up to ``batch_size`` samples concatenated on axis 0, with their sample count."""
        size = max(1, self.spec.batch_size)
        pending: list[dict[str, np.ndarray]] = []
        for feed in self.source:
            pending.append(feed)
            if len(pending) == size:
                yield _concat(pending), len(pending)
                pending = []
        if pending:
            yield _concat(pending), len(pending)

    def _calibrate(self, model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[float, float]]:
        observers: dict[str, Observer] = {}
        for n in names:
            opts = {"averaging_constant": self.spec.ema_constant} if self.spec.method == "ema-minmax" else {}
            observers[n] = make_observer(self.spec.method, **opts)
        t0 = time.perf_counter()
        if needs_tensors(self.spec.method):
            seen = self._observe_tensors(model, names, observers)
        else:
            seen = self._observe_minmax(model, names, observers)
        if seen == 0:
            raise CalibrationError(f"the calibration source yielded no samples ({self.source.describe()})")
        self.samples_seen = max(self.samples_seen, seen)
        self.seconds += time.perf_counter() - t0
        logger.info("calibrated %d tensors over %d samples in %.1fs on %s", len(names), seen, self.seconds, self.provider_used)
        return {n: observers[n].compute_range() for n in names}

    def _session(self, model: onnx.ModelProto) -> "ort.InferenceSession":
        try:
            sess = make_session(model.SerializeToString(), providers=self.providers, optimization="all")
        except Exception as exc:  # noqa: BLE001 - ORT raises many types
            raise CalibrationError(f"ONNX Runtime could not load the model for calibration: {exc}") from exc
        self.provider_used = sess.get_providers()[0]
        return sess

    def _observe_tensors(self, model: onnx.ModelProto, names: list[str], observers: dict[str, Observer]) -> int:
        """Expose the tensors whole (in groups within the memory budget) and feed every batch to ``observe``."""
        inputs = {i.name for i in model.graph.input}
        from_graph = [n for n in names if n not in inputs]
        batches = self._batches()
        first = next(batches, None)
        batches.close()
        if first is None:
            return 0
        groups = tensor_groups(model, from_graph, first[0], EXPOSE_BUDGET_BYTES) if from_graph else [[]]
        if len(groups) > 1:
            logger.info(
                "observing %d tensors in %d groups (one pass over the source each)", len(from_graph), len(groups)
            )
        total = len(self.source) * len(groups)
        seen = 0
        with progress_bar(total, "calibrating", enabled=self.progress) as advance:
            for g, group in enumerate(groups):
                sess = self._session(build_observer_model(model, group, reduce=False)) if group else None
                seen = 0
                for feed, count in self._batches():
                    if sess is not None:
                        try:
                            outs = sess.run(group, feed)
                        except Exception as exc:  # noqa: BLE001
                            raise CalibrationError(f"calibration run failed on sample {seen}: {exc}") from exc
                        for n, value in zip(group, outs):
                            observers[n].observe(value)
                        del outs
                    if g == 0:
                        for n in names:
                            if n in inputs:
                                observers[n].observe(feed[n])
                    seen += count
                    advance(count)
                del sess
        return seen

    def _observe_minmax(self, model: onnx.ModelProto, names: list[str], observers: dict[str, Observer]) -> int:
        """Reduce the tensors to min/max inside the graph; re-run whole only where a value is not finite."""
        sess = self._session(build_observer_model(model, names))
        full_sess = None
        full_names: list[str] = []
        total = len(self.source)
        seen = 0
        with progress_bar(total, "calibrating", enabled=self.progress) as advance:
            for feed, count in self._batches():
                try:
                    outs = sess.run(None, feed)
                except Exception as exc:  # noqa: BLE001
                    raise CalibrationError(f"calibration run failed on sample {seen}: {exc}") from exc
                bad: list[str] = []
                for i, n in enumerate(names):
                    lo, hi = float(outs[2 * i]), float(outs[2 * i + 1])
                    if np.isfinite(lo) and np.isfinite(hi):
                        observers[n].observe_minmax(lo, hi)
                    else:
                        bad.append(n)
                if bad:
                    if full_sess is None or not set(bad) <= set(full_names):
                        full_names = sorted(set(full_names) | set(bad))
                        full_sess = make_session(
                            build_observer_model(model, full_names, reduce=False).SerializeToString(),
                            providers=self.providers,
                            optimization="all",
                        )
                    values = dict(zip(full_names, full_sess.run(None, feed)))
                    for n in bad:
                        mm = finite_minmax(values[n])
                        if mm is not None:
                            observers[n].observe_minmax(*mm)
                seen += count
                advance(count)
        return seen


def tensor_groups(
    model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray], budget: int
) -> list[list[str]]:
    """Split ``names`` into groups whose tensors for one batch (``feed``) fit in ``budget`` bytes.

    Sizes come from the model's shapes (ONNX shape inference fills in tensors the model does not
    annotate), with symbolic dims resolved from the feed's shapes where a graph input names them and
    other unknown dims taken as 1. A tensor of unknown shape counts as large as the largest known one
    (as nothing when no size is known). A single tensor over the budget gets a group of its own.
    """
    infos = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}

    def has_shape(n: str) -> bool:
        vi = infos.get(n)
        return vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")

    if not all(has_shape(n) for n in names):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - too large for the in-memory API, or an op it cannot type
            logger.debug("shape inference failed while sizing observed tensors", exc_info=True)
        else:
            infos.update({vi.name: vi for vi in inferred.graph.value_info})
    dims: dict[str, int] = {}
    for vi in model.graph.input:
        if vi.name in feed and vi.type.HasField("tensor_type"):
            for d, size in zip(vi.type.tensor_type.shape.dim, np.shape(feed[vi.name])):
                if d.dim_param:
                    dims[d.dim_param] = int(size)
    sizes: dict[str, int | None] = {}
    for n in names:
        if not has_shape(n):
            sizes[n] = None
            continue
        tt = infos[n].type.tensor_type
        elems = 1
        for d in tt.shape.dim:
            elems *= d.dim_value if d.dim_value > 0 else dims.get(d.dim_param, 1)
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize if tt.elem_type else 4
        sizes[n] = elems * itemsize
    known = [v for v in sizes.values() if v is not None]
    default = max(known) if known else 0
    groups: list[list[str]] = [[]]
    used = 0
    for n in names:
        size = sizes[n] if sizes[n] is not None else default
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += size
    return groups


def _concat(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(feeds) == 1:
        return feeds[0]
    return {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}
