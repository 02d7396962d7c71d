"""Passes and the pipeline that runs them.

A pass is a small class with one entry point, :meth:`Pass.run`, that takes an onnx-graphsurgeon
``Graph`` and a :class:`PassContext` and returns a :class:`PassResult`. Passes declare whether they
mutate their input (``in_place``); the pipeline holds them to it. Optional ``requires`` / ``ensures``
hooks check pre- and postconditions and their failures name the pass.

The :class:`Pipeline` is a plain ordered list of passes. In *checked* mode (always on in tests) it runs
``onnx.checker`` with ``full_check`` and loads the model in ONNX Runtime after every pass, so a pass
that leaves the graph invalid is caught at the pass that did it.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq._memory import release
from onnxq.errors import OnnxqError, PassError

if TYPE_CHECKING:
    from onnxq.calibration.runner import CalibrationSession
    from onnxq.recipe import Recipe
    from onnxq.report import Report

__all__ = ["Pass", "PassResult", "PassContext", "Pipeline", "PreconditionError", "PostconditionError"]

logger = logging.getLogger(__name__)


class PreconditionError(PassError):
    """A pass's ``requires`` hook refused the graph."""


class PostconditionError(PassError):
    """A pass's ``ensures`` hook found the graph it produced wrong."""


@dataclass
class PassResult:
    """What a pass returns: the graph, whether it changed, and counts of what it did.

    ``counts`` are small named integers (``{"qdq_pairs": 87, "skipped_fp_outputs": 1}``) that end up
    in the report; ``notes`` are one-line human explanations (why a node was skipped, ...).
    """

    graph: gs.Graph
    modified: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """Everything a pass may need besides the graph.

    Attributes:
        recipe: the recipe being applied.
        calibration: lazily computed calibration statistics (None when the recipe needs none).
        report: where passes and the pipeline record what they did.
        checked: run onnx.checker + an ORT load after each pass.
        progress: show progress bars.
        scratch: per-run values passes hand each other (e.g. the target profile); keys are documented
            by the pass that writes them.
    """

    recipe: Recipe
    report: Report
    calibration: CalibrationSession | None = None
    checked: bool = False
    progress: bool = True
    scratch: dict[str, Any] = field(default_factory=dict)


class Pass(abc.ABC):
    """Base class of every graph pass.

    Subclasses set ``name`` and ``in_place`` and implement :meth:`run`. ``in_place = True`` means the
    pass edits the graph it was given and returns that same object; ``False`` means it returns a new
    graph and leaves its input untouched.
    """

    name: ClassVar[str] = "pass"
    in_place: ClassVar[bool] = True
    reported_counts: ClassVar[tuple[str, ...]] = ()
    """The counts of :class:`PassResult` a user reads in ``onnxq quantize``'s summary, in that order (the
    others are in the report only)."""
    reports_notes: ClassVar[bool] = False
    """Whether the summary prints this pass's notes."""

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:  # noqa: B027 - optional hook
        """Raise to refuse a graph this pass cannot handle (the error is wrapped to name the pass)."""

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:  # noqa: B027 - optional hook
        """Raise when the produced graph breaks this pass's promise."""

    @abc.abstractmethod
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Transform ``graph``; see the class docstring for the in-place contract."""

    def __call__(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        try:
            self.requires(graph, ctx)
        except OnnxqError:
            raise
        except Exception as exc:  # noqa: BLE001 - wrapped with the pass's name, cause kept
            raise PreconditionError(self.name, f"precondition failed: {exc}") from exc
        result = self.run(graph, ctx)
        if self.in_place and result.graph is not graph:
            raise PassError(self.name, "declares in_place=True but returned a different graph object")
        if not self.in_place and result.graph is graph:
            raise PassError(self.name, "declares in_place=False but returned its input graph")
        try:
            self.ensures(result.graph, ctx)
        except OnnxqError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise PostconditionError(self.name, f"postcondition failed: {exc}") from exc
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_graph(graph: gs.Graph, *, where: str) -> None:
    """Export ``graph`` and run ``onnx.checker`` (full check) and an ONNX Runtime CPU load on it."""
    from onnxq._ort import ort

    model = gs.export_onnx(graph, do_type_check=False)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise PassError(where, f"the graph no longer passes onnx.checker: {exc}") from exc
    if model.ByteSize() < 1_900_000_000:
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise PassError(where, f"ONNX Runtime cannot load the graph: {exc}") from exc


RELEASE_MIN_BYTES = 64 << 20
"""The weight size from which :class:`Pipeline` gives freed memory back to the OS after each pass: below it the
few megabytes a pass frees are not worth a full garbage collection per pass (which made small models' runs
several times slower)."""


def weight_bytes(graph: gs.Graph) -> int:
    """Bytes of the graph's constant tensors, from their shapes and dtypes (lazily loaded weights are not read)."""
    total = 0
    for t in graph.tensors().values():
        shape = t.shape if isinstance(t, gs.Constant) else None
        if shape is not None and all(isinstance(d, int) for d in shape):
            try:
                itemsize = np.dtype(t.dtype).itemsize
            except TypeError:  # a dtype numpy does not name: count it as 4 bytes
                itemsize = 4
            total += int(np.prod(shape, dtype=np.int64)) * itemsize
    return total


class Pipeline:
    """An ordered list of passes run one after the other on one graph.

    Args:
        passes: the passes, in order.
        checked: validate the graph after every pass (see :func:`check_graph`).
        release_memory: return freed memory to the OS after every pass of a graph whose weights reach
            :data:`RELEASE_MIN_BYTES` (a full garbage collection, about 0.1 s in a busy process: worth it for one
            large model, not for a small one or the mixed-precision search's many rebuilds).
    """

    def __init__(self, passes: Sequence[Pass], *, checked: bool = False, release_memory: bool = True) -> None:
        self.passes = list(passes)
        self.checked = checked
        self.release_memory = release_memory

    def run(
        self,
        graph: gs.Graph,
        ctx: PassContext,
        *,
        on_pass: Callable[[Pass], None] | None = None,
    ) -> gs.Graph:
        """Run every pass, record its time and counts in ``ctx.report``, and return the final graph."""
        done: list[str] = []
        checked = self.checked or ctx.checked
        release_memory = self.release_memory and weight_bytes(graph) >= RELEASE_MIN_BYTES
        for p in self.passes:
            if on_pass is not None:
                on_pass(p)
            t0 = time.perf_counter()
            try:
                result = p(graph, ctx)
            except OnnxqError:
                raise
            except Exception as exc:  # noqa: BLE001 - name the pass and what already ran
                ran = ", ".join(done) or "none"
                raise PassError(p.name, f"{type(exc).__name__}: {exc} (passes already run: {ran})") from exc
            seconds = time.perf_counter() - t0
            graph = result.graph
            if release_memory:
                release()  # the pass's freed temporaries back to the OS (see onnxq._memory)
            ctx.report.add_step(p.name, seconds, result.modified, result.counts, result.notes)
            logger.debug("pass %s: modified=%s counts=%s (%.3fs)", p.name, result.modified, result.counts, seconds)
            if checked:
                check_graph(graph, where=p.name)
            done.append(p.name)
        return graph

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(p.name for p in self.passes)}], checked={self.checked})"
