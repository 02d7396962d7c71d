"""Convert a float32 model to float16 (or bfloat16), keeping fragile ops and, optionally, the interface float32.

What changes, per float32 tensor and node:

* every node the ONNX spec lets run in the half type computes in it: its float32 inputs and outputs become
  float16, ``Cast(to=FLOAT)`` becomes ``Cast(to=FLOAT16)`` (likewise ``dtype`` attributes), ``Constant``
  and ``ConstantOfShape`` values are converted. Inputs the spec types as float32 only (``Resize``
  ``scales``) stay float32;
* nodes kept in float32: op types in ``op_block_list`` (:data:`DEFAULT_BLOCK_LIST`: normalisations,
  softmax and reductions, whose sums overflow or lose precision in float16, box ops and ops without
  float16 in the spec), names in ``node_block_list``, ops whose schema has no half type (``Range``,
  ``ai.onnx.ml`` ops), ops of other domains (no schema to check), nodes with subgraphs (If/Loop/Scan:
  bodies are left as they are), nodes reading a tensor whose type is unknown, a ``Pow``/``Exp``/square
  ``Mul`` whose only readers are float32 (x*x overflows float16 above 256 before the reduction sees it),
  and data movement (Reshape, Transpose, ...) from a float32 value to float32 readers;
* a ``Cast`` is inserted wherever a value crosses between the two: ``<node>/cast_to_float32`` before a
  kept node, ``<node>/cast_to_float16`` after it (one per value, shared by all its readers);
* initializers are converted where a half-precision node reads them (a float32 copy, ``<name>/float32``,
  is kept for float32 readers). Finite values beyond the half type's range are clamped to its largest
  value (``values_clamped``); non-zero values too small for it become 0 (``values_flushed_to_zero``);
* ``keep_io_types`` (default): graph inputs and outputs stay float32, with ``<input>/cast_to_float16``
  after each input and ``<output>/cast_to_float32`` producing each output (its producer now writes
  ``<output>/float16``). Without it they become float16.

A graph that already holds float16 or bfloat16 tensors is left untouched (``modified=False``).

ONNX Runtime's CPU execution provider (1.32, x86-64) has float16 kernels only for a few ops (Clip, Min,
Max, LayerNormalization, data movement); for the others it inserts its own Casts and runs them in float32,
so a float16 model loads and runs there but is slower than float32. The float16 model is for GPUs and
other half-capable execution providers. ``bfloat16`` models are valid ONNX but ORT's CPU provider cannot
run most of their ops.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.pipeline import Pass, PassContext, PassResult
from onnxq.recipe import FLOAT16_BLOCK_LIST, Float16Spec, Recipe

__all__ = ["DEFAULT_BLOCK_LIST", "Float16Pass", "convert_float16"]

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_LIST: tuple[str, ...] = FLOAT16_BLOCK_LIST
"""Op types kept float32 unless told otherwise (defined with the recipe as ``FLOAT16_BLOCK_LIST``)."""

_F32 = np.dtype(np.float32)
_HALF = {
    "float16": (np.dtype(np.float16), onnx.TensorProto.FLOAT16),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), onnx.TensorProto.BFLOAT16),
}
_HALF_ENUMS = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)

#: Ops that only move data: kept float32 when their input already is, so no Cast pair is spent on them.
_MOVE_OPS = frozenset({
    "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice", "Split",
    "Gather", "GatherElements", "GatherND", "Tile", "Pad", "DepthToSpace", "SpaceToDepth",
})  # fmt: skip
#: Ops that blow up in float16 before a kept reduction reads them (x^2, exp(x)).
_FEEDER_OPS = frozenset({"Pow", "Exp"})


def _is_f32(dtype: object) -> bool:
    if dtype is None:
        return False
    if isinstance(dtype, (int, np.integer)):
        return int(dtype) == onnx.TensorProto.FLOAT
    try:
        return np.dtype(dtype) == _F32  # type: ignore[call-overload]
    except TypeError:
        return False


def _is_half(dtype: object) -> bool:
    if dtype is None:
        return False
    if isinstance(dtype, (int, np.integer)):
        return int(dtype) in _HALF_ENUMS
    try:
        return np.dtype(dtype).name in ("float16", "bfloat16")  # type: ignore[call-overload]
    except TypeError:
        return False


def _subgraphs(node: gs.Node) -> list[gs.Graph]:
    out: list[gs.Graph] = []
    for val in node.attrs.values():
        for g in val if isinstance(val, (list, tuple)) else [val]:
            if isinstance(g, gs.Graph):
                out.append(g)
    return out


def _all_nodes(graph: gs.Graph) -> Iterator[gs.Node]:
    yield from graph.nodes
    for sub in graph.subgraphs(recursive=True):
        yield from sub.nodes


def _has_half(graph: gs.Graph) -> bool:
    for g in [graph, *graph.subgraphs(recursive=True)]:
        if any(_is_half(t.dtype) for t in g.tensors().values()):
            return True
        for node in g.nodes:
            for key, val in node.attrs.items():
                if isinstance(val, gs.Constant) and _is_half(val.dtype):
                    return True
                if key in ("to", "dtype") and isinstance(val, int) and val in _HALF_ENUMS:
                    return True
    return False


def _is_sorted(graph: gs.Graph) -> bool:
    """Whether every node's inputs are produced before it (ONNX requires it; passes may append nodes)."""
    seen = {id(t) for t in graph.inputs}
    for node in graph.nodes:
        if any(isinstance(t, gs.Variable) and t.name and t.inputs and id(t) not in seen for t in node.inputs):
            return False
        seen.update(id(t) for t in node.outputs)
    return True


