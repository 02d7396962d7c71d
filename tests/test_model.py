"""Tests for onnxq.model: safe loading, atomic saving, hashing, opset upgrade and graphsurgeon glue."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq.model as om
import onnxq.model_save as model_save
from onnxq.errors import ModelLoadError, ModelSaveError, OnnxqError, UnsafeModelError
from onnxq.model import (
    default_opset,
    load_model,
    model_hash,
    save_model,
    strip_initializer_inputs,
    to_graph,
    to_model,
    upgrade_opset,
)

from conftest import asset
from helpers import full_check, model_from_text, run_ort


def tiny_model(opset: int = 13, ir_version: int | None = None, seed: int = 0) -> onnx.ModelProto:
    """x[1,32] @ W[32,32] + b -> Relu, with ~4 KB of initializers and some model-level fields."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "B")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "B"], ["add"], name="add"),
        helper.make_node("Relu", ["add"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.doc_string = "a tiny model"
    helper.set_model_props(model, {"origin": "test_model"})
    onnx.checker.check_model(model, full_check=True)
    if ir_version is not None:
        model.ir_version = ir_version
    return model


FEED = {"x": np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32)}


def write(model: onnx.ModelProto, path: Path) -> Path:
    return write_bytes(path, model.SerializeToString())


def write_bytes(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


def with_external(tmp_path: Path, location: str = "tiny.onnx.data") -> Path:
    """tiny.onnx with W and B in one external file named ``location``."""
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_model(), str(path), save_as_external_data=True, location=location, size_threshold=0)
    return path


def relocate(path: Path, location: str) -> None:
    """Point every external tensor of the model file at ``location``."""
    model = onnx.load_model(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    write(model, path)


# ---------------------------------------------------------------- load errors

def test_load_roundtrip(tmp_path: Path) -> None:
    model = load_model(write(tiny_model(), tmp_path / "m.onnx"))
    np.testing.assert_allclose(run_ort(model, FEED)[0], run_ort(tiny_model(), FEED)[0])


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model file not found: .*nope.onnx"):
        load_model(tmp_path / "nope.onnx")


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_model(tmp_path)


def test_load_empty(tmp_path: Path) -> None:
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_model(tmp_path / "e.onnx")


@pytest.mark.parametrize(
    "content, what",
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4, "JPEG"),
        (b"this is a README, not a model\nsecond line\n", "text"),
        (b"PK\x03\x04" + b"\x00" * 100, "zip"),
    ],
)
def test_load_not_onnx(tmp_path: Path, content: bytes, what: str) -> None:
    path = tmp_path / "x.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    assert "not an ONNX model" in msg or "truncated or corrupt" in msg


