"""What onnxq promises about the models users bring, and about errors that name the right culprit.

* A file protobuf cannot decode is "truncated or corrupt"; a model that parses but that the onnx checker
  rejects is named as such, with the checker's reason and node, never as a corrupt file. Nodes out of
  topological order (ONNX Runtime runs them) are sorted; a cycle is refused naming a node on it.
* Contrib ops that ONNX Runtime runs (com.microsoft MatMulNBits, SkipSimplifiedLayerNormalization, ...)
  load even where the onnx checker objects (a missing com.microsoft opset import, a standard op newer than
  the installed onnx).
* What onnxq cannot run is refused at load (and by ``quantize_model`` for an in-memory model), in one
  line naming the node, op type and domain, or the opset and the highest one supported, or the tensor:
  an op of an unknown domain, an unknown default-domain op, an opset newer than onnx/onnxruntime, a graph
  with no outputs, a non-tensor graph output (ZipMap), negative or impossibly large input dimensions, an
  IR version newer than onnx reads, duplicate node names, string initializers. ``inspect`` and ``view``
  still show models onnxq cannot quantize.
* ``compare`` checks first that the two models take the same inputs (names, dtypes, ranks) and have
  corresponding outputs, and names the mismatch.
* Names from the model never reach the terminal raw: control characters (escape sequences, newlines,
  bidi overrides) are shown escaped, as ``\\x1b``, in errors, tables, notes, the batch table and log
  lines; a name like ``[bold]`` stays literal.
* ``view`` validates the file as an ONNX model before it starts a server.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

from onnxq.cli import main
from onnxq.errors import ModelLoadError, OnnxqError
from onnxq.evaluate import compare_models
from onnxq.model import load_model

ESC_NAME = "\x1b[31mred\x1b[0m\x1b]0;pwned\x07"


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto] = (), *, opset: int = 17,
           inputs: list[onnx.ValueInfoProto] | None = None, outputs: list[onnx.ValueInfoProto] | None = None,
           domains: tuple[str, ...] = (), ir: int = 8) -> onnx.ModelProto:  # fmt: skip
    """A graph 'x' [1, 4] -> ... -> 'y' [1, 4] (unless given), with the opsets asked for."""
    inputs = inputs if inputs is not None else [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    outputs = outputs if outputs is not None else [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]
    opsets = [oh.make_opsetid("", opset), *(oh.make_opsetid(d, 1) for d in domains)]
    model = oh.make_model(oh.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=opsets)
    model.ir_version = ir
    return model


def _weight(name: str = "W", shape: tuple[int, ...] = (4, 4), seed: int = 0) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).normal(size=shape).astype(np.float32), name)


def _matmul(out: str = "y", name: str = "mm") -> onnx.NodeProto:
    return oh.make_node("MatMul", ["x", "W"], [out], name=name)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def _one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 1, f"exit code {code}, stderr: {err}"
    assert err.startswith("error:") and "Traceback" not in err, err
    text = " ".join(err.split())
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    assert "unexpected" not in text and "report" not in text, text
    return text


def _load_error(path: Path, **kwargs: object) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(path, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


# ------------------------------------------------------------- item 12: the checker is not "corrupt"


def test_a_model_the_checker_rejects_is_named_with_its_reason_and_node_not_called_corrupt(tmp_path: Path) -> None:
    bad = oh.make_node("Softmax", ["x"], ["y"], name="sm", axis="last")  # a STRING where an INT belongs
    msg = _load_error(_save(_model([bad]), tmp_path / "m.onnx"))
    assert "onnx checker" in msg and "node 'sm'" in msg and "'Softmax'" in msg and "axis" in msg
    assert "truncated" not in msg and "corrupt" not in msg


def test_a_file_protobuf_cannot_decode_is_still_called_corrupt(tmp_path: Path) -> None:
    blob = _model([_matmul()], [_weight()]).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(blob[: len(blob) // 2])
    assert "truncated or corrupt" in _load_error(path)


def _llm_block() -> onnx.ModelProto:
    """MatMulNBits (int4, block 16) -> SkipSimplifiedLayerNormalization, as onnxruntime-genai's builder writes them."""
    k, n, block = 16, 8, 16
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(0, 255, (n, k // block, block // 2)).astype(np.uint8), "B"),
             numpy_helper.from_array(np.full(n * k // block, 0.01, np.float32), "S"),
             numpy_helper.from_array(np.ones(n, np.float32), "gamma")]  # fmt: skip
    nodes = [oh.make_node("MatMulNBits", ["x", "B", "S"], ["t"], name="mm", domain="com.microsoft", K=k, N=n, bits=4,
                          block_size=block),
             oh.make_node("SkipSimplifiedLayerNormalization", ["t", "skip", "gamma"], ["y"], name="norm",
                          domain="com.microsoft", epsilon=1e-5)]  # fmt: skip
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, k]),
              oh.make_tensor_value_info("skip", TensorProto.FLOAT, [1, n])]  # fmt: skip
    return _model(nodes, inits, opset=21, inputs=inputs, outputs=[oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], ir=10)


