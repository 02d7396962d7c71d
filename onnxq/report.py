"""The report every onnxq run produces: what ran, how long, what it changed, and why.

``Report`` is a plain container the pipeline and passes write into; :meth:`Report.to_dict` gives the
JSON written as ``report.json``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Report", "StepRecord", "peak_rss_mb"]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux/macOS; 0 where unknown)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if os.uname().sysname == "Darwin" else peak / 1024
    except Exception:  # noqa: BLE001 - platform without resource
        return 0.0


@dataclass
class StepRecord:
    """One pipeline step: its name, wall time, whether it changed the graph, and its counts."""

    name: str
    seconds: float
    modified: bool
    counts: dict[str, int]
    notes: list[str]
    peak_rss_mb: float


@dataclass
class Report:
    """Everything a run records; serialised as report.json."""

    steps: list[StepRecord] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add_step(
        self, name: str, seconds: float, modified: bool, counts: dict[str, int], notes: list[str]
    ) -> None:
        self.steps.append(StepRecord(name, round(seconds, 4), modified, dict(counts), list(notes), round(peak_rss_mb(), 1)))

    def note(self, text: str) -> None:
        """Add one line a user should read (a decision and its reason)."""
        self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {"info": self.info, "notes": self.notes, "steps": [asdict(s) for s in self.steps]}

    def write_json(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON, atomically; a destination that is not a regular file is refused."""
        from onnxq.destinations import write_json_atomic

        write_json_atomic(path, self.to_dict(), role="report file (--report)")