def _to_half(values: object, half: np.dtype) -> tuple[np.ndarray, int, int]:
    """``values`` as the half type: finite values beyond its range clamped; counts (clamped, flushed)."""
    v = np.asarray(values, dtype=np.float32)
    fmax = float(ml_dtypes.finfo(half).max)
    over = np.isfinite(v) & (np.abs(v) > fmax)
    clamped = int(over.sum())
    if clamped:
        v = np.where(over, np.copysign(np.float32(fmax), v), v).astype(np.float32)
    out = v.astype(half)
    flushed = int(np.count_nonzero((out == 0) & (v != 0)))
    return out, clamped, flushed


@dataclass
class _Plan:
    """Which nodes compute in the half type and what each float32 value becomes."""

    converted: dict[int, set[int]] = field(default_factory=dict)  # id(node) -> half output slots
    half_inputs: dict[int, set[int]] = field(default_factory=dict)  # id(node) -> half input slots
    kept: dict[int, str] = field(default_factory=dict)  # id(node) -> why it stays float32
    home: dict[int, bool] = field(default_factory=dict)  # id(Variable) -> True when it becomes half
    float_outputs: set[int] = field(default_factory=set)  # ids of the graph outputs that were float32


class _Converter:
    def __init__(self, graph: gs.Graph, dtype: str, keep_io_types: bool, op_block_list: Sequence[str],
                 node_block_list: Sequence[str]) -> None:  # fmt: skip
        if dtype not in _HALF:
            raise ValueError(f"dtype must be 'float16' or 'bfloat16', got '{dtype}'")
        self.graph = graph
        self.kind = dtype
        self.half, self.half_enum = _HALF[dtype]
        self.half_str = f"tensor({dtype})"
        self.keep_io = keep_io_types
        self.op_block = frozenset(op_block_list)
        self.node_block = frozenset(node_block_list)
        self.opsets = {"": int(graph.opset)}
        for imp in graph.import_domains or []:
            dom = "" if imp.domain in ("", "ai.onnx") else imp.domain
            self.opsets.setdefault(dom, int(imp.version))
        self.counts = {"initializers_converted": 0, "values_clamped": 0, "values_flushed_to_zero": 0,
                       "casts_inserted": 0, "nodes_converted": 0, "nodes_kept_float32": 0}  # fmt: skip
        self.names = set(graph.tensors().keys()) | {n.name for n in _all_nodes(graph)}
        self.plan = _Plan()

    # ------------------------------------------------------------------------------------ helpers
    def _unique(self, name: str) -> str:
        cand, k = name, 1
        while cand in self.names:
            cand, k = f"{name}_{k}", k + 1
        self.names.add(cand)
        return cand

    def _schema(self, node: gs.Node) -> onnx.defs.OpSchema | None:
        domain = "" if node.domain in (None, "", "ai.onnx") else node.domain
        try:
            if domain in self.opsets:
                return onnx.defs.get_schema(node.op, self.opsets[domain], domain)
            return onnx.defs.get_schema(node.op, domain)
        except onnx.defs.SchemaError:
            return None

    def _half_slot(self, schema: onnx.defs.OpSchema, index: int, *, output: bool) -> bool:
        params = schema.outputs if output else schema.inputs
        if index < len(params):
            p = params[index]
        elif params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
            p = params[-1]
        else:
            return False
        allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
        return self.half_str in allowed.get(p.type_str, [p.type_str])

    @staticmethod
    def _float_attrs(node: gs.Node) -> bool:
        if node.op == "Constant" and any(k in node.attrs for k in ("value_float", "value_floats")):
            return True
        if node.op == "ConstantOfShape" and "value" not in node.attrs:
            return True  # the default value is a float32 zero
        return any(
            (isinstance(v, gs.Constant) and _is_f32(v.dtype)) or (k in ("to", "dtype") and v == onnx.TensorProto.FLOAT)
            for k, v in node.attrs.items()
        )

    def _is_home_half(self, t: gs.Tensor) -> bool | None:
        """Whether a float32 Variable becomes half (None: a Constant, decided by its readers)."""
        if isinstance(t, gs.Constant):
            return None
        return self.plan.home.get(id(t), False)

    # ------------------------------------------------------------------------------------ planning
    def plan_nodes(self) -> None:
        plan = self.plan
        if not _is_sorted(self.graph):
            self.graph.toposort()
        plan.float_outputs = {id(t) for t in self.graph.outputs if _is_f32(t.dtype)}
        for inp in self.graph.inputs:
            if _is_f32(inp.dtype):
                plan.home[id(inp)] = not self.keep_io
        for node in self.graph.nodes:
            f_in = [i for i, t in enumerate(node.inputs) if _is_f32(t.dtype)]
            f_out = [j for j, t in enumerate(node.outputs) if _is_f32(t.dtype)]
            untyped = [t.name for t in node.inputs if isinstance(t, gs.Variable) and t.name and t.dtype is None]
            if not (f_in or f_out or untyped or self._float_attrs(node)):
                continue  # touches no float32 value
            why = self._why_kept(node, f_in, f_out, untyped)
            if why is None:
                schema = self._schema(node)
                assert schema is not None
                h_in = {i for i in f_in if self._half_slot(schema, i, output=False)}
                h_out = {j for j in f_out if self._half_slot(schema, j, output=True)}
                if not h_in and not h_out and (f_in or f_out):
                    why = f"no {self.kind} in the ONNX schema of {node.op}"
                else:
                    plan.converted[id(node)], plan.half_inputs[id(node)] = h_out, h_in
                    for j in h_out:
                        plan.home[id(node.outputs[j])] = True
                    continue
            plan.kept[id(node)] = why
        self._keep_tails()

    def _why_kept(self, node: gs.Node, f_in: list[int], f_out: list[int], untyped: list[str]) -> str | None:
        if node.op in self.op_block:
            return "block list"
        if node.name in self.node_block:
            return "node block list"
        if _subgraphs(node):
            return "has subgraphs (bodies are not converted)"
        if self._schema(node) is None:
            return f"no ONNX schema for {node.domain or 'ai.onnx'}::{node.op}"
        if untyped:
            return f"input type unknown ({', '.join(untyped[:3])}); run shape_inference first"
        return None

    def _keep_tails(self) -> None:
        """Keep float32, where only float32 readers (kept nodes, float32 outputs) use the result: x^2 and
        exp(x), which overflow float16 first, and data movement of a float32 value (saves a Cast pair)."""
        plan, main = self.plan, {id(n) for n in self.graph.nodes}
        outputs = {id(t) for t in self.graph.outputs}
        readers: dict[int, list[gs.Node]] = {}
        for node in _all_nodes(self.graph):
            for t in node.inputs:
                readers.setdefault(id(t), []).append(node)
        for node in reversed(self.graph.nodes):
            if id(node) not in plan.converted or len(node.outputs) != 1:
                continue
            out = node.outputs[0]
            users = readers.get(id(out), [])
            if id(out) in outputs and not self.keep_io or not (users or id(out) in outputs):
                continue
            if not all(id(u) in plan.kept or id(u) not in main for u in users):
                continue
            square = node.op == "Mul" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]
            if node.op in _FEEDER_OPS or square:
                why = "feeds only float32 nodes (overflows in float16 first)"
            elif node.op in _MOVE_OPS and not any(self._is_home_half(t) for t in node.inputs if _is_f32(t.dtype)):
                why = "moves a float32 value to float32 readers"
            else:
                continue
            del plan.converted[id(node)], plan.half_inputs[id(node)]
            plan.home[id(out)] = False
            plan.kept[id(node)] = why

    # ------------------------------------------------------------------------------------ rewriting
    def _uses(self) -> list[tuple[gs.Node, int, bool]]:
        """Every read of a float32 main-graph value: (node, input slot, wants half)."""
        plan, uses = self.plan, []
        main = {id(t) for t in self.graph.tensors().values()}
        for node in self.graph.nodes:
            half_in = plan.half_inputs.get(id(node), set())
            for i, t in enumerate(node.inputs):
                if _is_f32(t.dtype):
                    uses.append((node, i, i in half_in))
            for sub in _subgraphs(node):  # outer-scope values read inside kept bodies stay float32
                for g in [sub, *sub.subgraphs(recursive=True)]:
                    for inner in g.nodes:
                        for i, t in enumerate(inner.inputs):
                            if id(t) in main and _is_f32(t.dtype):
                                uses.append((inner, i, False))
        return uses

    def convert_constants(self, uses: list[tuple[gs.Node, int, bool]]) -> None:
        by_const: dict[int, list[tuple[gs.Node, int, bool]]] = {}
        consts: dict[int, gs.Constant] = {}
        for node, i, wants_half in uses:
            t = node.inputs[i]
            if isinstance(t, gs.Constant):
                by_const.setdefault(id(t), []).append((node, i, wants_half))
                consts[id(t)] = t
        out_ids = {id(t): not self.keep_io for t in self.graph.outputs if isinstance(t, gs.Constant)}
        for cid, c in consts.items():
            reads = by_const[cid]
            wants = {w for _, _, w in reads}
            if cid in out_ids:
                wants.add(out_ids[cid])
            if True not in wants:
                continue
            original = np.asarray(c.values)
            if False in wants:  # float32 readers get a float32 copy; the original name goes to the output's type
                main_half = out_ids.get(cid, True)
                other = gs.Constant(self._unique(f"{c.name}/{'float32' if main_half else self.kind}"), original)
                for node, i, w in reads:
                    if w != main_half:
                        node.inputs[i] = other
                target = c if main_half else other
            else:
                target = c
            self._convert_constant(target, original)

    def _convert_constant(self, c: gs.Constant, values: np.ndarray) -> None:
        c.values, clamped, flushed = _to_half(values, self.half)
        c.export_dtype = None
        self.counts["initializers_converted"] += 1
        self.counts["values_clamped"] += clamped
        self.counts["values_flushed_to_zero"] += flushed
        if clamped or flushed:
            logger.debug("float16: initializer %s: %d values clamped, %d flushed to zero", c.name, clamped, flushed)

    def convert_nodes(self) -> None:
        plan = self.plan
        for t in self.graph.tensors().values():
            if isinstance(t, gs.Variable) and plan.home.get(id(t)) and _is_f32(t.dtype):
                t.dtype = self.half
        for node in self.graph.nodes:
            if id(node) not in plan.converted:
                continue
            self.counts["nodes_converted"] += 1
            if not plan.converted[id(node)]:
                continue  # only its inputs are half (Shape, Cast to int, ...)
            for key, val in list(node.attrs.items()):
                if isinstance(val, gs.Constant) and _is_f32(val.dtype):
                    self._convert_constant(val, np.asarray(val.values))
                elif key in ("to", "dtype") and val == onnx.TensorProto.FLOAT:
                    node.attrs[key] = self.half_enum
            if node.op == "Constant" and ("value_float" in node.attrs or "value_floats" in node.attrs):
                raw = node.attrs.pop("value_float", None)
                raw = node.attrs.pop("value_floats", raw)
                node.attrs["value"] = gs.Constant(f"{node.name}/value", np.asarray(raw, np.float32))
                self._convert_constant(node.attrs["value"], np.asarray(raw, np.float32))
            if node.op == "ConstantOfShape" and "value" not in node.attrs:
                node.attrs["value"] = gs.Constant(f"{node.name}/value", np.zeros(1, self.half))

    def insert_casts(self, uses: list[tuple[gs.Node, int, bool]]) -> None:
        made: dict[tuple[int, bool], gs.Variable] = {}
        producers = {id(t): n for n in self.graph.nodes for t in n.outputs}
        for node, i, wants_half in uses:
            t = node.inputs[i]
            if isinstance(t, gs.Constant) or self._is_home_half(t) == wants_half:
                continue
            key = (id(t), wants_half)
            if key not in made:
                made[key] = self._cast(t, wants_half, producers.get(id(t)), node)
            node.inputs[i] = made[key]
        done: set[int] = set()
        for out in self.graph.outputs:
            if isinstance(out, gs.Constant) or id(out) not in self.plan.float_outputs or id(out) in done:
                continue
            done.add(id(out))
            wants_half, is_half = not self.keep_io, bool(self.plan.home.get(id(out)))
            if wants_half == is_half or out in self.graph.inputs:
                continue
            shared = made.get((id(out), wants_half))
            if shared is not None:  # a Cast of this value already exists: it now writes the output itself
                self._rename_everywhere(out, gs.Variable(self._unique(f"{out.name}/{self.kind if is_half else 'float32'}"),
                                                         self.half if is_half else _F32, out.shape))  # fmt: skip
                self._rename_everywhere(shared, out)
                out.dtype = self.half if wants_half else _F32
                continue
            inner = gs.Variable(self._unique(f"{out.name}/{self.kind if is_half else 'float32'}"),
                                self.half if is_half else _F32, out.shape)  # fmt: skip
            self._rename_everywhere(out, inner)
            out.dtype = self.half if wants_half else _F32
            to = self.kind if wants_half else "float32"
            self.graph.nodes.append(gs.Node("Cast", self._unique(f"{out.name}/cast_to_{to}"),
                                            {"to": self.half_enum if wants_half else onnx.TensorProto.FLOAT},
                                            [inner], [out]))  # fmt: skip
            self.counts["casts_inserted"] += 1

    def _rename_everywhere(self, old: gs.Tensor, new: gs.Tensor) -> None:
        for n in _all_nodes(self.graph):
            for slots in (n.inputs, n.outputs):
                for s, t in enumerate(slots):
                    if t is old:
                        slots[s] = new

    def _cast(self, t: gs.Tensor, to_half: bool, producer: gs.Node | None, reader: gs.Node) -> gs.Variable:
        to = self.kind if to_half else "float32"
        if to_half:  # leaving a float32 region: named after where the value comes from
            base = producer.name if producer is not None and producer.name else t.name
        else:  # entering a kept node: named after it
            base = reader.name or t.name
        if t in self.graph.inputs:
            base = t.name
        out = gs.Variable(self._unique(f"{t.name}/{to}"), self.half if to_half else _F32, t.shape)
        enum = self.half_enum if to_half else onnx.TensorProto.FLOAT
        self.graph.nodes.append(gs.Node("Cast", self._unique(f"{base}/cast_to_{to}"), {"to": enum}, [t], [out]))
        self.counts["casts_inserted"] += 1
        return out

    def run(self) -> bool:
        self.plan_nodes()
        if not self.plan.converted:
            return False
        uses = self._uses()
        self.convert_constants(uses)
        self.convert_nodes()
        self.insert_casts(uses)
        self.counts["nodes_kept_float32"] = len(self.plan.kept)
        self.graph.toposort()
        return True

    def kept_summary(self) -> str:
        by: Counter[tuple[str, str]] = Counter()
        for node in self.graph.nodes:
            if id(node) in self.plan.kept:
                by[(node.op, self.plan.kept[id(node)])] += 1
        return "; ".join(f"{op} x{n} ({why})" for (op, why), n in sorted(by.items()))


