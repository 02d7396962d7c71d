"""Model I/O at the edges of onnxq: safe loading, atomic saving, hashing, opset upgrade, graphsurgeon glue.

Passes never touch files; everything that reads or writes a model goes through here so the safety rules
live in one place: external-data paths must stay inside the model's folder, writes are atomic (temporary
file, fsync, rename) and never overwrite the input, and models over protobuf's 2 GB limit are written
with their tensors in one external-data file.

This module loads, upgrades and converts models; saving is in :mod:`onnxq.model_save` and the checks of
external-data files and the model hash in :mod:`onnxq.model_files`. :func:`save_model`, :func:`model_hash`
and :data:`EXTERNAL_DATA_THRESHOLD` are re-exported here, so every name stays importable from this module.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import onnx
import onnx.version_converter
import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxq.errors import ModelLoadError, ModelSaveError
from onnxq.text import printable
from onnxq.model_checks import check_operators, check_runnable, check_versions_and_shapes, run_checker, sort_nodes
from onnxq.model_files import checked_external_files, is_external, model_hash
from onnxq.model_save import EXTERNAL_DATA_THRESHOLD, save_model

__all__ = ["load_model", "densify_sparse_initializers", "save_model", "model_hash", "upgrade_opset", "default_opset", "strip_initializer_inputs",
           "to_graph", "to_model", "model_template", "ExternalValues", "EXTERNAL_DATA_THRESHOLD"]

logger = logging.getLogger(__name__)

# Minimum IR version of element types added after IR 3 (onnx.proto's Version enum).
_DTYPE_MIN_IR = {16: 4, 17: 9, 18: 9, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11, 24: 12, 25: 13, 26: 13, 27: 14, 28: 14}


def _check_structure(model: onnx.ModelProto, path: Path) -> None:
    """Catch what protobuf parses silently: a cut at a field boundary, dangling names, random bytes."""
    bad = f"{path} looks truncated or corrupt"
    if not model.HasField("graph") or model.ir_version <= 0:
        raise ModelLoadError(f"{path} holds no ONNX graph: it is not an ONNX model, or it is truncated; re-export it")
    if model.ir_version >= 3 and not model.opset_import:
        raise ModelLoadError(f"{bad} (no opset imports after the graph); re-export or re-download it")
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    known |= {s.values.name for s in model.graph.sparse_initializer}
    produced = {o for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        missing = [n for n in node.input if n and n not in known]
        if missing and missing[0] not in produced:
            raise ModelLoadError(f"{bad}: node {node.name!r} ({node.op_type!r}) reads undefined tensor {missing[0]!r}")
        if missing:  # produced by a later node: out of order, which ONNX Runtime accepts; put it in order
            sort_nodes(model.graph, path)
            break
        known.update(node.output)
    known |= produced
    for out in model.graph.output:
        if out.name not in known:
            raise ModelLoadError(f"{bad}: graph output {out.name!r} is produced by no node; re-export it")
    for name in (*known, *(n.name for n in model.graph.node)):
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ModelLoadError(f"{bad}: the name {name!r} is not valid UTF-8; re-export it") from None
    for t in model.graph.initializer:
        _check_initializer_size(t, path)
    check_versions_and_shapes(model, path)


def _check_initializer_size(t: onnx.TensorProto, path: Path) -> None:
    """An initializer's raw bytes must hold exactly its shape's worth of elements (a corrupt or cut file
    otherwise surfaces as a reshape error deep inside a pass)."""
    if not t.HasField("raw_data") or t.data_location == onnx.TensorProto.EXTERNAL:
        return
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError(f"{path} looks corrupt: initializer {t.name!r} has element type {t.data_type}, "
                             "which ONNX does not define; re-export it") from None
    if t.data_type in (onnx.TensorProto.STRING,) or itemsize == 0:
        return
    count = 1
    for d in t.dims:
        count *= d
    want = count * itemsize
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        want = (count + 1) // 2
    elif t.data_type == getattr(onnx.TensorProto, "FLOAT4E2M1", -1):
        want = (count + 1) // 2
    if len(t.raw_data) != want:
        raise ModelLoadError(f"{path} looks truncated or corrupt: initializer {t.name!r} of shape {list(t.dims)} "
                             f"needs {want} bytes but holds {len(t.raw_data)}; re-export or re-download it")


def load_model(path: str | os.PathLike, *, load_external_data: bool = True,
               external_files: list[Path] | None = None, runnable: bool = True) -> onnx.ModelProto:
    """Load an ONNX model after validating the file and its external-data references.

    The file is parsed without external data (a file protobuf cannot decode is "truncated or corrupt")
    and its structure checked (a cut at a field boundary parses silently); every external-data location
    must stay inside the model's folder. Then the operators are checked against onnx and ONNX Runtime
    (:func:`onnxq.model_checks.check_operators`) and ``onnx.checker`` runs; a parsed model it rejects is named as such, with
    the checker's reason and node, not as a corrupt file. Only then does onnx's own loader read the data
    (unless ``load_external_data`` is False). IR < 4 initializer inputs are kept (see
    strip_initializer_inputs). ``external_files``: a list that receives the external-data files the
    model references (checked to be inside its folder). ``runnable``: also refuse what onnxq cannot run
    in ONNX Runtime (:func:`onnxq.model_checks.check_runnable`: unknown op domains, an opset newer than the installed
    runtimes, no graph outputs, impossible input shapes); ``inspect`` and ``view`` show such models.

    Raises:
        ModelLoadError: Missing, directory, empty, not ONNX, truncated, invalid or unrunnable model; one
            line with the fix.
        UnsafeModelError: External data outside the model's folder, a symlink, or missing.
    """
    path = Path(os.path.abspath(path))
    model = _parse(path)
    try:
        _check_structure(model, path)
        files = checked_external_files(model, path.parent)
        if external_files is not None:
            external_files.extend(files)
        tolerated = check_operators(model, path, runnable=runnable)
        if runnable:
            check_runnable(model, path)
        run_checker(model, path, files, tolerated if runnable else set())
        if files and load_external_data:
            onnx.load_external_data_for_model(model, str(path.parent))
    except ModelLoadError:
        raise
    except Exception as exc:  # the loader's errors, and UnicodeDecodeError from corrupt names
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{path} is not a valid ONNX model ({printable(first)}); it may be truncated or corrupt, "
                             "re-export it") from None
    logger.debug("loaded %s (IR %d, %d external data file(s))", path, model.ir_version, len(files))
    return model


def _parse(path: Path) -> onnx.ModelProto:
    """The file parsed by protobuf, without external data; ModelLoadError for what is not an ONNX file."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}; check the path")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not an ONNX file; pass the .onnx file inside it")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a regular file; pass an .onnx model file")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes); re-export or re-download the model")
    try:
        return onnx.load_model(str(path), load_external_data=False)
    except PermissionError:
        raise ModelLoadError(f"{path} is not readable; check its permissions") from None
    except Exception:
        with open(path, "rb") as f:  # ONNX files start with the ir_version field (tag 0x08)
            what = "looks like a truncated or corrupt ONNX model" if f.read(1) == b"\x08" else "is not an ONNX model"
        hint = "; a single-file ONNX model cannot exceed 2 GB" if size >= 2**31 else ""
        raise ModelLoadError(f"{path} {what}: protobuf cannot decode it{hint}; re-export or re-download it") from None