def test_contrib_ops_onnxruntime_runs_load_without_a_com_microsoft_opset_import(tmp_path: Path) -> None:
    model = _llm_block()
    del model.opset_import[1:]  # only ai.onnx is imported: the onnx checker objects, ORT does not
    with pytest.raises(onnx.checker.ValidationError, match="com.microsoft"):
        onnx.checker.check_model(model)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # ORT loads it as it is
    loaded = load_model(_save(model, tmp_path / "llm.onnx"))
    assert [n.op_type for n in loaded.graph.node] == ["MatMulNBits", "SkipSimplifiedLayerNormalization"]
    assert {o.domain for o in loaded.opset_import} == {"", "com.microsoft"}  # the import ORT assumed, added
    code, out, err = _run("inspect", str(tmp_path / "llm.onnx"))
    assert code == 0 and "MatMulNBits" in out, err


def test_a_standard_op_newer_than_onnx_but_known_to_onnxruntime_is_not_blocked(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxq.model_checks as validate_mod

    # onnx does not know "FutureOp"; pretend the installed onnxruntime does (as a newer ORT would)
    real = validate_mod._ort_ops()
    monkeypatch.setattr(validate_mod, "_ort_ops", lambda: {**real, "": {**real[""], "FutureOp": 1}})
    monkeypatch.setattr("onnxq._ort.make_session", lambda *a, **k: None)  # ... and loads the model (validate asks it)
    path = _save(_model([oh.make_node("FutureOp", ["x"], ["y"], name="future")]), tmp_path / "m.onnx")
    assert [n.op_type for n in load_model(path).graph.node] == ["FutureOp"]


def test_an_unknown_default_domain_op_names_node_op_and_opset_not_corruption(tmp_path: Path) -> None:
    nodes = [_matmul("t"), oh.make_node("Frobnicate", ["t"], ["y"], name="frob")]
    msg = _load_error(_save(_model(nodes, [_weight()]), tmp_path / "m.onnx"), runnable=False)
    assert "node 'frob'" in msg and "'Frobnicate'" in msg and "ai.onnx opset 17" in msg
    assert "corrupt" not in msg


def test_nodes_out_of_topological_order_are_sorted_not_called_corrupt(tmp_path: Path) -> None:
    nodes = [oh.make_node("Relu", ["t"], ["y"], name="relu"), _matmul("t")]  # the consumer first: ORT runs it
    model = _model(nodes, [_weight()])
    x = np.random.default_rng(0).uniform(-0.5, 0.5, size=(1, 4)).astype(np.float32)  # inside the calibrated range
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    path = _save(model, tmp_path / "m.onnx")
    assert [n.name for n in load_model(path).graph.node] == ["mm", "relu"]
    code, _, err = _run("quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", "random:8", "--no-progress")
    assert code == 0, err
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=0.1 * float(np.abs(want).max()))


