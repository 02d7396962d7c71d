"""Dynamic int8: weight MatMul/Gemm -> integer matrix products with run-time activation scales.

No calibration: each activation's scale is computed by the graph itself, for every input, just before
the integer product. Per weight node (``MatMul`` whose B is a 2-D constant ``[K, N]``; ``Gemm`` whose B is
a constant, any ``transA`` / ``transB`` / ``alpha`` / ``beta`` / bias ``C``):

* **Weights** are stored once as int8 initializers ``[K, N]`` (``transB`` applied when quantizing), per
  output column (``N``) by default, symmetric, from the recipe's ``[weights]`` table (granularity,
  ``range_method`` ``mse`` or ``minmax``). Per-column scales (and Gemm's ``alpha``) are applied *after* the
  integer product, so ``MatMulInteger``'s ``b_zero_point`` stays a scalar (0, or 128 for uint8 storage).
* **Activations**, ``[dynamic] activation_granularity``:

  ``per-tensor``: ``x -> DynamicQuantizeLinear -> (x_q uint8, x_scale, x_zp)``, then
  ``Mul(Cast(MatMulInteger(x_q, w_q, x_zp)), Mul(x_scale, w_scale[N]))`` [``-> Add bias``], the pattern
  ONNX Runtime fuses into ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat``. One scale for the whole
  tensor: one loud token (LLMs have a few, e.g. the first one) coarsens every other token's step.

  ``per-row`` (the default; one scale per row of the last axis, i.e. per token), symmetric::

      s_row = Max(Max(ReduceMax(x), -ReduceMin(x)) / 127, 1e-30)              # [..., M, 1], last axis
      x_q   = QuantizeLinear(x as [rows, K], s_row, 128, axis=0)              # uint8 codes 1..255
      s     = ReduceMax(s_row)                                                # a run-time scalar
      y     = Mul(Cast(MatMulInteger(x_q, w_q, 128)), Mul(s, w_scale[N])) * (s_row / s)

  Splitting the row scale into a scalar and a factor <= 1 keeps the fused form above, so ONNX Runtime
  runs ``MatMulIntegerToFloat`` plus one Mul. The zero point is the constant 128: ONNX Runtime's CPU
  kernel takes only a scalar ``a_zero_point``, and its s8 x s8 kernel is a slow path on AVX2 (measured
  2.6x slower than the float MatMul at 2048 x 384 x 1536). (Affine rows, min..max onto 0..255, measured
  +2.6 dB without rotation but only +0.5 dB with it, at two more float ops per product and no fusion.)
* **Hadamard rotation** (``hadamard_block``, default 64): before quantization the activation is
  multiplied by an orthonormal block-diagonal Hadamard matrix ``H`` (``Reshape [-1, b] -> MatMul H ->
  Reshape back``) and the weight by ``H^T`` offline, which leaves ``x @ W`` unchanged. A few outlier
  channels (LLM residual streams have them; they set the row's scale and flatten every other channel to
  a few codes) are spread over their block. Measured on SmolLM2 (wikitext perplexity vs fp32, x86-avx2):
  per-tensor +70%, per-row +5.1%, per-row with the rotation +1.6% (+1.0% with 8-bit weights). ``K``
  without a power-of-two factor >= 8 (stories260K's 172) is not rotated.
* **Weight bits follow the target** (see :mod:`onnxq.target`): activations are uint8, so ONNX Runtime
  runs its u8 x s8 kernels, which on x86 without VNNI add pairs of products in saturating int16
  (``VPMADDUBSW``); weights are 7-bit ([-64, 64]) on ``x86-avx2`` / ``generic``, uint8 with zero point
  128 on ``x86-avx2-u8`` (u8 x u8 kernels: never saturate, full 8 bits, somewhat slower) and full 8-bit
  int8 on ``x86-vnni`` / ``arm64``. ``[weights] reduce_range = true / false`` overrides the target.
  ``cuda`` is refused: the CUDA execution provider does not run this integer pattern.

A constant used by several nodes (tied weights) is quantized once; an activation read by several
rewritten nodes (Q/K/V projections) is quantized once. Inserted nodes are named after the node they
replace (``<node>/MatMulInteger``) or the activation they quantize (``<tensor>/DynamicQuantizeLinear``)
and carry doc strings; the node's output tensor keeps its name, so graph outputs stay float and named.
Nodes the recipe excludes (``config_for`` returns None) or that are not in ``[dynamic] op_types`` stay
float; nodes whose B is not a 2-D float32 constant are left alone with a note.

Settings: :class:`DynamicSettings` (the node selection and the ``[dynamic]`` table). Reads ``ctx.target``;
writes ``ctx.doc_strings`` and ``ctx.quantized_nodes``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.errors import PassError
from onnxq.graphs import FreshNames
from onnxq.passes.constant_folding import materialize_weight_transposes
from onnxq.pipeline import ConfiguredPass, PassContext, PassResult
from onnxq.recipe import DynamicSpec, NodeConfig, Recipe
from onnxq.recipe_schema import TableSettings
from onnxq.scheme import QuantScheme, choose_qparams, choose_qparams_mse, quantize
from onnxq.target import TargetProfile, refuse_cuda, weight_scheme

__all__ = ["DynamicQuantizePass", "DynamicSettings", "quantize_dynamic", "hadamard", "hadamard_block", "ROW_QMAX", "ROW_ZERO_POINT",
           "ROW_SCALE_FLOOR"]

logger = logging.getLogger(__name__)

_CUDA_REFUSAL = (
    "ONNX Runtime's CUDA execution provider does not run the dynamic int8 pattern "
    "(DynamicQuantizeLinear / MatMulInteger); use --target with a CPU profile (auto, x86-vnni, "
    "x86-avx2, arm64) to run it on a CPU, or another preset for the GPU (w8a8 for TensorRT/CUDA, fp16)"
)
"""Why the pass refuses the cuda target (see :func:`onnxq.target.refuse_cuda`)."""

ROW_QMAX = 127.0
ROW_ZERO_POINT = 128
"""Per-row activations are symmetric: codes ``ROW_ZERO_POINT +- ROW_QMAX`` (1..255) stored as uint8."""
ROW_SCALE_FLOOR = 1e-30
"""Lower bound of a row's scale (a constant row): keeps ``1 / scale`` finite; such rows give exact results."""


