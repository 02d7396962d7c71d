"""Passes and the pipeline that runs them.

A pass is a small class with one entry point, :meth:`Pass.run`, that takes an onnx-graphsurgeon
``Graph`` and a :class:`PassContext` and returns a :class:`PassResult`. Passes declare whether they
mutate their input (``in_place``); the pipeline holds them to it. Optional ``requires`` / ``ensures``
hooks check pre- and postconditions and their failures name the pass.

A pass gets its own settings when it is built (:meth:`Pass.from_recipe`, a frozen dataclass such as
``InsertQDQSettings``; ``onnxq.passes.build_passes(recipe)`` builds a recipe's passes), never the whole
recipe; what it tells the driver (whether it needs calibration, the opset it needs, ...) it declares
through the methods of :class:`Pass`. The facts passes share within one run (the target profile, node
doc strings, the nodes quantized, ...) are typed fields of :class:`PassContext`.

The :class:`Pipeline` is a plain ordered list of passes. In *checked* mode (always on in tests) it runs
``onnx.checker`` with ``full_check`` and loads the model in ONNX Runtime after every pass, so a pass
that leaves the graph invalid is caught at the pass that did it.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generic, Sequence, TypeVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq._memory import release
from onnxq.errors import OnnxqError, PassError
from onnxq.target import PROFILES, TargetProfile

if TYPE_CHECKING:
    from onnxq.calibration.runner import CalibrationSession
    from onnxq.recipe import Recipe
    from onnxq.report import Report

__all__ = ["Pass", "ConfiguredPass", "PassResult", "PassContext", "Pipeline", "PreconditionError", "PostconditionError"]

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
    """Everything a pass may need besides the graph and its own settings: the run's shared facts, typed.

    Attributes:
        report: where passes and the pipeline record what they did.
        calibration: lazily computed calibration statistics (None when no pass needs them).
        checked: run onnx.checker + an ORT load after each pass.
        progress: show progress bars.
        target: the deployment target profile; set by the driver (:func:`onnxq.quantization.quantize_model`),
            read by insert_qdq, dynamic, smoothquant, qoperator and weight_only.
        doc_strings: node name -> doc string (why the node exists, shown in Netron); written by every pass
            that inserts nodes, copied into the model by the driver at the end (graphsurgeon drops them).
        quantized_nodes: (name, op type) of every compute node quantized, in graph order; written by
            insert_qdq and dynamic, read by the mixed-precision search (the layers it may move back).
        weight_qparams_memo: weight scales kept between runs on the same graph, by (name, scheme, method,
            shape); given by the mixed-precision search (one build per candidate), read and filled by insert_qdq.
        source_float_dtype: ``"float16"`` or ``"bfloat16"`` when the model was upcast; written by
            upcast_float16.
        smoothquant_alphas: per smoothed activation, the alpha used and the factor range; written by
            smoothquant (for tests and debugging).
        weight_only_layers: per quantized MatMul, its method, grid and relative output error (and AWQ's ratio);
            written by weight_only (for tests and debugging).
    """

    report: Report
    calibration: CalibrationSession | None = None
    checked: bool = False
    progress: bool = True
    target: TargetProfile = field(default_factory=lambda: PROFILES["generic"])
    doc_strings: dict[str, str] = field(default_factory=dict)
    quantized_nodes: list[tuple[str, str]] = field(default_factory=list)
    weight_qparams_memo: dict[Any, Any] | None = None
    source_float_dtype: str | None = None
    smoothquant_alphas: dict[str, Any] = field(default_factory=dict)
    weight_only_layers: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    calibrates_on_text_windows: ClassVar[bool] = False
    """Whether calibration text for this pass is read as windows of running text (an LLM's), not one line per
    sample (:func:`onnxq.api.calibration_defaults`)."""
    cache_answers_calibration: ClassVar[bool] = True
    """Whether saved activation ranges (``onnxq calibrate``'s cache) can stand in for calibration samples."""

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Pass:
        """This pass configured from ``recipe``: the settings it reads and nothing else (the default: a pass
        with no settings)."""
        return cls()

    def needs_calibration(self) -> bool:
        """Whether this pass reads calibration samples (activation ranges, layer statistics)."""
        return False

    def missing_calibration_message(self, recipe_name: str) -> str:
        """The one-line refusal when this pass needs calibration and none was given (names the CLI options)."""
        return f"preset/recipe '{recipe_name}' runs {self.name}, which needs calibration data: --calib SOURCE"

    def min_opset(self) -> tuple[int, str] | None:
        """The default-domain opset this pass needs and why (the "opset upgraded" note), or None to leave it to
        the recipe's quantization dtypes."""
        return None

    def runs_on_ort_cpu(self) -> bool:
        """Whether ONNX Runtime's CPU provider can run what this pass produces (False: checked with onnx only)."""
        return True

    def node_names(self) -> list[tuple[str, str]]:
        """The exact node names this pass's settings select, each with how a warning names the selector
        (``("float16.node_block_list entry", "fc1")``): a name no node has is reported as having no effect."""
        return []

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
        settings = getattr(self, "settings", None)  # a configured pass shows its settings object
        return f"{type(self).__name__}({'' if settings is None else repr(settings)})"


S = TypeVar("S")


class ConfiguredPass(Pass, Generic[S]):
    """A pass with a settings object: ``settings_class`` is its frozen dataclass, whose ``from_recipe(recipe)``
    picks what the pass reads of a recipe; ``ConfiguredPass()`` uses the dataclass's defaults."""

    settings_class: ClassVar[Any]
    needs_samples: ClassVar[bool] = False
    """Whether the pass always reads calibration samples (:meth:`needs_calibration`)."""

    def __init__(self, settings: S | None = None) -> None:
        self.settings: S = settings if settings is not None else self.settings_class()

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Pass:
        return cls(cls.settings_class.from_recipe(recipe))

    def needs_calibration(self) -> bool:
        return self.needs_samples


def check_graph(graph: gs.Graph, *, where: str) -> None:
    """Export ``graph`` and check it: ``onnx.checker`` (full check) where onnx has the schemas, ONNX Runtime's
    schemas for the ops only it knows, and an ONNX Runtime CPU load (:func:`onnxq.model_checks.validate`)."""
    from onnxq.model_checks import ModelCheckError, validate

    try:
        validate(gs.export_onnx(graph, do_type_check=False), full_check=True, optimization="all")
    except ModelCheckError as exc:
        raise PassError(where, f"the graph no longer checks: {exc}") from None


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
