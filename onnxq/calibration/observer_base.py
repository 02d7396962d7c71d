"""The observer protocol (:class:`Observer`, the registry, extreme-value screening) and the min-max observers.

:class:`Observer` is what every calibrator implements (``observe`` / ``observe_minmax`` /
``compute_range``, with the non-finite, extreme and one-batch-dominance bookkeeping they share);
:func:`register_observer` makes a subclass available by name in :data:`OBSERVERS`;
:func:`extreme_threshold` is the rule that decides which values of a batch are extreme. The two
observers that need only each batch's min and max (``minmax``, ``ema-minmax``) are here too, so that
they register first whatever is imported first; the histogram family is in
:mod:`onnxq.calibration.histogram`. Import observers from :mod:`onnxq.calibration.observers`, the public
face of all of them.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, ClassVar

import numpy as np

from onnxq.errors import CalibrationError

__all__ = [
    "DOMINANCE_FACTOR",
    "EMAMinMaxObserver",
    "EXTREME_FACTOR",
    "EXTREME_MIN_RANK",
    "EXTREME_MIN_VALUES",
    "EXTREME_RANK",
    "MAX_TAGS",
    "MinMaxObserver",
    "OBSERVERS",
    "Observer",
    "extreme_threshold",
    "finite_minmax",
    "register_observer",
]

OBSERVERS: dict[str, type[Observer]] = {}


def register_observer(name: str) -> Callable[[type[Observer]], type[Observer]]:
    """Class decorator: make an observer available under ``name`` (``--calibrator NAME``)."""

    def deco(cls: type[Observer]) -> type[Observer]:
        cls.name = name
        OBSERVERS[name] = cls
        return cls

    return deco



def finite_minmax(x: np.ndarray) -> tuple[float, float] | None:
    """Min and max of the finite values of ``x``; None when it holds none."""
    a = np.asarray(x)
    if a.size == 0:
        return None
    lo, hi = float(np.min(a)), float(np.max(a))
    if math.isfinite(lo) and math.isfinite(hi):
        return lo, hi
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return None
    return float(finite.min()), float(finite.max())


EXTREME_FACTOR = 64.0
"""A value is extreme when its magnitude exceeds this many times its batch's reference magnitude (see
:func:`extreme_threshold`). Clean CNN activations stay within 6.4x of it (MobileNetV2; SqueezeNet 2.3x,
over 10 ImageNet images, every tensor); a 1e4 pixel in a normalised image is about 4000x."""

EXTREME_RANK = 5e-4
"""The reference magnitude is the ``k``-th largest, ``k = ceil(EXTREME_RANK * n)`` (at least
:data:`EXTREME_MIN_RANK`): a handful of values cannot move it, while a transformer's genuine outlier
channels (0.1% of the elements and more) hold it, so they are never extreme."""

EXTREME_MIN_RANK = 8
EXTREME_MIN_VALUES = 1024
"""Batches of fewer finite values are never screened (too few to call any of them extreme)."""

MAX_TAGS = 3
"""Batches an observer names as holding non-finite or extreme values (the first ones; the counts are whole)."""

DOMINANCE_FACTOR = 16.0
"""Min-max observers: an end of the range is "set by one batch" when it exceeds every other batch's by this
factor (in magnitude), over at least 3 batches."""


def extreme_threshold(a: np.ndarray, peak: float | None = None) -> float | None:
    """The magnitude above which values of ``a`` (finite, flat) are extreme; None when none is.

    Rule: ``EXTREME_FACTOR`` times the ``k``-th largest magnitude, ``k = max(EXTREME_MIN_RANK,
    ceil(EXTREME_RANK * a.size))``; None for batches under ``EXTREME_MIN_VALUES`` values and where fewer
    than ``k`` values are non-zero (a sparse ReLU output: too few values to tell). ``peak``: the largest
    magnitude, when known. Cheap in the common case: a strided subsample or one counting pass usually
    proves that ``k`` values lie within a factor of the peak (nothing is extreme) without a partition.
    """
    n = a.size
    if n < EXTREME_MIN_VALUES:
        return None
    k = max(EXTREME_MIN_RANK, math.ceil(EXTREME_RANK * n))
    peak = float(np.max(np.abs(a))) if peak is None else peak
    if peak == 0.0:
        return None
    floor = peak / EXTREME_FACTOR  # k values at or above this: the peak is not extreme
    sub = a[:: max(1, n // 16384)]
    if np.count_nonzero((sub >= floor) | (sub <= -floor)) >= k:
        return None
    mags = np.abs(a)
    if np.count_nonzero(mags >= floor) >= k:
        return None
    ref = float(np.partition(mags, n - k)[n - k])
    return EXTREME_FACTOR * ref if ref > 0.0 else None


class Observer(abc.ABC):
    """Accumulates the statistics of one tensor across calibration batches.

    Also counts what it left out: ``nonfinite`` (NaN, +-Inf) and, for histogram observers, ``extreme``
    values (see :func:`extreme_threshold`); ``peak`` is the largest magnitude among those.
    """

    name: ClassVar[str] = "observer"
    needs_tensors: ClassVar[bool] = False
    """True when :meth:`observe_minmax` cannot be used (the observer needs the values themselves)."""

    def __init__(self) -> None:
        self.batches = 0
        self.nonfinite = 0
        self.extreme = 0
        self.peak = 0.0
        self.tag = ""
        """What the batch being observed is called (the runner sets its sample's name); see ``flagged_in``."""
        self.flagged_in: list[str] = []
        """Tags of the first few batches with non-finite or extreme values (at most :data:`MAX_TAGS`)."""
        # min-max observers: per end, its value, the most extreme end of the other batches, and the tag of
        # the batch that set it
        self._ends: dict[str, list[Any]] = {"lo": [math.inf, math.inf, ""], "hi": [-math.inf, -math.inf, ""]}

    def _flag(self) -> None:
        """Name the current batch among those with non-finite or extreme values (the first few)."""
        if (not self.flagged_in or self.flagged_in[-1] != self.tag) and len(self.flagged_in) < MAX_TAGS:
            self.flagged_in.append(self.tag)

    def observe(self, x: np.ndarray) -> None:
        """Add one batch of the tensor's values (its non-finite values are counted and left out)."""
        a = np.asarray(x)
        if a.size == 0:
            return
        lo, hi = float(np.min(a)), float(np.max(a))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = a[np.isfinite(a)]
            self._flag()
            self.nonfinite += a.size - finite.size
            if finite.size == 0:
                return
            lo, hi = float(finite.min()), float(finite.max())
        self.observe_minmax(lo, hi)

    def _track_ends(self, lo: float, hi: float) -> None:
        """Remember which batch set each end of the range and the next most extreme batch end."""
        for key, v, sign in (("lo", lo, -1.0), ("hi", hi, 1.0)):
            best, second, _ = self._ends[key]
            if sign * v > sign * best:
                self._ends[key] = [v, best, self.tag]
            elif sign * v > sign * second:
                self._ends[key][1] = v

    def dominated(self) -> list[tuple[str, float, float, str]]:
        """The ends of the range that one batch alone stretched: ``(end, value, others' most extreme end,
        tag of that batch)``, where the value's magnitude exceeds :data:`DOMINANCE_FACTOR` times that of
        every other batch's end (3 batches at least). Only the min-max observers track ends."""
        out: list[tuple[str, float, float, str]] = []
        if self.batches < 3:
            return out
        for key in ("lo", "hi"):
            v, other, tag = self._ends[key]
            if (v < 0 if key == "lo" else v > 0) and abs(v) > DOMINANCE_FACTOR * max(abs(other), 1e-30):
                out.append((key, float(v), float(other), str(tag)))
        return out

    @abc.abstractmethod
    def observe_minmax(self, lo: float, hi: float) -> None:
        """Add one batch given only its (finite) min and max."""

    @abc.abstractmethod
    def _range(self) -> tuple[float, float]: ...

    def compute_range(self) -> tuple[float, float]:
        """The calibrated ``(rmin, rmax)``; an error if no finite value was ever observed."""
        if self.batches == 0:
            raise CalibrationError(
                f"{self.name} observer has seen no finite values (the tensor was never produced, or it "
                "was all NaN/Inf on every calibration sample)"
            )
        return self._range()


@register_observer("minmax")
class MinMaxObserver(Observer):
    """The smallest and largest value seen over all batches."""

    def __init__(self) -> None:
        super().__init__()
        self.lo = math.inf
        self.hi = -math.inf

    def observe_minmax(self, lo: float, hi: float) -> None:
        self._track_ends(lo, hi)
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)
        self.batches += 1

    def _range(self) -> tuple[float, float]:
        return self.lo, self.hi


