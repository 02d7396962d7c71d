"""Pipeline contracts: in-place declarations enforced, hook errors name the pass, checked mode catches breakage."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers import make_ctx, model_from_text

from onnxq.errors import PassError
from onnxq.pipeline import Pass, PassContext, PassResult, Pipeline, PostconditionError, PreconditionError

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2, 3] x) => (float[2, 3] y) {
    r = Relu(x)
    y = Neg(r)
}
"""


def _graph() -> gs.Graph:
    return gs.import_onnx(model_from_text(TEXT))


class _Noop(Pass):
    name = "noop"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return PassResult(graph, modified=False, counts={"seen": len(graph.nodes)})


class _LiesAboutInPlace(Pass):
    name = "liar"
    in_place = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return PassResult(graph.copy(), modified=True)


class _FunctionalReturnsInput(Pass):
    name = "functional_liar"
    in_place = False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return PassResult(graph, modified=False)


class _BreaksGraph(Pass):
    name = "breaker"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        graph.nodes[0].op = "NoSuchOp"
        return PassResult(graph, modified=True)


class _Crashes(Pass):
    name = "crasher"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise ZeroDivisionError("boom")


class _Hooks(Pass):
    name = "hooked"

    def __init__(self, fail_pre: bool) -> None:
        self.fail_pre = fail_pre

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if self.fail_pre:
            raise ValueError("needs static shapes")

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        raise ValueError("every QDQ pair shares a scale")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return PassResult(graph, modified=False)


def test_runs_in_order_and_records_steps() -> None:
    ctx = make_ctx()
    Pipeline([_Noop(), _Noop()], checked=True).run(_graph(), ctx)
    assert [s.name for s in ctx.report.steps] == ["noop", "noop"]
    assert ctx.report.steps[0].counts == {"seen": 2}


@pytest.mark.parametrize("bad", [_LiesAboutInPlace(), _FunctionalReturnsInput()])
def test_in_place_declaration_is_enforced(bad: Pass) -> None:
    with pytest.raises(PassError, match="in_place"):
        Pipeline([bad]).run(_graph(), make_ctx())


def test_checked_mode_catches_an_invalid_graph() -> None:
    with pytest.raises(PassError, match="breaker"):
        Pipeline([_BreaksGraph()], checked=True).run(_graph(), make_ctx())


def test_crash_names_the_pass_and_what_ran_before() -> None:
    with pytest.raises(PassError, match=r"crasher.*ZeroDivisionError: boom.*passes already run: noop"):
        Pipeline([_Noop(), _Crashes()]).run(_graph(), make_ctx())


def test_hook_errors_name_the_pass() -> None:
    with pytest.raises(PreconditionError, match="hooked.*needs static shapes"):
        Pipeline([_Hooks(fail_pre=True)]).run(_graph(), make_ctx())
    with pytest.raises(PostconditionError, match="hooked.*shares a scale"):
        Pipeline([_Hooks(fail_pre=False)]).run(_graph(), make_ctx())


def test_noop_pipeline_keeps_numerics() -> None:
    from helpers import run_ort

    from onnxq.model import to_model

    g = Pipeline([_Noop()], checked=True).run(_graph(), make_ctx())
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    np.testing.assert_array_equal(run_ort(to_model(g), {"x": x})[0], -np.maximum(x, 0))


def _with_weight(n: int) -> gs.Graph:
    graph = _graph()
    w = gs.Constant("w", np.zeros((n, 2, 3), np.float32))
    out = gs.Variable("z", dtype=np.float32, shape=(n, 2, 3))
    graph.nodes.append(gs.Node("Add", inputs=[graph.outputs[0], w], outputs=[out], name="add"))
    return graph


@pytest.mark.parametrize(("rows", "threshold", "releases"), [(1, 24, 2), (1, 25, 0), (1000, 64 << 20, 0)])
def test_freed_memory_is_given_back_only_for_large_graphs(monkeypatch: pytest.MonkeyPatch, rows: int,
                                                          threshold: int, releases: int) -> None:  # fmt: skip
    """A full garbage collection after each pass costs ~0.1 s in a busy process: only worth it for large weights
    (the [1, 2, 3] float weight is 24 bytes)."""
    import onnxq.pipeline as pipeline

    calls: list[int] = []
    monkeypatch.setattr(pipeline, "RELEASE_MIN_BYTES", threshold)
    monkeypatch.setattr(pipeline, "release", lambda: calls.append(1))
    graph = _with_weight(rows)
    assert pipeline.weight_bytes(graph) == rows * 6 * 4
    Pipeline([_Noop(), _Noop()]).run(graph, make_ctx())
    assert len(calls) == releases
