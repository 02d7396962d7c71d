"""The weight-only pass's settings, split by algorithm: what RTN, GPTQ and AWQ each read.

A recipe keeps one flat ``[weight_only]`` table (:class:`onnxq.recipe.WeightOnlySpec`, TOML format version 1);
:meth:`WeightOnlySettings.from_recipe` splits it when the pass is built, so that GPTQ's code receives
:class:`GPTQSettings` (damping, act-order, MSE range, optional AWQ scales), AWQ's :class:`AWQSettings`
(grid, duo, clip, loss) and RTN nothing but the grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, Union

from onnxq.recipe_schema import NodeSelection
from onnxq.weightonly.grid import WeightGrid

if TYPE_CHECKING:
    from onnxq.recipe import Recipe, WeightOnlySpec

__all__ = ["IntGrid", "RTNSettings", "AWQSettings", "GPTQSettings", "Algorithm", "WeightOnlySettings"]


@dataclass(frozen=True)
class IntGrid:
    """The integer grid of the quantized weights: ``bits``, symmetric or a zero point per block, and
    ``block_size`` rows of K per scale (0: one block per output column, per-channel)."""

    bits: int = 4
    symmetric: bool = False
    block_size: int = 128

    def weight_grid(self, bits: int | None = None) -> WeightGrid:
        """The :class:`WeightGrid` of this grid (with ``bits`` instead, for an int8 output projection)."""
        return WeightGrid(self.bits if bits is None else bits, self.symmetric, self.block_size or None)


@dataclass(frozen=True)
class RTNSettings:
    """Round to nearest: no settings of its own."""

    name: ClassVar[str] = "rtn"


@dataclass(frozen=True)
class AWQSettings:
    """AWQ's scale search: ``grid`` exponents tried, ``duo`` (also AutoAWQ's duo scaling), ``clip`` (the clipping
    search after the scale search; off when GPTQ rounds the scaled weights) and ``loss`` (what scores a candidate:
    the ``"module"``'s output or each ``"linear"``'s own)."""

    name: ClassVar[str] = "awq"
    grid: int = 20
    duo: bool = False
    clip: bool = True
    loss: Literal["module", "linear"] = "module"


@dataclass(frozen=True)
class GPTQSettings:
    """GPTQ: Hessian ``damp``ing, ``act_order``, the ``mse_range`` block-range search, and ``awq`` (AWQ's scales
    searched and folded on each layer input first; None: plain GPTQ)."""

    name: ClassVar[str] = "gptq"
    damp: float = 0.01
    act_order: bool = True
    mse_range: bool = True
    awq: AWQSettings | None = None


Algorithm = Union[RTNSettings, GPTQSettings, AWQSettings]


def _awq(spec: WeightOnlySpec, clip: bool) -> AWQSettings:
    return AWQSettings(grid=spec.awq_grid, duo=spec.awq_duo, clip=clip, loss=spec.awq_loss)


def algorithm_from_spec(spec: WeightOnlySpec) -> Algorithm:
    """The algorithm settings of a flat ``[weight_only]`` table (``method`` and its fields)."""
    if spec.method == "gptq":
        return GPTQSettings(spec.damp, spec.act_order, spec.mse_range, _awq(spec, clip=False) if spec.awq_scales else None)
    if spec.method == "awq":
        return _awq(spec, clip=spec.awq_clip)
    return RTNSettings()


@dataclass(frozen=True)
class WeightOnlySettings:
    """What :class:`~onnxq.passes.weight_only.WeightOnlyPass` reads of a recipe: the node selection (which
    MatMuls and Gather tables), the grid, MatMulNBits' ``accuracy_level``, the ``lm_head`` and ``embeddings``
    choices, the output ``format`` and the algorithm with its own settings."""

    selection: NodeSelection = field(default_factory=NodeSelection)
    grid: IntGrid = field(default_factory=IntGrid)
    accuracy_level: int | Literal["auto"] = "auto"
    lm_head: Literal["same", "int8", "float"] = "int8"
    embeddings: Literal["float", "int8"] = "int8"
    format: Literal["qdq", "qoperator", "matmulnbits"] = "matmulnbits"
    algorithm: Algorithm = field(default_factory=RTNSettings)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> WeightOnlySettings:
        spec = recipe.weight_only
        return cls(recipe.selection(), IntGrid(spec.bits, spec.symmetric, spec.block_size), spec.accuracy_level,
                   spec.lm_head, spec.embeddings, recipe.format, algorithm_from_spec(spec))  # fmt: skip

    @property
    def method(self) -> str:
        """``"rtn"``, ``"gptq"`` or ``"awq"``."""
        return self.algorithm.name
