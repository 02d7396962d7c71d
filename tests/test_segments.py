"""weightonly.segments.SegmentRunner: waves of weight MatMuls and their inputs, checked against a full-model
run (tiny llama-like decoder built here, and stories260K); one execution of every node; only the tensors
live at the cut are held; sequential semantics (a weight changed after its wave changes what later waves
see); missing calibration inputs are named. The module a wave opens (q/k/v -> o_proj, gate/up ->
down_proj) and the probe that computes its output with other weights, against the full model.

``tiny_llama`` and ``ListSource`` are also used by ``tests/test_weight_only.py``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import asset
from helpers import run_ort
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibration.sources import CalibrationSource
from onnxq.errors import CalibrationError
from onnxq.passes.weight_only import _weight_matmul
from onnxq.weightonly.segments import SegmentRunner, _specialise

PROVIDERS = ["CPUExecutionProvider"]
VOCAB = 64


# ------------------------------------------------------------------------------------------ the models


def tiny_llama(
    dim: int = 32, ffn: int = 64, vocab: int = VOCAB, layers: int = 2, seed: int = 0, attn_bias: bool = False
) -> onnx.ModelProto:
    """A llama-like decoder (opset 17): ``input_ids`` int64 [1, seq] -> Gather embedding -> ``layers`` x
    (RMSNorm as Pow/ReduceMean/Add/Sqrt/Div/Mul(weight); q/k/v_proj from one normed input; single-head
    attention MatMul/Softmax/MatMul; o_proj; residual Add; RMSNorm; SwiGLU gate/up/down_proj; residual Add)
    -> final RMSNorm -> ``lm_head`` -> ``logits`` [1, seq, vocab].

    Node names: ``layers.{i}/q_proj`` ..., ``lm_head``; weights ``layers.{i}.wq`` ..., norm weights
    ``layers.{i}/attn_norm.weight``, ``layers.{i}/mlp_norm.weight``, ``final_norm.weight``; the norm outputs
    are ``<norm>/out``, attention output ``layers.{i}/attn``, MLP product ``layers.{i}/act``. With
    ``attn_bias`` a second input ``attn_bias`` [1, seq, seq] is added to the attention scores.
    """
    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {}
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: object) -> str:
        inits[name] = np.asarray(value, np.float32)
        return name

    def op(op_type: str, ins: list[str], out: str, name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op_type, ins, [out], name=name, **attrs))
        return out

    def weight(name: str, k: int, n: int) -> str:
        return const(name, rng.normal(size=(k, n)) / np.sqrt(k))

    def rmsnorm(x: str, p: str) -> str:
        g = const(f"{p}.weight", rng.uniform(0.2, 2.0, dim))  # uneven channel gains, as real norms have
        s = op("Pow", [x, "two"], f"{p}/pow", f"{p}/Pow")
        s = op("ReduceMean", [s], f"{p}/mean", f"{p}/ReduceMean", axes=[-1], keepdims=1)
        s = op("Add", [s, "eps"], f"{p}/add", f"{p}/Add")
        s = op("Sqrt", [s], f"{p}/sqrt", f"{p}/Sqrt")
        s = op("Div", [x, s], f"{p}/div", f"{p}/Div")
        return op("Mul", [s, g], f"{p}/out", f"{p}/Mul")

    const("two", 2.0)
    const("eps", 1e-5)
    const("attn_scale", 1.0 / np.sqrt(dim))
    x = op("Gather", [const("embed.weight", rng.normal(size=(vocab, dim))), "input_ids"], "embed/out", "embed/Gather")
    for i in range(layers):
        p = f"layers.{i}"
        h = rmsnorm(x, f"{p}/attn_norm")
        q = op("MatMul", [h, weight(f"{p}.wq", dim, dim)], f"{p}/q", f"{p}/q_proj")
        k = op("MatMul", [h, weight(f"{p}.wk", dim, dim)], f"{p}/k", f"{p}/k_proj")
        v = op("MatMul", [h, weight(f"{p}.wv", dim, dim)], f"{p}/v", f"{p}/v_proj")
        kt = op("Transpose", [k], f"{p}/kt", f"{p}/Transpose", perm=[0, 2, 1])
        s = op("MatMul", [q, kt], f"{p}/scores", f"{p}/qk")
        s = op("Mul", [s, "attn_scale"], f"{p}/scaled", f"{p}/scale")
        if attn_bias:
            s = op("Add", [s, "attn_bias"], f"{p}/biased", f"{p}/bias")
        probs = op("Softmax", [s], f"{p}/probs", f"{p}/Softmax", axis=-1)
        a = op("MatMul", [probs, v], f"{p}/attn", f"{p}/pv")
        o = op("MatMul", [a, weight(f"{p}.wo", dim, dim)], f"{p}/o", f"{p}/o_proj")
        x = op("Add", [x, o], f"{p}/res1", f"{p}/Add_1")
        h = rmsnorm(x, f"{p}/mlp_norm")
        g = op("MatMul", [h, weight(f"{p}.wg", dim, ffn)], f"{p}/gate", f"{p}/gate_proj")
        u = op("MatMul", [h, weight(f"{p}.wu", dim, ffn)], f"{p}/up", f"{p}/up_proj")
        sig = op("Sigmoid", [g], f"{p}/sig", f"{p}/Sigmoid")
        silu = op("Mul", [g, sig], f"{p}/silu", f"{p}/SiLU")
        m = op("Mul", [silu, u], f"{p}/act", f"{p}/Mul_act")
        d = op("MatMul", [m, weight(f"{p}.wd", ffn, dim)], f"{p}/down", f"{p}/down_proj")
        x = op("Add", [x, d], f"{p}/res2", f"{p}/Add_2")
    h = rmsnorm(x, "final_norm")
    op("MatMul", [h, weight("lm_head.weight", dim, vocab)], "logits", "lm_head")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])]
    if attn_bias:
        inputs.append(helper.make_tensor_value_info("attn_bias", TensorProto.FLOAT, [1, "seq", "seq"]))
    graph = helper.make_graph(
        nodes, "tiny_llama", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", vocab])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


class ListSource(CalibrationSource):
    """Calibration samples given as a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def describe(self) -> str:
        return f"{len(self.feeds)} test feeds"


