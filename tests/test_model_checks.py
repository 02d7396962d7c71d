"""onnxq.model_checks.validate: onnx.checker where onnx has the schemas, ONNX Runtime where only it has them.

The LLM exports of onnxruntime-genai's builder put ``SimplifiedLayerNormalization`` (an op only onnxruntime knows)
in the default domain and com.microsoft contrib ops everywhere: they load, pass the final check of a quantize run
and the checked mode's per-pass check, while the rest of the graph is still checked by onnx.checker (which stops
at the first node it has no schema for), and a really invalid node is refused in one line naming it.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import pytest

from llm_graphs import builder_llm, optimum_llm
from onnxq.errors import ModelLoadError, OnnxqError, PassError
from onnxq.model import load_model
from onnxq.model_checks import ModelCheckError, ort_only_nodes, validate
from onnxq.pipeline import check_graph
from onnxq.quantization import verify_loads


@pytest.mark.parametrize("build", [builder_llm, optimum_llm])
def test_llm_exports_load_verify_and_check(build, tmp_path: Path) -> None:  # noqa: ANN001
    model = build()
    validate(model, full_check=True)
    verify_loads(model)
    check_graph(gs.import_onnx(model), where="a pass")
    onnx.save(model, tmp_path / "m.onnx")
    assert len(load_model(tmp_path / "m.onnx").graph.node) == len(model.graph.node)


def test_builder_ops_only_onnxruntime_knows_are_found() -> None:
    ops = sorted({(n.domain, n.op_type) for n in ort_only_nodes(builder_llm())})
    assert ops == [("", "SimplifiedLayerNormalization"), ("com.microsoft", "GroupQueryAttention"),
                   ("com.microsoft", "SkipSimplifiedLayerNormalization")]
    assert ort_only_nodes(optimum_llm()) == []


def test_the_graph_after_an_op_onnx_does_not_know_is_still_checked() -> None:
    """A broken standard node after SimplifiedLayerNormalization: onnx.checker alone would stop at the norm."""
    model = builder_llm()
    sig = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    sig.input.append(sig.input[0])
    with pytest.raises(ModelCheckError, match=r"onnx checker.*has input size 2.*op type 'Sigmoid'"):
        validate(model, ort_load=False)


def _broken_gqa() -> onnx.ModelProto:
    model = builder_llm()
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    del gqa.input[1:]  # GroupQueryAttention takes 7 to 17 inputs
    return model


def test_a_broken_contrib_node_is_named_in_one_line(tmp_path: Path) -> None:
    onnx.save(_broken_gqa(), tmp_path / "bad.onnx")
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path / "bad.onnx")
    msg = str(err.value)
    assert "\n" not in msg and "corrupt" not in msg
    assert "onnxruntime" in msg and "input size 1 not in range" in msg
    assert "node '/model/layers.0/attn/GroupQueryAttention', op type 'GroupQueryAttention'" in msg
    with pytest.raises(OnnxqError, match="GroupQueryAttention.*input size 1"):
        verify_loads(_broken_gqa())
    with pytest.raises(PassError, match="GroupQueryAttention.*input size 1"):
        check_graph(gs.import_onnx(_broken_gqa()), where="a pass")


def test_external_data_models_with_contrib_ops_load(tmp_path: Path) -> None:
    model = builder_llm()
    onnx.save(model, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    loaded = load_model(tmp_path / "model.onnx")
    lm_head = next(t for t in loaded.graph.initializer if t.name == "lm_head.MatMul.weight")
    assert lm_head.data_location == onnx.TensorProto.DEFAULT and len(lm_head.raw_data) == 64 * 128 * 4
