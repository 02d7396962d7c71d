"""What onnxq promises about the recipes and calibration caches users bring.

* Every value of every recipe table is checked when the recipe is loaded, before any work: its type
  (booleans are TOML booleans, integers are not booleans, numbers are finite, lists hold the right
  elements), its allowed values (exact match; a near miss gets a suggestion) and its range. A bad value
  is one line naming the file, ``[table] key``, the value and what is valid -- never a silently changed
  model, never an "unexpected ..." error. ``[[override]]`` tables are typed the same way.
* Presets, command-line flags and ``recipe_from_dict`` (batch manifests, metadata round trips) go through
  the same checks; a new field is checked by its annotation alone.
* An exclusion op type that is no ONNX operator (``--exclude-op Convv``) is refused with a suggestion; an
  exclusion or override that matches no node of the model is a warning note naming it (printed by the CLI).
* A calibration cache is validated whole when read: structure, version, every range a finite pair
  ``low <= high`` within +-1e30. A hand-edited NaN, inverted or 1e38 range is refused, naming the file,
  the tensor and the fix, instead of giving bad scales with exit code 0.
* ``--lm-head``'s help names the real default (int8).
* Fuzzed recipe values give a RecipeError naming the key or load and round-trip; fuzzed cache files give a
  CalibrationError or load with only sane ranges.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxq.calibration.cache import CachedCalibration, save_cache
from onnxq.calibration.sources import RandomSource, input_specs
from onnxq.cli import main
from onnxq.errors import CalibrationError, RecipeError
from onnxq.quantization import quantize_model
from onnxq.recipe import (
    PRESETS,
    CalibrationSpec,
    ExcludeSpec,
    Override,
    Recipe,
    WeightSpec,
    load_recipe,
    preset,
    recipe_from_dict,
    recipe_to_dict,
)

# the new APIs (onnxq.validation, PASS_NAMES, RANGE_LIMIT) are imported inside the tests that use them, so
# that on a checkout without them every other promise still runs and fails or passes on its own
_HUNT = os.environ.get("ONNXQ_FUZZ_EXAMPLES")
_SETTINGS = dict(max_examples=int(_HUNT) if _HUNT else 300, derandomize=not _HUNT, database=None, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip


def _tiny_model() -> onnx.ModelProto:
    """Conv 'conv' -> Relu -> GlobalAveragePool -> Flatten -> Gemm 'fc', input 'x' [1, 3, 8, 8]."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.normal(size=(4, 3, 3, 3)), "b": rng.normal(size=(4,)), "fc_w": rng.normal(size=(5, 4))}
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["c"], ["r"], name="relu"),
        onnx.helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        onnx.helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        onnx.helper.make_node("Gemm", ["f", "fc_w"], ["y"], name="fc", transB=1),
    ]
    graph = onnx.helper.make_graph(
        nodes, "tiny",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5])],
        [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny_model(), path)
    return path


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, " ".join(result.stdout.split()), " ".join(result.stderr.split())


def _load_error(tmp_path: Path, toml: str) -> str:
    """The one-line error of loading a recipe file holding ``toml``."""
    path = tmp_path / "r.toml"
    path.write_text(toml)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"recipe {path}: "), message
    return message


# ------------------------------------------------------------------------------------------------
# item 6: recipe values are checked at load, not only keys
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[weights]\ngranularity = "per-chanel"',
         "[weights] granularity = 'per-chanel' is not one of 'per-channel', 'per-tensor' (did you mean 'per-channel'?)"),
        ('[weights]\ngranularity = "Per-Channel"', "[weights] granularity = 'Per-Channel' is not one of"),
        ('[weights]\nrange_method = "foo"', "[weights] range_method = 'foo' is not one of 'minmax', 'mse'"),
        ('[activations]\nsymmetric = "yes"', "[activations] symmetric = 'yes' must be true or false"),
        ('[weights]\nreduce_range = "maybe"', "[weights] reduce_range = 'maybe' must be true, false or 'auto'"),
        ("[calibration]\nbatch_size = 0", "[calibration] batch_size = 0 must be >= 1"),
        ("[calibration]\nema_constant = 5.0", "[calibration] ema_constant = 5.0 must be in (0, 1]"),
        ("version = 99", "version = 99 is not supported: this onnxq reads recipe version 1"),
        ('[calibration]\ndevice = "gpu"', "[calibration] device = 'gpu' is not one of 'auto', 'cpu', 'cuda'"),
        ('passes = ["shape_inference", "insert_qdg"]', "passes entry 'insert_qdg' is not one of"),
    ],
)  # fmt: skip
def test_recipe_values_from_the_issue_are_refused_at_load(tmp_path: Path, toml: str, needle: str) -> None:
    assert needle in _load_error(tmp_path, toml)


