"""Tests for calibration sources: image folders, .npz/.npy files, test_data_set folders, random inputs, text with a
tokenizer and token-id lists."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import asset
from onnxq.calibration.sources import (
    ArrayFolderSource,
    ImageFolderSource,
    InputSpec,
    RandomSource,
    TestDataSetSource,
    TextSource,
    TextWindowSource,
    TokenFileSource,
    input_specs,
    load_image,
    open_source,
)
from onnxq.errors import CalibrationError, MissingDependencyError

Image = pytest.importorskip("PIL.Image")


def make_model(inputs: list[tuple[str, int, list]], *, initializer_as_input: bool = False) -> onnx.ModelProto:
    """Identity-per-input model with the given (name, elem type, shape) inputs."""
    vis = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    outs = [helper.make_tensor_value_info(n + "_out", t, s) for n, t, s in inputs]
    nodes = [helper.make_node("Identity", [n], [n + "_out"]) for n, _, _ in inputs]
    inits = []
    if initializer_as_input:
        inits = [numpy_helper.from_array(np.zeros(2, np.float32), "w")]
        vis.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]))
    return helper.make_model(helper.make_graph(nodes, "g", vis, outs, inits))


def image_model(shape: list, elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    return make_model([("input", elem, shape)])


def write_images(folder: Path, n: int, size: tuple[int, int] = (40, 30), seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------ input specs
def test_input_specs_skips_initializers_and_maps_dtypes() -> None:
    m = make_model([("a", TensorProto.FLOAT16, ["N", 3, None]), ("b", TensorProto.INT64, [1, 4])], initializer_as_input=True)
    specs = input_specs(m)
    assert [s.name for s in specs] == ["a", "b"]
    assert specs[0].dtype == np.float16 and specs[1].dtype == np.int64
    assert specs[0].shape == ("N", 3, None) and specs[1].shape == (1, 4)


# ------------------------------------------------------------------------------------------------ images
def test_torch_preprocessing_matches_numpy(tmp_path: Path) -> None:
    # shorter side already 256: the resize is the identity, so crop + normalise can be checked exactly
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (256, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    got = load_image(tmp_path / "a.png", preprocess="torch", resize=256, crop=224)
    top, left = 16, 38  # round((256-224)/2), round((300-224)/2)
    crop = pixels[top:top + 224, left:left + 224].astype(np.float32) / 255.0
    want = ((crop - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)[None]
    assert got.shape == (1, 3, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_other_preprocessings_match_numpy(tmp_path: Path) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.bmp")
    f = pixels.astype(np.float32)
    kw = dict(resize=8, crop=8, layout="NHWC")
    np.testing.assert_allclose(load_image(tmp_path / "a.bmp", preprocess="raw255", **kw)[0], f)
    np.testing.assert_allclose(load_image(tmp_path / "a.bmp", preprocess="tf127", **kw)[0], (f - 127) / 128, atol=1e-6)
    np.testing.assert_allclose(load_image(tmp_path / "a.bmp", preprocess="caffe_bgr", **kw)[0], f[..., ::-1] - [104, 117, 123])


def test_resize_shorter_side_then_center_crop(tmp_path: Path) -> None:
    write_images(tmp_path, 1, size=(300, 200))
    x = load_image(tmp_path / "img_000.png", resize=64, crop=(48, 56))
    assert x.shape == (1, 3, 48, 56)


def test_image_folder_nhwc_float16_and_static_size(tmp_path: Path) -> None:
    write_images(tmp_path / "sub", 3)
    src = open_source(str(tmp_path), image_model([1, 32, 32, 3], TensorProto.FLOAT16))
    assert isinstance(src, ImageFolderSource) and len(src) == 3
    assert src.layout == "NHWC" and src.crop == (32, 32) and src.resize == round(32 * 256 / 224)
    x = next(iter(src))["input"]
    assert x.shape == (1, 32, 32, 3) and x.dtype == np.float16
    assert "3 images" in src.describe() and "torch" in src.describe()


def test_image_folder_grayscale(tmp_path: Path) -> None:
    write_images(tmp_path, 2)
    src = open_source(str(tmp_path), image_model([1, 1, 28, 28]), preprocess="raw255")
    x = next(iter(src))["input"]
    assert x.shape == (1, 1, 28, 28) and 0 <= x.min() and x.max() <= 255
    ref = load_image(src.files[0], preprocess="raw255", resize=32, crop=28, channels=1)
    np.testing.assert_array_equal(x, ref)


def test_image_folder_finds_images_recursively_case_insensitive(tmp_path: Path) -> None:
    write_images(tmp_path / "b", 1)
    (tmp_path / "b" / "img_000.png").rename(tmp_path / "b" / "Z.PNG")
    write_images(tmp_path / "a", 1)
    (tmp_path / "notes.txt").write_text("not an image")
    src = ImageFolderSource(tmp_path, InputSpec("input", np.dtype(np.float32), ("N", 3, 16, 16)))
    assert [p.relative_to(tmp_path).as_posix() for p in src.files] == ["a/img_000.png", "b/Z.PNG"]


def test_limit_picks_evenly_spaced_images(tmp_path: Path) -> None:
    write_images(tmp_path, 10, size=(8, 8))
    spec = InputSpec("input", np.dtype(np.float32), ("N", 3, 8, 8))
    src = ImageFolderSource(tmp_path, spec, limit=4)
    assert len(src) == 4 and [src.files[i].name for i in src.indices] == ["img_000.png", "img_002.png", "img_005.png", "img_007.png"]
    assert "evenly spaced" in src.describe()
    assert len(ImageFolderSource(tmp_path, spec, limit=50)) == 10  # more than there is: use all


def test_unknown_preprocess_lists_valid_names(tmp_path: Path) -> None:
    write_images(tmp_path, 1)
    with pytest.raises(CalibrationError, match="valid names: torch, caffe_bgr, tf127, raw255"):
        open_source(str(tmp_path), image_model(["N", 3, 16, 16]), preprocess="imagenet")


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CalibrationError, match="broken.jpg"):
        open_source(str(tmp_path), image_model(["N", 3, 16, 16]))


def test_image_folder_needs_single_image_input(tmp_path: Path) -> None:
    write_images(tmp_path, 1)
    with pytest.raises(CalibrationError, match="single float image input"):
        open_source(str(tmp_path), make_model([("ids", TensorProto.INT64, ["batch", "seq"])]))


def test_missing_pillow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "onnxq\[images\]"'):
        load_image(tmp_path / "x.png")


# ------------------------------------------------------------------------------------------------ arrays
def test_npz_folder_round_trip(tmp_path: Path) -> None:
    m = make_model([("a", TensorProto.FLOAT, ["N", 4]), ("b", TensorProto.INT64, ["N", 2])])
    rng = np.random.default_rng(0)
    feeds = [{"a": rng.standard_normal((1, 4)).astype(np.float32), "b": rng.integers(0, 9, (1, 2))} for _ in range(3)]
    for i, f in enumerate(feeds):
        np.savez(tmp_path / f"s{i}.npz", **f)
    src = open_source(str(tmp_path), m)
    assert isinstance(src, ArrayFolderSource) and len(src) == 3
    for got, want in zip(src, feeds):
        assert set(got) == {"a", "b"}
        np.testing.assert_array_equal(got["a"], want["a"])
        np.testing.assert_array_equal(got["b"], want["b"])
    assert list(src)[0]["b"].dtype == np.int64


def test_multi_sample_npz_streams_one_at_a_time(tmp_path: Path) -> None:
    x = np.arange(5 * 3 * 2, dtype=np.float32).reshape(5, 3, 2)
    np.savez_compressed(tmp_path / "all.npz", input=x)
    src = open_source(str(tmp_path / "all.npz"), make_model([("input", TensorProto.FLOAT, ["N", 3, 2])]))
    got = list(src)
    assert len(src) == 5 and len(got) == 5
    for i, f in enumerate(got):
        np.testing.assert_array_equal(f["input"], x[i:i + 1])
    src = ArrayFolderSource(tmp_path, input_specs(make_model([("input", TensorProto.FLOAT, ["N", 3, 2])])), limit=2)
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in src]), x[[0, 2]])


def test_npy_single_input_with_cast(tmp_path: Path) -> None:
    x = np.arange(2 * 4, dtype=np.float64).reshape(2, 4)
    np.save(tmp_path / "x.npy", x)
    src = open_source(str(tmp_path / "x.npy"), make_model([("inp", TensorProto.FLOAT, ["N", 4])]))
    got = [f["inp"] for f in src]
    assert [g.shape for g in got] == [(1, 4), (1, 4)] and got[0].dtype == np.float32
    np.testing.assert_array_equal(got[1][0], x[1])
    assert "cast float64 -> float32" in src.describe()


def test_fortran_ordered_and_truncated_arrays(tmp_path: Path) -> None:
    x = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    np.save(tmp_path / "f.npy", x)
    m = make_model([("inp", TensorProto.FLOAT, ["N", 4])])
    np.testing.assert_array_equal(np.concatenate([f["inp"] for f in open_source(str(tmp_path / "f.npy"), m)]), x)
    np.save(tmp_path / "t.npy", np.zeros((4, 4), np.float32))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-20])
    with pytest.raises(CalibrationError, match="t.npy is truncated"):
        list(open_source(str(tmp_path / "t.npy"), m))


def test_npy_refused_for_multi_input_models(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    m = make_model([("a", TensorProto.FLOAT, ["N", 4]), ("b", TensorProto.FLOAT, ["N", 4])])
    with pytest.raises(CalibrationError, match="single-input"):
        open_source(str(tmp_path), m)


def test_single_unmatched_array_reshaped_like_mnist(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x=x)  # one array, one input: unambiguous, used whatever its name
    src = open_source(str(tmp_path / "mnist.npz"), make_model([("Input3", TensorProto.FLOAT, [1, 1, 28, 28])]))
    got = list(src)
    assert len(got) == 6 and got[0]["Input3"].shape == (1, 1, 28, 28) and got[0]["Input3"].dtype == np.float32
    np.testing.assert_array_equal(got[4]["Input3"][0, 0], x[4])
    d = src.describe()
    assert "array 'x' used for input 'Input3'" in d and "Nx1x28x28" in d and "cast uint8 -> float32" in d


def test_pickled_object_array_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    m = make_model([("input", TensorProto.FLOAT, ["N", 2])])
    with pytest.raises(CalibrationError, match="pickled"):
        open_source(str(tmp_path / "obj.npy"), m)
    np.savez(tmp_path / "obj.npz", input=np.array([object()], dtype=object))
    with pytest.raises(CalibrationError, match="pickled"):
        open_source(str(tmp_path / "obj.npz"), m)
    (tmp_path / "raw.npy").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CalibrationError, match="raw.npy"):
        open_source(str(tmp_path / "raw.npy"), m)


def test_name_mismatch_message(tmp_path: Path) -> None:
    np.savez(tmp_path / "foo.npz", a=np.zeros((1, 4), np.float32), b=np.zeros((1, 4), np.float32))
    m = make_model([("input", TensorProto.FLOAT, ["N", 4]), ("mask", TensorProto.FLOAT, ["N", 4])])
    with pytest.raises(CalibrationError) as e:
        open_source(str(tmp_path / "foo.npz"), m)
    assert str(e.value).startswith("calibration file foo.npz has arrays ['a', 'b'] but the model's inputs are ['input', 'mask']")
    assert "np.savez(path, input=...)" in str(e.value)


def test_ambiguous_array_names_refused_for_single_input(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 28, 28), np.uint8), labels=np.arange(2))
    m = make_model([("Input3", TensorProto.FLOAT, [1, 1, 28, 28])])
    with pytest.raises(CalibrationError, match="'images', 'labels'.*Input3"):
        open_source(str(tmp_path / "d.npz"), m)


def test_shape_mismatch_message(tmp_path: Path) -> None:
    np.savez(tmp_path / "foo.npz", x=np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(CalibrationError) as e:
        open_source(str(tmp_path / "foo.npz"), image_model(["N", 3, 224, 224]))
    msg = str(e.value)
    assert msg == "calibration array 'x' in foo.npz has shape (1, 3, 32, 32) but model input 'input' expects (N, 3, 224, 224)"


def test_dtype_mismatch_message(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", ids=np.zeros((1, 4), np.float32))
    with pytest.raises(CalibrationError, match="array 'ids' in f.npz has dtype float32 but model input 'ids' expects int64"):
        open_source(str(tmp_path / "f.npz"), make_model([("ids", TensorProto.INT64, ["N", 4])]))


def test_validate_checks_later_files_too(tmp_path: Path) -> None:
    np.savez(tmp_path / "0.npz", input=np.zeros((1, 4), np.float32))
    np.savez(tmp_path / "1.npz", input=np.zeros((1, 5), np.float32))
    with pytest.raises(CalibrationError, match="'input' in 1.npz has shape"):
        open_source(str(tmp_path), make_model([("input", TensorProto.FLOAT, ["N", 4])]))


# ---------------------------------------------------------------------------------------- paths / errors
def test_missing_path() -> None:
    with pytest.raises(CalibrationError, match="calibration source not found: /no/such/dir"):
        open_source("/no/such/dir", image_model(["N", 3, 8, 8]))


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing usable")
    with pytest.raises(CalibrationError) as e:
        open_source(str(tmp_path), image_model(["N", 3, 8, 8]))
    assert str(e.value) == f"calibration folder {tmp_path} holds no images, .npz/.npy or test_data_set files"


def test_bad_limit(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="positive"):
        np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
        open_source(str(tmp_path), make_model([("x", TensorProto.FLOAT, ["N", 4])]), limit=0)


# ----------------------------------------------------------------------------------------- test_data_set
def test_test_data_set_pb_folders(tmp_path: Path) -> None:
    m = make_model([("a", TensorProto.FLOAT, ["N", 3]), ("b", TensorProto.INT64, ["N", 2])])
    want = []
    for k in range(3):
        d = tmp_path / f"test_data_set_{k}"
        d.mkdir()
        a, b = np.full((1, 3), k, np.float32), np.full((1, 2), 10 + k, np.int64)
        # test_data_set_0 lists the inputs in swapped order under their names: the name wins over position;
        # the others carry stale names, so input_<i> feeds the i-th input
        first, second = ((b, "b"), (a, "a")) if k == 0 else ((a, "old_a"), (b, ""))
        (d / "input_0.pb").write_bytes(numpy_helper.from_array(*first).SerializeToString())
        (d / "input_1.pb").write_bytes(numpy_helper.from_array(*second).SerializeToString())
        (d / "output_0.pb").write_bytes(numpy_helper.from_array(a, "a_out").SerializeToString())
        want.append((a, b))
    src = open_source(str(tmp_path), m)
    assert isinstance(src, TestDataSetSource) and len(src) == 3
    for got, (a, b) in zip(src, want):
        np.testing.assert_array_equal(got["a"], a)
        np.testing.assert_array_equal(got["b"], b)
    assert len(open_source(str(tmp_path / "test_data_set_1"), m)) == 1  # a folder holding input_*.pb


def test_test_data_set_numbered_npy(tmp_path: Path) -> None:
    root = tmp_path / "test_data_set"
    for k in range(4):
        (root / str(k)).mkdir(parents=True)
        np.save(root / str(k) / "input_0.npy", np.full((1, 2), k, np.float32))
        np.save(root / str(k) / "output_0.npy", np.zeros(1, np.float32))
    src = open_source(str(root), make_model([("x", TensorProto.FLOAT, ["N", 2])]), limit=2)
    assert [float(f["x"][0, 0]) for f in src] == [0.0, 2.0]


# ------------------------------------------------------------------------------------------------ random
def test_random_source_deterministic_and_symbolic_dims() -> None:
    m = make_model([("ids", TensorProto.INT64, ["batch", "seq"]), ("x", TensorProto.FLOAT16, ["batch", 4]),
                    ("flag", TensorProto.BOOL, [2])])
    specs = input_specs(m)
    a, b = list(RandomSource(specs, count=3, seed=5, dim_values={"seq": 7})), list(RandomSource(specs, count=3, seed=5, dim_values={"seq": 7}))
    assert len(a) == 3
    for fa, fb in zip(a, b):
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])
    assert a[0]["ids"].shape == (1, 7) and a[0]["ids"].dtype == np.int64
    assert 0 <= a[0]["ids"].min() and a[0]["ids"].max() < 100
    assert a[0]["x"].shape == (1, 4) and a[0]["x"].dtype == np.float16
    assert a[0]["flag"].dtype == np.bool_
    c = next(iter(RandomSource(specs, count=1, seed=6)))
    assert c["ids"].shape == (1, 1) and not np.array_equal(c["x"], a[0]["x"])


def test_open_source_random() -> None:
    m = image_model(["N", 3, 8, 8])
    src = open_source("random:5", m)
    assert isinstance(src, RandomSource) and len(src) == 5 and next(iter(src))["input"].shape == (1, 3, 8, 8)
    assert len(open_source("random", m)) == 8


# -------------------------------------------------------------------------------------------------- text
VOCAB = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "."]
ID = {w: i for i, w in enumerate(VOCAB)}


def make_tokenizer(path: Path, *, file_padding: bool = True) -> Path:
    """A WordLevel tokenizer (whitespace pre-tokenizer, [CLS] $A [SEP]) saved as tokenizer.json; like MiniLM's
    file it configures padding to a fixed length, which a text source must turn off by default."""
    tk = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors

    tok = tk.Tokenizer(models.WordLevel(vocab=ID, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    if file_padding:
        tok.enable_padding(length=16, pad_id=1, pad_token="[PAD]")
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def ids(text: str) -> list[int]:
    return [ID["[CLS]"], *(ID.get(w, 0) for w in text.replace(".", " .").split()), ID["[SEP]"]]


def text_model(names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids"), *,
               elem: int = TensorProto.INT64, seq: Any = "seq", extra: list[tuple[str, int, list]] | None = None) -> onnx.ModelProto:
    """Embedding Gather on input_ids + ReduceMean, plus the mean of every other input cast to float."""
    vis = [helper.make_tensor_value_info(n, elem, ["batch", seq]) for n in names]
    vis += [helper.make_tensor_value_info(n, t, s) for n, t, s in extra or []]
    emb = numpy_helper.from_array(np.random.default_rng(0).standard_normal((len(VOCAB), 4)).astype(np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", names[0]], ["e"]), helper.make_node("ReduceMean", ["e"], ["acc0"], keepdims=0)]
    for i, v in enumerate(vis[1:]):
        nodes += [helper.make_node("Cast", [v.name], [f"c{i}"], to=TensorProto.FLOAT),
                  helper.make_node("ReduceMean", [f"c{i}"], [f"m{i}"], keepdims=0),
                  helper.make_node("Add", [f"acc{i}", f"m{i}"], [f"acc{i + 1}"])]
    nodes.append(helper.make_node("Identity", [f"acc{len(vis) - 1}"], ["y"]))
    graph = helper.make_graph(nodes, "text", vis, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [emb])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_ort(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


LINES = ["the cat sat on the mat .", "", "a dog ran far away", "   ", "the dog sat", "cat", "a cat ran", "the mat",
         "dog on mat", "the cat ran away", "a dog sat", "far away ."]
TEXTS = [t for t in LINES if t.strip()]


def test_text_lines_fill_inputs_by_name(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tok" / "tokenizer.json")
    (tmp_path / "c.txt").write_text("\n".join(LINES) + "\n")
    m = text_model()
    src = open_source(str(tmp_path / "c.txt"), m, tokenizer=str(tok))
    assert isinstance(src, TextSource) and len(src) == len(TEXTS) == 10
    feeds = list(src)
    assert len(feeds) == 10
    for f, t in zip(feeds, TEXTS):
        assert set(f) == {"input_ids", "attention_mask", "token_type_ids"}
        assert all(v.dtype == np.int64 and v.shape == (1, len(ids(t))) for v in f.values())  # no padding
        assert f["input_ids"][0].tolist() == ids(t)
        assert (f["attention_mask"] == 1).all() and (f["token_type_ids"] == 0).all()
    assert np.isfinite(run_ort(m, feeds[0])[0]).all()
    d = src.describe()
    assert "10 samples" in d and "one sample per line" in d and "padding none" in d and "tokenizer.json" in d
    # the tokenizer argument may also be the folder holding tokenizer.json; iterations repeat
    again = list(open_source(str(tmp_path / "c.txt"), m, tokenizer=str(tmp_path / "tok")))
    assert [f["input_ids"].tolist() for f in again] == [f["input_ids"].tolist() for f in feeds]


def test_text_truncation_and_padding(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "c.txt").write_text("the cat sat on the mat .\ncat\n")
    specs = input_specs(text_model())
    first = next(iter(TextSource(tmp_path / "c.txt", specs, tokenizer=tok, max_length=5)))
    assert first["input_ids"][0].tolist() == [2, ID["the"], ID["cat"], ID["sat"], 3]  # room kept for [CLS]/[SEP]
    padded = list(TextSource(tmp_path / "c.txt", specs, tokenizer=tok, max_length=6, padding="max_length"))
    assert all(f["input_ids"].shape == (1, 6) for f in padded)
    assert padded[1]["input_ids"][0].tolist() == [2, ID["cat"], 3, 1, 1, 1]  # the file's [PAD] id
    assert padded[1]["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    longest = list(TextSource(tmp_path / "c.txt", specs, tokenizer=tok, padding="longest"))
    assert longest[1]["input_ids"].shape == (1, 3)  # batches of one: same as none
    with pytest.raises(CalibrationError, match="valid modes: none, longest, max_length"):
        TextSource(tmp_path / "c.txt", specs, tokenizer=tok, padding="max")


def test_text_max_length_padding_without_file_padding(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tokenizer.json", file_padding=False)
    (tmp_path / "c.txt").write_text("cat\n")
    f = next(iter(TextSource(tmp_path / "c.txt", input_specs(text_model()), tokenizer=tok, max_length=4, padding="max_length")))
    assert f["input_ids"][0].tolist() == [2, ID["cat"], 3, ID["[PAD]"]]


def test_text_int32_position_ids_and_static_length(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "c.txt").write_text("the cat sat\n")
    m = text_model(("input_ids", "attention_mask", "position_ids"), elem=TensorProto.INT32)
    f = next(iter(open_source(str(tmp_path / "c.txt"), m, tokenizer=str(tok))))
    assert all(v.dtype == np.int32 for v in f.values())
    assert f["position_ids"][0].tolist() == [0, 1, 2, 3, 4]
    assert np.isfinite(run_ort(m, f)[0]).all()
    static = text_model(seq=8)
    src = open_source(str(tmp_path / "c.txt"), static, tokenizer=str(tok), max_length=64)
    f = next(iter(src))
    assert f["input_ids"].shape == (1, 8) and f["attention_mask"][0].tolist() == [1] * 5 + [0] * 3
    assert "static sequence length 8" in src.describe()


def test_text_limit_evenly_spaced(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "c.txt").write_text("\n".join(LINES))
    src = open_source(str(tmp_path / "c.txt"), text_model(), tokenizer=str(tok), limit=4)
    assert len(src) == 4 and src.indices == [0, 2, 5, 7]
    assert [f["input_ids"][0].tolist() for f in src] == [ids(TEXTS[i]) for i in (0, 2, 5, 7)]
    assert "4 of 10 samples, evenly spaced" in src.describe()


def test_jsonl_field_choice(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    m = text_model()
    rows = [{"id": 1, "text": "the cat", "title": "dog"}, {"id": 2, "text": "a dog ran", "title": "mat"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    src = open_source(str(tmp_path / "a.jsonl"), m, tokenizer=str(tok))
    assert src.field == "text" and "JSONL, field 'text'" in src.describe()
    assert [f["input_ids"][0].tolist() for f in src] == [ids("the cat"), ids("a dog ran")]
    # no "text": the first string field of the first object
    rows = [{"id": 1, "body": "cat sat", "title": "dog"}, {"id": 2, "body": "the mat", "title": "ran"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    src = open_source(str(tmp_path / "b.jsonl"), m, tokenizer=str(tok))
    assert src.field == "body" and "field 'body'" in src.describe()
    assert [f["input_ids"][0].tolist() for f in src] == [ids("cat sat"), ids("the mat")]
    (tmp_path / "c.jsonl").write_text('"the cat"\n"a dog"\n')  # bare strings
    assert len(open_source(str(tmp_path / "c.jsonl"), m, tokenizer=str(tok))) == 2
    (tmp_path / "d.jsonl").write_text('{"text": "cat"}\n{"text": "dog"\n')
    with pytest.raises(CalibrationError, match="line 2 of .*d.jsonl is not JSON"):
        open_source(str(tmp_path / "d.jsonl"), m, tokenizer=str(tok))
    (tmp_path / "e.jsonl").write_text('{"text": "cat"}\n{"body": "dog"}\n')
    with pytest.raises(CalibrationError, match="line 2 of .*e.jsonl has no string field 'text'"):
        open_source(str(tmp_path / "e.jsonl"), m, tokenizer=str(tok))


def test_tsv_takes_the_last_text_column(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    m = text_model()
    # STS layout: tab-separated in a .csv, sentences in columns 6 and 7, some rows with two extra source columns
    sts = ["main\tMSRvid\t2012test\t0000\t5.000\tthe cat sat\ta cat sat",
           'main\theadlines\t2016\t0012\t4\tthe "dog" ran\tthe dog ran far\tsource one\tsource two', ""]
    (tmp_path / "sts.csv").write_text("\n".join(sts))
    src = open_source(str(tmp_path / "sts.csv"), m, tokenizer=str(tok))
    assert src.column == 6 and not src.header and "tab-separated, column 7" in src.describe()
    assert [f["input_ids"][0].tolist() for f in src] == [ids("a cat sat"), ids("the dog ran far")]
    (tmp_path / "h.tsv").write_text("sentence\tlabel\nthe cat\t1\na dog\t0\n")
    src = open_source(str(tmp_path / "h.tsv"), m, tokenizer=str(tok))
    assert src.header and len(src) == 2 and "column 1 'sentence', header skipped" in src.describe()
    (tmp_path / "q.csv").write_text('id,text\n1,"the cat, the dog"\n2,a mat\n')
    src = open_source(str(tmp_path / "q.csv"), m, tokenizer=str(tok))
    assert "comma-separated" in src.describe()
    assert [f["input_ids"][0].tolist() for f in src] == [ids("the cat the dog")[:3] + [0] + ids("the dog")[1:], ids("a mat")]


def test_text_needs_a_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("the cat\n")
    with pytest.raises(CalibrationError, match="text calibration needs --tokenizer tokenizer.json"):
        open_source(str(tmp_path / "c.txt"), text_model())


def test_bad_tokenizer_file_named(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    (tmp_path / "c.txt").write_text("the cat\n")
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(CalibrationError, match=r"cannot load tokenizer .*tokenizer\.json"):
        open_source(str(tmp_path / "c.txt"), text_model(), tokenizer=str(tmp_path / "tokenizer.json"))
    with pytest.raises(CalibrationError, match="tokenizer file not found: .*nope.json"):
        open_source(str(tmp_path / "c.txt"), text_model(), tokenizer=str(tmp_path / "nope.json"))


def test_missing_tokenizers_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.txt").write_text("the cat\n")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "onnxq\[text\]"'):
        open_source(str(tmp_path / "c.txt"), text_model(), tokenizer=str(tmp_path / "tokenizer.json"))


def test_unknown_required_input_named(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "c.txt").write_text("the cat\n")
    m = text_model(extra=[("past_key", TensorProto.INT64, ["batch", 4])])
    with pytest.raises(CalibrationError) as e:
        open_source(str(tmp_path / "c.txt"), m, tokenizer=str(tok))
    msg = str(e.value)
    assert "'past_key'" in msg and "cannot be filled by a text source" in msg
    assert all(n in msg for n in ("input_ids", "attention_mask", "token_type_ids", "position_ids"))
    m = text_model(extra=[("pixel_values", TensorProto.FLOAT, ["batch", 4])])
    with pytest.raises(CalibrationError, match="'pixel_values' has dtype float32; a text source feeds int64/int32"):
        open_source(str(tmp_path / "c.txt"), m, tokenizer=str(tok))
    m = text_model(("attention_mask",), extra=[("token_type_ids", TensorProto.INT64, ["batch", "seq"])])
    with pytest.raises(CalibrationError, match="no 'input_ids' input"):
        open_source(str(tmp_path / "c.txt"), m, tokenizer=str(tok))


def test_single_int_input_under_another_name(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "c.txt").write_text("the cat\n")
    f = next(iter(open_source(str(tmp_path / "c.txt"), text_model(("tokens",)), tokenizer=str(tok))))
    assert list(f) == ["tokens"] and f["tokens"][0].tolist() == ids("the cat")


def test_empty_text_file_and_unknown_suffix(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "e.txt").write_text("\n  \n")
    with pytest.raises(CalibrationError, match="holds no text samples"):
        open_source(str(tmp_path / "e.txt"), text_model(), tokenizer=str(tok))
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(CalibrationError, match=r"is not .npz/.npy, text \(.txt/.jsonl/.tsv/.csv\) or a .json token list"):
        open_source(str(tmp_path / "x.parquet"), text_model())
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CalibrationError, match="latin1.txt is not UTF-8"):
        open_source(str(tmp_path / "latin1.txt"), text_model(), tokenizer=str(tok))


# ------------------------------------------------------------------------------------------------ tokens
def test_token_windows(tmp_path: Path) -> None:
    tokens = list(range(1, 24))  # 23 tokens: 4 windows of 5, 3 left over
    (tmp_path / "t.json").write_text(json.dumps(tokens))
    m = text_model(("input_ids", "attention_mask", "position_ids"))
    src = open_source(str(tmp_path / "t.json"), m, seq_len=5)
    assert isinstance(src, TokenFileSource) and len(src) == 4
    feeds = list(src)
    for k, f in enumerate(feeds):
        assert f["input_ids"].shape == (1, 5) and f["input_ids"].dtype == np.int64
        assert f["input_ids"][0].tolist() == tokens[5 * k:5 * k + 5]
        assert (f["attention_mask"] == 1).all() and f["position_ids"][0].tolist() == [0, 1, 2, 3, 4]
    assert "4 windows of 5 tokens" in src.describe() and "23 tokens, 3 left over" in src.describe()
    small = [t % len(VOCAB) for t in tokens]
    (tmp_path / "s.json").write_text(json.dumps(small))
    assert np.isfinite(run_ort(m, next(iter(open_source(str(tmp_path / "s.json"), m, seq_len=5))))[0]).all()


def test_token_windows_limit_and_structures(tmp_path: Path) -> None:
    specs = input_specs(text_model(("input_ids",), elem=TensorProto.INT32))
    tokens = list(range(100))
    (tmp_path / "d.json").write_text(json.dumps({"input_ids": tokens, "name": "x"}))
    src = TokenFileSource(tmp_path / "d.json", specs, seq_len=10, limit=4)
    assert src.indices == [0, 2, 5, 7] and "4 of 10 windows of 10 tokens, evenly spaced" in src.describe()
    assert [int(f["input_ids"][0, 0]) for f in src] == [0, 20, 50, 70]
    assert next(iter(src))["input_ids"].dtype == np.int32
    (tmp_path / "n.json").write_text(json.dumps([tokens[:50], tokens[50:]]))  # list of lists: joined
    assert [int(f["input_ids"][0, 0]) for f in TokenFileSource(tmp_path / "n.json", specs, seq_len=30)] == [0, 30, 60]
    (tmp_path / "bad.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(CalibrationError, match="JSON object with keys"):
        TokenFileSource(tmp_path / "bad.json", specs)
    (tmp_path / "f.json").write_text(json.dumps([1.5, 2.0]))
    with pytest.raises(CalibrationError, match="does not hold a list of integer token ids"):
        TokenFileSource(tmp_path / "f.json", specs)
    with pytest.raises(CalibrationError, match="holds 100 tokens, fewer than one window of seq_len 512"):
        TokenFileSource(tmp_path / "d.json", specs)
    (tmp_path / "x.json").write_text("[1, 2,")
    with pytest.raises(CalibrationError, match="x.json is not JSON"):
        TokenFileSource(tmp_path / "x.json", specs)


def test_token_file_uses_static_seq_len(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(json.dumps(list(range(40))))
    src = open_source(str(tmp_path / "t.json"), text_model(("input_ids",), seq=16))
    assert src.seq_len == 16 and len(src) == 2
    with pytest.raises(CalibrationError, match=r"token window for 'input_ids' \(seq_len 8\).*expects \(batch, 16\)"):
        open_source(str(tmp_path / "t.json"), text_model(("input_ids",), seq=16), seq_len=8)


# ------------------------------------------------------------------------------------------- real assets
@pytest.mark.assets
def test_imagenet_with_mobilenetv2(assets: Path) -> None:
    model = onnx.load(asset(assets, "cnn/mobilenetv2-7/model.onnx"), load_external_data=False)
    src = open_source(str(asset(assets, "imagenet")), model, limit=4)
    assert isinstance(src, ImageFolderSource) and len(src) == 4
    feeds = list(src)
    assert len(feeds) == 4
    for f in feeds:
        x = f["input"]
        assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
        assert -2.2 <= x.min() < -1.0 and 1.0 < x.max() <= 2.7  # torch normalisation of 0..255 pixels
    assert "4 of 500 images" in src.describe()


@pytest.mark.assets
def test_mnist_npz(assets: Path, tmp_path: Path) -> None:
    model = onnx.load(asset(assets, "mnist/model.onnx"))
    data = np.load(asset(assets, "mnist/t10k-first5000.npz"))
    with pytest.raises(CalibrationError, match="Input3"):  # 'images' and 'labels': which one is ambiguous
        open_source(str(asset(assets, "mnist/t10k-first5000.npz")), model)
    np.savez(tmp_path / "mnist.npz", Input3=data["images"][:64])
    src = open_source(str(tmp_path / "mnist.npz"), model, limit=16)
    feeds = list(src)
    assert len(feeds) == 16
    assert all(f["Input3"].shape == (1, 1, 28, 28) and f["Input3"].dtype == np.float32 for f in feeds)
    assert max(f["Input3"].max() for f in feeds) == 255.0


@pytest.mark.assets
def test_mobilenet_test_data_set(assets: Path) -> None:
    model = onnx.load(asset(assets, "cnn/mobilenetv2-7/model.onnx"), load_external_data=False)
    folder = asset(assets, "cnn/mobilenetv2-7/test_data_set")
    src = open_source(str(folder), model)
    assert isinstance(src, TestDataSetSource) and len(src) == 3
    x = next(iter(src))["input"]
    np.testing.assert_array_equal(x, np.load(folder / "0" / "input_0.npy"))


@pytest.mark.assets
def test_minilm_with_sts_text(assets: Path) -> None:
    tk = pytest.importorskip("tokenizers")
    ort = pytest.importorskip("onnxruntime")
    model_path, tok = asset(assets, "minilm/model.onnx"), asset(assets, "minilm/tokenizer.json")
    sts = asset(assets, "sts/sts-dev.csv")
    model = onnx.load(model_path, load_external_data=False)
    src = open_source(str(sts), model, tokenizer=str(tok), limit=4)
    assert isinstance(src, TextSource) and len(src) == 4 and src.column == 6
    assert "4 of 1500 samples" in src.describe() and "column 7" in src.describe()
    feeds = list(src)
    ref = tk.Tokenizer.from_file(str(tok))
    ref.no_padding()
    second = sts.read_text(encoding="utf-8").splitlines()[0].split("\t")[6]  # "A man wearing a hard hat is dancing."
    assert feeds[0]["input_ids"][0].tolist() == ref.encode(second).ids
    for f in feeds:
        ids_ = f["input_ids"]
        assert ids_.dtype == np.int64 and ids_[0, 0] == 101 and ids_[0, -1] == 102  # [CLS] ... [SEP], unpadded
        assert f["attention_mask"].shape == ids_.shape and (f["attention_mask"] == 1).all()
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    hidden, emb = sess.run(["last_hidden_state", "sentence_embedding"], feeds[0])
    assert hidden.shape == (1, feeds[0]["input_ids"].shape[1], 384) and emb.shape == (1, 384)
    np.testing.assert_allclose(np.linalg.norm(emb), 1.0, rtol=1e-4)


@pytest.mark.assets
def test_stories260k_with_token_file(assets: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model_path = asset(assets, "llm/stories260K/stories260K.onnx")
    tokens_path = asset(assets, "text/tokens/stories260K__tinystories_valid_shared.json")
    tokens = json.loads(tokens_path.read_text())
    assert isinstance(tokens, list) and tokens[0] == 1  # a flat list of ids, BOS=1 first
    src = open_source(str(tokens_path), onnx.load(model_path), seq_len=512, limit=4)
    assert isinstance(src, TokenFileSource) and len(src) == 4
    windows = len(tokens) // 512
    assert f"4 of {windows} windows of 512 tokens" in src.describe()
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    for i, f in zip(src.indices, src):
        assert list(f) == ["input_ids"] and f["input_ids"].shape == (1, 512) and f["input_ids"].dtype == np.int64
        assert f["input_ids"][0].tolist() == tokens[i * 512:(i + 1) * 512]
        logits = sess.run(None, f)[0]
        assert logits.shape == (1, 512, 512) and np.isfinite(logits).all()


# ------------------------------------------------------------------------------------------ text windows
def test_text_windows_for_causal_lms(tmp_path: Path) -> None:
    """Text + tokenizer + seq_len: the whole text tokenized without special tokens and cut into windows
    (what GPTQ/AWQ calibration of an LLM wants), including texts longer than one tokenization chunk."""
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "c.txt").write_text("\n".join(LINES * 40) + "\n")
    m = text_model(("input_ids",))
    expected = [ID.get(w, 0) for line in LINES * 40 for w in line.replace(".", " .").split()]
    old = TextWindowSource.CHUNK
    TextWindowSource.CHUNK = 50  # many chunks: chunk boundaries must not lose or merge tokens
    try:
        src = open_source(str(tmp_path / "c.txt"), m, tokenizer=str(tok), seq_len=7, limit=5)
    finally:
        TextWindowSource.CHUNK = old
    assert isinstance(src, TextWindowSource)
    assert src.tokens.tolist() == expected  # no [CLS]/[SEP], no padding, blank lines contribute nothing
    assert src.windows == len(expected) // 7 and len(src) == 5
    feeds = list(src)
    for f, i in zip(feeds, src.indices):
        assert set(f) == {"input_ids"} and f["input_ids"].shape == (1, 7)
        assert f["input_ids"][0].tolist() == expected[i * 7:(i + 1) * 7]
    assert "windows of 7 tokens" in src.describe() and "tokenizer.json" in src.describe()
    # without seq_len the same file is one sample per line, as before
    assert isinstance(open_source(str(tmp_path / "c.txt"), m, tokenizer=str(tok)), TextSource)


def test_text_windows_jsonl_and_too_short(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    m = text_model(("input_ids",))
    src = open_source(str(tmp_path / "c.jsonl"), m, tokenizer=str(tok), seq_len=4)
    assert src.tokens.tolist() == [ID.get(w, 0) for t in TEXTS for w in t.replace(".", " .").split()]
    with pytest.raises(CalibrationError, match="fewer than one window"):
        open_source(str(tmp_path / "c.jsonl"), m, tokenizer=str(tok), seq_len=10_000)
