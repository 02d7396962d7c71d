"""What ``onnxq inspect`` shows: op census, dtypes, sizes and the share of compute that is quantized.

:func:`summarize` reads an ``onnx.ModelProto`` (never modifies it) and returns a :class:`ModelSummary`;
:func:`render_summary` prints it as rich tables. MACs (multiply-accumulates) of Conv/Gemm/MatMul-like
ops are estimated from shapes that ONNX shape inference finds on a weight-free copy of the graph, with
symbolic input dims set to 1. One pass over the nodes then fills two gaps of ONNX inference: outputs
of common ``com.microsoft`` ops, and shapes behind Reshape targets or Slice bounds computed by
Shape/Gather/Concat chains (old opsets have no data propagation). Ops whose shapes stay unknown have
``macs=None``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeGuard

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from onnxq.errors import ModelLoadError
from onnxq.text import markup_safe

__all__ = ["TensorInfo", "ComputeOp", "ModelSummary", "summarize", "render_summary", "share_line"]

_FLOAT_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# quantized compute op -> index of its weight input (whose dtype is the op's precision)
_QUANT_COMPUTE = {"QLinearConv": 3, "QLinearMatMul": 3, "MatMulInteger": 1, "ConvInteger": 1,
                  "com.microsoft.QGemm": 3, "com.microsoft.MatMulNBits": 1,
                  "com.microsoft.DynamicQuantizeMatMul": 1, "com.microsoft.MatMulIntegerToFloat": 1}
_PASS_THROUGH = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
_SAME_SHAPE_MS = {"QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "Gelu", "FastGelu", "QuickGelu",
                  "BiasGelu", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding"}
_SMALL = 4096  # initializers up to this many elements stay in the inference copy (Reshape targets...)
TypeMap = dict[str, tuple[int, "list[int | str | None] | None"]]


@dataclass
class TensorInfo:
    """A graph input or output: name, dtype name and shape (ints, symbolic names, None = unknown)."""

    name: str
    dtype: str
    shape: list[int | str | None] | None


@dataclass
class ComputeOp:
    """One Conv/Gemm/MatMul-like node: its MACs (None when shapes are unknown) and their precision."""

    name: str
    op_type: str
    macs: int | None
    precision: str
    quantized: bool
    weight_only: bool = False  # integer weights, float activations (MatMulNBits, DQ(int4) -> MatMul)


@dataclass
class ModelSummary:
    """Everything ``onnxq inspect`` reports about one model."""

    path: str | None
    file_bytes: int  # model file + its external data (serialized size for an in-memory model)
    ir_version: int
    opset_imports: dict[str, int]
    producer: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    node_count: int
    op_counts: dict[str, int]  # most frequent first; non-default domains qualified: com.microsoft.X
    initializer_bytes_by_dtype: dict[str, int]  # initializers and Constant-node tensors
    initializer_counts_by_dtype: dict[str, int]
    total_parameters: int
    compute_ops: list[ComputeOp]
    qdq_pairs: int  # DequantizeLinear nodes fed directly by a QuantizeLinear
    total_macs: int  # compute ops with known shapes only
    quantized_macs: int
    quantized_mac_share: float  # quantized_macs / total_macs (0.0 when there are none)
    assumed_dims: dict[str, int] = field(default_factory=dict)  # symbolic input dims set for MACs

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (``json.dumps`` takes it)."""
        return asdict(self)


def _dtype(elem: int) -> tuple[str, int]:
    """(name, bits) of an ONNX element type: ("float32", 32), ("int4", 4), ("string", 0)..."""
    try:
        dt = helper.tensor_dtype_to_np_dtype(elem)
    except Exception:  # noqa: BLE001 - UNDEFINED or a type numpy cannot name
        return "unknown", 0
    if elem == TensorProto.STRING:
        return "string", 0
    return dt.name, {"int4": 4, "uint4": 4, "float4_e2m1fn": 4, "int2": 2, "uint2": 2}.get(dt.name, dt.itemsize * 8)


def _is_quant(name: str) -> bool:  # a dtype that quantized weights/activations are stored in
    return name.startswith(("int", "uint", "float8")) and name not in ("int32", "int64", "uint32", "uint64")


def _qual(node: onnx.NodeProto) -> str:  # op type, domain-qualified outside the default domain
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _known(shape: list[int | str | None] | None) -> TypeGuard[list[int]]:  # fully static
    return shape is not None and all(isinstance(d, int) for d in shape)


