"""Target profiles: what the deployment hardware's int8 kernels can do, and what onnxq does about it.

Why this exists: on x86 CPUs without VNNI (AVX2, or AVX-512 without VNNI), ONNX Runtime's u8 x s8
integer kernels multiply with ``VPMADDUBSW``, which adds each pair of adjacent u8*s8 products into a
*saturating int16*. With 8-bit weights (|w| <= 127) and uint8 activations (<= 255) a pair can reach
2 * 255 * 127 = 64770 > 32767, so results are silently clipped. onnxruntime's default int8 models lose
many points of top-1 on such machines for this reason. Weights limited to [-64, 64] (one bit less)
keep every pair within 2 * 255 * 64 = 32640, so the integer kernels compute exactly what the QDQ graph
says. CPUs with VNNI (``VPDPBUSD``) or ARM dot-product instructions accumulate in int32 and need no
such restriction.

A profile is chosen by name (``--target``) or detected (``auto``) from the CPU flags of the machine
running onnxq; the report records which profile was applied and why.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from onnxq.errors import PassError, RecipeError
from onnxq.scheme import PerTensor, QuantDtype, QuantScheme, Symmetry

if TYPE_CHECKING:  # onnxq.recipe imports this module
    from onnxq.recipe import WeightSpec

__all__ = ["TargetProfile", "PROFILES", "cpu_features", "detect_target", "resolve_target", "weight_scheme", "refuse_cuda"]


@dataclass(frozen=True)
class TargetProfile:
    """What onnxq assumes about the hardware that will run the quantized model.

    Attributes:
        name: short name (``--target``).
        description: one line for ``--help`` and the report.
        weight_reduce_range: whether int8 weights default to [-64, 64] (see the module docstring).
        symmetric_activations: TensorRT-style targets need zero points of 0 on activations.
    """

    name: str
    description: str
    weight_reduce_range: bool
    symmetric_activations: bool = False
    full_range_depthwise: bool = True
    uint8_weight_storage: bool = False

    def reduce_weight_range(self, op_type: str, group: int, weight_shape: tuple[int, ...]) -> bool:
        """Whether this node's int8 weights use 7 bits on this target.

        Depthwise convolutions (one input channel per group) run in a separate ONNX Runtime kernel
        that accumulates in int32 without the pairwise int16 step, so they keep full 8-bit weights.
        """
        if not self.weight_reduce_range:
            return False
        depthwise = op_type == "Conv" and group > 1 and len(weight_shape) >= 2 and weight_shape[1] == 1
        return not (depthwise and self.full_range_depthwise)


PROFILES: dict[str, TargetProfile] = {
    p.name: p
    for p in (
        TargetProfile(
            "x86-avx2",
            "x86 without VNNI (AVX2 or AVX-512 without VNNI): u8 x s8 GEMM kernels saturate in int16, "
            "so int8 weights of GEMM-backed ops use 7 bits ([-64, 64]); depthwise convs keep 8 bits",
            weight_reduce_range=True,
        ),
        TargetProfile(
            "x86-avx2-u8",
            "x86 without VNNI, accuracy first: int8-grid weights stored as uint8 (zero point 128) so "
            "ONNX Runtime runs its u8 x u8 kernels, which never saturate; full 8-bit weights, slower",
            weight_reduce_range=False,
            uint8_weight_storage=True,
        ),
        TargetProfile(
            "x86-vnni",
            "x86 with AVX-VNNI / AVX512-VNNI / AMX: int32 accumulation, full 8-bit weights",
            weight_reduce_range=False,
        ),
        TargetProfile("arm64", "ARM64 with dot-product instructions: full 8-bit weights", weight_reduce_range=False),
        TargetProfile(
            "generic",
            "unknown CPU: assume int16-saturating int8 kernels may run it, so int8 weights use 7 bits",
            weight_reduce_range=True,
        ),
        TargetProfile(
            "cuda",
            "NVIDIA GPU (ONNX Runtime CUDA or TensorRT): int8 symmetric activations and full 8-bit weights",
            weight_reduce_range=False,
            symmetric_activations=True,
        ),
    )
}


def cpu_features(cpuinfo: str | None = None) -> dict[str, bool]:
    """The int8-relevant instruction-set features of this CPU (from /proc/cpuinfo on Linux)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.exists() else ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return {
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
        "asimddp": "asimddp" in flags,
    }


def detect_target(machine: str | None = None, cpuinfo: str | None = None) -> tuple[TargetProfile, str]:
    """The profile for the CPU this process runs on, with the reason it was chosen."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        return PROFILES["arm64"], f"detected {machine}"
    if machine in ("x86_64", "amd64", "i686", "x86"):
        f = cpu_features(cpuinfo)
        if f["avx512_vnni"] or f["avx_vnni"] or f["amx_int8"]:
            have = [k for k in ("avx512_vnni", "avx_vnni", "amx_int8") if f[k]]
            return PROFILES["x86-vnni"], f"detected x86 with {', '.join(have)}"
        isa = "AVX-512" if f["avx512"] else "AVX2" if f["avx2"] else "SSE"
        return PROFILES["x86-avx2"], f"detected x86 with {isa} and no VNNI: int8 kernels saturate in int16"
    return PROFILES["generic"], f"unrecognised machine '{machine}'"


def resolve_target(name: str) -> tuple[TargetProfile, str]:
    """A profile by name (``auto`` detects this machine's), with the reason."""
    if name == "auto":
        profile, why = detect_target()
        return profile, f"auto: {why}"
    try:
        return PROFILES[name], "chosen with --target / the recipe"
    except KeyError:
        raise RecipeError(f"unknown target '{name}'; valid: auto, {', '.join(PROFILES)}") from None


def weight_scheme(
    op_type: str, weight_shape: tuple[int, ...], settings: WeightSpec, target: TargetProfile, *, axis: int | None, group: int = 1
) -> QuantScheme:
    """The scheme of one int8-family weight: the recipe's ``settings``, then what ``target``'s kernels need.

    ``axis`` is the output-channel axis of the weight as it will be stored (None: per-tensor only, e.g. a
    constant first MatMul operand); ``group`` is a Conv's ``group`` attribute. ``reduce_range = "auto"``
    follows :meth:`TargetProfile.reduce_weight_range`; on a target with ``uint8_weight_storage`` a
    symmetric int8 grid is stored as uint8 with zero point 128, which makes ONNX Runtime pick its
    u8 x u8 kernels. One function for the static, dynamic and SmoothQuant passes, so that they agree.
    """
    if settings.reduce_range == "auto":
        reduce = target.reduce_weight_range(op_type, group, weight_shape)
    else:
        reduce = bool(settings.reduce_range)
    scheme = settings.scheme(axis if axis is not None else 0, reduce_range=reduce)
    if axis is None:
        scheme = scheme.with_(granularity=PerTensor())
    if target.uint8_weight_storage and scheme.dtype is QuantDtype.INT8 and scheme.symmetry is Symmetry.SYMMETRIC:
        scheme = scheme.with_(dtype=QuantDtype.UINT8)
    return scheme


def refuse_cuda(target: TargetProfile, pass_name: str, why: str) -> None:
    """Raise a :class:`PassError` naming ``pass_name`` when ``target`` is the CUDA profile: for passes whose
    output ONNX Runtime's CUDA execution provider has no kernels for (``why`` says which and what to do)."""
    if target.name == "cuda":
        raise PassError(pass_name, f"target 'cuda': {why}")