@dataclass(frozen=True)
class _Weight:
    """A quantized weight ``[K, N]``: the int8/uint8 initializer, its float scale and zero point."""

    q: gs.Constant
    scale: np.ndarray  # () or (N,)
    zero_point: np.ndarray  # () or (N,)
    scheme: QuantScheme


@dataclass(frozen=True)
class _Activation:
    """The outputs of one activation's run-time quantization."""

    q: gs.Variable
    scale: gs.Tensor  # a scalar: x_scale (per-tensor) or the largest row scale (per-row)
    zero_point: gs.Tensor  # uint8 scalar: x_zp (per-tensor) or 128 (per-row)
    row_factor: gs.Tensor | None = None  # per-row: row scale / largest row scale, [..., M, 1]


_MIN_BLOCK = 8


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of size ``n`` (a power of two): entries +-1/sqrt(n)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def hadamard_block(k: int, cap: int) -> int:
    """The rotation block for a product over ``k``: the largest power of two dividing ``k``, at most ``cap``;
    0 (no rotation) when that is below 8 or ``cap`` is 0."""
    if cap <= 0:
        return 0
    b = 1
    while b * 2 <= cap and k % (b * 2) == 0:
        b *= 2
    return b if b >= _MIN_BLOCK else 0


def _float32(t: gs.Tensor) -> bool:
    return t.dtype is not None and np.dtype(t.dtype) == np.float32


