"""The onnxq error hierarchy.

Every error a user can cause is an :class:`OnnxqError`. The CLI prints ``str(error)`` on one line and
exits non-zero without a traceback (``--debug`` shows one). Messages name the file, node, op type or
tensor at fault and, where there is one, the fix.
"""

from __future__ import annotations

__all__ = [
    "OnnxqError",
    "ModelLoadError",
    "ModelSaveError",
    "DestinationError",
    "UnsafeModelError",
    "RecipeError",
    "CalibrationError",
    "PassError",
    "MissingDependencyError",
]


class OnnxqError(Exception):
    """Base class of every error onnxq raises on purpose."""


class ModelLoadError(OnnxqError):
    """A model file is missing, is not ONNX, is truncated or otherwise unreadable."""


class ModelSaveError(OnnxqError):
    """A model could not be written (bad output path, would overwrite the input, disk full...)."""


class DestinationError(ModelSaveError):
    """An output path cannot be written safely (a special file, a file the run reads, an unwritable folder)."""


class UnsafeModelError(ModelLoadError):
    """A model refers to files outside its own folder (external-data path traversal)."""


class RecipeError(OnnxqError):
    """A recipe, preset name or override is invalid."""


class RecipeConflictError(RecipeError):
    """Both a preset and a recipe were given: one would be silently ignored (the CLI's usage error, exit 2)."""


class CalibrationError(OnnxqError):
    """Calibration data is missing, empty or does not match the model's inputs."""


class PassError(OnnxqError):
    """A graph pass failed; the message names the pass and, where known, the node."""

    def __init__(self, pass_name: str, message: str, *, node: str | None = None) -> None:
        self.pass_name = pass_name
        self.node = node
        where = f" at node '{node}'" if node else ""
        super().__init__(f"pass '{pass_name}' failed{where}: {message}")


class MissingDependencyError(OnnxqError):
    """An optional dependency is not installed; the message names the extra to install."""
