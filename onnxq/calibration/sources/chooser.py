"""Which source reads a ``--calib`` argument: :func:`open_source`."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
from onnxq.calibration.sources.arrays import ArrayFolderSource
from onnxq.calibration.sources.base import CalibrationSource, InputSpec, input_specs, shape_text
from onnxq.calibration.sources.images import IMAGE_SUFFIXES, ImageFolderSource
from onnxq.calibration.sources.onnx_test_data import TestDataSetSource, find_test_data_dirs
from onnxq.calibration.sources.random_data import RandomSource, index_bounds
from onnxq.calibration.sources.text import TEXT_SUFFIXES, TextSource
from onnxq.calibration.sources.token_inputs import empty_past_specs, is_past_input, static_seq_len
from onnxq.calibration.sources.tokens import TextWindowSource, TokenFileSource
from onnxq.errors import CalibrationError


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
            if is_past_input(s):  # an LLM's KV cache: random token ids say nothing about text's activations
                raise CalibrationError(f"random calibration cannot feed KV-cache input '{s.name}' {shape_text(s.shape)}; "
                                       "calibrate an LLM on text (--calib FILE.txt --tokenizer tokenizer.json --seq-len "
                                       "512) or token ids (--calib TOKENS.json), which feed it an empty past")
            raise CalibrationError(f"random calibration cannot size {what} of model input '{s.name}' {shape_text(s.shape)}: "
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
        source: CalibrationSource = RandomSource(specs, count=count, seed=seed, int_high=index_bounds(model))
        source.validate(specs)
        return source
    p = Path(spec).expanduser()
    if not p.exists():
        raise CalibrationError(f"calibration source not found: {spec}")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in TEXT_SUFFIXES or suffix == ".json":  # token sources feed a KV cache an empty past
            specs = empty_past_specs(model, specs)
        if suffix in TEXT_SUFFIXES:
            if tokenizer is None:
                raise CalibrationError(f"text calibration needs --tokenizer tokenizer.json (a Hugging Face tokenizers "
                                       f"file) to tokenize {p}")
            if seq_len is not None:  # running text for a causal LM: windows of seq_len tokens
                source = TextWindowSource(p, specs, tokenizer=tokenizer, seq_len=seq_len, limit=limit)
            else:
                source = TextSource(p, specs, tokenizer=tokenizer, max_length=max_length or 128, limit=limit)
        elif suffix == ".json":
            source = TokenFileSource(p, specs, seq_len=seq_len or static_seq_len(specs) or 512, limit=limit)
        elif suffix in (".npz", ".npy"):
            source = ArrayFolderSource(p, specs, limit=limit)
        else:
            raise CalibrationError(f"calibration file {p} is not .npz/.npy, text (.txt/.jsonl/.tsv/.csv) or a .json "
                                   "token list; give a folder of images, .npz/.npy files or test_data_set inputs, "
                                   "or 'random'")
    elif find_test_data_dirs(p):
        source = TestDataSetSource(p, specs, limit=limit)
    elif any(q.suffix.lower() in (".npz", ".npy") for q in p.iterdir()):
        source = ArrayFolderSource(p, specs, limit=limit)
    elif any(q.suffix.lower() in IMAGE_SUFFIXES for q in p.rglob("*")):
        if len(specs) != 1 or specs[0].dtype.kind != "f" or len(specs[0].shape) != 4:
            got = ", ".join(f"'{s.name}' {s.dtype} {shape_text(s.shape)}" for s in specs)
            raise CalibrationError(f"image folder {p} needs a model with a single float image input of rank 4 "
                                   f"(NCHW or NHWC); this model's inputs are {got}")
        source = ImageFolderSource(p, specs[0], preprocess=preprocess or "torch", resize=resize, crop=crop, limit=limit)
    else:
        raise CalibrationError(f"calibration folder {p} holds no images, .npz/.npy or test_data_set files")
    source.validate(specs)
    return source