def test_load_truncated_at_many_points(tmp_path: Path) -> None:
    blob = tiny_model().SerializeToString()
    path = tmp_path / "t.onnx"
    cuts = [1, 2, 5, 10, 50, 100, len(blob) // 3, len(blob) // 2, len(blob) - 200, len(blob) - 20]
    cuts += list(range(len(blob) - 60, len(blob)))  # the tail: field boundaries after the graph
    for cut in cuts:
        path.write_bytes(blob[:cut])
        try:
            model = load_model(path)
        except ModelLoadError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            continue
        # Only a cut inside trailing model-level metadata can leave a complete, valid model.
        assert len(model.graph.node) == 3 and model.opset_import, cut


def test_load_cut_right_after_graph(tmp_path: Path) -> None:
    model = tiny_model()
    after_graph = onnx.ModelProto(opset_import=model.opset_import, metadata_props=model.metadata_props)
    blob = model.SerializeToString()
    cut = blob[: len(blob) - len(after_graph.SerializeToString())]
    assert onnx.ModelProto.FromString(cut).graph == model.graph  # protobuf itself parses the cut file
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(write_bytes(tmp_path / "cut.onnx", cut))


def test_load_missing_opset_import_is_truncation(tmp_path: Path) -> None:
    model = tiny_model()
    del model.opset_import[:]
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(write(model, tmp_path / "m.onnx"))


def test_load_dangling_reference(tmp_path: Path) -> None:
    model = tiny_model()
    model.graph.node[1].input[1] = "nowhere"
    with pytest.raises(ModelLoadError, match="undefined tensor 'nowhere'"):
        load_model(write(model, tmp_path / "m.onnx"))


def test_load_initializer_with_wrong_byte_count(tmp_path: Path) -> None:
    model = tiny_model()
    t = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    if not t.HasField("raw_data"):
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
    t.raw_data = t.raw_data[:-4]
    with pytest.raises(ModelLoadError, match=f"initializer '{t.name}'.*needs {4 * int(np.prod(t.dims))} bytes"):
        load_model(write(model, tmp_path / "m.onnx"))


def test_load_bit_flips_never_leak_other_exceptions(tmp_path: Path) -> None:
    blob = bytearray(tiny_model().SerializeToString())
    path = tmp_path / "f.onnx"
    rng = random.Random(1234)
    for _ in range(300):
        corrupt = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            corrupt[rng.randrange(len(corrupt))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(corrupt))
        try:
            load_model(path)
        except ModelLoadError as exc:
            assert "\n" not in str(exc)


# ---------------------------------------------------------------- external data

def test_external_data_roundtrip(tmp_path: Path) -> None:
    model = tiny_model()
    before = model.SerializeToString()
    out = tmp_path / "sub" / "dir" / "out.onnx"
    files = save_model(model, out, external_data=True)
    assert files == [out.with_name("out.onnx.data"), out]
    assert model.SerializeToString() == before, "save_model must leave the caller's model unchanged"
    stored = onnx.load_model(str(out), load_external_data=False)
    locations = {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}
    loaded = load_model(out)
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer} == {
        t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, FEED)[0], run_ort(model, FEED)[0])
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_external_data_keeps_every_field_and_aligns(tmp_path: Path) -> None:
    model = tiny_model()
    big = numpy_helper.from_array(np.arange(512 * 512, dtype=np.float32).reshape(512, 512), "Big")  # 1 MiB
    model.graph.initializer.append(big)
    model.graph.node.append(helper.make_node("Shape", ["Big"], ["big_shape"], name="shape"))
    model.graph.output.append(helper.make_tensor_value_info("big_shape", TensorProto.INT64, [2]))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    out = tmp_path / "m.onnx"
    save_model(model, out, external_data=True)
    stored = onnx.load_model(str(out), load_external_data=False)
    offsets = {t.name: {e.key: e.value for e in t.external_data} for t in stored.graph.initializer}
    assert "location" not in offsets["B"]  # 128 bytes: stays inline
    assert int(offsets["Big"]["offset"]) % 65536 == 0 and int(offsets["Big"]["length"]) == 1 << 20
    loaded = load_model(out)
    for t in loaded.graph.initializer:  # back to inline form, then the protos must be identical
        del t.external_data[:]
        t.ClearField("data_location")
    assert loaded == model