def _convert(graph: gs.Graph, dtype: str, keep_io_types: bool, op_block_list: Sequence[str],
             node_block_list: Sequence[str]) -> tuple[bool, dict[str, int], list[str]]:  # fmt: skip
    if _has_half(graph):
        return False, {}, ["the model already holds float16/bfloat16 tensors; left as it is"]
    if any(isinstance(t, gs.Variable) and t.dtype is None for t in graph.tensors().values()):
        from onnxq.passes.shape_inference import infer_into_graph

        infer_into_graph(graph)
    conv = _Converter(graph, dtype, keep_io_types, op_block_list, node_block_list)
    if not conv.run():
        return False, conv.counts, ["no float32 computation to convert"]
    notes = []
    if conv.plan.kept:
        notes.append(f"kept float32: {conv.kept_summary()}")
    notes.append(f"{dtype} model: ONNX Runtime's CPU provider runs most {dtype} ops in float32 behind its own "
                 "Casts (slower than float32); use a GPU or another half-capable provider")  # fmt: skip
    return True, conv.counts, notes


class Float16Pass(Pass):
    """Convert float32 computation to float16 / bfloat16 (see the module docstring).

    Arguments left as None come from ``spec`` (the recipe's ``[float16]`` table, :class:`onnxq.recipe.Float16Spec`,
    given by :meth:`from_recipe`; default: ``dtype`` ``"float16"``, ``keep_io_types`` True, ``op_block_list``
    :data:`DEFAULT_BLOCK_LIST`, ``node_block_list`` empty).

    counts: ``initializers_converted``, ``values_clamped`` (finite values beyond the half range),
    ``values_flushed_to_zero``, ``casts_inserted``, ``nodes_converted``, ``nodes_kept_float32``.
    """

    name = "float16"
    reported_counts = ("nodes_converted", "initializers_converted", "nodes_kept_float32", "casts_inserted", "values_clamped")  # fmt: skip
    reports_notes = True
    in_place = True

    def __init__(self, dtype: str | None = None, keep_io_types: bool | None = None,
                 op_block_list: Sequence[str] | None = None, node_block_list: Sequence[str] | None = None,
                 *, spec: Float16Spec | None = None) -> None:  # fmt: skip
        if dtype is not None and dtype not in _HALF:
            raise ValueError(f"dtype must be 'float16' or 'bfloat16', got '{dtype}'")
        self.dtype, self.keep_io_types = dtype, keep_io_types
        spec = spec or Float16Spec()
        self.settings = Float16Spec(
            dtype=dtype or spec.dtype,  # type: ignore[arg-type]
            keep_io_types=spec.keep_io_types if keep_io_types is None else keep_io_types,
            op_block_list=tuple(spec.op_block_list if op_block_list is None else op_block_list),
            node_block_list=tuple(spec.node_block_list if node_block_list is None else node_block_list),
        )

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Float16Pass:
        return cls(spec=recipe.float16)

    def runs_on_ort_cpu(self) -> bool:
        """bfloat16 output: ONNX Runtime's CPU provider has no bfloat16 kernels for most ops."""
        return self.settings.dtype != "bfloat16"

    def node_names(self) -> list[tuple[str, str]]:
        return [("float16.node_block_list entry", n) for n in self.settings.node_block_list]

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        s = self.settings
        modified, counts, notes = _convert(graph, s.dtype, s.keep_io_types, s.op_block_list, s.node_block_list)
        logger.info("float16 (%s): modified=%s %s", s.dtype, modified, counts)
        return PassResult(graph, modified, counts, notes)

    def __repr__(self) -> str:
        return f"Float16Pass(dtype={self.dtype!r}, keep_io_types={self.keep_io_types!r})"


def convert_float16(
    graph: gs.Graph,
    *,
    dtype: str = "float16",
    keep_io_types: bool = True,
    op_block_list: Sequence[str] = DEFAULT_BLOCK_LIST,
    node_block_list: Sequence[str] = (),
) -> gs.Graph:
    """Convenience form of :class:`Float16Pass`: convert ``graph`` in place and return it."""
    _convert(graph, dtype, keep_io_types, op_block_list, node_block_list)
    return graph
