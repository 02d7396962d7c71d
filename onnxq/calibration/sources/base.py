"""What every calibration source shares: the model's input specs, the :class:`CalibrationSource` interface
and the small checks and counts the readers use."""

from __future__ import annotations

import abc
import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper
from onnxq.errors import CalibrationError

Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and shape (ints for static dims, names or None for dynamic ones)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    @property
    def batched(self) -> bool:
        """True when dim 0 looks like a batch dim (rank >= 2, dim 0 dynamic or 1): samples then get batch 1."""
        return len(self.shape) >= 2 and not (isinstance(self.shape[0], int) and self.shape[0] != 1)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller feeds: graph inputs that are not initializers (old IR versions list those too)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in (v for v in model.graph.input if v.name not in inits):
        if not vi.type.HasField("tensor_type") or vi.type.tensor_type.elem_type == 0:
            raise CalibrationError(f"model input '{vi.name}' is not a typed tensor; onnxq can only feed tensors")
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):  # an element type ONNX does not define (a corrupt file)
            raise CalibrationError(f"model input '{vi.name}' has element type {tt.elem_type}, which is not an "
                                   "ONNX tensor type; the model looks corrupt, re-export it") from None
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def shape_text(shape: Sequence[Dim]) -> str:
    """A shape as error messages show it: ``(1, 3, ?, ?)`` (dynamic dims as ``?``)."""
    items = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def shape_fits(shape: Sequence[int], dims: Sequence[Dim]) -> bool:
    """Same rank and every static dim equal."""
    return len(shape) == len(dims) and all(not isinstance(d, int) or d == s for s, d in zip(shape, dims))


def shape_mismatch(what: str, arr_shape: Sequence[int], spec: InputSpec) -> CalibrationError:
    """The one-line error for an array of shape ``arr_shape`` (named ``what``) that cannot feed ``spec``."""
    return CalibrationError(f"{what} has shape {shape_text(arr_shape)} but model input '{spec.name}' expects {shape_text(spec.shape)}")


def evenly_spaced(total: int, limit: int | None) -> list[int]:
    """``limit`` indices evenly spaced over ``range(total)`` (all of them when limit is None or >= total)."""
    if limit is not None and limit < 1:
        raise CalibrationError(f"calibration limit must be a positive number of samples, got {limit}")
    return list(range(total)) if limit is None or limit >= total else [i * total // limit for i in range(limit)]


def castable(src: np.dtype, dst: np.dtype) -> bool:
    """True when values of dtype ``src`` may be cast to ``dst`` without changing their kind."""
    return src == dst or np.can_cast(src, dst, casting="same_kind")


def natural_key(p: Path) -> list[Any]:
    """Sort key that orders ``file2`` before ``file10`` (numbers by value)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def count_text(n: int, total: int, unit: str) -> str:
    """``"500 images"``, or ``"8 of 500 images, evenly spaced"`` when a limit picked fewer."""
    return f"{n} {unit}" if n == total else f"{n} of {total} {unit}, evenly spaced"


class CalibrationSource(abc.ABC):
    """A re-iterable stream of feed dicts, one per calibration sample (batch dim 1 where the model has one)."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield one feed dict per sample; each iteration starts again from the first sample."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of samples one iteration yields."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the report, e.g. ``image folder X (500 images, preprocess torch, 224x224)``."""

    def _label(self, name: str) -> str:
        """How error messages name the array that feeds input ``name``."""
        return f"calibration input '{name}'"

    def sample_name(self, i: int) -> str:
        """How reports name the ``i``-th sample one iteration yields: its file where it has one."""
        return f"sample {i}"

    def validate(self, specs: list[InputSpec]) -> None:
        """Check names, dtypes, ranks and static dims of the first sample against ``specs`` before any run."""
        with contextlib.closing(iter(self)) as it:  # type: ignore[type-var]
            first = next(it, None)
        if first is None:
            raise CalibrationError(f"{self.describe()} yields no calibration samples")
        names = [s.name for s in specs]
        if sorted(first) != sorted(names):
            raise CalibrationError(f"{self.describe()} has arrays {sorted(first)} but the model's inputs are {names}")
        for s in specs:
            arr = first[s.name]
            if arr.dtype != s.dtype:
                raise CalibrationError(f"{self._label(s.name)} has dtype {arr.dtype} but model input '{s.name}' expects {s.dtype}")
            if not shape_fits(arr.shape, s.shape):
                raise shape_mismatch(self._label(s.name), arr.shape, s)
