"""The calibration runner: ONNX Runtime sessions over an observer model, batch by batch.

The observer model is the model being quantized with, for every tensor to observe, a ``ReduceMin``
and a ``ReduceMax`` added as graph outputs. The reduction runs inside the session (on the CPU or CUDA
execution provider), so only two scalars per tensor cross to the host per batch, and memory never grows
with the number of samples. When a reduced value is NaN or +-Inf (the tensor holds non-finite values),
that batch is re-run through a second model exposing those tensors whole, and their finite values are
used: min-max statistics ignore NaN/Inf exactly as the numpy observers do.

Histogram observers (``percentile``, ``mse``, ``entropy``) need the values themselves: for them the
observer model exposes the tensors whole and each batch's values go to :meth:`Observer.observe`, one
batch at a time. A worker thread reads the source, runs the session and takes every tensor's min and
max (ONNX Runtime and numpy's reductions release the GIL) while the calling thread bins the previous
batch into the histograms: at most two batches of tensors are alive. The session runs on half the
cores with its idle threads sleeping rather than spinning, so that both threads get a core. Where all
tensors of one batch would exceed a memory budget (estimated from the model's shapes), the tensors are
observed in groups, one session and one pass over the source per group. Samples are concatenated into
batches only where the recipe's ``batch_size`` asks for it (or :data:`AUTO_BATCH` is raised); the first
sample then runs alone, so that the histograms' grids start as with one sample per run. Batched ranges
then match those of one sample per run within a bin for ``percentile``, ``mse`` and ``mse-percentile``;
``entropy`` can move further where the grids were re-binned differently (its KL minimum is sensitive
to the bin edges).

The graph-optimisation level is ``all``: ORT's fusions never remove a tensor that is consumed by the
added reductions, so every observed tensor keeps its float meaning, and the session runs the model's
heavy ops with the fast (NCHWc) kernels.

:class:`CalibrationSession` is lazy and caches: ``ranges(graph, names)`` calibrates the first time
it is asked and answers later questions about the same tensors from the cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxq._ort import available_providers, make_session
from onnxq.calibration.observers import HistogramObserver, Observer, finite_minmax, make_observer, needs_tensors
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
"""Most bytes of whole tensors one batch may expose at once (histogram observers); more go in groups.
Two batches are alive at a time (one binned while the next runs) only where both fit in it."""

AUTO_BATCH = 1
"""Samples per session run for histogram observers when the recipe's batch_size is 1 and the model takes
a batch (a symbolic first dimension that every sample feeds as 1), within :data:`BATCH_BUDGET_BYTES`.
1 (off): on the CPU, batches of 4 or 8 did not calibrate MobileNetV2 faster (the histogram updates, not
the session, set the pace) and cost 2-4x the memory."""

BATCH_BUDGET_BYTES = 128 << 20
"""Most bytes of whole tensors one automatic batch may expose (two batches are alive at a time)."""


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

    def _batches(
        self, size: int | None = None, *, first_alone: bool = False
    ) -> Iterator[tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]]:
        """Feed dicts of up to ``size`` samples concatenated on axis 0, with the samples they hold.

        Samples whose shapes differ (text of different lengths) are never concatenated: a batch ends
        early instead. ``first_alone``: the first sample runs alone (histogram grids then start from
        the same sample as with batches of one).
        """
        size = max(1, self.spec.batch_size if size is None else size)
        pending: list[dict[str, np.ndarray]] = []
        first = first_alone and size > 1
        for feed in self.source:
            if pending and not _same_shapes(pending[0], feed):
                yield _concat(pending), pending
                pending = []
            pending.append(feed)
            if first or len(pending) == size:
                yield _concat(pending), pending
                pending = []
                first = False
        if pending:
            yield _concat(pending), pending

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
        if needs_tensors(self.spec.method) and _select_threads() > 1 and len(names) > 1:
            ranges = list(_executor().map(lambda n: observers[n].compute_range(), names))  # numpy-heavy searches
            return dict(zip(names, ranges))
        return {n: observers[n].compute_range() for n in names}

    def _session(self, model: onnx.ModelProto, *, spinning: bool = True) -> "ort.InferenceSession":
        """A session on the chosen providers. ``spinning=False`` when another thread works beside it: idle
        intra-op threads then sleep instead of spinning on the cores that thread needs."""
        try:
            if spinning:
                sess = make_session(model.SerializeToString(), providers=self.providers, optimization="all")
            else:
                sess = _quiet_session(model.SerializeToString(), self.providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises many types
            raise CalibrationError(f"ONNX Runtime could not load the model for calibration: {exc}") from exc
        self.provider_used = sess.get_providers()[0]
        return sess

    def _observe_tensors(self, model: onnx.ModelProto, names: list[str], observers: dict[str, Observer]) -> int:
        """Expose the tensors whole (in groups within the memory budget) and feed every batch to ``observe``.

        A worker thread reads the source, runs the session (ONNX Runtime releases the GIL) and takes each
        tensor's min and max while this thread updates the histograms of the previous batch: two batches
        of tensors are alive where both fit in EXPOSE_BUDGET_BYTES, else one (no overlap).
        """
        inputs = {i.name for i in model.graph.input}
        from_graph = [n for n in names if n not in inputs]
        with contextlib.closing(iter(self.source)) as it:  # type: ignore[type-var]
            first = next(it, None)
        if first is None:
            return 0
        sizes = _tensor_sizes(model, from_graph, first)  # for one sample
        size = self._batch_size(model, first, sum(v or 0 for v in sizes.values()))
        sizes = {n: None if v is None else v * size for n, v in sizes.items()}
        groups = _split(from_graph, sizes, EXPOSE_BUDGET_BYTES) if from_graph else [[]]
        biggest = max((sum(sizes[n] or 0 for n in g) for g in groups), default=0)
        slots = 2 if 2 * biggest <= EXPOSE_BUDGET_BYTES else 1  # two batches alive only within the budget
        if len(groups) > 1:
            logger.info(
                "observing %d tensors in %d groups (one pass over the source each)", len(from_graph), len(groups)
            )
        logger.debug("histogram calibration: %d samples per run", size)
        total = len(self.source) * len(groups)
        seen = 0
        with progress_bar(total, "calibrating", enabled=self.progress) as advance:
            for g, group in enumerate(groups):
                sess = self._session(build_observer_model(model, group, reduce=False), spinning=False) if group else None
                graph_inputs = [n for n in names if n in inputs] if g == 0 else []
                seen = 0
                for feed, count, outs, extremes in _prefetch(self._runs(sess, group, size), slots):
                    for n, value, ext in zip(group, outs, extremes):
                        obs = observers[n]
                        if isinstance(obs, HistogramObserver):
                            obs.observe(value, extremes=ext)
                        else:
                            obs.observe(value)
                    del outs
                    for n in graph_inputs:
                        observers[n].observe(feed[n])
                    del feed
                    seen += count
                    advance(count)
                del sess
        return seen

    def _runs(
        self, sess: "ort.InferenceSession | None", group: list[str], size: int
    ) -> Iterator[tuple[dict[str, np.ndarray], int, list[np.ndarray], list[tuple[float, float] | None]]]:
        """``(feed, samples, group's tensors, their (min, max))`` per batch, on the worker thread (which
        also takes the extremes: reductions release the GIL). A batch the model refuses is re-run
        sample by sample, and so are all later ones (a model whose first dimension is not a free batch)."""
        seen = 0
        split = False
        for feed, parts in self._batches(size, first_alone=True):
            if sess is None:
                yield feed, len(parts), [], []
                seen += len(parts)
                continue
            if len(parts) > 1 and not split:
                try:
                    outs = sess.run(group, feed)
                except Exception as exc:  # noqa: BLE001 - ORT raises many types
                    if self.spec.batch_size > 1:
                        raise CalibrationError(
                            f"calibration run failed on samples {seen}-{seen + len(parts) - 1}: {exc}"
                        ) from exc
                    logger.info("the model refused a batch of %d samples (%s); one sample per run", len(parts), exc)
                    split = True
                else:
                    yield feed, len(parts), outs, _extremes(outs)
                    seen += len(parts)
                    continue
            for part in parts:
                outs = _run(sess, group, part, seen)
                yield part, 1, outs, _extremes(outs)
                seen += 1

    def _batch_size(self, model: onnx.ModelProto, first: dict[str, np.ndarray], sample_bytes: int) -> int:
        """Samples per run for histogram observers: the recipe's batch_size when set above 1, else
        :data:`AUTO_BATCH` within :data:`BATCH_BUDGET_BYTES` when the model takes a batch."""
        if self.spec.batch_size > 1:
            return self.spec.batch_size
        if AUTO_BATCH <= 1 or not _takes_batches(model, first):
            return 1
        return max(1, min(AUTO_BATCH, BATCH_BUDGET_BYTES // max(sample_bytes, 1)))

    def _observe_minmax(self, model: onnx.ModelProto, names: list[str], observers: dict[str, Observer]) -> int:
        """Reduce the tensors to min/max inside the graph; re-run whole only where a value is not finite."""
        sess = self._session(build_observer_model(model, names))
        full_sess = None
        full_names: list[str] = []
        total = len(self.source)
        seen = 0
        with progress_bar(total, "calibrating", enabled=self.progress) as advance:
            for feed, parts in self._batches():
                count = len(parts)
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


def _tensor_sizes(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, int | None]:
    """Bytes of each named tensor for one run on ``feed`` (None where its shape is unknown); see
    :func:`tensor_groups`."""
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
    return sizes


def tensor_groups(
    model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray], budget: int
) -> list[list[str]]:
    """Split ``names`` into groups whose tensors for one batch (``feed``) fit in ``budget`` bytes.

    Sizes come from the model's shapes (ONNX shape inference fills in tensors the model does not
    annotate), with symbolic dims resolved from the feed's shapes where a graph input names them and
    other unknown dims taken as 1. A tensor of unknown shape counts as large as the largest known one
    (as nothing when no size is known). A single tensor over the budget gets a group of its own.
    """
    return _split(names, _tensor_sizes(model, names, feed), budget)


def _split(names: list[str], sizes: dict[str, int | None], budget: int) -> list[list[str]]:
    """Consecutive groups of ``names`` within ``budget`` bytes (unknown sizes count as the largest known)."""
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


def _same_shapes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.shape(a[k])[1:] == np.shape(b[k])[1:] for k in a)


def _takes_batches(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> bool:
    """Whether samples can be concatenated on axis 0: every input's first dimension is one free
    (symbolic or unset) dimension, the same for all inputs, and every sample feeds it as 1."""
    firsts = set()
    for vi in model.graph.input:
        if vi.name not in feed:
            continue
        arr = feed[vi.name]
        if np.ndim(arr) == 0 or np.shape(arr)[0] != 1 or not vi.type.HasField("tensor_type"):
            return False
        dims = vi.type.tensor_type.shape.dim
        if not vi.type.tensor_type.HasField("shape") or not dims or dims[0].dim_value > 0:
            return False
        firsts.add(dims[0].dim_param)
    return len(firsts) == 1


def _cores() -> int:
    """This process's share of the cores: ``ONNXQ_THREADS`` where set (``onnxq batch``), else all."""
    return max(1, int(os.environ.get("ONNXQ_THREADS", "0") or 0) or os.cpu_count() or 1)


