"""The one place onnxq imports ONNX Runtime, so that a missing runtime gives one clear message.

``onnxq[cpu]`` installs ``onnxruntime``; ``onnxq[gpu]`` installs ``onnxruntime-gpu`` (which also runs
on the CPU). Either provides the ``onnxruntime`` module.
"""

from __future__ import annotations

import os

from onnxq.errors import MissingDependencyError

__all__ = ["ort", "available_providers", "make_session"]

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - exercised only without onnxruntime
    raise MissingDependencyError(
        "onnxq needs ONNX Runtime: install it with `pip install \"onnxq[cpu]\"` "
        "(or `\"onnxq[gpu]\"` for the CUDA execution provider)"
    ) from exc

# ORT's optimisers log warnings through the process-wide default logger, not the session's
# ("UnsqueezeElimination cannot remove node ..."): harmless for onnxq's observer models, noise for users
ort.set_default_logger_severity(3)


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers."""
    return list(ort.get_available_providers())


def make_session(
    model_bytes_or_path: bytes | str,
    *,
    providers: list[str] | None = None,
    optimization: str = "all",
    threads: int = 0,
    spinning: bool = True,
) -> "ort.InferenceSession":
    """An InferenceSession with a chosen graph-optimisation level ("disable", "basic", "extended", "all").

    ``threads`` (or the ``ONNXQ_THREADS`` environment variable; 0 = ORT's default, all cores) sets the
    intra-op threads: ``onnxq batch`` gives each worker its share of the cores. ``spinning=False`` for a
    session that runs beside other work (the calibration runner's histogram updates): idle threads then
    sleep instead of spinning on the cores that work needs.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    threads = threads or int(os.environ.get("ONNXQ_THREADS", "0") or 0)
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes_or_path, sess_options=so, providers=providers or ["CPUExecutionProvider"])