def test_unknown_pass_name_suggests_the_real_one(tmp_path: Path) -> None:
    assert "(did you mean 'insert_qdq'?)" in _load_error(tmp_path, 'passes = ["insert_qdg"]')


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[activations]\nsymmetric = 1", "[activations] symmetric = 1 must be true or false"),
        ('[activations]\nreduce_range = "true"', "must be true or false (write true without quotes)"),
        ('[calibration]\nsamples = "64"', "[calibration] samples = '64' must be an integer (write 64 without quotes)"),
        ("[calibration]\nsamples = true", "[calibration] samples = true must be an integer"),
        ("[calibration]\nsamples = 1.5", "[calibration] samples = 1.5 must be an integer"),
        ("[smoothquant]\nalpha = nan", "[smoothquant] alpha = nan must be a finite number"),
        ("[smoothquant]\nalpha = 1.5", "[smoothquant] alpha = 1.5 must be in [0, 1] or 'auto'"),
        ('[smoothquant]\nalpha = "Auto"', "must be a number or 'auto' (did you mean 'auto'?)"),
        ("[smoothquant]\nalpha_grid = []", "[smoothquant] alpha_grid = [] must not be empty"),
        ('[smoothquant]\nalpha_grid = [0.5, "x"]', "[smoothquant] alpha_grid entry 'x' must be a number"),
        ('[exclude]\nop_types = "Conv"', "[exclude] op_types = 'Conv' must be a list of strings"),
        ("[exclude]\nnames = [1]", "[exclude] names entry 1 must be a string"),
        ('[exclude]\nname_regex = ["("]', "[exclude] name_regex entry '(' is not a valid regular expression"),
        ("[exclude]\nactivation_matmuls = 0", "[exclude] activation_matmuls = 0 must be true or false"),
        ('[float16]\ndtype = "fp16"', "[float16] dtype = 'fp16' is not one of 'float16', 'bfloat16'"),
        ('[float16]\nop_block_list = "Softmax"', "[float16] op_block_list = 'Softmax' must be a list of strings"),
        ('[dynamic]\nactivation_granularity = "per-token"', "[dynamic] activation_granularity = 'per-token' is not one of"),
        ("[dynamic]\nhadamard_block = 48", "[dynamic] hadamard_block = 48 must be 0 (off) or a power of two from 8 to 256"),
        ("[weight_only]\nbits = 3", "[weight_only] bits = 3 is not one of 4, 8"),
        ("[weight_only]\ndamp = 0", "[weight_only] damp = 0 must be in (0, 1)"),
        ("[weight_only]\nawq_grid = 1", "[weight_only] awq_grid = 1 must be >= 2"),
        ('target = "x86"', "target = 'x86' is not one of 'auto', 'x86-avx2'"),
        ('format = "QDQ"', "format = 'QDQ' is not one of 'qdq', 'qoperator', 'matmulnbits' (did you mean 'qdq'?)"),
        ('name = 5', "name = 5 must be a string"),
        ('name = "a\\u001b[31mred"', "name = 'a\\x1b[31mred' must not contain control characters (found '\\x1b')"),
        ("quantize_outputs = \"no\"", "quantize_outputs = 'no' must be true or false"),
        ('op_types = ["LSTM"]', "op_types entry 'LSTM' is not one of 'Conv'"),
        ("preset = 1", "preset = 1 must be a string"),
        ("weights = 3", "[weights] must be a table, got 3"),
    ],
)  # fmt: skip
def test_every_table_and_top_level_key_is_typed(tmp_path: Path, toml: str, needle: str) -> None:
    assert needle in _load_error(tmp_path, toml)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ('op_type = "Gemm"\nweights = { granularity = "per-chanel" }',
         "[[override]] #1 weights.granularity = 'per-chanel' is not one of 'per-channel', 'per-tensor' (did you mean"),
        ('name = "fc"\nactivations = { symmetric = "yes" }', "[[override]] #1 activations.symmetric = 'yes' must be true or false"),
        ('name = "fc"\nactivations = { dtype = "int9" }', "[[override]] #1 activations.dtype = 'int9' is not one of"),
        ('name = "fc"\nweights = { bits = 4 }', "unknown key 'bits' in [[override]] #1 weights; valid keys: dtype"),
        ('name = "fc"\nweights = "per-tensor"', "[[override]] #1 weights = 'per-tensor' must be a table"),
        ('name = "fc"\nskip = "yes"', "[[override]] #1 skip = 'yes' must be true or false"),
        ('name_regex = "("', "[[override]] #1 name_regex = '(' is not a valid regular expression"),
        ('op_type = "Gemmm"', "[[override]] #1 op_type = 'Gemmm' is not an ONNX operator type (did you mean 'Gemm'?)"),
        ('op_type = "LSTM"', "[[override]] op_type 'LSTM' never applies: this recipe quantizes only the op types"),
        ("name = 3", "[[override]] #1 name = 3 must be a string"),
    ],
)  # fmt: skip
def test_override_tables_are_typed(tmp_path: Path, override: str, needle: str) -> None:
    assert needle in _load_error(tmp_path, f'preset = "w8a8"\n[[override]]\n{override}\n')