def test_a_cycle_is_refused_naming_a_node_on_it(tmp_path: Path) -> None:
    nodes = [oh.make_node("Relu", ["b"], ["a"], name="r1"), oh.make_node("Relu", ["a"], ["b"], name="r2"), _matmul()]
    msg = _load_error(_save(_model(nodes, [_weight()]), tmp_path / "m.onnx"), runnable=False)
    assert "cycle through node 'r1'" in msg and "corrupt" not in msg


# ------------------------------------------------------------- item 12: refused up front, at load


def test_an_op_of_an_unknown_domain_is_refused_at_load_naming_node_op_and_domain(tmp_path: Path) -> None:
    nodes = [_matmul("t"), oh.make_node("Frob", ["t"], ["y"], name="frob", domain="com.example")]
    path = _save(_model(nodes, [_weight()], domains=("com.example",)), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    code, _, err = _run("quantize", str(path), "-o", str(out), "--calib", "random:2", "--no-progress")
    _one_line_error(code, err, "node 'frob'", "'Frob'", "domain 'com.example'", "custom domain", "ONNX Runtime")
    assert not out.exists()
    code, stdout, _ = _run("inspect", str(path))  # still shown
    assert code == 0 and "com.example.Frob" in stdout


def test_the_library_refuses_an_in_memory_model_it_cannot_run_before_any_work() -> None:
    from onnxq.quantization import quantize_model
    from onnxq.recipe import preset

    nodes = [_matmul("t"), oh.make_node("Frob", ["t"], ["y"], name="frob", domain="com.example")]
    with pytest.raises(ModelLoadError, match="the model: node 'frob'.*'com.example'"):
        quantize_model(_model(nodes, [_weight()], domains=("com.example",)), preset("w8a8"))


def test_an_op_onnxruntime_lacks_in_com_microsoft_is_refused(tmp_path: Path) -> None:
    nodes = [_matmul("t"), oh.make_node("NoSuchContribOp", ["t"], ["y"], name="nope", domain="com.microsoft")]
    msg = _load_error(_save(_model(nodes, [_weight()], domains=("com.microsoft",)), tmp_path / "m.onnx"))
    assert "node 'nope'" in msg and "'NoSuchContribOp'" in msg and "'com.microsoft'" in msg
    assert "does not implement" in msg


def test_an_opset_newer_than_onnx_and_onnxruntime_is_refused_with_the_highest_supported(tmp_path: Path) -> None:
    from onnxq.model_checks import highest_opset

    path = _save(_model([_matmul()], [_weight()], opset=99), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    code, _, err = _run("quantize", str(path), "-o", str(out), "--calib", "random:2", "--no-progress")
    top = highest_opset("")
    assert top == min(onnx.defs.onnx_opset_version(), 99) and top >= 21
    _one_line_error(code, err, "ai.onnx opset 99", f"up to opset {top}", f"opset {top} or lower")
    assert not out.exists()


def test_a_graph_with_no_outputs_is_refused_at_load(tmp_path: Path) -> None:
    path = _save(_model([_matmul()], [_weight()], outputs=[]), tmp_path / "m.onnx")
    code, _, err = _run("quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", "random:2", "--no-progress")
    _one_line_error(code, err, "the graph has no outputs")


def test_a_non_tensor_graph_output_is_refused_naming_it(tmp_path: Path) -> None:
    zipmap = oh.make_node("ZipMap", ["y"], ["probs"], name="zipmap", domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2, 3])
    seq = oh.make_sequence_type_proto(oh.make_map_type_proto(TensorProto.INT64, oh.make_tensor_type_proto(TensorProto.FLOAT, [])))
    model = _model([_matmul(), zipmap], [_weight()], domains=("ai.onnx.ml",),
                   outputs=[oh.make_value_info("probs", seq), oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])  # fmt: skip
    code, _, err = _run("quantize", str(_save(model, tmp_path / "m.onnx")), "-o", str(tmp_path / "q.onnx"), "--calib",
                        "random:2", "--no-progress")  # fmt: skip
    _one_line_error(code, err, "graph output 'probs' is a sequence, not a tensor", "zipmap")


def test_a_graph_input_without_shape_is_named(tmp_path: Path) -> None:
    inputs = [oh.make_tensor_value_info("pixels", TensorProto.FLOAT, None)]
    model = _model([oh.make_node("MatMul", ["pixels", "W"], ["y"], name="mm")], [_weight()], inputs=inputs)
    msg = _load_error(_save(model, tmp_path / "m.onnx"), runnable=False)
    assert "graph input 'pixels'" in msg and "without a shape" in msg and "corrupt" not in msg


@pytest.mark.parametrize("dim", [-3, -1])
def test_a_negative_input_dimension_is_refused_naming_the_input(tmp_path: Path, dim: int) -> None:
    inputs = [oh.make_tensor_value_info("pixels", TensorProto.FLOAT, [dim, 4])]
    nodes = [oh.make_node("MatMul", ["pixels", "W"], ["y"], name="mm")]
    path = _save(_model(nodes, [_weight()], inputs=inputs), tmp_path / "m.onnx")
    code, _, err = _run("quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", "random:2", "--no-progress")
    _one_line_error(code, err, "'pixels'", f"[{dim}, 4]", "cannot be negative")


def test_a_huge_input_dimension_is_refused_naming_the_input(tmp_path: Path) -> None:
    inputs = [oh.make_tensor_value_info("pixels", TensorProto.FLOAT, [10**12, 4])]
    nodes = [oh.make_node("MatMul", ["pixels", "W"], ["y"], name="mm")]
    path = _save(_model(nodes, [_weight()], inputs=inputs), tmp_path / "m.onnx")
    code, _, err = _run("quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", "random:2", "--no-progress")
    _one_line_error(code, err, "graph input 'pixels'", "[1000000000000, 4]", "named (dynamic) dimension")


def test_an_ir_version_newer_than_onnx_reads_is_named(tmp_path: Path) -> None:
    path = _save(_model([_matmul()], [_weight()], ir=onnx.IR_VERSION + 1), tmp_path / "m.onnx")
    msg = _load_error(path, runnable=False)
    assert f"IR version {onnx.IR_VERSION + 1}" in msg and "upgrade onnx" in msg


def test_duplicate_node_names_are_refused_naming_the_name(tmp_path: Path) -> None:
    nodes = [_matmul("t", "layer"), oh.make_node("MatMul", ["t", "W"], ["y"], name="layer")]
    path = _save(_model(nodes, [_weight()]), tmp_path / "m.onnx")
    code, _, err = _run("quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", "random:2", "--no-progress")
    _one_line_error(code, err, "two nodes", "named 'layer'", "unique names")


def test_a_string_initializer_is_refused_naming_it_and_inspect_still_shows_the_model(tmp_path: Path) -> None:
    labels = oh.make_tensor("labels", TensorProto.STRING, [2], [b"cat", b"dog"])
    nodes = [_matmul(), oh.make_node("Identity", ["labels"], ["names"], name="id")]
    outputs = [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
               oh.make_tensor_value_info("names", TensorProto.STRING, [2])]  # fmt: skip
    path = _save(_model(nodes, [_weight(), labels], outputs=outputs), tmp_path / "m.onnx")
    code, _, err = _run("quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", "random:2", "--no-progress")
    _one_line_error(code, err, "initializer 'labels' holds strings")
    assert _run("inspect", str(path))[0] == 0


def test_random_calibration_of_a_string_input_says_strings(tmp_path: Path) -> None:
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]), oh.make_tensor_value_info("s", TensorProto.STRING, [2])]
    outputs = [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]), oh.make_tensor_value_info("s2", TensorProto.STRING, [2])]
    nodes = [_matmul(), oh.make_node("Identity", ["s"], ["s2"], name="id")]
    path = _save(_model(nodes, [_weight()], inputs=inputs, outputs=outputs), tmp_path / "m.onnx")
    code, _, err = _run("quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", "random:2", "--no-progress")
    _one_line_error(code, err, "input 's' holds strings", "--calib files")


