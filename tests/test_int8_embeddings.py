"""Tests for passes/int8_embeddings.py: token tables stored as int8 rows, one scale per row.

Oracle: the per-row rule written out in numpy (scale = max|row| / 127, codes = clip(rint(row / scale))),
compared bit for bit with what ORT computes from the rewritten graph.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import asset
from helpers import full_check, make_ctx, make_model, run_ort, value_info
from onnxq.calibration.sources import RandomSource, input_specs
from onnxq.passes.int8_embeddings import Int8EmbeddingsPass
from onnxq.quantization import quantize_model
from onnxq.recipe import preset

VOCAB, DIM = 128, 16  # RandomSource draws ids in [0, 100)


def _model(table_dtype: type = np.float32) -> onnx.ModelProto:
    """ids -> Gather(token table) + Gather(position table, constant positions) -> MatMul."""
    rng = np.random.default_rng(0)
    table = rng.normal(0, 1, (VOCAB, DIM)).astype(table_dtype)
    table[3] = 0.0  # an all-zero row: scale 1, codes 0
    table[7, 2] = 40.0  # one loud value only coarsens its own row
    pos = rng.normal(0, 1, (8, DIM)).astype(table_dtype)
    nodes = [
        helper.make_node("Gather", ["tok_table", "input_ids"], ["tok"], name="tok_gather"),
        helper.make_node("Gather", ["pos_table", "positions"], ["pos"], name="pos_gather"),
        helper.make_node("Add", ["tok", "pos"], ["emb"], name="add"),
        helper.make_node("Cast", ["emb"], ["emb32"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["emb32", "w"], ["y"], name="proj"),
    ]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(table_dtype))
    inits = {"tok_table": table, "pos_table": pos, "positions": np.arange(8, dtype=np.int64)[None],
             "w": rng.normal(0, 1, (DIM, 4)).astype(np.float32)}  # fmt: skip
    return make_model(nodes, [value_info("input_ids", [1, 8], TensorProto.INT64)],
                      [value_info("y", [1, 8, 4]), value_info("tok", [1, 8, DIM], elem)], inits)  # fmt: skip


IDS = np.asarray([[3, 7, 0, 63, 7, 5, 1, 2]], np.int64)


def _oracle(table: np.ndarray) -> np.ndarray:
    absmax = np.abs(table).max(axis=1)
    scale = np.where(absmax > 0, absmax / np.float32(127), 1).astype(np.float32)
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    return q.astype(np.float32) * scale[:, None]


def test_token_table_becomes_int8_rows_bit_exact() -> None:
    model = _model()
    table = numpy_helper.to_array(model.graph.initializer[0])
    ctx = make_ctx()
    result = Int8EmbeddingsPass()(gs.import_onnx(model), ctx)
    assert result.counts == {"embeddings_quantized": 1}
    out = full_check(result.graph)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert "tok_table" not in inits and inits["tok_table_int8"].dtype == np.int8
    assert "pos_table" in inits  # indexed by computed positions, not by the token ids
    got = run_ort(out, {"input_ids": IDS})[1]
    np.testing.assert_array_equal(got, _oracle(table)[IDS])
    # error bound: half a step of the value's own row; the loud row 7 does not coarsen row 0
    step = np.abs(table).max(axis=1) / 127
    assert np.all(np.abs(got - table[IDS]) <= step[IDS][..., None] / 2 * 1.0001)
    assert np.abs(got[0, 2] - table[0]).max() <= np.abs(table[0]).max() / 254 * 1.0001
    docs = ctx.doc_strings  # written into the model's nodes at the end of quantize_model
    assert len(docs) == 4 and all(k.startswith("tok_gather/") and "int8" in d for k, d in docs.items())


def test_a_table_read_by_two_gathers_is_stored_once() -> None:
    model = _model()
    model.graph.node.insert(1, helper.make_node("Gather", ["tok_table", "input_ids"], ["tok2"], name="tok_gather2"))
    model.graph.output.append(helper.make_tensor_value_info("tok2", TensorProto.FLOAT, [1, 8, DIM]))
    result = Int8EmbeddingsPass()(gs.import_onnx(full_check(model)), make_ctx())
    assert result.counts == {"embeddings_quantized": 2}
    out = full_check(result.graph)
    assert sum(t.data_type == TensorProto.INT8 for t in out.graph.initializer) == 1
    a, b = run_ort(out, {"input_ids": IDS})[1:3]
    np.testing.assert_array_equal(a, b)


def test_float16_tables_and_excluded_nodes_stay() -> None:
    result = Int8EmbeddingsPass()(gs.import_onnx(_model(np.float16)), make_ctx())
    assert result.counts == {"embeddings_quantized": 0} and not result.modified
    recipe = preset("w8a8")
    recipe = recipe.with_(exclude=dataclasses.replace(recipe.exclude, names=("tok_gather",)))
    result = Int8EmbeddingsPass.from_recipe(recipe)(gs.import_onnx(_model()), make_ctx())
    assert result.counts == {"embeddings_quantized": 0}


@pytest.mark.parametrize("name", ["w8a8", "w8a8-smoothquant", "int8-dynamic"])
def test_int8_presets_store_embeddings_in_int8(name: str) -> None:
    recipe = preset(name)
    assert "int8_embeddings" in recipe.passes
    model = _model()
    source = None if name == "int8-dynamic" else RandomSource(input_specs(model), count=4, seed=0)
    res = quantize_model(model, recipe, checked=True, source=source)
    inits = {t.name: t for t in res.model.graph.initializer}
    assert inits["tok_table_int8"].data_type == TensorProto.INT8


@pytest.mark.assets
def test_minilm_int8_dynamic_is_a_quarter_of_fp32_and_keeps_its_embeddings(assets: Path, tmp_path: Path) -> None:
    from onnxq.quantization import quantize_file

    src = asset(assets, "minilm/model.onnx")
    dst = tmp_path / "minilm.dyn.onnx"
    quantize_file(src, dst, preset("int8-dynamic"), progress=False)
    assert dst.stat().st_size < 0.3 * src.stat().st_size  # word embeddings were 47 of 90 MB in float
    ids = np.random.default_rng(0).integers(1000, 20000, (2, 16)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    ref = run_ort(onnx.load(src), feed)
    got = run_ort(onnx.load(dst), feed)
    names = [o.name for o in onnx.load(src, load_external_data=False).graph.output]
    emb = names.index("sentence_embedding")
    a, b = ref[emb], got[emb]
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.99