def _why_not(node: gs.Node) -> str | None:
    """Why ``node`` cannot be rewritten, or None when it can."""
    if len(node.inputs) < 2 or len(node.outputs) != 1:
        return "malformed node"
    a, b = node.inputs[0], node.inputs[1]
    if not isinstance(b, gs.Constant):
        return "its B input is not a constant (activation x activation products stay float)"
    if b.values.dtype != np.float32:
        return f"its weight is {b.values.dtype}, not float32"
    if b.values.ndim != 2:
        return f"its weight has rank {b.values.ndim}, not 2"
    if isinstance(a, gs.Constant):
        return "both inputs are constants (constant folding should remove it)"
    if a.dtype is not None and not _float32(a):
        return f"its input is {np.dtype(a.dtype)}, not float32"
    if node.op == "Gemm" and len(node.inputs) > 2 and not node.inputs[2].is_empty():
        c = node.inputs[2]
        if c.dtype is not None and not _float32(c):
            return "its bias is not float32"
    return None


@dataclass(frozen=True)
class DynamicSettings(TableSettings):
    """What :class:`DynamicQuantizePass` reads of a recipe: which nodes with which weight schemes, and the
    ``[dynamic]`` table (activation granularity, op types, Hadamard block)."""

    TABLE_KEY: ClassVar[str] = "dynamic"
    spec: DynamicSpec = field(default_factory=DynamicSpec)