# ------------------------------------------------------------- item 12: compare on unrelated models


def _compare(tmp_path: Path, a: onnx.ModelProto, b: onnx.ModelProto) -> tuple[int, str, str]:
    fa, fb = _save(a, tmp_path / "float.onnx"), _save(b, tmp_path / "other.onnx")
    return _run("compare", str(fa), str(fb), "--calib", "random:2", "--no-latency")


def test_compare_refuses_models_with_different_inputs_naming_them(tmp_path: Path) -> None:
    other = _model([oh.make_node("MatMul", ["a", "W"], ["y"], name="mm")], [_weight()],
                   inputs=[oh.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])])  # fmt: skip
    code, _, err = _compare(tmp_path, _model([_matmul()], [_weight()]), other)
    _one_line_error(code, err, "different inputs", "float: x", "quantized: a")


def test_compare_refuses_an_input_of_another_dtype_or_rank(tmp_path: Path) -> None:
    other = _model([oh.make_node("Cast", ["x"], ["y"], name="c", to=TensorProto.FLOAT)],
                   inputs=[oh.make_tensor_value_info("x", TensorProto.INT64, [1, 4])])  # fmt: skip
    code, _, err = _compare(tmp_path, _model([_matmul()], [_weight()]), other)
    _one_line_error(code, err, "input 'x' is float32 of rank 2 in the float model but int64 of rank 2")


