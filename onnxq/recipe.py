"""Recipes: what to quantize, how, and with which calibration; presets; strict TOML loading.

A :class:`Recipe` is plain data. It names the passes to run, the activation and weight schemes, the
calibration method, the target profile, exclusions and per-node overrides. Overrides resolve in a fixed
order of priority, lowest first::

    global settings  <  op type  <  node-name regex  <  exact node name

A TOML recipe file mirrors the dataclasses. It is checked whole when it is loaded, before any work: an
unknown key anywhere is an error that names the key and lists the valid ones, and every value is checked
against its field -- type (booleans are TOML booleans, integers are not booleans, numbers are finite),
allowed values (exact match, with a suggestion for a near miss), range, element types of lists, regular
expressions -- by :mod:`onnxq.validation` from the dataclass fields' annotations and ``rule(...)`` metadata.
A typo or a wrong value must never be silently ignored or silently change the result::

    preset = "w8a8"                 # start from a preset, then change what follows
    [calibration]
    method = "mse-percentile"       # see `onnxq quantize --help` for the calibrators
    samples = 128
    [activations]
    dtype = "uint8"
    [weights]
    granularity = "per-channel"
    reduce_range = "auto"           # "auto": decided by the target profile
    [exclude]
    op_types = ["Resize"]
    names = ["conv1"]
    name_regex = ["^head/"]
    [[override]]
    op_type = "Gemm"
    weights = { granularity = "per-tensor" }
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Literal, Mapping

from onnxq.errors import RecipeError
from onnxq.scheme import PerChannel, PerTensor, QuantDtype, QuantScheme, Symmetry
from onnxq.target import PROFILES
from onnxq.validation import check_fields, check_instance, rule, show, suggest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ActivationSpec",
    "WeightSpec",
    "CalibrationSpec",
    "ExcludeSpec",
    "Float16Spec",
    "SmoothQuantSpec",
    "DynamicSpec",
    "WeightOnlySpec",
    "FLOAT16_BLOCK_LIST",
    "Override",
    "NodeConfig",
    "Recipe",
    "PRESETS",
    "preset",
    "load_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
    "unmatched_selectors",
]

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
        if self.format == "matmulnbits" and "weight_only" not in self.passes:
            raise RecipeError(
                "format 'matmulnbits' packs weight-only quantized MatMuls: use it with a weight-only preset "
                "(w4-rtn, w4-gptq, w4-awq)"
            )
        if self.format == "qoperator" and "weight_only" in self.passes:
            raise RecipeError(
                "weight-only presets have no QOperator form (activations stay float): use --format matmulnbits "
                "(com.microsoft.MatMulNBits) or --format qdq (int4 DequantizeLinear + MatMul)"
            )
        for ov in self.overrides:
            if ov.op_type is not None and ov.op_type not in self.op_types:
                raise RecipeError(f"[[override]] {ov.selector} never applies: this recipe quantizes only the op types "
                                  f"{', '.join(self.op_types)} (op_types)")  # fmt: skip

    def needs_calibration(self) -> bool:
        """Whether the passes need calibration samples (activation ranges or weight-only statistics)."""
        return (
            "insert_qdq" in self.passes
            or "smoothquant" in self.passes
            or ("weight_only" in self.passes and self.weight_only.method != "rtn")
        )

    def pass_names(self) -> tuple[str, ...]:
        """The passes to run: ``passes``, plus the ``qoperator`` lowering at the end for ``format = "qoperator"``."""
        if self.format == "qoperator" and "qoperator" not in self.passes:
            return (*self.passes, "qoperator")
        return self.passes

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

    def with_(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)


def _check_keys(data: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    valid = list(valid)
    for key in data:
        if key not in valid:
            raise RecipeError(f"unknown key {show(key)} in {where}; valid keys: {', '.join(valid)}{suggest(key, valid)}")


@contextlib.contextmanager
def _blame(where: str) -> Iterator[None]:
    """Prefix the RecipeErrors raised inside with ``where`` (the recipe file)."""
    try:
        yield
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from exc


def _build(cls: type, data: Any, table: str, where: str, base: Mapping[str, Any] | None = None) -> Any:
    """``cls`` from the table ``data`` (over the fields of ``base``), every key and value checked."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: {table} must be a table, got {show(data)}")
    _check_keys(data, [f.name for f in dataclasses.fields(cls)], f"{table} of {where}")
    with _blame(where):
        check_fields(cls, data, f"{table} ")  # the user's own values first: their errors name them
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in {**(base or {}), **data}.items()})