def test_load_external_data_false_keeps_references(tmp_path: Path) -> None:
    model = load_model(with_external(tmp_path), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    with pytest.raises(ModelSaveError, match="external data"):
        save_model(model, tmp_path / "o.onnx")


def test_auto_external_data_above_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert save_model(tiny_model(), tmp_path / "small.onnx") == [tmp_path / "small.onnx"]
    monkeypatch.setattr(model_save, "EXTERNAL_DATA_THRESHOLD", 1000)
    files = save_model(tiny_model(), tmp_path / "big.onnx")
    assert files == [tmp_path / "big.onnx.data", tmp_path / "big.onnx"]
    np.testing.assert_allclose(run_ort(load_model(files[1]), FEED)[0], run_ort(tiny_model(), FEED)[0])


@pytest.mark.parametrize("location", ["../outside.data", "sub/../../outside.data", "/etc/passwd"])
def test_escaping_locations_refused(tmp_path: Path, location: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    path = with_external(folder)
    (tmp_path / "outside.data").write_bytes((folder / "tiny.onnx.data").read_bytes())
    relocate(path, location)
    with pytest.raises(UnsafeModelError) as info:
        load_model(path)
    assert "'W'" in str(info.value) and location in str(info.value)
    with pytest.raises(UnsafeModelError):
        model_hash(path)


def test_symlinks_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    path = with_external(folder)
    outside = tmp_path / "elsewhere.data"
    os.replace(folder / "tiny.onnx.data", outside)
    (folder / "tiny.onnx.data").symlink_to(outside)
    with pytest.raises(UnsafeModelError, match="outside the model's folder"):
        load_model(path)
    # onnx's loader refuses links even inside the folder: say so up front, as an unsafe model.
    os.replace(outside, folder / "real.data")
    (folder / "tiny.onnx.data").unlink()
    (folder / "tiny.onnx.data").symlink_to(folder / "real.data")
    with pytest.raises(UnsafeModelError, match="symbolic link"):
        load_model(path)
    relocate(path, "real.data")
    np.testing.assert_allclose(run_ort(load_model(path), FEED)[0], run_ort(tiny_model(), FEED)[0])


def test_missing_and_truncated_external_file(tmp_path: Path) -> None:
    path = with_external(tmp_path)
    data = tmp_path / "tiny.onnx.data"
    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(path)
    data.unlink()
    with pytest.raises(UnsafeModelError, match="does not exist"):
        load_model(path)


# ---------------------------------------------------------------- atomic save, input protection

def failing_write(monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    """Make the nth non-empty model_save._write_all call write half its bytes, then fail like a full disk."""
    calls = {"n": 0}
    real = model_save._write_all

    def write_all(f, data):  # type: ignore[no-untyped-def]
        calls["n"] += bool(len(data))
        if calls["n"] == nth and len(data):
            f.write(memoryview(data)[: len(data) // 2])
            raise OSError(28, "No space left on device")
        real(f, data)

    monkeypatch.setattr(model_save, "_write_all", write_all)


@pytest.mark.parametrize("external, nth", [(False, 1), (True, 1), (True, 2)])  # (True, 2): data done, model fails
def test_atomic_save_keeps_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external: bool, nth: int
) -> None:
    out = tmp_path / "out.onnx"
    previous = save_model(tiny_model(seed=1), out, external_data=external)
    snapshot = {p: p.read_bytes() for p in previous}
    model = tiny_model(seed=2)
    before = model.SerializeToString()
    failing_write(monkeypatch, nth)
    with pytest.raises(ModelSaveError, match="No space left"):
        save_model(model, out, external_data=external)
    assert {p: p.read_bytes() for p in previous} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in previous)
    assert model.SerializeToString() == before


def test_atomic_save_rename_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = write(tiny_model(seed=1), tmp_path / "out.onnx")
    old = out.read_bytes()

    def boom(src, dst):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(om.os, "replace", boom)
    with pytest.raises(ModelSaveError, match="Permission denied"):
        save_model(tiny_model(seed=2), out)
    assert out.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_save_to_directory_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSaveError, match="is a directory"):
        save_model(tiny_model(), tmp_path)


def test_refuse_overwriting_input(tmp_path: Path) -> None:
    inp = write(tiny_model(), tmp_path / "in.onnx")
    original = inp.read_bytes()
    (tmp_path / "link.onnx").symlink_to(inp)
    os.link(inp, tmp_path / "hard.onnx")
    for out in (inp, tmp_path / "." / "in.onnx", tmp_path / "link.onnx", tmp_path / "hard.onnx"):
        with pytest.raises(ModelSaveError) as info:
            save_model(tiny_model(seed=3), out, input_path=inp)
        assert "in.onnx" in str(info.value) and str(out.name) in str(info.value) and "-o" in str(info.value)
    assert inp.read_bytes() == original


def test_refuse_overwriting_input_external_data(tmp_path: Path) -> None:
    inp = with_external(tmp_path, location="out.onnx.data")  # the output's data file name
    data = (tmp_path / "out.onnx.data").read_bytes()
    with pytest.raises(ModelSaveError, match="out.onnx.data"):
        save_model(tiny_model(seed=3), tmp_path / "out.onnx", input_path=inp, external_data=True)
    with pytest.raises(ModelSaveError, match="refusing to overwrite"):
        save_model(tiny_model(seed=3), tmp_path / "out.onnx.data", input_path=inp)
    assert (tmp_path / "out.onnx.data").read_bytes() == data
    # Without external data the same output name is fine: it does not touch the input's data file.
    save_model(tiny_model(seed=3), tmp_path / "out.onnx", input_path=inp, external_data=False)
    assert (tmp_path / "out.onnx.data").read_bytes() == data


# ---------------------------------------------------------------- hashing

def test_model_hash(tmp_path: Path) -> None:
    import hashlib

    plain = write(tiny_model(), tmp_path / "plain.onnx")
    assert model_hash(plain) == hashlib.sha256(plain.read_bytes()).hexdigest()
    path = with_external(tmp_path)
    h1 = model_hash(path)
    assert h1 == model_hash(path)
    data = tmp_path / "tiny.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[10] ^= 0xFF
    data.write_bytes(bytes(blob))
    assert model_hash(path) != h1
    with pytest.raises(ModelLoadError, match="not found"):
        model_hash(tmp_path / "missing.onnx")


# ---------------------------------------------------------------- opsets, IR versions, graphsurgeon

def test_default_opset() -> None:
    assert default_opset(tiny_model(opset=11)) == 11
    model = tiny_model()
    model.opset_import[0].domain = "ai.onnx"
    assert default_opset(model) == 13
    del model.opset_import[:]
    with pytest.raises(ModelLoadError, match="default-domain"):
        default_opset(model)


def ir3_model() -> onnx.ModelProto:
    """The tiny model as an IR 3, opset 7 model: initializers also listed as graph inputs."""
    model = tiny_model(opset=7, ir_version=3)
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_strip_initializer_inputs() -> None:
    model = ir3_model()
    assert strip_initializer_inputs(model) == 2
    assert [i.name for i in model.graph.input] == ["x"] and model.ir_version == 4
    full_check(model)
    assert strip_initializer_inputs(model) == 0


def test_upgrade_opset_tiny() -> None:
    model = ir3_model()
    strip_initializer_inputs(model)
    up = upgrade_opset(model, 13)
    assert default_opset(up) == 13 and up.ir_version >= 7
    full_check(up)
    np.testing.assert_allclose(run_ort(up, FEED)[0], run_ort(model, FEED)[0], rtol=1e-6)
    assert up.metadata_props == model.metadata_props
    same = tiny_model(opset=13)
    assert upgrade_opset(same, 11) is same


def test_upgrade_opset_failures() -> None:
    model = tiny_model(opset=7)
    model.graph.node[2].op_type = "NotAnOp"
    with pytest.raises(ModelLoadError, match="opset 7 to 13.*'relu'.*NotAnOp"):
        upgrade_opset(model, 13)
    with pytest.raises(ModelLoadError, match="opset 13 to 99"):
        upgrade_opset(tiny_model(), 99)


def test_to_graph_to_model_keeps_model_fields() -> None:
    model = tiny_model()
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.ir_version = 8
    graph = to_graph(model)
    out = to_model(graph, template=model)
    full_check(out)
    assert out.ir_version == 8 and out.producer_name == "tests" and out.doc_string == "a tiny model"
    assert {p.key: p.value for p in out.metadata_props} == {"origin": "test_model"}
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 13), ("com.microsoft", 1)}
    np.testing.assert_allclose(run_ort(out, FEED)[0], run_ort(model, FEED)[0])


