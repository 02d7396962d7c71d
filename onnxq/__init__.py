"""onnxq: turn a float ONNX model into a smaller, faster quantized ONNX model.

The library is a pipeline of graph passes over an onnx-graphsurgeon graph. The usual entry point is
:func:`onnxq.quantize.quantize_model` (what ``onnxq quantize`` calls).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
