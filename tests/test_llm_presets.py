"""Every LLM preset on the tiny decoder graphs of both export forms (tests/llm_graphs.py): onnxruntime-genai's
builder (GroupQueryAttention, Skip/SimplifiedLayerNormalization, fused QKV, tied Transpose->Gather embedding) and
Optimum (position_ids, past/present Concat, decomposed RMSNorm). Calibrated presets read token windows, fed as a
prefill with an empty past. For each: the output loads in onnxruntime, its KV-cache decode step equals its own
prefill, and its logits stay close to the float model's (bounds measured: w4 up to 0.23 of the largest logit and
argmax agreement down to 7 of 12 with random weights and tokens, int8-dynamic 0.044, w8a8-smoothquant 0.086, fp16
0.0008)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import run_cli
from llm_graphs import builder_llm, optimum_llm, run_decode, run_prefill, session, token_ids

FORMS = {"builder": builder_llm, "optimum": optimum_llm}
#: preset -> (largest |logit - float logit| / largest |float logit|, least argmax agreement, decode tolerance)
BOUNDS = {"w4-rtn": (0.35, 0.5, 1e-3), "w4-gptq": (0.35, 0.5, 1e-3), "w4-awq": (0.35, 0.5, 1e-3),
          "w4-gptq-awq": (0.35, 0.5, 1e-3), "int8-dynamic": (0.08, 0.8, 1e-3), "w8a8-smoothquant": (0.15, 0.8, 1e-3),
          "fp16": (0.005, 1.0, 5e-3)}  # fmt: skip
CALIBRATED = {"w4-gptq", "w4-awq", "w4-gptq-awq", "w8a8-smoothquant"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llm")
    for form, build in FORMS.items():
        onnx.save(build(), root / f"{form}.onnx")
    tokens = np.random.default_rng(0).integers(0, 128, 1000)
    (root / "tokens.json").write_text(json.dumps([int(t) for t in tokens]))
    return root


@pytest.mark.parametrize("preset", sorted(BOUNDS))
@pytest.mark.parametrize("form", sorted(FORMS))
def test_llm_preset_on_a_kv_cache_graph(files: Path, form: str, preset: str) -> None:
    out = files / f"{form}-{preset}.onnx"
    args = ["quantize", str(files / f"{form}.onnx"), "-o", str(out), "--preset", preset, "--no-progress"]
    if preset in CALIBRATED:
        args += ["--calib", str(files / "tokens.json"), "--seq-len", "32", "--calib-size", "4"]
    if preset.startswith("w4"):
        args += ["--block-size", "32"]
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr or stdout
    if preset in CALIBRATED:
        assert "past_key_values.* (4 KV-cache inputs, fed empty: past length 0)" in " ".join(stdout.split())
    ids = token_ids(12)
    want = run_prefill(session(str(files / f"{form}.onnx")), ids, 16)[0]
    sess = session(str(out))
    got = run_prefill(sess, ids, 16)[0]
    rel, agree, decode_tol = BOUNDS[preset]
    np.testing.assert_allclose(run_decode(sess, ids, 16), got[0, -1], atol=decode_tol)
    assert np.abs(got - want).max() <= rel * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= agree
    assert np.abs(got - want).max() > 0 or preset == "fp16"  # the model was changed


def test_awq_scales_fold_into_the_builders_norm_gammas(files: Path) -> None:
    """AWQ's per-input-channel scales of the fused QKV and gate/up MatMuls fold into (Skip)SimplifiedLayerNormalization's
    gamma; the residual sum (output 3) is untouched, so the search runs there instead of leaving them unscaled."""
    out = files / "builder-awq-gammas.onnx"
    code, stdout, stderr = run_cli("quantize", str(files / "builder.onnx"), "-o", str(out), "--preset", "w4-awq",
                                   "--block-size", "32", "--calib", str(files / "tokens.json"), "--seq-len", "32",
                                   "--calib-size", "4", "--no-progress")  # fmt: skip
    assert code == 0, stderr
    float_model, quantized = onnx.load(files / "builder.onnx"), onnx.load(out)
    gammas = {t.name: onnx.numpy_helper.to_array(t) for t in float_model.graph.initializer if "layernorm" in t.name}
    changed = [n for n, t in ((t.name, onnx.numpy_helper.to_array(t)) for t in quantized.graph.initializer)
               if n in gammas and not np.array_equal(t, gammas[n])]  # fmt: skip
    assert "model.layers.0.input_layernorm.weight" in changed  # SimplifiedLayerNormalization
    assert any("post_attention_layernorm" in n or "layers.1.input_layernorm" in n for n in changed), changed  # Skip*


@pytest.mark.parametrize("form", ["builder", "optimum"])
def test_random_calibration_of_an_llm_points_to_text(tmp_path: Path, form: str) -> None:
    """A careless `--calib random` on a KV-cache model: one line naming the KV-cache input and the text/token fix,
    nothing written."""
    model = tmp_path / "m.onnx"
    onnx.save(builder_llm() if form == "builder" else optimum_llm(), model)
    out = tmp_path / "q.onnx"
    code, _, stderr = run_cli("quantize", str(model), "-o", str(out), "--preset", "w8a8-smoothquant", "--calib", "random:4",
                              "--no-progress")  # fmt: skip
    text = " ".join(stderr.split())
    assert code == 1 and "KV-cache input 'past_key_values.0.key'" in text and "--tokenizer tokenizer.json" in text
    assert not out.exists()
