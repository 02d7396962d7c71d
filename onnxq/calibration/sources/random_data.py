"""Data-free calibration: :class:`RandomSource`."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
from onnxq.calibration.sources.base import CalibrationSource, InputSpec, shape_text
from onnxq.errors import CalibrationError


INT_HIGH = 100
"""Random integer inputs are drawn from [0, INT_HIGH), or below the size of the table they index."""

_VALUE_PRESERVING = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten")


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For each integer graph input that indexes a constant table (a Gather's indices: token ids into an
    embedding, ``token_type_ids`` into a 2-row table), the table's size along the gathered axis; the
    smallest where it indexes several. Followed through ops that keep the values (Cast, Reshape, ...), so
    random calibration never feeds an id the model cannot look up."""
    g = model.graph
    sizes = {t.name: list(t.dims) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            sizes[n.output[0]] = list(n.attribute[0].t.dims)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    bounds: dict[str, int] = {}
    for inp in g.input:
        if inp.name in sizes or inp.type.tensor_type.elem_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            continue
        todo, seen = [inp.name], {inp.name}
        while todo:
            name = todo.pop()
            for n in readers.get(name, []):
                if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == name and n.input[0] in sizes:
                    axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                    dims = sizes[n.input[0]]
                    if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
                        bounds[inp.name] = min(bounds.get(inp.name, dims[axis]), dims[axis])
                elif n.op_type in _VALUE_PRESERVING and n.input[0] == name and n.output[0] not in seen:
                    seen.add(n.output[0])
                    todo.append(n.output[0])
    return bounds


class RandomSource(CalibrationSource):
    """Data-free calibration: floats ~ N(0, 1), ints in [0, 100) (below ``int_high[name]`` where given: the
    size of the table an id input indexes, see :func:`index_bounds`), random bools; deterministic by ``seed``.

    Symbolic dims take their size from ``dim_values`` (keyed by dim name), else 1.
    """

    def __init__(self, specs: list[InputSpec], *, count: int = 8, seed: int = 0,
                 dim_values: dict[str, int] | None = None, int_high: dict[str, int] | None = None) -> None:
        if count < 1:
            raise CalibrationError(f"random calibration needs a positive sample count, got {count}")
        self.specs, self.count, self.seed, self.dim_values = list(specs), count, seed, dict(dim_values or {})
        self.int_high = {k: min(INT_HIGH, v) for k, v in (int_high or {}).items()}
        for s in self.specs:
            if not (s.dtype.kind in "fiub" or "float" in s.dtype.name):
                what = "strings" if s.dtype.kind in "OSU" else f"dtype {s.dtype}"
                raise CalibrationError(f"model input '{s.name}' holds {what}, and random calibration makes only numbers "
                                       "and bools: give --calib files (.npz/.npy) with real values for it")
        self.shapes = {s.name: tuple(d if isinstance(d, int) else self.dim_values.get(d or "", 1) for d in s.shape)
                       for s in self.specs}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.count):
            feed = {}
            for s in self.specs:
                shape = self.shapes[s.name]
                if s.dtype.kind == "b":
                    feed[s.name] = rng.random(shape) < 0.5
                elif s.dtype.kind in "iu":
                    feed[s.name] = rng.integers(0, self.int_high.get(s.name, INT_HIGH), shape).astype(s.dtype)
                else:
                    feed[s.name] = rng.standard_normal(shape, dtype=np.float32).astype(s.dtype)
            yield feed

    def __len__(self) -> int:
        return self.count

    def describe(self) -> str:
        shapes = ", ".join(f"{k} {shape_text(v)}" for k, v in self.shapes.items())
        ints = "".join(f", {k} [0,{v})" for k, v in self.int_high.items())
        return f"random inputs ({self.count} samples, seed {self.seed}, floats N(0,1), ints [0,{INT_HIGH}){ints}; {shapes})"
