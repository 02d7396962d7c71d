"""The package face: :func:`quantize` and :func:`compare` as ``onnxq.quantize(...)`` and ``onnxq.compare(...)``.

Thin wrappers for library users. They take what a script has at hand (a path or an in-memory
``onnx.ModelProto``, a preset name or a :class:`~onnxq.recipe.Recipe`, a calibration source written as
``onnxq quantize --calib`` takes it) and call the library's own functions:
:func:`onnxq.quantization.quantize_file` (a file written, with its checks and report) or
:func:`onnxq.quantization.quantize_model` (in memory), and :func:`onnxq.evaluate.compare_models`. They add no
quantization logic, only the choice of what to call, so a script and the CLI give the same model for the
same settings. Errors are :class:`~onnxq.errors.OnnxqError` subclasses, one line each, as in the CLI.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx

from onnxq.calibration.sources import TEXT_SUFFIXES, open_source
from onnxq.errors import CalibrationError, OnnxqError, RecipeConflictError
from onnxq.evaluate import Comparison, compare_models
from onnxq.model import load_model
from onnxq.quantization import CalibrationOptions, QuantizeResult, quantize_file, quantize_model
from onnxq.recipe import Recipe, load_recipe, recipe_from_dict
from onnxq.recipe import preset as get_preset

__all__ = ["quantize", "compare", "choose_recipe", "calibration_defaults", "check_calibration_given", "PathLike", "ModelLike", "COMPARE_SAMPLES", "DEFAULT_PRESET"]

PathLike = Union[str, "os.PathLike[str]"]
"""A file or folder path."""

ModelLike = Union[str, "os.PathLike[str]", onnx.ModelProto]
"""A model: the path of an ``.onnx`` file, or the model in memory."""

DEFAULT_PRESET = "w8a8"
"""The preset used when neither ``preset`` nor ``recipe`` is given (as ``onnxq quantize`` does)."""

COMPARE_SAMPLES = 64
"""How many samples :func:`compare` takes from a source spec by default (``onnxq compare --calib-size``)."""

_SOURCE_OPTIONS = tuple(f.name for f in dataclasses.fields(CalibrationOptions) if f.name not in ("source", "size"))
"""The calibration settings a source spec takes as keywords (``preprocess``, ``resize``, ... ``seed``)."""


def choose_recipe(preset: str | None = None, recipe: Recipe | PathLike | Mapping[str, Any] | None = None) -> Recipe:
    """The recipe a run uses: ``recipe`` (a Recipe, a TOML recipe file's path, or the same settings as a
    dict), else the preset named ``preset`` (``w8a8`` when neither is given).

    Both at once is a RecipeConflictError (a RecipeError): one of them would be silently ignored.
    """
    if preset is not None and recipe is not None:
        raise RecipeConflictError(f"give either preset={preset!r} or recipe=..., not both (a recipe file can start from a "
                          "preset: preset = \"w8a8\")")  # fmt: skip
    if recipe is None:
        return get_preset(DEFAULT_PRESET if preset is None else preset)
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return recipe_from_dict(recipe)
    return load_recipe(Path(recipe))


LLM_SEQ_LEN = 512
"""The window length of running text a weight-only recipe is calibrated on when none is given."""


def calibration_defaults(recipe: Recipe, options: CalibrationOptions) -> CalibrationOptions:
    """``options`` with the defaults that depend on the recipe: a weight-only recipe (an LLM) calibrated on a
    text file without ``seq_len`` or ``max_length`` reads windows of :data:`LLM_SEQ_LEN` tokens of running
    text, not one short line per sample."""
    from onnxq.passes import build_passes

    if not options.source or not any(p.calibrates_on_text_windows for p in build_passes(recipe)):
        return options
    if options.seq_len is None and options.max_length is None and Path(options.source).suffix.lower() in TEXT_SUFFIXES:
        return dataclasses.replace(options, seq_len=LLM_SEQ_LEN)
    return options


def check_calibration_given(recipe: Recipe, options: CalibrationOptions | None, calib_cache: PathLike | None = None) -> None:
    """Refuse, before any work, a recipe that needs calibration samples when none are given (no source, no
    ``calib_cache``): GPTQ/AWQ need calibration text, static quantization needs samples or ``random``.

    The message names the ``onnxq quantize`` options (``--calib``, ...).
    """
    from onnxq.passes import build_passes

    if options is not None and options.source:
        return
    # the passes a range cache cannot stand in for are asked first (their refusal holds even with a cache)
    needing = sorted((p for p in build_passes(recipe) if p.needs_calibration()), key=lambda p: p.cache_answers_calibration)
    for p in needing:
        if calib_cache is None or not p.cache_answers_calibration:
            raise CalibrationError(p.missing_calibration_message(recipe.name))


def _check_source_options(options: Mapping[str, Any], *, unused: str | None = None) -> None:
    """Refuse a calibration keyword that is not a setting, or one that has no effect: ``unused`` says why
    (no source spec is read here) and the fix."""
    unknown = sorted(set(options) - set(_SOURCE_OPTIONS))
    if unknown:
        raise CalibrationError(f"unknown calibration setting {unknown[0]!r}; valid: {', '.join(_SOURCE_OPTIONS)}")
    if options and unused:
        raise CalibrationError(f"{', '.join(sorted(options))} only apply to reading a source spec (a path or "
                               f"'random'): {unused}")  # fmt: skip


def _calibration_options(calib: PathLike | CalibrationOptions | None, size: int | None,
                         options: Mapping[str, Any]) -> CalibrationOptions | None:  # fmt: skip
    """``calib`` and its keyword settings as the library's CalibrationOptions (None: no calibration samples)."""
    if isinstance(calib, CalibrationOptions):
        _check_source_options(options, unused="calib is a CalibrationOptions: put them in it")
        return calib if size is None else dataclasses.replace(calib, size=size)
    _check_source_options(options, unused=None if calib is not None else "no calib is given: give one, or drop them")
    if calib is None:
        return None
    return CalibrationOptions(source=os.fspath(calib), size=size, **options)


