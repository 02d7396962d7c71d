"""ONNX ``test_data_set`` folders (``input_<i>.pb`` TensorProtos or ``.npy`` files): :class:`TestDataSetSource`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper
from onnxq.calibration.sources.base import (CalibrationSource, InputSpec, castable, count_text, evenly_spaced,
    natural_key)
from onnxq.errors import CalibrationError

_TDS_INPUT = re.compile(r"input_(\d+)\.(pb|npy)")


def _tds_inputs(d: Path) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), p) for p in d.iterdir() if p.is_file() and (m := _TDS_INPUT.fullmatch(p.name)))


def find_test_data_dirs(root: Path) -> list[Path]:
    """Sample folders: ``root`` when it holds input_*.pb/.npy, else its ``test_data_set`` or subfolders that do."""
    if not root.is_dir():
        return []
    if _tds_inputs(root):
        return [root]
    if (root / "test_data_set").is_dir():
        return find_test_data_dirs(root / "test_data_set")
    return sorted((d for d in root.iterdir() if d.is_dir() and _tds_inputs(d)), key=natural_key)


class TestDataSetSource(CalibrationSource):
    """ONNX ``test_data_set_*/input_<i>.pb`` TensorProto folders, or ``test_data_set/<n>/input_<i>.npy``.

    ``input_<i>`` feeds the i-th model input, unless the TensorProto's name is a model input name.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, folder: str | Path, specs: list[InputSpec], *, limit: int | None = None) -> None:
        self.folder, self.specs = Path(folder), list(specs)
        self.dirs = find_test_data_dirs(self.folder)
        if not self.dirs:
            raise CalibrationError(f"calibration folder {self.folder} holds no test_data_set inputs (input_<i>.pb/.npy)")
        self.indices = evenly_spaced(len(self.dirs), limit)

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
            feed[name] = x.astype(dtype, copy=False) if castable(x.dtype, dtype) else x
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
        return f"test_data_set {self.folder} ({count_text(len(self), len(self.dirs), 'samples')})"
