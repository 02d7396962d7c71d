"""Calibration caches: save the statistics of one calibration run and reuse them later.

``onnxq calibrate`` writes a JSON file holding the calibrated range of every tensor the recipe
quantizes, keyed by the model's sha256 and the calibration settings (method, options, sample count,
source). ``onnxq quantize --calib-cache FILE`` answers the quantizer's range questions from it instead
of running the model again, and refuses a cache made for a different model or different settings,
saying which.

A cache is plain JSON that people can edit, so it is validated whole when it is read (and before it is
written), like a recipe: the structure and version, and every range a pair ``[low, high]`` of finite
numbers with ``low <= high`` and ``|low|, |high| <= RANGE_LIMIT``. A range of NaN, an inverted one or
one of 1e38 would otherwise give scales that quantize every activation to one code, with exit code 0.
Errors name the file, the tensor and the fix (re-run ``onnxq calibrate``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from onnxq.destinations import write_json_atomic
from onnxq.errors import CalibrationError
from onnxq.validation import show

__all__ = ["CACHE_FORMAT", "RANGE_LIMIT", "settings_key", "save_cache", "range_problem", "CachedCalibration"]

CACHE_FORMAT = "onnxq-calibration-cache"
CACHE_VERSION = 1
RANGE_LIMIT = 1e30
"""The largest magnitude a cached range end may have. Calibrated ranges are observed float32 activations;
no working network has activations near 1e30 (its next MatMul or Conv would overflow float32's 3.4e38),
and a scale from such a range maps every real activation to the zero point. A hand-typed 1e38 is caught;
every range a real calibration writes passes."""

_REBUILD = "re-run `onnxq calibrate` to rebuild it"

# the fields of a cache document and what each must be: (types, description for messages)
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "version": ((int,), "an integer"),
    "model_sha256": ((str,), "a string"),
    "settings": ((dict,), "an object"),
    "source": ((str,), "a string"),
    "samples": ((int,), "an integer"),
    "provider": ((str, type(None)), "a string or null"),
    "ranges": ((dict,), "an object mapping tensor names to [low, high]"),
}


def settings_key(spec: Any) -> dict[str, Any]:
    """The calibration settings a cache must match (everything that changes the ranges)."""
    data = dataclasses.asdict(spec)
    data.pop("device", None)  # the same statistics whichever provider computed them
    data.pop("batch_size", None)
    return data


def range_problem(name: str, value: Any) -> str | None:
    """What is wrong with the cached range ``value`` of tensor ``name`` (a phrase for a message), or None."""
    what = f"the range of tensor {show(name)} is {show(value)}"
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return f"{what}, not a pair [low, high]"
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        return f"{what}, not a pair of numbers"
    lo, hi = value
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{what}: not finite"
    if lo > hi:
        return f"{what}: its low end is above its high end"
    if max(abs(lo), abs(hi)) > RANGE_LIMIT:
        return f"{what}: beyond +-{RANGE_LIMIT:g}, no real activation range (every value would quantize to one code)"
    return None


def _check_document(p: Path, doc: Any) -> None:
    """Raise a CalibrationError naming the file and the field or tensor if ``doc`` is not a valid cache."""
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT:
        raise CalibrationError(f"{p} is not an onnxq calibration cache (made by `onnxq calibrate`)")
    for key, (types, text) in _FIELDS.items():
        value = doc.get(key)
        if key not in doc or isinstance(value, bool) or not isinstance(value, types):
            got = "missing" if key not in doc else f"{show(value)}"
            raise CalibrationError(f"calibration cache {p}: {key!r} must be {text}, got {got}; {_REBUILD}")
    if doc["version"] != CACHE_VERSION:
        raise CalibrationError(f"calibration cache {p} has version {doc['version']}; this onnxq reads version "
                               f"{CACHE_VERSION}: {_REBUILD}")  # fmt: skip
    if doc["samples"] < 0:
        raise CalibrationError(f"calibration cache {p}: 'samples' must be >= 0, got {doc['samples']}; {_REBUILD}")
    for name, value in doc["ranges"].items():
        problem = "a tensor name is empty" if not name else range_problem(name, value)
        if problem:
            raise CalibrationError(f"calibration cache {p}: {problem}; the file was edited or damaged: {_REBUILD}")


def save_cache(
    path: str | os.PathLike,
    *,
    model_sha256: str,
    spec: Any,
    ranges: dict[str, tuple[float, float]],
    source: str,
    provider: str | None,
    samples: int,
) -> None:
    """Write a cache atomically (temporary file + rename, mode 0644 under the usual umask), after checking it
    as a reader will; a destination that is not a regular file is refused
    (:func:`onnxq.destinations.write_text_atomic`)."""
    doc: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "model_sha256": model_sha256,
        "settings": settings_key(spec),
        "source": source,
        "samples": samples,
        "provider": provider,
        "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in sorted(ranges.items())},
    }
    dest = Path(path)
    for name, value in doc["ranges"].items():
        problem = range_problem(name, value)
        if problem:
            raise CalibrationError(f"calibration gave no usable range for {dest}: {problem}; check the calibration "
                                   "data and the model's outputs on it (onnxq compare)")  # fmt: skip
    write_json_atomic(path, doc, role="statistics file (-o)", indent=1)


class CachedCalibration:
    """Answers ``ranges(graph, names)`` from a cache file checked against the model and settings."""

    def __init__(self, path: str | os.PathLike, *, model_sha256: str, spec: Any) -> None:
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            raise CalibrationError(f"calibration cache not found: {p}") from None
        except (OSError, ValueError, RecursionError) as exc:
            raise CalibrationError(f"calibration cache {p} is not a readable JSON file: {exc}") from exc
        _check_document(p, doc)
        if doc["model_sha256"] != model_sha256:
            raise CalibrationError(
                f"calibration cache {p} was made for a different model (sha256 {str(doc.get('model_sha256'))[:12]}..., "
                f"this model is {model_sha256[:12]}...); run `onnxq calibrate` on this model"
            )
        want = settings_key(spec)
        have = doc["settings"]
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            detail = ", ".join(f"{k}: cache {have.get(k)!r} vs now {want.get(k)!r}" for k in diff)
            raise CalibrationError(
                f"calibration cache {p} was made with different settings ({detail}); "
                "re-run `onnxq calibrate` with these settings or drop --calib-cache"
            )
        self.path = p
        self.provider_used: str | None = doc["provider"]
        self.samples_seen = doc["samples"]
        self.seconds = 0.0
        self.source_description = f"cache {p} ({doc['source']})"
        self._ranges = {k: (float(v[0]), float(v[1])) for k, v in doc["ranges"].items()}

    def ranges(self, graph: gs.Graph | onnx.ModelProto, names: list[str]) -> dict[str, tuple[float, float]]:
        missing = [n for n in names if n not in self._ranges]
        if missing:
            raise CalibrationError(
                f"calibration cache {self.path} has no range for tensor '{missing[0]}'"
                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: it was made with a "
                "different recipe (passes, op types or exclusions); re-run `onnxq calibrate` with this recipe"
            )
        return {n: self._ranges[n] for n in names}