def test_a_wrong_value_no_longer_changes_the_weights_silently() -> None:
    """'Per-Channel' used to load and quantize per tensor; a valid recipe still loads as written."""
    with pytest.raises(RecipeError):
        recipe_from_dict({"weights": {"granularity": "Per-Channel"}})
    ok = recipe_from_dict({"weights": {"granularity": "per-tensor", "reduce_range": "auto", "range_method": "minmax"}})
    assert ok.weights == WeightSpec(granularity="per-tensor", range_method="minmax")


def test_presets_pass_the_same_validation() -> None:
    for name, recipe in PRESETS.items():
        again = recipe_from_dict(json.loads(json.dumps(recipe_to_dict(recipe))), where=f"preset {name}")
        assert again == recipe, name


def test_programmatic_changes_and_cli_flags_are_validated(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"\[weights\] granularity = 'x'"):
        dataclasses.replace(WeightSpec(), granularity="x")
    with pytest.raises(RecipeError, match=r"\[calibration\] samples = 0 must be >= 1"):
        preset("w8a8").with_(calibration=CalibrationSpec(samples=0))
    with pytest.raises(RecipeError, match=r"^\[\[override\]\] weights.symmetric = 'no' must be true or false$"):
        Override(name="fc", weights={"symmetric": "no"})
    code, _, err = _run("quantize", str(tiny), "-o", str(tmp_path / "o.onnx"), "--preset", "w4-rtn", "--block-size", "24")
    assert code == 1 and err.startswith("error: [weight_only] block_size = 24 must be 0 (per-channel)"), err


def test_recipe_from_dict_names_its_source_like_batch_manifests_do() -> None:
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict({"preset": "w8a8", "calibration": {"ema_constant": -1}}, where="the recipe of m.onnx")
    assert str(exc.value) == "the recipe of m.onnx: [calibration] ema_constant = -1 must be in (0, 1]"


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ('exclude_op = "Conv"', "m.toml: exclude_op must be a list of strings such as [\"MatMul\"], got 'Conv'"),
        ('exclude_op = ["Convv"]',
         "m.toml: [exclude] op_types entry 'Convv' is not an ONNX operator type (did you mean 'Conv'?)"),
        ("exclude_regex = [\"(\"]", "m.toml: [exclude] name_regex entry '(' is not a valid regular"),
        ('calib_size = "abc"', "m.toml: calib_size must be a positive integer, got 'abc'"),
        ("calib_size = 0", "m.toml: calib_size must be a positive integer, got 0"),
        ('recipe = "r.toml"', "[weights] granularity = 'per-chanel' is not one of"),
    ],
)  # fmt: skip
def test_batch_manifest_recipe_values_are_checked(tmp_path: Path, entry: str, needle: str) -> None:
    from onnxq.batch import jobs_from_manifest

    (tmp_path / "r.toml").write_text('[weights]\ngranularity = "per-chanel"\n')
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'[[model]]\npath = "a.onnx"\n{entry}\n')
    with pytest.raises(RecipeError) as exc:
        jobs_from_manifest(manifest, tmp_path / "out", None, {})
    assert needle in str(exc.value)