def test_to_model_raises_ir_for_new_opset_and_caps_it() -> None:
    model = tiny_model()
    model.ir_version = 7
    graph = to_graph(model)
    graph.opset = 21  # as a pass that needs blocked DequantizeLinear would
    out = to_model(graph, template=model)
    assert default_opset(out) == 21 and out.ir_version == 10
    full_check(out)
    run_ort(out, FEED)
    bare = to_model(to_graph(model))  # no template: graphsurgeon's IR, never above onnx's own
    assert 7 <= bare.ir_version <= onnx.IR_VERSION
    run_ort(bare, FEED)


def test_to_model_adds_imports_for_new_domains() -> None:
    import onnx_graphsurgeon as gs

    model = tiny_model()
    graph = to_graph(model)
    relu = graph.nodes[-1]
    relu.outputs = [gs.Variable("pre_gelu", dtype=np.float32, shape=[1, 32])]
    graph.nodes.append(gs.Node("Gelu", domain="com.microsoft", inputs=relu.outputs, outputs=graph.outputs))
    out = to_model(graph, template=model)
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 13), ("com.microsoft", 1)}
    full_check(out)
    x = FEED["x"]
    relu_x = np.maximum(run_ort(model, FEED)[0], 0)
    from math import erf
    expected = relu_x * 0.5 * (1 + np.vectorize(erf)(relu_x / np.sqrt(2)))
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], expected, rtol=1e-5, atol=1e-6)


