"""Pack a :class:`~onnxq.weightonly.grid.QuantizedWeight` into the two ONNX deployment formats.

``com.microsoft.MatMulNBits`` (ONNX Runtime contrib op, one node)
    ``Y = A @ dequant(B)``. ``B`` is uint8 ``[N, n_blocks, blob_size]`` (``blob_size = block_size * bits / 8``):
    column ``n``'s codes along K, zero-padded to ``n_blocks * block_size``, two 4-bit codes per byte with
    the first in the low nibble. ``scales`` is float32 ``[N, n_blocks]``; ``zero_points`` is uint8
    ``[N, ceil(n_blocks * bits / 8)]`` packed the same way (an odd 4-bit count is padded with 8, as ORT's
    own quantizer does) and is left out when every zero point is the op's default ``2**(bits - 1)`` (every
    symmetric grid). Attributes ``K``, ``N``, ``bits``, ``block_size`` (a power of two >= 16; a per-channel
    weight uses the next power of two >= max(16, K), its one block zero-padded) and ``accuracy_level``.
    These are the shapes of ORT 1.32's operator schema and of its ``matmul_nbits_quantizer`` (older ORT
    releases wrote the same bytes flattened to 1-D; :meth:`MatMulNBitsArrays.from_node` reads both).

``DequantizeLinear`` (opset 21) + ``MatMul``
    The plain-ONNX form that any runtime reads (ORT fuses it into MatMulNBits itself). Asymmetric weights
    are UINT4 / UINT8 ``[K, N]`` codes with a zero point of the same type; symmetric ones are INT4 / INT8
    codes ``q - 2**(bits - 1)`` without a zero point. Blocked weights use ``axis=0, block_size`` with
    ``[n_blocks, N]`` scales; per-channel weights a per-axis ``axis=1`` DequantizeLinear with ``[N]`` scales.
    With graph optimisations on, ORT 1.32 fuses the pair into MatMulNBits with ``accuracy_level`` 4 (int8
    activations, not exact) unless the session option ``session.qdq_matmulnbits_accuracy_level`` says 0.

Both formats compute exactly :meth:`QuantizedWeight.dequantize`, ``(q - zero_point) * scale`` in
float32; ``tests/test_weight_pack.py`` checks it bit for bit in ORT. :func:`to_matmulnbits` and
:func:`to_dequantize_matmul` rewrite one MatMul of an onnx-graphsurgeon graph into either form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxq.errors import PassError
from onnxq.graphs import FreshNames
from onnxq.weightonly.grid import QuantizedWeight

__all__ = [
    "MS_DOMAIN",
    "MatMulNBitsArrays",
    "DQArrays",
    "pack_matmulnbits",
    "unpack_matmulnbits",
    "pack_dequantize_linear",
    "to_matmulnbits",
    "to_dequantize_matmul",
    "ensure_opset",
]

MS_DOMAIN = "com.microsoft"
_PASS = "weight_only"
_ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # unset, fp32, fp16, bf16, int8 (ORT's MatMulNBits schema)


@dataclass(frozen=True)
class MatMulNBitsArrays:
    """The inputs and attributes of one ``com.microsoft.MatMulNBits`` node (see the module docstring).

    Attributes:
        b: uint8 ``[N, n_blocks, block_size * bits // 8]``, packed codes.
        scales: float32 ``[N, n_blocks]``.
        zero_points: uint8 ``[N, ceil(n_blocks * bits / 8)]``, or None for the default ``2**(bits - 1)``.
        k, n, bits, block_size: the node's attributes ``K``, ``N``, ``bits``, ``block_size``.
    """

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int
    bits: int
    block_size: int

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.k / self.block_size)

    @property
    def attrs(self) -> dict[str, int]:
        """``K``, ``N``, ``bits`` and ``block_size`` (``accuracy_level`` is the caller's choice)."""
        return {"K": self.k, "N": self.n, "bits": self.bits, "block_size": self.block_size}

    @classmethod
    def from_node(cls, node: gs.Node) -> MatMulNBitsArrays:
        """Read the constants and attributes of a MatMulNBits node (for inspection and round trips).

        Also accepts the 1-D ``[N * n_blocks]`` scales and zero points that older ORT quantizers wrote.

        Raises:
            ValueError: the node is not MatMulNBits, has non-constant weights, or uses ``g_idx``.
        """
        if node.op != "MatMulNBits" or node.domain != MS_DOMAIN:
            raise ValueError(f"node {node.name!r} is {node.domain or 'ai.onnx'}.{node.op}, not {MS_DOMAIN}.MatMulNBits")
        ins = list(node.inputs) + [None] * (6 - len(node.inputs))
        if len(node.inputs) > 4 and ins[4] is not None and ins[4].name:
            raise ValueError(f"MatMulNBits {node.name!r} uses the deprecated g_idx input, which onnxq does not read")
        for i, t in enumerate(ins[1:4], start=1):
            if i < 3 or (t is not None and t.name):
                if not isinstance(t, gs.Constant):
                    raise ValueError(f"MatMulNBits {node.name!r}: input {i} is not a constant initializer")
        k, n, bits, bs = (int(node.attrs[a]) for a in ("K", "N", "bits", "block_size"))
        nb = math.ceil(k / bs)
        zp_t = ins[3]
        zp = None
        if zp_t is not None and zp_t.name:
            zp = np.asarray(zp_t.values)
            if zp.dtype != np.uint8:
                raise ValueError(f"MatMulNBits {node.name!r}: unpacked {zp.dtype} zero points are not read, only uint8")
            zp = zp.reshape(n, -1)
        scales = np.asarray(ins[2].values).reshape(n, nb)
        return cls(np.asarray(ins[1].values, np.uint8), scales, zp, k, n, bits, bs)


@dataclass(frozen=True)
class DQArrays:
    """The inputs and attributes of one ``DequantizeLinear`` node holding a weight (see the module docstring).

    Attributes:
        data: ``[K, N]`` codes: ml_dtypes uint4 / int4 for 4 bits, numpy uint8 / int8 for 8 bits.
        scale: float32 ``[n_blocks, N]`` (blocked) or ``[N]`` (per-channel).
        zero_point: same dtype as ``data`` and shape as ``scale``, or None (symmetric: signed codes).
        axis: 0 (blocked along K) or 1 (per output channel).
        block_size: the ``block_size`` attribute, or None for per-channel.
    """

    data: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int
    block_size: int | None

    @property
    def attrs(self) -> dict[str, int]:
        return {"axis": self.axis} if self.block_size is None else {"axis": self.axis, "block_size": self.block_size}


def _is_default_zp(qw: QuantizedWeight) -> bool:
    """Whether every zero point is ``2**(bits - 1)``, the zero point MatMulNBits assumes when none is given."""
    return bool(np.all(np.asarray(qw.zero_points) == 2 ** (qw.grid.bits - 1)))


def _nbits_block_size(qw: QuantizedWeight) -> int:
    """The ``block_size`` attribute: the grid's, or for per-channel the next power of two >= max(16, K)."""
    if qw.grid.block_size is not None:
        return qw.grid.block_size
    return 1 << (max(16, qw.shape[0]) - 1).bit_length()


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pairs along the last axis (even length) into bytes, the first code in the low nibble."""
    c = codes.astype(np.uint8)
    return (c[..., 0::2] & 0x0F) | ((c[..., 1::2] & 0x0F) << 4)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def _check_qw(qw: QuantizedWeight) -> None:
    k, n = qw.shape
    nb = qw.grid.n_blocks(k)
    if np.shape(qw.scales) != (nb, n) or np.shape(qw.zero_points) != (nb, n):
        raise ValueError(
            f"a [{k}, {n}] weight on grid {qw.grid} needs [{nb}, {n}] scales and zero points, "
            f"got {np.shape(qw.scales)} and {np.shape(qw.zero_points)}"
        )
    if int(np.max(qw.q, initial=0)) > qw.grid.qmax or int(np.max(qw.zero_points, initial=0)) > qw.grid.qmax:
        raise ValueError(f"codes or zero points exceed {qw.grid.qmax}, the largest {qw.grid.bits}-bit code")


def pack_matmulnbits(qw: QuantizedWeight) -> MatMulNBitsArrays:
    """Pack ``qw`` into MatMulNBits's ``B``, ``scales`` and ``zero_points`` (layouts in the module docstring).

    The zero points are left out when all of them are ``2**(bits - 1)``, the op's default: every symmetric
    grid, and it lets ORT pick its faster symmetric kernels.
    """
    _check_qw(qw)
    k, n = qw.shape
    bits = qw.grid.bits
    bs = _nbits_block_size(qw)
    nb = math.ceil(k / bs)
    codes: np.ndarray = np.zeros((n, nb * bs), np.uint8)
    codes[:, :k] = np.asarray(qw.q, np.uint8).T
    codes = codes.reshape(n, nb, bs)
    b = _pack_nibbles(codes) if bits == 4 else codes
    # a per-channel weight (scales [1, N]) gets one block, whatever bs is
    scales = np.ascontiguousarray(np.asarray(qw.scales, np.float32).T.reshape(n, nb))
    zp = None
    if not _is_default_zp(qw):
        z = np.asarray(qw.zero_points, np.uint8).T.reshape(n, nb)
        if bits == 4:
            if nb % 2:  # the unused high nibble of the last byte: 8, as ORT's quantize_matmul_4bits writes
                z = np.concatenate([z, np.full((n, 1), 8, np.uint8)], axis=1)
            z = _pack_nibbles(z)
        zp = np.ascontiguousarray(z)
    return MatMulNBitsArrays(np.ascontiguousarray(b), scales, zp, k, n, bits, bs)


def unpack_matmulnbits(arrays: MatMulNBitsArrays) -> np.ndarray:
    """The ``[K, N]`` float32 weight a MatMulNBits node multiplies by: ``(q - zero_point) * scale``.

    The inverse of :func:`pack_matmulnbits` (equal bit for bit to ``qw.dequantize()``); also reads the
    arrays of an existing node (:meth:`MatMulNBitsArrays.from_node`) for inspection. 4 and 8 bits only.
    """
    k, n, bits, bs, nb = arrays.k, arrays.n, arrays.bits, arrays.block_size, arrays.n_blocks
    if bits not in (4, 8):
        raise ValueError(f"unpacking {bits}-bit MatMulNBits weights is not supported (4 or 8)")
    b = np.asarray(arrays.b, np.uint8).reshape(n, nb, bs * bits // 8)
    codes = (_unpack_nibbles(b) if bits == 4 else b).reshape(n, nb * bs)[:, :k]
    if arrays.zero_points is None:
        z = np.full((n, nb), 2 ** (bits - 1), np.int64)
    else:
        zb = np.asarray(arrays.zero_points, np.uint8).reshape(n, -1)
        z = (_unpack_nibbles(zb) if bits == 4 else zb)[:, :nb].astype(np.int64)
    scales = np.asarray(arrays.scales, np.float32).reshape(n, nb)
    zk = np.repeat(z, bs, axis=1)[:, :k]
    sk = np.repeat(scales, bs, axis=1)[:, :k]
    return np.ascontiguousarray(((codes.astype(np.int64) - zk).astype(np.float32) * sk).T)


def pack_dequantize_linear(qw: QuantizedWeight) -> DQArrays:
    """The codes, scale, zero point and attributes of an opset-21 DequantizeLinear for ``qw``.

    Symmetric weights (every zero point ``2**(bits - 1)``) become signed codes ``q - 2**(bits - 1)``
    with no zero point input (DequantizeLinear's default 0): INT4 / INT8 is what runtimes and ORT's
    DQ + MatMul -> MatMulNBits fusion expect for symmetric weights. Others keep their unsigned codes and
    zero points (UINT4 / UINT8).
    """
    _check_qw(qw)
    bits = qw.grid.bits
    per_channel = qw.grid.block_size is None
    q = np.asarray(qw.q, np.uint8)
    zp: np.ndarray | None
    if _is_default_zp(qw):
        signed = ml_dtypes.int4 if bits == 4 else np.int8
        data = (q.astype(np.int16) - 2 ** (bits - 1)).astype(signed)
        zp = None
    else:
        unsigned = ml_dtypes.uint4 if bits == 4 else np.uint8
        data = q.astype(unsigned)
        zp = np.asarray(qw.zero_points, np.uint8).astype(unsigned)
    scale = np.asarray(qw.scales, np.float32)
    if per_channel:
        scale = scale.reshape(-1)
        zp = None if zp is None else zp.reshape(-1)
        return DQArrays(data, scale, zp, axis=1, block_size=None)
    return DQArrays(data, scale, zp, axis=0, block_size=qw.grid.block_size)


# --- graph rewrites -------------------------------------------------------------------------------


def _constant(name: str, values: np.ndarray) -> gs.Constant:
    """A gs Constant; 4-bit ml_dtypes arrays go through onnx.numpy_helper, which packs them.

    graphsurgeon 0.6 exports a Constant's values with ``tobytes()``, one byte per 4-bit element, which
    is not ONNX's packed layout; a prebuilt TensorProto behind ``LazyValues`` is exported as is.
    """
    if values.dtype in (np.dtype(ml_dtypes.uint4), np.dtype(ml_dtypes.int4)):
        return gs.Constant(name, LazyValues(onnx.numpy_helper.from_array(values, name)))
    return gs.Constant(name, np.ascontiguousarray(values))


def _weight(node: gs.Node, qw: QuantizedWeight) -> gs.Constant:
    """The MatMul's constant ``[K, N]`` weight, after checking the node can be rewritten."""
    label = f"{node.op} {node.name!r}"
    if node.op != "MatMul" or node.domain not in ("", "ai.onnx", None) or len(node.inputs) != 2:
        raise PassError(_PASS, f"only a two-input MatMul can take a packed weight, not {label}", node=node.name)
    a, w = node.inputs
    if not isinstance(w, gs.Constant):
        raise PassError(
            _PASS,
            f"the weight {w.name!r} of {label} is not a constant initializer (it is computed at run time), "
            "so it cannot be packed; exclude the node or fold the constants first (constant_folding)",
            node=node.name,
        )
    if len(w.shape) != 2:
        raise PassError(
            _PASS,
            f"the weight {w.name!r} of {label} has shape {tuple(w.shape)}; packing needs a 2-D [K, N] weight "
            "(batched MatMul weights are not supported); exclude the node",
            node=node.name,
        )
    if tuple(int(d) for d in w.shape) != qw.shape:
        raise ValueError(f"{label}: weight {w.name!r} has shape {tuple(w.shape)} but the quantized weight {qw.shape}")
    if a.dtype is not None and np.dtype(a.dtype) != np.float32:
        raise PassError(
            _PASS,
            f"the activation {a.name!r} of {label} is {np.dtype(a.dtype)}; packed weights carry float32 scales, "
            "so only float32 activations are supported; exclude the node",
            node=node.name,
        )
    return w


def _replace(graph: gs.Graph, node: gs.Node, new: list[gs.Node]) -> None:
    """Put ``new`` where ``node`` was in ``graph.nodes`` (keeping topological order) and detach ``node``."""
    idx = next((i for i, n in enumerate(graph.nodes) if n is node), None)
    if idx is None:
        raise ValueError(f"node {node.name!r} is not in the graph given (a node of a subgraph needs that subgraph)")
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes[idx : idx + 1] = new


def _import_domain(graph: gs.Graph, domain: str, version: int) -> None:
    """Make the exported model import ``domain`` (graphsurgeon keeps ``graph.import_domains`` as given)."""
    if graph.import_domains is None:
        graph.import_domains = [onnx.helper.make_opsetid("", int(graph.opset))]
    if not any(op.domain == domain for op in graph.import_domains):
        graph.import_domains.append(onnx.helper.make_opsetid(domain, version))


def to_matmulnbits(
    graph: gs.Graph,
    node: gs.Node,
    qw: QuantizedWeight,
    *,
    accuracy_level: int = 0,
    names: FreshNames | None = None,
) -> gs.Node:
    """Replace MatMul ``node`` (weight = ``qw``'s float weight) by one ``com.microsoft.MatMulNBits`` node.

    The new node, named ``<node>/MatMulNBits`` with the grid in its ``doc_string`` (graphsurgeon does not
    export node doc strings: a pass copies them into ``ctx.doc_strings``), takes the MatMul's
    activation and output tensor (downstream is unchanged); the MatMul leaves ``graph.nodes`` and the
    float weight stays until ``graph.cleanup()`` finds it unused (another node may share it). New
    initializers are named after the weight (``<w>_q4``, ``<w>_scales``, ``<w>_zero_points``) through
    ``names`` (pass one FreshNames per pass, so names never collide). The graph imports
    ``com.microsoft`` version 1.

    Args:
        accuracy_level: the lowest precision ORT may compute in: 0 (unset: float32 on CPU), 1 (fp32),
            2 (fp16), 3 (bf16), 4 (int8: activations quantized per block, fastest on CPU, not exact).

    Raises:
        PassError: the node cannot take a packed weight (non-constant or non-2-D weight, non-float32
            activation); the message names the node.
    """
    if accuracy_level not in _ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {_ACCURACY_LEVELS}, got {accuracy_level}")
    w = _weight(node, qw)
    fresh = names if names is not None else FreshNames(graph)
    arrays = pack_matmulnbits(qw)
    inputs: list[gs.Tensor] = [
        node.inputs[0],
        gs.Constant(fresh(f"{w.name}_q{arrays.bits}"), arrays.b),
        gs.Constant(fresh(f"{w.name}_scales"), arrays.scales),
    ]
    if arrays.zero_points is not None:
        inputs.append(gs.Constant(fresh(f"{w.name}_zero_points"), arrays.zero_points))
    attrs: dict[str, Any] = dict(arrays.attrs)
    if accuracy_level:  # left out when unset, as ORT's quantizer does: some EPs reject the attribute
        attrs["accuracy_level"] = accuracy_level
    new = gs.Node(
        "MatMulNBits",
        fresh(f"{node.name or w.name}/MatMulNBits"),
        attrs=attrs,
        inputs=inputs,
        outputs=list(node.outputs),
        domain=MS_DOMAIN,
    )
    new.doc_string = f"onnxq weight-only: {qw.grid}"
    _replace(graph, node, [new])
    _import_domain(graph, MS_DOMAIN, 1)
    return new


def to_dequantize_matmul(
    graph: gs.Graph,
    node: gs.Node,
    qw: QuantizedWeight,
    *,
    names: FreshNames | None = None,
) -> list[gs.Node]:
    """Feed MatMul ``node`` from a DequantizeLinear of ``qw``'s codes instead of its float weight.

    Inserts ``<node>/DequantizeLinear`` (grid in its ``doc_string``) before the MatMul, which keeps its
    name, activation and output. Initializers ``<w>_q4`` (or ``_q8``), ``<w>_scales`` and, when
    asymmetric, ``<w>_zero_points`` come from ``names``. Returns ``[dequantize, matmul]``.

    Raises:
        PassError: the graph's opset is below 21 (call :func:`ensure_opset` or upgrade the model first),
            or the node cannot take a packed weight; the message names the node.
    """
    if int(graph.opset) < 21:
        raise PassError(
            _PASS,
            f"4-bit and blocked DequantizeLinear need opset 21, the graph has {graph.opset}; "
            "raise it first (ensure_opset, or onnxq.model.upgrade_opset)",
            node=node.name,
        )
    w = _weight(node, qw)
    fresh = names if names is not None else FreshNames(graph)
    arrays = pack_dequantize_linear(qw)
    inputs: list[gs.Tensor] = [
        _constant(fresh(f"{w.name}_q{qw.grid.bits}"), arrays.data),
        gs.Constant(fresh(f"{w.name}_scales"), arrays.scale),
    ]
    if arrays.zero_point is not None:
        inputs.append(_constant(fresh(f"{w.name}_zero_points"), arrays.zero_point))
    out = gs.Variable(fresh(f"{w.name}_dequantized"), dtype=np.float32, shape=list(qw.shape))
    base = node.name or w.name
    dq = gs.Node("DequantizeLinear", fresh(f"{base}/DequantizeLinear"), attrs=arrays.attrs, inputs=inputs, outputs=[out])
    dq.doc_string = f"onnxq weight-only: {qw.grid}"
    idx = next((i for i, n in enumerate(graph.nodes) if n is node), None)
    if idx is None:
        raise ValueError(f"node {node.name!r} is not in the graph given (a node of a subgraph needs that subgraph)")
    node.inputs[1] = out
    graph.nodes.insert(idx, dq)
    return [dq, node]


def ensure_opset(graph: gs.Graph, opset: int) -> bool:
    """Raise the graph's default-domain opset to ``opset`` without converting any node; True if raised.

    Only valid when no default-domain op in the graph (subgraphs included) changed its schema between the
    two versions: then the same nodes mean the same thing. Otherwise (e.g. ReduceMean's axes became an
    input at 18) this refuses and names the ops; convert the model with
    :func:`onnxq.model.upgrade_opset` instead. Also updates ``graph.import_domains`` and raises
    ``graph.ir_version`` to what the new opset needs, so the exported model is consistent.

    Raises:
        PassError: some ops' schemas differ between the graph's opset and ``opset``.
    """
    current = int(graph.opset)
    if current >= opset:
        return False
    changed: set[str] = set()
    for n in [*graph.nodes, *(n for sub in graph.subgraphs(recursive=True) for n in sub.nodes)]:
        if n.domain not in ("", "ai.onnx", None) or not onnx.defs.has(n.op):
            continue
        try:
            old = onnx.defs.get_schema(n.op, current).since_version
        except onnx.defs.SchemaError:
            old = -1
        if onnx.defs.get_schema(n.op, opset).since_version != old:
            changed.add(n.op)
    if changed:
        raise PassError(
            _PASS,
            f"cannot raise the opset from {current} to {opset} in place: {', '.join(sorted(changed))} changed "
            "between them; convert the model first (onnxq.model.upgrade_opset)",
        )
    graph.opset = opset
    if graph.import_domains is not None:
        others = [op for op in graph.import_domains if op.domain not in ("", "ai.onnx")]
        graph.import_domains = [onnx.helper.make_opsetid("", opset), *others]
    if graph.ir_version is not None:
        need = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)], ignore_unknown=True)
        graph.ir_version = max(int(graph.ir_version), need)
    return True