def test_pass_names_are_the_pass_registry() -> None:
    from onnxq.passes import PASSES
    from onnxq.recipe import PASS_NAMES

    assert set(PASS_NAMES) == set(PASSES)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"flag": "yes"}, "[new] flag = 'yes' must be true or false"),
        ({"mode": "A"}, "[new] mode = 'A' is not one of 'a', 'b' (did you mean 'a'?)"),
        ({"count": 10}, "[new] count = 10 must be in [1, 9]"),
        ({"count": False}, "[new] count = false must be an integer"),
        ({"names": ["x", None]}, "[new] names entry (none) must be a string"),
    ],
)
def test_new_fields_are_validated_by_their_annotation(values: dict, needle: str) -> None:
    from onnxq.validation import check_fields, rule

    @dataclass(frozen=True)
    class NewTable:
        """A table as a future one would be added: annotations (and rules) only, no hand-written checks."""

        flag: bool = False
        mode: Literal["a", "b"] = "a"
        count: int = field(default=1, metadata=rule(lo=1, hi=9))
        names: tuple[str, ...] = ()

    with pytest.raises(RecipeError) as exc:
        check_fields(NewTable, values, "[new] ")
    assert str(exc.value) == needle


# ------------------------------------------------------------------------------------------------
# item 12: exclusions that match nothing, and op-type typos
# ------------------------------------------------------------------------------------------------


def test_exclude_op_that_is_no_onnx_operator_is_refused_with_a_suggestion(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    code, _, err = _run("quantize", str(tiny), "-o", str(out), "--calib", "random:2", "--no-progress", "--exclude-op", "Convv")
    assert code == 1 and err == "error: [exclude] op_types entry 'Convv' is not an ONNX operator type (did you mean 'Conv'?)"
    assert not out.exists()
    with pytest.raises(RecipeError, match=r"'conv' is not an ONNX operator type \(did you mean 'Conv'\?\)"):
        ExcludeSpec(op_types=("conv",))


def test_exclusions_and_overrides_that_match_no_node_are_reported() -> None:
    model = _tiny_model()
    recipe = preset("w8a8").with_(
        exclude=ExcludeSpec(op_types=("Resize", "Conv"), names=("fc1", "gap"), name_regex=("^head/", "^f")),
        overrides=(Override(name="conv2", skip=True), Override(op_type="MatMul", skip=True), Override(name="relu", skip=True)),
    )  # fmt: skip
    notes = quantize_model(model, recipe, source=RandomSource(input_specs(model), count=2)).report.notes
    unmatched = [n for n in notes if "matches no node of this model" in n]
    assert unmatched == [
        "exclusion --exclude-op (recipe exclude.op_types) 'Resize' matches no node of this model, so it has no effect",
        "exclusion --exclude-node (recipe exclude.names) 'fc1' matches no node of this model, so it has no effect "
        "(did you mean 'fc'?)",
        "exclusion --exclude-regex (recipe exclude.name_regex) '^head/' matches no node of this model, so it has no effect",
        "recipe override with name 'conv2' matches no node of this model, so it has no effect (did you mean 'conv'?)",
        "recipe override with op_type 'MatMul' matches no node of this model, so it has no effect",
    ]


def test_cli_prints_the_unmatched_exclusion_as_a_note(tiny: Path, tmp_path: Path) -> None:
    code, out, err = _run("quantize", str(tiny), "-o", str(tmp_path / "o.onnx"), "--calib", "random:2", "--no-progress",
                          "--exclude-node", "Conv")  # fmt: skip
    assert code == 0, err
    assert ("note: exclusion --exclude-node (recipe exclude.names) 'Conv' matches no node of this model, so it has no "
            "effect (did you mean 'conv'?)") in out  # fmt: skip


# ------------------------------------------------------------------------------------------------
# item 11: calibration caches are validated when read
# ------------------------------------------------------------------------------------------------

_SHA = "ab" * 32


def _cache(tmp_path: Path, **changes: Any) -> Path:
    """A valid cache file for model sha ``_SHA`` with ``changes`` to its JSON document."""
    path = tmp_path / "stats.json"
    save_cache(path, model_sha256=_SHA, spec=CalibrationSpec(), ranges={"c": (0.0, 7.5), "y": (-3.0, 2.0)},
               source="random", provider="CPUExecutionProvider", samples=4)  # fmt: skip
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))
    return path