@register_observer("ema-minmax")
class EMAMinMaxObserver(Observer):
    """Moving average of each batch's min and max: ``m <- m + c_t * (batch_m - m)``.

    ``c_t = max(c, 1/t)`` for the t-th batch: the first ``1/c`` batches are averaged with equal weight
    (a plain running mean), later ones decay exponentially with ``averaging_constant`` c (default 0.01,
    as in onnxruntime and PyTorch). onnxruntime's version starts the average at the first batch and
    keeps 0.99**(n-1) of its weight after n batches (28% after 128), so one unlucky first sample sets
    the range; the running-mean start removes that order dependence. The result sits inside the
    min-max range: less sensitive than min-max to rare outliers.
    """

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        if not 0 < averaging_constant <= 1:
            raise CalibrationError(f"ema-minmax averaging constant must be in (0, 1], got {averaging_constant}")
        self.c = averaging_constant
        self.lo = 0.0
        self.hi = 0.0

    def observe_minmax(self, lo: float, hi: float) -> None:
        self._track_ends(lo, hi)
        self.batches += 1
        c = max(self.c, 1.0 / self.batches)
        self.lo += c * (lo - self.lo)
        self.hi += c * (hi - self.hi)

    def _range(self) -> tuple[float, float]:
        return self.lo, self.hi
