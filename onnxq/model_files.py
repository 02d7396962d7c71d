"""A model's files on disk: the tensors that point at external data, the checked data files, the hash.

:func:`checked_external_files` checks every external-data reference of a model (relative, inside the model's
folder, no symbolic link, long enough) before any loader reads it; :func:`model_hash` hashes a model file
and then its data files. Used by loading (:mod:`onnxq.model`) and saving (:mod:`onnxq.model_save`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator

import onnx

from onnxq.errors import ModelLoadError, UnsafeModelError

__all__ = ["checked_external_files", "external_files_of", "is_external", "iter_tensors", "model_hash"]

_CHUNK = 1 << 22


def iter_tensors(item: onnx.ModelProto | onnx.GraphProto | onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto: initializers, sparse initializers, node attributes, subgraphs, local functions."""
    if isinstance(item, onnx.ModelProto):
        yield from iter_tensors(item.graph)
        for node in (n for f in item.functions for n in f.node):
            yield from iter_tensors(node)
    elif isinstance(item, onnx.GraphProto):
        yield from item.initializer
        for sparse in item.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in item.node:
            yield from iter_tensors(node)
    else:
        for attr in item.attribute:
            yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from iter_tensors(g)


def is_external(t: onnx.TensorProto) -> bool:
    return bool(t.data_location == onnx.TensorProto.EXTERNAL)


def checked_external_files(model: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """Check that every external-data reference is a file inside ``base_dir``; return the files, in order.

    A crafted model must never make onnxq read arbitrary files, so absolute paths, escapes through ``..``
    or symlinks, and missing files are UnsafeModelError before onnx's loader sees them.
    """
    root, files = base_dir.resolve(), dict[Path, None]()  # a dict keeps first-seen order, unlike a set
    for t in filter(is_external, iter_tensors(model)):
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        where = f"tensor {t.name!r} has external data location {loc!r}"
        if not loc or loc[0] in "/\\" or PurePosixPath(loc).is_absolute() or PureWindowsPath(loc).drive:
            raise UnsafeModelError(f"{where}: only relative paths inside the model's folder {base_dir} are allowed")
        target = (base_dir / loc).resolve()
        if not target.is_relative_to(root):
            raise UnsafeModelError(f"{where}, which points outside the model's folder {base_dir}; refusing to read it")
        if (base_dir / loc).is_symlink():  # onnx's loader refuses links even inside the folder
            raise UnsafeModelError(f"{where}, which is a symbolic link; onnx does not follow them, put the file there")
        if not target.is_file():
            raise UnsafeModelError(f"{where}, but {base_dir / loc} does not exist; copy the data file beside the model")
        try:
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
        except ValueError:
            raise ModelLoadError(f"{where} with a non-numeric offset or length; the model looks corrupt") from None
        if end > target.stat().st_size:
            raise ModelLoadError(f"{where}, but that file ends before byte {end}: it looks truncated")
        files[target] = None
    return list(files)


def _stream(path: Path, h: Any = None) -> bool:
    """Feed ``path`` to hash ``h`` in chunks; return whether it contains b"location" (external data)."""
    found, tail = False, b""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            if h is not None:
                h.update(chunk)
            found = found or b"location" in chunk or b"location" in tail + chunk[:8]
            tail = chunk[-8:]
    return found


def external_files_of(path: Path, *, scanned: bool = False) -> list[Path]:
    """The checked external-data files of a model file; parses it only if it can hold a reference."""
    if not scanned and not _stream(path):
        return []
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:
        raise ModelLoadError(f"{path} is not an ONNX model (protobuf could not decode it)") from None
    return checked_external_files(model, path.parent)


def model_hash(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a model file and then its external-data files, read in chunks.

    It keys calibration caches and is recorded in outputs, so it must change when external weights do.
    """
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}; check the path")
    h = hashlib.sha256()
    if _stream(path, h):
        for file in external_files_of(path, scanned=True):
            _stream(file, h)
    return h.hexdigest()
