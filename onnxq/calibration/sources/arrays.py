"""``.npz`` / ``.npy`` files and folders of them, streamed row by row: :class:`ArrayFolderSource`."""

from __future__ import annotations

import contextlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from onnxq.calibration.sources.base import (CalibrationSource, InputSpec, castable, count_text, evenly_spaced,
    natural_key, shape_fits, shape_mismatch)
from onnxq.errors import CalibrationError


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
        return "split" if spec.batched and shape_fits(shape[1:], dims[1:]) else "whole" if shape_fits(shape, dims) else None
    if len(shape) == r - 1 and spec.batched:
        if shape_fits(shape, dims[1:]):
            return "batch"
        if r >= 3 and not (isinstance(dims[1], int) and dims[1] != 1) and shape_fits(shape[1:], dims[2:]):
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
                            key=natural_key) if self.path.is_dir() else [self.path]
        if not self.files:
            raise CalibrationError(f"calibration folder {self.path} holds no .npz/.npy files")
        self.notes: dict[str, None] = {}  # ordered set of what describe() reports (reshapes, casts)
        self.plan = [self._plan_file(f, self.specs) for f in self.files]
        self.indices = evenly_spaced(sum(n for n, _ in self.plan), limit)

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
                raise shape_mismatch(a.label, a.shape, s)
            if not castable(a.dtype, s.dtype):
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
        return kind + "; ".join([count_text(len(self), total, "samples"), *self.notes]) + ")"
