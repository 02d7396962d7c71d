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

Bad samples: every sample's float inputs are screened before they run (:func:`screen_inputs`). Extreme
input values (the rule of :func:`~onnxq.calibration.observers.extreme_threshold`) corrupt every tensor
downstream of them (one 1e6 pixel moves most of SqueezeNet's deep activations by 1e4x), which no
per-tensor rule can undo, so the histogram calibrators leave such samples out; the min-max calibrators
keep them (their literal meaning) and :meth:`CalibrationSession.warnings` says so. NaN/Inf inputs
propagate as NaN/Inf, which every observer counts and leaves out, so those samples stay. The
observers' own counts of non-finite and extreme values, and the min-max ends that one sample alone
set, are reported per tensor with the samples' names (:meth:`CalibrationSource.sample_name`).

The graph-optimisation level is ``all``: ORT's fusions never remove a tensor that is consumed by the
added reductions, so every observed tensor keeps its float meaning, and the session runs the model's
heavy ops with the fast (NCHWc) kernels.

:class:`CalibrationSession` is lazy and caches: ``ranges(graph, names)`` calibrates the first time
it is asked and answers later questions about the same tensors from the cache. The observer model itself
and the grouping of tensors within the memory budget are built by :mod:`onnxq.calibration.observer_model`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq._ort import available_providers, make_session
from onnxq.calibration.batching import concat_feeds, group_samples, takes_batches
from onnxq.calibration.observer_model import build_observer_model, split_groups, tensor_groups, tensor_sizes
from onnxq.calibration.observers import (
    EXTREME_FACTOR,
    HistogramObserver,
    Observer,
    extreme_threshold,
    make_observer,
    needs_tensors,
)
from onnxq.errors import CalibrationError
from onnxq.progress import progress_bar

if TYPE_CHECKING:
    import onnxruntime as ort

    from onnxq.calibration.sources import CalibrationSource
    from onnxq.recipe import CalibrationSpec

__all__ = ["CalibrationSession", "choose_providers", "build_observer_model", "tensor_groups", "EXPOSE_BUDGET_BYTES"]

logger = logging.getLogger(__name__)

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
        self._screened = False  # one full pass over the source has screened every sample
        self._input_issues: list[dict[str, Any]] = []  # the first MAX_LISTED flagged samples' inputs
        self._flagged_samples = 0
        self._left_out = 0
        self._left_out_now = False
        self._tensor_issues: dict[str, dict[str, Any]] = {}

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
    ) -> Iterator[tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], str]]:
        """Feed dicts of up to ``size`` samples concatenated on axis 0, with the samples they hold and
        their name (:meth:`CalibrationSource.sample_name`, a range for several).

        Samples whose shapes differ (text of different lengths) are never concatenated: a batch ends
        early instead. ``first_alone``: the first sample runs alone (histogram grids then start from
        the same sample as with batches of one). Samples whose inputs hold non-finite or extreme values
        are noted (on the first pass) and, for the histogram calibrators, left out.
        """
        size = max(1, self.spec.batch_size if size is None else size)
        named = self._screened_samples()
        for group in group_samples(named, size, feed_of=lambda s: s[0], first_alone=first_alone and size > 1):
            feeds = [f for f, _ in group]
            yield concat_feeds(feeds), feeds, _span([n for _, n in group])
        self._screened = True

    def _screened_samples(self) -> Iterator[tuple[dict[str, np.ndarray], str]]:
        """The source's samples with their names, less those left out for extreme inputs (see :meth:`_batches`)."""
        drop = needs_tensors(self.spec.method)  # histogram calibrators leave samples with extreme inputs out
        for i, feed in enumerate(self.source):
            issues = screen_inputs(feed)
            if issues:
                self._note_sample(self.source.sample_name(i), issues, left_out=drop and any(x["extreme"] for x in issues))
                if self._left_out_now:
                    continue
            yield feed, self.source.sample_name(i)

    def _note_sample(self, name: str, issues: list[dict[str, Any]], *, left_out: bool) -> None:
        """Record a sample whose inputs hold non-finite or extreme values (on the first pass only)."""
        self._left_out_now = left_out
        if self._screened:
            return
        self._flagged_samples += 1
        self._left_out += left_out
        if len(self._input_issues) < MAX_LISTED:
            self._input_issues.extend({"sample": name, "left_out": left_out, **x} for x in issues[:MAX_LISTED])

    def _note_tensors(self, observers: dict[str, Observer]) -> None:
        """Record the tensors whose observers left out or clipped values, or whose min-max range one sample set."""
        for n, obs in observers.items():
            entry: dict[str, Any] = {}
            if obs.nonfinite or obs.extreme:
                entry = {"nonfinite": obs.nonfinite, "extreme": obs.extreme, "samples": list(obs.flagged_in)}
                if obs.extreme:
                    entry["peak"] = obs.peak
            for end, value, other, tag in obs.dominated():
                entry.setdefault("set_by_one_sample", []).append(
                    {"end": "min" if end == "lo" else "max", "value": value, "others_reach": other, "sample": tag})
            if entry:
                self._tensor_issues[n] = {"tensor": n, **entry}

    def data_issues(self) -> dict[str, Any]:
        """What the calibration data held that it should not (for the report): samples whose inputs hold
        non-finite or extreme values (and whether they were left out), tensors with such values, min-max
        ends set by one sample; each list capped at :data:`MAX_LISTED` entries, the counts whole."""
        tensors = sorted(self._tensor_issues.values(), key=_severity, reverse=True)
        return {
            "samples_flagged": self._flagged_samples,
            "samples_left_out": self._left_out,
            "inputs": self._input_issues[:MAX_LISTED],
            "tensors_flagged": len(tensors),
            "tensors": tensors[:MAX_LISTED],
            "extreme_factor": EXTREME_FACTOR,
        }

    def warnings(self) -> list[str]:
        """One line per finding of :meth:`data_issues` (capped), for the command-line summary."""
        return data_warnings(self.data_issues(), self.spec.method)

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
        if seen == 0 and self._left_out:
            first = self._input_issues[0]
            raise CalibrationError(
                f"every calibration sample holds extreme input values (e.g. {first['sample']}: "
                f"{_describe_issue(first)}), so the {self.spec.method} calibrator left them all out; fix the "
                "data, or use --calibrator minmax to calibrate on them as they are"
            )
        if seen == 0:
            raise CalibrationError(f"the calibration source yielded no samples ({self.source.describe()})")
        self._note_tensors(observers)
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
            threads = 0 if spinning else SESSION_THREADS or max(1, _cores() // 2)  # half the cores beside the histograms
            sess = make_session(model.SerializeToString(), providers=self.providers, threads=threads, spinning=spinning)
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
        sizes = tensor_sizes(model, from_graph, first)  # for one sample
        size = self._batch_size(model, first, sum(v or 0 for v in sizes.values()))
        sizes = {n: None if v is None else v * size for n, v in sizes.items()}
        groups = split_groups(from_graph, sizes, EXPOSE_BUDGET_BYTES) if from_graph else [[]]
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
                for feed, count, outs, extremes, tag in _prefetch(self._runs(sess, group, size), slots):
                    for n, value, ext in zip(group, outs, extremes):
                        obs = observers[n]
                        obs.tag = tag
                        if isinstance(obs, HistogramObserver):
                            obs.observe(value, extremes=ext)
                        else:
                            obs.observe(value)
                    del outs
                    for n in graph_inputs:
                        observers[n].tag = tag
                        observers[n].observe(feed[n])
                    del feed
                    seen += count
                    advance(count)
                del sess
        return seen

    def _runs(
        self, sess: "ort.InferenceSession | None", group: list[str], size: int
    ) -> Iterator[tuple[dict[str, np.ndarray], int, list[np.ndarray], list[tuple[float, float] | None], str]]:
        """``(feed, samples, group's tensors, their (min, max), name)`` per batch, on the worker thread (which
        also takes the extremes: reductions release the GIL). A batch the model refuses is re-run
        sample by sample, and so are all later ones (a model whose first dimension is not a free batch)."""
        seen = 0
        split = False
        for feed, parts, tag in self._batches(size, first_alone=True):
            if sess is None:
                yield feed, len(parts), [], [], tag
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
                    yield feed, len(parts), outs, _extremes(outs), tag
                    seen += len(parts)
                    continue
            for part in parts:
                outs = _run(sess, group, part, seen)
                yield part, 1, outs, _extremes(outs), tag
                seen += 1

    def _batch_size(self, model: onnx.ModelProto, first: dict[str, np.ndarray], sample_bytes: int) -> int:
        """Samples per run for histogram observers: the recipe's batch_size when set above 1, else
        :data:`AUTO_BATCH` within :data:`BATCH_BUDGET_BYTES` when the model takes a batch."""
        if self.spec.batch_size > 1:
            return self.spec.batch_size
        if AUTO_BATCH <= 1 or not takes_batches(model, first):
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
            for feed, parts, tag in self._batches():
                count = len(parts)
                try:
                    outs = sess.run(None, feed)
                except Exception as exc:  # noqa: BLE001
                    raise CalibrationError(f"calibration run failed on sample {seen}: {exc}") from exc
                bad: list[str] = []
                for i, n in enumerate(names):
                    lo, hi = float(outs[2 * i]), float(outs[2 * i + 1])
                    observers[n].tag = tag
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
                        observers[n].observe(values[n])  # counts and leaves out the non-finite values
                seen += count
                advance(count)
        return seen


MAX_LISTED = 5
"""Samples and tensors listed by name in the data report (the counts are whole)."""


def screen_inputs(feed: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The float inputs of one sample that hold non-finite or extreme values: for each, its name, the
    counts, and (for extreme values) the largest magnitude and the threshold it exceeded."""
    issues = []
    for name, arr in feed.items():
        if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f" or arr.size == 0:
            continue
        a = arr.reshape(-1)
        lo, hi = float(a.min()), float(a.max())
        nonfinite = 0
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = a[np.isfinite(a)]
            nonfinite = a.size - finite.size
            a = finite.astype(np.float32, copy=False)
            lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        cut = extreme_threshold(a.astype(np.float32, copy=False), max(-lo, hi)) if a.size else None
        extreme = int(np.count_nonzero(np.abs(a) > cut)) if cut is not None else 0
        if nonfinite or extreme:
            issue: dict[str, Any] = {"input": name, "nonfinite": int(nonfinite), "extreme": extreme}
            if extreme:
                issue.update(peak=max(-lo, hi), threshold=cut)
            issues.append(issue)
    return issues


def _describe_issue(issue: dict[str, Any]) -> str:
    """``input 'x' holds 1 extreme value (|x| up to 1e+06, over 64x ...)`` for one screened input."""
    what = []
    if issue.get("nonfinite"):
        what.append(f"{issue['nonfinite']} NaN/Inf value{'s' if issue['nonfinite'] > 1 else ''}")
    if issue.get("extreme"):
        ref = issue["threshold"] / EXTREME_FACTOR
        what.append(f"{issue['extreme']} extreme value{'s' if issue['extreme'] > 1 else ''} (|x| up to "
                    f"{issue['peak']:.3g}, over {EXTREME_FACTOR:g}x its 99.95th-percentile |x| {ref:.3g})")
    return f"input '{issue['input']}' holds " + " and ".join(what)


def data_warnings(issues: dict[str, Any], method: str) -> list[str]:
    """Warning lines for a :meth:`CalibrationSession.data_issues` dict (capped at :data:`MAX_LISTED`)."""
    lines = []
    for issue in issues.get("inputs", []):
        if issue.get("left_out"):
            fate = f"left out of the {method} ranges"
        elif issue.get("extreme"):
            fate = (f"{method} keeps it, so every range downstream of it is stretched (mse-percentile, the default, "
                    "leaves such samples out)")
        else:
            fate = "those values are left out of every range"
        lines.append(f"calibration sample {issue['sample']}: {_describe_issue(issue)}; {fate}")
    more = issues.get("samples_flagged", 0) - len({i["sample"] for i in issues.get("inputs", [])})
    if more > 0:
        lines.append(f"... and {more} more calibration samples with non-finite or extreme input values")
    for t in issues.get("tensors", []):
        where = f" in {', '.join(t.get('samples', []))}" if t.get("samples") else ""
        if t.get("nonfinite"):
            lines.append(f"tensor '{t['tensor']}': {t['nonfinite']} NaN/Inf values{where}, left out of its range")
        if t.get("extreme"):
            lines.append(f"tensor '{t['tensor']}': {t['extreme']} extreme values (|x| up to {t['peak']:.3g}){where}, "
                         "left out of its range")
        for d in t.get("set_by_one_sample", []):
            lines.append(f"tensor '{t['tensor']}': the {method} range {d['end']} {d['value']:.4g} comes from sample "
                         f"{d['sample']} alone (the other samples reach {d['others_reach']:.4g})")
    more = issues.get("tensors_flagged", 0) - len(issues.get("tensors", []))
    if more > 0:
        lines.append(f"... and {more} more tensors like these (counts in the report's calibration.data)")
    return lines


def _severity(entry: dict[str, Any]) -> tuple[int, float]:
    """Order of the tensors in the data report: most values left out first, then the min-max end most
    stretched by one sample (value over the other samples' reach)."""
    stretch = max((abs(d["value"]) / max(abs(d["others_reach"]), 1e-30) for d in entry.get("set_by_one_sample", [])),
                  default=0.0)
    return entry.get("nonfinite", 0) + entry.get("extreme", 0), stretch


def _span(names: list[str]) -> str:
    """One name for the samples of a batch: the name, or ``first .. last``."""
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}" if names else ""


def _cores() -> int:
    """This process's share of the cores: ``ONNXQ_THREADS`` where set (``onnxq batch``), else all."""
    return max(1, int(os.environ.get("ONNXQ_THREADS", "0") or 0) or os.cpu_count() or 1)


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
