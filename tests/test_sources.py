"""Tests for calibration sources: image folders, .npz/.npy files, test_data_set folders, random inputs."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

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