def _vi_shape(vi: onnx.ValueInfoProto) -> tuple[int, list[int | str | None] | None]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return t.elem_type, None
    return t.elem_type, [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _census(graph: onnx.GraphProto, counts: dict[str, int]) -> int:
    """Count op types into ``counts`` (subgraphs included); return the number of nodes."""
    n = 0
    for node in graph.node:
        counts[_qual(node)] = counts.get(_qual(node), 0) + 1
        n += 1 + sum(_census(g, counts) for a in node.attribute
                     for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)))
    return n


def _file_bytes(model: onnx.ModelProto, path: str | os.PathLike | None) -> int:
    if path is None:
        return model.ByteSize()
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"{p}: model file not found (pass the path the model was loaded from, or None)")
    size, tensors = p.stat().st_size, list(model.graph.initializer)
    if not any(t.data_location == TensorProto.EXTERNAL for t in tensors) and size < model.ByteSize():
        tensors = list(onnx.load(str(p), load_external_data=False).graph.initializer)  # data was loaded in
    root = p.resolve().parent
    for loc in {e.value for t in tensors if t.data_location == TensorProto.EXTERNAL
                for e in t.external_data if e.key == "location"}:
        f = (root / loc).resolve()
        if f.is_relative_to(root) and f.is_file():  # never follow ../ or absolute paths out of the folder
            size += f.stat().st_size
    return size


def _ms_shape(node: onnx.NodeProto, tm: TypeMap) -> tuple[int, list[int]] | None:
    """(dtype, shape) of output 0 of a com.microsoft op that ONNX shape inference does not know."""
    ins = [tm.get(i, (0, None)) for i in node.input]
    (e0, s0), a = (ins[0] if ins else (0, None)), _attrs(node)
    if not _known(s0):
        return None
    if node.op_type in _SAME_SHAPE_MS:
        return e0, s0
    s3 = ins[3][1] if len(ins) > 3 else None
    if node.op_type in ("QLinearAdd", "QLinearMul") and _known(s3):
        return e0, list(np.broadcast_shapes(tuple(s0), tuple(s3)))
    if node.op_type == "QLinearGlobalAveragePool" and len(s0) >= 3:
        return e0, [s0[0]] + [1] * (len(s0) - 2) + [s0[-1]] if a.get("channels_last") else s0[:2] + [1] * (len(s0) - 2)
    if node.op_type == "MatMulNBits":
        return e0, s0[:-1] + [int(a["N"])]  # type: ignore[call-overload]
    if node.op_type in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat") and len(ins) > 2 and _known(ins[1][1]):
        return ins[2][0], s0[:-1] + [ins[1][1][-1]]
    return None


def _fold(n: onnx.NodeProto, tm: TypeMap, vals: dict[str, np.ndarray]) -> None:
    """Evaluate one node of small integer shape arithmetic (Shape, Gather, Concat...) into ``vals``."""
    # the inputs are None where not folded; the guard below returns before any of them is read as None
    a, ins, op = _attrs(n), list[Any]([vals.get(i) for i in n.input]), n.op_type
    try:
        if op == "Shape" and _known(tm.get(n.input[0], (0, None))[1]):
            out = np.array(tm[n.input[0]][1], np.int64)[a.get("start", 0):a.get("end", None)]
        elif op == "Constant" and "value" in a and math.prod(a["value"].dims) <= _SMALL:  # type: ignore[attr-defined]
            out = numpy_helper.to_array(a["value"])  # type: ignore[arg-type]
        elif not ins or any(x is None for x in (ins if op in ("Concat", "Add", "Sub", "Mul", "Div") else ins[:1])):
            return
        elif op == "Gather" and ins[1] is not None:
            out = np.take(ins[0], ins[1], axis=int(a.get("axis", 0)))  # type: ignore[call-overload]
        elif op in ("Unsqueeze", "Squeeze"):
            axes = a.get("axes", ins[1] if len(ins) > 1 else None)
            f = np.expand_dims if op == "Unsqueeze" else np.squeeze
            out = f(ins[0], tuple(int(x) for x in axes)) if axes is not None else np.squeeze(ins[0])  # type: ignore
        elif op == "Concat":
            out = np.concatenate([np.atleast_1d(x) for x in ins], axis=int(a.get("axis", 0)))  # type: ignore[call-overload]
        elif op == "Slice" and len(ins) >= 3 and ins[1] is not None and ins[2] is not None:
            sl = [slice(None)] * ins[0].ndim
            axes = ins[3] if len(ins) > 3 and ins[3] is not None else range(len(ins[1]))
            steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1] * len(ins[1])
            for st, en, ax, sp in zip(ins[1], ins[2], axes, steps):
                sl[int(ax)] = slice(int(st), int(en), int(sp))
            out = ins[0][tuple(sl)]
        elif op in ("Add", "Sub", "Mul", "Div"):
            binops: dict[str, Callable[[Any, Any], Any]] = {
                "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": lambda x, y: np.trunc(x / y)}
            out = np.asarray(binops[op](ins[0], ins[1])).astype(ins[0].dtype)
        elif op == "Cast":
            out = ins[0].astype(helper.tensor_dtype_to_np_dtype(int(a["to"])))  # type: ignore[call-overload]
        else:
            return
        if np.asarray(out).dtype.kind in "iu":
            vals[n.output[0]] = np.asarray(out)
    except Exception:  # noqa: BLE001 - folding is best effort
        return


