"""Calibration sources: readers that stream feed dicts (input name -> array) into the calibration runner.

Why: calibration needs realistic inputs, and people keep them in many forms (image folders, ``.npz``
files, ONNX ``test_data_set`` folders) or have none at all (random, data-free). Every source streams one
sample at a time, so memory never grows with the size of the set, and :meth:`CalibrationSource.validate`
checks the data against the model's inputs before anything runs, raising a one-line
:class:`~onnxq.errors.CalibrationError` that names the array and the input at fault.

``limit=n`` on a source with more samples picks ``n`` samples **evenly spaced** over the sorted list
(deterministic): image folders are usually sorted by class, so the first ``n`` would cover few classes.
"""

from __future__ import annotations

import abc
import contextlib
import csv
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.errors import CalibrationError, MissingDependencyError

__all__ = ["InputSpec", "input_specs", "CalibrationSource", "ImageFolderSource", "ArrayFolderSource",
           "TestDataSetSource", "RandomSource", "TextSource", "TokenFileSource", "TextWindowSource", "PREPROCESS", "IMAGE_SUFFIXES",
           "TEXT_SUFFIXES", "TOKEN_INPUTS", "PADDING", "load_image", "open_source"]

Dim = int | str | None
#: Image file suffixes an image folder is searched for (case-insensitive).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
#: Named image preprocessings accepted by :func:`load_image` and :class:`ImageFolderSource`.
PREPROCESS = ("torch", "caffe_bgr", "tf127", "raw255")
_TDS_INPUT = re.compile(r"input_(\d+)\.(pb|npy)")
#: Text file suffixes :class:`TextSource` reads: plain text (one sample a line), JSONL, TSV/CSV.
TEXT_SUFFIXES = frozenset({".txt", ".jsonl", ".tsv", ".csv"})
#: The model inputs a text or token source fills, and with what.
TOKEN_INPUTS = {"input_ids": "token ids", "attention_mask": "ones", "token_type_ids": "zeros",
                "position_ids": "0, 1, 2, ..."}
#: Padding modes of :class:`TextSource`.
PADDING = ("none", "longest", "max_length")


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and shape (ints for static dims, names or None for dynamic ones)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    @property
    def batched(self) -> bool:
        """True when dim 0 looks like a batch dim (rank >= 2, dim 0 dynamic or 1): samples then get batch 1."""
        return len(self.shape) >= 2 and not (isinstance(self.shape[0], int) and self.shape[0] != 1)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller feeds: graph inputs that are not initializers (old IR versions list those too)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in (v for v in model.graph.input if v.name not in inits):
        if not vi.type.HasField("tensor_type") or vi.type.tensor_type.elem_type == 0:
            raise CalibrationError(f"model input '{vi.name}' is not a typed tensor; onnxq can only feed tensors")
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):  # an element type ONNX does not define (a corrupt file)
            raise CalibrationError(f"model input '{vi.name}' has element type {tt.elem_type}, which is not an "
                                   "ONNX tensor type; the model looks corrupt, re-export it") from None
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def _fmt(shape: Sequence[Dim]) -> str:
    items = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _fits(shape: Sequence[int], dims: Sequence[Dim]) -> bool:
    """Same rank and every static dim equal."""
    return len(shape) == len(dims) and all(not isinstance(d, int) or d == s for s, d in zip(shape, dims))


def _mismatch(what: str, arr_shape: Sequence[int], spec: InputSpec) -> CalibrationError:
    return CalibrationError(f"{what} has shape {_fmt(arr_shape)} but model input '{spec.name}' expects {_fmt(spec.shape)}")


