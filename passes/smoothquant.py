"""SmoothQuant: move activation outliers into the weights before int8 quantization.

Transformer activations have a few input channels whose values are 10-100x larger than the rest, so a
per-tensor activation scale wastes most of the int8 grid on them. SmoothQuant (Xiao et al., 2023) divides
each input channel j of a linear layer's activation by a factor ``s_j`` and multiplies row j of the weight
by the same factor, which leaves ``X @ W`` unchanged in exact arithmetic::

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)          X' = X / s,   W' = diag(s) @ W

``max|X_j|`` comes from calibration (streamed per-channel statistics), ``max|W_j|`` from row j of every
weight that reads X (the Q/K/V projections that share an input share one ``s``). The division of X is
never a new op when it can be avoided: ``1/s`` is folded into what produces X:

* a LayerNormalization's scale and bias (cloned when X also feeds something else, e.g. BERT's residual),
* a Mul by a constant (an RMSNorm weight), a Div by a constant, a bias Add,
* a preceding MatMul/Gemm's output columns, also through Reshape/Transpose and an attention MatMul
  (the attention-output projection's input is folded into the V projection), and through Relu.

Only when nothing can absorb it is an explicit ``Mul`` inserted (counted in the report). ``alpha`` is the
recipe's (0.5 by default) or, with ``alpha = "auto"``, searched per layer over a grid: each candidate
is scored by the relative error of the quantized layer output ``Q(X/s) @ Q(diag(s) W)`` against
``X @ W`` on a reservoir sample of calibration rows, with the schemes the later ``insert_qdq`` uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.calibration.channel_stats import ChannelStats, collect_channel_stats
from onnxq.errors import PassError
from onnxq.graphs import FreshNames
from onnxq.passes.constant_folding import materialize_weight_transposes
from onnxq.pipeline import ConfiguredPass, PassContext, PassResult
from onnxq.recipe import NodeConfig, Recipe, SmoothQuantSpec
from onnxq.recipe_schema import TableSettings
from onnxq.scheme import Symmetry, choose_qparams, dequantize, quantize
from onnxq.target import TargetProfile, weight_scheme

from .insert_qdq import STATIC_CALIBRATION_REFUSAL
from .scale_folding import ScaleEdit, apply_edit, float_constant, plan_node, plan_producer, value_readers

__all__ = ["SmoothQuantPass", "SmoothQuantSettings", "smooth_factors", "smoothquant"]

logger = logging.getLogger(__name__)

_MIN = 1e-5  # the paper's clamp on both maxima: channels that are (almost) zero get no extreme factor


def smooth_factors(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``; 1 for channels that never fire or have no weight."""
    x = np.maximum(np.asarray(x_absmax, np.float64), _MIN)
    w = np.maximum(np.asarray(w_absmax, np.float64), _MIN)
    s = x**alpha / w ** (1.0 - alpha)
    dead = (np.asarray(x_absmax) <= 0) | (np.asarray(w_absmax) <= 0) | ~np.isfinite(s)
    return np.where(dead, 1.0, s).astype(np.float32)


@dataclass
class _Group:
    """One activation and the weight ops reading it (they share one smoothing factor)."""

    x: gs.Variable
    consumers: list[gs.Node]
    others: list[gs.Node] = field(default_factory=list)


@dataclass(frozen=True)
class SmoothQuantSettings(TableSettings):
    """What :class:`SmoothQuantPass` reads of a recipe: the nodes the quantizing pass will quantize (only those
    are smoothed, with their schemes) and the ``[smoothquant]`` table."""

    TABLE_KEY: ClassVar[str] = "smoothquant"
    spec: SmoothQuantSpec = field(default_factory=SmoothQuantSpec)


