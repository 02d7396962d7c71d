"""Recipes: strict TOML, presets, override priority, exclusions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxq.errors import RecipeError
from onnxq.recipe import PRESETS, load_recipe, preset, recipe_from_dict, recipe_to_dict


def test_presets_exist_and_describe_themselves() -> None:
    assert "w8a8" in PRESETS
    assert all(r.description for r in PRESETS.values())
    with pytest.raises(RecipeError, match=r"unknown preset 'nope'; valid presets: w8a8"):
        preset("nope")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"wieghts": {}}, "unknown key 'wieghts' in recipe; valid keys: preset, name"),
        ({"weights": {"granularty": "x"}}, "unknown key 'granularty' in [weights]"),
        ({"calibration": {"method": "magic"}}, "[calibration] method = 'magic' is not one of 'minmax'"),
        ({"activations": {"dtype": "int3"}}, "[activations] dtype = 'int3' is not one of 'int8', 'uint8'"),
        ({"op_types": ["LSTM"]}, "op_types entry 'LSTM' is not one of 'Conv', 'Gemm'"),
        ({"override": {"op_type": "Conv"}}, "use [[override]]"),
        ({"override": [{"op_type": "Conv", "name": "x"}]}, "exactly one of op_type, name or name_regex"),
        ({"override": [{"name_regex": "("}]}, "not a valid regular expression"),
        ({"override": [{"op_type": "Conv", "weights": {"bits": 4}}]}, "unknown key 'bits' in [[override]] #1 weights"),
        ({"calibration": {"samples": 0}}, "[calibration] samples = 0 must be >= 1"),
    ],
)
def test_strict_errors(data: dict, message: str) -> None:
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(data)
    assert message in str(exc.value)


def test_override_priority_global_optype_regex_name() -> None:
    r = recipe_from_dict({
        "weights": {"granularity": "per-channel"},
        "override": [
            {"name": "head/fc", "weights": {"symmetric": False}},
            {"name_regex": "^head/", "weights": {"granularity": "per-tensor", "symmetric": True}},
            {"op_type": "Gemm", "weights": {"granularity": "per-channel", "reduce_range": True}},
        ],
    })  # fmt: skip
    fc = r.config_for("head/fc", "Gemm")
    assert fc is not None
    assert fc.weights.granularity == "per-tensor"  # regex beats op type
    assert fc.weights.symmetric is False  # exact name beats regex
    assert fc.weights.reduce_range is True  # op type beats global
    other = r.config_for("body/fc", "Gemm")
    assert other is not None and other.weights.granularity == "per-channel" and other.weights.symmetric


def test_exclusions_and_skip() -> None:
    r = recipe_from_dict({
        "exclude": {"op_types": ["Resize"], "names": ["conv1"], "name_regex": ["^aux/"]},
        "override": [{"op_type": "Add", "skip": True}],
    })  # fmt: skip
    assert r.config_for("up", "Resize") is None
    assert r.config_for("conv1", "Conv") is None
    assert r.config_for("aux/conv", "Conv") is None
    assert r.config_for("add1", "Add") is None
    assert r.config_for("conv2", "Conv") is not None
    assert r.config_for("lstm", "LSTM") is None  # not a quantizable op


def _toml_value(v: object) -> str:
    """One TOML value: a string, bool, number, array or inline table (None is never passed: TOML has no null)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"no TOML for {v!r}")


def _recipe_toml(data: dict) -> str:
    """A recipe's plain data (recipe_to_dict) written as a TOML file the way a user would: top-level keys, then
    one [table] per settings group and one [[override]] per override. Unset (None) values are left out."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if k != "override" and not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += [f"[{key}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)]
    for override in data["override"]:
        lines += ["[[override]]", *(f"{k} = {_toml_value(v)}" for k, v in override.items() if v is not None)]
    return "\n".join(lines) + "\n"


def test_toml_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "r.toml"
    p.write_text('preset = "w8a8"\nname = "mine"\n[calibration]\nsamples = 16\n[exclude]\nnames = ["head/fc"]\n'
                 '[[override]]\nop_type = "Gemm"\nskip = true\n[[override]]\nname_regex = "^body/"\n'
                 '[override.weights]\ngranularity = "per-tensor"\n')  # fmt: skip
    r = load_recipe(p)
    assert r.name == "mine" and r.calibration.samples == 16 and r.overrides[0].skip
    assert r.exclude.names == ("head/fc",) and r.overrides[1].weights == {"granularity": "per-tensor"}
    data = recipe_to_dict(r)
    assert data["override"][0]["op_type"] == "Gemm" and data["calibration"]["samples"] == 16
    # every setting written back as TOML loads into the same recipe
    again = tmp_path / "again.toml"
    again.write_text(_recipe_toml(data))
    assert load_recipe(again) == r


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_toml(tmp_path: Path, name: str) -> None:
    p = tmp_path / f"{name}.toml"
    p.write_text(_recipe_toml(recipe_to_dict(preset(name))))
    assert load_recipe(p) == preset(name)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(bad)