def quantize(
    model: ModelLike,
    output_path: PathLike | None = None,
    *,
    preset: str | None = None,
    recipe: Recipe | PathLike | Mapping[str, Any] | None = None,
    calib: PathLike | CalibrationOptions | None = None,
    calib_size: int | None = None,
    report_dir: PathLike | None = None,
    calib_cache: PathLike | None = None,
    progress: bool = False,
    checked: bool = False,
    **calibration: Any,
) -> QuantizeResult:
    """Quantize ``model`` with a preset or recipe, and write it to ``output_path`` when one is given.

    The same run as ``onnxq quantize``: with ``output_path``, :func:`onnxq.quantization.quantize_file` (the
    model is verified to load in ONNX Runtime, then written atomically; the input is never overwritten);
    without, :func:`onnxq.quantization.quantize_model` (nothing written; ``result.model`` is the quantized model).

    Args:
        model: the float model: an ``.onnx`` path or an ``onnx.ModelProto`` (not modified). Writing a file
            needs the path (external data and the input-overwrite check go by it).
        output_path: where to write the quantized model (its external data beside it when over 2 GB).
        preset: a preset name (``onnxq presets`` lists them); ``w8a8`` when no ``recipe`` is given.
        recipe: a :class:`onnxq.Recipe`, the path of a TOML recipe file, or the same settings as a dict.
        calib: the calibration samples, as ``--calib`` takes them: an image folder, ``.npz``/``.npy``
            files, a ``test_data_set`` folder, a text or token-id file, or ``"random"``; or a ready
            :class:`onnxq.CalibrationOptions`. Static presets need it; ``w4-rtn``, ``int8-dynamic`` and
            ``fp16`` do not.
        calib_size: calibrate on this many samples, evenly spaced over the source (``--calib-size``; the
            recipe's ``calibration.samples``).
        report_dir: also write ``report.json`` and ``report.html`` (with an accuracy comparison) there.
            Needs ``output_path``.
        calib_cache: a file written by ``onnxq calibrate`` for this model and recipe: its ranges are used
            instead of running calibration. Needs ``output_path``.
        progress: show progress bars on the terminal.
        checked: validate the graph (onnx.checker and an ORT load) after every pass.
        **calibration: how the ``calib`` source is read, as the ``--calib-*`` options: ``preprocess``
            (``torch``, ``caffe_bgr``, ``tf127``, ``raw255``), ``resize``, ``crop``, ``tokenizer``,
            ``max_length``, ``seq_len``, ``seed``. A weight-only preset on a text file without
            ``seq_len`` or ``max_length`` reads windows of 512 tokens (:func:`calibration_defaults`), as the CLI does.

    Returns:
        The :class:`onnxq.QuantizeResult`: ``model`` (the quantized ``onnx.ModelProto``), ``report`` (what
        each pass did, the target profile and why, the calibration; ``report.to_dict()``), ``files``
        (what was written) and ``recipe`` (as applied).

    Raises:
        OnnxqError: a one-line message naming the file, node, tensor or setting at fault and the fix;
            nothing is written.
    """
    chosen = choose_recipe(preset, recipe)
    if calib_size is not None:
        chosen = chosen.with_(calibration=dataclasses.replace(chosen.calibration, samples=calib_size))
    opts = _calibration_options(calib, calib_size, calibration)
    if opts is not None:
        opts = calibration_defaults(chosen, opts)
    if output_path is None:
        if report_dir is not None or calib_cache is not None:
            raise OnnxqError("report_dir and calib_cache need output_path: the report describes, and the cache is "
                             "checked against, a model file; give output_path='model.int8.onnx'")  # fmt: skip
        return quantize_model(model, chosen, calibration=opts, progress=progress, checked=checked)
    if isinstance(model, onnx.ModelProto):
        raise OnnxqError("writing output_path needs the float model's path, not a ModelProto (the input-overwrite "
                         "and external-data checks go by it): onnx.save it first, or leave output_path out and "
                         "save result.model with onnxq.model.save_model")  # fmt: skip
    return quantize_file(model, output_path, chosen, calibration=opts, progress=progress, checked=checked,
                         report_dir=report_dir, calib_cache=calib_cache)  # fmt: skip


