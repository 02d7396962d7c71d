"""The recipe data model: the tables of a :class:`Recipe` as validated frozen dataclasses.

Each table (:class:`ActivationSpec`, :class:`WeightSpec`, :class:`CalibrationSpec`, ...) checks every
field when it is built, from its annotation and ``rule(...)`` metadata (see :mod:`onnxq.validation`);
:class:`Override` and :class:`NodeConfig` resolve per-node settings. Presets are in
:mod:`onnxq.presets`, TOML loading in :mod:`onnxq.recipe`, which re-exports every name here.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

from onnxq.errors import RecipeError
from onnxq.scheme import PerChannel, PerTensor, QuantDtype, QuantScheme, Symmetry
from onnxq.target import PROFILES
from onnxq.validation import check_instance, rule, show, suggest

__all__ = [
    "QUANTIZABLE_OPS", "FLOAT16_BLOCK_LIST", "PASS_NAMES", "ActivationSpec", "WeightSpec", "CalibrationSpec", "ExcludeSpec",
    "Float16Spec", "SmoothQuantSpec", "DynamicSpec", "WeightOnlySpec", "Override", "NodeConfig", "NodeSelection", "TableSettings", "Recipe",
]  # fmt: skip

QUANTIZABLE_OPS: tuple[str, ...] = (
    "Conv", "Gemm", "MatMul", "Add", "Mul", "MaxPool", "AveragePool", "GlobalAveragePool",
    "Concat", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
)  # fmt: skip
"""Op types ``insert_qdq`` knows how to quantize (Relu/Clip are absorbed, not quantized)."""

FLOAT16_BLOCK_LIST: tuple[str, ...] = (
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "CumSum", "RoiAlign", "Range", "NonMaxSuppression",
)  # fmt: skip
"""Op types the ``float16`` pass keeps in float32 by default: normalisations, softmax and reductions (their
sums overflow or lose precision in float16), box ops (pixel coordinates), and ops with no float16 in the
ONNX spec. See passes/float16.py."""

PASS_NAMES: tuple[str, ...] = (
    "upcast_float16", "shape_inference", "constant_folding", "fold_batchnorm", "canonical_gelu", "remove_dead_nodes",
    "int8_embeddings", "smoothquant", "insert_qdq", "qoperator", "dynamic", "weight_only", "float16",
)  # fmt: skip
"""The names of ``onnxq.passes.PASSES`` (which imports this module, so it cannot be read here; a test keeps
the two equal): a recipe's ``passes`` must name these."""

_MATMUL_GEMM = ("MatMul", "Gemm")


def _dtypes() -> list[str]:
    return [d.value for d in QuantDtype]


def _observers() -> list[str]:
    from onnxq.calibration.observers import OBSERVERS

    return list(OBSERVERS)


def _targets() -> list[str]:
    return ["auto", *PROFILES]


