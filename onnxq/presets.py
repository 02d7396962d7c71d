"""The preset recipes (``--preset NAME``, ``onnxq presets``): the :data:`PRESETS` table and :func:`preset`.

Each preset is a :class:`~onnxq.recipe.Recipe` built from the dataclasses of :mod:`onnxq.recipe_schema`;
a TOML recipe starts from one with ``preset = "NAME"``.
"""

from __future__ import annotations

from typing import Any

from onnxq.errors import RecipeError
from onnxq.recipe_schema import ActivationSpec, CalibrationSpec, Recipe, WeightOnlySpec, WeightSpec

__all__ = ["PRESETS", "preset"]


_WEIGHT_ONLY_PASSES = ("upcast_float16", "shape_inference", "constant_folding", "canonical_gelu", "remove_dead_nodes",
                       "weight_only")


def _w4(name: str, description: str, method: str, **spec: Any) -> Recipe:
    """A weight-only int4 preset: MatMulNBits output, 32 calibration windows where the method needs data."""
    calibration = CalibrationSpec() if method == "rtn" else CalibrationSpec(samples=32)
    return Recipe(name=name, description=description, passes=_WEIGHT_ONLY_PASSES, format="matmulnbits",
                  weight_only=WeightOnlySpec(method=method, **spec), calibration=calibration)  # type: ignore[arg-type]

PRESETS: dict[str, Recipe] = {
    "w8a8": Recipe(
        name="w8a8",
        description="static int8, QDQ: uint8 activations (MSE range for ReLU outputs, 99.95th percentiles "
        "for signed tensors), int8 per-channel weights (MSE range); weight bits set by the target CPU",
    ),
    "w8a8-per-tensor": Recipe(
        name="w8a8-per-tensor",
        description="static int8 like w8a8 but one scale per weight tensor (for runtimes without per-channel)",
        weights=WeightSpec(granularity="per-tensor"),
    ),
    "w8a16": Recipe(
        name="w8a16",
        description="int8 per-channel weights with uint16 activations: higher accuracy, QDQ (opset 21)",
        activations=ActivationSpec(dtype="uint16"),
        # with 65536 levels clipping buys nothing: cover the whole observed range
        calibration=CalibrationSpec(method="minmax"),
    ),
    "w8a8-smoothquant": Recipe(
        name="w8a8-smoothquant",
        description="static int8 for transformers: SmoothQuant moves activation outliers into the weights "
        "(alpha 0.5, or --alpha auto), then w8a8 QDQ with MSE activation ranges (percentiles would clip the outliers)",
        # LayerNorm outputs carry rare large values that matter: a percentile range clips them (MiniLM embedding
        # cosine to fp32 0.917 with mse-percentile vs 0.995 with mse, measured 2026-11-30)
        calibration=CalibrationSpec(method="mse"),
        passes=("upcast_float16", "shape_inference", "constant_folding", "fold_batchnorm", "canonical_gelu",
                "remove_dead_nodes", "int8_embeddings", "smoothquant", "insert_qdq"),  # fmt: skip
    ),
    "int8-dynamic": Recipe(
        name="int8-dynamic",
        description="dynamic int8, no calibration: weight MatMul/Gemm run as MatMulInteger with one activation "
        "scale per token computed at run time (after a block-64 Hadamard rotation); int8 per-channel weights, "
        "bits set by the target CPU",
        passes=("upcast_float16", "shape_inference", "constant_folding", "canonical_gelu", "remove_dead_nodes",
                "int8_embeddings", "dynamic"),
    ),
    "qoperator": Recipe(
        name="qoperator",
        description="no new quantization: lower an already-QDQ model (from onnxq, onnxruntime or PyTorch QAT) "
        "to QOperator ops (QLinearConv, QLinearMatMul, MatMulInteger, ...) for the --target",
        passes=("shape_inference", "qoperator"),
        format="qoperator",
    ),
    "w4-rtn": _w4("w4-rtn", "int4 weight-only, round to nearest, no calibration: MatMul weights in 4 bits "
                  "(asymmetric, block 128) as com.microsoft.MatMulNBits, int8 embeddings, float activations", "rtn"),
    "w4-gptq": _w4("w4-gptq", "int4 weight-only with GPTQ (needs --calib, e.g. 32 x 512 tokens): rounding errors "
                   "compensated layer by layer from each layer's input statistics; MatMulNBits, block 128", "gptq"),
    "w4-gptq-awq": _w4("w4-gptq-awq", "int4 weight-only, AWQ's scale search and fold on each layer input, then GPTQ "
                       "on the scaled weights (needs --calib): the most accurate of the w4 presets on SmolLM2; "
                       "MatMulNBits, block 128", "gptq", awq_scales=True, awq_loss="linear"),
    "w4-awq": _w4("w4-awq", "int4 weight-only with AWQ (needs --calib): per-channel scales that protect salient "
                  "weights, folded into the preceding op, then clipping search; MatMulNBits, block 128", "awq"),
    "fp16": Recipe(
        name="fp16",
        description="float16 conversion, no calibration: weights and compute in float16, float32 inputs/outputs; "
        "normalisations, softmax and reductions stay float32",
        passes=("shape_inference", "constant_folding", "fold_batchnorm", "canonical_gelu", "remove_dead_nodes", "float16"),
    ),
}


def preset(name: str) -> Recipe:
    """The preset called ``name``; an unknown name is a RecipeError listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise RecipeError(f"unknown preset '{name}'; valid presets: {', '.join(PRESETS)} (see `onnxq presets`)") from None