def _loaded(model: ModelLike) -> tuple[onnx.ModelProto, PathLike | None]:
    """The model in memory, and its path where it came from a file (its size on disk is then reported)."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    return load_model(model), model


def compare(
    float_model: ModelLike,
    quant_model: ModelLike,
    data: PathLike | Iterable[dict[str, np.ndarray]],
    *,
    samples: int | None = None,
    tensors: bool = True,
    latency: bool = True,
    histograms: int = 0,
    progress: bool = False,
    **calibration: Any,
) -> Comparison:
    """Run the float and the quantized model on the same inputs and measure where they differ.

    The same measurement as ``onnxq compare`` (:func:`onnxq.evaluate.compare_models`): per-tensor SQNR
    between matching tensors (QDQ and QOperator models), output SQNR, cosine and top-1 agreement
    (classifiers), and the size and ORT CPU latency of each model.

    Args:
        float_model: the float model: an ``.onnx`` path or an ``onnx.ModelProto``.
        quant_model: the quantized model made from it (a path, or ``result.model`` of :func:`quantize`).
        data: the inputs: a source spec as ``--calib`` takes it (an image folder, ``.npz``/``.npy`` files,
            a ``test_data_set`` folder, a text or token-id file, ``"random"``), or an iterable of feed dicts
            (input name -> array), such as a list of ``{"image": x}``.
        samples: at most this many samples: evenly spaced over a source spec (default 64), the first ones
            of an iterable (default all of them).
        tensors: also compare the matching inner tensors (False: the outputs only, faster).
        latency: also measure the latency of each model on one sample.
        histograms: keep the value histograms of this many worst tensors (as the HTML report shows them).
        progress: show a progress line on the terminal.
        **calibration: how a source spec is read: ``preprocess``, ``resize``, ``crop``, ``tokenizer``,
            ``max_length``, ``seq_len``, ``seed`` (see :func:`quantize`).

    Returns:
        The :class:`onnxq.Comparison`: ``outputs`` (per output: ``sqnr_db``, ``cosine``, ``max_abs_err``,
        ``top1_agreement``, ``degenerate``), ``top1_agreement``, ``tensors`` (worst SQNR first),
        ``unmatched``, ``models`` (bytes, latency_ms), ``samples``; ``to_dict()`` for JSON.

    Raises:
        OnnxqError: a model that does not load or does not match the other, data that does not fit the model.
    """
    if samples is not None and samples < 1:
        raise CalibrationError(f"samples={samples}: compare needs at least 1 sample")
    fm, fpath = _loaded(float_model)
    qm, qpath = _loaded(quant_model)
    source: Iterable[dict[str, np.ndarray]]
    if isinstance(data, (str, os.PathLike)):
        _check_source_options(calibration)
        source = open_source(os.fspath(data), fm, limit=COMPARE_SAMPLES if samples is None else samples, **calibration)
    else:
        _check_source_options(calibration, unused="data is feed dicts, used as they are: drop them")
        source = data if samples is None else itertools.islice(data, samples)
    return compare_models(fm, qm, source, float_path=fpath, quant_path=qpath, tensors=tensors, latency=latency,
                          histograms=histograms, progress=progress)  # fmt: skip
