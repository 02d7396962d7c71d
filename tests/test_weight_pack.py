"""weightonly.pack: MatMulNBits and opset-21 DequantizeLinear packing, checked bit for bit in ORT against
QuantizedWeight.dequantize(), against each other, ONNX's reference evaluator and ORT's own 4-bit packer;
graph rewrites (names, domains, opset), accuracy level 4, and refusals that name the node."""

from __future__ import annotations

from functools import lru_cache

import ml_dtypes
import numpy as np
import onnx
import onnx.reference
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from helpers import full_check, op_types, run_ort

from onnxq.errors import PassError
from onnxq.graphs import FreshNames
from onnxq.weightonly.grid import QuantizedWeight, WeightGrid, rtn
from onnxq.weightonly.pack import (
    MS_DOMAIN,
    MatMulNBitsArrays,
    ensure_opset,
    pack_dequantize_linear,
    pack_matmulnbits,
    to_dequantize_matmul,
    to_matmulnbits,
    unpack_matmulnbits,
)

N = 48
KS = (64, 172, 256)  # 172: partial last block (stories260K), and an odd block count with block 16 (11 blocks)
GRIDS = {
    "int4-asym-b32": WeightGrid(4, False, 32),
    "int4-sym-b128": WeightGrid(4, True, 128),  # K=64: one block longer than K
    "int4-asym-b16": WeightGrid(4, False, 16),
    "int8-asym-b32": WeightGrid(8, False, 32),
    "int8-sym-b64": WeightGrid(8, True, 64),
    "int4-asym-channel": WeightGrid(4, False, None),
    "int8-sym-channel": WeightGrid(8, True, None),
}
CASES = [pytest.param(k, g, id=f"K{k}-{g}") for k in KS for g in GRIDS]
FORMATS = ("matmulnbits", "dq")


def _weight(k: int, n: int = N, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)
    w[:, 0] = np.abs(w[:, 0])  # a column whose blocks are all >= 0: zero point 0 (asymmetric)
    w[:, 1] = -np.abs(w[:, 1])  # ... and all <= 0: zero point 15 / 255
    return w


def _model(w: np.ndarray, x_shape: list, *, opset: int = 21, ir_version: int = 10) -> onnx.ModelProto:
    """x -> MatMul(W) -> y, one node named fc."""
    k, n = w.shape
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [*x_shape[:-1], n])],
        [onnx.numpy_helper.from_array(w, "W")],
    )
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    onnx.checker.check_model(m, full_check=True)
    return m


def _rewrite(model: onnx.ModelProto, qw: QuantizedWeight, fmt: str, **kwargs: object) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    node = next(n for n in graph.nodes if n.name == "fc")
    if fmt == "matmulnbits":
        to_matmulnbits(graph, node, qw, **kwargs)  # type: ignore[arg-type]
    else:
        to_dequantize_matmul(graph, node, qw, **kwargs)  # type: ignore[arg-type]
    graph.cleanup().toposort()
    return full_check(gs.export_onnx(graph))


@lru_cache(maxsize=None)
def _case(k: int, grid_id: str, rank: int) -> tuple[QuantizedWeight, dict[str, onnx.ModelProto]]:
    """The quantized weight and both rewritten models, activation of rank 2 ([M, K]) or 3 ([B, M, K])."""
    w = _weight(k)
    qw = rtn(w, GRIDS[grid_id])
    model = _model(w, ["M", k] if rank == 2 else ["B", "M", k])
    return qw, {fmt: _rewrite(model, qw, fmt) for fmt in FORMATS}


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


# ----------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize(("k", "grid_id"), CASES)
def test_identity_gives_the_dequantized_weight_bit_for_bit(k: int, grid_id: str) -> None:
    """A = I: every output is one weight times 1.0 plus exact zeros, so ORT must return dequantize() exactly.

    MatMulNBits without accuracy_level computes in float32 on CPU (MLAS dequantizes each block to
    (q - zp) * scale and runs an fp32 GEMM), and so does DequantizeLinear + MatMul: no tolerance needed."""
    qw, models = _case(k, grid_id, 2)
    ref = qw.dequantize()
    eye = np.eye(k, dtype=np.float32)
    got = {fmt: run_ort(m, {"x": eye})[0] for fmt, m in models.items()}
    for fmt, y in got.items():
        assert y.dtype == np.float32 and y.shape == (k, N)
        assert np.array_equal(y, ref), f"{fmt}: max |diff| {np.abs(y - ref).max()}"
    assert np.array_equal(got["matmulnbits"], got["dq"])


