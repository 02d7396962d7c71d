"""Image folders: :func:`load_image` (named preprocessings) and :class:`ImageFolderSource`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, cast

import numpy as np
from onnxq.calibration.sources.base import CalibrationSource, InputSpec, count_text, evenly_spaced, shape_text
from onnxq.errors import CalibrationError, MissingDependencyError

#: Image file suffixes an image folder is searched for (case-insensitive).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
#: Named image preprocessings accepted by :func:`load_image` and :class:`ImageFolderSource`.
PREPROCESS = ("torch", "caffe_bgr", "tf127", "raw255")


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
        raise CalibrationError(f"image input '{spec.name}' must have rank 4 (NCHW or NHWC), not {shape_text(spec.shape)}")
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
            crop = cast("tuple[int, int]", (hw[0], hw[1])) if all(isinstance(d, int) and d > 0 for d in hw) else 224
        self.crop: tuple[int, int] = (crop, crop) if isinstance(crop, int) else tuple(crop)  # type: ignore[assignment]
        self.resize = resize if resize is not None else int(round(min(self.crop) * 256 / 224))
        self.files = sorted((p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                            key=lambda p: p.relative_to(self.folder).as_posix())
        if not self.files:
            raise CalibrationError(f"image folder {self.folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.indices = evenly_spaced(len(self.files), limit)

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
        return (f"image folder {self.folder} ({count_text(len(self), len(self.files), 'images')}, preprocess "
                f"{self.preprocess}, resize {self.resize}, {self.crop[0]}x{self.crop[1]}, {self.layout} {self.spec.dtype}{gray})")
