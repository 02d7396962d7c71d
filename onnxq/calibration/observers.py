"""Streaming observers: accumulate statistics of one tensor batch by batch, then give a range.

Protocol (two methods): :meth:`Observer.observe` takes a batch (or :meth:`Observer.observe_minmax`
takes a batch's already-reduced min and max, which is what the runner sends when the reduction ran
inside the ONNX graph); :meth:`Observer.compute_range` returns ``(rmin, rmax)``. State is a few floats
per tensor, so memory never grows with the number of calibration samples. Non-finite values (NaN,
+-Inf) are ignored. Observers are registered by short name (``minmax``, ``ema-minmax``).
"""

from __future__ import annotations

import abc
import math
from typing import Callable, ClassVar

import numpy as np

from onnxq.errors import CalibrationError

__all__ = ["Observer", "MinMaxObserver", "EMAMinMaxObserver", "OBSERVERS", "register_observer", "make_observer"]

OBSERVERS: dict[str, type[Observer]] = {}


def register_observer(name: str) -> Callable[[type[Observer]], type[Observer]]:
    """Class decorator: make an observer available under ``name`` (``--calibrator NAME``)."""

    def deco(cls: type[Observer]) -> type[Observer]:
        cls.name = name
        OBSERVERS[name] = cls
        return cls

    return deco


def make_observer(name: str, **options: float) -> Observer:
    """An observer by registered name; unknown names list the valid ones."""
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise CalibrationError(f"unknown calibrator '{name}'; valid: {', '.join(OBSERVERS)}") from None
    return cls(**options)


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


class Observer(abc.ABC):
    """Accumulates the statistics of one tensor across calibration batches."""

    name: ClassVar[str] = "observer"

    def __init__(self) -> None:
        self.batches = 0

    def observe(self, x: np.ndarray) -> None:
        """Add one batch of the tensor's values."""
        mm = finite_minmax(x)
        if mm is not None:
            self.observe_minmax(*mm)

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
        self.batches += 1
        c = max(self.c, 1.0 / self.batches)
        self.lo += c * (lo - self.lo)
        self.hi += c * (hi - self.hi)

    def _range(self) -> tuple[float, float]:
        return self.lo, self.hi