def _even(total: int, limit: int | None) -> list[int]:
    """``limit`` indices evenly spaced over ``range(total)`` (all of them when limit is None or >= total)."""
    if limit is not None and limit < 1:
        raise CalibrationError(f"calibration limit must be a positive number of samples, got {limit}")
    return list(range(total)) if limit is None or limit >= total else [i * total // limit for i in range(limit)]


def _castable(src: np.dtype, dst: np.dtype) -> bool:
    return src == dst or np.can_cast(src, dst, casting="same_kind")


def _natural(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _count(n: int, total: int, unit: str) -> str:
    return f"{n} {unit}" if n == total else f"{n} of {total} {unit}, evenly spaced"


class CalibrationSource(abc.ABC):
    """A re-iterable stream of feed dicts, one per calibration sample (batch dim 1 where the model has one)."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield one feed dict per sample; each iteration starts again from the first sample."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of samples one iteration yields."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the report, e.g. ``image folder X (500 images, preprocess torch, 224x224)``."""

    def _label(self, name: str) -> str:
        """How error messages name the array that feeds input ``name``."""
        return f"calibration input '{name}'"

    def sample_name(self, i: int) -> str:
        """How reports name the ``i``-th sample one iteration yields: its file where it has one."""
        return f"sample {i}"

    def validate(self, specs: list[InputSpec]) -> None:
        """Check names, dtypes, ranks and static dims of the first sample against ``specs`` before any run."""
        with contextlib.closing(iter(self)) as it:  # type: ignore[type-var]
            first = next(it, None)
        if first is None:
            raise CalibrationError(f"{self.describe()} yields no calibration samples")
        names = [s.name for s in specs]
        if sorted(first) != sorted(names):
            raise CalibrationError(f"{self.describe()} has arrays {sorted(first)} but the model's inputs are {names}")
        for s in specs:
            arr = first[s.name]
            if arr.dtype != s.dtype:
                raise CalibrationError(f"{self._label(s.name)} has dtype {arr.dtype} but model input '{s.name}' expects {s.dtype}")
            if not _fits(arr.shape, s.shape):
                raise _mismatch(self._label(s.name), arr.shape, s)


# ----------------------------------------------------------------------------------------------- images
def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as e:
        raise MissingDependencyError('reading images needs Pillow: pip install "onnxq[images]"') from e
    return Image


def _check_preprocess(name: str) -> None:
    if name not in PREPROCESS:
        raise CalibrationError(f"unknown image preprocessing '{name}'; valid names: {', '.join(PREPROCESS)}")


def load_image(path: str | Path, *, preprocess: str = "torch", resize: int = 256, crop: int | tuple[int, int] = 224,
               layout: str = "NCHW", dtype: Any = np.float32, channels: int = 3) -> np.ndarray:
    """Read one image with a named preprocessing; returns (1,C,H,W) or (1,H,W,C) of ``dtype``.

    Resize the shorter side to ``resize`` (bilinear; long side truncated as torchvision does), center-crop
    ``crop`` (int or (h, w)), then: ``torch`` RGB/255 minus mean [0.485,0.456,0.406] over std
    [0.229,0.224,0.225]; ``caffe_bgr`` BGR 0..255 minus [104,117,123]; ``tf127`` (RGB-127)/128; ``raw255``
    RGB 0..255. ``channels=1`` converts to L and averages the per-channel constants. Benchmarks call this
    to evaluate models with exactly the calibration preprocessing.
    """
    Image = _pil()
    _check_preprocess(preprocess)
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    try:
        with Image.open(path) as im:
            img = im.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise CalibrationError(f"cannot read image {path}: {e}") from e
    w, h = img.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    if size != img.size:
        img = img.resize(size, Image.BILINEAR)
    top, left = int(round((size[1] - ch) / 2.0)), int(round((size[0] - cw) / 2.0))
    x = np.asarray(img.crop((left, top, left + cw, top + ch)), dtype=np.float32)
    x = x[..., None] if x.ndim == 2 else x
    if preprocess == "torch":
        mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
        if channels == 1:
            mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
        x = (x / 255.0 - mean) / std
    elif preprocess == "caffe_bgr":
        mean = np.array([104.0, 117.0, 123.0], np.float32)
        x = x[..., ::-1] - mean if channels == 3 else x - mean.mean()
    elif preprocess == "tf127":
        x = (x - 127.0) / 128.0
    x = x.transpose(2, 0, 1) if layout.upper() == "NCHW" else x
    return np.ascontiguousarray(x[None]).astype(dtype)


def _image_layout(spec: InputSpec) -> tuple[str, int]:
    """(layout, channels) of a rank-4 image input: a channel dim of 3 (else 1) at position 1 or 3."""
    if len(spec.shape) != 4:
        raise CalibrationError(f"image input '{spec.name}' must have rank 4 (NCHW or NHWC), not {_fmt(spec.shape)}")
    for c in (3, 1):
        if spec.shape[1] == c or spec.shape[3] == c:
            return ("NCHW" if spec.shape[1] == c else "NHWC"), c
    return "NCHW", 3


class ImageFolderSource(CalibrationSource):
    """Images (jpg/jpeg/png/bmp/webp) under a folder, recursively, in sorted order, with a named preprocessing.

    Layout (NCHW/NHWC), channels (3, or 1 -> grayscale) and dtype (float16 included) come from the input
    spec. ``crop=None`` means the input's static spatial size (else 224); ``resize=None`` means
    ``round(crop * 256 / 224)``. ``limit`` picks images evenly spaced over the sorted list.
    """

    def __init__(self, folder: str | Path, spec: InputSpec, *, preprocess: str = "torch", resize: int | None = None,
                 crop: int | tuple[int, int] | None = None, limit: int | None = None) -> None:
        _pil()
        _check_preprocess(preprocess)
        self.folder, self.spec, self.preprocess = Path(folder), spec, preprocess
        self.layout, self.channels = _image_layout(spec)
        hw = spec.shape[2:4] if self.layout == "NCHW" else spec.shape[1:3]
        if crop is None:
            crop = (hw[0], hw[1]) if all(isinstance(d, int) and d > 0 for d in hw) else 224  # type: ignore[assignment]
        self.crop: tuple[int, int] = (crop, crop) if isinstance(crop, int) else tuple(crop)  # type: ignore[assignment]
        self.resize = resize if resize is not None else int(round(min(self.crop) * 256 / 224))
        self.files = sorted((p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                            key=lambda p: p.relative_to(self.folder).as_posix())
        if not self.files:
            raise CalibrationError(f"image folder {self.folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.indices = _even(len(self.files), limit)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in self.indices:
            yield {self.spec.name: load_image(self.files[i], preprocess=self.preprocess, resize=self.resize, crop=self.crop,
                                              layout=self.layout, dtype=self.spec.dtype, channels=self.channels)}

    def __len__(self) -> int:
        return len(self.indices)

    def _label(self, name: str) -> str:
        return f"preprocessed image {self.files[self.indices[0]].name}"

    def sample_name(self, i: int) -> str:
        return self.files[self.indices[i]].relative_to(self.folder).as_posix()

    def describe(self) -> str:
        gray = ", grayscale" if self.channels == 1 else ""
        return (f"image folder {self.folder} ({_count(len(self), len(self.files), 'images')}, preprocess "
                f"{self.preprocess}, resize {self.resize}, {self.crop[0]}x{self.crop[1]}, {self.layout} {self.spec.dtype}{gray})")


# ----------------------------------------------------------------------------------------------- arrays
@dataclass
class _Array:
    """One array in a .npy file or an .npz member, known by its header; rows are read from the file on demand."""

    path: Path
    key: str | None  # npz member name without .npy; None for a .npy file
    shape: tuple[int, ...] = ()
    dtype: np.dtype = np.dtype(np.float32)
    fortran: bool = False
    offset: int = 0  # where the data starts in the (member) stream

    @property
    def label(self) -> str:
        return f"calibration array '{self.key}' in {self.path.name}" if self.key else f"calibration file {self.path.name}"

    @contextlib.contextmanager
    def stream(self) -> Iterator[Any]:
        """The raw byte stream of the file or npz member (closed, with its zip, on exit)."""
        if self.key is None:
            with open(self.path, "rb") as f:
                yield f
        else:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.key + ".npy") as f:
                yield f

    def load(self) -> np.ndarray:
        """The whole array (one-sample arrays and Fortran-ordered ones)."""
        if self.key is None:
            return np.load(self.path, allow_pickle=False)
        with np.load(self.path, allow_pickle=False) as npz:
            return npz[self.key]

    def rows(self, indices: list[int]) -> Iterator[np.ndarray]:
        """Rows ``a[i]`` for ascending ``indices``, streamed (a full load only for Fortran-ordered arrays)."""
        if self.fortran:
            yield from self.load()[indices]
            return
        rowbytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with self.stream() as f:
            for i in indices:
                f.seek(self.offset + i * rowbytes)
                buf = f.read(rowbytes)
                if len(buf) != rowbytes:
                    raise CalibrationError(f"{self.label} is truncated: sample {i} of {self.shape[0]} is incomplete")
                yield np.frombuffer(buf, self.dtype).reshape(self.shape[1:])

    @classmethod
    def read_header(cls, path: Path, key: str | None) -> _Array:
        """Shape/dtype from the .npy header without reading the data; pickled data is refused, never loaded."""
        a = cls(path, key)
        try:
            with a.stream() as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                a.shape, a.fortran, a.dtype = read(f)
                a.offset = f.tell()
        except (ValueError, OSError, zipfile.BadZipFile, KeyError) as e:
            raise CalibrationError(f"{a.label} is not a readable numpy array ({e}); save it with numpy.save/savez") from e
        if a.dtype.hasobject:
            raise CalibrationError(f"{a.label} holds a pickled object array; onnxq never unpickles calibration data "
                                   "(allow_pickle=False): save plain numeric arrays")
        return a


def _mode(shape: tuple[int, ...], spec: InputSpec) -> str | None:
    """How an array feeds ``spec``: split rows / add batch axis / add batch+channel axes / whole; None: no fit."""
    dims, r = spec.shape, len(spec.shape)
    if len(shape) == r:
        return "split" if spec.batched and _fits(shape[1:], dims[1:]) else "whole" if _fits(shape, dims) else None
    if len(shape) == r - 1 and spec.batched:
        if _fits(shape, dims[1:]):
            return "batch"
        if r >= 3 and not (isinstance(dims[1], int) and dims[1] != 1) and _fits(shape[1:], dims[2:]):
            return "channel"
    return None


class ArrayFolderSource(CalibrationSource):
    """``.npz`` files (keyed by input name) and/or ``.npy`` files (single-input models), or one such file.

    An array whose leading dim is the model's batch dim holds several samples, streamed from the file and
    yielded one at a time; every file's headers are checked up front. For a single-input model, a file
    whose keys do not match is still used when it holds one array, or exactly one array that fits (MNIST
    ``images`` Nx28x28 -> Nx1x28x28, cast to float32); :meth:`describe` says so. Files are read with
    ``allow_pickle=False`` semantics: object arrays are refused, never unpickled.
    """

    def __init__(self, path: str | Path, specs: list[InputSpec], *, limit: int | None = None) -> None:
        self.path, self.specs = Path(path), list(specs)
        self.files = sorted((p for p in self.path.iterdir() if p.suffix.lower() in (".npz", ".npy")),
                            key=_natural) if self.path.is_dir() else [self.path]
        if not self.files:
            raise CalibrationError(f"calibration folder {self.path} holds no .npz/.npy files")
        self.notes: dict[str, None] = {}  # ordered set of what describe() reports (reshapes, casts)
        self.plan = [self._plan_file(f, self.specs) for f in self.files]
        self.indices = _even(sum(n for n, _ in self.plan), limit)

    def _plan_file(self, f: Path, specs: list[InputSpec]) -> tuple[int, dict[str, tuple[_Array, str]]]:
        """(sample count, input name -> (array, mode)) for one file; raises on names, shapes, dtypes."""
        names = [s.name for s in specs]
        if f.suffix.lower() == ".npy":
            if len(specs) != 1:
                raise CalibrationError(f"calibration file {f.name} is .npy, which only feeds single-input models; the "
                                       f"model's inputs are {names}: use .npz files keyed by input name")
            arrays = {names[0]: _Array.read_header(f, None)}
        else:
            try:
                with zipfile.ZipFile(f) as zf:
                    keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            except (zipfile.BadZipFile, OSError) as e:
                raise CalibrationError(f"calibration file {f.name} is not a readable .npz file ({e})") from e
            if all(n in keys for n in names):
                arrays = {n: _Array.read_header(f, n) for n in names}
            else:
                # a differently named array is used only when that is unambiguous: one array, one input
                if len(specs) != 1 or len(keys) != 1:
                    raise CalibrationError(
                        f"calibration file {f.name} has arrays {keys} but the model's inputs are {names}; "
                        f"save the arrays under the input names, e.g. np.savez(path, {names[0]}=...)"
                    )
                arrays = {names[0]: _Array.read_header(f, keys[0])}
                self.notes[f"array '{arrays[names[0]].key}' used for input '{names[0]}'"] = None
        plan, counts = {}, set()
        for s in specs:
            a = arrays[s.name]
            mode = _mode(a.shape, s)
            if mode is None:
                raise _mismatch(a.label, a.shape, s)
            if not _castable(a.dtype, s.dtype):
                raise CalibrationError(f"{a.label} has dtype {a.dtype} but model input '{s.name}' expects {s.dtype}")
            if mode == "channel":
                rest = "x".join(map(str, a.shape[1:]))
                self.notes[f"reshaped Nx{rest} -> Nx1x{rest}"] = None
            if a.dtype != s.dtype:
                self.notes[f"cast {a.dtype} -> {s.dtype}"] = None
            plan[s.name] = (a, mode)
            counts.add(a.shape[0] if mode in ("split", "channel") else 1)
        if len(counts) > 1:
            raise CalibrationError(f"calibration file {f.name} holds arrays with different sample counts {sorted(counts)}")
        return counts.pop(), plan

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        start = 0
        for n, plan in self.plan:
            local = [i - start for i in self.indices if start <= i < start + n]
            start += n
            if not local:
                continue
            with contextlib.ExitStack() as stack:
                streams = {}
                for name, (a, mode) in plan.items():
                    streams[name] = a.rows(local) if mode in ("split", "channel") else iter([a.load()])
                    stack.callback(getattr(streams[name], "close", lambda: None))
                for _ in local:
                    feed = {}
                    for s in self.specs:
                        x, mode = next(streams[s.name]), plan[s.name][1]
                        x = x[None] if mode in ("split", "batch") else x[None, None] if mode == "channel" else x
                        feed[s.name] = np.ascontiguousarray(x, dtype=s.dtype)
                    yield feed

    def __len__(self) -> int:
        return len(self.indices)

    def _label(self, name: str) -> str:
        return self.plan[0][1][name][0].label if name in self.plan[0][1] else super()._label(name)

    def sample_name(self, i: int) -> str:
        """``file.npz[row]`` (the file name alone when it holds one sample)."""
        g = self.indices[i]
        for f, (n, _) in zip(self.files, self.plan):
            if g < n:
                return f.name if n == 1 else f"{f.name}[{g}]"
            g -= n
        return super().sample_name(i)

    def describe(self) -> str:
        total = sum(n for n, _ in self.plan)
        kind = f"array folder {self.path} ({len(self.files)} files, " if self.path.is_dir() else f"array file {self.path} ("
        return kind + "; ".join([_count(len(self), total, "samples"), *self.notes]) + ")"


# ----------------------------------------------------------------------------------------- test_data_set
def _tds_inputs(d: Path) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), p) for p in d.iterdir() if p.is_file() and (m := _TDS_INPUT.fullmatch(p.name)))


