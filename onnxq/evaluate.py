"""Float-vs-quantized comparison: per-tensor SQNR, output metrics, size and latency (``onnxq compare``).

Both models run on the same inputs; matching tensors are exposed as extra outputs and compared as they
stream by, so memory holds one batch of activations plus a few numbers (and a small histogram) per
tensor, whatever the number of samples.

Matching (:func:`match_tensors`), in order:

1. **Q/DQ structure and names** (QDQ models, MatMulNBits and dynamic models, which keep the float
   model's tensor names): every tensor that feeds a ``QuantizeLinear`` and every output of a node that
   reads a dequantized tensor is compared with the float tensor of the same name. Where the quantized
   model has ``X -> QuantizeLinear -> DequantizeLinear``, the dequantized copy is what the next layer
   sees, so that is what is compared.
2. **QOperator structure** (``QLinearConv``, ``QLinearMatMul``, ``QGemm``, ``QLinearAdd``, ...: tensors
   renamed ``<x>_quantized`` or numbered by another exporter): an integer output is dequantized on the
   host with the node's own output scale and zero point. Its float counterpart is found by name
   (``<x>_quantized`` -> ``<x>``) or, when names differ, by aligning the weight-bearing nodes of both
   graphs in topological order with equal weight shapes (a fused ReLU/Clip and a separate bias
   ``QLinearAdd`` are followed so that like is compared with like).

Graph outputs are always compared (by name, else in order). Tensors that cannot be matched are
listed in :attr:`Comparison.unmatched` rather than guessed.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.calibration.batching import concat_feeds, group_samples, takes_batches
from onnxq.calibration.observers import HistogramObserver
from onnxq.errors import OnnxqError
from onnxq.tensor_matching import TensorMatch, match_tensors
from onnxq.text import printable

__all__ = ["TensorMatch", "TensorStats", "OutputStats", "Comparison", "match_tensors", "compare_models", "check_comparable",
           "measure_latency", "model_bytes", "iter_batches", "samples_in"]  # fmt: skip

_HIST_BINS = 256
CONSTANT_OK_SQNR_DB = 30.0
"""An output that ignores its input is still fine when it matches the float output to this SQNR (dB)."""


class _Histogram(HistogramObserver):
    """A streaming histogram kept for the report (no range selection; every value counted where it lies)."""

    screen = False

    def _select(self) -> tuple[float, float]:
        return self.lo, self.hi


@dataclass
class TensorStats:
    """Running sums for one matched tensor (float64), and a histogram of the float values."""

    signal: float = 0.0  # sum x^2
    noise: float = 0.0  # sum (x - xq)^2
    dot: float = 0.0
    quant_sq: float = 0.0
    max_abs_err: float = 0.0
    count: int = 0
    hist: Any = None  # onnxq.calibration.observers.HistogramObserver
    broken: int = 0  # elements that are NaN/Inf in the quantized tensor but finite in the float one

    def update(self, ref: np.ndarray, got: np.ndarray, *, histogram: bool = False) -> None:
        r = np.ascontiguousarray(ref, np.float32).reshape(-1)
        g = np.ascontiguousarray(got, np.float32).reshape(-1)
        d = r - g
        sums = (float(np.dot(r, r)), float(np.dot(d, d)), float(np.dot(r, g)), float(np.dot(g, g)))
        if not all(math.isfinite(v) for v in sums):  # NaN/Inf somewhere: drop those elements, count the broken ones
            fr, fg = np.isfinite(r), np.isfinite(g)
            self.broken += int(np.count_nonzero(fr & ~fg))
            ok = fr & fg
            r, g = r[ok], g[ok]
            d = r - g
            sums = (float(np.dot(r, r)), float(np.dot(d, d)), float(np.dot(r, g)), float(np.dot(g, g)))
        self.signal += sums[0]
        self.noise += sums[1]
        self.dot += sums[2]
        self.quant_sq += sums[3]
        if d.size:
            self.max_abs_err = max(self.max_abs_err, float(d.max()), -float(d.min()))
        self.count += int(r.size)
        if histogram:
            if self.hist is None:
                self.hist = _Histogram(bins=_HIST_BINS)
            self.hist.observe(r)

    @property
    def sqnr_db(self) -> float:
        """10 log10(signal / noise); +inf when the tensors are equal, -inf for a zero signal with noise and
        for NaN/Inf where the float tensor is finite (no error is worse)."""
        if self.broken:
            return -math.inf
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        """Cosine of the whole tensors: 1 for equal ones (both zero included), 0 where one is zero and the
        other not, or where the quantized one holds NaN/Inf where the float one is finite."""
        if self.broken:
            return 0.0
        den = math.sqrt(self.signal * self.quant_sq)
        return self.dot / den if den > 0 else (1.0 if self.noise == 0.0 else 0.0)


@dataclass
class OutputStats:
    """One graph output: tensor sums plus the mean per-sample cosine and top-1 agreement, and what it takes
    to tell a degenerate quantized output (:attr:`degenerate`): the first sample's rows, whether later
    samples differ from them, and how many rows are flat (every element equal)."""

    tensor: TensorStats = field(default_factory=TensorStats)
    cosine_sum: float = 0.0
    samples: int = 0
    top1_same: int = 0
    top1_total: int = 0
    first: tuple[bytes, bytes] | None = None  # digests of the first sample's (float, quantized) rows
    ref_varies: bool = False  # the float output differs between samples
    got_varies: bool = False
    ref_flat: int = 0  # rows whose elements are all equal
    got_flat: int = 0

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        self.tensor.update(ref, got)
        n = ref.shape[0] if ref.ndim >= 1 else 1
        r, g = ref.reshape(n, -1), got.reshape(n, -1)
        self._track_variation(r, g)
        self.cosine_sum += float(row_cosines(r, g).sum())
        self.samples += n
        if is_classifier_output(ref):
            self.top1_same += int((r.argmax(1) == g.argmax(1)).sum())
            self.top1_total += n

    def _track_variation(self, r: np.ndarray, g: np.ndarray) -> None:
        """Whether the outputs change from sample to sample, and how many rows are flat."""
        if self.first is None:
            self.first = (_digest(r[0]), _digest(g[0]))
        fr, fg = self.first
        self.ref_varies = self.ref_varies or any(_digest(row) != fr for row in r)
        self.got_varies = self.got_varies or any(_digest(row) != fg for row in g)
        if r.shape[1] > 1:
            self.ref_flat += int(np.count_nonzero(np.ptp(r, axis=1) == 0))
            self.got_flat += int(np.count_nonzero(np.ptp(g, axis=1) == 0))

    @property
    def degenerate(self) -> str | None:
        """Why the quantized output is broken whatever its metrics say, or None: NaN/Inf where the float
        output is finite, all zeros where it is not, the same output for every sample where the float one
        varies (the model ignores its input), or every row flat where the float rows are not. The last two
        only below :data:`CONSTANT_OK_SQNR_DB`: a constant that close to the float output is no damage."""
        t = self.tensor
        if t.broken:
            return f"{t.broken} NaN/Inf values where the float output is finite"
        if t.quant_sq == 0.0 and t.signal > 0.0:
            return "all zeros where the float output is not"
        if t.sqnr_db >= CONSTANT_OK_SQNR_DB:  # a float output that barely varies (a saturated probability)
            return None
        if self.samples > 1 and self.ref_varies and not self.got_varies:
            return "the same output for every sample where the float output varies"
        if self.samples and self.got_flat == self.samples and self.ref_flat < self.samples:
            return "every element of each sample equal where the float output varies"
        return None

    @property
    def cosine(self) -> float:
        return self.cosine_sum / max(self.samples, 1)

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_same / self.top1_total if self.top1_total else None


def _digest(row: np.ndarray) -> bytes:
    """A fingerprint of one output row (its exact bytes): equal rows, equal digests; no copy kept (an LLM's
    logits row is hundreds of MB)."""
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest()


def row_cosines(r: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Cosine of each row pair: 1 where both rows are zero (identical), 0 where only one is, or where the
    quantized row holds NaN/Inf while the float one is finite (never the 1.0 that hides a dead output)."""
    num = np.einsum("ij,ij->i", r, g)
    nr, ng = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
    den = nr * ng
    with np.errstate(invalid="ignore"):
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where((nr == 0) & (ng == 0), 1.0, 0.0))
    broken = ~np.isfinite(cos) & np.isfinite(nr)
    return np.where(broken, 0.0, cos)


