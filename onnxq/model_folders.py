"""Folders in, folders out: an onnxruntime-genai (or Optimum) model folder quantized into a runnable folder.

``onnxq quantize GENAI_DIR -o OUT_DIR`` quantizes the decoder named by ``genai_config.json``
(``model.decoder.filename``; else the folder's only ``.onnx`` file) into ``OUT_DIR`` under the same file name, so
``genai_config.json`` stays valid as it is, and copies every other file of the folder (tokenizer, configs,
chat template) beside it. The input's external-data files are not copied: the output has its own.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator

from onnxq.errors import ModelLoadError, OnnxqError

__all__ = ["copy_companions", "made_folder", "resolve_folders"]

GENAI_CONFIG = "genai_config.json"


def _decoder_file(folder: Path) -> Path:
    """The model file of a folder: genai_config.json's decoder filename, else its only .onnx file."""
    config = folder / GENAI_CONFIG
    if config.is_file():
        try:
            name = json.loads(config.read_text(encoding="utf-8"))["model"]["decoder"]["filename"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{config} has no model.decoder.filename ({type(exc).__name__}: {exc}); give the "
                                 ".onnx file inside the folder instead") from None
        return folder / str(name)
    models = sorted(folder.glob("*.onnx"))
    if len(models) != 1:
        found = ", ".join(p.name for p in models) or "none"
        raise ModelLoadError(f"{folder} is a directory with no {GENAI_CONFIG} and {len(models)} .onnx files ({found}); "
                             "pass the .onnx file to quantize")
    return models[0]


def resolve_folders(src: Path, dst: Path) -> tuple[Path, Path, bool]:
    """(model file, output file, whether a folder was given): for a folder ``src``, its decoder file and the same
    name inside the output folder ``dst`` (which must be new or empty; :func:`made_folder` creates it). A file
    ``src`` is returned as is."""
    if not src.is_dir():
        return src, dst, False
    model = _decoder_file(src)
    if dst.exists() and dst.resolve() == src.resolve():
        raise OnnxqError(f"-o {dst} is the input model folder itself; give a new folder for the quantized model")
    if dst.suffix.lower() == ".onnx" and not dst.is_dir():
        raise OnnxqError(f"{src} is a model folder, so its output is a folder too, but -o {dst} names a model file: give "
                         f"a new folder (-o {dst.with_suffix('')}), or pass {model} to write that one file")  # fmt: skip
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        what = "is a file" if not dst.is_dir() else "already holds files"
        raise OnnxqError(f"-o {dst} {what}; the output of the model folder {src} must be a new or empty folder")
    return model, dst / model.name, True


@contextlib.contextmanager
def made_folder(folder: Path | None) -> Iterator[None]:
    """Create ``folder`` (None: nothing to do) for the run inside; if the run fails or is stopped, remove it again
    when it did not exist before, so that a failed folder run leaves nothing behind."""
    if folder is None or folder.is_dir():
        yield
        return
    folder.mkdir(parents=True)
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def copy_companions(src_dir: Path, dst_dir: Path, skip: list[Path]) -> list[Path]:
    """Copy every file of ``src_dir`` except ``skip`` (the model and its external data) and files already in
    ``dst_dir`` (what the quantization wrote) into ``dst_dir``; subfolders are copied whole. Returns the copies."""
    skipped = {p.resolve() for p in skip}
    copied = []
    for item in sorted(src_dir.iterdir()):
        target = dst_dir / item.name
        if item.resolve() in skipped or target.exists():
            continue
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)
        copied.append(target)
    return copied
