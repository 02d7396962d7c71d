"""The ``onnxq`` command line's option groups: each set of options declared once, as a decorator that adds them
to a command and hands the command the library's own option object (Polygraphy's argument groups).

``calibration_options`` gives ``calibration: CalibrationOptions``, ``recipe_options`` gives
``choice: RecipeChoice`` (``--preset``/``--recipe``) and ``recipe_flags`` gives ``flags: RecipeFlags`` (the
options folded into the recipe). A command takes a subset and its own help wording through the decorator's
arguments. Nothing of the library is imported here at start-up, so that ``onnxq --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from onnxq.calibration.observers import OBSERVERS

__all__ = ["RecipeChoice", "RecipeFlags", "calibration_options", "recipe_flags", "recipe_options"]


class _PreprocessChoice(click.Choice):  # type: ignore[type-arg]
    """``click.Choice`` over ``onnxq.calibration.sources.PREPROCESS`` (the named image preprocessings), read when
    click first needs it (help, parsing): importing the calibration sources at start-up costs every command a
    second, and click's Choice copies its choices when built."""

    def __init__(self) -> None:
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        from onnxq.calibration.sources import PREPROCESS

        return PREPROCESS

    @choices.setter
    def choices(self, value: Any) -> None:
        """click.Choice.__init__ sets the choices; they are always PREPROCESS."""


_CALIB_OPTIONS = ("calib", "preprocess", "size", "resize", "crop", "tokenizer", "max_length", "seq_len")
"""The calibration options in the order ``--help`` lists them (CalibrationOptions field names)."""

_CALIB_HELP = {
    "calib": "Calibration data (as for `onnxq quantize --calib`).",
    "preprocess": "Named image preprocessing (image folders).",
    "size": "How many calibration samples (default: the recipe's).",
    "resize": "Resize the shorter image side before cropping.",
    "crop": "Center-crop size.",
    "tokenizer": "tokenizer.json for text calibration files.",
    "max_length": "Truncate tokenized text samples to this many tokens.",
    "seq_len": "Window length for token-id .json files.",
}
"""The short help of each calibration option; a command gives its own wording where it says more."""


def _calibration_option(key: str, help: str, *, required: bool, size_default: int | None) -> Callable[[Any], Any]:
    """The click option of one CalibrationOptions field (``--calib-size`` for ``size``, ...)."""
    flag = {"calib": "--calib", "preprocess": "--calib-preprocess", "size": "--calib-size", "resize": "--calib-resize",
            "crop": "--calib-crop", "tokenizer": "--tokenizer", "max_length": "--max-length", "seq_len": "--seq-len"}[key]  # fmt: skip
    name = "_calib_" + key
    if key in ("calib", "tokenizer"):
        return click.option(flag, name, required=required and key == "calib", help=help)
    if key == "preprocess":
        return click.option(flag, name, type=_PreprocessChoice(), help=help)
    if key == "size" and size_default is not None:
        return click.option(flag, name, type=click.IntRange(min=1), default=size_default, show_default=True, help=help)
    return click.option(flag, name, type=click.IntRange(min=1), help=help)


