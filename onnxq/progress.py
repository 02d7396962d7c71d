"""Progress bars for long steps (calibration, per-layer work), drawn on stderr with rich.

Disabled bars cost nothing, so library code always calls :func:`progress_bar` and the CLI decides.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["progress_bar"]


class _RateColumn(ProgressColumn):
    """Items per second, e.g. "84.2 samples/s"."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f} {self.unit}/s" if speed else f"    - {self.unit}/s", style="progress.data.speed")


def _no_advance(n: int = 1) -> None:
    """The ``advance`` of a disabled progress bar: counts nothing."""


@contextlib.contextmanager
def progress_bar(total: int, description: str, *, enabled: bool = True, unit: str = "samples") -> Iterator[Callable[[int], None]]:
    """A context manager yielding ``advance(n)``; shows count, rate and ETA when enabled."""
    if not enabled:
        yield _no_advance
        return
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as prog:
        task = prog.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            prog.advance(task, n)

        yield advance
