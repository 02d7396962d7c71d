"""Data-free calibration: :class:`RandomSource`."""

from __future__ import annotations

from typing import Iterator

import numpy as np
from onnxq.calibration.sources.base import CalibrationSource, InputSpec, shape_text
from onnxq.errors import CalibrationError


class RandomSource(CalibrationSource):
    """Data-free calibration: floats ~ N(0, 1), ints in [0, 100), random bools; deterministic by ``seed``.

    Symbolic dims take their size from ``dim_values`` (keyed by dim name), else 1.
    """

    def __init__(self, specs: list[InputSpec], *, count: int = 8, seed: int = 0,
                 dim_values: dict[str, int] | None = None) -> None:
        if count < 1:
            raise CalibrationError(f"random calibration needs a positive sample count, got {count}")
        self.specs, self.count, self.seed, self.dim_values = list(specs), count, seed, dict(dim_values or {})
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
                    feed[s.name] = rng.integers(0, 100, shape).astype(s.dtype)
                else:
                    feed[s.name] = rng.standard_normal(shape, dtype=np.float32).astype(s.dtype)
            yield feed

    def __len__(self) -> int:
        return self.count

    def describe(self) -> str:
        shapes = ", ".join(f"{k} {shape_text(v)}" for k, v in self.shapes.items())
        return f"random inputs ({self.count} samples, seed {self.seed}, floats N(0,1), ints [0,100); {shapes})"
