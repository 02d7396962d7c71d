"""Store token-embedding tables as int8 rows with one symmetric scale per row.

A transformer's word-embedding table is usually its largest tensor (MiniLM: 30522 x 384, 47 MB of its
90 MB), and the int8 presets quantize only what feeds integer compute, so without this pass the table
stays float32 and the "int8" model keeps half its size. Each row ``r`` gets ``scale_r = max|row_r| / 127``
(1 for an all-zero row) and codes ``clip(rint(row_r / scale_r), -127, 127)``; the lookup becomes::

    Gather(int8 table, ids) -> Cast(float) -> Mul(Gather(row scales, ids))

so only the looked-up rows are dequantized, at run time, and the error of any value is at most half a
step of its own row (``max|row| / 254``). Rows are independent, so one loud token does not coarsen the
others. The graph stays standard ONNX (any opset, any runtime).

Only float32 2-D tables gathered along axis 0 by a graph input (the token ids) are rewritten: a position
or rotary table indexed by computed positions is not a token embedding, and a float16 table is already
half the size. Excluded nodes (``--exclude-op Gather``, ``--exclude-node``...) stay as they are.

Settings: the recipe's ``[exclude]`` table (excluded Gather nodes stay float). Writes ``ctx.doc_strings``
(why each new node exists, for Netron).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.graphs import FreshNames
from onnxq.passes.constant_folding import materialize_weight_transposes
from onnxq.pipeline import Pass, PassContext, PassResult
from onnxq.recipe import ExcludeSpec, Recipe

__all__ = ["Int8EmbeddingsPass", "int8_rows", "quantize_embedding_tables"]

logger = logging.getLogger(__name__)

DOC = "onnxq: embedding table stored as int8, one symmetric scale per row"


def int8_rows(t: np.ndarray, rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes and one float32 scale per row (``max|row| / 127``; 1 for an all-zero row),
    computed ``rows`` rows at a time (a 49152 x 576 table needs no full-size float temporaries).
    Non-finite values are coded as 0."""
    q = np.empty(t.shape, np.int8)
    scale = np.empty(t.shape[0], np.float32)
    for r in range(0, t.shape[0], rows):
        part = np.asarray(t[r : r + rows], np.float32)
        part = np.where(np.isfinite(part), part, 0.0) if not np.isfinite(part).all() else part
        absmax = np.abs(part).max(axis=1)
        sc = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
        q[r : r + rows] = np.clip(np.rint(part / sc[:, None]), -127, 127).astype(np.int8)
        scale[r : r + rows] = sc
    return q, scale


def _is_token_table(node: gs.Node, graph_inputs: set[int]) -> bool:
    if node.op != "Gather" or int(node.attrs.get("axis", 0)) != 0 or len(node.inputs) != 2:
        return False
    table, ids = node.inputs
    if not (isinstance(table, gs.Constant) and table.values.ndim == 2 and table.values.dtype == np.float32):
        return False
    # token embeddings are indexed by the token ids; a RoPE cos/sin or position table is not one
    return id(ids) in graph_inputs and "position" not in ids.name.lower()


def quantize_embedding_tables(graph: gs.Graph, fresh: Callable[[str], str], docs: dict[str, str],
                              excluded: Callable[[gs.Node], bool] = lambda n: False) -> int:  # fmt: skip
    """Rewrite every token-embedding Gather of ``graph`` (see the module docstring); returns how many.

    ``fresh`` makes collision-free names, ``docs`` receives each new node's doc string, ``excluded`` says
    which nodes the recipe keeps as they are. Shared by this pass and the weight-only pass."""
    graph_inputs = {id(t) for t in graph.inputs}
    stored: dict[int, tuple[gs.Constant, gs.Constant]] = {}  # a table read by several Gathers is stored once
    done = 0
    for node in list(graph.nodes):
        if not _is_token_table(node, graph_inputs) or excluded(node):
            continue
        table, ids = node.inputs
        if id(table) not in stored:
            q, scale = int8_rows(table.values)
            stored[id(table)] = (gs.Constant(fresh(f"{table.name}_int8"), q),
                                 gs.Constant(fresh(f"{table.name}_row_scales"), scale[:, None]))  # fmt: skip
        q_c, s_c = stored[id(table)]
        out = node.outputs[0]
        base = node.name or table.name
        rows = gs.Variable(fresh(f"{out.name}_int8"), dtype=np.int8)
        rows_f = gs.Variable(fresh(f"{out.name}_float"), dtype=np.float32)
        row_scale = gs.Variable(fresh(f"{out.name}_scale"), dtype=np.float32)
        new = [
            gs.Node("Gather", fresh(f"{base}/GatherInt8"), attrs={"axis": 0}, inputs=[q_c, ids], outputs=[rows]),
            gs.Node("Cast", fresh(f"{base}/Cast"), attrs={"to": 1}, inputs=[rows], outputs=[rows_f]),
            gs.Node("Gather", fresh(f"{base}/GatherScale"), attrs={"axis": 0}, inputs=[s_c, ids], outputs=[row_scale]),
        ]  # fmt: skip
        node.outputs = []
        new.append(gs.Node("Mul", fresh(f"{base}/Dequantize"), inputs=[rows_f, row_scale], outputs=[out]))
        graph.nodes.extend(new)
        for n in new:
            n.doc_string = DOC
            docs[n.name] = DOC
        logger.debug("embedding %s (%s) stored as int8 rows", node.name, table.name)
        done += 1
    return done


class Int8EmbeddingsPass(Pass):
    """Store token-embedding Gather tables as int8 rows with a scale each (see the module docstring).

    counts: ``embeddings_quantized``.
    """

    name = "int8_embeddings"
    reported_counts = ("embeddings_quantized",)
    in_place = True

    def __init__(self, exclude: ExcludeSpec | None = None) -> None:
        self.exclude = exclude or ExcludeSpec()

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Int8EmbeddingsPass:
        return cls(recipe.exclude)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.exclude!r})"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        materialize_weight_transposes(graph)  # a tied weight's Transpose kept by constant folding
        exclude = self.exclude
        n = quantize_embedding_tables(graph, FreshNames(graph), ctx.doc_strings, lambda node: exclude.excludes(node.name, node.op))
        if n:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, n > 0, {"embeddings_quantized": n})
