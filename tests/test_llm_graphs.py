"""The tiny LLM graphs of both export forms (tests/llm_graphs.py) run in ONNX Runtime, and their KV-cache decode
step gives the logits of a full prefill: the harness the LLM tests of the passes rely on."""

from __future__ import annotations

import numpy as np
import pytest

from llm_graphs import builder_llm, optimum_llm, run_decode, run_prefill, session, token_ids

FORMS = {"builder": builder_llm, "optimum": optimum_llm}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_decode_step_equals_prefill(form: str) -> None:
    sess = session(FORMS[form]())
    ids = token_ids(9)
    full, past = run_prefill(sess, ids, head_dim=16)
    assert full.shape == (1, 9, 128)
    assert past["past_key_values.1.value"].shape == (1, 2, 9, 16)
    np.testing.assert_allclose(run_decode(sess, ids, head_dim=16), full[0, -1], atol=1e-4)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_the_past_matters(form: str) -> None:
    """The decode check can fail: the same last token after another history gives other logits."""
    sess = session(FORMS[form]())
    ids = token_ids(9)
    other = ids.copy()
    other[0, :-1] = token_ids(8, seed=3)[0]
    assert np.abs(run_decode(sess, other, head_dim=16) - run_prefill(sess, ids, head_dim=16)[0][0, -1]).max() > 1e-2


def test_builder_form_has_the_exporters_ops() -> None:
    model = builder_llm()
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert {("", "SimplifiedLayerNormalization"), ("com.microsoft", "SkipSimplifiedLayerNormalization"),
            ("com.microsoft", "GroupQueryAttention"), ("", "Sigmoid")} <= ops
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    transpose = next(n for n in model.graph.node if n.output[0] == gather.input[0])
    assert transpose.input[0] == "lm_head.MatMul.weight"
    assert any(n.op_type == "MatMul" and n.input[1] == "lm_head.MatMul.weight" for n in model.graph.node)
