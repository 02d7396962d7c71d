"""onnxq's graph passes, one module each; ``PASSES`` maps each pass's short name to its class.

Recipes name passes by these short names (``recipe.passes``); :func:`build_passes` builds a recipe's passes,
each with its own settings (:meth:`onnxq.pipeline.Pass.from_recipe`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxq.errors import PassError
from onnxq.pipeline import Pass

from .canonical_gelu import CanonicalGeluPass, canonical_gelu
from .constant_folding import ConstantFoldingPass, fold_constants
from .dynamic import DynamicQuantizePass, quantize_dynamic
from .float16 import Float16Pass, convert_float16
from .fold_batchnorm import FoldBatchNormPass, fold_batchnorm
from .insert_qdq import InsertQDQPass, insert_qdq
from .int8_embeddings import Int8EmbeddingsPass, quantize_embedding_tables
from .qoperator import QOperatorPass, lower_to_qoperator
from .remove_dead_nodes import RemoveDeadNodesPass, remove_dead_nodes
from .smoothquant import SmoothQuantPass, smoothquant
from .shape_inference import ShapeInferencePass, infer_shapes
from .upcast_float16 import UpcastFloat16Pass, upcast_float16
from .weight_only import WeightOnlyPass, quantize_weight_only

if TYPE_CHECKING:
    from onnxq.recipe import Recipe

__all__ = [
    "PASSES",
    "build_passes",
    "CanonicalGeluPass",
    "ConstantFoldingPass",
    "DynamicQuantizePass",
    "FoldBatchNormPass",
    "Float16Pass",
    "InsertQDQPass",
    "Int8EmbeddingsPass",
    "QOperatorPass",
    "RemoveDeadNodesPass",
    "ShapeInferencePass",
    "SmoothQuantPass",
    "UpcastFloat16Pass",
    "WeightOnlyPass",
    "canonical_gelu",
    "convert_float16",
    "fold_batchnorm",
    "fold_constants",
    "infer_shapes",
    "insert_qdq",
    "lower_to_qoperator",
    "quantize_dynamic",
    "quantize_embedding_tables",
    "quantize_weight_only",
    "remove_dead_nodes",
    "smoothquant",
    "upcast_float16",
]

PASSES: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        UpcastFloat16Pass,
        ShapeInferencePass,
        ConstantFoldingPass,
        FoldBatchNormPass,
        CanonicalGeluPass,
        RemoveDeadNodesPass,
        Int8EmbeddingsPass,
        SmoothQuantPass,
        InsertQDQPass,
        QOperatorPass,
        DynamicQuantizePass,
        WeightOnlyPass,
        Float16Pass,
    )
}


def build_passes(recipe: Recipe) -> list[Pass]:
    """One fresh instance of every pass ``recipe`` runs (:meth:`Recipe.pass_names`), in order, each configured
    with its own settings from the recipe."""
    unknown = [name for name in recipe.pass_names() if name not in PASSES]
    if unknown:
        raise PassError(unknown[0], f"unknown pass; valid: {', '.join(PASSES)}")
    return [PASSES[name].from_recipe(recipe) for name in recipe.pass_names()]
