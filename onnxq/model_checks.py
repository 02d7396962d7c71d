"""What onnxq checks in a model that parses, before any work: is it valid, and can onnxq run it?

:func:`onnxq.model.load_model` parses a file and checks its structure; this module holds the checks on
the parsed model, so that each failure is one line naming the culprit (node, op type and domain; opset
and the highest supported; tensor and shape) and the fix, never "truncated or corrupt" for a file that
parsed, and never an internal error late in the pipeline:

* :func:`check_operators`: every op is known to onnx or to ONNX Runtime (contrib ops ORT runs are fine
  even where ``onnx.checker`` objects); ops of unknown domains are refused when the model must run.
* :func:`check_runnable`: what onnxq cannot run (an opset newer than the installed onnx/onnxruntime, no
  graph outputs, non-tensor graph inputs/outputs, duplicate node names, string initializers, inputs no
  sample can fill).
* :func:`validate`: ``onnx.checker`` where onnx has the schemas, ONNX Runtime where only it has them (contrib
  ops); :func:`run_checker` is its form for loading (the reason and node when it rejects the model).
* :func:`sort_nodes`: a graph whose nodes are out of order (ONNX Runtime accepts it, ``onnx.checker``
  and onnxq's passes do not) is put in topological order instead of being called corrupt.

ONNX Runtime's operator list comes from its schema registry (``get_all_operator_schema``), read once.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import re
from pathlib import Path
from typing import Iterator

import onnx

from onnxq.errors import ModelLoadError
from onnxq.text import printable

__all__ = ["ModelCheckError", "check_operators", "check_runnable", "check_versions_and_shapes", "run_checker",
           "highest_opset", "ort_only_nodes", "sort_nodes", "validate"]

logger = logging.getLogger(__name__)


def run_checker(model: onnx.ModelProto, path: Path, files: list[Path], tolerated: set[str]) -> None:
    """Validate a parsed model at load (:func:`validate`); ModelLoadError with the reason, node and op type.

    ``tolerated``: op types onnx does not know but ONNX Runtime runs (:func:`check_operators`). onnx.checker
    skips such nodes (they are moved to a domain it does not check) and checks the rest of the graph; the
    model is then loaded in ONNX Runtime, whose schemas validate those nodes. A model without them is checked
    by onnx.checker alone, as before.
    """
    try:
        validate(model, path=path if files else None, ort_load=bool(tolerated) and bool(ort_only_nodes(model)))
    except ModelCheckError as exc:
        raise ModelLoadError(printable(f"{path} is a readable ONNX model, but {exc}; fix the exporter's output "
                                       "or re-export it")) from None


class ModelCheckError(Exception):
    """A model onnx.checker or ONNX Runtime rejects; the message is one line naming the checker, reason and node."""


#: The domain the nodes only ONNX Runtime knows are moved to in the copy onnx.checker sees (it skips unknown domains).
ORT_ONLY_DOMAIN = "onnxq.ort_only"
_ORT_MAX_BYTES = 1_900_000_000  # a model this large is not serialised for an ORT load (protobuf's 2 GB limit)


def ort_only_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes (subgraphs included) onnx has no schema for at the model's opset but ONNX Runtime has."""
    imports = {_domain_name(o.domain): int(o.version) for o in model.opset_import}
    return [node for node in _all_nodes(model.graph) if _ort_only(node, imports)]


def _onnx_knows(node: onnx.NodeProto, domain: str, version: int) -> bool:
    """Whether onnx has a schema for the node's op (default domains only) at the model's opset ``version``."""
    return domain in ("ai.onnx", "ai.onnx.ml") and onnx.defs.has(node.op_type, version, "" if domain == "ai.onnx" else domain)


def _ort_knows(node: onnx.NodeProto, domain: str, version: int) -> bool:
    """Whether ONNX Runtime has a schema for the node's op at the model's opset ``version`` of its domain."""
    since = _ort_ops().get("" if domain == "ai.onnx" else domain, {}).get(node.op_type)
    return since is not None and since <= max(version, 1)


def _ort_only(node: onnx.NodeProto, imports: dict[str, int]) -> bool:
    domain = _domain_name(node.domain)
    version = imports.get(domain, 1)
    return not _onnx_knows(node, domain, version) and _ort_knows(node, domain, version)