def _quiet_session(model_bytes: bytes, providers: list[str]) -> "ort.InferenceSession":
    """Like :func:`onnxq._ort.make_session` (optimisation "all") for a session that runs beside the
    histogram updates: half the cores, and idle threads sleep instead of spinning."""
    from onnxq._ort import ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.intra_op_num_threads = SESSION_THREADS or max(1, _cores() // 2)
    return ort.InferenceSession(model_bytes, sess_options=so, providers=providers)


def _run(sess: "ort.InferenceSession", group: list[str], feed: dict[str, np.ndarray], seen: int) -> list[np.ndarray]:
    try:
        return sess.run(group, feed)
    except Exception as exc:  # noqa: BLE001 - ORT raises many types
        raise CalibrationError(f"calibration run failed on sample {seen}: {exc}") from exc


SELECT_THREADS = 0
"""Threads choosing the ranges from the histograms at the end (numpy-heavy searches that release the
GIL); 0: the cores (``ONNXQ_THREADS`` where set), at most 4."""

SESSION_THREADS = 0
"""Intra-op threads of the session that runs beside the histogram updates; 0: half the cores."""

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """The helper threads that choose the ranges."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, _select_threads()), thread_name_prefix="onnxq-ranges")
        return _pool


def _select_threads() -> int:
    return SELECT_THREADS if SELECT_THREADS > 0 else min(4, _cores())


def _extremes(values: list[np.ndarray]) -> list[tuple[float, float] | None]:
    """``(min, max)`` of each float tensor (NaN when it holds one); None for the others."""
    out: list[tuple[float, float] | None] = []
    for v in values:
        ok = isinstance(v, np.ndarray) and v.size and v.dtype.kind == "f"
        out.append((float(v.min()), float(v.max())) if ok else None)
    return out


_END = object()


def _prefetch(items: Iterator[Any], slots: int = 2) -> Iterator[Any]:
    """Iterate ``items`` in a worker thread, at most ``slots`` items alive (produced and not yet done).

    An item counts as done when the consumer asks for the next one. Exceptions raised by the worker
    are raised here; leaving the loop early stops the worker after its current item.
    """
    free = threading.Semaphore(slots)
    out: queue.Queue = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            while True:
                free.acquire()
                if stop.is_set():
                    return
                item = next(items, _END)
                out.put(item)
                if item is _END:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            out.put((_END, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=work, name="onnxq-calibration", daemon=True)
    worker.start()
    try:
        while True:
            item = out.get()
            if item is _END:
                return
            if isinstance(item, tuple) and len(item) == 2 and item[0] is _END:
                raise item[1]
            yield item
            del item
            free.release()
    finally:
        stop.set()
        free.release()
        worker.join()