def test_compare_refuses_models_whose_outputs_do_not_correspond(tmp_path: Path) -> None:
    two = [oh.make_tensor_value_info("p", TensorProto.FLOAT, [1, 4]), oh.make_tensor_value_info("q", TensorProto.FLOAT, [1, 4])]
    other = _model([oh.make_node("MatMul", ["x", "W"], ["p"], name="mm"), oh.make_node("Relu", ["p"], ["q"], name="r")],
                   [_weight()], outputs=two)  # fmt: skip
    code, _, err = _compare(tmp_path, _model([_matmul()], [_weight()]), other)
    _one_line_error(code, err, "different outputs", "float: y", "quantized: p, q")


def test_compare_refuses_outputs_of_different_shapes_naming_the_output(tmp_path: Path) -> None:
    narrow = _model([oh.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [_weight(shape=(4, 3))],
                    outputs=[oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])  # fmt: skip
    code, _, err = _compare(tmp_path, _model([_matmul()], [_weight()]), narrow)
    _one_line_error(code, err, "output 'y' has shape [1, 4] in the float model but [1, 3]")


# ------------------------------------------------------------- item 13: escape sequences never reach the terminal


def test_printable_escapes_control_characters_and_keeps_other_text() -> None:
    from onnxq.text import markup_safe, printable

    assert printable(ESC_NAME) == "\\x1b[31mred\\x1b[0m\\x1b]0;pwned\\x07"
    assert printable("line\nforged\r\u202eevil\x9b") == "line\\nforged\\r\\u202eevil\\x9b"
    assert printable("conv_1/Relu:0 é 中文") == "conv_1/Relu:0 é 中文"
    assert markup_safe("[bold]\x1b") == "\\[bold]\\x1b"


def _escaped_model() -> onnx.ModelProto:
    """Input, output, node and initializer names that carry terminal escape sequences."""
    x, y, w = "in" + ESC_NAME, "out" + ESC_NAME, "w" + ESC_NAME
    nodes = [oh.make_node("MatMul", [x, w], [y], name="mm" + ESC_NAME)]
    return _model(nodes, [_weight(w)], inputs=[oh.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4])],
                  outputs=[oh.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4])])  # fmt: skip