def _tds_dirs(root: Path) -> list[Path]:
    """Sample folders: ``root`` when it holds input_*.pb/.npy, else its ``test_data_set`` or subfolders that do."""
    if not root.is_dir():
        return []
    if _tds_inputs(root):
        return [root]
    if (root / "test_data_set").is_dir():
        return _tds_dirs(root / "test_data_set")
    return sorted((d for d in root.iterdir() if d.is_dir() and _tds_inputs(d)), key=_natural)


class TestDataSetSource(CalibrationSource):
    """ONNX ``test_data_set_*/input_<i>.pb`` TensorProto folders, or ``test_data_set/<n>/input_<i>.npy``.

    ``input_<i>`` feeds the i-th model input, unless the TensorProto's name is a model input name.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, folder: str | Path, specs: list[InputSpec], *, limit: int | None = None) -> None:
        self.folder, self.specs = Path(folder), list(specs)
        self.dirs = _tds_dirs(self.folder)
        if not self.dirs:
            raise CalibrationError(f"calibration folder {self.folder} holds no test_data_set inputs (input_<i>.pb/.npy)")
        self.indices = _even(len(self.dirs), limit)

    def _sample(self, d: Path) -> dict[str, np.ndarray]:
        by_name = {s.name: s for s in self.specs}
        feed: dict[str, np.ndarray] = {}
        for i, p in _tds_inputs(d):
            try:
                if p.suffix == ".pb":
                    tp = onnx.TensorProto()
                    tp.ParseFromString(p.read_bytes())
                    name, x = tp.name, numpy_helper.to_array(tp)
                else:
                    name, x = "", np.load(p, allow_pickle=False)
            except Exception as e:  # protobuf DecodeError, ValueError (pickled data), OSError
                raise CalibrationError(f"cannot read calibration tensor {p}: {e}") from e
            if name not in by_name:
                if i >= len(self.specs):
                    raise CalibrationError(f"calibration tensor {p} has index {i} but the model has {len(self.specs)} inputs")
                name = self.specs[i].name
            if name in feed:
                raise CalibrationError(f"calibration tensor {p} feeds input '{name}', which another file in {d} feeds too")
            dtype = by_name[name].dtype
            feed[name] = x.astype(dtype, copy=False) if _castable(x.dtype, dtype) else x
        return feed

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in self.indices:
            yield self._sample(self.dirs[i])

    def __len__(self) -> int:
        return len(self.indices)

    def _label(self, name: str) -> str:
        return f"calibration tensor for '{name}' in {self.dirs[self.indices[0]]}"

    def sample_name(self, i: int) -> str:
        d = self.dirs[self.indices[i]]
        return d.relative_to(self.folder).as_posix() if d != self.folder else d.name

    def describe(self) -> str:
        return f"test_data_set {self.folder} ({_count(len(self), len(self.dirs), 'samples')})"


# ------------------------------------------------------------------------------------------------ random
class RandomSource(CalibrationSource):
    """Data-free calibration: floats ~ N(0, 1), ints in [0, 100), random bools; deterministic by ``seed``.

    Symbolic dims take their size from ``dim_values`` (keyed by dim name), else 1.
    """

    def __init__(self, specs: list[InputSpec], *, count: int = 8, seed: int = 0,
                 dim_values: dict[str, int] | None = None) -> None:
        if count < 1:
            raise CalibrationError(f"random calibration needs a positive sample count, got {count}")
        self.specs, self.count, self.seed, self.dim_values = list(specs), count, seed, dict(dim_values or {})
        for s in self.specs:
            if not (s.dtype.kind in "fiub" or "float" in s.dtype.name):
                what = "strings" if s.dtype.kind in "OSU" else f"dtype {s.dtype}"
                raise CalibrationError(f"model input '{s.name}' holds {what}, and random calibration makes only numbers "
                                       "and bools: give --calib files (.npz/.npy) with real values for it")
        self.shapes = {s.name: tuple(d if isinstance(d, int) else self.dim_values.get(d or "", 1) for d in s.shape)
                       for s in self.specs}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.count):
            feed = {}
            for s in self.specs:
                shape = self.shapes[s.name]
                if s.dtype.kind == "b":
                    feed[s.name] = rng.random(shape) < 0.5
                elif s.dtype.kind in "iu":
                    feed[s.name] = rng.integers(0, 100, shape).astype(s.dtype)
                else:
                    feed[s.name] = rng.standard_normal(shape, dtype=np.float32).astype(s.dtype)
            yield feed

    def __len__(self) -> int:
        return self.count

    def describe(self) -> str:
        shapes = ", ".join(f"{k} {_fmt(v)}" for k, v in self.shapes.items())
        return f"random inputs ({self.count} samples, seed {self.seed}, floats N(0,1), ints [0,100); {shapes})"


# -------------------------------------------------------------------------------------- token inputs
def _token_roles(specs: list[InputSpec], what: str) -> dict[str, str]:
    """Input name -> which :data:`TOKEN_INPUTS` entry feeds it; raises for inputs a token source cannot fill.

    A model with a single integer input under another name (``tokens``, ``ids``) gets the token ids there.
    """
    for s in specs:
        if s.dtype not in (np.dtype(np.int64), np.dtype(np.int32)):
            raise CalibrationError(f"model input '{s.name}' has dtype {s.dtype}; a {what} feeds int64/int32 token "
                                   f"inputs only ({', '.join(TOKEN_INPUTS)})")
    if len(specs) == 1 and specs[0].name not in TOKEN_INPUTS:
        return {specs[0].name: "input_ids"}
    unknown = [s.name for s in specs if s.name not in TOKEN_INPUTS]
    if unknown:
        names = ", ".join(f"'{n}'" for n in unknown)
        raise CalibrationError(f"model input{'s' if len(unknown) > 1 else ''} {names} cannot be filled by a {what}: "
                               f"it fills {', '.join(f'{k} ({v})' for k, v in TOKEN_INPUTS.items())}; give .npz "
                               "files keyed by input name instead")
    if "input_ids" not in (s.name for s in specs):
        raise CalibrationError(f"the model has no 'input_ids' input (its inputs are {[s.name for s in specs]}); "
                               f"a {what} needs one to feed the token ids")
    return {s.name: s.name for s in specs}


def _static_seq(specs: list[InputSpec]) -> int | None:
    """The static sequence length (dim 1 of a rank-2 token input), if any input has one."""
    for s in specs:
        if len(s.shape) == 2 and isinstance(s.shape[1], int) and s.shape[1] > 0:
            return s.shape[1]
    return None


def _token_feed(specs: list[InputSpec], roles: dict[str, str], ids: Any, mask: Any = None,
                type_ids: Any = None) -> dict[str, np.ndarray]:
    """One feed (batch 1) from a token-id sequence; mask/type ids default to ones/zeros."""
    n = len(ids)
    feed = {}
    for s in specs:
        role = roles[s.name]
        if role == "input_ids":
            x = np.asarray(ids)
        elif role == "attention_mask":
            x = np.ones(n, np.int64) if mask is None else np.asarray(mask)
        elif role == "token_type_ids":
            x = np.zeros(n, np.int64) if type_ids is None else np.asarray(type_ids)
        else:
            x = np.arange(n)
        feed[s.name] = np.ascontiguousarray(x.astype(s.dtype, copy=False)[None])
    return feed


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise MissingDependencyError('text calibration needs the tokenizers package: pip install "onnxq[text]"') from e
    return tokenizers


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- text
class TextSource(CalibrationSource):
    """Text samples tokenized with a Hugging Face ``tokenizers`` file (``tokenizer.json``), one sample per feed.

    Formats, by suffix:

    - ``.txt``: one sample per non-blank line (long running text such as wikitext or TinyStories is simply
      taken line by line; blank lines are skipped).
    - ``.jsonl``: one JSON value per non-blank line: an object whose field ``"text"`` is used, or, when the
      first object has no string ``"text"``, its first string field (:meth:`describe` says which); a line
      holding a bare JSON string is used as is.
    - ``.tsv`` / ``.csv``: tab-separated when the first line holds a tab (the STS benchmark files are
      tab-separated despite their ``.csv`` name), else comma-separated CSV. The column is fixed by the first
      data row: its **last non-numeric cell** (for STS: column 7, the second sentence; the extra source
      columns some later rows carry are ignored). The first row is a header, and skipped, when none of its
      cells is a number while the second row has one. Rows with no text in that column are skipped.

    Tokenization adds the tokenizer's special tokens and truncates to ``max_length`` tokens. One sample per
    feed, so no padding is needed: ``padding="none"`` (the default) turns off any padding the tokenizer
    file configures, ``"longest"`` is the same for batches of one, and ``"max_length"`` pads every sample to
    ``max_length`` (the tokenizer's pad token, else ``[PAD]``/``<pad>``, else id 0; mask 0 there). A model
    with a static sequence length gets every sample padded and truncated to it.

    The model's inputs are filled by name (:data:`TOKEN_INPUTS`): ``input_ids``, ``attention_mask``,
    ``token_type_ids`` and ``position_ids``, each [1, seq] in the input's own int dtype. The file is read
    line by line: once up front to count the samples (``limit`` picks them evenly spaced), then once per
    iteration.
    """

    def __init__(self, path: str | Path, specs: list[InputSpec], *, tokenizer: str | Path, max_length: int = 128,
                 limit: int | None = None, padding: str = "none") -> None:
        tk = _tokenizers()
        self.path, self.specs = Path(path), list(specs)
        if padding not in PADDING:
            raise CalibrationError(f"unknown padding '{padding}'; valid modes: {', '.join(PADDING)}")
        if max_length < 1:
            raise CalibrationError(f"max_length must be a positive number of tokens, got {max_length}")
        self.roles = _token_roles(self.specs, "text source")
        self.notes: dict[str, None] = {}
        static = _static_seq(self.specs)
        if static is not None:
            max_length, padding = static, "max_length"
            self.notes[f"padded and truncated to the model's static sequence length {static}"] = None
        self.max_length, self.padding = max_length, padding
        tok_path = Path(tokenizer).expanduser()
        if tok_path.is_dir():
            tok_path = tok_path / "tokenizer.json"
        if not tok_path.is_file():
            raise CalibrationError(f"tokenizer file not found: {tok_path} (give a Hugging Face tokenizer.json)")
        try:
            self.tokenizer = tk.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust side raises a plain Exception
            raise CalibrationError(f"cannot load tokenizer {tok_path}: {e} (expected a Hugging Face tokenizers "
                                   "tokenizer.json)") from e
        self.tokenizer_path = tok_path
        self._configure_tokenizer()
        suffix = self.path.suffix.lower()
        self.kind = "jsonl" if suffix == ".jsonl" else "table" if suffix in (".tsv", ".csv") else "lines"
        self.field: str | None = None  # jsonl: the field used
        self.column: int | None = None  # table: the 0-based column used
        self.column_name: str | None = None  # table: its header, if the file has one
        self.delimiter, self.header = "\t", False
        try:
            if self.kind == "jsonl":
                self._plan_jsonl()
            elif self.kind == "table":
                self._plan_table()
            self.total = sum(1 for _ in self._texts())
        except UnicodeDecodeError as e:
            raise CalibrationError(f"text calibration file {self.path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
        except OSError as e:
            raise CalibrationError(f"cannot read text calibration file {self.path}: {e}") from e
        if self.total == 0:
            raise CalibrationError(f"text calibration file {self.path} holds no text samples")
        self.indices = _even(self.total, limit)

    def _configure_tokenizer(self) -> None:
        tok = self.tokenizer
        tok.enable_truncation(self.max_length)
        if self.padding != "max_length":
            tok.no_padding()
            return
        pad = tok.padding
        if pad is not None:
            pad_id, pad_token = pad["pad_id"], pad["pad_token"]
        else:
            found = [(t, tok.token_to_id(t)) for t in ("[PAD]", "<pad>", "<|pad|>") if tok.token_to_id(t) is not None]
            pad_token, pad_id = found[0] if found else (tok.id_to_token(0) or "[PAD]", 0)
        tok.enable_padding(length=self.max_length, pad_id=pad_id, pad_token=pad_token)

    def _lines(self) -> Iterator[tuple[int, str]]:
        """(1-based line number, line without its newline) for every non-blank line."""
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line.rstrip("\r\n")

    def _plan_jsonl(self) -> None:
        with contextlib.closing(self._lines()) as lines:
            first = next(lines, None)
        if first is None:
            return
        obj = self._json(*first)
        if isinstance(obj, dict):
            if isinstance(obj.get("text"), str):
                self.field = "text"
            else:
                self.field = next((k for k, v in obj.items() if isinstance(v, str)), None)
                if self.field is None:
                    raise CalibrationError(f"line {first[0]} of {self.path} is a JSON object with no string field; "
                                           "JSONL calibration text needs a \"text\" field")

    def _json(self, n: int, line: str) -> Any:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"line {n} of {self.path} is not JSON ({e.msg}); a .jsonl file holds one JSON "
                                   "object per line") from e
        if not isinstance(obj, (dict, str)):
            raise CalibrationError(f"line {n} of {self.path} holds a JSON {type(obj).__name__}, not an object or string")
        return obj

    def _rows(self) -> Iterator[tuple[int, list[str]]]:
        """(1-based row number, cells) for every non-blank row of a TSV/CSV file."""
        if self.delimiter == "\t":
            for n, line in self._lines():
                yield n, line.split("\t")
            return
        with open(self.path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                if any(c.strip() for c in row):
                    yield reader.line_num, row

    def _plan_table(self) -> None:
        with contextlib.closing(self._lines()) as lines:
            first = next(lines, None)
        if first is None:
            return
        self.delimiter = "\t" if "\t" in first[1] or self.path.suffix.lower() == ".tsv" else ","
        with contextlib.closing(self._rows()) as rows:
            head = [cells for _, (_, cells) in zip(range(2), rows)]
        row0 = head[0]
        self.header = (len(head) == 2 and not any(_is_number(c) for c in row0 if c.strip())
                       and any(_is_number(c) for c in head[1] if c.strip()))
        data = head[1] if self.header else row0
        text_cols = [i for i, c in enumerate(data) if c.strip() and not _is_number(c)]
        if not text_cols:
            raise CalibrationError(f"the first data row of {self.path} has no text column (all its cells are numbers)")
        self.column = text_cols[-1]
        if self.header and self.column < len(row0):
            self.column_name = row0[self.column].strip()

    def _texts(self) -> Iterator[tuple[int, str]]:
        """(line number, text) for every sample, in file order."""
        if self.kind == "lines":
            for n, line in self._lines():
                yield n, line.strip()
        elif self.kind == "jsonl":
            for n, line in self._lines():
                obj = self._json(n, line)
                if isinstance(obj, dict):
                    text = obj.get(self.field) if self.field is not None else None
                    if not isinstance(text, str):
                        raise CalibrationError(f"line {n} of {self.path} has no string field '{self.field or 'text'}'")
                else:
                    text = obj
                if text.strip():
                    yield n, text.strip()
        else:
            rows = self._rows()
            if self.header:
                next(rows, None)
            assert self.column is not None
            for n, row in rows:
                text = row[self.column].strip() if self.column < len(row) else ""
                if text:
                    yield n, text

    def encode(self, text: str) -> dict[str, np.ndarray]:
        """The feed for one text (tokenized, truncated/padded as configured)."""
        enc = self.tokenizer.encode(text)
        return _token_feed(self.specs, self.roles, enc.ids, enc.attention_mask, enc.type_ids)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if not self.indices:
            return
        wanted, last = set(self.indices), self.indices[-1]
        with contextlib.closing(self._texts()) as texts:
            for i, (n, text) in enumerate(texts):
                if i in wanted:
                    feed = self.encode(text)
                    if feed[next(iter(feed))].shape[1] == 0:
                        raise CalibrationError(f"line {n} of {self.path} tokenizes to no tokens with {self.tokenizer_path}")
                    yield feed
                if i >= last:
                    break

    def __len__(self) -> int:
        return len(self.indices)

    def _label(self, name: str) -> str:
        return f"tokenized text for '{name}' from {self.path.name}"

    def describe(self) -> str:
        if self.kind == "jsonl":
            fmt = f"JSONL, field '{self.field}'" if self.field else "JSONL strings"
        elif self.kind == "table":
            sep = "tab" if self.delimiter == "\t" else "comma"
            name = f" '{self.column_name}'" if self.column_name else ""
            fmt = f"{sep}-separated, column {(self.column or 0) + 1}{name}" + (", header skipped" if self.header else "")
        else:
            fmt = "one sample per line"
        return (f"text file {self.path} ({_count(len(self), self.total, 'samples')}; {fmt}; tokenizer "
                f"{self.tokenizer_path}, max_length {self.max_length}, padding {self.padding}; "
                + "; ".join([f"inputs {', '.join(self.roles)}", *self.notes]) + ")")


# ----------------------------------------------------------------------------------------------- tokens
_TOKEN_KEYS = ("input_ids", "tokens", "token_ids", "ids")


class TokenFileSource(CalibrationSource):
    """A JSON list of token ids (already tokenized text) cut into non-overlapping windows of ``seq_len`` tokens.

    The file holds a flat list of ints (the shared ``text/tokens/*.json``), a list of such lists (joined in
    order) or an object with one of the keys ``input_ids``, ``tokens``, ``token_ids``, ``ids`` (or a single
    list-valued key) holding one. Each window is one sample, fed as ``input_ids`` [1, seq_len]; the tokens
    after the last whole window are not used. ``attention_mask`` (ones), ``token_type_ids`` (zeros) and
    ``position_ids`` are filled when the model has them. The list is loaded whole (token lists are small);
    windows are cut lazily; ``limit`` picks windows evenly spaced. Needs no tokenizer.
    """

    def __init__(self, path: str | Path, specs: list[InputSpec], *, seq_len: int = 512, limit: int | None = None) -> None:
        self.path, self.specs = Path(path), list(specs)
        if seq_len < 1:
            raise CalibrationError(f"seq_len must be a positive number of tokens, got {seq_len}")
        self.seq_len = seq_len
        self.roles = _token_roles(self.specs, "token file")
        self.tokens = self._load()
        self.windows = len(self.tokens) // seq_len
        if self.windows == 0:
            raise CalibrationError(f"token file {self.path} holds {len(self.tokens)} tokens, fewer than one window of "
                                   f"seq_len {seq_len}; use a smaller --seq-len")
        self.indices = _even(self.windows, limit)

    def _load(self) -> np.ndarray:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CalibrationError(f"token file {self.path} is not JSON ({e}); it should hold a list of token ids") from e
        except OSError as e:
            raise CalibrationError(f"cannot read token file {self.path}: {e}") from e
        if isinstance(data, dict):
            key = next((k for k in _TOKEN_KEYS if isinstance(data.get(k), list)), None)
            lists = [k for k, v in data.items() if isinstance(v, list)]
            key = key if key is not None else lists[0] if len(lists) == 1 else None
            if key is None:
                raise CalibrationError(f"token file {self.path} is a JSON object with keys {sorted(data)[:8]}; it needs "
                                       f"a list of token ids under one of {', '.join(_TOKEN_KEYS)}")
            data = data[key]
        if isinstance(data, list) and data and all(isinstance(x, list) for x in data):
            data = [t for x in data for t in x]
        bad = not isinstance(data, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in data)
        if bad:
            raise CalibrationError(f"token file {self.path} does not hold a list of integer token ids")
        tokens = np.asarray(data, dtype=np.int64)
        if tokens.size and tokens.min() < 0:
            raise CalibrationError(f"token file {self.path} holds a negative token id ({int(tokens.min())})")
        return tokens

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        L = self.seq_len
        for i in self.indices:
            yield _token_feed(self.specs, self.roles, self.tokens[i * L:(i + 1) * L])

    def __len__(self) -> int:
        return len(self.indices)

    def _label(self, name: str) -> str:
        return f"token window for '{name}' (seq_len {self.seq_len}) from {self.path.name}"

    def describe(self) -> str:
        left = len(self.tokens) - self.windows * self.seq_len
        rest = f", {left} left over" if left else ""
        return (f"token file {self.path} ({_count(len(self), self.windows, f'windows of {self.seq_len} tokens')}; "
                f"{len(self.tokens)} tokens{rest}; inputs {', '.join(self.roles)})")


class TextWindowSource(TokenFileSource):
    """Running text tokenized as a whole and cut into windows of ``seq_len`` tokens: calibration for causal
    language models (GPTQ, AWQ), which want long contiguous windows rather than one short sample per line.

    Used when a text file comes with ``--tokenizer`` *and* ``--seq-len``. A ``.txt`` file is read as is
    (newlines kept, blank lines included) in chunks of whole lines; ``.jsonl`` / ``.tsv`` / ``.csv`` texts
    (chosen as :class:`TextSource` chooses them) are joined with blank lines. No special tokens are added.
    The ids are then windowed exactly like a token file (``limit`` picks windows evenly spaced).
    """

    CHUNK = 1 << 16  # characters tokenized at a time (whole lines)

    def __init__(self, path: str | Path, specs: list[InputSpec], *, tokenizer: str | Path, seq_len: int = 512,
                 limit: int | None = None) -> None:
        self.text = TextSource(path, specs, tokenizer=tokenizer, max_length=1 << 30)
        self.text.tokenizer.no_truncation()
        self.text.tokenizer.no_padding()
        super().__init__(path, specs, seq_len=seq_len, limit=limit)

    def _load(self) -> np.ndarray:
        tok = self.text.tokenizer
        ids: list[int] = []

        def flush(parts: list[str]) -> None:
            if parts:
                ids.extend(tok.encode("".join(parts), add_special_tokens=False).ids)
                parts.clear()

        parts: list[str] = []
        size = 0
        try:
            if self.text.kind == "lines":
                with open(self.path, encoding="utf-8") as f:
                    for line in f:
                        parts.append(line)
                        size += len(line)
                        if size >= self.CHUNK:
                            flush(parts)
                            size = 0
            else:
                for _, text in self.text._texts():
                    parts.append(text + "\n\n")
                    size += len(text)
                    if size >= self.CHUNK:
                        flush(parts)
                        size = 0
            flush(parts)
        except UnicodeDecodeError as e:
            raise CalibrationError(f"text calibration file {self.path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
        return np.asarray(ids, dtype=np.int64)

    def _label(self, name: str) -> str:
        return f"text window for '{name}' (seq_len {self.seq_len}) from {self.path.name}"

    def describe(self) -> str:
        return (f"text file {self.path} tokenized with {self.text.tokenizer_path} into "
                f"{_count(len(self), self.windows, f'windows of {self.seq_len} tokens')} ({len(self.tokens)} tokens; "
                f"inputs {', '.join(self.roles)})")


# ---------------------------------------------------------------------------------------------- chooser
def _refuse_random_dynamic(specs: list[InputSpec]) -> None:
    """``random`` calibration of a float input with a dynamic dim after the batch dim (an image's height and
    width) would run at size 1 (a 1x1 image): refuse it, naming the input and the fix."""
    for s in specs:
        if s.dtype.kind != "f":
            continue
        dyn = [(i, d) for i, d in enumerate(s.shape) if i > 0 and not (isinstance(d, int) and d > 0)]
        if dyn:
            i, d = dyn[0]
            what = f"dim {i} ('{d}')" if d else f"dim {i}"
            raise CalibrationError(f"random calibration cannot size {what} of model input '{s.name}' {_fmt(s.shape)}: "
                                   "it would run at 1 (a 1x1 image); calibrate with real data (--calib images/ or "
                                   "an .npz file), or export the model with fixed input dims")


def open_source(spec: str, model: onnx.ModelProto, *, preprocess: str | None = None, resize: int | None = None,
                crop: int | None = None, limit: int | None = None, seed: int = 0, tokenizer: str | Path | None = None,
                max_length: int | None = None, seq_len: int | None = None) -> CalibrationSource:
    """The validated source for ``spec``: ``random[:N]``, a folder of images, ``.npz/.npy`` files (or one such
    file), ``test_data_set`` inputs, a ``.txt/.jsonl/.tsv/.csv`` text file (needs ``tokenizer``, a
    ``tokenizer.json``; ``max_length`` default 128; with ``seq_len``, the text is tokenized whole and cut
    into windows of ``seq_len`` tokens, for causal LMs) or a ``.json`` list of token ids (windows of ``seq_len``
    tokens: the model's static sequence length, else 512). Raises a one-line CalibrationError when nothing
    there fits the model."""
    specs = input_specs(model)
    m = re.fullmatch(r"random(?::(\d+))?", spec.strip())
    if m:
        n = int(m.group(1)) if m.group(1) else (limit or 8)
        count = min(n, limit) if limit else n
        _refuse_random_dynamic(specs)
        source: CalibrationSource = RandomSource(specs, count=count, seed=seed)
        source.validate(specs)
        return source
    p = Path(spec).expanduser()
    if not p.exists():
        raise CalibrationError(f"calibration source not found: {spec}")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            if tokenizer is None:
                raise CalibrationError(f"text calibration needs --tokenizer tokenizer.json (a Hugging Face tokenizers "
                                       f"file) to tokenize {p}")
            if seq_len is not None:  # running text for a causal LM: windows of seq_len tokens
                source = TextWindowSource(p, specs, tokenizer=tokenizer, seq_len=seq_len, limit=limit)
            else:
                source = TextSource(p, specs, tokenizer=tokenizer, max_length=max_length or 128, limit=limit)
        elif suffix == ".json":
            source = TokenFileSource(p, specs, seq_len=seq_len or _static_seq(specs) or 512, limit=limit)
        elif suffix in (".npz", ".npy"):
            source = ArrayFolderSource(p, specs, limit=limit)
        else:
            raise CalibrationError(f"calibration file {p} is not .npz/.npy, text (.txt/.jsonl/.tsv/.csv) or a .json "
                                   "token list; give a folder of images, .npz/.npy files or test_data_set inputs, "
                                   "or 'random'")
    elif _tds_dirs(p):
        source = TestDataSetSource(p, specs, limit=limit)
    elif any(q.suffix.lower() in (".npz", ".npy") for q in p.iterdir()):
        source = ArrayFolderSource(p, specs, limit=limit)
    elif any(q.suffix.lower() in IMAGE_SUFFIXES for q in p.rglob("*")):
        if len(specs) != 1 or specs[0].dtype.kind != "f" or len(specs[0].shape) != 4:
            got = ", ".join(f"'{s.name}' {s.dtype} {_fmt(s.shape)}" for s in specs)
            raise CalibrationError(f"image folder {p} needs a model with a single float image input of rank 4 "
                                   f"(NCHW or NHWC); this model's inputs are {got}")
        source = ImageFolderSource(p, specs[0], preprocess=preprocess or "torch", resize=resize, crop=crop, limit=limit)
    else:
        raise CalibrationError(f"calibration folder {p} holds no images, .npz/.npy or test_data_set files")
    source.validate(specs)
    return source
