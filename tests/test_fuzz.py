"""Property-based fuzzing of the quantizer and of the model loader (hypothesis).

* ``test_quantize_random_graphs``: a strategy builds random small, valid float32 opset-13 graphs from
  the ops onnxq handles (Conv with/without bias, grouped and depthwise, + BatchNormalization; Gemm with
  transA/transB, alpha/beta and every bias shape; MatMul with a constant on either side and
  activation x activation; Add/Mul of two activations, of an activation and a scalar / broadcast /
  full constant; Relu; Clip with every min/max combination; Max/Average/GlobalAveragePool; Concat;
  Reshape/Flatten/Transpose/Squeeze/Unsqueeze; nearest Resize; Softmax/Sigmoid, which must stay float;
  Identity/Dropout), with fan-out, tied weights (also across Conv/Gemm/MatMul/Add), graph outputs taken
  from intermediate tensors, dead nodes, an optional second input, an optional symbolic batch dim,
  degenerate weights (zeros, constant, outliers, tiny, large) and node/tensor names that are empty,
  path-like or collide with the names onnxq derives (``t3_scale``). Shapes are tracked while building
  and the float model is checked (``onnx.checker`` full check + ORT run) so the generator itself is
  tested. Quantizing (w8a8 or w8a8-per-tensor, mse-percentile or minmax, four target profiles) must
  then either give a model that passes the full checker, keeps int32 biases at input x weight scale,
  runs in ORT CPU and produces outputs of the same names, shapes and dtypes (finite where the float
  ones are) with its live Softmax/Sigmoid nodes still float, or raise an ``OnnxqError`` that names a
  node or tensor of the model (an unexpected exception that a pass wrapped into a PassError fails).
* ``test_corrupted_model_bytes``: truncated / bit-flipped bytes of generated models and of
  ``models/digits-cnn.onnx`` must either load (and then quantize without a non-onnxq exception) or raise
  ``ModelLoadError``; every example runs under a time limit so a hang fails.
* ``test_cli_corrupted_file``: the CLI answers a corrupted file with one ``error:`` line and exit 1.
* ``test_cli_argument_combinations_never_fail_silently_or_unexpectedly``: combinations of ``quantize``
  flags, usual ones with a mistyped, out-of-range or misplaced one in half the examples, end in exit 0 with
  a model that checks and loads, or in exit 1/2 with an error line, nothing written and nothing left behind.
* Plain regression tests for what the fuzzer found (end of the file).

The default run is bounded (well under a minute) and derandomized, so CI is reproducible. To hunt for
bugs, set ``ONNXQ_FUZZ_EXAMPLES=500`` (examples per property; random seeds, not derandomized)::

    ONNXQ_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import functools
import math
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import make_model, value_info
from onnxq.calibration.sources import RandomSource, input_specs
from onnxq.cli import main
from onnxq.errors import ModelLoadError, OnnxqError
from onnxq.model import load_model
from onnxq.quantization import quantize_model
from onnxq.recipe import preset

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS = REPO_ROOT / "models" / "digits-cnn.onnx"

_HUNT = os.environ.get("ONNXQ_FUZZ_EXAMPLES")
GRAPH_EXAMPLES = int(_HUNT) if _HUNT else 60
CORRUPT_EXAMPLES = int(_HUNT) if _HUNT else 60
_SETTINGS = dict(
    derandomize=not _HUNT,  # reproducible in CI; random when hunting
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
#: Per-example wall-clock limit (a hang fails the example instead of blocking the suite).
EXAMPLE_LIMIT_S = 60

Dim = int | str  # an int, or the symbolic batch dim "N"
Shape = tuple[Dim, ...]


# ------------------------------------------------------------------------------------------------
# choices: the generator draws through this, from hypothesis (tests) or a numpy RNG (fixed models)
# ------------------------------------------------------------------------------------------------


class _Choices:
    def integer(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.integer(0, len(seq) - 1)]

    def coin(self, p: float) -> bool:
        """True with probability ``p``; shrinks towards False (the feature off)."""
        return self.integer(0, 99) >= 100 - round(100 * p)


class _HypothesisChoices(_Choices):
    def __init__(self, draw: Any) -> None:
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return int(self.draw(st.integers(lo, hi)))


class _RngChoices(_Choices):
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def integer(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))


# ------------------------------------------------------------------------------------------------
# the graph builder: every op method takes a tensor name, returns the new tensor's name or None
# ------------------------------------------------------------------------------------------------


def _is_int(d: object) -> bool:
    return isinstance(d, int)


def _broadcast(a: Shape, b: Shape) -> Shape | None:
    """Numpy broadcasting of two tracked shapes; None when not (statically) compatible."""
    out: list[Dim] = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == y:
            out.append(x)
        elif x == 1:
            out.append(y)
        elif y == 1:
            out.append(x)
        else:
            return None
    return tuple(reversed(out))


class GraphBuilder:
    """Builds one random valid model, tracking every tensor's shape."""

    def __init__(self, ch: _Choices, *, max_ops: int = 8) -> None:
        self.ch = ch
        self.rng = np.random.default_rng(ch.integer(0, 2**16))
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.shapes: dict[str, Shape] = {}
        self.acts: list[str] = []  # float tensors ops may read (graph inputs + node outputs)
        self.inputs: list[str] = []
        self.tieable: dict[tuple[int, ...], list[str]] = {}
        self.naming = ch.choice(["plain", "plain", "path", "empty", "collide"])
        self.count = 0
        self.max_ops = max_ops

    # -- names and constants ----------------------------------------------------------------------
    def _next(self) -> int:
        self.count += 1
        return self.count

    def tensor_name(self, i: int, op: str) -> str:
        return f"/blk{i}/{op}_output_0" if self.naming == "path" else f"t{i}"

    def node_name(self, i: int, op: str) -> str:
        if self.naming == "path":
            return f"/blk{i}/{op}"
        if self.naming == "empty" and self.ch.coin(0.6):
            return ""
        return f"n{i}_{op}"

    def const(self, shape: Sequence[int], *, tie: bool = True, positive: bool = False) -> str:
        """A float32 initializer of ``shape``; sometimes an existing one of that shape (tied weights)."""
        shape = tuple(int(d) for d in shape)
        if tie and self.tieable.get(shape) and self.ch.coin(0.3):
            return self.ch.choice(self.tieable[shape])
        style = self.ch.choice(["normal"] * 6 + ["zeros", "constant", "outlier", "tiny", "large"])
        v = self.rng.standard_normal(shape).astype(np.float32) * np.float32(0.5)
        if style == "zeros":
            v = np.zeros(shape, np.float32)
        elif style == "constant":
            v = np.full(shape, 0.75, np.float32)
        elif style == "outlier" and v.size:
            v.reshape(-1)[self.rng.integers(v.size)] = 40.0
        elif style == "tiny":
            v = v * np.float32(1e-7)
        elif style == "large":
            v = v * np.float32(50.0)
        if positive:
            v = np.abs(v) + np.float32(0.1)
        name = self._const_name("w")
        self.inits[name] = v.astype(np.float32)
        if tie and not positive:
            self.tieable.setdefault(shape, []).append(name)
        return name

    def _const_name(self, prefix: str) -> str:
        """Usually w12; in the "collide" style the names onnxq derives from an existing tensor (t3_scale...)."""
        i = self._next()
        if self.naming == "collide" and self.acts and self.ch.coin(0.5):
            base = self.ch.choice(self.acts)
            name = f"{base}{self.ch.choice(['_scale', '_zero_point', '_quantized', '_dequantized'])}"
            if name not in self.inits and name not in self.shapes:
                return name
        return f"{prefix}{i}"

    def scalar(self, value: float) -> str:
        name = self._const_name("s")
        self.inits[name] = np.asarray(value, np.float32)
        return name

    def ints(self, values: Sequence[int]) -> str:
        name = f"i{self._next()}"
        self.inits[name] = np.asarray(values, np.int64)
        return name

    def node(self, op: str, inputs: Sequence[str], shape: Shape, *, extra_outputs: int = 0, **attrs: Any) -> str:
        i = self._next()
        out = self.tensor_name(i, op)
        outputs = [out] + [f"{out}_extra{k}" for k in range(extra_outputs)]
        self.nodes.append(onnx.helper.make_node(op, list(inputs), outputs, name=self.node_name(i, op), **attrs))
        self.shapes[out] = tuple(shape)
        self.acts.append(out)
        return out

    # -- building -------------------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        ch = self.ch
        dynamic = ch.coin(0.25)
        batch: Dim = "N" if dynamic else 1
        if ch.coin(0.6):
            shape: Shape = (batch, ch.integer(1, 4), ch.integer(1, 8), ch.integer(1, 8))
        else:
            shape = (batch if dynamic else ch.integer(1, 4), ch.integer(1, 8))
        for k in range(2 if ch.coin(0.2) else 1):
            name = f"input{k}"
            self.inputs.append(name)
            self.shapes[name] = shape
            self.acts.append(name)
        n_ops = ch.integer(1, self.max_ops)
        ops = [getattr(self, m) for m in sorted(dir(self)) if m.startswith("op_")]
        # weight the op types quantization is about
        ops += [self.op_conv] * 3 + [self.op_gemm, self.op_tied_weight] * 2
        ops += [self.op_matmul_const, self.op_matmul_act, self.op_add]
        done = 0
        for _ in range(n_ops * 4):
            if done == n_ops:
                break
            x = self.acts[-1] if ch.coin(0.6) else ch.choice(self.acts)
            op = ch.choice(ops)
            if op(x) is not None:
                done += 1
        if not self.nodes:  # every op refused: one Relu keeps the graph non-trivial
            self.op_relu(self.acts[-1])
        produced = [t for t in self.acts if t not in self.inputs]
        outputs = [produced[-1]] + [t for t in produced[:-1] if ch.coin(0.2)]
        return self._model(outputs)

    def _model(self, outputs: list[str]) -> onnx.ModelProto:
        def vi(name: str) -> onnx.ValueInfoProto:
            dims = [d if _is_int(d) else "N" for d in self.shapes[name]]
            return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims)

        graph = onnx.helper.make_graph(
            self.nodes, "fuzz", [vi(n) for n in self.inputs], [vi(n) for n in outputs],
            [onnx.numpy_helper.from_array(v, k) for k, v in self.inits.items()],
        )  # fmt: skip
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
        model.ir_version = 8
        return model

    # -- ops (names start with op_; each returns None when it does not apply to x) ---------------------
    def op_conv(self, x: str) -> str | None:
        s = self.shapes[x]
        if len(s) != 4 or not all(_is_int(d) for d in s[1:]):
            return None
        ch = self.ch
        n, c, h, w = s
        kind = ch.choice(["dense", "dense", "depthwise", "grouped"])
        divisors = [d for d in range(2, c) if c % d == 0]
        if kind == "depthwise":
            g, m = c, c * ch.integer(1, 2)
        elif kind == "grouped" and divisors:
            g = ch.choice(divisors)
            m = g * ch.integer(1, 2)
        else:
            g, m = 1, ch.integer(1, 8)
        kh = ch.integer(1, 3)
        kw = kh if ch.coin(0.7) else ch.integer(1, 3)
        stride = ch.choice([1, 1, 2])
        dil = 2 if ch.coin(0.1) else 1
        ph, pw = (kh // 2, kw // 2) if ch.coin(0.6) else (0, 0)
        ho = (h + 2 * ph - dil * (kh - 1) - 1) // stride + 1
        wo = (w + 2 * pw - dil * (kw - 1) - 1) // stride + 1
        if ho < 1 or wo < 1:
            kh = kw = stride = dil = 1
            ph = pw = 0
            ho, wo = h, w
        inputs = [x, self.const((m, c // g, kh, kw))]
        bias = ch.choice(["const", "const", "none", "empty"])
        if bias == "const":
            inputs.append(self.const((m,)))
        elif bias == "empty":
            inputs.append("")
        attrs: dict[str, Any] = dict(strides=[stride, stride], pads=[ph, pw, ph, pw], group=g, dilations=[dil, dil])
        if ch.coin(0.7):
            attrs["kernel_shape"] = [kh, kw]
        y = self.node("Conv", inputs, (n, m, ho, wo), **attrs)
        if ch.coin(0.35):
            bn = [y, self.const((m,)), self.const((m,)), self.const((m,)), self.const((m,), tie=False, positive=True)]
            y = self.node("BatchNormalization", bn, (n, m, ho, wo), epsilon=ch.choice([1e-5, 1e-3]))
        return self._activation(y)

    def _activation(self, y: str) -> str:
        """Often a Relu or Clip right after a compute op (what insert_qdq absorbs)."""
        kind = self.ch.choice(["none", "none", "relu", "relu", "clip"])
        out = None if kind == "none" else self.op_relu(y) if kind == "relu" else self.op_clip(y)
        return out or y

    def op_tied_weight(self, x: str) -> str | None:
        """Reuse the weight (and bias, attributes) of an earlier Conv/Gemm/MatMul, or use it as an Add/Mul operand."""
        s = self.shapes[x]
        options: list[tuple[str, onnx.NodeProto | str]] = []
        for n in self.nodes:
            if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2 or n.input[1] not in self.inits:
                continue
            w = self.inits[n.input[1]]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "Conv" and len(s) == 4 and s[1] == w.shape[1] * attrs.get("group", 1):
                options.append(("same", n))
            elif n.op_type == "Gemm" and len(s) == 2 and not attrs.get("transA", 0):
                k = w.shape[1] if attrs.get("transB", 0) else w.shape[0]
                if s[1] == k and (len(n.input) < 3 or self.inits[n.input[2]].ndim < 2):
                    options.append(("same", n))
            elif n.op_type == "MatMul" and len(s) >= 2 and s[-1] == w.shape[0]:
                options.append(("same", n))
                if len(s) == 2:
                    options.append(("as-gemm", n))
        for name, v in self.inits.items():
            if name.startswith("w") and (b := _broadcast(s, v.shape)) is not None and len(b) == len(s):
                options.append(("operand", name))
        if not options:
            return None
        kind, what = self.ch.choice(options)
        if kind == "operand":
            assert isinstance(what, str)
            op = self.ch.choice(["Add", "Mul"])
            out = _broadcast(s, self.inits[what].shape)
            assert out is not None
            return self.node(op, [x, what] if self.ch.coin(0.5) else [what, x], out)
        assert isinstance(what, onnx.NodeProto)
        w = self.inits[what.input[1]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in what.attribute}
        if kind == "as-gemm":
            return self.node("Gemm", [x, what.input[1]], (s[0], w.shape[1]))
        if what.op_type == "MatMul":
            return self.node("MatMul", [x, what.input[1]], s[:-1] + (w.shape[1],))
        if what.op_type == "Gemm":
            m = w.shape[0] if attrs.get("transB", 0) else w.shape[1]
            return self.node("Gemm", [x, *what.input[1:]], (s[0], m), **attrs)
        dims = []
        for i, size in enumerate(s[2:]):
            k, st_, d = w.shape[2 + i], attrs["strides"][i], attrs["dilations"][i]
            p = attrs["pads"][i] + attrs["pads"][i + 2]
            if not _is_int(size):
                return None
            dims.append((int(size) + p - d * (k - 1) - 1) // st_ + 1)
        if min(dims) < 1:
            return None
        return self.node("Conv", [x, *what.input[1:]], (s[0], w.shape[0], *dims), **attrs)

    def op_batchnorm(self, x: str) -> str | None:  # not after a Conv: stays float
        s = self.shapes[x]
        if len(s) < 2 or not _is_int(s[1]) or not self.ch.coin(0.3):
            return None
        c = int(s[1])
        bn = [x, self.const((c,)), self.const((c,)), self.const((c,)), self.const((c,), tie=False, positive=True)]
        return self.node("BatchNormalization", bn, s)

    def op_gemm(self, x: str) -> str | None:
        s = self.shapes[x]
        if len(s) != 2:
            return None
        ch = self.ch
        trans_a = int(_is_int(s[0]) and ch.coin(0.15))
        rows, k = (s[1], s[0]) if trans_a else (s[0], s[1])
        if not _is_int(k):
            return None
        m = ch.integer(1, 8)
        trans_b = int(ch.coin(0.5))
        inputs = [x, self.const((m, k) if trans_b else (k, m))]
        bias_shapes: list[tuple[int, ...] | None] = [None, (m,), (m,), (1, m), ()]
        if _is_int(rows):
            bias_shapes.append((int(rows), m))
        bshape = ch.choice(bias_shapes)
        if bshape is not None:
            inputs.append(self.const(bshape))
        attrs: dict[str, Any] = {"transB": trans_b}
        if trans_a:
            attrs["transA"] = 1
        if ch.coin(0.15):
            attrs["alpha"] = ch.choice([0.5, 2.0])
        if bshape is not None and ch.coin(0.15):
            attrs["beta"] = ch.choice([0.0, 0.5, 2.0])
        return self._activation(self.node("Gemm", inputs, (rows, m), **attrs))

    def op_matmul_const(self, x: str) -> str | None:
        s = self.shapes[x]
        if len(s) < 2:
            return None
        ch = self.ch
        m = ch.integer(1, 8)
        if len(s) == 2 and _is_int(s[0]) and ch.coin(0.3):  # constant @ activation
            return self.node("MatMul", [self.const((m, int(s[0]))), x], (m, s[1]))
        if not _is_int(s[-1]):
            return None
        return self._activation(self.node("MatMul", [x, self.const((int(s[-1]), m))], s[:-1] + (m,)))

    def op_matmul_act(self, x: str) -> str | None:
        s = self.shapes[x]
        if len(s) < 2:
            return None
        direct = [c for c in self.acts if len(self.shapes[c]) == len(s)
                  and self.shapes[c][:-2] == s[:-2] and self.shapes[c][-2] == s[-1]]  # fmt: skip
        transposed = [c for c in self.acts if len(self.shapes[c]) == len(s)
                      and self.shapes[c][:-2] == s[:-2] and self.shapes[c][-1] == s[-1]]  # fmt: skip
        pick = self.ch.choice([("direct", c) for c in direct] + [("t", c) for c in transposed])
        kind, c = pick
        cs = self.shapes[c]
        if kind == "t":
            perm = list(range(len(cs) - 2)) + [len(cs) - 1, len(cs) - 2]
            c = self.node("Transpose", [c], tuple(cs[p] for p in perm), perm=perm)
            cs = self.shapes[c]
        return self.node("MatMul", [x, c], s[:-1] + (cs[-1],))

    def _binary(self, op: str, x: str) -> str | None:
        s = self.shapes[x]
        ch = self.ch
        if ch.coin(0.5):  # activation (op) activation, possibly x itself
            cands = [c for c in self.acts if (b := _broadcast(s, self.shapes[c])) is not None and len(b) == len(s)]
            other = ch.choice(cands)
            out = _broadcast(s, self.shapes[other])
        else:  # activation (op) constant
            shapes: list[tuple[int, ...]] = [(), (1,)]
            if _is_int(s[-1]):
                shapes.append((int(s[-1]),))
            if len(s) == 4 and _is_int(s[1]):
                shapes.append((int(s[1]), 1, 1))
            shapes.append(tuple(int(d) if _is_int(d) else 1 for d in s))
            other = self.const(ch.choice(shapes))
            out = _broadcast(s, self.inits[other].shape)
        assert out is not None
        pair = [x, other] if ch.coin(0.5) else [other, x]
        return self.node(op, pair, out)

    def op_add(self, x: str) -> str | None:
        return self._binary("Add", x)

    def op_mul(self, x: str) -> str | None:
        return self._binary("Mul", x)

    def op_relu(self, x: str) -> str | None:
        return self.node("Relu", [x], self.shapes[x])

    def op_sigmoid(self, x: str) -> str | None:
        return self.node("Sigmoid", [x], self.shapes[x])

    def op_softmax(self, x: str) -> str | None:
        r = len(self.shapes[x])
        return self.node("Softmax", [x], self.shapes[x], axis=self.ch.integer(-r, r - 1))

    def op_identity(self, x: str) -> str | None:
        return self.node("Identity", [x], self.shapes[x])

    def op_dropout(self, x: str) -> str | None:
        ch = self.ch
        inputs = [x] + ([self.scalar(ch.choice([0.0, 0.1, 0.5]))] if ch.coin(0.4) else [])
        return self.node("Dropout", inputs, self.shapes[x], extra_outputs=int(ch.coin(0.3)))

    def op_clip(self, x: str) -> str | None:
        lo, hi = self.ch.choice([(None, None), (0.0, None), (None, 6.0), (0.0, 6.0), (-1.0, 1.0), (0.0, 1.0),
                                 (0.5, 2.0), (0.0, 0.0), (-6.0, 0.0)])  # fmt: skip
        inputs = [x]
        if lo is not None or hi is not None:
            inputs.append("" if lo is None else self.scalar(lo))
        if hi is not None:
            inputs.append(self.scalar(hi))
        return self.node("Clip", inputs, self.shapes[x])

    def _pool(self, op: str, x: str) -> str | None:
        s = self.shapes[x]
        if len(s) != 4 or not all(_is_int(d) for d in s[2:]):
            return None
        ch = self.ch
        h, w = int(s[2]), int(s[3])
        k = ch.integer(1, 3)
        stride = ch.choice([1, 2])
        p = k // 2 if ch.coin(0.4) else 0
        ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
        if ho < 1 or wo < 1:
            k, stride, p, ho, wo = 1, 1, 0, h, w
        attrs: dict[str, Any] = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[p, p, p, p])
        extra = 0
        if op == "AveragePool" and ch.coin(0.5):
            attrs["count_include_pad"] = 1
        if op == "MaxPool" and ch.coin(0.15):
            extra = 1  # the Indices output, unused
        return self.node(op, [x], (s[0], s[1], ho, wo), extra_outputs=extra, **attrs)

    def op_maxpool(self, x: str) -> str | None:
        return self._pool("MaxPool", x)

    def op_averagepool(self, x: str) -> str | None:
        return self._pool("AveragePool", x)

    def op_globalaveragepool(self, x: str) -> str | None:
        s = self.shapes[x]
        if len(s) < 3:
            return None
        return self.node("GlobalAveragePool", [x], s[:2] + (1,) * (len(s) - 2))

    def op_concat(self, x: str) -> str | None:
        s = self.shapes[x]
        ch = self.ch
        axis = ch.integer(0, len(s) - 1)
        if not _is_int(s[axis]):
            return None
        cands = [c for c in self.acts if len(self.shapes[c]) == len(s) and _is_int(self.shapes[c][axis])
                 and all(a == b for i, (a, b) in enumerate(zip(s, self.shapes[c])) if i != axis)]  # fmt: skip
        parts = [x] + [ch.choice(cands) for _ in range(ch.integer(1, 2))]
        if all(_is_int(d) for d in s) and ch.coin(0.25):  # a constant operand
            cs = list(s)
            cs[axis] = ch.integer(1, 3)
            parts.insert(ch.integer(0, len(parts)), self.const(tuple(int(d) for d in cs)))
        total = sum(int(self.shapes[p][axis]) if p in self.shapes else int(self.inits[p].shape[axis]) for p in parts)
        out = s[:axis] + (total,) + s[axis + 1 :]
        return self.node("Concat", parts, out, axis=axis - len(s) if ch.coin(0.3) else axis)

    def op_reshape(self, x: str) -> str | None:
        s = self.shapes[x]
        ch = self.ch
        if all(_is_int(d) for d in s):
            total = math.prod(int(d) for d in s)
            dims: list[int] = []
            rest = total
            for _ in range(ch.integer(0, 3)):
                divs = [d for d in range(1, rest + 1) if rest % d == 0]
                d = ch.choice(divs)
                dims.append(d)
                rest //= d
            dims.append(rest)
            out: Shape = tuple(dims)
            target = list(dims)
            if ch.coin(0.4):
                target[ch.integer(0, len(target) - 1)] = -1
            if ch.coin(0.2) and len(target) <= len(s) and target[0] == s[0]:
                target[0] = 0
        elif s[0] == "N" and all(_is_int(d) for d in s[1:]):
            out = ("N", math.prod(int(d) for d in s[1:]))
            target = [0, -1]
        else:
            return None
        return self.node("Reshape", [x, self.ints(target)], out)

    def op_flatten(self, x: str) -> str | None:
        s = self.shapes[x]
        ch = self.ch
        if all(_is_int(d) for d in s):
            axis = ch.integer(0, len(s))
            out: Shape = (math.prod(int(d) for d in s[:axis]), math.prod(int(d) for d in s[axis:]))
        elif s[0] == "N" and all(_is_int(d) for d in s[1:]):
            axis = 1
            out = ("N", math.prod(int(d) for d in s[1:]))
        else:
            return None
        return self.node("Flatten", [x], out, axis=axis - len(s) if ch.coin(0.2) and axis < len(s) else axis)

    def op_transpose(self, x: str) -> str | None:
        s = self.shapes[x]
        if self.ch.coin(0.2):  # no perm: reverse
            return self.node("Transpose", [x], tuple(reversed(s)))
        perm = list(range(len(s)))
        for i in range(len(perm) - 1, 0, -1):  # Fisher-Yates through the choices
            j = self.ch.integer(0, i)
            perm[i], perm[j] = perm[j], perm[i]
        return self.node("Transpose", [x], tuple(s[p] for p in perm), perm=perm)

    def op_squeeze(self, x: str) -> str | None:
        s = self.shapes[x]
        ones = [i for i, d in enumerate(s) if d == 1]
        if not ones or len(ones) == len(s):
            return None
        ch = self.ch
        if all(_is_int(d) for d in s) and ch.coin(0.25):
            return self.node("Squeeze", [x], tuple(d for d in s if d != 1))
        axes = sorted({ch.choice(ones) for _ in range(ch.integer(1, len(ones)))})
        out = tuple(d for i, d in enumerate(s) if i not in axes)
        axes_in = [a - len(s) if ch.coin(0.3) else a for a in axes]
        return self.node("Squeeze", [x, self.ints(axes_in)], out)

    def op_unsqueeze(self, x: str) -> str | None:
        s = self.shapes[x]
        if len(s) > 4:
            return None
        ch = self.ch
        k = ch.integer(1, 2) if len(s) < 4 else 1
        r = len(s) + k
        free = list(range(r))
        axes = sorted(free.pop(ch.integer(0, len(free) - 1)) for _ in range(k))
        it = iter(s)
        out = tuple(1 if i in axes else next(it) for i in range(r))
        return self.node("Unsqueeze", [x, self.ints(axes)], out)

    def op_resize(self, x: str) -> str | None:
        s = self.shapes[x]
        if len(s) != 4 or not all(_is_int(d) for d in s[1:]) or max(int(s[2]), int(s[3])) > 16:
            return None
        ch = self.ch
        h, w = int(s[2]), int(s[3])
        fh = ch.choice([2.0, 1.0] + ([0.5] if h >= 2 else []))
        fw = ch.choice([2.0, 1.0] + ([0.5] if w >= 2 else []))
        attrs = dict(mode="nearest",
                     nearest_mode=ch.choice(["round_prefer_floor", "floor"]),
                     coordinate_transformation_mode=ch.choice(["half_pixel", "asymmetric"]))  # fmt: skip
        out = (s[0], s[1], int(math.floor(h * fh)), int(math.floor(w * fw)))
        if ch.coin(0.3) and _is_int(s[0]):  # sizes instead of scales
            return self.node("Resize", [x, "", "", self.ints(out)], out, **attrs)
        scales = f"sc{self._next()}"
        self.inits[scales] = np.asarray([1.0, 1.0, fh, fw], np.float32)
        return self.node("Resize", [x, "", scales], out, **attrs)


@st.composite
def graphs(draw: Any, max_ops: int = 8) -> onnx.ModelProto:
    """A random small valid float32 opset-13 model (see the module docstring)."""
    return GraphBuilder(_HypothesisChoices(draw), max_ops=max_ops).build()


def fixed_graph(seed: int) -> onnx.ModelProto:
    """A generated model that depends only on ``seed`` (for the corruption pool)."""
    return GraphBuilder(_RngChoices(seed), max_ops=8).build()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


class _Hang(BaseException):  # BaseException: no `except Exception` in onnxq may swallow it
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise _Hang in the main thread after ``seconds``; a hang inside C code ends the process instead."""

    def on_alarm(signum: int, frame: object) -> None:
        raise _Hang(f"the example ran for more than {seconds} s (a hang?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds * 3, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        faulthandler.cancel_dump_traceback_later()


def _session(model: onnx.ModelProto, *, optimize: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feeds(model: onnx.ModelProto, seed: int, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in input_specs(model):
        shape = tuple(d if isinstance(d, int) else batch for d in spec.shape)
        feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {n.name for n in g.node} | {t for n in g.node for t in [*n.input, *n.output]}
    names |= {t.name for t in g.initializer} | {v.name for v in [*g.input, *g.output]}
    return {n for n in names if n}


def _live_nodes(model: onnx.ModelProto, ops: set[str]) -> list[onnx.NodeProto]:
    """The nodes (of op types ``ops``) the graph outputs depend on."""
    producer = {o: n for n in model.graph.node for o in n.output}
    todo, seen, found = [o.name for o in model.graph.output], set(), []
    while todo:
        t = todo.pop()
        n = producer.get(t)
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if n.op_type in ops:
            found.append(n)
        todo.extend(i for i in n.input if i)
    return found


def _live_ops(model: onnx.ModelProto, ops: set[str]) -> list[str]:
    """Op types (among ``ops``) of the nodes the graph outputs depend on, sorted."""
    return sorted(n.op_type for n in _live_nodes(model, ops))


def _left_float(q: onnx.ModelProto) -> list[str]:
    """The live Conv/Gemm/MatMul nodes of a quantized model that do not read both operands (activation and
    weight, or two activations) from a DequantizeLinear: the layers the quantizer left in float."""
    producer = {o: n.op_type for n in q.graph.node for o in n.output}
    return [f"{n.op_type} {n.name!r}" for n in _live_nodes(q, {"Conv", "Gemm", "MatMul"})
            if any(producer.get(i) != "DequantizeLinear" for i in n.input[:2])]  # fmt: skip


def _check_bias_scales(model: onnx.ModelProto) -> None:
    """An int32 bias behind a DequantizeLinear must have scale = input scale x weight scale, node by node
    (what ORT's integer kernels assume; a tied bias shared by nodes with different input scales breaks it)."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def dq_scale(tensor: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        n = producer.get(tensor)
        if n is None or n.op_type != "DequantizeLinear":
            return None, None
        return inits.get(n.input[0]), inits.get(n.input[1])

    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        bq, b_scale = dq_scale(node.input[2])
        if bq is None or bq.dtype != np.int32:
            continue
        where = f"{node.op_type} {node.name!r} -> {node.output[0]!r}"
        _, x_scale = dq_scale(node.input[0])
        _, w_scale = dq_scale(node.input[1])
        assert x_scale is not None and w_scale is not None, f"{where}: int32 bias but float input or weight"
        expected = np.broadcast_to(np.float32(x_scale) * w_scale.astype(np.float32), b_scale.shape)
        np.testing.assert_allclose(b_scale, expected, rtol=1e-5, err_msg=f"{where}: bias scale != x_scale * w_scale")


def _recipe(method: str, name: str = "w8a8", target: str = "x86-avx2"):  # noqa: ANN202
    """A preset with another calibration method and an explicit target (the same on every CI machine)."""
    r = preset(name)
    return r.with_(target=target, calibration=dataclasses.replace(r.calibration, method=method))


def _check_error(exc: OnnxqError, model: onnx.ModelProto) -> None:
    msg = str(exc)
    # Pipeline turns an unexpected exception inside a pass into a PassError ending like this: that is a
    # crash with a friendlier face, not a deliberate refusal.
    assert "(passes already run:" not in msg, f"a pass crashed: {msg}"
    assert any(n in msg for n in _names(model)), f"the onnxq error names no node or tensor of the model: {msg}"


# ------------------------------------------------------------------------------------------------
# 1. random graphs: quantize gives a valid model or a clear onnxq error
# ------------------------------------------------------------------------------------------------


@settings(max_examples=GRAPH_EXAMPLES, deadline=30_000, **_SETTINGS)
@given(model=graphs(), method=st.sampled_from(["mse-percentile", "minmax"]),
       preset_name=st.sampled_from(["w8a8", "w8a8", "w8a8-per-tensor"]),
       target=st.sampled_from(["x86-avx2", "x86-avx2-u8", "x86-vnni", "cuda"]), seed=st.integers(0, 2**16))  # fmt: skip
def test_quantize_random_graphs(model: onnx.ModelProto, method: str, preset_name: str, target: str, seed: int) -> None:
    with time_limit(EXAMPLE_LIMIT_S):
        # the generator's own promise: a valid model that runs
        onnx.checker.check_model(model, full_check=True)
        dynamic = any(isinstance(d, str) for s in input_specs(model) for d in s.shape)
        feeds = _feeds(model, seed, batch=2 if dynamic else 1)
        expected = _session(model, optimize=False).run(None, feeds)
        out_names = [o.name for o in model.graph.output]

        source = RandomSource(input_specs(model), count=4, seed=0)
        try:
            result = quantize_model(model, _recipe(method, preset_name, target), source=source, checked=False)
        except OnnxqError as exc:
            _check_error(exc, model)
            return
        q = result.model
        onnx.checker.check_model(q, full_check=True)
        _check_bias_scales(q)
        assert [o.name for o in q.graph.output] == out_names
        assert [i.name for i in q.graph.input] == [i.name for i in model.graph.input]
        got = _session(q, optimize=True).run(None, feeds)
        for name, e, g in zip(out_names, expected, got):
            assert g.dtype == e.dtype and g.shape == e.shape, f"output {name}: {g.dtype}{g.shape} != {e.dtype}{e.shape}"
            bad = np.isfinite(e) & ~np.isfinite(g)
            assert not bad.any(), f"output {name}: non-finite values where the float model's are finite"
        # Softmax/Sigmoid are not quantizable: the live ones are all still there, computing in float
        keep = {"Softmax", "Sigmoid"}
        assert _live_ops(q, keep) == _live_ops(model, keep)
        # the w8a8 presets quantize every Conv/Gemm/MatMul and nothing is excluded here: the share of those
        # layers actually quantized is all of them, in every example (a layer left float is a silent miss)
        assert not _left_float(q), f"layers left in float: {_left_float(q)}"


# ------------------------------------------------------------------------------------------------
# 2. corrupted bytes: load or ModelLoadError, never a traceback or a hang
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _pool() -> list[bytes]:
    """Serialized models to corrupt: the real digits CNN and a few generated ones."""
    pool = [DIGITS.read_bytes()] if DIGITS.is_file() else []
    for seed in (1, 2, 3):
        model = fixed_graph(seed)
        onnx.checker.check_model(model, full_check=True)
        pool.append(model.SerializeToString())
    return pool


@st.composite
def corrupted(draw: Any) -> bytes:
    data = bytearray(draw(st.sampled_from(_pool())))
    kind = draw(st.sampled_from(["truncate", "flip", "flip", "both"]))
    if kind in ("flip", "both"):
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, len(data) * 8 - 1))
            data[pos // 8] ^= 1 << (pos % 8)
    if kind in ("truncate", "both"):
        data = data[: draw(st.integers(0, len(data) - 1))]
    return bytes(data)


@settings(max_examples=CORRUPT_EXAMPLES, deadline=20_000, **_SETTINGS)
@given(data=corrupted())
def test_corrupted_model_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp, time_limit(EXAMPLE_LIMIT_S):
        path = Path(tmp) / "model.onnx"
        path.write_bytes(data)
        try:
            model = load_model(path)
        except ModelLoadError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg and "Traceback" not in msg, msg
            return
        try:  # it loaded: quantizing may refuse it, but only with an onnxq error
            specs = input_specs(model)
            quantize_model(model, _recipe("minmax"), source=RandomSource(specs, count=2, seed=0), checked=False)
        except OnnxqError:
            pass


def test_corruption_pool_is_valid() -> None:
    """The uncorrupted pool loads and quantizes (a checked model that runs, no layer left float), so the
    corruption test starts from valid models that onnxq handles."""
    pool = _pool()
    assert len(pool) == 3 + DIGITS.is_file()
    layers = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, data in enumerate(pool):
            path = Path(tmp) / f"m{i}.onnx"
            path.write_bytes(data)
            q = _quantize_and_check(load_model(path))
            assert not _left_float(q), f"pool model {i}: layers left in float: {_left_float(q)}"
            layers += len(_live_nodes(q, {"Conv", "Gemm", "MatMul"}))
    assert layers > 0, "the pool holds no quantizable layer"


@pytest.mark.parametrize("how", ["truncate", "flipped-header"])
def test_cli_corrupted_file(tmp_path: Path, how: str) -> None:
    data = DIGITS.read_bytes() if DIGITS.is_file() else _pool()[0]
    bad = tmp_path / "bad.onnx"
    if how == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    else:  # every bit of the first 32 bytes flipped
        bad.write_bytes(bytes(b ^ 0xFF for b in data[:32]) + data[32:])
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["quantize", str(bad), "-o", str(out), "--calib", "random", "--no-progress"])
    err = result.stderr
    assert result.exit_code == 1, f"exit code {result.exit_code}; stderr: {err}; exception: {result.exception!r}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in result.output and "unexpected" not in err, err
    assert not out.exists()


# CLI argument combinations: a careless user's flags. Each group draws a usual value (including none);
# in half the examples one group draws a mistyped, out-of-range or misplaced value instead.
_CLI_USUAL: dict[str, list[tuple[str, ...]]] = {
    "preset": [(), ("--preset", "w8a8"), ("--preset", "w8a8-per-tensor"), ("--preset", "w8a16")],
    "calib": [("--calib", "random:3"), ("--calib", "random:2")],
    "calib_size": [(), ("--calib-size", "2"), ("--calib-size", "1000000")],
    "calibrator": [(), ("--calibrator", "minmax"), ("--calibrator", "entropy"), ("--calibrator", "mse"),
                   ("--calibrator", "ema-minmax")],
    "target": [(), ("--target", "x86-avx2-u8"), ("--target", "cuda"), ("--target", "arm64")],
    "exclude": [(), ("--exclude-op", "Conv"), ("--exclude-node", "nope"), ("--exclude-regex", "^conv")],
    "format": [(), ("--format", "qoperator"), ("--format", "qdq")],
    "device": [(), ("--device", "cpu")],
}
_CLI_CARELESS: dict[str, list[tuple[str, ...]]] = {
    "preset": [("--preset", "w8a9"), ("--preset", "int8-dynamic"), ("--preset", "fp16"), ("--preset", "w4-rtn")],
    "calib": [("--calib", "random:0"), ("--calib", "random:x"), ("--calib", "no/such/dir"), ()],
    "calib_size": [("--calib-size", "0"), ("--calib-size", "-3"), ("--calib-size", "two")],
    "calibrator": [("--calibrator", "min-max")],
    "target": [("--target", "x86")],
    "exclude": [("--exclude-op", "Convv"), ("--exclude-regex", "(")],
    "format": [("--format", "matmulnbits"), ("--format", "qdqq")],
    "device": [("--device", "gpu"), ("--device", "cuda")],
    "weight_only": [("--block-size", "32"), ("--block-size", "7"), ("--symmetric",), ("--lm-head", "float")],
    "alpha": [("--alpha", "0.5"), ("--alpha", "2"), ("--alpha", "nan")],
    "budget": [("--accuracy-budget", "sqnr=10"), ("--accuracy-budget", "cosine=2"), ("--accuracy-budget", "sqrn=30")],
}


@st.composite
def _cli_flags(draw: Any) -> list[str]:
    groups = {k: draw(st.sampled_from(v)) for k, v in _CLI_USUAL.items()}
    careless = draw(st.one_of(st.none(), st.sampled_from(sorted(_CLI_CARELESS))))
    if careless is not None:
        groups[careless] = draw(st.sampled_from(_CLI_CARELESS[careless]))
    return [a for v in groups.values() for a in v]


@settings(max_examples=int(_HUNT) if _HUNT else 25, deadline=None, **_SETTINGS)
@given(_cli_flags())
def test_cli_argument_combinations_never_fail_silently_or_unexpectedly(flags: list[str]) -> None:
    """Whatever combination of flags: exit 0 with a model that checks and runs, or 1/2 with one error line,
    no traceback, no "unexpected" and nothing written."""
    with tempfile.TemporaryDirectory() as tmp:
        model, out = Path(tmp) / "m.onnx", Path(tmp) / "q.onnx"
        model.write_bytes(DIGITS.read_bytes())
        args = ["quantize", str(model), "-o", str(out), "--no-progress", *flags]
        result = CliRunner().invoke(main, args)
        err = result.stderr
        assert result.exit_code in (0, 1, 2), f"{args}: exit {result.exit_code}, {result.exception!r}; {err}"
        assert "Traceback" not in result.output + err and "unexpected" not in err, f"{args}: {err}"
        leftovers = sorted(p.name for p in Path(tmp).iterdir() if p.name not in ("m.onnx", "q.onnx"))
        assert leftovers == [], f"{args}: left {leftovers}"
        if result.exit_code == 0:
            onnx.checker.check_model(onnx.load(out), full_check=True)
            ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        else:
            assert not out.exists(), f"{args}: exit {result.exit_code} but {out.name} was written"
            assert "error" in err.lower(), f"{args}: exit {result.exit_code} without an error line: {err!r}"


# ------------------------------------------------------------------------------------------------
# 3. what the fuzzer found, pinned as plain regression tests
# ------------------------------------------------------------------------------------------------


def _quantize_and_check(model: onnx.ModelProto, target: str = "x86-avx2") -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    q = quantize_model(model, _recipe("minmax", target=target), source=RandomSource(input_specs(model), count=4)).model
    onnx.checker.check_model(q, full_check=True)
    _check_bias_scales(q)
    feeds = _feeds(model, 0, batch=1)
    for e, g in zip(_session(model, optimize=False).run(None, feeds), _session(q, optimize=True).run(None, feeds)):
        assert e.shape == g.shape and e.dtype == g.dtype
    return q


def test_passthrough_reading_a_graph_input() -> None:
    """input -> Transpose -> MatMul(input, .): the Transpose shares the graph input's parameters, which must
    be computed first (insert_qdq used to order graph inputs last: KeyError inside the pass)."""
    h = onnx.helper
    nodes = [h.make_node("Transpose", ["x"], ["xt"], name="tr", perm=[1, 0]),
             h.make_node("MatMul", ["x", "xt"], ["y"], name="mm")]  # fmt: skip
    q = _quantize_and_check(make_model(nodes, [value_info("x", [4, 7])], [value_info("y", [4, 4])], opset=13))
    assert "QuantizeLinear" in [n.op_type for n in q.graph.node]


@pytest.mark.parametrize("names", [("relu", "conv1", "conv2"), ("", "", "")])
def test_tied_bias_of_unnamed_convs(names: tuple[str, str, str]) -> None:
    """Two Convs sharing weight and bias, with different input scales: each gets its own int32 bias. With
    empty node names both copies used to get the same tensor names and export silently kept one of them."""
    h, nh = onnx.helper, onnx.numpy_helper
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             nh.from_array(np.array([5, -5, 3, -3], np.float32), "b"),
             nh.from_array(np.array(10, np.float32), "k")]  # fmt: skip
    nodes = [h.make_node("Mul", ["x", "k"], ["r"], name=names[0]),
             h.make_node("Conv", ["x", "w", "b"], ["c1"], name=names[1], pads=[1, 1, 1, 1]),
             h.make_node("Conv", ["r", "w", "b"], ["c2"], name=names[2], pads=[1, 1, 1, 1])]  # fmt: skip
    outputs = [value_info(n, [1, 4, 8, 8]) for n in ("c1", "c2")]
    q = _quantize_and_check(make_model(nodes, [value_info("x", [1, 3, 8, 8])], outputs, inits, opset=13), target="x86-vnni")
    int32 = [t.name for t in q.graph.initializer
             if t.data_type == onnx.TensorProto.INT32 and "zero_point" not in t.name]  # fmt: skip
    assert len(int32) == 2, int32


def test_unknown_input_element_type_is_an_onnxq_error() -> None:
    """A bit flip can turn a graph input's elem_type into a number ONNX does not define; onnx.checker lets it
    through, so input_specs must refuse it (it used to raise KeyError, shown by the CLI as 'unexpected')."""
    model = fixed_graph(1)
    model.graph.input[0].type.tensor_type.elem_type = 65
    with pytest.raises(OnnxqError, match="input0"):
        input_specs(model)


def test_model_names_that_onnxq_would_derive() -> None:
    """A model may already hold tensors called like the ones insert_qdq adds (x_scale, w_quantized, ...):
    inserted names must be made unique, never merged with the model's (that made invalid models)."""
    h, nh = onnx.helper, onnx.numpy_helper
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             nh.from_array(rng.standard_normal((4,)).astype(np.float32), "b"),
             nh.from_array(rng.standard_normal((4, 1, 1)).astype(np.float32), "x_scale"),
             nh.from_array(np.full((4, 1, 1), 3.0, np.float32), "w_quantized"),
             nh.from_array(np.ones((1, 4, 8, 8), np.float32), "c_zero_point")]  # fmt: skip
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("Mul", ["c", "x_scale"], ["m"], name="x/QuantizeLinear"),
             h.make_node("Add", ["m", "w_quantized"], ["a"], name="add"),
             h.make_node("Add", ["a", "c_zero_point"], ["y"], name="add2")]  # fmt: skip
    model = make_model(nodes, [value_info("x", [1, 3, 8, 8])], [value_info("y", [1, 4, 8, 8])], inits, opset=13, check=False)
    q = _quantize_and_check(model)  # full check (SSA names) and an ORT run (unique node names)
    named = [n.name for n in q.graph.node if n.name]
    assert len(named) == len(set(named))
