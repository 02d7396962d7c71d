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

The data model (the dataclasses) is in :mod:`onnxq.recipe_schema` and the presets in :mod:`onnxq.presets`;
this module loads and dumps recipes and re-exports both, so every name stays importable from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from onnxq.errors import RecipeError
from onnxq.presets import PRESETS, preset
from onnxq.recipe_schema import (
    FLOAT16_BLOCK_LIST,
    PASS_NAMES,
    QUANTIZABLE_OPS,
    ActivationSpec,
    CalibrationSpec,
    DynamicSpec,
    ExcludeSpec,
    Float16Spec,
    NodeConfig,
    NodeSelection,
    Override,
    Recipe,
    SmoothQuantSpec,
    WeightOnlySpec,
    WeightSpec,
)
from onnxq.validation import check_fields, show, suggest

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
    "PASS_NAMES",
    "QUANTIZABLE_OPS",
    "Override",
    "NodeConfig",
    "NodeSelection",
    "Recipe",
    "PRESETS",
    "preset",
    "load_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
    "unmatched_selectors",
]


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
    from onnxq.passes import build_passes

    out += [miss(subject, n, names) for p in build_passes(recipe) for subject, n in p.node_names() if n not in names]
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