@functools.cache
def _onnx_op_types() -> frozenset[str]:
    import onnx.defs

    return frozenset(s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx"))


def _onnx_op(value: str) -> str | None:
    """An excluded / overridden op type must be an ONNX operator: onnxq quantizes no other, so any other name
    (``Convv``) can only be a typo that would exclude nothing."""
    if value in _onnx_op_types():
        return None
    return f"is not an ONNX operator type{suggest(value, _onnx_op_types())}"


def _regex(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"is not a valid regular expression ({exc})"
    return None


def _power_of_two_or_zero(lo: int, hi: int | None, zero: str) -> Any:
    """A check: 0 (meaning ``zero``) or a power of two in [lo, hi]."""

    def check(b: int) -> str | None:
        if b == 0 or (b >= lo and (hi is None or b <= hi) and not b & (b - 1)):
            return None
        which = f"from {lo} to {hi}" if hi else f">= {lo} ({', '.join(str(lo << i) for i in range(4))}, ...)"
        return f"must be 0 ({zero}) or a power of two {which}"

    return check


def _printable(text: str) -> str | None:
    """Names and descriptions reach terminals and reports: no control characters (escape sequences)."""
    bad = next((c for c in text if not c.isprintable() and c not in "\n\t"), None)
    return None if bad is None else f"must not contain control characters (found {bad!r})"


def _version(v: int) -> str | None:
    return None if v == 1 else "is not supported: this onnxq reads recipe version 1"


class _Table:
    """Mixin of the recipe tables: every field is validated when the table is built (presets, recipe
    files, command-line flags alike), from its annotation and ``rule`` (see :mod:`onnxq.validation`)."""

    TABLE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_instance(self, f"[{self.TABLE}] " if self.TABLE else "")


@dataclass(frozen=True)
class ActivationSpec(_Table):
    """How activations are quantized (per tensor, from calibrated ranges)."""

    TABLE: ClassVar[str] = "activations"
    dtype: str = field(default="uint8", metadata=rule(choices=_dtypes))
    symmetric: bool = False
    reduce_range: bool = False

    def scheme(self) -> QuantScheme:
        return QuantScheme(
            QuantDtype(self.dtype),
            Symmetry.SYMMETRIC if self.symmetric else Symmetry.AFFINE,
            PerTensor(),
            reduce_range=self.reduce_range,
        )


@dataclass(frozen=True)
class WeightSpec(_Table):
    """How constant weights are quantized.

    ``granularity``: ``"per-channel"`` (one scale per output channel) or ``"per-tensor"``.
    ``reduce_range``: ``"auto"`` lets the target profile decide (7-bit weights where the CPU's int8
    kernels can saturate), or ``true`` / ``false``.
    ``range_method``: ``"mse"`` picks each channel's scale to minimise the weights' squared rounding
    error (clipping a few extreme weights for a finer step); ``"minmax"`` covers every weight. On the
    7-bit x86-avx2 profile MSE lifts MobileNetV2 from 94.6% to 95.8% top-1 agreement with fp32.
    """

    TABLE: ClassVar[str] = "weights"
    dtype: str = field(default="int8", metadata=rule(choices=_dtypes))
    symmetric: bool = True
    granularity: Literal["per-channel", "per-tensor"] = "per-channel"
    reduce_range: bool | Literal["auto"] = "auto"
    range_method: Literal["minmax", "mse"] = "mse"

    def scheme(self, axis: int, *, reduce_range: bool) -> QuantScheme:
        gran = PerChannel(axis) if self.granularity == "per-channel" else PerTensor()
        sym = Symmetry.SYMMETRIC if self.symmetric else Symmetry.AFFINE
        return QuantScheme(QuantDtype(self.dtype), sym, gran, reduce_range=reduce_range)


@dataclass(frozen=True)
class CalibrationSpec(_Table):
    """Calibration method and how many samples to use (``--calib-size``); ``ema_constant``: the weight of
    each new batch in the moving-average observers, in (0, 1]."""

    TABLE: ClassVar[str] = "calibration"
    method: str = field(default="mse-percentile", metadata=rule(choices=_observers))
    samples: int = field(default=128, metadata=rule(lo=1))
    ema_constant: float = field(default=0.01, metadata=rule(lo=0, lo_open=True, hi=1))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = field(default=1, metadata=rule(lo=1))


@dataclass(frozen=True)
class ExcludeSpec(_Table):
    """Nodes left in float: by op type, by exact name, or by name regex (``re.search``); and, with
    ``activation_matmuls``, every MatMul whose inputs are both activations (attention scores and context)."""

    TABLE: ClassVar[str] = "exclude"
    op_types: tuple[str, ...] = field(default=(), metadata=rule(check=_onnx_op))
    names: tuple[str, ...] = ()
    name_regex: tuple[str, ...] = field(default=(), metadata=rule(check=_regex))
    activation_matmuls: bool = False  # MatMuls of two activations (attention Q @ K^T, probs @ V) stay float

    def excludes(self, name: str, op_type: str) -> bool:
        """True when the node called ``name`` of type ``op_type`` is excluded by type, name or regex."""
        return op_type in self.op_types or name in self.names or any(re.search(rx, name) for rx in self.name_regex)


@dataclass(frozen=True)
class Float16Spec(_Table):
    """Settings of the ``float16`` pass (the ``[float16]`` table of a recipe).

    ``dtype``: ``"float16"`` or ``"bfloat16"``. ``keep_io_types``: graph inputs and outputs stay float32
    (Casts inside the graph). ``op_block_list`` / ``node_block_list``: op types / exact node names that
    stay float32, with Casts around them.
    """

    TABLE: ClassVar[str] = "float16"
    dtype: Literal["float16", "bfloat16"] = "float16"
    keep_io_types: bool = True
    op_block_list: tuple[str, ...] = FLOAT16_BLOCK_LIST
    node_block_list: tuple[str, ...] = ()


@dataclass(frozen=True)
class SmoothQuantSpec(_Table):
    """Settings of the ``smoothquant`` pass (the ``[smoothquant]`` table of a recipe).

    ``alpha``: migration strength in ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``; a number in [0, 1]
    or ``"auto"``, which searches ``alpha_grid`` per layer for the lowest output error of the quantized
    layer on calibration rows. ``op_types``: which weight ops are smoothed. ``max_rows``: how many
    activation rows per tensor the ``auto`` search keeps (a streamed reservoir sample, bounded memory).
    """

    TABLE: ClassVar[str] = "smoothquant"
    alpha: float | Literal["auto"] = field(default=0.5, metadata=rule(lo=0, hi=1))
    alpha_grid: tuple[float, ...] = field(default=tuple(round(0.05 * i, 2) for i in range(21)),
                                          metadata=rule(lo=0, hi=1, nonempty=True))
    op_types: tuple[str, ...] = field(default=_MATMUL_GEMM, metadata=rule(choices=_MATMUL_GEMM))
    max_rows: int = field(default=512, metadata=rule(lo=16))


@dataclass(frozen=True)
class DynamicSpec(_Table):
    """Settings of the ``dynamic`` pass (the ``[dynamic]`` table of a recipe): weight MatMuls/Gemms run as
    integer matrix products whose activation scale is computed at run time, so no calibration is needed.

    ``activation_granularity``: ``"per-row"`` (one symmetric scale per row of the last axis, i.e. per
    token, computed in the graph; the default) or ``"per-tensor"`` (one scale per tensor,
    DynamicQuantizeLinear). Under per-tensor one loud token sets the scale of every token: SmolLM2's
    wikitext perplexity goes from 28.7 to about 50 that way. ``hadamard_block``: multiply activations
    by an orthogonal block-diagonal Hadamard matrix of this size (a power of two, 8 to 256; 0: off) and
    weights by its transpose offline, so that a few outlier channels spread over their block instead of
    setting the whole row's scale; blocks shrink to the largest power of two dividing K (none below 8).
    ``op_types``: ops rewritten. Weights follow the recipe's ``[weights]`` table (int8, per-channel by
    default, bits set by the target). See passes/dynamic.py and benchmarks/RESULTS.md for the measurements.
    """

    TABLE: ClassVar[str] = "dynamic"
    activation_granularity: Literal["per-tensor", "per-row"] = "per-row"
    op_types: tuple[str, ...] = field(default=_MATMUL_GEMM, metadata=rule(choices=_MATMUL_GEMM))
    hadamard_block: int = field(default=64, metadata=rule(check=_power_of_two_or_zero(8, 256, "off")))


@dataclass(frozen=True)
class WeightOnlySpec(_Table):
    """Settings of the ``weight_only`` pass (the ``[weight_only]`` table of a recipe): MatMul weights
    stored in 4 (or 8) bits and dequantized at run time; activations stay float, so no activation ranges.

    ``method``: ``"rtn"`` (round to nearest, no calibration), ``"gptq"`` (Frantar et al.: rounding error
    of each row compensated on the rows not yet quantized, using the layer's input Hessian; sequential:
    each layer sees the already-quantized earlier layers' outputs) or ``"awq"`` (Lin et al.: a per-input-
    channel scale searched on a grid and folded into what produces the input, then a clipping search).
    ``bits``: 4 or 8. ``symmetric``: zero point fixed at the middle (8 for int4) or per block.
    ``block_size``: rows of K sharing one scale per output column (16, 32, 64, 128, 256, ...); 0 means
    one block per output column (per-channel). ``accuracy_level``: MatMulNBits' compute type (0 = fp32,
    4 = int8 activations, faster on CPU) or ``"auto"`` (the target decides). ``lm_head``: the output
    projection (the last weight MatMul before a graph output) quantized like the rest (``"same"``), in
    8 bits (``"int8"``) or left in float (``"float"``). ``embeddings``: constant Gather tables (token
    embeddings) stored as int8 with one scale per row (``"int8"``) or left float (``"float"``).
    ``damp``: GPTQ's Hessian damping (fraction of the mean diagonal). ``act_order``: GPTQ processes rows
    in order of decreasing Hessian diagonal (block parameters then come from the original weights).
    ``mse_range``: GPTQ chooses each block's range by a shrink search (smallest ``|err|^2.4``) instead of
    plain min/max. ``awq_scales``: GPTQ first applies AWQ's scale search and fold to each layer input,
    then quantizes the scaled weights with GPTQ (both methods' gains combine).
    ``awq_grid``: number of scale exponents AWQ tries (0, 1/n, ..., (n-1)/n). ``awq_duo``: also try
    AutoAWQ's duo scaling (activation mean over weight mean) and keep the better. ``awq_clip``: run AWQ's
    clipping search after the scale search. ``awq_loss``: what scores a scale candidate: ``"module"`` (the
    paper's: the output of the module the weights open, attention up to o_proj or the MLP up to down_proj,
    run on the calibration activations; several times slower) or ``"linear"`` (each linear's own output
    error, from ``H``). ``w4-awq`` uses ``"module"``; ``w4-gptq-awq`` uses ``"linear"``, measured better and
    faster there (GPTQ's own compensation follows the scales; benchmarks/RESULTS.md).
    """

    TABLE: ClassVar[str] = "weight_only"
    method: Literal["rtn", "gptq", "awq"] = "rtn"
    bits: int = field(default=4, metadata=rule(choices=(4, 8)))
    symmetric: bool = False
    block_size: int = field(default=128, metadata=rule(check=_power_of_two_or_zero(16, None, "per-channel")))
    accuracy_level: int | Literal["auto"] = field(default="auto", metadata=rule(lo=0, hi=4))
    lm_head: Literal["same", "int8", "float"] = "int8"
    embeddings: Literal["float", "int8"] = "int8"
    damp: float = field(default=0.01, metadata=rule(lo=0, lo_open=True, hi=1, hi_open=True))
    act_order: bool = True
    mse_range: bool = True
    awq_scales: bool = False
    awq_grid: int = field(default=20, metadata=rule(lo=2))
    awq_duo: bool = False
    awq_clip: bool = True
    awq_loss: Literal["module", "linear"] = "module"


@dataclass(frozen=True)
class Override:
    """Settings for the nodes one selector matches. Exactly one of op_type, name, name_regex is set.

    ``skip = true`` leaves the matched nodes in float; ``activations`` / ``weights`` replace fields of
    the global specs for them.
    """

    op_type: str | None = field(default=None, metadata=rule(check=_onnx_op))
    name: str | None = None
    name_regex: str | None = field(default=None, metadata=rule(check=_regex))
    skip: bool = False
    activations: Mapping[str, Any] = field(default_factory=dict, metadata=rule(table=ActivationSpec))
    weights: Mapping[str, Any] = field(default_factory=dict, metadata=rule(table=WeightSpec))

    def __post_init__(self) -> None:
        chosen = [k for k in ("op_type", "name", "name_regex") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise RecipeError(
                f"an [[override]] needs exactly one of op_type, name or name_regex; got {chosen or 'none'}"
            )
        check_instance(self, "[[override]] ")

    @property
    def selector_key(self) -> str:
        """Which selector is set: ``op_type``, ``name`` or ``name_regex``."""
        return "op_type" if self.op_type is not None else "name" if self.name is not None else "name_regex"

    @property
    def selector(self) -> str:
        """How messages name this override: ``op_type 'Gemm'``, ``name 'fc'`` or ``name_regex '^head/'``."""
        return f"{self.selector_key} {show(getattr(self, self.selector_key))}"

    @property
    def priority(self) -> int:
        return 1 if self.op_type is not None else 2 if self.name_regex is not None else 3

    def matches(self, name: str, op_type: str) -> bool:
        if self.op_type is not None:
            return op_type == self.op_type
        if self.name is not None:
            return name == self.name
        return re.search(self.name_regex or "", name) is not None


@dataclass(frozen=True)
class NodeConfig:
    """The resolved settings for one node."""

    activations: ActivationSpec
    weights: WeightSpec


@dataclass(frozen=True)
class NodeSelection:
    """Which nodes a quantizing pass touches and with what settings: the recipe's ``op_types``, ``[exclude]``,
    ``[[override]]`` tables and its global ``[activations]`` / ``[weights]`` schemes. The passes that choose
    nodes (insert_qdq, dynamic, smoothquant, weight_only) carry one in their settings instead of the recipe."""

    op_types: tuple[str, ...] = QUANTIZABLE_OPS
    exclude: ExcludeSpec = field(default_factory=ExcludeSpec)
    overrides: tuple[Override, ...] = ()
    activations: ActivationSpec = field(default_factory=ActivationSpec)
    weights: WeightSpec = field(default_factory=WeightSpec)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> NodeSelection:
        return cls(recipe.op_types, recipe.exclude, recipe.overrides, recipe.activations, recipe.weights)

    def config_for(self, name: str, op_type: str) -> NodeConfig | None:
        """Resolved settings for a node, or None when it stays in float (excluded or skipped)."""
        if op_type not in self.op_types or self.exclude.excludes(name, op_type):
            return None
        act, wt = self.activations, self.weights
        for ov in sorted((o for o in self.overrides if o.matches(name, op_type)), key=lambda o: o.priority):
            if ov.skip:
                return None
            act = dataclasses.replace(act, **dict(ov.activations))
            wt = dataclasses.replace(wt, **dict(ov.weights))
        return NodeConfig(act, wt)


@dataclass(frozen=True)
class TableSettings:
    """The settings of a pass that chooses nodes (``selection``) and has its own recipe table (``spec``, the
    table ``TABLE_KEY`` names); a subclass names its table and gives ``spec`` its type and default."""

    TABLE_KEY: ClassVar[str] = ""
    selection: NodeSelection = field(default_factory=NodeSelection)
    spec: Any = None

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Any:
        return cls(recipe.selection(), getattr(recipe, cls.TABLE_KEY))


@dataclass(frozen=True)
class Recipe(_Table):
    """A complete, serialisable description of one quantization run."""

    name: str = field(default="custom", metadata=rule(check=_printable))
    description: str = field(default="", metadata=rule(check=_printable))
    version: int = field(default=1, metadata=rule(check=_version))
    passes: tuple[str, ...] = field(default=(
        "upcast_float16", "shape_inference", "constant_folding", "fold_batchnorm", "canonical_gelu",
        "remove_dead_nodes", "int8_embeddings", "insert_qdq",
    ), metadata=rule(choices=PASS_NAMES))  # fmt: skip
    target: str = field(default="auto", metadata=rule(choices=_targets))
    op_types: tuple[str, ...] = field(default=QUANTIZABLE_OPS, metadata=rule(choices=QUANTIZABLE_OPS))
    quantize_outputs: bool = False
    activations: ActivationSpec = field(default_factory=ActivationSpec)
    weights: WeightSpec = field(default_factory=WeightSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    exclude: ExcludeSpec = field(default_factory=ExcludeSpec)
    overrides: tuple[Override, ...] = ()
    float16: Float16Spec = field(default_factory=Float16Spec)
    smoothquant: SmoothQuantSpec = field(default_factory=SmoothQuantSpec)
    dynamic: DynamicSpec = field(default_factory=DynamicSpec)
    weight_only: WeightOnlySpec = field(default_factory=WeightOnlySpec)
    format: Literal["qdq", "qoperator", "matmulnbits"] = "qdq"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format == "matmulnbits" and not self.runs("weight_only"):
            raise RecipeError(
                "format 'matmulnbits' packs weight-only quantized MatMuls: use it with a weight-only preset "
                "(w4-rtn, w4-gptq, w4-awq)"
            )
        if self.format == "qoperator" and self.runs("weight_only"):
            raise RecipeError(
                "weight-only presets have no QOperator form (activations stay float): use --format matmulnbits "
                "(com.microsoft.MatMulNBits) or --format qdq (int4 DequantizeLinear + MatMul)"
            )
        for ov in self.overrides:
            if ov.op_type is not None and ov.op_type not in self.op_types:
                raise RecipeError(f"[[override]] {ov.selector} never applies: this recipe quantizes only the op types "
                                  f"{', '.join(self.op_types)} (op_types)")  # fmt: skip

    def runs(self, name: str) -> bool:
        """Whether the pass called ``name`` runs (:meth:`pass_names`): the one place a question about the
        recipe's passes is asked by name (what a pass does is asked of the built pass instead)."""
        return name in self.pass_names()

    def needs_calibration(self) -> bool:
        """Whether the passes need calibration samples (activation ranges or weight-only statistics): asked
        of the passes this recipe builds (:meth:`onnxq.pipeline.Pass.needs_calibration`)."""
        from onnxq.passes import build_passes

        return any(p.needs_calibration() for p in build_passes(self))

    def pass_names(self) -> tuple[str, ...]:
        """The passes to run: ``passes``, plus the ``qoperator`` lowering at the end for ``format = "qoperator"``."""
        extra = ("qoperator",) if self.format == "qoperator" else ()
        return tuple(dict.fromkeys((*self.passes, *extra)))

    def selection(self) -> NodeSelection:
        """The node choice of this recipe (op types, exclusions, overrides, global schemes)."""
        return NodeSelection.from_recipe(self)

    def config_for(self, name: str, op_type: str) -> NodeConfig | None:
        """Resolved settings for a node, or None when it stays in float (excluded or skipped)."""
        return self.selection().config_for(name, op_type)

    def with_(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)