def calibration_options(*, only: tuple[str, ...] = _CALIB_OPTIONS, required: bool = False,
                        size_default: int | None = None, **helps: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:  # fmt: skip
    """Add the calibration options (``--calib``, ``--calib-preprocess``, ``--calib-size``, ``--calib-resize``,
    ``--calib-crop``, ``--tokenizer``, ``--max-length``, ``--seq-len``) to a command, declared once here, and
    pass them to it as one ``calibration: CalibrationOptions`` argument (Polygraphy's argument groups).

    ``only`` is a command's subset (the others stay None), ``required`` makes ``--calib`` required,
    ``size_default`` gives ``--calib-size`` a default, and ``helps`` (keyed by field name) a command's own
    wording of an option's help.
    """
    unknown = set(only) - set(_CALIB_OPTIONS) | set(helps) - set(_CALIB_OPTIONS)
    assert not unknown, f"unknown calibration options {sorted(unknown)}"

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {key: kwargs.pop("_calib_" + key, None) for key in only}
            from onnxq.quantization import CalibrationOptions

            values["source"] = values.pop("calib")
            return fn(*args, calibration=CalibrationOptions(**values), **kwargs)

        for key in reversed(only):
            command = _calibration_option(key, helps.get(key, _CALIB_HELP[key]), required=required,
                                          size_default=size_default)(command)  # fmt: skip
        return command

    return decorate


@dataclasses.dataclass(frozen=True)
class RecipeChoice:
    """``--preset`` / ``--recipe`` as given: :meth:`recipe` reads them with the library's single rule."""

    preset: str | None
    file: Path | None

    def recipe(self, *, default: bool = True) -> Any:
        """The recipe (``onnxq.api.choose_recipe``); None when neither is given and ``default`` is False.

        Both at once is a usage error (exit 2), as click's own.
        """
        from onnxq.api import choose_recipe
        from onnxq.errors import RecipeConflictError

        if not default and self.preset is None and self.file is None:
            return None
        try:
            return choose_recipe(self.preset, self.file)
        except RecipeConflictError:
            raise click.UsageError("give either --preset or --recipe, not both") from None

    def reads(self) -> list[Any]:
        """The recipe file as a file the run reads (never to be written over)."""
        from onnxq.destinations import Read

        return [Read(self.file, "recipe (--recipe)")]


def recipe_options(preset_help: str, recipe_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add ``--preset`` and ``--recipe`` to a command and pass them as one ``choice: RecipeChoice`` argument."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(*args: Any, _preset: str | None, _recipe_file: Path | None, **kwargs: Any) -> Any:
            return fn(*args, choice=RecipeChoice(_preset, _recipe_file), **kwargs)

        command = click.option("--recipe", "_recipe_file", type=click.Path(path_type=Path), help=recipe_help)(command)
        return click.option("--preset", "_preset", default=None, help=preset_help)(command)

    return decorate


_RECIPE_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "calibrator": ("--calibrator", {"type": click.Choice(sorted(OBSERVERS)), "help": "Activation range method (default: the recipe's)."}),
    "target": ("--target", {"help": "Deployment target profile: auto (this CPU), x86-avx2, x86-avx2-u8, x86-vnni, arm64, generic, cuda."}),
    "device": ("--device", {"type": click.Choice(["auto", "cpu", "cuda"]), "help": "Where calibration runs (auto prefers CUDA when onnxruntime-gpu sees a GPU)."}),
    "exclude_op": ("--exclude-op", {"multiple": True, "help": "Leave every node of this op type in float (repeatable)."}),
    "exclude_node": ("--exclude-node", {"multiple": True, "help": "Leave this node (exact name) in float (repeatable)."}),
    "exclude_regex": ("--exclude-regex", {"multiple": True, "help": "Leave nodes whose name matches this regex in float (repeatable)."}),
    "exclude_activation_matmuls": ("--exclude-activation-matmuls", {"is_flag": True, "help": "Leave MatMuls of two activations (attention Q @ K^T and probs @ V) in float."}),
    "out_format": ("--format", {"type": click.Choice(["qdq", "qoperator", "matmulnbits"]), "help": "Output form: qdq (QuantizeLinear/DequantizeLinear around float ops; default; for weight-only presets: int4 DequantizeLinear + MatMul, opset 21), qoperator (QLinearConv, QLinearMatMul, MatMulInteger, ...: lowered for the --target's kernels) or matmulnbits (com.microsoft.MatMulNBits; the default of the w4-* presets)."}),
    "block_size": ("--block-size", {"type": int, "help": "Weight-only presets: rows of K sharing one scale per output column (16, 32, 64, 128 (default), 256; 0 = per channel)."}),
    "symmetric": ("--symmetric", {"is_flag": True, "help": "Weight-only presets: symmetric int4 (zero point fixed at 8) instead of a zero point per block."}),
    "lm_head": ("--lm-head", {"type": click.Choice(["same", "int8", "float"]), "help": "Weight-only presets: the output projection (the last weight MatMul) in 8 bits (int8, the default of the w4-* presets), quantized like the rest (same), or left float."}),
    "alpha": ("--alpha", {"help": "SmoothQuant migration strength in [0, 1] (default 0.5), or 'auto' to search it per layer (presets with smoothquant)."}),
}  # fmt: skip
"""The options that change the recipe (``RecipeFlags`` fields), declared once: flag and click settings."""


@dataclasses.dataclass(frozen=True)
class RecipeFlags:
    """The command-line changes to a recipe (``--calibrator``, ``--exclude-op``, ``--format``, ...)."""

    calibrator: str | None = None
    target: str | None = None
    device: str | None = None
    exclude_op: tuple[str, ...] = ()
    exclude_node: tuple[str, ...] = ()
    exclude_regex: tuple[str, ...] = ()
    exclude_activation_matmuls: bool = False
    out_format: str | None = None
    block_size: int | None = None
    symmetric: bool = False
    lm_head: str | None = None
    alpha: str | None = None

    def apply(self, recipe: Any, calib_size: int | None) -> Any:
        """``recipe`` with these flags (and ``--calib-size``) folded in; a flag the recipe cannot take is a usage error."""
        recipe = _apply_flags(recipe, self, calib_size)
        recipe = _apply_format_alpha(recipe, self.out_format, self.alpha)
        recipe = _apply_weight_only(recipe, block_size=self.block_size, symmetric=self.symmetric, lm_head=self.lm_head)
        if self.exclude_activation_matmuls:
            recipe = recipe.with_(exclude=dataclasses.replace(recipe.exclude, activation_matmuls=True))
        return recipe


def recipe_flags(*only: str, **helps: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the recipe-changing options named in ``only`` (all when none; ``helps`` a command's own wording)
    and pass them to the command as one ``flags: RecipeFlags`` argument."""
    names = only or tuple(_RECIPE_FLAGS)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, flags=RecipeFlags(**{n: kwargs.pop("_flag_" + n) for n in names}), **kwargs)

        for name in reversed(names):
            flag, settings = _RECIPE_FLAGS[name]
            command = click.option(flag, "_flag_" + name, **{**settings, **({"help": helps[name]} if name in helps else {})})(command)
        return command

    return decorate


def _apply_flags(recipe: Any, flags: RecipeFlags, calib_size: int | None) -> Any:
    """Fold the command-line overrides of the calibration, exclusions and target into the recipe."""
    calib = recipe.calibration
    if calib_size:
        calib = dataclasses.replace(calib, samples=calib_size)
    if flags.calibrator:
        calib = dataclasses.replace(calib, method=flags.calibrator)
    if flags.device:
        calib = dataclasses.replace(calib, device=flags.device)
    ex = recipe.exclude
    ex = dataclasses.replace(
        ex,
        op_types=ex.op_types + flags.exclude_op,
        names=ex.names + flags.exclude_node,
        name_regex=ex.name_regex + flags.exclude_regex,
    )
    changes: dict[str, Any] = {"calibration": calib, "exclude": ex}
    if flags.target:
        from onnxq.target import resolve_target

        resolve_target(flags.target)  # validates the name
        changes["target"] = flags.target
    return recipe.with_(**changes)


def _apply_format_alpha(recipe: Any, out_format: str | None, alpha: str | None) -> Any:
    """``--format`` and ``--alpha`` into the recipe (``--alpha`` only where the recipe smooths)."""
    if out_format:
        recipe = recipe.with_(format=out_format)
    if alpha is not None:
        if not recipe.runs("smoothquant"):
            raise click.UsageError(f"--alpha applies to SmoothQuant, which preset/recipe '{recipe.name}' does not run; "
                                   "use --preset w8a8-smoothquant")  # fmt: skip
        if alpha != "auto":
            try:
                value: float | str = float(alpha)
            except ValueError:
                raise click.UsageError(f"--alpha must be a number in [0, 1] or 'auto', got '{alpha}'") from None
        else:
            value = alpha
        recipe = recipe.with_(smoothquant=dataclasses.replace(recipe.smoothquant, alpha=value))
    return recipe


def _apply_weight_only(recipe: Any, *, block_size: int | None, symmetric: bool, lm_head: str | None) -> Any:
    """``--block-size``, ``--symmetric`` and ``--lm-head`` into the recipe's ``[weight_only]`` table."""
    changes: dict[str, Any] = {}
    if block_size is not None:
        changes["block_size"] = block_size
    if symmetric:
        changes["symmetric"] = True
    if lm_head:
        changes["lm_head"] = lm_head
    if not changes:
        return recipe
    if not recipe.runs("weight_only"):
        flags = ", ".join("--" + k.replace("_", "-") for k in changes)
        raise click.UsageError(f"{flags} applies to weight-only presets (w4-rtn, w4-gptq, w4-awq), not '{recipe.name}'")
    return recipe.with_(weight_only=dataclasses.replace(recipe.weight_only, **changes))
