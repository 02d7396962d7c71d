"""Calibration sources: readers that stream feed dicts (input name -> array) into the calibration runner.

Why: calibration needs realistic inputs, and people keep them in many forms (image folders, ``.npz``
files, ONNX ``test_data_set`` folders) or have none at all (random, data-free). Every source streams one
sample at a time, so memory never grows with the size of the set, and :meth:`CalibrationSource.validate`
checks the data against the model's inputs before anything runs, raising a one-line
:class:`~onnxq.errors.CalibrationError` that names the array and the input at fault.

``limit=n`` on a source with more samples picks ``n`` samples **evenly spaced** over the sorted list
(deterministic): image folders are usually sorted by class, so the first ``n`` would cover few classes.

One module per reader family: :mod:`.images`, :mod:`.arrays` (``.npz``/``.npy``), :mod:`.onnx_test_data`,
:mod:`.random_data`, :mod:`.text`, :mod:`.tokens` (token-id lists and text windows); :mod:`.base` holds the
interface and input specs, :mod:`.token_inputs` what the text and token readers share, and
:mod:`.chooser` :func:`open_source`, which picks the reader for a ``--calib`` argument. Everything public is
importable from this package, as before the split.
"""

from __future__ import annotations

from onnxq.calibration.sources.arrays import ArrayFolderSource
from onnxq.calibration.sources.base import CalibrationSource, InputSpec, input_specs
from onnxq.calibration.sources.chooser import open_source
from onnxq.calibration.sources.images import IMAGE_SUFFIXES, PREPROCESS, ImageFolderSource, load_image
from onnxq.calibration.sources.onnx_test_data import TestDataSetSource
from onnxq.calibration.sources.random_data import RandomSource
from onnxq.calibration.sources.text import PADDING, TEXT_SUFFIXES, TextSource
from onnxq.calibration.sources.token_inputs import TOKEN_INPUTS
from onnxq.calibration.sources.tokens import TextWindowSource, TokenFileSource

__all__ = ["InputSpec", "input_specs", "CalibrationSource", "ImageFolderSource", "ArrayFolderSource",
           "TestDataSetSource", "RandomSource", "TextSource", "TokenFileSource", "TextWindowSource", "PREPROCESS", "IMAGE_SUFFIXES",
           "TEXT_SUFFIXES", "TOKEN_INPUTS", "PADDING", "load_image", "open_source"]
