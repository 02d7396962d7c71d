"""Saving models: atomic writes that never overwrite the input, with external data past protobuf's 2 GB.

:func:`save_model` writes each file to a temporary file beside its destination, fsyncs it and renames it
over the destination; models whose tensors exceed :data:`EXTERNAL_DATA_THRESHOLD` (or on request) are
written with every initializer of 1 KiB or more in one ``<name>.data`` file, serialised field by field so
that no copy of the data is made. Loading is in :mod:`onnxq.model`, which re-exports :func:`save_model`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import IO, Any

import onnx

from onnxq.destinations import Dest, check_destinations, temp_beside
from onnxq.errors import ModelLoadError, ModelSaveError
from onnxq.model_files import external_files_of, is_external, iter_tensors

__all__ = ["EXTERNAL_DATA_THRESHOLD", "save_model"]

logger = logging.getLogger("onnxq.model")

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # tensor bytes above which save_model goes external (protobuf: 2 GB)
_MIN_EXTERNAL_TENSOR = 1024  # smaller tensors stay inline


def _refuse_input_overwrite(targets: list[Path], input_path: Path) -> None:
    """ModelSaveError when a file to be written is the input model or one of its external-data files."""
    protected = [input_path]
    if input_path.is_file() and any(t.exists() for t in targets):
        try:
            protected += external_files_of(input_path)
        except ModelLoadError:
            pass
    for target in targets:
        for p in protected:
            same = os.path.samefile(target, p) if target.exists() and p.exists() else False
            if same or os.path.realpath(target) == os.path.realpath(p):
                raise ModelSaveError(f"refusing to overwrite the input: writing {target} would replace {p} "
                                     f"(input model {input_path}); choose a different output path (-o)")


def _write_all(f: IO[bytes], data: bytes) -> None:
    """Write ``data`` in 64 MiB pieces."""
    view = memoryview(data)
    for i in range(0, len(view), 1 << 26):
        f.write(view[i:i + (1 << 26)])


def _copy_fields(msg: Any, keep: Any) -> Any:
    """A new message with only the fields of ``msg`` whose descriptor passes ``keep`` (the rest is not copied)."""
    out = type(msg)()
    for fd, value in msg.ListFields():
        if keep(fd):
            if hasattr(value, "extend"):
                getattr(out, fd.name).extend(value)
            elif hasattr(value, "CopyFrom"):
                getattr(out, fd.name).CopyFrom(value)
            else:
                setattr(out, fd.name, value)
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _serialize_external(model: onnx.ModelProto, f: IO[bytes], location: str) -> bytes:
    """Write initializers of >= 1 KiB to ``f`` (aligned) and return the model file's bytes, pointing at them.

    The proto is assembled field by field (ModelProto.graph is field 7, GraphProto.initializer field 5) so
    that neither the caller's model nor a copy of all its data is needed: memory stays at the model plus
    one tensor.
    """
    parts, offset = [], 0
    for t in model.graph.initializer:
        raw = t.raw_data if t.HasField("raw_data") else b""
        if len(raw) < _MIN_EXTERNAL_TENSOR:
            parts.append(t.SerializeToString())
            continue
        pad = -offset % (65536 if len(raw) >= 1 << 20 else 64)
        _write_all(f, b"\0" * pad)
        _write_all(f, raw)
        offset += pad
        skel = _copy_fields(t, lambda fd: fd.name not in ("raw_data", "data_location", "external_data"))
        skel.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = skel.external_data.add()
            entry.key, entry.value = key, value
        offset += len(raw)
        parts.append(skel.SerializeToString())
    g = model.graph
    graph = b"".join([_copy_fields(g, lambda fd: fd.number < 5).SerializeToString(),
                      *(b"\x2a" + _varint(len(p)) + p for p in parts),
                      _copy_fields(g, lambda fd: fd.number > 5).SerializeToString()])
    blob = b"".join([_copy_fields(model, lambda fd: fd.number < 7).SerializeToString(), b"\x3a", _varint(len(graph)),
                     graph, _copy_fields(model, lambda fd: fd.number > 7).SerializeToString()])
    if len(blob) >= 2**31:
        raise ModelSaveError("the model is over 2 GB even without its initializers; turn large Constant nodes "
                             "into initializers first")
    return blob


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    external_data: bool | None = None,
) -> list[Path]:
    """Write a model atomically, never over the input; return the files written (the model is unchanged).

    Each file goes to a temporary file in the destination folder (parents are created), is fsynced, then
    renamed over the destination, so a failure leaves any previous output intact and no temporary files.
    ``input_path``: writing over that model or its external data is refused. ``external_data``: True or
    False to force; None uses it when tensor data exceeds ~1.8 GB. With external data, every initializer
    of 1 KiB or more goes to one ``<name>.data`` beside the model (relative location), renamed in first.
    Temporary files of earlier killed runs for the same destination are removed (:mod:`onnxq.destinations`).

    Raises:
        ModelSaveError: A bad output path (a directory, FIFO, device or other non-regular file, a folder
            that cannot be written: DestinationError), the output would overwrite the input, or the write failed.
    """
    out = Path(os.path.abspath(path))
    check_destinations([Dest(path, "output (-o)")])
    ext = [t.name for t in iter_tensors(model) if is_external(t)]
    if ext:
        raise ModelSaveError(f"tensor {ext[0]!r} still refers to external data; load the model with its data first")
    if external_data is None:
        size = sum(len(t.raw_data) if t.HasField("raw_data") else t.ByteSize() for t in iter_tensors(model))
        external_data = size > EXTERNAL_DATA_THRESHOLD
    written = [out.with_name(out.name + ".data"), out] if external_data else [out]
    if external_data:
        check_destinations([Dest(written[0], "external data file of the output")])
    if input_path is not None:
        _refuse_input_overwrite(written, Path(os.path.abspath(input_path)))
    temps: list[Path] = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if external_data:
            with temp_beside(written[0], temps) as f:
                blob = _serialize_external(model, f, written[0].name)
                f.flush()
                os.fsync(f.fileno())
        else:
            blob = model.SerializeToString()
        with temp_beside(out, temps) as f:
            _write_all(f, blob)
            f.flush()
            os.fsync(f.fileno())
        del blob
        for tmp, dest in zip(list(temps), written):
            os.replace(tmp, dest)
            temps.remove(tmp)
    except BaseException as exc:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, ModelSaveError) or not isinstance(exc, Exception):
            raise
        hint = "; save it with external_data=True" if "2GB" in str(exc) or "too large" in str(exc) else ""
        raise ModelSaveError(f"cannot write {out}: {exc}{hint}".splitlines()[0]) from None
    with contextlib.suppress(OSError):  # make the renames durable where the platform allows it
        dir_fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    logger.info("saved %s", ", ".join(map(str, written)))
    return written