def test_to_model_from_ir3_template_is_valid() -> None:
    model = ir3_model()
    out = to_model(to_graph(model), template=model)
    assert out.ir_version == 4 and [i.name for i in out.graph.input] == ["x"]
    full_check(out)


def test_to_model_export_error_is_onnxq_error() -> None:
    graph = to_graph(model_from_text("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2] x) => (float[2] y) { y = Relu(x) }
    """))
    graph.outputs[0].dtype = None
    with pytest.raises(OnnxqError):
        to_model(graph)


# ---------------------------------------------------------------- real assets

@pytest.mark.assets
def test_mnist_load_upgrade_matches(assets: Path) -> None:
    path = asset(assets, "mnist/model.onnx")
    model = load_model(path)
    assert default_opset(model) == 7 and model.ir_version == 3
    x = np.random.default_rng(0).uniform(0, 255, (1, 1, 28, 28)).astype(np.float32)
    feed = {model.graph.input[0].name: x}
    reference = run_ort(model, feed)[0]
    assert strip_initializer_inputs(model) > 0
    up = upgrade_opset(model, 13)
    assert default_opset(up) == 13
    full_check(up)
    np.testing.assert_allclose(run_ort(up, feed)[0], reference, rtol=1e-5, atol=1e-4)
    out = to_model(to_graph(up), template=up)
    full_check(out)
    np.testing.assert_allclose(run_ort(out, feed)[0], reference, rtol=1e-5, atol=1e-4)
    assert {p.key for p in out.metadata_props} == {p.key for p in model.metadata_props}


@pytest.mark.assets
def test_squeezenet_fp16_upgrade_matches(assets: Path) -> None:
    model = load_model(asset(assets, "cnn/squeezenet1.1-fp16/model.onnx"))
    assert model.ir_version == 3 and default_opset(model) == 7
    feed = {"data_0": np.random.default_rng(0).uniform(-100, 100, (1, 3, 224, 224)).astype(np.float16)}
    reference = run_ort(model, feed)[0]
    assert strip_initializer_inputs(model) == len(model.graph.initializer)
    up = upgrade_opset(model, 13)
    assert default_opset(up) == 13
    full_check(up)
    np.testing.assert_allclose(run_ort(up, feed)[0].astype(np.float32), reference.astype(np.float32), atol=1e-3)


# ------------------------------------------------------------------------------------ lazy external data
def _external_model(tmp_path: Path) -> Path:
    """A MatMul + Add model whose two initializers live in model.onnx.data."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal((6,)).astype(np.float32), "b")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "b"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=0)
    return path


def test_external_weights_are_read_only_when_needed(tmp_path: Path) -> None:
    from onnxq.model import ExternalValues, to_graph, to_model

    path = _external_model(tmp_path)
    full = onnx.load(str(path))
    expected = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer}
    header = load_model(path, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in header.graph.initializer)
    graph = to_graph(header, base_dir=tmp_path)
    consts = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    assert all(isinstance(c._values, ExternalValues) for c in consts.values())  # nothing read yet
    # exporting reads the data afresh: the output never points at the input's data file
    out = to_model(graph, template=header)
    assert all(t.data_location != TensorProto.EXTERNAL and not t.external_data for t in out.graph.initializer)
    assert {t.name: numpy_helper.to_array(t).tolist() for t in out.graph.initializer} == {k: v.tolist() for k, v in expected.items()}
    assert isinstance(consts["w"]._values, ExternalValues)  # still lazy after the export
    np.testing.assert_array_equal(consts["w"].values, expected["w"])  # now loaded and cached
    consts["w"].values = consts["w"].values * 2  # a pass changes it: exported inline, not flagged external
    out = to_model(graph, template=header)
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w")), expected["w"] * 2)
    onnx.checker.check_model(out, full_check=True)


def test_truncated_external_data_is_refused_before_any_pass(tmp_path: Path) -> None:
    from onnxq.model import to_graph

    path = _external_model(tmp_path)
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-8])
    with pytest.raises(ModelLoadError, match="past the end|truncated"):
        to_graph(load_model(path, load_external_data=False), base_dir=tmp_path)
