"""Small helpers the unit tests share: build a model from ONNX text, run it in ORT, check it fully."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxq.pipeline import PassContext
from onnxq.report import Report


def model_from_text(text: str) -> onnx.ModelProto:
    """Parse ONNX text syntax into a checked ModelProto."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def run_ort(model: onnx.ModelProto | gs.Graph, feeds: Mapping[str, np.ndarray], *, optimize: bool = False) -> list[np.ndarray]:
    """Run a model on ORT CPU (graph optimisations off unless asked) and return all outputs."""
    if isinstance(model, gs.Graph):
        model = gs.export_onnx(model)
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))


def full_check(model: onnx.ModelProto | gs.Graph) -> onnx.ModelProto:
    """onnx.checker with full_check; returns the ModelProto."""
    if isinstance(model, gs.Graph):
        model = gs.export_onnx(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def op_types(model: onnx.ModelProto | gs.Graph) -> list[str]:
    """The op types of the graph's nodes, in order."""
    if isinstance(model, gs.Graph):
        return [n.op for n in model.nodes]
    return [n.op_type for n in model.graph.node]


def make_ctx(recipe: object = None, **kwargs: object) -> PassContext:
    """A PassContext for tests: checked mode on, no progress bars."""
    if recipe is None:
        from onnxq.recipe import Recipe

        recipe = Recipe()
    return PassContext(recipe=recipe, report=Report(), checked=True, progress=False, **kwargs)  # type: ignore[arg-type]


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference`` in dB."""
    ref = np.asarray(reference, np.float64)
    err = ref - np.asarray(test, np.float64)
    return float(10 * np.log10((ref**2).sum() / max((err**2).sum(), 1e-30)))