@pytest.mark.parametrize(("k", "grid_id"), CASES)
def test_random_activation_matches_float_matmul(k: int, grid_id: str) -> None:
    qw, models = _case(k, grid_id, 3)
    x = np.random.default_rng(1).normal(size=(2, 5, k)).astype(np.float32)
    expected = x @ qw.dequantize()
    scale = float(np.abs(expected).max())
    for fmt, m in models.items():
        y = run_ort(m, {"x": x})[0]
        assert y.shape == (2, 5, N)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=fmt)


@pytest.mark.parametrize("grid_id", list(GRIDS))
def test_reference_evaluator_agrees_on_the_dequantize_model(grid_id: str) -> None:
    """onnx's reference DequantizeLinear (its own int4 unpacking and blocked broadcast) as an oracle."""
    qw, models = _case(172, grid_id, 2)
    y = onnx.reference.ReferenceEvaluator(models["dq"]).run(None, {"x": np.eye(172, dtype=np.float32)})[0]
    assert np.array_equal(y, qw.dequantize())


@pytest.mark.parametrize(("k", "grid_id"), CASES)
def test_unpack_inverts_pack(k: int, grid_id: str) -> None:
    qw, models = _case(k, grid_id, 2)
    ref = qw.dequantize()
    assert np.array_equal(unpack_matmulnbits(pack_matmulnbits(qw)), ref)
    node = next(n for n in gs.import_onnx(models["matmulnbits"]).nodes if n.op == "MatMulNBits")
    assert np.array_equal(unpack_matmulnbits(MatMulNBitsArrays.from_node(node)), ref)