def _no_raw_controls(*texts: str) -> None:
    for text in texts:
        assert "\x1b" not in text and "\x07" not in text, repr(text)


def test_inspect_and_compare_show_escaped_names(tmp_path: Path) -> None:
    path = _save(_escaped_model(), tmp_path / "m.onnx")
    code, out, err = _run("inspect", str(path))
    assert code == 0, err
    _no_raw_controls(out, err)
    assert "\\x1b]0;pwned\\x07" in out
    quant = tmp_path / "q.onnx"
    code, out, err = _run("quantize", str(path), "-o", str(quant), "--calib", "random:2", "--no-progress")
    assert code == 0, err
    _no_raw_controls(out, err)
    code, out, err = _run("compare", str(path), str(quant), "--calib", "random:2", "--no-latency")
    assert code == 0, err
    _no_raw_controls(out, err)
    assert "out\\x1b[31mred" in out


def test_error_messages_show_escaped_names(tmp_path: Path) -> None:
    escaped = _escaped_model()
    other = _escaped_model()  # two outputs, neither named like the float model's one
    other.graph.node.append(oh.make_node("Relu", ["out" + ESC_NAME], ["relu" + ESC_NAME], name="relu"))
    other.graph.output[0].name = "relu" + ESC_NAME
    other.graph.output.append(oh.make_tensor_value_info("out" + ESC_NAME, TensorProto.FLOAT, [1, 4]))
    other.graph.output[1].name = "second" + ESC_NAME
    other.graph.node.append(oh.make_node("Neg", ["out" + ESC_NAME], ["second" + ESC_NAME], name="neg"))
    code, out, err = _compare(tmp_path, escaped, other)
    _no_raw_controls(out, err)
    _one_line_error(code, err, "different outputs", "float: out\\x1b[31mred", "quantized: relu\\x1b[31mred")


def test_quantize_summary_notes_are_printed_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    from onnxq.cli import _print_quantize_summary
    from onnxq.report import Report

    report = Report()
    report.note(f"node {ESC_NAME} left in float [bold]")
    _print_quantize_summary(report, Path("q.onnx"))
    out = capsys.readouterr().out
    _no_raw_controls(out)
    assert "\\x1b]0;pwned\\x07 left in float [bold]" in out