def strip_initializer_inputs(model: onnx.ModelProto) -> int:
    """Remove graph inputs that share a name with an initializer (IR < 4 style), in place; return how many.

    Quantization treats initializers as constants, which it cannot while they are overridable inputs.
    The IR version is raised to 4, the first that allows initializers that are not inputs.
    """
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    removed = len(model.graph.input) - len(keep)
    if removed:
        del model.graph.input[:]
        model.graph.input.extend(keep)
        model.ir_version = max(model.ir_version, 4)
        logger.info("removed %d graph inputs that are initializers", removed)
    return removed


def densify_sparse_initializers(model: onnx.ModelProto, max_bytes: int = 1 << 31) -> int:
    """Turn the graph's sparse initializers into dense ones, in place; return how many.

    onnx-graphsurgeon 0.6 reads a sparse initializer as all zeros (checked with a 4x4 MatMul weight), which
    would quantize the weight to zeros without a word; a dense copy is what every pass expects.

    Raises:
        ModelLoadError: A sparse initializer is larger than ``max_bytes`` dense, or its indices are invalid.
    """
    g = model.graph
    for sp in g.sparse_initializer:
        values = onnx.numpy_helper.to_array(sp.values)
        dims = tuple(int(d) for d in sp.dims)
        if math.prod(dims) * values.dtype.itemsize > max_bytes:
            raise ModelLoadError(f"sparse initializer {sp.values.name!r} of shape {list(dims)} is too large to make "
                                 "dense; store it as a dense initializer (onnxq quantizes dense weights)")
        idx = onnx.numpy_helper.to_array(sp.indices).astype(np.int64) if sp.HasField("indices") else np.arange(values.size)
        dense = np.zeros(dims, values.dtype)
        try:
            if idx.ndim == 1:
                dense.reshape(-1)[idx] = values.reshape(-1)
            else:
                dense[tuple(idx.T)] = values.reshape(-1)
        except (IndexError, ValueError):
            raise ModelLoadError(f"sparse initializer {sp.values.name!r} has indices outside its shape {list(dims)} "
                                 "or as many as its values; the model is corrupt, re-export it") from None
        g.initializer.append(onnx.numpy_helper.from_array(dense, sp.values.name))
    count = len(g.sparse_initializer)
    del g.sparse_initializer[:]
    return count