class DynamicQuantizePass(ConfiguredPass[DynamicSettings]):
    """Rewrite weight MatMul/Gemm into dynamic int8 integer products; see the module docstring."""

    name = "dynamic"
    settings_class = DynamicSettings
    reported_counts = ("nodes_quantized", "nodes_excluded", "weights_quantized")
    in_place = True

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        refuse_cuda(ctx.target, self.name, _CUDA_REFUSAL)
        spec = self.settings.selection.weights
        if spec.dtype != "int8":
            raise PassError(
                self.name,
                f"[weights] dtype '{spec.dtype}': dynamic quantization stores int8 weights (MatMulInteger); "
                "set dtype = \"int8\" (uint8 storage is chosen by --target x86-avx2-u8)",
            )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        materialize_weight_transposes(graph)  # a tied weight's Transpose kept by constant folding
        per_row = self.settings.spec.activation_granularity == "per-row"
        self._hadamards: dict[int, gs.Constant] = {}
        self._counts = {"nodes_quantized": 0, "nodes_excluded": 0, "nodes_skipped": 0, "activation_products": 0,
                        "weights_quantized": 0, "shared_weights": 0, "activations_quantized": 0,
                        "activations_rotated": 0}  # fmt: skip
        self._fresh = FreshNames(graph)
        self._opset = int(graph.opset or 13)
        self._docs: dict[str, str] = ctx.doc_strings
        self._weights: dict[tuple[str, bool, str, str, int], _Weight] = {}
        self._activations: dict[tuple[str, int], _Activation] = {}
        self._unrotated: list[str] = []
        self._skipped: dict[str, list[str]] = {}
        self._bits_note: set[str] = set()
        for node in list(graph.nodes):
            cfg = self._chosen(node)
            if cfg is not None:
                self._quantize_node(graph, node, cfg, ctx, per_row)
        counts = self._counts
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, modified=counts["nodes_quantized"] > 0, counts=counts, notes=self._notes(per_row, ctx.target))

    def _chosen(self, node: gs.Node) -> NodeConfig | None:
        """The node's settings when it is rewritten; None (counted or noted) when it stays float."""
        if node.op not in ("MatMul", "Gemm") or node.op not in self.settings.spec.op_types:
            return None
        if len(node.inputs) > 1 and not isinstance(node.inputs[1], gs.Constant):
            self._counts["activation_products"] += 1  # attention's Q x K^T, P x V: no weight to quantize
            return None
        cfg = self.settings.selection.config_for(node.name, node.op)
        if cfg is None:
            self._counts["nodes_excluded"] += 1
            return None
        why = _why_not(node)
        if why is not None:
            self._counts["nodes_skipped"] += 1
            self._skipped.setdefault(why, []).append(node.name or node.outputs[0].name)
            return None
        return cfg

    def _quantize_node(self, graph: gs.Graph, node: gs.Node, cfg: NodeConfig, ctx: PassContext, per_row: bool) -> None:
        """Quantize one chosen node's weight (once per scheme) and input (once per block) and rewrite it."""
        counts, hadamard_cap = self._counts, self.settings.spec.hadamard_block
        scheme = self._weight_scheme(node, cfg, ctx.target)
        self._bits_note.add(f"{scheme.dtype.value} {scheme.qmin}..{scheme.qmax}")
        w_const: gs.Constant = node.inputs[1]
        trans_b = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
        k = int(w_const.values.shape[1 if trans_b else 0])
        block = hadamard_block(k, hadamard_cap)
        if hadamard_cap and not block:
            self._unrotated.append(node.name)
        key = (w_const.name, trans_b, str(scheme), cfg.weights.range_method, block)
        if key in self._weights:
            counts["shared_weights"] += 1
        else:
            self._weights[key] = self._quantize_weight(w_const, trans_b, scheme, cfg.weights.range_method, block)
            counts["weights_quantized"] += 1
        x = node.inputs[0]
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            x = self._transpose_input(graph, node, x)
        if (x.name, block) not in self._activations:
            counts["activations_rotated"] += bool(block)
            self._activations[(x.name, block)] = self._quantize_activation(graph, x, per_row, k, block)
            counts["activations_quantized"] += 1
        ctx.quantized_nodes.append((node.name, node.op))
        self._rewrite(graph, node, self._activations[(x.name, block)], self._weights[key], per_row)
        counts["nodes_quantized"] += 1

    def _notes(self, per_row: bool, target: TargetProfile) -> list[str]:
        """The pass's notes: nodes left float and why, unrotated inputs, and the schemes used."""
        counts, notes = self._counts, []
        for why, names in self._skipped.items():
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            notes.append(f"left in float ({why}): {', '.join(names[:3])}{more}")
        if self._unrotated:
            more = f" and {len(self._unrotated) - 3} more" if len(self._unrotated) > 3 else ""
            notes.append(f"no Hadamard rotation (K has no power-of-two factor >= {_MIN_BLOCK}): "
                         f"{', '.join(self._unrotated[:3])}{more}")  # fmt: skip
        if counts["activation_products"]:
            notes.append(f"{counts['activation_products']} activation x activation products (no constant weight) stay float")
        if counts["nodes_quantized"]:
            act = "per-row symmetric uint8 activations" if per_row else "per-tensor uint8 activations (DynamicQuantizeLinear)"
            if counts["activations_rotated"]:
                act += f", block-{self.settings.spec.hadamard_block} Hadamard rotation"
            notes.append(f"{act}; weights on target {target.name}: {', '.join(sorted(self._bits_note))}")
        return notes

    # ------------------------------------------------------------------ helpers

    def _const(self, name: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self._fresh(name), np.asarray(value))

    def _shape(self, name: str, dims: list[int]) -> gs.Constant:
        return self._const(name, np.array(dims, np.int64))

    def _var(self, name: str, dtype: type, shape: object = None) -> gs.Variable:
        return gs.Variable(self._fresh(name), dtype=dtype, shape=shape)

    def _node(self, graph: gs.Graph, op: str, name: str, inputs: list, outputs: list, doc: str = "", **attrs: object) -> gs.Node:
        n = gs.Node(op, self._fresh(name), attrs=attrs, inputs=inputs, outputs=outputs)
        if doc:
            self._docs[n.name] = doc
        graph.nodes.append(n)
        return n

    @staticmethod
    def _weight_scheme(node: gs.Node, cfg: NodeConfig, target: TargetProfile) -> QuantScheme:
        """Recipe settings, then what the target's integer kernels need (see the module docstring)."""
        if cfg.weights.dtype != "int8":
            raise PassError(
                DynamicQuantizePass.name,
                f"weights dtype '{cfg.weights.dtype}' for {node.op} '{node.name}': dynamic quantization stores "
                "int8 weights; remove the override's dtype",
                node=node.name,
            )
        # axis 1: the N column of the [K, N] layout the weight is stored in
        return weight_scheme(node.op, tuple(node.inputs[1].values.shape), cfg.weights, target, axis=1)

    def _quantize_weight(self, w: gs.Constant, trans_b: bool, scheme: QuantScheme, method: str, block: int) -> _Weight:
        values = np.asarray(w.values, np.float32)
        if trans_b:
            values = np.ascontiguousarray(values.T)
        if block:  # x @ W == (x H) @ (H^T W) per block of K: the rotated activation meets the rotated weight
            k, n = values.shape
            h = hadamard(block).astype(np.float64)
            values = np.einsum("li,jln->jin", h, values.reshape(k // block, block, n).astype(np.float64))
            values = values.reshape(k, n).astype(np.float32)
        scale, zp = (choose_qparams_mse if method == "mse" else choose_qparams)(values, scheme)
        q = quantize(values, scale, zp, scheme, clip_to_scheme=True)
        qc = self._const(f"{w.name}_quantized{'_T' if trans_b else ''}", q)
        return _Weight(qc, np.asarray(scale, np.float32), np.asarray(zp), scheme)

    def _rotate(self, graph: gs.Graph, x: gs.Variable, shape: gs.Variable, k: int, block: int) -> tuple[gs.Variable, gs.Variable]:
        """``x`` times a block-diagonal Hadamard matrix along its last axis: (that, same shape; its [rows, K] view)."""
        base = x.name
        doc = (f"onnxq: orthogonal block-{block} Hadamard rotation of the last axis; spreads a few outlier "
               "channels over their block before quantization (the weight is rotated back offline)")
        blocks = self._var(f"{base}_blocks", np.float32, [None, block])
        self._node(graph, "Reshape", f"{base}/ReshapeBlocks", [x, self._shape(f"{base}_block_shape", [-1, block])], [blocks], doc)
        if block not in self._hadamards:
            self._hadamards[block] = self._const(f"hadamard_{block}", hadamard(block).astype(np.float32))
        rot = self._var(f"{base}_blocks_rotated", np.float32, [None, block])
        self._node(graph, "MatMul", f"{base}/Hadamard", [blocks, self._hadamards[block]], [rot], doc)
        out = self._var(f"{base}_rotated", np.float32, x.shape)
        self._node(graph, "Reshape", f"{base}/ReshapeBack", [rot, shape], [out], doc)
        rows = self._var(f"{base}_rotated_rows", np.float32, [None, k])
        self._node(graph, "Reshape", f"{base}/ReshapeRows", [rot, self._shape(f"{base}_rows_shape", [-1, k])], [rows], doc)
        return out, rows

    def _transpose_input(self, graph: gs.Graph, node: gs.Node, x: gs.Variable) -> gs.Variable:
        out = self._var(f"{x.name}_transposed", np.float32)
        self._node(graph, "Transpose", f"{node.name}/TransposeA", [x], [out], perm=[1, 0])
        return out

    def _quantize_activation(self, graph: gs.Graph, x: gs.Variable, per_row: bool, k: int, block: int) -> _Activation:
        base = x.name
        shape = self._var(f"{base}_shape", np.int64)
        if block or per_row:
            self._node(graph, "Shape", f"{base}/Shape", [x], [shape])
        if block:
            x, rows = self._rotate(graph, x, shape, k, block)
        elif per_row:
            rows = self._var(f"{base}_rows", np.float32, [None, k])
            self._node(graph, "Reshape", f"{base}/ReshapeRows", [x, self._shape(f"{base}_rows_shape", [-1, k])], [rows])
        if not per_row:
            q = self._var(f"{base}_quantized", np.uint8, x.shape)
            s = self._var(f"{base}_scale", np.float32, [])
            z = self._var(f"{base}_zero_point", np.uint8, [])
            doc = "onnxq: dynamic activation quantization, uint8 affine, one scale per tensor, computed at run time"
            self._node(graph, "DynamicQuantizeLinear", f"{base}/DynamicQuantizeLinear", [x], [q, s, z], doc)
            return _Activation(q, s, z)
        doc = "onnxq: dynamic activation quantization, one scale per row (last axis), symmetric: uint8 codes 128 +- 127"
        hi = self._reduce(graph, "ReduceMax", x, f"{base}_row_max", doc)
        lo = self._reduce(graph, "ReduceMin", x, f"{base}_row_min", doc)
        neg = self._var(f"{base}_row_min_negated", np.float32)
        self._node(graph, "Neg", f"{base}/Neg", [lo], [neg], doc)
        amax = self._var(f"{base}_row_absmax", np.float32)
        self._node(graph, "Max", f"{base}/MaxAbs", [hi, neg], [amax], doc)
        raw = self._var(f"{base}_row_scale_raw", np.float32)
        qmax = self._const(f"{base}_qmax", np.array(ROW_QMAX, np.float32))
        self._node(graph, "Div", f"{base}/DivQmax", [amax, qmax], [raw], doc)
        scale = self._var(f"{base}_row_scale", np.float32)
        floor = self._const(f"{base}_row_scale_floor", np.array(ROW_SCALE_FLOOR, np.float32))
        self._node(graph, "Max", f"{base}/MaxFloor", [raw, floor], [scale], doc)
        # per-axis QuantizeLinear over the [rows, K] view: x / s_row, round half to even, + 128, saturate
        flat = self._var(f"{base}_row_scale_flat", np.float32, [None])
        self._node(graph, "Reshape", f"{base}/ReshapeScale", [scale, self._shape(f"{base}_flat", [-1])], [flat], doc)
        nrows = self._var(f"{base}_rows_count", np.int64, [1])
        self._node(graph, "Shape", f"{base}/ShapeScale", [flat], [nrows], doc)
        zp = self._var(f"{base}_row_zero_point", np.uint8, [None])
        zp_one = self._const(f"{base}_zero_point", np.array(ROW_ZERO_POINT, np.uint8))
        self._node(graph, "Expand", f"{base}/ExpandZeroPoint", [zp_one, nrows], [zp], doc)
        q2 = self._var(f"{base}_rows_quantized", np.uint8, [None, k])
        self._node(graph, "QuantizeLinear", f"{base}/QuantizeLinear", [rows, flat, zp], [q2], doc, axis=0)
        q = self._var(f"{base}_quantized", np.uint8, x.shape)
        self._node(graph, "Reshape", f"{base}/ReshapeQuantized", [q2, shape], [q], doc)
        # scale = (largest row scale, a run-time scalar) x (row factor <= 1): the scalar part keeps the product
        # in the Mul(Cast(MatMulInteger), Mul(a_scale, w_scale)) form ONNX Runtime fuses; one Mul applies the rest
        top = self._var(f"{base}_scale", np.float32, [])
        self._node(graph, "ReduceMax", f"{base}/ReduceMaxRows", [scale], [top], doc, keepdims=0)
        factor = self._var(f"{base}_row_factor", np.float32)
        self._node(graph, "Div", f"{base}/DivRows", [scale, top], [factor], doc)
        a_zp = self._const(f"{base}_zero_point_scalar", np.array(ROW_ZERO_POINT, np.uint8))
        return _Activation(q, top, a_zp, factor)

    def _reduce(self, graph: gs.Graph, op: str, x: gs.Tensor, name: str, doc: str) -> gs.Variable:
        """``op`` over the last axis, keepdims (axes as an input from opset 18, an attribute before)."""
        out = self._var(name, np.float32)
        base = x.name
        if self._opset >= 18:
            axes = self._const(f"{base}_last_axis", np.array([-1], np.int64))
            self._node(graph, op, f"{base}/{op}", [x, axes], [out], doc, keepdims=1)
        else:
            self._node(graph, op, f"{base}/{op}", [x], [out], doc, axes=[-1], keepdims=1)
        return out

    def _rewrite(self, graph: gs.Graph, node: gs.Node, act: _Activation, w: _Weight, per_row: bool) -> None:
        """Replace ``node`` by the integer product and its float rescaling, writing the node's own output."""
        base = node.name or node.outputs[0].name
        out = node.outputs[0]
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        node.outputs.clear()
        node.inputs.clear()

        gran = "per-row" if per_row else "per-tensor"
        doc = (f"onnxq: dynamic int8 ({node.op} '{node.name}'): {gran} activations x weight {w.scheme}"
               f"{', alpha folded into the scale' if alpha != 1.0 else ''}")  # fmt: skip
        mm_inputs: list[gs.Tensor] = [act.q, w.q, act.zero_point]
        zp_w = np.unique(w.zero_point)
        if zp_w.size != 1 or int(zp_w[0]) != 0:
            b_zp = zp_w.reshape(()) if zp_w.size == 1 else w.zero_point.reshape(-1)
            mm_inputs.append(self._const(f"{base}_b_zero_point", b_zp.astype(w.scheme.dtype.numpy_dtype)))
        acc = self._var(f"{base}_int32", np.int32)
        self._node(graph, "MatMulInteger", f"{base}/MatMulInteger", mm_inputs, [acc], doc)
        accf = self._var(f"{base}_int32_float", np.float32)
        self._node(graph, "Cast", f"{base}/Cast", [acc], [accf], doc, to=onnx.TensorProto.FLOAT)
        y = out if bias is None else self._var(f"{base}_product", np.float32)
        w_scale = (w.scale.astype(np.float64) * alpha).astype(np.float32)
        sc = self._const(f"{base}_weight_scale", w_scale)
        # Mul(Cast(MatMulInteger), Mul(x_scale, w_scale)): the pattern ONNX Runtime fuses into
        # MatMulIntegerToFloat (and, after DynamicQuantizeLinear, into DynamicQuantizeMatMul)
        scale = self._var(f"{base}_scale", np.float32)
        self._node(graph, "Mul", f"{base}/MulScales", [act.scale, sc], [scale], doc)
        if act.row_factor is None:
            self._node(graph, "Mul", f"{base}/Mul", [accf, scale], [y], doc)
        else:
            prod = self._var(f"{base}_scaled", np.float32)
            self._node(graph, "Mul", f"{base}/Mul", [accf, scale], [prod], doc)
            self._node(graph, "Mul", f"{base}/MulRowFactor", [prod, act.row_factor], [y], doc)
        if bias is not None:
            if beta != 1.0:
                if isinstance(bias, gs.Constant):
                    bias = self._const(f"{base}_bias", (np.asarray(bias.values, np.float64) * beta).astype(np.float32))
                else:
                    scaled = self._var(f"{base}_bias_scaled", np.float32)
                    beta_c = self._const(f"{base}_beta", np.array(beta, np.float32))
                    self._node(graph, "Mul", f"{base}/MulBeta", [bias, beta_c], [scaled], doc)
                    bias = scaled
            self._node(graph, "Add", f"{base}/AddBias", [y, bias], [out], f"onnxq: Gemm '{node.name}' bias added in float")


def quantize_dynamic(graph: gs.Graph, ctx: PassContext, recipe: Recipe | None = None) -> gs.Graph:
    """Convenience function: run :class:`DynamicQuantizePass` configured from ``recipe`` (default: the
    ``int8-dynamic`` preset) on ``graph``."""
    from onnxq.presets import preset

    return DynamicQuantizePass.from_recipe(recipe or preset("int8-dynamic"))(graph, ctx).graph