def validate(model: onnx.ModelProto, *, path: Path | None = None, full_check: bool = False, ort_load: bool = True,
             optimization: str = "disable") -> None:
    """Check a model with onnx.checker where onnx has the schemas and with ONNX Runtime where only it has them.

    onnx.checker stops at the first node it has no schema for (``SimplifiedLayerNormalization`` in the
    default domain, as onnxruntime-genai's builder writes it), so tolerating its complaint would leave the
    rest of the graph unchecked. Instead it checks a shallow copy in which the nodes only ORT knows
    (:func:`ort_only_nodes`) are moved to :data:`ORT_ONLY_DOMAIN`, which it skips; external-data initializers
    (files checked at load) are graph inputs there. With ``ort_load`` the real model is then loaded in ONNX
    Runtime (with ``optimization``, see :func:`onnxq._ort.make_session`), whose schemas validate those nodes; from ``path`` when given (external
    data is resolved beside it), else from the serialised model when under 1.9 GB. A model without such nodes
    is checked as it is (by ``path`` when given: onnx resolves external data against the CWD otherwise).

    Raises:
        ModelCheckError: one line: which checker, its first reason, and the node and op type it names.
    """
    special = ort_only_nodes(model)
    try:
        if special:
            onnx.checker.check_model(_checker_copy(model), full_check=full_check)
        else:
            onnx.checker.check_model(str(path) if path is not None else model, full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelCheckError(f"the onnx checker (onnx {onnx.__version__}) rejects it: {_one_line(str(exc))}") from None
    if ort_load and (path is not None or model.ByteSize() < _ORT_MAX_BYTES):
        from onnxq._ort import make_session

        try:
            make_session(str(path) if path is not None else model.SerializeToString(), optimization=optimization)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelCheckError(f"{_ort_version()} rejects it: {_one_line(str(exc))}") from None


def _one_line(text: str) -> str:
    """The first line of a checker's message, with the node and op type it names (onnx's and ORT's forms)."""
    first = (text.strip().splitlines() or ["(no message)"])[0]
    first = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first)
    first = first.split(", Error ", 1)[-1]  # ORT's "invalid model" lines print the whole node before the reason
    node = (re.search(r"Name: ?(.*?) OpType: ?(\S+)", text) or re.search(r"Node \(([^)]*)\) Op \(([^)]*)\)", text)
            or re.search(r"Node\(([^)]*)\) with schema\([^:]*::(\w+):", text))  # fmt: skip
    where = f" (node {node.group(1)!r}, op type {node.group(2)!r})" if node else ""
    return first.rstrip(".") + where


