"""Small helpers the unit tests share: build a model (from ONNX text or from nodes), run it in ORT, check it
fully, run the CLI."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxq.pipeline import PassContext
from onnxq.report import Report


def model_from_text(text: str) -> onnx.ModelProto:
    """Parse ONNX text syntax into a checked ModelProto."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def value_info(name: str, shape: Sequence[int | str | None] | None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """A graph input or output: ``name`` with element type ``elem`` (float32 unless given) and ``shape``."""
    return helper.make_tensor_value_info(name, elem, shape)


def initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer called ``name`` holding ``array``."""
    return numpy_helper.from_array(array, name)


def make_model(nodes: Iterable[onnx.NodeProto], inputs: Iterable[onnx.ValueInfoProto], outputs: Iterable[onnx.ValueInfoProto],
               inits: Mapping[str, np.ndarray] | Iterable[onnx.TensorProto] = (), opset: int = 17, *,
               infer_shapes: bool = False, check: bool = True) -> onnx.ModelProto:  # fmt: skip
    """A model of one graph "g" (IR version 8, default-domain ``opset``) from nodes, inputs, outputs and
    initializers (TensorProtos, or a name -> array mapping); optionally with inferred shapes; full-checked
    unless ``check`` is False."""
    tensors = [initializer(k, v) for k, v in inits.items()] if isinstance(inits, Mapping) else list(inits)
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if infer_shapes:
        model = onnx.shape_inference.infer_shapes(model)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    """The node of ``model`` called ``name`` (StopIteration when there is none)."""
    return next(n for n in model.graph.node if n.name == name)


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ``onnxq ARGS`` in-process: (exit code, stdout, stderr)."""
    from onnxq.cli import main

    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


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


def make_ctx(target: str = "generic", **kwargs: object) -> PassContext:
    """A PassContext for tests: checked mode on, no progress bars, the ``target`` profile."""
    from onnxq.target import PROFILES

    return PassContext(report=Report(), checked=True, progress=False, target=PROFILES[target], **kwargs)  # type: ignore[arg-type]


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference`` in dB."""
    ref = np.asarray(reference, np.float64)
    err = ref - np.asarray(test, np.float64)
    return float(10 * np.log10((ref**2).sum() / max((err**2).sum(), 1e-30)))
