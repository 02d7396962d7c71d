"""Calibration caches: save the statistics of one calibration run and reuse them later.

``onnxq calibrate`` writes a JSON file holding the calibrated range of every tensor the recipe
quantizes, keyed by the model's sha256 and the calibration settings (method, options, sample count,
source). ``onnxq quantize --calib-cache FILE`` answers the quantizer's range questions from it instead
of running the model again, and refuses a cache made for a different model or different settings,
saying which.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from onnxq.destinations import write_json_atomic
from onnxq.errors import CalibrationError

__all__ = ["CACHE_FORMAT", "settings_key", "save_cache", "CachedCalibration"]

CACHE_FORMAT = "onnxq-calibration-cache"
CACHE_VERSION = 1


def settings_key(spec: Any) -> dict[str, Any]:
    """The calibration settings a cache must match (everything that changes the ranges)."""
    data = dataclasses.asdict(spec)
    data.pop("device", None)  # the same statistics whichever provider computed them
    data.pop("batch_size", None)
    return data


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
    """Write a cache atomically (temporary file + rename, mode 0644 under the usual umask); a destination
    that is not a regular file is refused (:func:`onnxq.destinations.write_text_atomic`)."""
    doc = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "model_sha256": model_sha256,
        "settings": settings_key(spec),
        "source": source,
        "samples": samples,
        "provider": provider,
        "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in sorted(ranges.items())},
    }
    write_json_atomic(path, doc, role="statistics file (-o)", indent=1)


class CachedCalibration:
    """Answers ``ranges(graph, names)`` from a cache file checked against the model and settings."""

    def __init__(self, path: str | os.PathLike, *, model_sha256: str, spec: Any) -> None:
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            raise CalibrationError(f"calibration cache not found: {p}") from None
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"calibration cache {p} is not a readable JSON file: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT:
            raise CalibrationError(f"{p} is not an onnxq calibration cache (made by `onnxq calibrate`)")
        if doc.get("model_sha256") != model_sha256:
            raise CalibrationError(
                f"calibration cache {p} was made for a different model (sha256 {str(doc.get('model_sha256'))[:12]}..., "
                f"this model is {model_sha256[:12]}...); run `onnxq calibrate` on this model"
            )
        want = settings_key(spec)
        have = doc.get("settings", {})
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            detail = ", ".join(f"{k}: cache {have.get(k)!r} vs now {want.get(k)!r}" for k in diff)
            raise CalibrationError(
                f"calibration cache {p} was made with different settings ({detail}); "
                "re-run `onnxq calibrate` with these settings or drop --calib-cache"
            )
        self.path = p
        self.provider_used: str | None = doc.get("provider")
        self.samples_seen = int(doc.get("samples", 0))
        self.seconds = 0.0
        self.source_description = f"cache {p} ({doc.get('source')})"
        self._ranges = {k: (float(v[0]), float(v[1])) for k, v in doc.get("ranges", {}).items()}

    def ranges(self, graph: gs.Graph | onnx.ModelProto, names: list[str]) -> dict[str, tuple[float, float]]:
        missing = [n for n in names if n not in self._ranges]
        if missing:
            raise CalibrationError(
                f"calibration cache {self.path} has no range for tensor '{missing[0]}'"
                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: it was made with a "
                "different recipe (passes, op types or exclusions); re-run `onnxq calibrate` with this recipe"
            )
        return {n: self._ranges[n] for n in names}