_WEIGHT_ONLY_PASSES = ("upcast_float16", "shape_inference", "constant_folding", "canonical_gelu", "remove_dead_nodes",
                       "weight_only")


def _w4(name: str, description: str, method: str, **spec: Any) -> Recipe:
    """A weight-only int4 preset: MatMulNBits output, 32 calibration windows where the method needs data."""
    calibration = CalibrationSpec() if method == "rtn" else CalibrationSpec(samples=32)
    return Recipe(name=name, description=description, passes=_WEIGHT_ONLY_PASSES, format="matmulnbits",
                  weight_only=WeightOnlySpec(method=method, **spec), calibration=calibration)  # type: ignore[arg-type]

PRESETS: dict[str, Recipe] = {
    "w8a8": Recipe(
        name="w8a8",
        description="static int8, QDQ: uint8 activations (MSE range for ReLU outputs, 99.95th percentiles "
        "for signed tensors), int8 per-channel weights (MSE range); weight bits set by the target CPU",
    ),
    "w8a8-per-tensor": Recipe(
        name="w8a8-per-tensor",
        description="static int8 like w8a8 but one scale per weight tensor (for runtimes without per-channel)",
        weights=WeightSpec(granularity="per-tensor"),
    ),
    "w8a16": Recipe(
        name="w8a16",
        description="int8 per-channel weights with uint16 activations: higher accuracy, QDQ (opset 21)",
        activations=ActivationSpec(dtype="uint16"),
        # with 65536 levels clipping buys nothing: cover the whole observed range
        calibration=CalibrationSpec(method="minmax"),
    ),
    "w8a8-smoothquant": Recipe(
        name="w8a8-smoothquant",
        description="static int8 for transformers: SmoothQuant moves activation outliers into the weights "
        "(alpha 0.5, or --alpha auto), then w8a8 QDQ with MSE activation ranges (percentiles would clip the outliers)",
        # LayerNorm outputs carry rare large values that matter: a percentile range clips them (MiniLM embedding
        # cosine to fp32 0.917 with mse-percentile vs 0.995 with mse, measured 2026-11-30)
        calibration=CalibrationSpec(method="mse"),
        passes=("upcast_float16", "shape_inference", "constant_folding", "fold_batchnorm", "canonical_gelu",
                "remove_dead_nodes", "int8_embeddings", "smoothquant", "insert_qdq"),  # fmt: skip
    ),
    "int8-dynamic": Recipe(
        name="int8-dynamic",
        description="dynamic int8, no calibration: weight MatMul/Gemm run as MatMulInteger with one activation "
        "scale per token computed at run time (after a block-64 Hadamard rotation); int8 per-channel weights, "
        "bits set by the target CPU",
        passes=("upcast_float16", "shape_inference", "constant_folding", "canonical_gelu", "remove_dead_nodes",
                "int8_embeddings", "dynamic"),
    ),
    "qoperator": Recipe(
        name="qoperator",
        description="no new quantization: lower an already-QDQ model (from onnxq, onnxruntime or PyTorch QAT) "
        "to QOperator ops (QLinearConv, QLinearMatMul, MatMulInteger, ...) for the --target",
        passes=("shape_inference", "qoperator"),
        format="qoperator",
    ),
    "w4-rtn": _w4("w4-rtn", "int4 weight-only, round to nearest, no calibration: MatMul weights in 4 bits "
                  "(asymmetric, block 128) as com.microsoft.MatMulNBits, int8 embeddings, float activations", "rtn"),
    "w4-gptq": _w4("w4-gptq", "int4 weight-only with GPTQ (needs --calib, e.g. 32 x 512 tokens): rounding errors "
                   "compensated layer by layer from each layer's input statistics; MatMulNBits, block 128", "gptq"),
    "w4-gptq-awq": _w4("w4-gptq-awq", "int4 weight-only, AWQ's scale search and fold on each layer input, then GPTQ "
                       "on the scaled weights (needs --calib): the most accurate of the w4 presets on SmolLM2; "
                       "MatMulNBits, block 128", "gptq", awq_scales=True, awq_loss="linear"),
    "w4-awq": _w4("w4-awq", "int4 weight-only with AWQ (needs --calib): per-channel scales that protect salient "
                  "weights, folded into the preceding op, then clipping search; MatMulNBits, block 128", "awq"),
    "fp16": Recipe(
        name="fp16",
        description="float16 conversion, no calibration: weights and compute in float16, float32 inputs/outputs; "
        "normalisations, softmax and reductions stay float32",
        passes=("shape_inference", "constant_folding", "fold_batchnorm", "canonical_gelu", "remove_dead_nodes", "float16"),
    ),
}