def test_the_batch_table_shows_model_names_and_reasons_escaped_and_literal(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxq.batch
    from onnxq.batch import JobOutcome

    name = "x[bold]" + ESC_NAME  # a file name: "[bold]" must not turn into markup, ESC must not reach the terminal
    (tmp_path / "in").mkdir()
    _save(_model([_matmul()], [_weight()]), tmp_path / "in" / f"{name}.onnx")
    failed = JobOutcome(name, "m.onnx", "o.onnx", "failed", reason=f"node {ESC_NAME} [/] broke")
    monkeypatch.setattr(onnxq.batch, "run_batch", lambda jobs, outdir, **kw: [failed])
    code, out, err = _run("batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert code == 1, err
    _no_raw_controls(out, err)
    flat = "".join(out.split())
    assert "x[bold]\\x1b[31mred" in flat and "[/]broke" in flat


def test_log_lines_show_escaped_names() -> None:
    from onnxq.text import PrintableFormatter

    record = logging.LogRecord("onnxq.passes.x", logging.WARNING, __file__, 1, "node %s kept", (ESC_NAME,), None)
    line = PrintableFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line == "WARNING onnxq.passes.x: node \\x1b[31mred\\x1b[0m\\x1b]0;pwned\\x07 kept"


# ------------------------------------------------------------- item 13: view validates before serving


@pytest.mark.parametrize("content", [b"this is a text file, not a model\n", b"\x08\x08\x12\x05hello"])
def test_view_refuses_a_file_that_is_not_a_model_before_serving(tmp_path: Path, content: bytes) -> None:
    from onnxq.view import serve, stop

    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    try:
        address = serve(path, port=0)
    except ModelLoadError as exc:
        assert str(path) in str(exc) and ("not an ONNX model" in str(exc) or "truncated or corrupt" in str(exc))
    else:
        stop(address)
        pytest.fail(f"view served {path}, which is not an ONNX model, at {address}")
    code, _, err = _run("view", str(path), "--port", "0")
    _one_line_error(code, err, str(path))


def test_view_refuses_a_model_that_does_not_pass_the_checks(tmp_path: Path) -> None:
    from onnxq.view import serve

    bad = _model([oh.make_node("MatMul", ["x", "nowhere"], ["y"], name="mm")])
    with pytest.raises(ModelLoadError, match="undefined tensor 'nowhere'"):
        serve(_save(bad, tmp_path / "m.onnx"), port=0)


# ------------------------------------------------------------- relatives that already hold (kept as promises)


def test_a_model_with_an_if_subgraph_quantizes_and_still_runs(tmp_path: Path) -> None:
    then_g = oh.make_graph([oh.make_node("MatMul", ["x", "W2"], ["a"], name="inner_mm")], "then", [],
                           [oh.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])])  # fmt: skip
    else_g = oh.make_graph([oh.make_node("Relu", ["x"], ["b"], name="inner_relu")], "else", [],
                           [oh.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])])  # fmt: skip
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [_matmul("t"), oh.make_node("If", ["cond"], ["u"], name="if", then_branch=then_g, else_branch=else_g),
             oh.make_node("Add", ["t", "u"], ["y"], name="add")]  # fmt: skip
    path = _save(_model(nodes, [_weight(), _weight("W2", seed=1), cond]), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    code, _, err = _run("quantize", str(path), "-o", str(out), "--calib", "random:16", "--no-progress")
    assert code == 0, err
    x = np.random.default_rng(2).uniform(-0.5, 0.5, size=(1, 4)).astype(np.float32)  # inside the calibrated range
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, atol=0.05 * float(np.abs(ref).max()))


@pytest.mark.parametrize("coordinates", [False, True])
def test_a_sparse_weight_is_quantized_from_its_values_not_as_zeros(tmp_path: Path, coordinates: bool) -> None:
    dense = np.zeros((4, 4), np.float32)
    dense[0, 0], dense[1, 1], dense[3, 2] = 0.5, -1.0, 2.0
    flat = np.flatnonzero(dense)
    idx = np.stack(np.unravel_index(flat, dense.shape), axis=1) if coordinates else flat
    sparse = oh.make_sparse_tensor(numpy_helper.from_array(dense.reshape(-1)[flat], "W"),
                                   numpy_helper.from_array(idx.astype(np.int64), "W_idx"), [4, 4])  # fmt: skip
    model = _model([_matmul()])
    model.graph.sparse_initializer.append(sparse)
    path, out = _save(model, tmp_path / "m.onnx"), tmp_path / "q.onnx"
    code, stdout, err = _run("quantize", str(path), "-o", str(out), "--calib", "random:8", "--no-progress")
    assert code == 0 and "sparse initializers were made dense" in stdout, err
    x = np.random.default_rng(0).uniform(-0.5, 0.5, size=(1, 4)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ dense, atol=0.02)


def test_a_float64_model_is_left_as_it_is_with_a_note_saying_why(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 4)), "W")
    model = _model([_matmul()], [w], inputs=[oh.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 4])],
                   outputs=[oh.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 4])])  # fmt: skip
    path, out = _save(model, tmp_path / "m.onnx"), tmp_path / "q.onnx"
    code, stdout, err = _run("quantize", str(path), "-o", str(out), "--calib", "random:2", "--no-progress")
    assert code == 0, err
    assert "nothing was quantized: the model computes in float64" in " ".join(stdout.split())
    x = np.ones((1, 4))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ numpy_helper.to_array(w))