class SmoothQuantPass(ConfiguredPass[SmoothQuantSettings]):
    """Smooth the input of every MatMul/Gemm with a constant weight (see the module docstring).

    Needs calibration samples (``ctx.calibration`` with a source); reads ``ctx.target``. Writes
    ``ctx.doc_strings`` for the smoothed nodes and ``ctx.smoothquant_alphas`` (per-activation alpha and
    factor range).
    """

    name = "smoothquant"
    settings_class = SmoothQuantSettings
    needs_samples = True

    def missing_calibration_message(self, recipe_name: str) -> str:
        return STATIC_CALIBRATION_REFUSAL.format(recipe=recipe_name)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        materialize_weight_transposes(graph)  # a tied weight's Transpose kept by constant folding
        spec = self.settings.spec
        counts = {"layers_smoothed": 0, "groups_smoothed": 0, "folded_layernorm": 0, "folded_linear": 0,
                  "folded_mul": 0, "producers_cloned": 0, "muls_inserted": 0, "groups_left_unsmoothed": 0}  # fmt: skip
        notes: list[str] = []
        groups = self._groups(graph, ctx)
        if not groups:
            return PassResult(graph, False, counts, ["no MatMul/Gemm with a constant weight to smooth"])
        source = getattr(ctx.calibration, "source", None)
        if source is None:
            raise PassError(
                self.name,
                "SmoothQuant needs calibration samples (per-channel activation maxima): pass --calib; "
                "a --calib-cache holds activation ranges only",
            )
        auto = spec.alpha == "auto"
        device = getattr(getattr(ctx.calibration, "spec", None), "device", "auto")
        stats = collect_channel_stats(graph, [g.x.name for g in groups], source, device=device,
                                      sample_rows=spec.max_rows, progress=ctx.progress)  # fmt: skip
        target = ctx.target
        self._fresh = FreshNames(graph)
        docs = ctx.doc_strings
        chosen: dict[str, dict[str, float]] = {}
        for g in groups:
            st = stats[g.x.name]
            wmax = np.max([_weight_rows(c).__abs__().max(axis=1) for c in g.consumers], axis=0)
            alpha = self._choose(g, st, wmax, ctx, target)
            if alpha is None:
                counts["groups_left_unsmoothed"] += 1
                continue
            s = smooth_factors(st.absmax, wmax, alpha)
            where = self._divide_activation(graph, g, s, counts)
            self._scale_weights(g, s)
            counts["groups_smoothed"] += 1
            counts["layers_smoothed"] += len(g.consumers)
            chosen[g.x.name] = {"alpha": alpha, "s_min": float(s.min()), "s_max": float(s.max())}
            for c in g.consumers:
                docs[c.name] = (f"onnxq: SmoothQuant alpha {alpha:g}, weight rows x s (s in [{s.min():.3g}, "
                                f"{s.max():.3g}]); input divided by s in {where}")  # fmt: skip
        ctx.smoothquant_alphas = chosen
        alphas = np.array([v["alpha"] for v in chosen.values()] or [np.nan])
        if counts["groups_left_unsmoothed"]:
            notes.append(f"{counts['groups_left_unsmoothed']} of {len(groups)} layer inputs left unsmoothed: smoothing "
                         "made their quantized output worse on the calibration rows")  # fmt: skip
        if auto:
            notes.append(f"alpha searched per layer over {len(spec.alpha_grid)} values: median {np.median(alphas):g}, "
                         f"range {alphas.min():g}..{alphas.max():g}")  # fmt: skip
        if counts["muls_inserted"]:
            notes.append(f"{counts['muls_inserted']} activations could not absorb 1/s in what produces them: "
                         "an explicit Mul was inserted for each")  # fmt: skip
        graph.cleanup().toposort()
        return PassResult(graph, True, counts, notes)

    # -- which activations -------------------------------------------------------------------------

    def _groups(self, graph: gs.Graph, ctx: PassContext) -> list[_Group]:
        ops = self.settings.spec.op_types
        by_x: dict[str, _Group] = {}
        for node in graph.nodes:
            if node.op not in ops or len(node.inputs) < 2:
                continue
            x, w = node.inputs[0], node.inputs[1]
            if not isinstance(x, gs.Variable) or not isinstance(w, gs.Constant) or w.values.ndim != 2:
                continue
            if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
                continue
            if not np.issubdtype(w.values.dtype, np.floating):
                continue
            # only layers that will be quantized: smoothing a float layer buys nothing
            if self.settings.selection.config_for(node.name, node.op) is None:
                continue
            by_x.setdefault(x.name, _Group(x, [])).consumers.append(node)
        groups = list(by_x.values())
        for g in groups:
            g.others = [n for n in value_readers(g.x) if not any(n is c for c in g.consumers)]
        return groups

    # -- alpha search ------------------------------------------------------------------------------

    def _choose(self, g: _Group, st: ChannelStats, wmax: np.ndarray, ctx: PassContext, target: TargetProfile) -> float | None:
        """The alpha to smooth ``g`` with, or None when smoothing would make the quantized layer worse.

        Candidates: the recipe's alpha (or the whole grid for ``auto``) and no smoothing at all. Each is
        scored by the relative error of the quantized layer outputs on the sampled calibration rows.
        No smoothing wins e.g. for a GELU output, which is asymmetric (-0.17 .. large): dividing its
        small channels by s < 1 widens the negative side of an affine per-tensor range.
        """
        spec = self.settings.spec
        grid = list(spec.alpha_grid) if spec.alpha == "auto" else [float(spec.alpha)]
        rows = st.sample
        if rows is None or rows.shape[0] == 0:
            return grid[len(grid) // 2] if spec.alpha == "auto" else grid[0]
        rows = rows[np.isfinite(rows).all(axis=1)]
        ws = [_weight_rows(c).astype(np.float32) for c in g.consumers]
        refs = [rows @ w for w in ws]
        cfgs = [self.settings.selection.config_for(c.name, c.op) for c in g.consumers]
        act_scheme = cfgs[0].activations.scheme() if cfgs[0] is not None else None
        if act_scheme is not None and target.symmetric_activations:
            act_scheme = act_scheme.with_(symmetry=Symmetry.SYMMETRIC)

        def error(s: np.ndarray) -> float:
            xs = rows / s
            if act_scheme is not None:
                sc, zp = choose_qparams(xs, act_scheme)
                xs = dequantize(quantize(xs, sc, zp, act_scheme), sc, zp, act_scheme)
            total = 0.0
            for c, cfg, w, ref in zip(g.consumers, cfgs, ws, refs):
                wq = _fake_quant_weight(c, w * s[:, None], cfg, target)
                total += float(np.sum((xs @ wq - ref).astype(np.float64) ** 2))
            return total

        best: float | None = None
        best_err = error(np.ones(rows.shape[1], np.float32))
        for alpha in grid:
            err = error(smooth_factors(st.absmax, wmax, float(alpha)))
            if err < best_err:
                best, best_err = float(alpha), err
        return best

    # -- X / s ------------------------------------------------------------------------------------------

    def _divide_activation(self, graph: gs.Graph, g: _Group, s: np.ndarray, counts: dict[str, int]) -> str:
        x = g.x
        rank = len(x.shape) if x.shape is not None else None
        if rank is None or rank < 1:
            return self._insert_mul(graph, g, s, counts)
        f = (1.0 / s).astype(np.float32).reshape((1,) * (rank - 1) + (-1,))
        is_output = any(x is o for o in graph.outputs)
        if not g.others and not is_output:
            edits = plan_producer(x, f)
            if edits is not None:
                return self._apply(edits, counts)
            return self._insert_mul(graph, g, s, counts)
        # X also feeds other nodes (a residual Add, say): give the smoothed consumers their own copy of a
        # cheap producer (LayerNormalization, a Mul by a constant) with 1/s folded in
        p = x.inputs[0] if x.inputs else None
        if p is not None and _cheap_to_clone(p):
            clone_out = gs.Variable(self._fresh(f"{x.name}_smoothed"), dtype=x.dtype, shape=x.shape)
            clone = gs.Node(p.op, self._fresh(f"{p.name or x.name}/smoothed"), attrs=dict(p.attrs),
                            inputs=list(p.inputs), outputs=[clone_out])  # fmt: skip
            edits = plan_node(clone, clone_out, f)
            if edits is not None:
                graph.nodes.append(clone)
                for c in g.consumers:
                    c.inputs = [clone_out if t is x else t for t in c.inputs]
                counts["producers_cloned"] += 1
                return self._apply(edits, counts) + f" (a copy of '{p.name}' feeds the smoothed layers)"
        return self._insert_mul(graph, g, s, counts)

    def _insert_mul(self, graph: gs.Graph, g: _Group, s: np.ndarray, counts: dict[str, int]) -> str:
        x = g.x
        inv = gs.Constant(self._fresh(f"{x.name}_smooth_inv_scale"), (1.0 / s).astype(np.float32))
        out = gs.Variable(self._fresh(f"{x.name}_smoothed"), dtype=x.dtype, shape=x.shape)
        graph.nodes.append(gs.Node("Mul", self._fresh(f"{x.name}/SmoothQuant/Mul"), inputs=[x, inv], outputs=[out]))
        for c in g.consumers:
            c.inputs = [out if t is x else t for t in c.inputs]
        counts["muls_inserted"] += 1
        return "an inserted Mul"

    def _apply(self, edits: list[ScaleEdit], counts: dict[str, int]) -> str:
        for e in edits:
            apply_edit(e, self._fresh, "_smoothed")
            key = {"LayerNormalization": "folded_layernorm", "MatMul": "folded_linear", "Gemm": "folded_linear"}.get(e.where, "folded_mul")
            counts[key] += 1
        return ", ".join(dict.fromkeys(f"{e.where} '{e.node.name}'" for e in edits))

    # -- W * s ----------------------------------------------------------------------------------------------

    def _scale_weights(self, g: _Group, s: np.ndarray) -> None:
        done: set[int] = set()
        for c in g.consumers:
            w = c.inputs[1]
            assert isinstance(w, gs.Constant)
            if id(w) in done:
                continue
            trans = c.op == "Gemm" and int(c.attrs.get("transB", 0))
            factor = s[None, :] if trans else s[:, None]
            values = np.asarray(w.values * factor, dtype=w.values.dtype)
            users = [n for n in w.outputs]
            if all(any(u is c2 for c2 in g.consumers) for u in users):
                w.values = values  # every reader is smoothed with this s: scale once
                done.add(id(w))
            else:
                c.inputs[1] = gs.Constant(self._fresh(f"{w.name}_smoothed"), values)


def _cheap_to_clone(p: gs.Node) -> bool:
    if p.op == "LayerNormalization":
        return all(not o.outputs for o in p.outputs[1:])
    return p.op == "Mul" and len(p.outputs) == 1 and any(float_constant(t) for t in p.inputs[:2])


def _weight_rows(node: gs.Node) -> np.ndarray:
    """The weight as [K, N] (row j reads input channel j), whatever the op's layout."""
    w = node.inputs[1].values
    return w.T if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else w


def _fake_quant_weight(node: gs.Node, w_kn: np.ndarray, cfg: NodeConfig | None, target: TargetProfile) -> np.ndarray:
    """``w_kn`` ([K, N]) after the quantize-dequantize round trip ``insert_qdq`` will apply (min-max ranges)."""
    if cfg is None:
        return w_kn
    scheme = weight_scheme(node.op, tuple(w_kn.shape), cfg.weights, target, axis=1)  # axis 1: N of [K, N]
    scale, zp = choose_qparams(w_kn, scheme)
    return dequantize(quantize(w_kn, scale, zp, scheme, clip_to_scheme=True), scale, zp, scheme)


def smoothquant(graph: gs.Graph, ctx: PassContext, recipe: Recipe | None = None) -> gs.Graph:
    """Convenience function: run :class:`SmoothQuantPass` configured from ``recipe`` (default: ``Recipe()``) on ``graph``."""
    return SmoothQuantPass.from_recipe(recipe or Recipe())(graph, ctx).graph
