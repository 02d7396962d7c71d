"""Streaming observers: accumulate statistics of one tensor batch by batch, then give a range.

Protocol (two methods): :meth:`Observer.observe` takes a batch (or :meth:`Observer.observe_minmax`
takes a batch's already-reduced min and max, which is what the runner sends when the reduction ran
inside the ONNX graph); :meth:`Observer.compute_range` returns ``(rmin, rmax)``. State is a few floats
per tensor (a fixed-size histogram for the histogram observers), so memory never grows with the number
of calibration samples. Non-finite values (NaN, +-Inf) are left out and counted (``nonfinite``).
Observers are registered by short name:

* ``minmax``: the extremes; ``ema-minmax``: a moving average of each batch's extremes;
* ``percentile``, ``mse``, ``entropy`` and ``mse-percentile`` (MSE for non-negative tensors,
  percentiles for signed ones; the w8a8 default): range selection on a 2048-bin histogram whose range
  grows by merging bins (:class:`HistogramObserver`); these need whole tensors (``needs_tensors``).
  The searches over candidate ranges are vectorised (all candidates at once from prefix sums).

Extreme values (:func:`extreme_threshold`): in each batch of a histogram observer, values whose magnitude
exceeds :data:`EXTREME_FACTOR` times the batch's ``k``-th largest magnitude (``k`` = 0.05% of its
values, at least 8) are counted (``extreme``) and left out like NaN, so that a handful of corrupt
values cannot spend the histogram's resolution or steer the range search. The min-max observers keep
their literal meaning; they record which batch set each end, and the runner warns when one batch
alone stretched the range (:meth:`Observer.dominated`).

This module is the public face: the protocol, the registry and the min-max observers live in
:mod:`onnxq.calibration.observer_base`, the histogram family and its range searches in
:mod:`onnxq.calibration.histogram`; every name is importable from here.
"""

from __future__ import annotations

from onnxq.calibration.histogram import (
    EntropyObserver, HistogramObserver, MSEObserver, MSEPercentileObserver, PercentileObserver, entropy_threshold, fold_abs,
    kl_divergences, mse_search, mse_table, percentile_range,
)  # fmt: skip
from onnxq.calibration.observer_base import (
    DOMINANCE_FACTOR,
    EXTREME_FACTOR,
    OBSERVERS,
    EMAMinMaxObserver,
    MinMaxObserver,
    Observer,
    extreme_threshold,
    register_observer,
)
from onnxq.errors import CalibrationError

__all__ = [
    "Observer",
    "MinMaxObserver",
    "EMAMinMaxObserver",
    "HistogramObserver",
    "PercentileObserver",
    "MSEObserver",
    "EntropyObserver",
    "MSEPercentileObserver",
    "OBSERVERS",
    "register_observer",
    "make_observer",
    "needs_tensors",
    "extreme_threshold",
    "EXTREME_FACTOR",
    "DOMINANCE_FACTOR",
    "percentile_range",
    "mse_table",
    "mse_search",
    "fold_abs",
    "kl_divergences",
    "entropy_threshold",
]


def make_observer(name: str, **options: float) -> Observer:
    """An observer by registered name; unknown names list the valid ones."""
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise CalibrationError(f"unknown calibrator '{name}'; valid: {', '.join(OBSERVERS)}") from None
    return cls(**options)


def needs_tensors(name: str) -> bool:
    """Whether the observer registered as ``name`` needs whole tensors (not only each batch's min/max)."""
    cls = OBSERVERS.get(name)
    return bool(cls is not None and cls.needs_tensors)
