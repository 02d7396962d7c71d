"""Target profiles: detection from CPU flags and the per-node weight-range decision."""

from __future__ import annotations

import pytest

from onnxq.errors import RecipeError
from onnxq.recipe import WeightSpec
from onnxq.scheme import PerChannel, PerTensor, QuantDtype
from onnxq.target import PROFILES, detect_target, resolve_target, weight_scheme

AVX2 = "processor : 0\nflags : fpu sse sse2 avx avx2 fma\n"
VNNI = "processor : 0\nflags : fpu avx2 avx512f avx512bw avx512_vnni\n"
AVX512_NO_VNNI = "processor : 0\nflags : fpu avx2 avx512f avx512bw\n"


@pytest.mark.parametrize(
    ("machine", "cpuinfo", "expected"),
    [("x86_64", AVX2, "x86-avx2"), ("x86_64", VNNI, "x86-vnni"), ("x86_64", AVX512_NO_VNNI, "x86-avx2"),
     ("aarch64", "", "arm64"), ("riscv64", "", "generic")],  # fmt: skip
)
def test_detection(machine: str, cpuinfo: str, expected: str) -> None:
    profile, why = detect_target(machine, cpuinfo)
    assert profile.name == expected and why


def test_depthwise_keeps_full_range_on_avx2() -> None:
    avx2 = PROFILES["x86-avx2"]
    assert avx2.reduce_weight_range("Conv", 1, (64, 32, 1, 1))
    assert not avx2.reduce_weight_range("Conv", 32, (32, 1, 3, 3))
    assert avx2.reduce_weight_range("Gemm", 1, (1000, 1280))
    assert not PROFILES["x86-vnni"].reduce_weight_range("Conv", 1, (64, 32, 1, 1))


def test_weight_scheme_follows_the_target() -> None:
    spec = WeightSpec()
    avx2 = weight_scheme("Conv", (64, 32, 3, 3), spec, PROFILES["x86-avx2"], axis=0)
    assert (avx2.dtype, avx2.granularity, avx2.reduce_range) == (QuantDtype.INT8, PerChannel(0), True)
    depthwise = weight_scheme("Conv", (32, 1, 3, 3), spec, PROFILES["x86-avx2"], axis=0, group=32)
    assert not depthwise.reduce_range
    u8 = weight_scheme("MatMul", (384, 1536), spec, PROFILES["x86-avx2-u8"], axis=1)
    assert (u8.dtype, u8.granularity, u8.reduce_range) == (QuantDtype.UINT8, PerChannel(1), False)
    first_operand = weight_scheme("MatMul", (8, 16), spec, PROFILES["x86-vnni"], axis=None)
    assert (first_operand.dtype, first_operand.granularity) == (QuantDtype.INT8, PerTensor())
    forced = weight_scheme("Gemm", (10, 20), WeightSpec(reduce_range=False, symmetric=False), PROFILES["x86-avx2-u8"], axis=0)
    assert (forced.dtype, forced.reduce_range) == (QuantDtype.INT8, False)  # affine grids keep int8 storage


def test_resolve() -> None:
    assert resolve_target("auto")[1].startswith("auto:")
    with pytest.raises(RecipeError, match="unknown target 'tpu'"):
        resolve_target("tpu")