def _checker_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The copy of ``model`` onnx.checker sees: ORT-only nodes in :data:`ORT_ONLY_DOMAIN`, external-data
    initializers as graph inputs (their files were checked at load, and their data is not in memory)."""
    copy = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(copy, field, getattr(model, field))
    copy.opset_import.extend(model.opset_import)
    copy.opset_import.add(domain=ORT_ONLY_DOMAIN, version=1)
    copy.functions.extend(model.functions)
    src, g = model.graph, copy.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    inputs = {i.name for i in src.input}
    for t in src.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    imports = {_domain_name(o.domain): int(o.version) for o in model.opset_import}
    for node in _all_nodes(g):
        if _ort_only(node, imports):
            node.domain = ORT_ONLY_DOMAIN
    return copy


_DEFAULT_DOMAINS = ("", "ai.onnx")


def _domain_name(domain: str) -> str:
    return "ai.onnx" if domain in _DEFAULT_DOMAINS else domain


@functools.lru_cache(maxsize=1)
def _ort_ops() -> dict[str, dict[str, int]]:
    """ONNX Runtime's operator schemas: domain ("" for ai.onnx) -> op type -> first opset version.

    Empty when this onnxruntime build does not expose its schemas (then nothing is refused for ORT's sake).
    """
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        schemas = ort_c.get_all_operator_schema()
    except Exception:  # noqa: BLE001 - any build without the schema registry
        return {}
    ops: dict[str, dict[str, int]] = {}
    for s in schemas:
        by_op = ops.setdefault("" if s.domain == "ai.onnx" else s.domain, {})
        by_op[s.name] = min(by_op.get(s.name, s.since_version), s.since_version)
    return ops


def _ort_version() -> str:
    try:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    except ImportError:  # pragma: no cover - onnxq needs it, but loading a model does not
        return "onnxruntime (not installed)"


def highest_opset(domain: str) -> int:
    """The newest opset of ``domain`` ("" / "ai.onnx" or "ai.onnx.ml") that both onnx and ONNX Runtime know."""
    ours = onnx.defs.onnx_opset_version() if domain in _DEFAULT_DOMAINS else onnx.defs.onnx_ml_opset_version()
    ort_ops = _ort_ops().get("" if domain in _DEFAULT_DOMAINS else domain)
    return min(ours, max(ort_ops.values())) if ort_ops else ours


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A graph and its subgraphs (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(g)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of a graph and of its subgraphs."""
    for g in _graphs(graph):
        yield from g.node


def _node_label(node: onnx.NodeProto) -> str:
    return f"node {node.name!r} (op type {node.op_type!r}, domain {_domain_name(node.domain)!r})"


def check_operators(model: onnx.ModelProto, path: Path | str, *, runnable: bool = True) -> set[str]:
    """Check every node's operator against onnx and ONNX Runtime; return the op types only ORT knows.

    A default-domain (ai.onnx / ai.onnx.ml) op neither knows at the model's opset is refused (a typo, or a
    newer operator than the installed packages). With ``runnable``, so is an op of a domain ONNX Runtime
    does not implement (a custom ``com.example`` op) or an unknown ``com.microsoft`` op: onnxq calibrates
    and checks models in ONNX Runtime, so it cannot work on them. Ops of the model's local functions are
    fine. A domain used without an opset import (ORT accepts that for its contrib domains) gets one.
    The returned op types are those ``onnx.checker`` may reject although ORT runs them (contrib ops, or
    standard ops newer than the installed onnx), so that the checker does not block loading.
    """
    imports = {_domain_name(o.domain): int(o.version) for o in model.opset_import}
    functions = {(f.domain, f.name) for f in model.functions}
    ort_ops = _ort_ops()
    tolerated: set[str] = set()
    for node in _all_nodes(model.graph):
        domain = _domain_name(node.domain)
        if (node.domain, node.op_type) in functions:
            continue
        if domain not in imports and domain not in ("ai.onnx", "ai.onnx.ml"):
            model.opset_import.append(onnx.helper.make_opsetid(domain, 1))  # what ORT assumes
            imports[domain] = 1
            logger.info("added the missing opset import of domain %r (version 1)", domain)
        version = imports.get(domain, 0)
        ort_knows = _ort_knows(node, domain, version)
        if domain in ("ai.onnx", "ai.onnx.ml"):
            if _onnx_knows(node, domain, version):
                continue
            if ort_knows:
                tolerated.add(node.op_type)
                continue
            raise ModelLoadError(printable(
                f"{path}: {_node_label(node)} is not an operator of {domain} opset {version} that onnx "
                f"{onnx.__version__} or {_ort_version()} knows; check the op name, or, if it is a newer operator, "
                "upgrade onnx and onnxruntime or export with an opset that has it"))
        if ort_knows:
            tolerated.add(node.op_type)
        elif runnable:
            raise ModelLoadError(printable(_unrunnable_op(node, domain, path, domain in ort_ops)))
    return tolerated


def _unrunnable_op(node: onnx.NodeProto, domain: str, path: Path | str, ort_domain: bool) -> str:
    """The one-line refusal of an op ONNX Runtime cannot run (an ORT domain it lacks, or a custom domain)."""
    if ort_domain:
        why = f"which {_ort_version()} does not implement in that domain"
    else:
        why = (f"a custom domain that neither onnx nor {_ort_version()} implements, and the model defines no "
               "function for it")
    return (f"{path}: {_node_label(node)} uses {why}; onnxq runs the model in ONNX Runtime to calibrate and check "
            "it, so it cannot quantize it: replace the op with standard ONNX ops (re-export without the custom "
            "op), or quantize the model without it")


_NON_TENSOR = {"sequence_type": "a sequence", "map_type": "a map", "optional_type": "an optional",
               "sparse_tensor_type": "a sparse tensor", "opaque_type": "an opaque value"}
_MAX_INPUT_ELEMENTS = 2**31  # one sample of an input larger than this (8 GiB as float32) cannot be fed


def check_runnable(model: onnx.ModelProto, path: Path | str) -> None:
    """Refuse, up front and in one line, a model that parses and checks but cannot run in ONNX Runtime.

    An opset newer than the installed onnx and onnxruntime support, a graph with no outputs, a graph
    input or output that is not a tensor (a ZipMap's sequence of maps), two nodes with the same name,
    a string initializer and a graph input whose fixed shape no sample can have
    (over 2**31 elements) would otherwise fail late, after calibration, as an internal error.
    """
    for op in model.opset_import:
        domain = _domain_name(op.domain)
        if domain in ("ai.onnx", "ai.onnx.ml") and op.version > highest_opset(op.domain):
            raise ModelLoadError(f"{path} uses {domain} opset {op.version}, but the installed onnx {onnx.__version__} "
                                 f"and {_ort_version()} support up to opset {highest_opset(op.domain)}: export "
                                 f"the model with opset {highest_opset(op.domain)} or lower, or upgrade both")
    if not model.graph.output:
        raise ModelLoadError(f"{path}: the graph has no outputs, so there is nothing to compute or compare; "
                             "re-export it with its outputs marked as graph outputs")
    _check_names_and_constants(model, path)
    for kind, vi in [*(("input", v) for v in model.graph.input), *(("output", v) for v in model.graph.output)]:
        if vi.type.WhichOneof("value") != "tensor_type":
            raise ModelLoadError(printable(
                f"{path}: graph {kind} {vi.name!r} is {_NON_TENSOR.get(vi.type.WhichOneof('value'), 'of no type')}, "
                "not a tensor; onnxq works on tensor graphs only: export the model without it (for a scikit-learn "
                "classifier, without ZipMap: options={'zipmap': False})"))
    for vi in model.graph.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
        if math.prod(dims) > _MAX_INPUT_ELEMENTS:
            raise ModelLoadError(printable(
                f"{path}: graph input {vi.name!r} has the fixed shape {_shape_text(vi)} ({math.prod(dims):.3g} "
                "elements in one sample), more than any sample can hold; re-export it with the real input size "
                "or a named (dynamic) dimension"))


def _check_names_and_constants(model: onnx.ModelProto, path: Path | str) -> None:
    """Two nodes of one graph with the same name (ONNX Runtime refuses the model), and string initializers
    (onnx-graphsurgeon, onnxq's graph editor, cannot write them back), refused by name."""
    for g in _graphs(model.graph):
        seen: set[str] = set()
        for node in g.node:
            if node.name and node.name in seen:
                raise ModelLoadError(printable(
                    f"{path}: two nodes of graph {g.name!r} are named {node.name!r}; ONNX Runtime refuses such "
                    "models, so onnxq cannot calibrate or check it: give the nodes unique names (re-export it)"))
            seen.add(node.name)
        strings = [t.name for t in g.initializer if t.data_type == onnx.TensorProto.STRING]
        if strings:
            raise ModelLoadError(printable(
                f"{path}: initializer {strings[0]!r} holds strings, which onnxq's graph editor (onnx-graphsurgeon) "
                "cannot write back, so it cannot quantize this model: do the string processing (tokenizing, "
                "label lookup) outside the model, or quantize the numeric part exported on its own"))


def _shape_text(vi: onnx.ValueInfoProto) -> str:
    """[1, 'batch', 3, ?] for a value info's shape."""
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]
    return "[" + ", ".join(map(str, dims)) + "]"