def default_opset(model: onnx.ModelProto) -> int:
    """The opset version of the default ("" / "ai.onnx") domain; ModelLoadError when there is none."""
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    raise ModelLoadError("the model imports no default-domain (ai.onnx) opset; re-export it with one")


def _min_ir_version(model: onnx.ModelProto) -> int:
    """Lowest IR version allowing the model's opsets, functions, element types and non-input initializers."""
    ir = max(4, onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    g = model.graph
    dtypes = [t.data_type for t in g.initializer]
    dtypes += [v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]]
    return max([ir, 8 if model.functions else 0] + [_DTYPE_MIN_IR.get(d, 0) for d in dtypes])


def upgrade_opset(model: onnx.ModelProto, min_opset: int) -> onnx.ModelProto:
    """Convert the model to ``min_opset`` with onnx's version converter if its default opset is lower.

    Quantization ops need recent opsets (per-axis QuantizeLinear needs 13). The IR version is raised first,
    because the converter rejects IR < 4 models whose initializers are not inputs. The input is not changed.

    Raises:
        ModelLoadError: The conversion failed; names both opsets and the node or converter's reason.
    """
    current = default_opset(model)
    if current >= min_opset:
        return model
    prefix = f"cannot upgrade the model from opset {current} to {min_opset}"
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            raise ModelLoadError(f"{prefix}: node {node.name!r} has op type {node.op_type!r}, not an ONNX operator")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    target = [onnx.helper.make_opsetid("", min_opset)]
    work.ir_version = max(work.ir_version, onnx.helper.find_min_ir_version_for(target, ignore_unknown=True))
    try:
        out = onnx.version_converter.convert_version(work, min_opset)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split("failed: ")[-1]
        raise ModelLoadError(f"{prefix}: {reason}") from None
    out.ir_version = max(out.ir_version, _min_ir_version(out))
    logger.info("upgraded opset %d -> %d (IR %d)", current, min_opset, out.ir_version)
    return out


class ExternalValues(LazyValues):
    """The values of an initializer stored in an external-data file, read from the file when first needed.

    A model loaded with ``load_external_data=False`` keeps only the file name, offset and length of each
    weight: nothing is read until a pass asks for the values (``Constant.values`` then caches a numpy copy,
    read with one ``np.fromfile``), and a weight a pass replaces (by its packed int4 form, say) is never
    held twice. Exporting the constant reads it afresh (:attr:`tensor`), so exported models never point at
    the input's data file. The locations were checked to stay inside the model's folder (``load_model``).
    """

    def __init__(self, tensor: onnx.TensorProto, base_dir: Path) -> None:  # noqa: D107 - see the class
        from onnx_graphsurgeon.importers.onnx_importer import get_itemsize, get_onnx_tensor_dtype, get_onnx_tensor_shape

        info = {e.key: e.value for e in tensor.external_data}
        self.name = tensor.name
        self.data_type = tensor.data_type
        self.path = base_dir / info["location"]
        self.offset = int(info.get("offset", 0) or 0)
        self.shape = get_onnx_tensor_shape(tensor)
        self.dtype = get_onnx_tensor_dtype(tensor)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * get_itemsize(self.dtype)
        length = info.get("length")
        if length is not None and int(length) != self.nbytes:
            raise ModelLoadError(f"initializer {tensor.name!r}: external data length {length} does not match its "
                                 f"shape {list(self.shape)} ({self.nbytes} bytes); the model is corrupt")
        if self.offset + self.nbytes > self.path.stat().st_size:
            raise ModelLoadError(f"initializer {tensor.name!r} reads past the end of {self.path.name}; the external "
                                 "data file is truncated")

    def load(self) -> np.ndarray:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(self.data_type)
        count = int(np.prod(self.shape, dtype=np.int64))
        arr = np.fromfile(self.path, dtype=np.dtype(np_dtype).newbyteorder("<"), count=count, offset=self.offset)
        return arr.astype(np_dtype, copy=False).reshape(self.shape)

    @property
    def tensor(self) -> onnx.TensorProto:  # type: ignore[override]  # gs exports LazyValues through .tensor
        return onnx.numpy_helper.from_array(self.load(), self.name)

    def __str__(self) -> str:
        return f"ExternalValues({self.path.name}@{self.offset}, shape={self.shape}, dtype={self.dtype})"


