"""onnxq: turn a float ONNX model into a smaller, faster quantized ONNX model.

The library is a pipeline of graph passes over an onnx-graphsurgeon graph. For scripts, the package face
(:mod:`onnxq.api`; README, "Library use")::

    import onnxq

    result = onnxq.quantize("model.onnx", "model.int8.onnx", preset="w8a8", calib="images/", preprocess="torch")
    comparison = onnxq.compare("model.onnx", "model.int8.onnx", "images/", preprocess="torch")

with :class:`onnxq.Recipe`, :func:`onnxq.preset` and :func:`onnxq.load_recipe` to choose what to do.
These names are imported on first use (the module ``__getattr__`` below), so ``import onnxq`` stays
free of numpy, onnx and ONNX Runtime: the CLI imports it before every command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: The package face: each name and the module it comes from, imported on first use.
_FACE: dict[str, str] = {
    "quantize": "onnxq.api",
    "compare": "onnxq.api",
    "Recipe": "onnxq.recipe",
    "preset": "onnxq.recipe",
    "load_recipe": "onnxq.recipe",
    "CalibrationOptions": "onnxq.quantization",
    "QuantizeResult": "onnxq.quantization",
    "Comparison": "onnxq.evaluate",
    "OnnxqError": "onnxq.errors",
}

__all__ = ["__version__", "quantize", "compare", "Recipe", "preset", "load_recipe", "CalibrationOptions",
           "QuantizeResult", "Comparison", "OnnxqError"]  # fmt: skip

if TYPE_CHECKING:  # what type checkers and IDEs see: the names as if imported here
    from onnxq.api import compare as compare
    from onnxq.api import quantize as quantize
    from onnxq.errors import OnnxqError as OnnxqError
    from onnxq.evaluate import Comparison as Comparison
    from onnxq.quantization import CalibrationOptions as CalibrationOptions
    from onnxq.quantization import QuantizeResult as QuantizeResult
    from onnxq.recipe import Recipe as Recipe
    from onnxq.recipe import load_recipe as load_recipe
    from onnxq.recipe import preset as preset


def __getattr__(name: str) -> Any:
    """Import a name of the package face on first use (PEP 562)."""
    where = _FACE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_FACE})