def test_unpack_reads_onnxruntime_packed_weights() -> None:
    """ORT's own 4-bit packer (used by its matmul_nbits_quantizer), 3 blocks per column: our reading of its
    bytes, zero points included, equals what ORT's MatMulNBits computes from them; our zero point padding
    nibble (an odd block count) is the 8 ORT writes."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n, bs = 40, 6, 16  # 3 blocks, the last one partial
    w = _weight(k, n, seed=3)
    nb = 3
    packed = np.zeros((n, nb, bs // 2), np.uint8)
    scales = np.zeros((n, nb), np.float32)
    zp = np.zeros((n, (nb + 1) // 2), np.uint8)
    padded = np.zeros((nb * bs, n), np.float32)
    padded[:k] = w
    quantize_matmul_4bits(packed, padded, scales, zp, bs, n, k, False)
    assert np.all(zp[:, -1] >> 4 == 8), "ORT pads the unused high nibble with 8"
    arrays = MatMulNBitsArrays(packed, scales, zp, k, n, 4, bs)
    g = gs.Graph(
        nodes=[gs.Node("MatMulNBits", "mm", attrs=arrays.attrs, domain=MS_DOMAIN,
                       inputs=[x := gs.Variable("x", np.float32, [k, k]), gs.Constant("B", packed),
                               gs.Constant("s", scales), gs.Constant("z", zp)],
                       outputs=[y := gs.Variable("y", np.float32, [k, n])])],
        inputs=[x], outputs=[y], opset=21,
    )  # fmt: skip
    from_ort = run_ort(g, {"x": np.eye(k, dtype=np.float32)})[0]
    assert np.array_equal(unpack_matmulnbits(arrays), from_ort)
    # our packer on the grid ORT used (asymmetric block 16) writes the same padding nibble
    ours = pack_matmulnbits(rtn(w, WeightGrid(4, False, 16)))
    assert ours.zero_points is not None and ours.zero_points.shape == (n, 2)
    assert np.all(ours.zero_points[:, -1] >> 4 == 8)


def test_accuracy_level_4_runs_close() -> None:
    """accuracy_level 4 quantizes A to int8 per block inside ORT: fast on CPU, close but not exact."""
    w = _weight(172)
    qw = rtn(w, WeightGrid(4, False, 32))
    m = _rewrite(_model(w, ["B", "M", 172]), qw, "matmulnbits", accuracy_level=4)
    node = next(n for n in m.graph.node if n.op_type == "MatMulNBits")
    assert onnx.helper.get_node_attr_value(node, "accuracy_level") == 4
    x = np.random.default_rng(2).normal(size=(2, 5, 172)).astype(np.float32)
    expected = x @ qw.dequantize()
    y = run_ort(m, {"x": x})[0]
    rel = float(np.linalg.norm(y - expected) / np.linalg.norm(expected))
    assert rel < 2e-2, f"relative error {rel:.4f}"


def test_onnxruntime_fuses_dequantize_matmul_at_int8_accuracy_unless_told() -> None:
    """With graph optimisations on, ORT rewrites DequantizeLinear + MatMul into MatMulNBits with
    accuracy_level 4 (session option ``session.qdq_matmulnbits_accuracy_level``, default 4): int8
    activations. With that option at 0 the fused node computes in float32 and stays exact."""
    qw, models = _case(172, "int4-asym-b32", 2)
    eye = np.eye(172, dtype=np.float32)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(models["dq"].SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {"x": eye})[0], qw.dequantize())
    default = run_ort(models["dq"], {"x": eye}, optimize=True)[0]
    assert not np.array_equal(default, qw.dequantize()), "ORT's default fusion no longer quantizes activations"


# ---------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("grid_id", ["int4-asym-b16", "int4-sym-b128", "int8-asym-b32", "int4-asym-channel"])
def test_matmulnbits_layout_and_names(grid_id: str) -> None:
    qw, models = _case(172, grid_id, 2)
    m = models["matmulnbits"]
    assert op_types(m) == ["MatMulNBits"]
    (node,) = m.graph.node
    assert node.name == "fc/MatMulNBits" and node.domain == MS_DOMAIN
    assert list(node.input[:1]) == ["x"] and list(node.output) == ["y"]
    assert {o.domain: o.version for o in m.opset_import} == {"": 21, MS_DOMAIN: 1}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bits, grid = qw.grid.bits, qw.grid
    bs = grid.block_size or 256  # per-channel: next power of two >= K = 172
    nb = -(-172 // bs)
    assert attrs == {"K": 172, "N": N, "bits": bits, "block_size": bs}
    b = _init(m, f"W_q{bits}")
    assert b.data_type == onnx.TensorProto.UINT8 and list(b.dims) == [N, nb, bs * bits // 8]
    s = _init(m, "W_scales")
    assert s.data_type == onnx.TensorProto.FLOAT and list(s.dims) == [N, nb]
    if grid.symmetric:
        assert len(node.input) == 3, "default zero point 2**(bits-1) is left out"
    else:
        z = _init(m, "W_zero_points")
        assert list(node.input) == ["x", f"W_q{bits}", "W_scales", "W_zero_points"]
        assert z.data_type == onnx.TensorProto.UINT8 and list(z.dims) == [N, -(-nb * bits // 8)]


@pytest.mark.parametrize(
    ("grid_id", "qtype", "attrs", "scale_dims"),
    [
        ("int4-asym-b32", onnx.TensorProto.UINT4, {"axis": 0, "block_size": 32}, [6, N]),
        ("int4-sym-b128", onnx.TensorProto.INT4, {"axis": 0, "block_size": 128}, [2, N]),
        ("int8-asym-b32", onnx.TensorProto.UINT8, {"axis": 0, "block_size": 32}, [6, N]),
        ("int8-sym-b64", onnx.TensorProto.INT8, {"axis": 0, "block_size": 64}, [3, N]),
        ("int4-asym-channel", onnx.TensorProto.UINT4, {"axis": 1}, [N]),
    ],
)
def test_dequantize_layout_and_names(grid_id: str, qtype: int, attrs: dict, scale_dims: list) -> None:
    qw, models = _case(172, grid_id, 2)
    m = models["dq"]
    assert op_types(m) == ["DequantizeLinear", "MatMul"]
    dq, mm = m.graph.node
    assert dq.name == "fc/DequantizeLinear"
    assert mm.name == "fc" and list(mm.output) == ["y"] and mm.input[1] == dq.output[0]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute} == attrs
    bits = qw.grid.bits
    q = _init(m, f"W_q{bits}")
    assert q.data_type == qtype and list(q.dims) == [172, N]
    if bits == 4:
        assert len(q.raw_data) == 172 * N // 2, "4-bit codes are stored packed, two per byte"
    assert list(_init(m, "W_scales").dims) == scale_dims
    if qw.grid.symmetric:
        assert len(dq.input) == 2
        assert np.array_equal(onnx.numpy_helper.to_array(q).astype(np.int16), qw.q.astype(np.int16) - 2 ** (bits - 1))
    else:
        z = _init(m, "W_zero_points")
        assert z.data_type == qtype and list(z.dims) == scale_dims
    assert not any(t.name == "W" for t in m.graph.initializer), "the float weight is gone after cleanup"


def test_rewrite_returns_the_new_nodes_with_the_scheme_and_detaches_the_matmul() -> None:
    """graphsurgeon 0.6 does not export node doc strings: passes copy them into ctx.doc_strings."""
    w = _weight(64)
    qw = rtn(w, WeightGrid(4, True, 32))
    graph = gs.import_onnx(_model(w, ["M", 64]))
    old = graph.nodes[0]
    x, y = old.inputs[0], old.outputs[0]
    new = to_matmulnbits(graph, old, qw)
    assert graph.nodes == [new] and new.doc_string.endswith("int4 symmetric block 32")
    assert not old.inputs and not old.outputs, "the MatMul is detached"
    assert new.inputs[0] is x and new.outputs[0] is y and y.inputs == [new] and x.outputs == [new]
    graph = gs.import_onnx(_model(w, ["M", 64]))
    mm = graph.nodes[0]
    dq, same = to_dequantize_matmul(graph, mm, qw)
    assert same is mm and graph.nodes == [dq, mm] and dq.doc_string.endswith(str(qw.grid))
    assert mm.inputs[1] is dq.outputs[0] and dq.outputs[0].dtype == np.float32


def test_pack_arrays_dtypes() -> None:
    w = _weight(64)
    sym = pack_dequantize_linear(rtn(w, WeightGrid(4, True, 32)))
    asym = pack_dequantize_linear(rtn(w, WeightGrid(4, False, 32)))
    assert sym.data.dtype == ml_dtypes.int4 and sym.zero_point is None
    assert asym.data.dtype == ml_dtypes.uint4 and asym.zero_point is not None and asym.zero_point.dtype == ml_dtypes.uint4
    assert pack_matmulnbits(rtn(w, WeightGrid(8, True, 32))).zero_points is None


def test_names_never_collide_and_tied_weight_survives() -> None:
    """Two MatMuls share W, and the graph already has a tensor called W_scales."""
    k = 64
    w = _weight(k)
    other = np.ones((N,), np.float32)
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
         onnx.helper.make_node("Add", ["h", "W_scales"], ["y"], name="add"),
         onnx.helper.make_node("MatMul", ["x", "W"], ["y2"], name="fc2")],
        "g", [onnx.helper.make_tensor_value_info("x", 1, ["M", k])],
        [onnx.helper.make_tensor_value_info("y", 1, ["M", N]), onnx.helper.make_tensor_value_info("y2", 1, ["M", N])],
        [onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(other, "W_scales")],
    )  # fmt: skip
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)])
    model.ir_version = 10
    qw = rtn(w, WeightGrid(4, False, 32))
    graph = gs.import_onnx(model)
    fresh = FreshNames(graph)
    fc, _, fc2 = graph.nodes
    to_matmulnbits(graph, fc, qw, names=fresh)
    to_dequantize_matmul(graph, fc2, qw, names=fresh)
    graph.cleanup().toposort()
    m = full_check(gs.export_onnx(graph))
    names = [t.name for t in m.graph.initializer]
    assert len(names) == len(set(names))
    assert {"W_q4", "W_scales_2", "W_zero_points", "W_q4_2", "W_scales_3", "W_zero_points_2"} <= set(names)
    x = np.random.default_rng(4).normal(size=(3, k)).astype(np.float32)
    y, y2 = run_ort(m, {"x": x})
    np.testing.assert_allclose(y, x @ qw.dequantize() + other, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(y2, x @ qw.dequantize(), rtol=1e-5, atol=1e-4)
    # rewriting only fc keeps W for fc2
    graph = gs.import_onnx(model)
    to_matmulnbits(graph, graph.nodes[0], qw)
    graph.cleanup()
    assert "W" in {t.name for t in full_check(gs.export_onnx(graph)).graph.initializer}


# ---------------------------------------------------------------------------------------------- opset


def test_ensure_opset_raises_opset_and_ir_for_dequantize() -> None:
    w = _weight(64)
    model = _model(w, ["M", 64], opset=17, ir_version=8)
    qw = rtn(w, WeightGrid(4, False, 32))
    graph = gs.import_onnx(model)
    with pytest.raises(PassError, match=r"fc.*opset 21.*ensure_opset"):
        to_dequantize_matmul(graph, graph.nodes[0], qw)
    assert ensure_opset(graph, 21) is True and ensure_opset(graph, 21) is False
    to_dequantize_matmul(graph, graph.nodes[0], qw)
    m = full_check(gs.export_onnx(graph.cleanup()))
    assert {o.domain: o.version for o in m.opset_import} == {"": 21} and m.ir_version >= 10
    assert np.array_equal(run_ort(m, {"x": np.eye(64, dtype=np.float32)})[0], qw.dequantize())


def test_ensure_opset_refuses_ops_whose_meaning_changed() -> None:
    """ReduceMean's axes moved from an attribute to an input at opset 18: relabelling would break it."""
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("ReduceMean", ["x"], ["y"], name="mean", axes=[1])], "g",
        [onnx.helper.make_tensor_value_info("x", 1, [2, 3])], [onnx.helper.make_tensor_value_info("y", 1, [2, 1])],
    )  # fmt: skip
    graph = gs.import_onnx(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    with pytest.raises(PassError, match=r"ReduceMean.*upgrade_opset"):
        ensure_opset(graph, 21)
    assert graph.opset == 17


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_constant_weight_refused_naming_the_node(fmt: str) -> None:
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w_in"], ["y"], name="gram")], "g",
        [onnx.helper.make_tensor_value_info("x", 1, [4, 64]), onnx.helper.make_tensor_value_info("w_in", 1, [64, N])],
        [onnx.helper.make_tensor_value_info("y", 1, [4, N])],
    )  # fmt: skip
    graph = gs.import_onnx(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)]))
    qw = rtn(_weight(64), WeightGrid(4, False, 32))
    rewrite = to_matmulnbits if fmt == "matmulnbits" else to_dequantize_matmul
    with pytest.raises(PassError, match=r"'gram'.*'w_in'.*not a constant"):
        rewrite(graph, graph.nodes[0], qw)
    assert op_types(graph) == ["MatMul"], "nothing changed"