def _infer(model: onnx.ModelProto) -> tuple[TypeMap, dict[str, int]]:
    """Dtypes and shapes of all tensors: ONNX inference on a copy without large weights, then one pass
    over the nodes that fills what it missed (com.microsoft ops, shapes behind computed Reshape targets)."""
    src, sk = model.graph, onnx.ModelProto(ir_version=model.ir_version)
    sk.opset_import.extend(model.opset_import)
    g = sk.graph
    g.node.extend(src.node)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    inits, assumed = {t.name for t in src.initializer}, {}
    g.input.extend(src.input)
    for vi in g.input:
        for d in vi.type.tensor_type.shape.dim if vi.name not in inits else []:
            if not d.HasField("dim_value"):
                assumed[d.dim_param or "?"] = 1
                d.dim_value = 1
    listed = {vi.name for vi in src.input}
    for t in src.initializer:
        if math.prod(t.dims) <= _SMALL and t.data_location != TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in listed:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inf = onnx.shape_inference.infer_shapes(sk, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; keep what is known
        inf = sk
    types = {vi.name: vi.type for vi in [*inf.graph.input, *inf.graph.output, *inf.graph.value_info]}
    types.update({t.name: helper.make_tensor_type_proto(t.data_type, list(t.dims)) for t in src.initializer})
    tm: TypeMap = {k: _vi_shape(helper.make_value_info(k, v)) for k, v in types.items()}
    vals = {t.name: numpy_helper.to_array(t) for t in g.initializer if t.data_type in (TensorProto.INT64, TensorProto.INT32)}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    for n in src.node:
        if n.output and not all(_known(tm.get(o, (0, None))[1]) for o in n.output if o):
            got: dict[str, onnx.TypeProto] = {}
            try:
                if n.domain == "com.microsoft" and (ms := _ms_shape(n, tm)) is not None:
                    got = {n.output[0]: helper.make_tensor_type_proto(*ms)}
                elif n.domain in ("", "ai.onnx") and all(i in types for i in n.input if i):
                    schema = onnx.defs.get_schema(n.op_type, opset, "")
                    got = onnx.shape_inference.infer_node_outputs(
                        schema, n, {i: types[i] for i in n.input if i},
                        {i: numpy_helper.from_array(vals[i], i) for i in n.input if i in vals},
                        opset_imports=list(model.opset_import), ir_version=model.ir_version)
            except Exception:  # noqa: BLE001 - an op ONNX cannot infer alone (If, Loop...) stays unknown
                pass
            for k, tp in got.items():
                types[k], tm[k] = tp, _vi_shape(helper.make_value_info(k, tp))
        _fold(n, tm, vals)
    return tm, assumed


def _macs(node: onnx.NodeProto, w_idx: int, tm: TypeMap) -> int | None:
    """Multiply-accumulates of one compute node, or None when its shapes are unknown."""
    def shp(names: list[str], i: int) -> list[int] | None:
        s = tm.get(names[i], (0, None))[1] if i < len(names) and names[i] else None
        return s if _known(s) else None

    a, op = _attrs(node), node.op_type
    x, w, y = shp(list(node.input), 0), shp(list(node.input), w_idx), shp(list(node.output), 0)
    if op in ("Conv", "QLinearConv", "ConvInteger"):
        return math.prod(y) * math.prod(w[1:]) if y and w else None  # N*Cout*out_spatial * Cin/g*kernel
    if op == "ConvTranspose":
        return math.prod(x) * math.prod(w[1:]) if x and w else None  # N*Cin*in_spatial * Cout/g*kernel
    if op == "MatMulNBits":
        rows = math.prod(x[:-1]) if x else (math.prod(y[:-1]) if y else None)
        return rows * int(a["K"]) * int(a["N"]) if rows is not None else None  # type: ignore[call-overload]
    if op in ("Gemm", "QGemm"):
        k = (x[0] if a.get("transA") else x[1]) if x else ((w[1] if a.get("transB") else w[0]) if w else None)
        if y and k:
            return math.prod(y) * k
        return (x[1] if a.get("transA") else x[0]) * k * (w[0] if a.get("transB") else w[1]) if x and w and k else None
    k = x[-1] if x else (w[-2] if w and len(w) > 1 else (w[0] if w else None))  # MatMul-like
    if y and k:
        return math.prod(y) * k
    return math.prod(x) * (w[-1] if len(w) > 1 else 1) if x and w else None


def summarize(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> ModelSummary:
    """Summarize ``model``; ``path`` (the file it came from) lets ``file_bytes`` count what is on disk."""
    g = model.graph
    tm, assumed = _infer(model)
    producers = {o: n for n in g.node for o in n.output}

    def dtype_of(tensor: str) -> str:
        return _dtype(tm.get(tensor, (0, None))[0])[0]

    def dq_dtype(tensor: str) -> str | None:
        """The quantized dtype reaching ``tensor`` through a DequantizeLinear (layout ops skipped)."""
        n = producers.get(tensor)
        while n is not None and n.op_type in _PASS_THROUGH and n.input:
            n = producers.get(n.input[0])
        ok = n is not None and n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx", "com.microsoft")
        return dtype_of(n.input[0]) if ok and _is_quant(dtype_of(n.input[0])) else None  # type: ignore[union-attr]

    compute: list[ComputeOp] = []
    for n in g.node:
        qual = _qual(n)
        if qual in _QUANT_COMPUTE:
            wi = _QUANT_COMPUTE[qual]
            prec = dtype_of(n.input[wi]) if wi < len(n.input) else "unknown"
            if n.op_type == "MatMulNBits":
                prec = f"int{_attrs(n).get('bits', 4)}"
            compute.append(ComputeOp(n.name, qual, _macs(n, wi, tm), prec if _is_quant(prec) else "integer",
                                     True, n.op_type == "MatMulNBits"))
        elif qual in _FLOAT_COMPUTE and len(n.input) > 1:
            wq, aq = dq_dtype(n.input[1]), dq_dtype(n.input[0])
            prec = wq or (dtype_of(n.input[0]) if dtype_of(n.input[0]) != "unknown" else dtype_of(n.input[1]))
            compute.append(ComputeOp(n.name, qual, _macs(n, 1, tm), prec, wq is not None, bool(wq and not aq)))

    nbits = {n.input[1]: _attrs(n) for n in g.node if n.op_type == "MatMulNBits" and len(n.input) > 1}
    by_bytes: dict[str, int] = {}
    by_count: dict[str, int] = {}
    params = 0
    constants = [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in [*g.initializer, *constants]:
        (name, bits), numel = _dtype(t.data_type), math.prod(t.dims)
        by_bytes[name] = by_bytes.get(name, 0) + (sum(map(len, t.string_data)) if bits == 0 else -(-numel * bits // 8))
        by_count[name] = by_count.get(name, 0) + 1
        a = nbits.get(t.name, {})
        params += int(a["K"]) * int(a["N"]) if "K" in a and "N" in a else numel  # type: ignore[call-overload]
    total, qmacs = sum(o.macs or 0 for o in compute), sum(o.macs or 0 for o in compute if o.quantized)
    order = sorted(by_bytes, key=lambda k: -by_bytes[k])
    inits, counts = {t.name for t in g.initializer}, dict[str, int]()  # IR 3: initializers are also listed as inputs
    node_count = _census(g, counts)
    info = [TensorInfo(vi.name, _dtype(e)[0], sh) for vi in [*g.input, *g.output] for e, sh in [_vi_shape(vi)]]
    qdq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input and n.input[0] in producers]
    return ModelSummary(
        path=os.fspath(path) if path is not None else None, file_bytes=_file_bytes(model, path),
        ir_version=model.ir_version, opset_imports={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        producer=" ".join(x for x in (model.producer_name, model.producer_version) if x),
        inputs=[t for t in info[:len(g.input)] if t.name not in inits], outputs=info[len(g.input):],
        node_count=node_count, op_counts=dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        initializer_bytes_by_dtype={k: by_bytes[k] for k in order},
        initializer_counts_by_dtype={k: by_count[k] for k in order},
        total_parameters=params, compute_ops=compute, assumed_dims=assumed, total_macs=total,
        quantized_macs=qmacs, quantized_mac_share=qmacs / total if total else 0.0,
        qdq_pairs=sum(producers[n.input[0]].op_type == "QuantizeLinear" for n in qdq),
    )


def _human(n: float, unit: str = "") -> str:
    """300774272 -> '300.8 M' (+ ' unit')."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {suffix} {unit}".rstrip()
    return f"{n:.0f} {unit}".rstrip()


def _bytes(n: int) -> str:
    for scale, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n} B"


def share_line(s: ModelSummary) -> str:
    """``quantized compute: 98.7% of 300.8 M MACs (52 of 53 Conv/Gemm/MatMul ops)``."""
    ops = s.compute_ops
    if not ops:
        return "quantized compute: no Conv/Gemm/MatMul ops"
    unknown = sum(op.macs is None for op in ops)
    extra = f"; MACs unknown for {unknown}" if unknown else ""
    return (f"quantized compute: {100 * s.quantized_mac_share:.1f}% of {_human(s.total_macs, 'MACs')} "
            f"({sum(op.quantized for op in ops)} of {len(ops)} Conv/Gemm/MatMul ops{extra})")


def _table(console: Console, title: str, cols: list[str], rows: list[list[object]]) -> None:
    """Print a bold title line, then a borderless table; a leading '>' right-aligns a column."""
    console.print(markup_safe(title), style="bold")
    t = Table(box=None, pad_edge=False, header_style="dim")
    for c in cols:
        t.add_column(c.lstrip(">"), justify="right" if c.startswith(">") else "left")
    for r in rows:
        t.add_row(*(markup_safe(x) for x in r))
    console.print(t)


def render_summary(summary: ModelSummary, console: Console) -> None:
    """Print ``summary`` as a few compact rich tables and the quantized-compute line."""
    s = summary
    console.print(markup_safe(f"{s.path or '<in-memory model>'}: {_bytes(s.file_bytes)}, IR {s.ir_version}, opsets "
                         + ", ".join(f"{d} {v}" for d, v in s.opset_imports.items())
                         + (f", producer {s.producer}" if s.producer else "")), style="bold")

    def shp(t: TensorInfo) -> str:
        return "?" if t.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in t.shape) + "]"

    assumed = f" (MACs below take {', '.join(s.assumed_dims)} = 1)" if s.assumed_dims else ""
    _table(console, "inputs / outputs" + assumed, ["", "name", "dtype", "shape"],
           [[k, t.name, t.dtype, shp(t)] for k, ts in (("in", s.inputs), ("out", s.outputs)) for t in ts])
    items = list(s.op_counts.items())
    cols = 1 if len(items) <= 12 else 3
    rows = -(-len(items) // cols)
    cell = [(items[k] if k < len(items) else ("", "")) for k in range(rows * cols)]
    _table(console, f"ops: {s.node_count} nodes, {len(items)} types", ["op", ">count"] * cols,
           [[x for c in range(cols) for x in cell[c * rows + r]] for r in range(rows)])
    _table(console, f"weights: {_human(s.total_parameters)} parameters", ["dtype", ">tensors", ">size"],
           [[k, s.initializer_counts_by_dtype[k], _bytes(b)] for k, b in s.initializer_bytes_by_dtype.items()])
    groups: dict[tuple[str, str], list[ComputeOp]] = {}
    for op in s.compute_ops:
        groups.setdefault((op.op_type, op.precision + (" weight-only" if op.weight_only else "")), []).append(op)
    rows_c = []
    for (op_type, prec), ops in sorted(groups.items(), key=lambda kv: -sum(o.macs or 0 for o in kv[1])):
        m, unk = sum(o.macs or 0 for o in ops), sum(o.macs is None for o in ops)
        rows_c.append([op_type, prec, len(ops), _human(m) + (f" (+{unk} unknown)" if unk else ""),
                       f"{100 * m / s.total_macs:.1f}%" if s.total_macs else "-"])
    if rows_c:
        _table(console, "compute", ["op", "precision", ">ops", ">MACs", ">share"], rows_c)
    console.print(f"QDQ pairs: {s.qdq_pairs}")
    console.print(markup_safe(share_line(s)), style="bold")