def _cache_error(path: Path) -> str:
    with pytest.raises(CalibrationError) as exc:
        CachedCalibration(path, model_sha256=_SHA, spec=CalibrationSpec())
    message = str(exc.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_a_valid_cache_loads(tmp_path: Path) -> None:
    cached = CachedCalibration(_cache(tmp_path), model_sha256=_SHA, spec=CalibrationSpec())
    assert cached.ranges(None, ["c", "y"]) == {"c": (0.0, 7.5), "y": (-3.0, 2.0)}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ranges_json", "needle"),
    [
        ('{"c": [NaN, 7.5]}', "the range of tensor 'c' is [nan, 7.5]: not finite"),
        ('{"c": [0, Infinity]}', "the range of tensor 'c' is [0, inf]: not finite"),
        ('{"c": [5, -5]}', "the range of tensor 'c' is [5, -5]: its low end is above its high end"),
        ('{"c": [0, 1e38]}', "the range of tensor 'c' is [0, 1e+38]: beyond +-1e+30"),
        ('{"c": ["0", "7.5"]}', "the range of tensor 'c' is ['0', '7.5'], not a pair of numbers"),
        ('{"c": "0..7.5"}', "the range of tensor 'c' is '0..7.5', not a pair [low, high]"),
        ('{"c": [0, 1, 2]}', "the range of tensor 'c' is [0, 1, 2], not a pair [low, high]"),
        ('{"c": [false, true]}', "not a pair of numbers"),
        ('{"": [0, 1]}', "a tensor name is empty"),
        ('[[0, 1]]', "'ranges' must be an object mapping tensor names to [low, high], got [[0, 1]]"),
    ],
)
def test_hand_edited_cache_ranges_are_refused(tmp_path: Path, ranges_json: str, needle: str) -> None:
    path = _cache(tmp_path)
    doc = path.read_text()
    start = doc.index('"ranges"')
    path.write_text(doc[:start] + '"ranges": ' + ranges_json + "}")
    message = _cache_error(path)
    assert needle in message and message.endswith("re-run `onnxq calibrate` to rebuild it"), message


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"version": 99}, "has version 99; this onnxq reads version 1: re-run `onnxq calibrate`"),
        ({"version": "1"}, "'version' must be an integer, got '1'"),
        ({"samples": "abc"}, "'samples' must be an integer, got 'abc'"),
        ({"samples": -1}, "'samples' must be >= 0, got -1"),
        ({"settings": []}, "'settings' must be an object, got []"),
        ({"provider": 3}, "'provider' must be a string or null, got 3"),
        ({"model_sha256": None}, "'model_sha256' must be a string, got (none)"),
    ],
)
def test_cache_structure_and_version_are_checked(tmp_path: Path, changes: dict, needle: str) -> None:
    assert needle in _cache_error(_cache(tmp_path, **changes))


def test_cache_missing_a_field_is_refused(tmp_path: Path) -> None:
    path = _cache(tmp_path)
    doc = json.loads(path.read_text())
    del doc["settings"]
    path.write_text(json.dumps(doc))
    assert "'settings' must be an object, got missing" in _cache_error(path)


def test_calibrate_refuses_to_save_a_range_it_could_not_read_back(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match=r"the range of tensor 'c' is \[nan, 1.0\]: not finite"):
        save_cache(tmp_path / "s.json", model_sha256=_SHA, spec=CalibrationSpec(), ranges={"c": (float("nan"), 1.0)},
                   source="random", provider=None, samples=1)  # fmt: skip
    assert not (tmp_path / "s.json").exists()


def test_cli_quantize_with_a_hand_edited_cache_fails_and_writes_nothing(tiny: Path, tmp_path: Path) -> None:
    stats, out = tmp_path / "stats.json", tmp_path / "o.onnx"
    assert _run("calibrate", str(tiny), "--calib", "random:2", "-o", str(stats), "--no-progress")[0] == 0
    doc = json.loads(stats.read_text())
    name = sorted(doc["ranges"])[0]
    stats.write_text(json.dumps({**doc, "ranges": {**doc["ranges"], name: [5, -5]}}))
    code, _, err = _run("quantize", str(tiny), "-o", str(out), "--calib-cache", str(stats), "--no-progress")
    assert code == 1 and err.startswith(f"error: calibration cache {stats}: the range of tensor '{name}' is [5, -5]"), err
    assert "re-run `onnxq calibrate`" in err and not out.exists()


# ------------------------------------------------------------------------------------------------
# item 13: --lm-head's help
# ------------------------------------------------------------------------------------------------


def test_lm_head_help_names_the_real_default() -> None:
    code, out, _ = _run("quantize", "--help")
    assert code == 0
    help_text = out[out.index("--lm-head"):]
    help_text = help_text[: help_text.index("--alpha")]
    assert "int8, the default" in help_text and "same, default" not in help_text
    assert all(PRESETS[p].weight_only.lm_head == "int8" for p in ("w4-rtn", "w4-gptq", "w4-awq", "w4-gptq-awq"))


