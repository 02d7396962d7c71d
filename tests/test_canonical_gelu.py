"""Tests for passes/canonical_gelu.py: every exporter's erf-GELU becomes the chain ORT fuses.

The oracle for "ORT fuses it" is ORT itself: the model ORT writes after its extended graph optimisations
(``optimized_model_filepath``) must hold a ``Gelu`` / ``BiasGelu`` node. Numerics are checked against the
unrewritten model with ORT's optimisations off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from conftest import asset
from helpers import full_check, make_ctx, model_from_text, op_types, run_ort
from onnx import numpy_helper
from onnxq.passes.canonical_gelu import CanonicalGeluPass

HEAD = """
<ir_version: 8, opset_import: ["" : 17]>
g ({t}[2, 8, 16] x) => ({t}[2, 8, 16] y{extra_out}) <{t}[16, 16] w = {w}, {t}[16] b = {b}> {{
    h = MatMul(x, w)
    z = Add(h, b)
{body}
    y = MatMul(gelu, w)
}}
"""

# The same function, x = z, written in the orders exporters use.
FORMS = {
    # MiniLM (this repo's asset): 0.5 on x first, x * (1/sqrt 2)
    "half-first": """
    s = Constant<value = {t} {{0.70710677}}>()
    c1 = Constant<value = {t} {{1.0}}>()
    c05 = Constant<value = {t} {{0.5}}>()
    u = Mul(z, s)
    e = Erf(u)
    hx = Mul(z, c05)
    a = Add(e, c1)
    gelu = Mul(hx, a)""",
    # 0.5 applied to (1 + erf), constants on the left
    "half-on-sum": """
    s = Constant<value = {t} {{0.70710677}}>()
    c1 = Constant<value = {t} {{1.0}}>()
    c05 = Constant<value = {t} {{0.5}}>()
    u = Mul(s, z)
    e = Erf(u)
    a = Add(c1, e)
    m = Mul(c05, a)
    gelu = Mul(m, z)""",
    # the canonical order but with a Mul by 1/sqrt 2
    "mul-sqrt": """
    s = Constant<value = {t} {{0.70710677}}>()
    c1 = Constant<value = {t} {{1.0}}>()
    c05 = Constant<value = {t} {{0.5}}>()
    u = Mul(z, s)
    e = Erf(u)
    a = Add(e, c1)
    m = Mul(z, a)
    gelu = Mul(m, c05)""",
}

CANONICAL = """
    s = Constant<value = {t} {{1.4142135}}>()
    c1 = Constant<value = {t} {{1.0}}>()
    c05 = Constant<value = {t} {{0.5}}>()
    u = Div(z, s)
    e = Erf(u)
    a = Add(e, c1)
    m = Mul(z, a)
    gelu = Mul(m, c05)"""


def _model(body: str, dtype: str = "float", extra_out: str = "") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = "{" + ", ".join(f"{v:.4f}" for v in rng.normal(0, 0.4, 256)) + "}"
    b = "{" + ", ".join(f"{v:.4f}" for v in rng.normal(0, 0.4, 16)) + "}"
    text = HEAD.format(t=dtype, w=w, b=b, body=body.format(t=dtype), extra_out=extra_out)
    return model_from_text(text)


def _to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model in float16 (the ONNX text parser cannot write float16 literals)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    half = lambda t: numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)
    inits = [half(t) for t in m.graph.initializer]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    for n in m.graph.node:
        for a in n.attribute:
            if a.name == "value":
                a.t.CopyFrom(half(a.t))
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.checker.check_model(m, full_check=True)
    return m


def _feed(dtype: type = np.float32) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).normal(0, 2, (2, 8, 16)).astype(dtype)}


def _ort_fused_ops(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    """The op types of the graph ORT runs after its extended optimisations (where Gelu fusion happens)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return op_types(onnx.load(so.optimized_model_filepath))


