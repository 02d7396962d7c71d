"""Static QDQ quantization: QuantizeLinear/DequantizeLinear pairs on activations, int8 weights.

What the pass does, per quantized node (the recipe decides which nodes; excluded ones stay float):

* **Activations** (float inputs and outputs of quantized nodes) get one ``Q -> DQ`` pair right after
  their producer, shared by every consumer, with a scale and zero point from the calibrated range
  (``ctx.calibration``). Graph outputs stay float unless ``recipe.quantize_outputs``.
* **Pass-through ops** (Reshape, Transpose, Flatten, Squeeze, Unsqueeze, MaxPool, Resize) give their
  output the *same* scale and zero point as their input, so they run on integers unchanged.
* **Relu / Clip(0, c)** after a quantized node are *absorbed* when that is exact: the node's output is
  quantized with the activation's parameters, whose zero point is the lowest code and whose top code
  saturates at or below ``c``, so ``Q(x) == Q(relu(x))`` for every x and the Relu/Clip is removed.
* **Weights** (constant inputs of Conv/Gemm/MatMul) are stored as int8 initializers behind a
  ``DequantizeLinear`` (per output channel by default: axis 0 for Conv, the N axis for Gemm/MatMul).
  The weight range follows the target profile (7-bit on CPUs whose int8 kernels saturate).
* **Biases** of Conv/Gemm become int32 with scale ``x_scale * w_scale`` and zero point 0, which is what
  ONNX Runtime's integer kernels expect, so they fuse into QLinearConv / QGemm.
* **Constant operands** of Add/Mul/Concat are quantized per tensor with the activation scheme.
* A constant used by several nodes (tied weights) is quantized once per scheme and shared.

Inserted nodes are named after the tensor they serve (``<tensor>/QuantizeLinear``) and carry a doc
string with the scheme, calibration method and range, so the result reads well in Netron.

Settings: :class:`InsertQDQSettings` (the node selection, ``quantize_outputs``, the calibration method).
Reads ``ctx.target`` and, where set, ``ctx.weight_qparams_memo`` (weight scales kept between runs on the
same graph: the mixed-precision search of :mod:`onnxq.mixed_precision` rebuilds the model once per
candidate). Writes ``ctx.quantized_nodes`` (name, op type) of every quantized compute node, in graph order,
and ``ctx.doc_strings``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.errors import CalibrationError
from onnxq.graphs import FreshNames
from onnxq.calibration.sources.token_inputs import kv_cache_inputs
from onnxq.passes.constant_folding import materialize_weight_transposes
from onnxq.pipeline import ConfiguredPass, PassContext, PassResult
from onnxq.recipe import NodeConfig, NodeSelection, Recipe
from onnxq.scheme import (
    PerChannel,
    QuantDtype,
    QuantScheme,
    choose_qparams,
    choose_qparams_from_range,
    choose_qparams_mse,
    dequantize,
    quantize,
)
from onnxq.target import TargetProfile, weight_scheme

__all__ = ["InsertQDQPass", "InsertQDQSettings", "insert_qdq", "PASS_THROUGH_OPS", "STATIC_CALIBRATION_REFUSAL"]

logger = logging.getLogger(__name__)

PASS_THROUGH_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Resize"})
_WEIGHT_OPS = frozenset({"Conv", "Gemm", "MatMul"})
_CONST_OPERAND_OPS = frozenset({"Add", "Mul", "Concat"})
_ABSORBABLE = frozenset({"Relu", "Clip"})
_ELEMENTWISE_OPS = frozenset({"Add", "Mul"})
_FLOAT_TYPES = (np.float32, np.float16)  # QuantizeLinear takes no float64: such tensors stay as they are

STATIC_CALIBRATION_REFUSAL = ("preset/recipe '{recipe}' is static quantization and needs --calib (an image folder, "
                              ".npz/.npy files, a test_data_set folder, or 'random' for data-free ranges)")  # fmt: skip
"""The refusal of a static recipe run with no calibration samples and no range cache (``{recipe}``: its name)."""


@dataclass(frozen=True)
class InsertQDQSettings:
    """What :class:`InsertQDQPass` reads of a recipe: which nodes with which schemes, whether graph outputs
    are quantized too, and the calibration method (named in the Q/DQ doc strings)."""

    selection: NodeSelection = field(default_factory=NodeSelection)
    quantize_outputs: bool = False
    calibration_method: str = "mse-percentile"

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> InsertQDQSettings:
        return cls(recipe.selection(), recipe.quantize_outputs, recipe.calibration.method)


@dataclass(frozen=True)
class _QParams:
    scale: np.ndarray
    zero_point: np.ndarray
    scheme: QuantScheme
    rmin: float
    rmax: float


def _is_float(t: gs.Tensor) -> bool:
    return t.dtype is not None and np.dtype(t.dtype) in [np.dtype(d) for d in _FLOAT_TYPES]


def _activation_inputs(node: gs.Node) -> list[int]:
    """Indices of the inputs of ``node`` that are quantized as activations (or constant operands)."""
    if node.op in ("Conv", "Gemm"):
        return [0]
    if node.op == "MatMul":
        return [i for i in (0, 1) if not isinstance(node.inputs[i], gs.Constant)]
    if node.op in _CONST_OPERAND_OPS:
        return list(range(len(node.inputs)))
    return [0]


class _IntegerInputs:
    """Which elementwise Add/Mul nodes sit between quantized ops (so quantizing them is worth it).

    An Add/Mul is *eligible* when every non-constant input comes from a graph input, a quantized compute
    op (Conv, MatMul, pooling, ...), an eligible Add/Mul, or a pass-through op / Relu / Clip over one of
    those: the residual Add of a CNN qualifies, GELU's ``x * (1 + erf(x))`` does not (Erf stays float).
    """

    def __init__(self, configs: dict[int, NodeConfig]) -> None:
        self.configs = configs
        self.memo: dict[int, bool] = {}

    def eligible(self, node: gs.Node) -> bool:
        key = id(node)
        if key not in self.memo:
            self.memo[key] = False  # cycles cannot happen in a DAG; this only guards re-entry
            self.memo[key] = all(isinstance(t, gs.Constant) or self._from_integer_op(t) for t in node.inputs)
        return self.memo[key]

    def _from_integer_op(self, t: gs.Tensor) -> bool:
        for _ in range(64):  # walk back through pass-through ops and absorbable activations
            p = t.inputs[0] if t.inputs else None
            if p is None:
                return True  # a graph input
            if p.op in _ABSORBABLE or (p.op in PASS_THROUGH_OPS and id(p) in self.configs):
                t = p.inputs[0]
                continue
            if id(p) not in self.configs:
                return False
            return self.eligible(p) if p.op in _ELEMENTWISE_OPS else True
        return False


def _want(wanted: dict[str, tuple[gs.Variable, NodeConfig]], t: gs.Variable, cfg: NodeConfig) -> None:
    """Ask for a Q/DQ pair on ``t``. One tensor has one pair: where its readers' settings differ, the widest
    activation dtype wins (a reader moved to int16 by the mixed-precision search gets int16 inputs)."""
    have = wanted.get(t.name)
    if have is None or QuantDtype(cfg.activations.dtype).bits > QuantDtype(have[1].activations.dtype).bits:
        wanted[t.name] = (t, cfg)


def _activation_matmul(node: gs.Node) -> bool:
    """A MatMul of two activations (attention's Q @ K^T and probs @ V): no constant operand."""
    return node.op == "MatMul" and not any(isinstance(t, gs.Constant) for t in node.inputs[:2])


def _weight_axis(node: gs.Node, index: int, weight: gs.Constant) -> int | None:
    """Per-channel axis of a weight input (None: per-tensor only)."""
    rank = weight.values.ndim
    if node.op == "Conv" and index == 1:
        return 0
    if node.op == "Gemm" and index == 1:
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul" and index == 1 and rank == 2:
        return 1
    return None


@dataclass
class _Demand:
    """Which tensors get a Q/DQ pair and which nodes read quantized inputs (see :func:`_plan_demand`)."""

    wanted: dict[str, tuple[gs.Variable, NodeConfig]] = field(default_factory=dict)
    absorb: dict[str, gs.Node] = field(default_factory=dict)  # tensor before an absorbable Relu/Clip -> that node
    quantized: set[int] = field(default_factory=set)  # nodes that read quantized inputs (others keep float)


def _node_configs(graph: gs.Graph, selection: NodeSelection, counts: dict[str, int]) -> dict[int, NodeConfig]:
    """The recipe's settings for every node it quantizes (by ``id``); counts the excluded ones.

    Nodes with no float output are left out (nothing to quantize); activation MatMuls are excluded when
    the recipe says so; so are the nodes reading a KV-cache input (``past_key_values.*``, the past/present
    Concat of an Optimum export), since calibration runs prefills with an empty past.
    """
    configs: dict[int, NodeConfig] = {}
    past = kv_cache_inputs(graph)
    for node in graph.nodes:
        if node.op not in selection.op_types:
            continue
        cfg = selection.config_for(node.name, node.op)
        if cfg is not None and selection.exclude.activation_matmuls and _activation_matmul(node):
            cfg = None
        if cfg is not None and any(id(t) in past for t in node.inputs):
            cfg = None  # calibration feeds the KV cache empty (a prefill): its range at decode time is unknown
        if cfg is None:
            counts["nodes_excluded"] += 1
        elif any(_is_float(t) for t in node.outputs):
            configs[id(node)] = cfg
    return configs


def _plan_demand(
    graph: gs.Graph, configs: dict[int, NodeConfig], graph_outputs: set[str], quantize_outputs: bool
) -> _Demand:
    """Decide backwards from demand which tensors get a Q/DQ pair.

    A tensor is quantized when a quantized compute node reads it, or a quantized pass-through node /
    absorbable Relu/Clip reads it and that node's own output is quantized. Outputs nobody quantized reads
    (a head feeding the graph output, a Softmax) stay float: 8-bit logits would change the argmax.
    """
    graph.toposort()
    plan = _Demand()
    friendly = _IntegerInputs(configs)
    for node in reversed(graph.nodes):
        cfg = configs.get(id(node))
        out0 = node.outputs[0].name if node.outputs else ""
        # demanded: a quantized node reads the output (directly or through an absorbed Relu/Clip)
        demanded = out0 in plan.wanted or out0 in plan.absorb or (quantize_outputs and out0 in graph_outputs)
        if cfg is not None and node.op in PASS_THROUGH_OPS:
            _demand_pass_through(plan, node, cfg, demanded)
        elif cfg is not None and node.op in _ELEMENTWISE_OPS and not (demanded and friendly.eligible(node)):
            # an elementwise Add/Mul pays off only between quantized ops (a CNN's residual Add feeding
            # the next Conv). Elsewhere it would add rounding errors for nothing: in a transformer it
            # would quantize the attention mask (-1e4 .. 0), the residual stream or GELU's insides
            continue
        elif cfg is not None:
            _demand_compute(plan, node, cfg, quantize_outputs and node.outputs[0].name in graph_outputs)
        elif node.op in _ABSORBABLE and node.outputs and node.outputs[0].name in plan.wanted:
            _consider_absorbing(plan, node, configs, graph_outputs)
    return plan


def _demand_pass_through(plan: _Demand, node: gs.Node, cfg: NodeConfig, demanded: bool) -> None:
    """A quantized pass-through node whose output is demanded runs on integers: its input and output get pairs."""
    out, src = node.outputs[0], node.inputs[0]
    if demanded and isinstance(src, gs.Variable) and _is_float(src):
        _want(plan.wanted, out, cfg)
        _want(plan.wanted, src, cfg)
        plan.quantized.add(id(node))


def _demand_compute(plan: _Demand, node: gs.Node, cfg: NodeConfig, output_quantized: bool) -> None:
    """A quantized compute node: its float activation inputs get pairs (its output too when it is a graph
    output and the recipe quantizes outputs)."""
    plan.quantized.add(id(node))
    for i in _activation_inputs(node):
        t = node.inputs[i] if i < len(node.inputs) else None
        if isinstance(t, gs.Variable) and _is_float(t):
            _want(plan.wanted, t, cfg)
    out = node.outputs[0]
    if output_quantized and _is_float(out):
        _want(plan.wanted, out, cfg)


def _consider_absorbing(plan: _Demand, act: gs.Node, configs: dict[int, NodeConfig], graph_outputs: set[str]) -> None:
    """quantized node -> T -> (only) Relu/Clip -> U (quantized): Q(U) may do the Relu's job; note T as a candidate."""
    t = act.inputs[0]
    producer = t.inputs[0] if t.inputs else None
    if (
        producer is not None
        and id(producer) in configs
        and producer.op not in PASS_THROUGH_OPS
        and len(t.outputs) == 1
        and t.name not in graph_outputs
    ):
        plan.absorb[t.name] = act


def _shares_input(
    t: gs.Variable, configs: dict[int, NodeConfig], wanted: dict[str, tuple[gs.Variable, NodeConfig]]
) -> gs.Variable | None:
    """The input whose parameters the output ``t`` of a quantized pass-through node shares, else None."""
    producer = t.inputs[0] if t.inputs else None
    if producer is not None and producer.op in PASS_THROUGH_OPS and id(producer) in configs:
        src = producer.inputs[0]
        if isinstance(src, gs.Variable) and src.name in wanted:
            return src
    return None


def _activation_params(graph: gs.Graph, wanted: dict[str, tuple[gs.Variable, NodeConfig]], configs: dict[int, NodeConfig],
                       ranges: dict[str, tuple[float, float]], target: TargetProfile) -> dict[str, _QParams]:  # fmt: skip
    """Scale and zero point of every wanted tensor, in topological order so shared parameters resolve."""
    params: dict[str, _QParams] = {}
    graph.toposort()
    # graph inputs first: a pass-through node reading a graph input shares that input's parameters
    order = [t.name for t in graph.inputs] + [t.name for n in graph.nodes for t in n.outputs]
    rank = {n: i for i, n in enumerate(order)}
    for name in sorted(wanted, key=lambda n: rank.get(n, -1)):
        t, cfg = wanted[name]
        scheme = cfg.activations.scheme()
        if target.symmetric_activations and not cfg.activations.symmetric:
            scheme = scheme.with_(symmetry=type(scheme.symmetry).SYMMETRIC)
        src = _shares_input(t, configs, wanted)
        if src is not None and src.name in params:
            params[name] = params[src.name]
            continue
        lo, hi = ranges[name]
        scale, zp = choose_qparams_from_range(lo, hi, scheme)
        params[name] = _QParams(scale, zp, scheme, lo, hi)
    return params


def _absorb_activations(graph: gs.Graph, plan: _Demand, params: dict[str, _QParams], ranges: dict[str, tuple[float, float]],
                        ctx: PassContext) -> int:  # fmt: skip
    """Remove each absorbable Relu/Clip whose work the quantization of its output already does; returns
    how many were removed.

    Where absorption is inexact the Relu/Clip stays and its input is calibrated and quantized too
    (standard QDQ around it): ``plan.wanted``, ``params`` and ``ranges`` grow accordingly.
    """
    inexact = [name for name, act in plan.absorb.items() if not _absorption_exact(act, params[act.outputs[0].name])]
    if inexact:
        assert ctx.calibration is not None
        ranges.update(ctx.calibration.ranges(graph, inexact))
    absorbed = 0
    for name, act in plan.absorb.items():
        u = act.outputs[0]
        p = params[u.name]
        if name in inexact:
            t_in, cfg_u = act.inputs[0], plan.wanted[u.name][1]
            lo, hi = ranges[name]
            scale, zp = choose_qparams_from_range(lo, hi, p.scheme)
            plan.wanted[name] = (t_in, cfg_u)
            params[name] = _QParams(scale, zp, p.scheme, lo, hi)
            continue
        producer = act.inputs[0].inputs[0]
        producer.outputs[0] = u  # the producer now writes the activation's output directly
        act.outputs.clear()
        act.inputs.clear()
        absorbed += 1
    return absorbed


def _constant_scheme(
    node: gs.Node, index: int, inp: gs.Constant, cfg: NodeConfig, target: TargetProfile
) -> QuantScheme | None:
    """The scheme for a float constant input of a quantized node: the weight scheme for weights, the
    activation scheme for constant operands of Add/Mul/Concat; None where the input stays float."""
    if node.op in _WEIGHT_OPS and index == 1 or (node.op == "MatMul" and index == 0):
        return _weight_scheme(node, index, inp, cfg, target)
    if node.op in _CONST_OPERAND_OPS:
        return cfg.activations.scheme()
    return None


class InsertQDQPass(ConfiguredPass[InsertQDQSettings]):
    """Insert Q/DQ pairs and quantize weights; see the module docstring."""

    name = "insert_qdq"
    settings_class = InsertQDQSettings
    needs_samples = True
    reported_counts = ("nodes_quantized", "nodes_excluded", "qdq_pairs", "weights_quantized", "biases_quantized", "activations_absorbed")  # fmt: skip
    in_place = True

    def missing_calibration_message(self, recipe_name: str) -> str:
        return STATIC_CALIBRATION_REFUSAL.format(recipe=recipe_name)

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise CalibrationError(
                "static quantization needs calibration data: pass --calib (an image folder, .npz/.npy "
                "files, a test_data_set folder, or 'random' for data-free ranges)"
            )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        materialize_weight_transposes(graph)  # a tied weight's Transpose kept by constant folding
        settings, target = self.settings, ctx.target
        counts = {"nodes_quantized": 0, "nodes_excluded": 0, "qdq_pairs": 0, "weights_quantized": 0,
                  "biases_quantized": 0, "shared_weights": 0, "activations_absorbed": 0}  # fmt: skip
        # names already in the model: inserted tensors and nodes must not reuse one (a model may well have an
        # initializer called "x_scale" already, e.g. when it was quantized before)
        self._fresh = FreshNames(graph)
        # weight scales by (name, scheme, method): the mixed-precision search rebuilds the same graph many times
        self._memo: dict | None = ctx.weight_qparams_memo
        notes: list[str] = []
        configs = _node_configs(graph, settings.selection, counts)
        graph_outputs = {t.name for t in graph.outputs}
        # 1. which tensors get a Q/DQ pair, decided backwards from demand
        plan = _plan_demand(graph, configs, graph_outputs, settings.quantize_outputs)
        # 2. calibrate every tensor that needs its own range (pass-through outputs share their input's); the
        #    inputs of absorbable Relu/Clip are calibrated only where absorption turns out inexact (step 4):
        #    usually none, and each calibrated tensor costs a histogram on every sample
        need = [n for n, (t, _c) in plan.wanted.items() if _shares_input(t, configs, plan.wanted) is None]
        assert ctx.calibration is not None
        ranges = ctx.calibration.ranges(graph, need)
        # 3. activation parameters, in topological order so shared parameters resolve
        params = _activation_params(graph, plan.wanted, configs, ranges, target)
        # 4. absorb Relu/Clip where exact
        counts["activations_absorbed"] += _absorb_activations(graph, plan, params, ranges, ctx)
        # 5. weights, biases and constant operands
        self._quantize_node_constants(graph, configs, plan.quantized, params, target, counts, notes, ctx)
        # 6. activation Q/DQ pairs
        self._insert_activation_pairs(graph, plan, params, graph_outputs, counts, notes, ctx)

        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        ctx.report.info.setdefault("activation_ranges", {}).update(
            {n: [p.rmin, p.rmax] for n, p in params.items()}
        )
        return PassResult(graph, modified=counts["qdq_pairs"] > 0 or counts["weights_quantized"] > 0, counts=counts, notes=notes)

    def _quantize_node_constants(self, graph: gs.Graph, configs: dict[int, NodeConfig], quantized: set[int],
                                 params: dict[str, _QParams], target: TargetProfile, counts: dict[str, int],
                                 notes: list[str], ctx: PassContext) -> None:  # fmt: skip
        """Quantize the weights, biases and constant operands of every quantized node.

        A constant read by several nodes with the same scheme (tied weights) is quantized once and shared;
        the names of quantized compute nodes go to ``ctx.quantized_nodes`` for the
        mixed-precision search.
        """
        docs = ctx.doc_strings
        weight_cache: dict[tuple[str, str], tuple[gs.Variable, _QParams]] = {}
        for node in list(graph.nodes):
            cfg = configs.get(id(node))
            if cfg is None or id(node) not in quantized:
                continue
            counts["nodes_quantized"] += 1
            if node.op not in PASS_THROUGH_OPS:  # the layers a mixed-precision search may move back
                ctx.quantized_nodes.append((node.name, node.op))
            for i, inp in enumerate(list(node.inputs)):
                if not isinstance(inp, gs.Constant) or not np.issubdtype(inp.values.dtype, np.floating):
                    continue
                scheme = _constant_scheme(node, i, inp, cfg, target)
                if scheme is None:
                    continue
                key = (inp.name, f"{scheme} {cfg.weights.range_method}")
                if key in weight_cache:
                    counts["shared_weights"] += 1
                else:
                    method = cfg.weights.range_method if node.op in _WEIGHT_OPS else "minmax"
                    weight_cache[key] = self._quantize_constant(graph, inp, scheme, len(weight_cache), counts, docs, method)
                node.inputs[i] = weight_cache[key][0]
            self._quantize_bias(graph, node, params, weight_cache, counts, notes, docs)

    def _insert_activation_pairs(self, graph: gs.Graph, plan: _Demand, params: dict[str, _QParams], graph_outputs: set[str],
                                 counts: dict[str, int], notes: list[str], ctx: PassContext) -> None:  # fmt: skip
        """One Q -> DQ pair per wanted tensor, read by its quantized consumers only.

        A float consumer (a residual Add, a LayerNormalization, a Softmax) keeps the exact tensor, so the
        quantization error stays local.
        """
        quantize_outputs = self.settings.quantize_outputs
        for name, (t, _cfg) in plan.wanted.items():
            consumers = [c for c in t.outputs if id(c) in plan.quantized]
            if not consumers and not (quantize_outputs and name in graph_outputs):
                continue
            dq_out = self._insert_pair(graph, t, params[name], ctx)
            for c in consumers:
                for j, inp in enumerate(c.inputs):
                    if inp is t:
                        c.inputs[j] = dq_out
            if quantize_outputs and name in graph_outputs:
                notes.append(f"graph output '{name}' is quantized (quantize_outputs = true)")
            counts["qdq_pairs"] += 1

    def _insert_pair(self, graph: gs.Graph, t: gs.Variable, p: _QParams, ctx: PassContext) -> gs.Variable:
        base = t.name
        scale = gs.Constant(self._fresh(f"{base}_scale"), np.asarray(p.scale, np.float32).reshape(()))
        zp = gs.Constant(self._fresh(f"{base}_zero_point"), np.asarray(p.zero_point).reshape(()).astype(p.scheme.dtype.numpy_dtype))
        q_out = gs.Variable(self._fresh(f"{base}_quantized"), dtype=p.scheme.dtype.numpy_dtype, shape=t.shape)
        dq_out = gs.Variable(self._fresh(f"{base}_dequantized"), dtype=np.float32, shape=t.shape)
        method = self.settings.calibration_method
        doc = f"onnxq: activation {p.scheme}; calibration {method}; range [{p.rmin:.6g}, {p.rmax:.6g}]"
        q = gs.Node("QuantizeLinear", self._fresh(f"{base}/QuantizeLinear"), inputs=[t, scale, zp], outputs=[q_out])
        dq = gs.Node("DequantizeLinear", self._fresh(f"{base}/DequantizeLinear"), inputs=[q_out, scale, zp], outputs=[dq_out])
        ctx.doc_strings[q.name] = ctx.doc_strings[dq.name] = doc
        graph.nodes.extend([q, dq])
        return dq_out

    def _quantize_constant(
        self,
        graph: gs.Graph,
        c: gs.Constant,
        scheme: QuantScheme,
        index: int,
        counts: dict[str, int],
        docs: dict[str, str],
        range_method: str = "minmax",
    ) -> tuple[gs.Variable, _QParams]:
        values = np.asarray(c.values, np.float32)
        key = (c.name, str(scheme), range_method, values.shape)
        if self._memo is not None and key in self._memo:
            scale, zp = self._memo[key]
        elif range_method == "mse":
            scale, zp = choose_qparams_mse(values, scheme)
        else:
            scale, zp = choose_qparams(values, scheme)
        if self._memo is not None:
            self._memo[key] = (scale, zp)
        q = quantize(values, scale, zp, scheme, clip_to_scheme=True)  # stored codes never leave the scheme's range
        suffix = "" if index == 0 or not any(t == f"{c.name}_quantized" for t in graph.tensors()) else f"_{index}"
        qc = gs.Constant(self._fresh(f"{c.name}_quantized{suffix}"), q)
        sc = gs.Constant(self._fresh(f"{c.name}_scale{suffix}"), np.asarray(scale, np.float32))
        zc = gs.Constant(self._fresh(f"{c.name}_zero_point{suffix}"), np.asarray(zp))
        out = gs.Variable(self._fresh(f"{c.name}_dequantized{suffix}"), dtype=np.float32, shape=list(values.shape))
        attrs = {"axis": scheme.granularity.axis} if isinstance(scheme.granularity, PerChannel) else {}
        dq = gs.Node("DequantizeLinear", self._fresh(f"{c.name}/DequantizeLinear{suffix}"), attrs=attrs, inputs=[qc, sc, zc], outputs=[out])
        err = values - dequantize(q, scale, zp, scheme)
        signal, noise = float(np.square(values, dtype=np.float64).sum()), float(np.square(err, dtype=np.float64).sum())
        sqnr = "exact" if noise == 0 else f"{10 * np.log10(max(signal, 1e-300) / noise):.1f} dB"
        docs[dq.name] = (f"onnxq: weight {scheme}; range {'minimising squared error' if range_method == 'mse' else 'min-max of the weight values'}"
                         f"; weight SQNR {sqnr}")  # fmt: skip
        graph.nodes.append(dq)
        counts["weights_quantized"] += 1
        lo, hi = float(np.nanmin(values)) if values.size else 0.0, float(np.nanmax(values)) if values.size else 0.0
        return out, _QParams(scale, zp, scheme, lo, hi)

    def _quantize_bias(
        self,
        graph: gs.Graph,
        node: gs.Node,
        params: dict[str, _QParams],
        weight_cache: dict[tuple[str, str], tuple[gs.Variable, _QParams]],
        counts: dict[str, int],
        notes: list[str],
        docs: dict[str, str],
    ) -> None:
        """Conv/Gemm bias -> int32 with scale x_scale * w_scale (what integer kernels accumulate in)."""
        if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3:
            return
        bias, x, w = node.inputs[2], node.inputs[0], node.inputs[1]
        if not isinstance(bias, gs.Constant) or bias.values.ndim != 1:
            return
        if node.op == "Gemm" and (node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0):
            notes.append(f"{node.name}: Gemm with alpha/beta != 1 keeps a float bias")
            return
        # activation Q/DQ pairs are inserted after this step, so x is still the float tensor
        wq = next((p for (out, p) in weight_cache.values() if out is w), None)
        x_name = x.name
        if x_name not in params or wq is None:
            return
        x_scale = float(params[x_name].scale)
        w_scale = np.asarray(wq.scale, np.float32).reshape(-1)
        b = np.asarray(bias.values, np.float32)
        scale = (np.float32(x_scale) * w_scale).astype(np.float32)
        if scale.size == 1:
            scale = np.full(b.shape, scale.item(), np.float32)
        if scale.shape != b.shape:
            return
        q = np.clip(np.rint(b / scale), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        # one int32 copy per node (its scale depends on the node's input): names must differ between the nodes
        # a tied bias feeds, also when they have no name (ORT refuses repeated non-empty names in a model)
        tag = node.name or node.outputs[0].name
        name = f"{tag}/bias"
        qc = gs.Constant(self._fresh(f"{bias.name}_quantized_{tag}"), q)
        sc = gs.Constant(self._fresh(f"{bias.name}_scale_{tag}"), scale)
        zc = gs.Constant(self._fresh(f"{bias.name}_zero_point_{tag}"), np.zeros(b.shape, np.int32))
        out = gs.Variable(self._fresh(f"{bias.name}_dequantized_{tag}"), dtype=np.float32, shape=list(b.shape))
        dq = gs.Node("DequantizeLinear", self._fresh(f"{name}/DequantizeLinear"), attrs={"axis": 0}, inputs=[qc, sc, zc], outputs=[out])
        docs[dq.name] = "onnxq: bias int32, scale = input scale x weight scale"
        graph.nodes.append(dq)
        node.inputs[2] = out
        counts["biases_quantized"] += 1


def _weight_scheme(node: gs.Node, index: int, weight: gs.Constant, cfg: NodeConfig, target: TargetProfile) -> QuantScheme:
    """The weight scheme of one node input (:func:`onnxq.target.weight_scheme` on its axis and group)."""
    axis, group = _weight_axis(node, index, weight), int(node.attrs.get("group", 1))
    return weight_scheme(node.op, tuple(weight.values.shape), cfg.weights, target, axis=axis, group=group)


def _absorption_exact(act: gs.Node, p: _QParams) -> bool:
    """True when quantizing with ``p`` already performs what the Relu/Clip ``act`` does."""
    qmin, qmax = (int(v) for v in (np.iinfo(p.scheme.dtype.numpy_dtype).min, np.iinfo(p.scheme.dtype.numpy_dtype).max))
    zp = int(np.asarray(p.zero_point).item())
    scale = np.float32(np.asarray(p.scale).item())
    if zp != qmin:
        return False  # codes below the zero point would represent negative values
    if act.op == "Relu":
        return True
    lo, hi = _clip_bounds(act)
    if lo is None or lo != 0.0:
        return False
    if hi is None:
        return True
    # every x >= hi must saturate to qmax, as Clip(x) = hi would
    return bool(np.rint(np.float32(hi) / scale) + zp >= qmax)


def _clip_bounds(act: gs.Node) -> tuple[float | None, float | None]:
    if "min" in act.attrs or "max" in act.attrs:  # opset < 11
        return float(act.attrs.get("min", -np.inf)), float(act.attrs.get("max", np.inf))
    vals: list[float | None] = []
    for i in (1, 2):
        t = act.inputs[i] if len(act.inputs) > i else None
        if t is None or (isinstance(t, gs.Variable) and t.name == ""):
            vals.append(None)
        elif isinstance(t, gs.Constant) and t.values.size == 1:
            vals.append(float(t.values.reshape(())))
        else:
            return None, None
    lo, hi = vals
    return (lo if lo is not None else None), hi


def insert_qdq(graph: gs.Graph, ctx: PassContext, recipe: Recipe | None = None) -> gs.Graph:
    """Convenience function: run :class:`InsertQDQPass` configured from ``recipe`` (default: ``Recipe()``) on ``graph``."""
    return InsertQDQPass.from_recipe(recipe or Recipe())(graph, ctx).graph