# ------------------------------------------------------------------------------------------------
# fuzzing: recipe values and cache files
# ------------------------------------------------------------------------------------------------

_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _near_valid(tp: Any, default: Any) -> st.SearchStrategy[Any]:
    """Values a user might plausibly write for a field of type ``tp``: its default, its literal choices,
    and values of the right shape but maybe out of range."""
    options: list[st.SearchStrategy[Any]] = [st.just(list(default) if isinstance(default, tuple) else default)]
    for m in typing.get_args(tp) or (tp,):
        if typing.get_origin(m) is Literal:
            options.append(st.sampled_from(typing.get_args(m)))
        elif m is bool:
            options.append(st.booleans())
        elif m is int:
            options.append(st.integers(min_value=-3, max_value=300))
        elif m is float:
            options.append(st.floats(min_value=-0.5, max_value=1.5))
    return st.one_of(*options)


def _field_cases() -> list[tuple[str, str, Any, Any]]:
    """(table, key, annotation, default) of every field a recipe file can set."""
    cases = []
    top = typing.get_type_hints(Recipe)
    tables = {k: tp for k, tp in top.items() if dataclasses.is_dataclass(tp)}
    for f in dataclasses.fields(Recipe):
        if f.name not in tables and f.name != "overrides":
            cases.append(("", f.name, top[f.name], getattr(Recipe(), f.name)))
    for table, cls in [*tables.items(), ("override", Override)]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            cases.append((table, f.name, hints[f.name], default))
    return cases


_FIELDS = _field_cases()


@st.composite
def _recipe_edit(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A recipe dict setting one field to a fuzzed value, and that field's key."""
    table, key, tp, default = draw(st.sampled_from(_FIELDS))
    value = draw(st.one_of(_near_valid(tp, default), _JUNK))
    data: dict[str, Any] = {"preset": draw(st.sampled_from(sorted(PRESETS)))}
    if table == "":
        data[key] = value
    elif table == "override":
        data["override"] = [{"name": "fc", key: value}] if key not in ("op_type", "name", "name_regex") else [{key: value}]
    else:
        data[table] = {key: value}
    return data, key


@settings(**_SETTINGS)  # type: ignore[arg-type]
@given(_recipe_edit())
def test_fuzz_recipe_values_give_a_recipe_error_naming_the_key_or_round_trip(edit: tuple[dict[str, Any], str]) -> None:
    data, key = edit
    try:
        recipe = recipe_from_dict(data)
    except RecipeError as exc:
        message = str(exc)
        assert "\n" not in message and (key in message or "format" in message), message
        return
    plain = json.loads(json.dumps(recipe_to_dict(recipe)))
    assert recipe_from_dict(plain) == recipe


_VALID_DOC = {"format": "onnxq-calibration-cache", "version": 1, "model_sha256": _SHA,
              "settings": dataclasses.asdict(CalibrationSpec()), "source": "random", "samples": 4, "provider": None,
              "ranges": {"c": [0.0, 7.5], "y": [-3.0, 2.0]}}  # fmt: skip


@st.composite
def _cache_doc(draw: st.DrawFn) -> Any:
    """A cache document with one field, one range or one range end replaced by a fuzzed value."""
    doc = json.loads(json.dumps(_VALID_DOC))
    where = draw(st.sampled_from(["field", "range", "end", "whole"]))
    value = draw(_JUNK | st.floats(allow_nan=True, allow_infinity=True))
    if where == "whole":
        return value
    if where == "field":
        doc[draw(st.sampled_from(sorted(doc)))] = value
    elif where == "range":
        doc["ranges"][draw(st.text(max_size=6))] = value
    else:
        doc["ranges"]["c"][draw(st.sampled_from([0, 1]))] = value
    return doc


@settings(**_SETTINGS)  # type: ignore[arg-type]
@given(doc=_cache_doc())
def test_fuzz_cache_files_load_sane_ranges_or_give_a_calibration_error(tmp_path: Path, doc: Any) -> None:
    from onnxq.calibration.cache import RANGE_LIMIT

    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(doc))
    try:
        cached = CachedCalibration(path, model_sha256=_SHA, spec=CalibrationSpec())
    except CalibrationError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    ranges = cached.ranges(None, list(doc["ranges"]))  # type: ignore[arg-type]
    for lo, hi in ranges.values():
        assert np.isfinite([lo, hi]).all() and lo <= hi and max(abs(lo), abs(hi)) <= RANGE_LIMIT