def is_classifier_output(x: np.ndarray) -> bool:
    """[batch, classes] (or [batch, classes, 1, 1]) scores: top-1 agreement is meaningful."""
    s = np.shape(x)
    return len(s) >= 2 and s[1] >= 2 and all(d == 1 for d in s[2:]) and np.issubdtype(np.asarray(x).dtype, np.floating)


@dataclass
class Comparison:
    """What ``onnxq compare`` reports."""

    samples: int
    outputs: dict[str, dict[str, float | str | None]]  # per output: sqnr_db, cosine, ..., degenerate (a reason)
    top1_agreement: float | None
    tensors: list[dict[str, Any]]  # worst SQNR first
    unmatched: list[str]
    models: dict[str, dict[str, Any]]
    forward_passes: int
    histograms: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))


def _finite(obj: Any) -> Any:
    """JSON has no infinities: +inf SQNR (identical tensors) becomes None, with the rest unchanged."""
    if isinstance(obj, float):
        return None if math.isinf(obj) or math.isnan(obj) else round(obj, 6)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# -- matching -----------------------------------------------------------------------------------------


def graph_output_pairs(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(float output, quantized output) pairs: by name, else in order."""
    fouts = [o.name for o in float_model.graph.output]
    qouts = [o.name for o in quant_model.graph.output]
    return [(o, o) for o in fouts] if set(fouts) <= set(qouts) else list(zip(fouts, qouts))


def _io_spec(vi: onnx.ValueInfoProto) -> tuple[str, int | None]:
    """(dtype name, rank or None when the shape is unknown) of a graph input or output."""
    t = vi.type.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "unknown"
    except (KeyError, TypeError, ValueError):
        dtype = f"type {t.elem_type}"
    if t.elem_type == onnx.TensorProto.STRING:
        dtype = "string"
    return dtype, len(t.shape.dim) if t.HasField("shape") else None


def _real_inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (IR < 4 models list their weights as inputs too)."""
    inits = {t.name for t in model.graph.initializer}
    return {i.name: i for i in model.graph.input if i.name not in inits}


def check_comparable(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
    """OnnxqError, naming the first mismatch, unless the quantized model can be compared with the float one.

    Both are fed the same samples, so the quantized model must take the float model's inputs (same names,
    dtypes and ranks); its outputs must match the float outputs by name, or be as many (paired in order,
    with equal ranks). Two unrelated models are refused here rather than failing inside ONNX Runtime.
    """
    fin, qin = _real_inputs(float_model), _real_inputs(quant_model)
    fix = "compare needs a quantized model made from this float model"
    if set(fin) != set(qin):
        raise OnnxqError(printable(f"the models take different inputs (float: {', '.join(fin) or 'none'}; quantized: "
                                   f"{', '.join(qin) or 'none'}): {fix}"))
    for name, vi in fin.items():
        (fd, fr), (qd, qr) = _io_spec(vi), _io_spec(qin[name])
        if fd != qd or (fr is not None and qr is not None and fr != qr):
            raise OnnxqError(printable(f"input {name!r} is {fd} of rank {fr} in the float model but {qd} of rank {qr} "
                                       f"in the quantized one: {fix}"))
    fouts = {o.name: o for o in float_model.graph.output}
    qouts = {o.name: o for o in quant_model.graph.output}
    if not set(fouts) <= set(qouts) and len(fouts) != len(qouts):
        raise OnnxqError(printable(f"the models have different outputs (float: {', '.join(fouts) or 'none'}; "
                                   f"quantized: {', '.join(qouts) or 'none'}): {fix}"))
    for f, q in graph_output_pairs(float_model, quant_model):
        fr, qr = _io_spec(fouts[f])[1], _io_spec(qouts[q])[1]
        if fr is not None and qr is not None and fr != qr:
            raise OnnxqError(printable(f"output {f!r} of the float model has rank {fr} but its counterpart {q!r} in "
                                       f"the quantized model has rank {qr}: {fix}"))


# -- running --------------------------------------------------------------------------------------------


def iter_batches(source: Iterable[dict[str, np.ndarray]], model: onnx.ModelProto, *, max_batch: int = 16) -> Iterator[dict[str, np.ndarray]]:
    """Samples concatenated on axis 0 when the model takes batches (else one by one)."""
    it = iter(source)
    first = next(it, None)
    if first is None:
        return
    samples = itertools.chain([first], it)
    if not takes_batches(model, first):
        yield from samples
        return
    for group in group_samples(samples, max_batch):
        yield concat_feeds(group)


def _dequantize(arr: np.ndarray, scale: np.ndarray, zp: np.ndarray | None) -> np.ndarray:
    z = np.zeros_like(scale, np.int32) if zp is None else zp.astype(np.int32)
    return (arr.astype(np.int32) - z).astype(np.float32) * scale.astype(np.float32)


def model_bytes(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> int:
    """File size plus external data when a path is known, else the serialized size."""
    if path is not None:
        p = Path(path)
        files = {e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"}
        return p.stat().st_size + sum((p.parent / f).stat().st_size for f in files if (p.parent / f).exists())
    return model.ByteSize()


def measure_latency(model: onnx.ModelProto, feed: dict[str, np.ndarray], *, budget_s: float = 1.0, max_runs: int = 50) -> float:
    """Median milliseconds of one run on ORT's CPU provider (all graph optimisations, as deployed)."""
    from onnxq._ort import make_session

    sess = make_session(model.SerializeToString(), optimization="all")
    for _ in range(3):
        sess.run(None, feed)
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < 5 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def compare_models(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    source: Iterable[dict[str, np.ndarray]],
    *,
    float_path: str | os.PathLike | None = None,
    quant_path: str | os.PathLike | None = None,
    tensors: bool = True,
    latency: bool = True,
    histograms: int = 10,
    progress: bool = False,
) -> Comparison:
    """Run both models on every sample of ``source`` and compare them (see the module docstring).

    ``histograms``: keep the float-value histograms of this many worst tensors (for the report).
    Cost: one forward pass of each model per sample (batched where the model allows), plus the latency runs.
    """
    from onnxq._ort import make_session
    from onnxq.calibration.runner import build_observer_model

    _check_in_memory_size(float_model, quant_model)
    check_comparable(float_model, quant_model)
    matches, unmatched = match_tensors(float_model, quant_model) if tensors else ([], [])
    pairs = graph_output_pairs(float_model, quant_model)
    fnames = [f for f, _ in pairs] + [m.float_name for m in matches]
    qnames = [q for _, q in pairs] + [m.quant_name for m in matches]
    # graph outputs come first in fnames/qnames, so the observer model keeps them as well
    fsess = make_session(build_observer_model(float_model, list(dict.fromkeys(fnames)), reduce=False).SerializeToString(), optimization="basic")
    qsess = make_session(build_observer_model(quant_model, list(dict.fromkeys(qnames)), reduce=False).SerializeToString(), optimization="basic")
    dq = _output_qparams(quant_model, matches)
    out_stats = {f: OutputStats() for f, _ in pairs}
    t_stats = {m.float_name: TensorStats() for m in matches}
    samples, first = 0, None
    bar = _progress(progress)
    task = bar.add_task("comparing", total=None) if bar else None
    try:
        for feed in _sized_batches(source, float_model, fsess, fnames, qsess, qnames):
            first = first or {k: v[:1] for k, v in feed.items()}
            try:
                fvals = fsess.run(fnames, feed)
                qvals = qsess.run(qnames, feed)
            except Exception as exc:  # noqa: BLE001 - ORT raises many types
                raise OnnxqError(f"running the models on sample {samples} failed: {exc}") from exc
            _update_output_stats(out_stats, pairs, fvals, qvals)
            _update_tensor_stats(t_stats, matches, fvals[len(pairs):], qvals[len(pairs):], dq, histograms > 0)
            samples += samples_in(feed, float_model)
            if bar:
                bar.update(task, completed=samples)
    finally:
        if bar:
            bar.stop()
    if samples == 0:
        raise OnnxqError("the comparison source gave no samples")
    rows = _tensor_rows(matches, t_stats)
    hists = _worst_histograms(rows, t_stats, histograms)
    outputs = {f: {"sqnr_db": s.tensor.sqnr_db, "cosine": s.cosine, "max_abs_err": s.tensor.max_abs_err,
                   "top1_agreement": s.top1_agreement, "degenerate": s.degenerate} for f, s in out_stats.items()}  # fmt: skip
    top1 = next((s.top1_agreement for s in out_stats.values() if s.top1_agreement is not None), None)
    models: dict[str, dict[str, Any]] = {"float": {"bytes": model_bytes(float_model, float_path)},
                                         "quant": {"bytes": model_bytes(quant_model, quant_path)}}  # fmt: skip
    if latency and first is not None:
        models["float"]["latency_ms"] = measure_latency(float_model, first)
        models["quant"]["latency_ms"] = measure_latency(quant_model, first)
    return Comparison(samples, outputs, top1, rows, unmatched, models, forward_passes=2 * samples, histograms=hists)


def _check_in_memory_size(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
    """Refuse models over protobuf's 2 GB limit: compare serializes them to build its sessions."""
    for what, m in (("float", float_model), ("quantized", quant_model)):
        if m.ByteSize() > 1_900_000_000:
            raise OnnxqError(f"the {what} model is over 2 GB in memory; compare runs models from memory and cannot "
                             "take it yet: compare a smaller export (fewer layers) or measure with benchmarks/perplexity.py")  # fmt: skip


def _output_qparams(quant_model: onnx.ModelProto, matches: list[TensorMatch]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """(scale, zero point) by quantized tensor name, for matches whose quantized side is an integer tensor."""
    qinit = {i.name: i for i in quant_model.graph.initializer}
    dq: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for m in matches:
        if m.scale is not None:
            dq[m.quant_name] = (numpy_helper.to_array(qinit[m.scale]),
                                numpy_helper.to_array(qinit[m.zero_point]) if m.zero_point in qinit else None)  # fmt: skip
    return dq


def _update_output_stats(
    out_stats: dict[str, OutputStats], pairs: list[tuple[str, str]], fvals: list[np.ndarray], qvals: list[np.ndarray]
) -> None:
    """Add one batch of graph outputs (the first ``len(pairs)`` values) to their statistics."""
    for (f, q), a, b in zip(pairs, fvals, qvals):
        if a.shape != b.shape:
            raise OnnxqError(printable(f"output {f!r} has shape {list(a.shape)} in the float model but "
                                       f"{list(b.shape)} ({q!r}) in the quantized one: compare needs a "
                                       "quantized model made from this float model"))
        out_stats[f].update(a, b)


def _update_tensor_stats(
    t_stats: dict[str, TensorStats],
    matches: list[TensorMatch],
    fvals: list[np.ndarray],
    qvals: list[np.ndarray],
    dq: dict[str, tuple[np.ndarray, np.ndarray | None]],
    histogram: bool,
) -> None:
    """Add one batch of matched inner tensors to their statistics (integer tensors dequantized first;
    pairs that are not both float of one shape are skipped)."""
    for m, a, b in zip(matches, fvals, qvals):
        if not np.issubdtype(a.dtype, np.floating):
            continue
        if m.quant_name in dq:
            b = _dequantize(b, *dq[m.quant_name])
        elif not np.issubdtype(b.dtype, np.floating) or a.shape != b.shape:
            continue
        t_stats[m.float_name].update(a, b, histogram=histogram)


def _tensor_rows(matches: list[TensorMatch], t_stats: dict[str, TensorStats]) -> list[dict[str, Any]]:
    """One row per matched tensor that was measured, worst SQNR first."""
    rows: list[dict[str, Any]] = []
    for m in matches:
        st = t_stats[m.float_name]
        if st.count:
            rows.append({"float_name": m.float_name, "quant_name": m.quant_name, "node": m.node, "op_type": m.op_type,
                         "sqnr_db": st.sqnr_db, "cosine": st.cosine, "max_abs_err": st.max_abs_err})  # fmt: skip
    rows.sort(key=lambda r: r["sqnr_db"])
    return rows


def _worst_histograms(rows: list[dict[str, Any]], t_stats: dict[str, TensorStats], histograms: int) -> list[dict[str, Any]]:
    """The float-value histograms of the ``histograms`` worst tensors (for the HTML report)."""
    hists = []
    for r in rows[:histograms]:
        h = t_stats[r["float_name"]].hist
        if h is not None and h.width > 0:
            hists.append({"tensor": r["float_name"], "edges": h.edges.tolist(), "counts": h.hist.tolist(),
                          "sqnr_db": r["sqnr_db"], "data_range": [h.lo, h.hi]})  # fmt: skip
    return hists


def _sized_batches(source: Iterable[dict[str, np.ndarray]], model: onnx.ModelProto, fsess: Any, fnames: list[str],
                   qsess: Any, qnames: list[str], budget: int = 256 << 20) -> Iterator[dict[str, np.ndarray]]:  # fmt: skip
    """The first sample alone, then batches small enough that the exposed tensors of both models stay
    under ``budget`` bytes (every matched activation of a batch is held at once)."""
    it = iter(source)
    first = next(it, None)
    if first is None:
        return
    per_sample = sum(a.nbytes for a in fsess.run(fnames, first)) + sum(a.nbytes for a in qsess.run(qnames, first))
    yield first
    yield from iter_batches(it, model, max_batch=int(min(16, max(1, budget // max(per_sample, 1)))))


def samples_in(feed: dict[str, np.ndarray], model: onnx.ModelProto) -> int:
    """How many samples one feed of :func:`iter_batches` holds."""
    first = next(iter(feed.values()))
    return int(first.shape[0]) if np.ndim(first) and takes_batches(model, {k: v[:1] for k, v in feed.items()}) else 1


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    bar = Progress(SpinnerColumn(), TextColumn("{task.description}: {task.completed} samples"), TimeElapsedColumn(),
                   transient=True)  # fmt: skip
    bar.start()
    return bar
