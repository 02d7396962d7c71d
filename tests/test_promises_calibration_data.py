"""What onnxq promises about the calibration data users bring, and about the accuracy metrics.

* A handful of extreme values in the calibration data (a corrupt frame, a sensor glitch: one element
  set to 1e6) does not ruin the default calibration: a sample whose input holds them is left out of the
  histogram calibrators' ranges (it would stretch every tensor downstream), extreme values inside a
  tensor are counted and left out like NaN (they cannot spend the histogram's resolution), and the
  ranges stay those of the clean data.
* The rule spares real data: clean CNN activations, a transformer's genuine outlier channels and
  sparse ReLU outputs are never called extreme, and clean ranges are unchanged.
* NaN and Inf values are counted and left out; a range is never NaN or infinite.
* ``minmax`` and ``ema-minmax`` keep their literal meaning (the outlier sets the range) but warn, naming
  the input or tensor and the sample that set it.
* The report and the summary say how many non-finite and extreme values were seen, in which tensor and
  from which sample (its file name: ``c.npz[1]``, an image path).
* ``--calib-size`` beyond what the source holds warns; ``random`` calibration of a model whose image
  height/width are dynamic is refused (it would run at 1x1); the calibration line never says "on None".
* Metrics: a zero output against a non-zero one has cosine 0 (not 1), NaN outputs give cosine 0 and
  SQNR -inf, and an accuracy budget is never met by a model whose outputs are degenerate (NaN, all zeros,
  the same for every input).
* Fuzzing (hypothesis), over dtypes, shapes and distributions: planted extremes leave the
  ``mse-percentile`` range exactly where the data without them puts it; non-finite values never give a
  NaN/inf range and are counted; clean data is never called extreme.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from onnxq.calibration.observers import EXTREME_FACTOR, make_observer
from onnxq.calibration.runner import CalibrationSession
from onnxq.calibration.sources import ArrayFolderSource, input_specs, open_source
from onnxq.cli import main
from onnxq.errors import CalibrationError
from onnxq.evaluate import OutputStats, TensorStats
from onnxq.mixed_precision import AccuracyBudget, EvalSet
from onnxq.recipe import CalibrationSpec
from conftest import asset

RNG = np.random.default_rng(0)
SETTINGS = dict(derandomize=True, database=None, deadline=None, max_examples=40,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def conv_model(hw: int | str = 32) -> onnx.ModelProto:
    """x [1, 3, hw, hw] -> Conv 3x3 (4 channels) -> Relu -> GlobalAveragePool -> Flatten: a tiny image model."""
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, hw, hw])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 4])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(4, 0.1, np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def image_batch(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def session(model: onnx.ModelProto, path: Path, method: str = "mse-percentile") -> CalibrationSession:
    return CalibrationSession(ArrayFolderSource(path, input_specs(model)), CalibrationSpec(method=method, device="cpu"),
                              progress=False)


# ------------------------------------------------------------------------------ one outlier, the default


def test_an_outlier_sample_is_left_out_and_the_ranges_stay_clean(tmp_path: Path) -> None:
    model = conv_model()
    x = image_batch()
    np.savez(tmp_path / "clean.npz", x=x)
    bad = x.copy()
    bad[1, 0, 10, 10] = 1e6
    np.savez(tmp_path / "c.npz", x=bad)
    np.savez(tmp_path / "without.npz", x=np.delete(x, 1, axis=0))
    names = ["x", "c", "r"]
    got = session(model, tmp_path / "c.npz").ranges(model, names)
    without = session(model, tmp_path / "without.npz").ranges(model, names)
    clean = session(model, tmp_path / "clean.npz").ranges(model, names)
    assert got == without  # the corrupt sample is left out, nothing else changes
    for n in names:
        width = clean[n][1] - clean[n][0]
        assert abs(got[n][1] - clean[n][1]) < 0.25 * width and abs(got[n][0] - clean[n][0]) < 0.25 * width, n


def test_the_report_names_the_input_and_the_sample_file(tmp_path: Path) -> None:
    model = conv_model()
    x = image_batch()
    x[1, 0, 10, 10] = 1e6
    np.savez(tmp_path / "c.npz", x=x)
    sess = session(model, tmp_path / "c.npz")
    sess.ranges(model, ["x", "r"])
    issues = sess.data_issues()
    assert issues["samples_left_out"] == 1 and sess.samples_seen == 5
    assert issues["inputs"][0]["sample"] == "c.npz[1]" and issues["inputs"][0]["input"] == "x"
    assert issues["inputs"][0]["extreme"] == 1 and issues["inputs"][0]["peak"] == 1e6
    assert any("c.npz[1]" in w and "input 'x'" in w and "left out" in w for w in sess.warnings())


def test_every_sample_corrupt_is_a_clear_error(tmp_path: Path) -> None:
    model = conv_model()
    x = image_batch(3)
    x[:, 0, 10, 10] = 1e6
    np.savez(tmp_path / "c.npz", x=x)
    with pytest.raises(CalibrationError, match=r"every calibration sample holds extreme input values.*c\.npz\[0\].*--calibrator minmax"):
        session(model, tmp_path / "c.npz").ranges(model, ["r"])


@pytest.mark.parametrize("method", ["mse-percentile", "mse", "percentile", "entropy"])
def test_extreme_values_inside_a_tensor_are_counted_and_left_out(method: str) -> None:
    clean = np.maximum(RNG.standard_normal(20000).astype(np.float32), 0) * 3  # a ReLU output, max about 12
    dirty = clean.copy()
    dirty[[5, 700, 9000]] = [1e6, 3e5, 2e4]
    a, b = make_observer(method), make_observer(method)
    a.observe(clean)
    b.observe(dirty)
    c = make_observer(method)
    c.observe(np.delete(dirty, [5, 700, 9000]))
    assert b.extreme == 3 and b.peak == 1e6 and a.extreme == 0
    assert b.compute_range() == c.compute_range()  # exactly as without them
    assert b.compute_range()[1] == pytest.approx(a.compute_range()[1], rel=0.05)
    assert b.flagged_in == [""]  # the runner sets tag to the sample's name


def test_the_range_of_one_tensor_with_extremes_spends_its_bins_on_the_real_values() -> None:
    obs = make_observer("mse-percentile")
    for i in range(4):
        x = np.maximum(RNG.standard_normal(50000).astype(np.float32), 0) * 2.5
        if i == 0:
            x[123] = 350852.0  # SqueezeNet's first activation with the planted 1e6 pixel
        obs.observe(x)
    assert obs.width < 0.05  # 2048 bins over about [0, 12] (grown by powers of 2), not over [0, 350852]
    assert obs.compute_range()[1] < 12


# ------------------------------------------------------------------------------ what the rule spares


def test_transformer_outlier_channels_are_not_extreme() -> None:
    x = RNG.standard_normal((64, 768)).astype(np.float32)
    x[:, [17, 300]] *= 60.0  # two genuine outlier channels: 0.26% of the elements
    x[3, 5] = 2000.0  # and one massive activation, below 64x the outlier channels' magnitude
    plain, screened = make_observer("mse"), make_observer("mse")
    plain.screen = False
    plain.observe(x)
    screened.observe(x)
    assert screened.extreme == 0
    assert screened.compute_range() == plain.compute_range()


def test_sparse_relu_outputs_and_small_tensors_are_not_screened() -> None:
    sparse = np.zeros(100000, np.float32)
    sparse[:20] = RNG.random(20).astype(np.float32) * 1000  # 0.02% non-zero, wildly spread
    small = np.ones(500, np.float32)
    small[0] = 1e6
    for x in (sparse, small):
        obs = make_observer("mse-percentile")
        obs.observe(x)
        assert obs.extreme == 0 and obs.compute_range()[1] == pytest.approx(float(x.max()), rel=0.01)


# ------------------------------------------------------------------------------ non-finite values


@pytest.mark.parametrize("method", ["mse-percentile", "minmax", "ema-minmax", "entropy"])
def test_nonfinite_values_are_counted_and_left_out(method: str) -> None:
    x = RNG.standard_normal(5000).astype(np.float32)
    y = x.copy()
    y[[1, 2, 3]] = [np.nan, np.inf, -np.inf]
    a, b = make_observer(method), make_observer(method)
    a.observe(np.delete(x, [1, 2, 3]))
    b.observe(y)
    assert b.nonfinite == 3 and a.nonfinite == 0
    assert b.compute_range() == a.compute_range()


def test_nan_samples_are_named_and_their_nan_tensors_counted(tmp_path: Path) -> None:
    model = conv_model()
    x = image_batch(4)
    x[2, 1, 4:8, 4] = np.nan
    np.savez(tmp_path / "c.npz", x=x)
    sess = session(model, tmp_path / "c.npz")
    ranges = sess.ranges(model, ["x", "c", "r"])
    assert all(math.isfinite(v) for r in ranges.values() for v in r)
    issues = sess.data_issues()
    assert issues["inputs"][0] == {"sample": "c.npz[2]", "left_out": False, "input": "x", "nonfinite": 4, "extreme": 0}
    by_tensor = {t["tensor"]: t for t in issues["tensors"]}
    assert by_tensor["x"]["nonfinite"] == 4 and by_tensor["x"]["samples"] == ["c.npz[2]"]
    assert by_tensor["c"]["nonfinite"] > 4  # NaN spreads through the convolution
    assert sess.samples_seen == 4  # NaN does not stretch ranges: the sample stays


# ------------------------------------------------------------------------------ min-max warns


@pytest.mark.parametrize("method", ["minmax", "ema-minmax"])
def test_minmax_keeps_the_outlier_and_warns(tmp_path: Path, method: str) -> None:
    model = conv_model()
    x = image_batch()
    x[1, 0, 10, 10] = 1e6
    np.savez(tmp_path / "c.npz", x=x)
    sess = session(model, tmp_path / "c.npz", method)
    ranges = sess.ranges(model, ["x", "r"])
    assert ranges["x"][1] > 1e4  # literal: the outlier is in the range
    warnings = sess.warnings()
    assert any("c.npz[1]" in w and f"{method} keeps it" in w for w in warnings)
    assert any("tensor 'r'" in w and "comes from sample c.npz[1] alone" in w for w in warnings)


# ------------------------------------------------------------------------------ the command line


def test_the_summary_names_the_tensor_and_the_sample_file(tmp_path: Path) -> None:
    model = conv_model()
    onnx.save(model, tmp_path / "m.onnx")
    x = image_batch()
    x[1, 0, 10, 10] = 1e6
    np.savez(tmp_path / "c.npz", x=x)
    res = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                                    str(tmp_path / "c.npz"), "--calib-size", "6", "--no-progress",
                                    "--report", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    assert "warning: calibration sample c.npz[1]: input 'x' holds 1 extreme value (|x| up to 1e+06" in res.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    data = report["info"]["calibration"]["data"]
    assert data["samples_left_out"] == 1 and data["inputs"][0]["sample"] == "c.npz[1]"


def test_calib_size_beyond_the_source_warns(tmp_path: Path) -> None:
    model = conv_model()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=image_batch(4))
    res = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                                    str(tmp_path / "c.npz"), "--calib-size", "1000000", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "warning: --calib-size asked for 1000000 calibration samples but the source holds only 4" in res.output
    default = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q2.onnx"), "--calib",
                                        str(tmp_path / "c.npz"), "--no-progress"])
    assert default.exit_code == 0 and "warning" not in default.output  # the recipe's default 128: no noise


def test_random_calibration_of_dynamic_image_dims_is_refused(tmp_path: Path) -> None:
    onnx.save(conv_model("height"), tmp_path / "m.onnx")
    res = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                                    "--calib", "random:2", "--no-progress"])
    assert res.exit_code == 1
    assert "random calibration cannot size dim 2 ('height') of model input 'x'" in res.output
    assert "--calib images/" in res.output and "fixed input dims" in res.output
    assert not (tmp_path / "q.onnx").exists()


def test_random_ids_stay_inside_the_table_they_index(tmp_path: Path) -> None:
    """``token_type_ids`` into a 2-row table (BERT): random ids in [0, 100) made ONNX Runtime stop with
    "indices element out of data bounds"; ids are drawn below the table size, also through a Cast."""
    table = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["ids"], ["ids32"], to=T.INT32, name="cast"),
             helper.make_node("Gather", ["table", "ids32"], ["e"], name="emb"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", T.INT64, [1, 16])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 16, 8])],
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    res = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                                    "--calib", "random:4", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "ids [0,2)" in " ".join(res.output.split())


def test_the_calibration_line_never_says_on_none(tmp_path: Path) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    res = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                                    "--calib", "random:2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "None" not in res.output and "calibration: nothing needed an activation range" in res.output


# ------------------------------------------------------------------------------ metrics


def test_cosine_of_a_zero_output_against_a_nonzero_one_is_zero() -> None:
    ref = RNG.standard_normal((4, 10))
    st_ = OutputStats()
    st_.update(ref, np.zeros_like(ref))
    assert st_.cosine == 0.0 and st_.tensor.cosine == 0.0
    both = OutputStats()
    both.update(np.zeros((2, 10)), np.zeros((2, 10)))
    assert both.cosine == 1.0  # identical
    assert st_.degenerate == "all zeros where the float output is not" and both.degenerate is None


def test_nan_outputs_are_never_good() -> None:
    ref = RNG.standard_normal((4, 10))
    got = ref.copy()
    got[0, 3] = np.nan
    o = OutputStats()
    o.update(ref, got)
    assert o.tensor.sqnr_db == -math.inf and o.tensor.cosine == 0.0
    assert o.cosine == pytest.approx(0.75)  # the NaN sample counts 0, the others 1
    assert "NaN/Inf" in (o.degenerate or "")
    t = TensorStats()
    t.update(ref, got)
    assert t.sqnr_db == -math.inf


def _offset_model(scale: float) -> onnx.ModelProto:
    """y = x * scale + 10 ([1, 16]): scale 0 is an output that ignores its input, yet close in cosine."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", T.FLOAT, [1, 16])], [helper.make_tensor_value_info("y", T.FLOAT, [1, 16])],
        [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(10.0, np.float32), "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_budget_is_never_met_by_an_output_that_ignores_its_input() -> None:
    feeds = [{"x": RNG.standard_normal((1, 16)).astype(np.float32)} for _ in range(6)]
    evalset = EvalSet(_offset_model(1.0), feeds)
    budget = AccuracyBudget.parse("cosine=0.99")
    dead = evalset.measure(_offset_model(0.0), "cosine")  # cosine to the float output is about 0.995, SQNR 20 dB
    assert not budget.met(dead) and "the same output for every sample" in (evalset.degenerate or "")
    assert evalset.measure(_offset_model(0.0), "sqnr") == -math.inf
    assert budget.met(evalset.measure(_offset_model(1.0), "cosine")) and evalset.degenerate is None
    st_ = OutputStats()
    for f in feeds:
        st_.update(f["x"] * 1e-3 + 10, np.full((1, 16), 10.0))
    assert st_.degenerate is None  # a float output that barely varies, matched to 60 dB: no damage


def test_compare_says_when_the_quantized_output_is_degenerate(tmp_path: Path) -> None:
    onnx.save(_offset_model(1.0), tmp_path / "f.onnx")
    onnx.save(_offset_model(0.0), tmp_path / "q.onnx")
    np.savez(tmp_path / "x.npz", x=RNG.standard_normal((6, 16)).astype(np.float32))
    res = CliRunner().invoke(main, ["compare", str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), "--calib",
                                    str(tmp_path / "x.npz"), "--no-latency", "--outputs-only"])
    assert res.exit_code == 0, res.output
    assert "warning: output 'y' of the quantized model is degenerate: the same output for every sample" in res.output