def _rewrite(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    result = CanonicalGeluPass()(gs.import_onnx(model), make_ctx())
    return full_check(result.graph), result.counts


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_form_is_rewritten_to_the_chain_ort_fuses(form: str, tmp_path: Path) -> None:
    model = _model(FORMS[form])
    out, counts = _rewrite(model)
    assert counts == {"gelus_rewritten": 1, "gelus_canonical": 0}
    ops = op_types(out)
    assert ops.count("Erf") == 1 and ops.count("Div") == 1
    assert ops[ops.index("Div"):ops.index("Div") + 5] == ["Div", "Erf", "Add", "Mul", "Mul"]
    ref, got = run_ort(model, _feed())[0], run_ort(out, _feed())[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    fused = _ort_fused_ops(out, tmp_path)
    assert "Erf" not in fused and ({"Gelu", "BiasGelu"} & set(fused)), fused


def test_output_name_and_the_graph_output_keep_their_names() -> None:
    model = _model(FORMS["half-first"].replace("gelu = Mul(hx, a)", "y2 = Mul(hx, a)\n    gelu = Identity(y2)"))
    out, _ = _rewrite(model)
    assert [o.name for o in out.graph.output] == ["y"]
    assert any(n.output[0] == "y2" and n.op_type == "Mul" for n in out.graph.node)


def test_already_canonical_is_counted_and_left_alone() -> None:
    model = _model(CANONICAL)
    out, counts = _rewrite(model)
    assert counts == {"gelus_rewritten": 0, "gelus_canonical": 1}
    assert [n.name for n in out.graph.node] == [n.name for n in model.graph.node]


def test_float16_gelu_is_rewritten_with_float16_constants(tmp_path: Path) -> None:
    model = _to_float16(_model(FORMS["half-first"]))
    out, counts = _rewrite(model)
    assert counts["gelus_rewritten"] == 1
    consts = [i for i in out.graph.initializer if i.name.endswith(("/sqrt2", "/one", "/half"))]
    assert len(consts) == 3 and all(c.data_type == onnx.TensorProto.FLOAT16 for c in consts)
    ref, got = run_ort(model, _feed(np.float16))[0], run_ort(out, _feed(np.float16))[0]
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    "change, extra_out",
    [
        ("e = Erf(u)", ", float[2, 8, 16] e"),  # an inner tensor is a graph output
        ("a = Add(e, c1)", ", float[2, 8, 16] a2"),  # an inner tensor has another reader
        ("c05 = Constant<value = float {0.6}>()", ""),  # not GELU's constant
        ("s = Constant<value = float[16] {" + ", ".join(["0.70710677"] * 16) + "}>()", ""),  # not a scalar
    ],
)
def test_lookalikes_are_left_alone(change: str, extra_out: str) -> None:
    body = FORMS["half-first"].format(t="float")
    key = change.split(" = ")[0].strip()
    lines = [change if ln.strip().startswith(key + " = ") else ln for ln in body.splitlines()]
    if "a2" in extra_out:
        lines.append("    a2 = Neg(a)")
    model = _model("\n".join(lines).replace("{", "{{").replace("}", "}}"), extra_out=extra_out)
    out, counts = _rewrite(model)
    assert counts == {"gelus_rewritten": 0, "gelus_canonical": 0}
    assert op_types(out) == op_types(model)


def test_two_gelus_in_one_graph_both_rewritten_with_distinct_names() -> None:
    first = FORMS["half-first"].replace("gelu = ", "g1 = ")
    second = FORMS["mul-sqrt"].replace("(z,", "(g1,").replace("Mul(z, a)", "Mul(g1, a)")
    second = "\n".join(ln.replace(" s = ", " s2 = ").replace(" c1 = ", " c12 = ").replace(" c05 = ", " c052 = ")
                       .replace(" u = ", " u2 = ").replace(" e = ", " e2 = ").replace(" a = ", " a2 = ")
                       .replace(" m = ", " m2 = ") for ln in second.splitlines())
    second = (second.replace("(g1, s)", "(g1, s2)").replace("Erf(u)", "Erf(u2)").replace("Add(e, c1)", "Add(e2, c12)")
              .replace("Mul(g1, a)", "Mul(g1, a2)").replace("Mul(m, c05)", "Mul(m2, c052)"))
    model = _model(first + second)
    out, counts = _rewrite(model)
    assert counts["gelus_rewritten"] == 2
    names = [n.name for n in out.graph.node if n.name]
    assert len(names) == len(set(names)) and op_types(out).count("Div") == 2
    np.testing.assert_allclose(run_ort(out, _feed())[0], run_ort(model, _feed())[0], rtol=1e-6, atol=1e-6)


@pytest.mark.assets
def test_minilm_gelus_fused_by_ort_after_the_rewrite(assets: Path, tmp_path: Path) -> None:
    src = asset(assets, "minilm/model.onnx")
    model = onnx.load(src)
    out, counts = _rewrite(model)
    assert counts == {"gelus_rewritten": 6, "gelus_canonical": 0}
    fused = _ort_fused_ops(out, tmp_path)
    assert fused.count("BiasGelu") + fused.count("Gelu") == 6 and "Erf" not in fused
    ids = np.random.default_rng(0).integers(1000, 20000, (2, 16)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    for ref, got in zip(run_ort(model, feed), run_ort(out, feed)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