def preset(name: str) -> Recipe:
    """The preset called ``name``; an unknown name is a RecipeError listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise RecipeError(f"unknown preset '{name}'; valid presets: {', '.join(PRESETS)} (see `onnxq presets`)") from None


_TOP_LEVEL = ("preset", "name", "description", "version", "passes", "target", "op_types", "quantize_outputs",
              "activations", "weights", "calibration", "exclude", "override", "float16", "smoothquant", "dynamic",
              "weight_only", "format")  # fmt: skip


_TABLES: dict[str, type] = {
    "activations": ActivationSpec, "weights": WeightSpec, "calibration": CalibrationSpec, "exclude": ExcludeSpec,
    "float16": Float16Spec, "smoothquant": SmoothQuantSpec, "dynamic": DynamicSpec, "weight_only": WeightOnlySpec,
}  # fmt: skip


def recipe_from_dict(data: Mapping[str, Any], *, where: str = "recipe") -> Recipe:
    """Build a Recipe from plain data (a parsed TOML file, a batch manifest's or a model's metadata
    round trip), strictly: every key and every value is checked, and errors start with ``where``."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where} must be a table of settings, got {show(data)}")
    _check_keys(data, _TOP_LEVEL, where)
    with _blame(where):
        if "preset" in data and not isinstance(data["preset"], str):
            raise RecipeError(f"preset = {show(data['preset'])} must be a string (see `onnxq presets`)")
        base = preset(data["preset"]) if "preset" in data else Recipe()
        top = {k: data[k] for k in _TOP_LEVEL if k in data and k not in _TABLES and k not in ("preset", "override")}
        check_fields(Recipe, top, "")
    changes: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in top.items()}
    for key, cls in _TABLES.items():
        if key in data:
            changes[key] = _build(cls, data[key], f"[{key}]", where, dataclasses.asdict(getattr(base, key)))
    if "override" in data:
        if not isinstance(data["override"], list):
            raise RecipeError(f"'override' in {where} must be an array of tables: use [[override]]")
        changes["overrides"] = tuple(_build(Override, o, f"[[override]] #{i + 1}", where)
                                     for i, o in enumerate(data["override"]))  # fmt: skip
    with _blame(where):
        return dataclasses.replace(base, **changes)


def load_recipe(path: str | Path) -> Recipe:
    """Read a TOML recipe file (data only; nothing in it is ever executed)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe file {p} is not valid TOML: {exc}") from exc
    return recipe_from_dict(data, where=f"recipe {p}")


def unmatched_selectors(recipe: Recipe, nodes: Iterable[tuple[str, str]]) -> list[str]:
    """Warnings for the exclusions and overrides of ``recipe`` that match no node of a model.

    ``nodes``: the model's (name, op_type) pairs. Each warning names the selector and, for a near miss, the
    node name or op type meant (no square brackets: the CLI prints notes through rich markup). An exclusion that matches nothing means the user's intent was not applied,
    but it is a warning (a report note the CLI prints), not an error: one recipe or batch ``[defaults]``
    serves many models, and excluding an op type a model lacks is normal there. (A name that is no ONNX
    op type at all is refused at load instead: it can only be a typo.)
    """
    pairs = list(nodes)
    names, ops = {n for n, _ in pairs}, {o for _, o in pairs}

    def miss(subject: str, value: str, pool: set[str]) -> str:
        return f"{subject} {show(value)} matches no node of this model, so it has no effect{suggest(value, pool)}"

    ex = recipe.exclude
    out = [miss("exclusion --exclude-op (recipe exclude.op_types)", o, ops) for o in ex.op_types if o not in ops]
    out += [miss("exclusion --exclude-node (recipe exclude.names)", n, names) for n in ex.names if n not in names]
    out += [miss("exclusion --exclude-regex (recipe exclude.name_regex)", rx, set())
            for rx in ex.name_regex if not any(re.search(rx, n) for n in names)]  # fmt: skip
    if "float16" in recipe.passes:
        out += [miss("float16.node_block_list entry", n, names) for n in recipe.float16.node_block_list if n not in names]
    for ov in recipe.overrides:
        if not any(ov.matches(n, o) for n, o in pairs):
            pool = {"op_type": ops, "name": names}.get(ov.selector_key, set())
            out.append(miss(f"recipe override with {ov.selector_key}", getattr(ov, ov.selector_key), pool))
    return out


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain data for a recipe (for metadata_props and report.json)."""
    data = dataclasses.asdict(recipe)
    data["override"] = [dict(o) for o in data.pop("overrides")]
    return data