def token_feeds(lengths: list[int], seed: int = 0, vocab: int = VOCAB) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, vocab, (1, n)).astype(np.int64)} for n in lengths]


# ------------------------------------------------------------------------------------------- helpers


def _runner(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> SegmentRunner:
    graph = gs.import_onnx(model)
    targets = [n for n in graph.nodes if _weight_matmul(n)]
    return SegmentRunner(graph, targets, ListSource(feeds), providers=PROVIDERS)


def _full(model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """``names`` computed by the whole model (added as graph outputs), one array per feed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have)
    outs = [o.name for o in m.graph.output]
    runs = [dict(zip(outs, run_ort(m, feed))) for feed in feeds]
    return {n: [r[n] for r in runs] for n in names}


def _live_at(runner: SegmentRunner, cut: int) -> set[str]:
    """Tensors produced before ``cut`` (or graph inputs) that a node at or after ``cut`` or a graph output reads."""
    order = runner.order
    before = {t.name for t in runner.graph.inputs} | {t.name for n in order[:cut] for t in n.outputs}
    after = {t.name for n in order[cut:] for t in n.inputs if isinstance(t, gs.Variable)}
    return before & (after | {t.name for t in runner.graph.outputs})


def _walk(runner: SegmentRunner, monkeypatch: pytest.MonkeyPatch) -> tuple[list, list[list[int]]]:
    """Iterate every wave; return [(node names, {input: stored arrays}, store keys, live set)] and the nodes
    (by id) of every segment model the runner built."""
    segments: list[list[int]] = []
    build = SegmentRunner._segment_model

    def spy(self: SegmentRunner, nodes: list[gs.Node], feeds: list[str], outputs: list[str], *rest: object) -> onnx.ModelProto:
        segments.append([id(n) for n in nodes])
        return build(self, nodes, feeds, outputs, *rest)

    monkeypatch.setattr(SegmentRunner, "_segment_model", spy)
    waves = []
    for wave in runner.waves():
        waves.append(([n.name for n in wave.nodes], dict(wave.inputs), set(runner.store), _live_at(runner, runner.cut)))
    return waves, segments


def _check_inputs_match(waves: list, reference: dict[str, list[np.ndarray]]) -> None:
    for names, inputs, _, _ in waves:
        for x, got in inputs.items():
            for i, (a, b) in enumerate(zip(got, reference[x], strict=True)):
                assert a.shape == b.shape, f"{x} sample {i}: {a.shape} vs {b.shape}"
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"wave {names}: input {x} sample {i}")


def _check_each_node_runs_once(runner: SegmentRunner, segments: list[list[int]], n_waves: int) -> None:
    """One segment per wave, and together they execute every node before the last cut exactly once."""
    assert runner.segments_run == len(segments) == n_waves
    ran = [i for seg in segments for i in seg]
    assert len(ran) == len(set(ran)), "a node was executed in two segments"
    assert set(ran) == {id(n) for n in runner.order[: runner.cut]}


# ---------------------------------------------------------------------------------------- tiny model

TINY_WAVES = [
    [f"layers.{i}/{p}" for p in group]
    for i in range(2)
    for group in (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
] + [["lm_head"]]


def test_tiny_waves_match_the_full_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Untouched weights: every wave's stored input is what the whole model computes (samples of several
    lengths), q/k/v and gate/up come in one wave, one segment per wave, and the store holds only live tensors."""
    model = tiny_llama()
    feeds = token_feeds([8, 11, 5])
    runner = _runner(model, feeds)
    assert runner.samples == 3
    waves, segments = _walk(runner, monkeypatch)
    assert [w[0] for w in waves] == TINY_WAVES
    inputs = [list(w[1]) for w in waves]
    assert inputs[0] == ["layers.0/attn_norm/out"] and inputs[1] == ["layers.0/attn"]
    assert inputs[2] == ["layers.0/mlp_norm/out"] and inputs[3] == ["layers.0/act"] and inputs[-1] == ["final_norm/out"]
    _check_inputs_match(waves, _full(model, [x for w in waves for x in w[1]], feeds))
    _check_each_node_runs_once(runner, segments, len(TINY_WAVES))
    for names, _, held, live in waves:
        assert held == live, f"at wave {names}: holds {sorted(held - live)} beyond the live set, misses {sorted(live - held)}"
    # at the last cut (lm_head) only the final norm's output is live: no residual stream, no input_ids
    assert set(runner.store) == {"final_norm/out"}
    assert runner.cut == runner.index[id(next(n for n in runner.order if n.name == "lm_head"))]


def test_changing_a_weight_after_its_wave_changes_the_next_waves() -> None:
    """Sequential semantics: q_proj of layer 0 zeroed after the first wave (as a quantizer edits weights in
    place) -> every later wave sees what the modified model computes, not what the original one does."""
    model = tiny_llama()
    feeds = token_feeds([9, 12])
    runner = _runner(model, feeds)
    waves = runner.waves()
    first = next(waves)
    q = next(n for n in first.nodes if n.name == "layers.0/q_proj")
    q.inputs[1].values = np.zeros_like(q.inputs[1].values)
    later = [(list(w.inputs), {k: list(v) for k, v in w.inputs.items()}) for w in waves]
    assert len(later) == len(TINY_WAVES) - 1

    modified = onnx.ModelProto()
    modified.CopyFrom(model)
    wq = next(t for t in modified.graph.initializer if t.name == "layers.0.wq")
    wq.CopyFrom(numpy_helper.from_array(np.zeros((32, 32), np.float32), "layers.0.wq"))
    names = [x for names, _ in later for x in names]
    new, old = _full(modified, names, feeds), _full(model, names, feeds)
    for _, inputs in later:
        for x, got in inputs.items():
            for a, b, o in zip(got, new[x], old[x], strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=x)
                assert not np.allclose(a, o, atol=1e-3), f"{x} did not change when q_proj was zeroed"


def test_a_weight_replaced_by_a_new_constant_after_its_wave() -> None:
    """What the weight_only pass does when a weight is shared: the quantized values go into a new Constant.
    The next segment must compute with it (it is a constant, not a calibration input)."""
    model = tiny_llama()
    feeds = token_feeds([7])
    runner = _runner(model, feeds)
    waves = runner.waves()
    q = next(n for n in next(waves).nodes if n.name == "layers.0/q_proj")
    q.inputs[1] = gs.Constant("layers.0.wq_quantized", np.zeros((32, 32), np.float32))
    got = next(waves).inputs["layers.0/attn"]
    modified = onnx.ModelProto()
    modified.CopyFrom(model)
    wq = next(t for t in modified.graph.initializer if t.name == "layers.0.wq")
    wq.CopyFrom(numpy_helper.from_array(np.zeros((32, 32), np.float32), "layers.0.wq"))
    np.testing.assert_allclose(got[0], _full(modified, ["layers.0/attn"], feeds)["layers.0/attn"][0], rtol=1e-5, atol=1e-5)


def test_an_input_the_samples_do_not_provide_is_named() -> None:
    """attn_bias is a model input the token samples lack: the segment that reads it raises, naming it."""
    model = tiny_llama(attn_bias=True)
    runner = _runner(model, token_feeds([6]))
    waves = runner.waves()
    assert [n.name for n in next(waves).nodes] == TINY_WAVES[0]  # q/k/v do not need it
    with pytest.raises(CalibrationError, match=r"needs \['attn_bias'\].*calibration samples do not provide"):
        next(waves)


def test_a_weight_matmul_reading_a_missing_input_is_named() -> None:
    """The first MatMul reads graph input 'x' directly; samples hold only 'ids': the error names 'x' and the node."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Cast", ["ids"], ["idf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Add", ["h", "idf"], ["h2"], name="add"),
        helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2"),
    ]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]), helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w2")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    runner = _runner(model, [{"ids": np.ones((2, 1), np.int64)}])
    with pytest.raises(CalibrationError, match=r"activation 'x' of 'fc1' was not computed"):
        next(runner.waves())


def test_samples_with_unknown_inputs_or_no_samples_are_refused() -> None:
    model = tiny_llama()
    with pytest.raises(CalibrationError, match=r"inputs the model does not: \['mask'\]"):
        _runner(model, [{"input_ids": np.zeros((1, 4), np.int64), "mask": np.ones((1, 4), np.int64)}])
    with pytest.raises(CalibrationError, match="yielded no samples"):
        _runner(model, [])


# ------------------------------------------------------------------------------- modules and probes


def _with(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(np.asarray(weights[t.name], np.float32), t.name))
    return out


@pytest.mark.parametrize("attn_bias", [False, True])
def test_module_outputs_of_each_wave(attn_bias: bool) -> None:
    """q/k/v open attention, closed by o_proj; gate/up open the MLP, closed by down_proj; o_proj, down_proj
    and lm_head feed the residual stream (or the logits) and close nothing but themselves. An input every
    layer's attention reads (attn_bias, as a mask) is not taken for the residual stream of layer 1."""
    feeds = token_feeds([6])
    if attn_bias:
        feeds[0]["attn_bias"] = np.zeros((1, 6, 6), np.float32)
    runner = _runner(tiny_llama(attn_bias=attn_bias), feeds)
    found = {}
    for wave in runner.waves():
        module = runner.module_outputs(wave.nodes)
        found[wave.nodes[0].name] = None if module is None else [t.name for t in module]
    assert found == {
        **{f"layers.{i}/q_proj": [f"layers.{i}/o"] for i in range(2)},
        **{f"layers.{i}/gate_proj": [f"layers.{i}/down"] for i in range(2)},
        **{f"layers.{i}/{p}": None for i in range(2) for p in ("o_proj", "down_proj")},
        "lm_head": None,
    }


def test_probe_computes_the_module_with_fed_weights() -> None:
    """At layer 1's q/k/v wave (layer 0 already changed in place, as a quantizer does), the probe's output
    equals the full model's o_proj output, with the current weights and with other q/k/v weights fed in;
    max_macs keeps the first samples that fit."""
    model = tiny_llama()
    feeds = token_feeds([8, 11, 5])
    runner = _runner(model, feeds)
    rng = np.random.default_rng(3)
    changed: dict[str, np.ndarray] = {}
    for wave in runner.waves():
        if wave.nodes[0].name == "layers.1/q_proj":
            break
        for n in wave.nodes:  # perturb every earlier weight: the probe must start from the stored activations
            n.inputs[1].values = (n.inputs[1].values * (1 + 0.1 * rng.standard_normal(n.inputs[1].shape))).astype(np.float32)
            changed[n.inputs[1].name] = n.inputs[1].values
    nodes = wave.nodes
    module = runner.module_outputs(nodes)
    probe = runner.probe(nodes, module)
    assert probe.samples == 3 and [w for w, _ in probe.weights] == ["layers.1.wq", "layers.1.wk", "layers.1.wv"]
    current = [n.inputs[1].values for n in nodes]
    expected = _full(_with(model, changed), ["layers.1/o"], feeds)["layers.1/o"]
    for got, want in zip(probe.run(current), expected, strict=True):
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
    other = [rng.standard_normal(w.shape).astype(np.float32) for w in current]
    expected = _full(_with(model, changed | dict(zip(["layers.1.wq", "layers.1.wk", "layers.1.wv"], other))), ["layers.1/o"], feeds)
    for got, want in zip(probe.run(other), expected["layers.1/o"], strict=True):
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(nodes[0].inputs[1].values, current[0]), "the probe must not change the graph's weights"
    # 32 * (3 * 32 + 32) multiply-adds per row (q, k, v and o_proj): rows 8 and 8 + 11 = 19
    per_row = 32 * 4 * 32
    assert runner.probe(nodes, module, max_macs=19 * per_row).samples == 2
    assert runner.probe(nodes, module, max_macs=19 * per_row - 1).samples == 1
    assert runner.probe(nodes, module, max_macs=1).samples == 1
    with pytest.raises(ValueError, match="takes 3 weights"):
        next(probe.run(other[:2]))


# --------------------------------------------------------------------------------------- stories260K


@pytest.mark.assets
def test_stories260k_waves_match_the_full_model(assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real export (Shape/Gather/Concat plumbing, RoPE, causal mask): 21 waves of 36 MatMuls (q/k/v
    and w1/w3 grouped), inputs equal to the full model's, every node run once, only live tensors held."""
    model = onnx.load(str(asset(assets, "llm/stories260K/stories260K.onnx")))
    tokens = json.loads(asset(assets, "text/tokens/stories260K__tinystories_valid_shared.json").read_text())
    feeds = [{"input_ids": np.asarray(tokens[s : s + 64], np.int64)[None]} for s in (0, 1000)]
    runner = _runner(model, feeds)
    assert len(runner.targets) == 36
    waves, segments = _walk(runner, monkeypatch)
    sizes = [len(w[0]) for w in waves]
    assert sizes == [3, 1, 2, 1] * 5 + [1]
    for i in range(5):
        qkv, o, w13, w2 = (sorted(w[0]) for w in waves[4 * i : 4 * i + 4])
        assert qkv == [f"/layers.{i}/attention/{p}/MatMul" for p in ("wk", "wq", "wv")]
        assert o == [f"/layers.{i}/attention/wo/MatMul"]
        assert w13 == [f"/layers.{i}/feed_forward/{p}/MatMul" for p in ("w1", "w3")]
        assert w2 == [f"/layers.{i}/feed_forward/w2/MatMul"]
        assert next(iter(waves[4 * i + 3][1].values()))[0].shape == (1, 64, 172)  # w2 reads the FFN width
    _check_inputs_match(waves, _full(model, [x for w in waves for x in w[1]], feeds))
    _check_each_node_runs_once(runner, segments, 21)
    for names, _, held, live in waves:
        assert held == live, f"at wave {names}: extra {sorted(held - live)}, missing {sorted(live - held)}"
    assert len(runner.store) == len(_live_at(runner, runner.cut)) <= 3


@pytest.mark.assets
def test_stories260k_modules(assets: Path) -> None:
    """The real export: q/k/v (through RoPE, the causal mask, the GQA repeat of k/v) close at wo; w1/w3
    (SiLU gate) at w2; wo, w2 and the output projection close nothing."""
    model = onnx.load(str(asset(assets, "llm/stories260K/stories260K.onnx")))
    runner = _runner(model, [{"input_ids": np.arange(32, dtype=np.int64)[None]}])
    found = {}
    for wave in runner.waves():
        module = runner.module_outputs(wave.nodes)
        found[min(n.name for n in wave.nodes)] = None if module is None else [t.name for t in module]
    for i in range(5):
        assert found[f"/layers.{i}/attention/wk/MatMul"] == [f"/layers.{i}/attention/wo/MatMul_output_0"]
        assert found[f"/layers.{i}/feed_forward/w1/MatMul"] == [f"/layers.{i}/feed_forward/w2/MatMul_output_0"]
        assert found[f"/layers.{i}/attention/wo/MatMul"] is None and found[f"/layers.{i}/feed_forward/w2/MatMul"] is None
    assert found["/output/MatMul"] is None and len(found) == 21


def test_probe_specialisation_bakes_equal_shape_inputs_and_keeps_the_outputs() -> None:
    """A probe's integer input equal on every sample (a stored Shape output) becomes an initializer, an
    input with one shape everywhere gets it statically, and the model computes the same."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y0"]), helper.make_node("Mul", ["y0", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None]),
                                           helper.make_tensor_value_info("shape", TensorProto.INT64, [None]),
                                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])],
                              [helper.make_empty_tensor_value_info("y")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    inputs = [{"x": rng.normal(size=(2, 6)).astype(np.float32), "shape": np.array([3, 4], np.int64)} for _ in range(3)]
    expected = [run_ort(model, {**feed, "w": np.array([2.0], np.float32)})[0] for feed in inputs]
    _specialise(model, inputs)
    assert [vi.name for vi in model.graph.input] == ["x", "w"] and [t.name for t in model.graph.initializer] == ["shape"]
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 6]
    assert all(set(feed) == {"x"} for feed in inputs)
    for feed, ref in zip(inputs, expected):
        np.testing.assert_array_equal(run_ort(model, {**feed, "w": np.array([2.0], np.float32)})[0], ref)
    varied = [{"shape": np.array([3, 4], np.int64)}, {"shape": np.array([4, 3], np.int64)}]
    model2 = helper.make_model(helper.make_graph([], "g", [helper.make_tensor_value_info("shape", TensorProto.INT64, [None])], []))
    _specialise(model2, varied)
    assert [vi.name for vi in model2.graph.input] == ["shape"] and not model2.graph.initializer
