"""build_passes: each pass is built with its own settings from the recipe (never the whole recipe), and what
the driver asks of the built passes (calibration, opset, text windows, refusals) is what the recipe's
membership checks answered before."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from onnxq.api import LLM_SEQ_LEN, calibration_defaults, check_calibration_given
from onnxq.errors import CalibrationError
from onnxq.passes import PASSES, build_passes
from onnxq.passes.dynamic import DynamicSettings
from onnxq.passes.insert_qdq import InsertQDQSettings
from onnxq.passes.smoothquant import SmoothQuantSettings
from onnxq.quantization import CalibrationOptions, _required_opset
from onnxq.recipe import PRESETS, ExcludeSpec, NodeSelection, Recipe, load_recipe, preset, recipe_from_dict, recipe_to_dict
from onnxq.weightonly.settings import AWQSettings, GPTQSettings, IntGrid, RTNSettings, WeightOnlySettings

# what Recipe.needs_calibration() and quantize._required_opset answered before the passes declared it
# (measured on the code before this change, one row per preset)
BEFORE = {
    "w8a8": (True, 13), "w8a8-per-tensor": (True, 13), "w8a16": (True, 21), "w8a8-smoothquant": (True, 13),
    "int8-dynamic": (False, 13), "qoperator": (False, 13), "w4-rtn": (False, 13), "w4-gptq": (True, 13),
    "w4-gptq-awq": (True, 13), "w4-awq": (True, 13), "fp16": (False, 13),
}  # fmt: skip


def _pass(recipe: Recipe, name: str) -> object:
    return next(p for p in build_passes(recipe) if p.name == name)


def test_build_passes_follows_pass_names() -> None:
    for name in PRESETS:
        recipe = preset(name)
        passes = build_passes(recipe)
        assert [p.name for p in passes] == list(recipe.pass_names())
        assert all(type(p) is PASSES[p.name] for p in passes)


def test_gptq_pass_gets_gptq_settings_only() -> None:
    recipe = preset("w4-gptq").with_(weight_only=dataclasses.replace(preset("w4-gptq").weight_only, damp=0.05,
                                                                       act_order=False, block_size=32))  # fmt: skip
    settings = _pass(recipe, "weight_only").settings  # type: ignore[attr-defined]
    assert isinstance(settings, WeightOnlySettings)
    assert settings.algorithm == GPTQSettings(damp=0.05, act_order=False, mse_range=True, awq=None)
    assert settings.grid == IntGrid(bits=4, symmetric=False, block_size=32)
    assert settings.format == "matmulnbits" and settings.method == "gptq"
    assert not hasattr(settings.algorithm, "awq_grid") and not hasattr(settings, "damp")


def test_awq_settings_split_by_method() -> None:
    gptq_awq = _pass(preset("w4-gptq-awq"), "weight_only").settings.algorithm  # type: ignore[attr-defined]
    wo = preset("w4-gptq-awq").weight_only
    # under GPTQ, AWQ only scales: GPTQ rounds the scaled weights, so AWQ's clip search is off
    assert gptq_awq == GPTQSettings(wo.damp, wo.act_order, wo.mse_range, AWQSettings(wo.awq_grid, wo.awq_duo, False, wo.awq_loss))
    awq = _pass(preset("w4-awq"), "weight_only").settings.algorithm  # type: ignore[attr-defined]
    wo = preset("w4-awq").weight_only
    assert awq == AWQSettings(grid=wo.awq_grid, duo=wo.awq_duo, clip=wo.awq_clip, loss=wo.awq_loss)
    assert _pass(preset("w4-rtn"), "weight_only").settings.algorithm == RTNSettings()  # type: ignore[attr-defined]


def test_quantizing_passes_get_their_tables() -> None:
    recipe = preset("w8a8-smoothquant").with_(quantize_outputs=True, exclude=ExcludeSpec(names=("fc",)))
    assert _pass(recipe, "insert_qdq").settings == InsertQDQSettings(  # type: ignore[attr-defined]
        NodeSelection.from_recipe(recipe), True, recipe.calibration.method)
    assert _pass(recipe, "smoothquant").settings == SmoothQuantSettings(recipe.selection(), recipe.smoothquant)  # type: ignore[attr-defined]
    assert _pass(recipe, "int8_embeddings").exclude == ExcludeSpec(names=("fc",))  # type: ignore[attr-defined]
    dyn = preset("int8-dynamic")
    assert _pass(dyn, "dynamic").settings == DynamicSettings(dyn.selection(), dyn.dynamic)  # type: ignore[attr-defined]
    fp16 = preset("fp16")
    assert _pass(fp16, "float16").settings == fp16.float16  # type: ignore[attr-defined]


def test_node_selection_is_recipe_config_for() -> None:
    recipe = recipe_from_dict({"preset": "w8a8", "exclude": {"names": ["a"]},
                               "override": [{"op_type": "Conv", "weights": {"granularity": "per-tensor"}},
                                            {"name": "b", "skip": True}]})  # fmt: skip
    sel = recipe.selection()
    for name, op in (("a", "Conv"), ("b", "MatMul"), ("c", "Conv"), ("d", "MatMul"), ("e", "Relu")):
        assert sel.config_for(name, op) == recipe.config_for(name, op)
    assert sel.config_for("a", "Conv") is None and sel.config_for("b", "MatMul") is None
    assert sel.config_for("c", "Conv").weights.granularity == "per-tensor"  # type: ignore[union-attr]


@pytest.mark.parametrize("name", list(BEFORE))
def test_needs_calibration_and_opset_as_before(name: str) -> None:
    recipe = preset(name)
    assert (recipe.needs_calibration(), _required_opset(recipe, build_passes(recipe))[0]) == BEFORE[name]


def test_opset_reasons() -> None:
    assert _required_opset(preset("w4-rtn").with_(format="qdq"), build_passes(preset("w4-rtn").with_(format="qdq"))) == (
        21, "blocked int4 DequantizeLinear needs opset 21")
    assert _required_opset(preset("w8a16"), build_passes(preset("w8a16"))) == (
        21, "per-channel QDQ needs opset 13+, int4/int16 QDQ opset 21")


def test_text_window_default_only_for_weight_only(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    opts = CalibrationOptions(source=str(text), tokenizer="tok.json")
    assert calibration_defaults(preset("w4-gptq"), opts).seq_len == LLM_SEQ_LEN
    assert calibration_defaults(preset("w4-rtn"), opts).seq_len == LLM_SEQ_LEN
    assert calibration_defaults(preset("w8a8-smoothquant"), opts) == opts
    assert calibration_defaults(preset("w4-gptq"), dataclasses.replace(opts, max_length=64)).seq_len is None


def test_missing_calibration_messages() -> None:
    with pytest.raises(CalibrationError, match=r"runs GPTQ, which needs calibration text: --calib TOKENS.json"):
        check_calibration_given(preset("w4-gptq"), None, calib_cache="ranges.json")
    with pytest.raises(CalibrationError, match=r"'w8a8-smoothquant' is static quantization and needs --calib"):
        check_calibration_given(preset("w8a8-smoothquant"), None)
    check_calibration_given(preset("w8a8"), None, calib_cache="ranges.json")  # the cache answers the ranges
    check_calibration_given(preset("w4-rtn"), None)
    check_calibration_given(preset("fp16"), CalibrationOptions())


def test_runs_is_the_one_membership_question() -> None:
    assert preset("w8a8").with_(format="qoperator").runs("qoperator")
    assert not preset("w8a8").runs("qoperator") and preset("w8a8-smoothquant").runs("smoothquant")
    source = Path(__file__).resolve().parents[1]
    membership = re.compile(r"[\"'](\w+)[\"'] (not )?in (recipe|self)\.passes")  # "weight_only" in recipe.passes
    offenders = [f"{p.relative_to(source)}" for folder in ("onnxq", "passes") for p in (source / folder).rglob("*.py")
                 if membership.search(p.read_text())]  # fmt: skip
    assert offenders == []


def test_toml_weight_only_table_reaches_the_pass(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('preset = "w4-gptq"\n[weight_only]\nblock_size = 32\ndamp = 0.05\nact_order = false\nawq_scales = true\n'
                    'awq_grid = 10\n')  # fmt: skip
    recipe = load_recipe(path)
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
    algo = _pass(recipe, "weight_only").settings.algorithm  # type: ignore[attr-defined]
    wo = recipe.weight_only
    assert algo == GPTQSettings(damp=0.05, act_order=False, mse_range=wo.mse_range,
                                awq=AWQSettings(grid=10, duo=wo.awq_duo, clip=False, loss=wo.awq_loss))  # fmt: skip