@pytest.mark.parametrize("kind", ["directory", "empty", "text"])
def test_compare_and_inspect_name_a_path_that_is_not_a_model(tmp_path: Path, kind: str) -> None:
    good = _save(_model([_matmul()], [_weight()]), tmp_path / "good.onnx")
    bad = tmp_path / "bad.onnx"
    if kind == "directory":
        bad.mkdir()
    else:
        bad.write_text("" if kind == "empty" else "not a model\n")
    why = {"directory": "is a directory", "empty": "is empty", "text": "is not an ONNX model"}[kind]
    _one_line_error(*_run("inspect", str(bad))[::2], why)
    _one_line_error(*_run("compare", str(good), str(bad), "--calib", "random:2")[::2], why)


def test_compare_models_refuses_unrelated_models_in_the_library_too() -> None:
    a = _model([_matmul()], [_weight()])
    b = _model([oh.make_node("MatMul", ["a", "W"], ["y"], name="mm")], [_weight()],
               inputs=[oh.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])])  # fmt: skip
    with pytest.raises(OnnxqError, match="different inputs"):
        compare_models(a, b, [{"x": np.zeros((1, 4), np.float32)}], latency=False)


# ------------------------------------------------------------- fuzzing: odd models never leak an internal error

_DOMAINS = st.sampled_from(["", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.example", "my.fn"])
_OPS = st.sampled_from(["Relu", "MatMul", "FastGelu", "ZipMap", "Frob", "", "Gelu", "MatMulNBits", "Double"])


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=_OPS, domain=_DOMAINS, opset=st.sampled_from([1, 7, 13, 17, 21, 28, 29, 99]),
       dims=st.lists(st.sampled_from([-5, -1, 0, 1, 4, 10**6, 10**12]), min_size=0, max_size=3),
       outputs=st.booleans(), import_domain=st.booleans(), name=st.sampled_from(["n", "", ESC_NAME, "a\nb"]),
       runnable=st.booleans())  # fmt: skip
def test_odd_models_load_or_give_one_line_naming_the_culprit(tmp_path: Path, op: str, domain: str, opset: int,
                                                            dims: list[int], outputs: bool, import_domain: bool,
                                                            name: str, runnable: bool) -> None:  # fmt: skip
    node = oh.make_node(op, ["x"], ["y"], name=name, domain=domain)
    fn = oh.make_function("my.fn", "Double", ["a"], ["b"], [oh.make_node("Add", ["a", "a"], ["b"])], [oh.make_opsetid("", 17)])
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, dims)]
    outs = [oh.make_tensor_value_info("y", TensorProto.FLOAT, dims)] if outputs else []
    domains = (domain,) if import_domain and domain not in ("", "ai.onnx") else ()
    model = _model([node], inputs=inputs, outputs=outs, opset=opset, domains=domains)
    model.functions.append(fn)
    path = _save(model, tmp_path / "m.onnx")
    try:
        load_model(path, runnable=runnable)
    except ModelLoadError as exc:
        msg = str(exc)
        assert str(path) in msg and "\n" not in msg and "\x1b" not in msg, msg
        assert "corrupt" not in msg, msg  # the file parsed: whatever is wrong, it is not corruption


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text())
def test_printable_never_lets_a_control_character_through(text: str) -> None:
    import unicodedata

    from onnxq.text import printable

    shown = printable(text)
    assert not any(unicodedata.category(c) == "Cc" or c in "\u202e\u2066\u2028" for c in shown)
    if not any(unicodedata.category(c) == "Cc" or unicodedata.category(c) in ("Zl", "Zp") or "\u202a" <= c <= "\u202e"
               or "\u2066" <= c <= "\u2069" or c in "\u061c\u200e\u200f" for c in text):
        assert shown == text