# ------------------------------------------------------------------------------ fuzzing


@st.composite
def calibration_arrays(draw: st.DrawFn) -> np.ndarray:
    """Real-looking activations: normal, ReLU (half zeros), uniform or heavy-tailed, of several shapes and
    float dtypes and scales."""
    shape = draw(st.sampled_from([(2048,), (4, 1024), (1, 8, 16, 16), (3, 37, 29)]))
    kind = draw(st.sampled_from(["normal", "relu", "uniform", "student"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = {"normal": lambda: rng.standard_normal(shape), "relu": lambda: np.maximum(rng.standard_normal(shape), 0),
         "uniform": lambda: rng.uniform(-1, 3, shape), "student": lambda: rng.standard_t(5, shape)}[kind]()
    return (x * scale).astype(draw(st.sampled_from([np.float16, np.float32, np.float64])))


@given(x=calibration_arrays(), count=st.integers(1, 6), factor=st.sampled_from([1e3, 1e4, 1e6]),
       negative=st.booleans(), seed=st.integers(0, 2**16))
@settings(**SETTINGS)
def test_fuzz_planted_extremes_leave_the_default_range_as_without_them(x: np.ndarray, count: int, factor: float,
                                                                      negative: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    flat = x.reshape(-1)
    idx = rng.choice(flat.size, count, replace=False)
    peak = float(np.max(np.abs(flat.astype(np.float64))))
    dirty = flat.copy()
    sign = -1.0 if negative and flat.min() < 0 else 1.0
    with np.errstate(over="ignore"):  # inf in float16: also fine
        dirty[idx] = np.asarray(sign * factor * max(peak, 1e-3), np.float64).astype(x.dtype)
    clean_obs, dirty_obs = make_observer("mse-percentile"), make_observer("mse-percentile")
    clean_obs.observe(np.delete(flat, idx))
    dirty_obs.observe(dirty.reshape(x.shape))
    assert dirty_obs.extreme + dirty_obs.nonfinite == count
    assert dirty_obs.compute_range() == clean_obs.compute_range()  # moved by 0% of the clean range


@given(x=calibration_arrays(), count=st.integers(1, 50), seed=st.integers(0, 2**16),
       method=st.sampled_from(["mse-percentile", "mse", "percentile", "entropy", "minmax", "ema-minmax"]))
@settings(**SETTINGS)
def test_fuzz_nonfinite_values_never_give_a_nonfinite_range_and_are_counted(x: np.ndarray, count: int, seed: int,
                                                                            method: str) -> None:
    rng = np.random.default_rng(seed)
    flat = x.reshape(-1).copy()
    idx = rng.choice(flat.size, min(count, flat.size - 1), replace=False)
    flat[idx] = rng.choice(np.array([np.nan, np.inf, -np.inf]), idx.size).astype(x.dtype)
    obs = make_observer(method)
    obs.observe(flat.reshape(x.shape))
    lo, hi = obs.compute_range()
    assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi
    assert obs.nonfinite == idx.size


@given(x=calibration_arrays())
@settings(**SETTINGS)
def test_fuzz_clean_data_is_never_called_extreme(x: np.ndarray) -> None:
    obs = make_observer("mse-percentile")
    obs.observe(x)
    assert obs.extreme == 0
    assert EXTREME_FACTOR >= 32  # the margin over the 6.4x measured on clean CNN activations


# ------------------------------------------------------------------------------ real assets


@pytest.mark.assets
def test_squeezenet_first_activation_with_a_planted_outlier(assets: Path, tmp_path: Path) -> None:
    """Acceptance 2 in small: 4 real images, one pixel set to 1e6 -> the first ReLU's range stays near the
    clean [0, ~7.4] (it was [0, 350852]) and the summary names the input and the sample file."""
    from onnxq.calibration.sources import load_image

    model_path = asset(assets, "cnn/squeezenet1.1/model.onnx")
    files = sorted((assets / "imagenet").rglob("*.JPEG"))[::125][:4]
    x = np.concatenate([load_image(f) for f in files])
    np.savez(tmp_path / "clean.npz", data=x)
    x[1, 1, 100, 100] = 1e6
    np.savez(tmp_path / "c.npz", data=x)
    model = onnx.load(model_path)
    first = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    clean = CalibrationSession(open_source(str(tmp_path / "clean.npz"), model), CalibrationSpec(device="cpu"), progress=False)
    dirty = CalibrationSession(open_source(str(tmp_path / "c.npz"), model), CalibrationSpec(device="cpu"), progress=False)
    (clo, chi), (dlo, dhi) = clean.ranges(model, [first])[first], dirty.ranges(model, [first])[first]
    assert clo == dlo == 0.0 and 4 < chi < 12 and dhi == pytest.approx(chi, rel=0.15)
    assert any("c.npz[1]" in w and "input 'data'" in w for w in dirty.warnings())
