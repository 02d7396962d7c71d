"""Automatic mixed precision: move the fewest layers off int8 that it takes to meet an accuracy budget.

``onnxq quantize ... --accuracy-budget agreement=0.99`` (or ``sqnr=30`` dB, ``cosine=0.999``) runs:

1. **Baseline.** The recipe's model is built and measured on the evaluation set against the float
   model's outputs (kept in memory once). Met: nothing else happens.
2. **Ranking** (drop one at a time). Each quantized layer in turn is left in float, everything else
   quantized, and the output error is measured on the first ``rank_samples`` samples. The score is
   output SQNR in dB (a continuous proxy; top-1 agreement on a few dozen samples moves in steps too
   coarse to rank by). The gain over the baseline ranks the layers: the layer whose quantization hurts
   most comes first.
3. **Search.** For each fallback level in order -- int16 activations (the layer's inputs get 16-bit
   Q/DQ, weights stay int8; static QDQ recipes only), then float -- the smallest k such that the k
   top-ranked layers at that level meet the budget is found by doubling and bisection (the metric is
   treated as monotone in k; every accepted configuration is measured, never assumed). The fewest
   layers win; on a tie, int16 (weights stay int8: the smaller model).
4. **Pruning.** Each chosen layer, least sensitive first, is tried back at int8 and, where it was
   moved to float, at int16; a change is kept when the budget still holds. The metric measured without
   each fallback that stays (at the time it was tried) is its effect, which the report lists.

With an agreement budget, a configuration's measurement stops as soon as the disagreements already
seen rule the target out (the report then shows that value as an upper bound): most of the
configurations the search tries fail, and each costs only part of the evaluation set.

Every candidate model is rebuilt from the preprocessed graph with per-node recipe overrides
(``[[override]] name = ... skip = true`` or ``activations = {dtype = "int16"}``), reusing the calibrated
ranges and the weight scales, so a candidate costs one re-quantization plus its forward passes. The
cost is reported in forward passes: ``layers x rank_samples`` for the ranking plus ``eval_samples`` per
measured configuration (a few dozen configurations).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxq.errors import OnnxqError
from onnxq.evaluate import OutputStats, graph_output_pairs, is_classifier_output, iter_batches, samples_in

__all__ = ["AccuracyBudget", "EvalSet", "MixedPrecisionResult", "search_mixed_precision", "LEVELS"]

LEVELS = ("int16", "float")
_METRICS = {"agreement": "top-1 agreement", "sqnr": "output SQNR (dB)", "cosine": "output cosine"}


@dataclass(frozen=True)
class AccuracyBudget:
    """A minimum for one output metric: ``agreement`` (top-1 agreement with the float model, 0..1),
    ``sqnr`` (output SQNR in dB, the lowest over the outputs) or ``cosine`` (mean per-sample cosine)."""

    metric: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> AccuracyBudget:
        m = re.fullmatch(r"\s*(agreement|top1|sqnr|cosine)\s*[=:]\s*([0-9.]+)\s*(%?)\s*", text or "")
        if not m:
            raise OnnxqError(f"--accuracy-budget '{text}' is not understood; use agreement=0.99 (top-1 agreement with "
                             "the float model), sqnr=30 (output SQNR in dB) or cosine=0.999")  # fmt: skip
        metric = "agreement" if m.group(1) == "top1" else m.group(1)
        value = float(m.group(2)) / (100.0 if m.group(3) else 1.0)
        if metric == "agreement" and value > 1.0:
            value /= 100.0  # agreement=99 means 99%
        if metric in ("agreement", "cosine") and not 0.0 < value <= 1.0:
            raise OnnxqError(f"--accuracy-budget {metric} must be in (0, 1], got {m.group(2)}{m.group(3)}")
        return cls(metric, value)

    def met(self, value: float) -> bool:
        return value >= self.threshold - 1e-12

    def describe(self) -> str:
        return f"{_METRICS[self.metric]} >= {self.threshold:g}"


class EvalSet:
    """Evaluation inputs and the float model's outputs on them, computed once and kept for the search.

    Inputs are kept in memory up to ``max_bytes``; beyond that they are read from the source again for
    every measurement (slower, same numbers).
    """

    def __init__(self, float_model: onnx.ModelProto, source: Iterable[dict[str, np.ndarray]], *,
                 max_bytes: int = 1 << 30) -> None:  # fmt: skip
        from onnxq._ort import make_session

        self.source = source
        self.float_model = float_model
        self.output_names = [o.name for o in float_model.graph.output]
        sess = make_session(float_model.SerializeToString(), optimization="all")
        self.batches: list[dict[str, np.ndarray]] | None = []
        self.reference: list[list[np.ndarray]] = []
        self.sizes: list[int] = []
        held = 0
        for feed in iter_batches(source, float_model):
            outs = sess.run(self.output_names, feed)
            self.reference.append(outs)
            self.sizes.append(samples_in(feed, float_model))
            held += sum(v.nbytes for v in feed.values())
            if self.batches is not None:
                self.batches.append(feed)
                if held > max_bytes:
                    self.batches = None
        self.samples = sum(self.sizes)
        if not self.samples:
            raise OnnxqError("the evaluation source gave no samples")
        self.classifier = next((i for i, o in enumerate(self.reference[0]) if is_classifier_output(o)), None)
        self.forward_passes = self.samples
        self.stopped_early = False
        self.degenerate: str | None = None

    def _feeds(self) -> Iterable[dict[str, np.ndarray]]:
        return self.batches if self.batches is not None else iter_batches(self.source, self.float_model)

    def measure(self, model: onnx.ModelProto, metric: str, *, limit: int | None = None, floor: float | None = None) -> float:
        """``metric`` of ``model`` against the float outputs on the first ``limit`` samples (all: None).

        A model whose outputs are degenerate (:attr:`onnxq.evaluate.OutputStats.degenerate`: NaN, all zeros,
        the same for every input) scores the worst value (0, or -inf dB) whatever its metric says, so that
        no budget is met by it; :attr:`degenerate` says why.

        ``floor`` (agreement only): stop as soon as the agreement can no longer reach it, and return the
        highest agreement still possible then (below ``floor``); :attr:`stopped_early` says so. A
        configuration that misses the budget then costs a fraction of the evaluation set.
        """
        self.stopped_early = False
        self.degenerate = None
        from onnxq._ort import make_session

        if metric == "agreement" and self.classifier is None:
            raise OnnxqError("--accuracy-budget agreement needs a classifier output ([batch, classes] scores); "
                             "this model has none: use sqnr=... or cosine=...")  # fmt: skip
        pairs = graph_output_pairs(self.float_model, model)
        sess = make_session(model.SerializeToString(), optimization="all")
        stats = [OutputStats() for _ in pairs]
        seen = 0
        for feed, ref, n in zip(self._feeds(), self.reference, self.sizes):
            if limit is not None and seen >= limit:
                break
            got = sess.run([q for _, q in pairs], feed)
            for st, a, b in zip(stats, ref, got):
                st.update(a, b)
            seen += n
            if floor is not None and metric == "agreement" and self.classifier is not None:  # (not None: checked above)
                top = stats[self.classifier]
                total = min(limit or self.samples, self.samples)
                best_possible = (total - (top.top1_total - top.top1_same)) / total
                if best_possible < floor and seen < total:
                    self.forward_passes += seen
                    self.stopped_early = True
                    return best_possible
        self.forward_passes += seen
        if any(st.degenerate for st in stats):  # NaN, all-zero or input-blind outputs: no budget is met
            self.degenerate = next(f"output '{o}': {st.degenerate}" for (o, _), st in zip(pairs, stats) if st.degenerate)
            return -math.inf if metric == "sqnr" else 0.0
        if metric == "agreement" and self.classifier is not None:  # (not None: checked above)
            return stats[self.classifier].top1_agreement or 0.0
        if metric == "cosine":
            return min(s.cosine for s in stats)
        return min(s.tensor.sqnr_db for s in stats)


@dataclass
class MixedPrecisionResult:
    """What the search decided and what it cost (written to the report as ``mixed_precision``)."""

    target: str
    metric: str
    baseline: float
    final: float
    met: bool
    levels: dict[str, str]  # node name -> "int16" | "float"
    ranking: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    forward_passes: int = 0
    builds: int = 0
    seconds: float = 0.0
    eval_samples: int = 0
    rank_samples: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def search_mixed_precision(
    build: Callable[[dict[str, str]], onnx.ModelProto],
    evalset: EvalSet,
    budget: AccuracyBudget,
    candidates: list[tuple[str, str]],
    *,
    levels: tuple[str, ...] = LEVELS,
    rank_samples: int = 32,
    progress: Callable[[str], None] | None = None,
) -> MixedPrecisionResult:
    """Find per-layer fallbacks that meet ``budget`` (see the module docstring).

    Args:
        build: makes the quantized model for ``{node name: level}`` (absent nodes stay int8).
        evalset: evaluation inputs and float outputs.
        budget: the target.
        candidates: (node name, op type) of every quantized layer, in graph order.
        levels: fallback levels to try, cheapest first.
        rank_samples: samples per ranking measurement.
        progress: called with a short status line as the search goes.
    """
    t0 = time.perf_counter()
    say = progress or (lambda _m: None)
    ops = dict(candidates)
    search = _Search(build, evalset, budget)
    passes_before = evalset.forward_passes
    baseline_model = search.build_model({})
    baseline = evalset.measure(baseline_model, budget.metric)
    search.cache[()] = (baseline, True)
    result = MixedPrecisionResult(budget.describe(), budget.metric, baseline, baseline, budget.met(baseline), {})
    result.eval_samples, result.rank_samples = evalset.samples, min(rank_samples, evalset.samples)
    if evalset.degenerate:
        result.notes.append(f"the int8 model's outputs are degenerate ({evalset.degenerate}): it counts as missing the budget")
    if result.met:
        result.notes.append(f"the int8 model already meets {budget.describe()} ({baseline:.4g}): no fallback")
        return _finish(result, evalset, passes_before, search.builds, t0)
    named = [(n, op) for n, op in candidates if n]
    if len(named) < len(candidates):
        result.notes.append(f"{len(candidates) - len(named)} unnamed layers cannot be moved (no node name to override)")
    if not named:
        raise OnnxqError("no quantized layer has a node name, so none can be moved to a wider precision")

    # 2. ranking: each layer alone in float
    order, base_score, scores = search.rank(baseline_model, named, rank_samples, say)
    result.ranking = [{"node": n, "op_type": ops[n], "metric_if_float": _r(s), "gain": _r(s - base_score)} for s, n in scores]
    # 3. the fewest top-ranked layers per level
    best = search.fewest_fallbacks(order, levels, say)
    if best is None:
        everything = {n: "float" for n in order}
        result.final = search.measure(everything, exact=True)
        result.notes.append(f"{budget.describe()} is not reached even with every quantized layer in float "
                            f"({result.final:.4g}): the remaining error comes from elsewhere (inputs, unquantizable ops)")  # fmt: skip
        result.levels = everything
        return _finish(result, evalset, passes_before, search.builds, t0)
    # 4. pruning: least sensitive first, back to int8, else float -> int16
    rank = {n: i for i, n in enumerate(order)}
    best, without = search.prune(best, rank, levels, say)
    result.levels = best
    result.final = search.measure(best, exact=True)
    result.met = budget.met(result.final)
    for name in sorted(best, key=lambda n: rank[n]):
        # measured when pruning tried this layer: the more sensitive layers pruned after it were still in
        w, bound = without[name]
        result.fallbacks.append({"node": name, "op_type": ops[name], "level": best[name], "metric_without": _r(w),
                                 "metric_without_is_bound": bound, "effect": _r(result.final - w),
                                 "gain_if_float": result.ranking[rank[name]]["gain"]})  # fmt: skip
    return _finish(result, evalset, passes_before, search.builds, t0)


class _Search:
    """The search's measurements: builds the model for a fallback configuration, measures the budget metric
    on it, and remembers every measured configuration (and how many models were built)."""

    def __init__(self, build: Callable[[dict[str, str]], onnx.ModelProto], evalset: EvalSet, budget: AccuracyBudget) -> None:
        self.build, self.evalset, self.budget = build, evalset, budget
        self.builds = 0
        self.cache: dict[tuple[tuple[str, str], ...], tuple[float, bool]] = {}  # config -> (value, exact)

    def build_model(self, cfg: dict[str, str]) -> onnx.ModelProto:
        """The quantized model with the fallbacks ``cfg`` (counted)."""
        self.builds += 1
        return self.build(cfg)

    def measure(self, cfg: dict[str, str], *, exact: bool = False) -> float:
        """The budget metric of ``cfg``; unless ``exact``, a failing agreement may stop early (a bound)."""
        key = tuple(sorted(cfg.items()))
        if key not in self.cache or (exact and not self.cache[key][1]):
            floor = None if exact else self.budget.threshold
            value = self.evalset.measure(self.build_model(cfg), self.budget.metric, floor=floor)
            self.cache[key] = (value, not self.evalset.stopped_early)
        return self.cache[key][0]

    def rank(
        self, baseline_model: onnx.ModelProto, named: list[tuple[str, str]], rank_samples: int, say: Callable[[str], None]
    ) -> tuple[list[str], float, list[tuple[float, str]]]:
        """Each layer alone in float, on ``rank_samples`` samples: (layer names, most helpful first; the
        int8 model's SQNR; (SQNR, name) per layer in that order)."""
        base_score = self.evalset.measure(baseline_model, "sqnr", limit=rank_samples)
        scores: list[tuple[float, str]] = []
        for i, (name, _op) in enumerate(named):
            say(f"ranking layers {i + 1}/{len(named)}")
            s = self.evalset.measure(self.build_model({name: "float"}), "sqnr", limit=rank_samples)
            scores.append((s, name))
        scores.sort(key=lambda x: (-x[0], x[1]))
        return [n for _s, n in scores], base_score, scores

    def fewest_fallbacks(self, order: list[str], levels: tuple[str, ...], say: Callable[[str], None]) -> dict[str, str] | None:
        """The fewest top-ranked layers that meet the budget at one level, over all levels; None if none does."""
        best: dict[str, str] | None = None
        for level in levels:
            k = _smallest_k(lambda k: self.budget.met(self.measure({n: level for n in order[:k]})), len(order), say, level)
            if k is not None and (best is None or k < len(best)):
                best = {n: level for n in order[:k]}
        return best

    def prune(
        self, best: dict[str, str], rank: dict[str, int], levels: tuple[str, ...], say: Callable[[str], None]
    ) -> tuple[dict[str, str], dict[str, tuple[float, bool]]]:
        """Least sensitive first, each fallback back to int8, else float -> int16, while the budget holds.

        Returns the pruned fallbacks and, per layer tried, the budget metric without its fallback (given the
        others at that moment: its measured effect) and whether that value is only a bound.
        """
        without: dict[str, tuple[float, bool]] = {}
        for name in sorted(best, key=lambda n: -rank[n]):
            say(f"pruning: {name} back to int8?")
            trial = {k: v for k, v in best.items() if k != name}
            without[name] = (self.measure(trial), not self.cache[tuple(sorted(trial.items()))][1])
            if self.budget.met(without[name][0]):
                best = trial
            elif best[name] == "float" and "int16" in levels:
                trial = {**best, name: "int16"}
                if self.budget.met(self.measure(trial)):
                    best = trial
        return best, without


def _smallest_k(ok: Callable[[int], bool], n: int, say: Callable[[str], None], level: str) -> int | None:
    """Smallest k in 1..n with ok(k), by doubling then bisection (None when ok(n) is false)."""
    lo, k = 0, 1
    while True:
        say(f"trying the top {k} layers at {level}")
        if ok(k):
            break
        if k >= n:
            return None
        lo, k = k, min(2 * k, n)
    hi = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        say(f"trying the top {mid} layers at {level}")
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _r(x: float) -> float | None:
    return None if not math.isfinite(x) else round(float(x), 5)


def _finish(result: MixedPrecisionResult, evalset: EvalSet, passes_before: int, builds: int, t0: float) -> MixedPrecisionResult:
    result.baseline, result.final = _r(result.baseline), _r(result.final)  # type: ignore[assignment]
    result.forward_passes = evalset.forward_passes - passes_before + evalset.samples
    result.builds = builds
    result.seconds = round(time.perf_counter() - t0, 2)
    return result