def to_graph(model: onnx.ModelProto, *, base_dir: str | os.PathLike | None = None) -> gs.Graph:
    """Import a ModelProto into the onnx-graphsurgeon Graph that passes work on.

    ``base_dir``: for a model loaded with ``load_external_data=False``, the folder its external-data paths
    are relative to; those initializers become :class:`ExternalValues`, read only when a pass needs them.
    """
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:
        raise ModelLoadError(f"onnx-graphsurgeon cannot import the model: {exc}".splitlines()[0]) from None
    if base_dir is not None:
        root = Path(base_dir)
        for t in graph.tensors().values():
            v = getattr(t, "_values", None)
            if isinstance(t, gs.Constant) and isinstance(v, LazyValues) and isinstance(v.tensor, onnx.TensorProto) \
                    and is_external(v.tensor):  # (a sparse initializer's is a SparseTensorProto)
                t._values = ExternalValues(v.tensor, root)  # noqa: SLF001 - replacing gs's lazy loader
                t.data_location = None  # once loaded (and maybe changed) it is exported inline, not "external"
    return graph


def model_template(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model-level fields :func:`to_model` restores (IR version, opsets, producer, doc string, metadata),
    in a new small ModelProto that holds no graph: the original, with its weights, can then be freed."""
    t = onnx.ModelProto()
    t.ir_version = model.ir_version
    t.opset_import.extend(model.opset_import)
    for name in ("producer_name", "producer_version", "doc_string", "domain", "model_version"):
        setattr(t, name, getattr(model, name))
    t.metadata_props.extend(model.metadata_props)
    return t


def to_model(graph: gs.Graph, *, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export a Graph to a ModelProto, restoring the template's model-level fields.

    graphsurgeon drops the model's doc_string and metadata_props, and keeps a stale default opset when a
    pass changes ``graph.opset``. This takes the default opset from the graph, other domains from the
    template and graph, and the template's IR version raised only as far as opsets and types require
    (never above onnx's own; ORT 1.32 accepts IR <= 14).

    Raises:
        ModelSaveError: graphsurgeon cannot export the graph (e.g. an input or output without a dtype).
    """
    ops = [*(template.opset_import if template is not None else []), *(graph.import_domains or [])]
    imports = {op.domain: int(op.version) for op in ops if op.domain not in ("", "ai.onnx")}
    for n in [*graph.nodes, *(n for sub in graph.subgraphs(recursive=True) for n in sub.nodes)]:
        if n.domain and n.domain != "ai.onnx":
            imports.setdefault(n.domain, 1)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in {"": int(graph.opset), **imports}.items()]
    try:
        model = gs.export_onnx(graph, opset_imports=opsets)
    except Exception as exc:
        raise ModelSaveError(f"cannot export the graph to ONNX: {exc}".splitlines()[0]) from None
    base = graph.ir_version or 0
    if template is not None:
        base = template.ir_version
        for name in ("producer_name", "producer_version", "doc_string", "domain", "model_version"):
            setattr(model, name, getattr(template, name))
        del model.metadata_props[:]
        model.metadata_props.extend(template.metadata_props)
    model.ir_version = min(max(base, _min_ir_version(model)), onnx.IR_VERSION)
    return model