@pytest.mark.parametrize("fmt", FORMATS)
def test_3d_weight_refused_naming_the_node(fmt: str) -> None:
    w3 = np.ones((2, 64, N), np.float32)
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W3"], ["y"], name="batched")], "g",
        [onnx.helper.make_tensor_value_info("x", 1, [2, 4, 64])], [onnx.helper.make_tensor_value_info("y", 1, [2, 4, N])],
        [onnx.numpy_helper.from_array(w3, "W3")],
    )  # fmt: skip
    graph = gs.import_onnx(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)]))
    rewrite = to_matmulnbits if fmt == "matmulnbits" else to_dequantize_matmul
    with pytest.raises(PassError, match=r"'batched'.*\(2, 64, 48\).*2-D"):
        rewrite(graph, graph.nodes[0], rtn(_weight(64), WeightGrid(4, False, 32)))


def test_float16_activation_and_bad_arguments_refused() -> None:
    w = _weight(64)
    qw = rtn(w, WeightGrid(4, False, 32))
    graph = gs.import_onnx(_model(w, ["M", 64]))
    graph.nodes[0].inputs[0].dtype = np.float16
    with pytest.raises(PassError, match=r"'fc'.*float16"):
        to_matmulnbits(graph, graph.nodes[0], qw)
    graph = gs.import_onnx(_model(w, ["M", 64]))
    with pytest.raises(ValueError, match="accuracy_level"):
        to_matmulnbits(graph, graph.nodes[0], qw, accuracy_level=5)
    with pytest.raises(ValueError, match=r"\(64, 48\).*\(32, 48\)"):
        to_matmulnbits(graph, graph.nodes[0], rtn(w[:32], WeightGrid(4, False, 32)))
    bad = QuantizedWeight(qw.q, qw.scales[:1], qw.zero_points[:1], qw.grid)
    with pytest.raises(ValueError, match=r"needs \[2, 48\] scales"):
        pack_matmulnbits(bad)


@pytest.mark.parametrize("block", [16, 32])
def test_symmetric_int4_is_onnxruntimes_own_quantization(block: int) -> None:
    """The symmetric int4 grid is onnxruntime's (MLAS, matmul_nbits_quantizer): the block's signed extreme lands
    on code 0 (scale = m / -8), so the packed bytes and scales equal what ORT's own quantizer writes."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = 64, 6
    w = _weight(k, n, seed=5)
    w[:, 1] = np.abs(w[:, 1])  # a column whose extreme is positive (negative scale)
    w[:block, 2] = 0.0  # an all-zero block
    nb = k // block
    packed = np.zeros((n, nb, block // 2), np.uint8)
    scales = np.zeros((n, nb), np.float32)
    zp = np.zeros((n, (nb + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zp, block, n, k, True)
    ours = pack_matmulnbits(rtn(w, WeightGrid(4, True, block)))
    assert ours.zero_points is None
    nonzero = scales != 0  # ORT stores scale 0 for an all-zero block, onnxq 1 (codes 8 either way: exact zeros)
    np.testing.assert_array_equal(ours.scales[nonzero], scales[nonzero])
    assert np.array_equal(ours.b, packed) and (scales[1] < 0).all() and scales[2, 0] == 0