def check_versions_and_shapes(model: onnx.ModelProto, path: Path | str) -> None:
    """An IR version newer than the installed onnx reads, and negative dimensions, refused by name."""
    if model.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(f"{path} has IR version {model.ir_version}, newer than the installed onnx "
                             f"{onnx.__version__} reads (up to {onnx.IR_VERSION}); upgrade onnx and onnxruntime, "
                             "or export the model with an older IR version")
    g = model.graph
    for kind, vi in [*(("graph input", v) for v in g.input), *(("graph output", v) for v in g.output)]:
        t = vi.type.tensor_type
        if vi.type.WhichOneof("value") == "tensor_type" and not (t.elem_type and t.HasField("shape")):
            missing = "an element type" if not t.elem_type else "a shape (not even its rank)"
            raise ModelLoadError(printable(f"{path}: {kind} {vi.name!r} is a tensor without {missing}, which ONNX "
                                           "requires of graph inputs and outputs: re-export the model with it "
                                           "(unknown dimensions can be named)"))
    for vi in (*g.input, *g.output, *g.value_info):
        if any(d.HasField("dim_value") and d.dim_value < 0 for d in vi.type.tensor_type.shape.dim):
            raise ModelLoadError(printable(
                f"{path}: tensor {vi.name!r} has the shape {_shape_text(vi)}; a dimension cannot be negative "
                "(an unknown one is a named dimension, dim_param): re-export the model"))


def sort_nodes(graph: onnx.GraphProto, path: Path | str) -> None:
    """Put ``graph.node`` in topological order, in place, keeping the given order wherever it is free.

    ONNX Runtime runs a graph whatever the order of its nodes; ``onnx.checker`` and onnxq's passes need
    producers before consumers. Kahn's algorithm with a heap on the original position: O(n log n).

    Raises:
        ModelLoadError: The graph has a cycle (names a node on it).
    """
    nodes = list(graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    deps = [{producer[x] for x in n.input if x in producer and producer[x] != i} for i, n in enumerate(nodes)]
    users: list[list[int]] = [[] for _ in nodes]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    waiting = [len(ds) for ds in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):
        stuck = nodes[next(i for i, w in enumerate(waiting) if w > 0)]
        raise ModelLoadError(printable(f"{path}: the graph has a cycle through node {stuck.name!r} ({stuck.op_type}); "
                                       "an ONNX graph must be acyclic: re-export the model"))
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    logger.info("%s: nodes were out of topological order; sorted", path)
