"""Weight-only quantization: MatMul weights in 4 (or 8) bits with RTN, GPTQ or AWQ; activations stay float.

This is how LLMs are deployed on ONNX Runtime: memory traffic, not arithmetic, bounds a decoder's speed,
so weights shrink to 4 bits and are dequantized inside the kernel. Every MatMul whose second input is a
constant 2-D float weight ``[K, N]`` is quantized on a :class:`~onnxq.weightonly.grid.WeightGrid`
(blocks of ``block_size`` rows along K share a scale per output column) by one of:

* ``rtn``: round to nearest, no data;
* ``gptq``: GPTQ (:mod:`onnxq.weightonly.gptq`) from each layer's input Hessian ``H = X^T X``;
* ``awq``: AWQ (:mod:`onnxq.weightonly.awq`): a per-input-channel scale ``s`` searched on a grid, ``W``'s
  rows multiplied by ``s`` and ``1/s`` folded into what produces ``X`` (an RMSNorm/LayerNorm weight, the
  previous projection's output columns, also through a grouped-query attention's repeat of the KV heads,
  with the scales of the query heads sharing a KV head tied; never a new op: a group whose input cannot
  absorb it is left unscaled and not searched), then a per-block clipping search. As in the paper, the scales of a group
  that opens a module (q/k/v: attention up to o_proj; gate/up: the MLP up to down_proj) are scored on
  that module's output, computed by a :class:`~onnxq.weightonly.segments.Probe` on the stored
  activations (on as many calibration samples as :data:`AWQ_MODULE_MACS` allows); each candidate is
  scored with its clips applied. ``gptq`` with ``awq_scales`` uses the same scale search, without clips.

GPTQ and AWQ are sequential: :class:`~onnxq.weightonly.segments.SegmentRunner` runs the graph segment by
segment so that every layer's statistics come from the already-quantized earlier layers, in one pass
over the calibration set. While the pass runs, quantized weights are held in the graph as their float
dequantized values; at the end each MatMul is packed as ``com.microsoft.MatMulNBits`` (``format =
"matmulnbits"``) or as an opset-21 blocked int4 ``DequantizeLinear`` feeding the MatMul (``format =
"qdq"``). The output projection (``lm_head``) can stay float or use 8 bits, and constant Gather tables
(token embeddings) are stored as int8 with one scale per row.

Settings: :class:`~onnxq.weightonly.settings.WeightOnlySettings` (the recipe's flat ``[weight_only]`` table
split by algorithm: RTN, :class:`~onnxq.weightonly.settings.GPTQSettings`,
:class:`~onnxq.weightonly.settings.AWQSettings`). Reads ``ctx.target`` (picks MatMulNBits'
``accuracy_level`` when ``"auto"``); writes ``ctx.doc_strings`` for the rewritten nodes and
``ctx.weight_only_layers`` (per-layer method and error).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxq._memory import release
from onnxq.calibration.runner import choose_providers
from onnxq.errors import PassError
from onnxq.graphs import FreshNames, downstream_tensors
from onnxq.passes.constant_folding import materialize_weight_transposes
from onnxq.pipeline import ConfiguredPass, PassContext, PassResult
from onnxq.progress import progress_bar
from onnxq.recipe import Recipe
from onnxq.target import TargetProfile
from onnxq.weightonly.awq import ScaleSearch, awq_clip_search, awq_scale_search, output_error
from onnxq.weightonly.grid import QuantizedWeight, WeightGrid, rtn
from onnxq.weightonly.gptq import gptq, output_energy, proxy_loss
from onnxq.weightonly.pack import ensure_opset, to_dequantize_matmul, to_matmulnbits
from onnxq.weightonly.segments import SegmentRunner, Wave
from onnxq.weightonly.settings import AWQSettings, GPTQSettings, WeightOnlySettings

from .int8_embeddings import quantize_embedding_tables
from .scale_folding import ScaleEdit, apply_edit, channel_ties, plan_producer, scaled_outputs, value_readers
from .shape_inference import refine_static_dims

__all__ = ["WeightOnlyPass", "quantize_weight_only", "output_projections"]

logger = logging.getLogger(__name__)

AWQ_CLIP_GRID = 20
"""Clip candidates of AWQ's clip search: ``absmax * (1 - i / 20)``, ``i < 10`` (the reference's)."""

AWQ_SEARCH_CLIP_GRID = 10
"""The clip grid used while scoring scale candidates (``i / 10``, ``i < 5``): half the cost of the final
clip search for each of the ``awq_grid`` candidates. On stories260K (mean over four calibration sets)
the chosen scales are as good as with the full grid (KL 0.0753 vs 0.0755), 3 candidates are not (0.0771)."""

ROWS_PER_PRODUCT = 512
"""Rows of one float32 ``X^T X`` product in a layer's statistics (summed in float64 across products).
GPTQ with act-order is sensitive to the rounding of ``H``: stacking 8192 rows per product instead (faster
on stories260K's 64 channels) moved SmolLM2's ``w4-gptq-awq`` from wikitext 32.49 to 32.68. Both are valid
roundings; 512 keeps each float32 accumulation short (and gives back the figures measured before the stacking)."""

AWQ_MODULE_MACS = 1e11
"""Multiply-adds (counted on the module's weight MatMuls) one module-output scale search may spend over all
its candidates: its probe runs on the first calibration samples that fit (at least one). stories260K
uses every sample; SmolLM2-135M about 10 windows of 512 tokens for attention and 3 for the MLP."""


@dataclass
class _Layer:
    """One weight MatMul and what happened to it."""

    node: gs.Node
    grid: WeightGrid
    qw: QuantizedWeight | None = None
    method: str = ""
    error: float | None = None  # relative output error proxy tr(dW^T H dW) / tr(W^T H W), where known
    packed: bool = False
    awq: dict[str, object] | None = None  # AWQ's scale search for this layer's input: ratio, what it scored


def _weight_matmul(node: gs.Node) -> bool:
    if node.op != "MatMul" or len(node.inputs) != 2:
        return False
    x, w = node.inputs
    return (
        isinstance(x, gs.Variable)
        and isinstance(w, gs.Constant)
        and w.values.ndim == 2
        and np.issubdtype(w.values.dtype, np.floating)
        and w.values.size > 0
    )


def output_projections(graph: gs.Graph, targets: list[gs.Node]) -> set[int]:
    """ids of the targets that feed a graph output and have no other target downstream (the lm_head).

    A KV-cache export's k/v projections also reach graph outputs (``present.*``), but later layers
    read them: they are not output projections."""
    target_ids = {id(t) for t in targets}
    outputs = {id(t) for t in graph.outputs}
    found: set[int] = set()
    for t in targets:
        reaches_output = False
        for tensor in downstream_tensors(t.outputs, lambda r: id(r) not in target_ids):
            if any(id(r) in target_ids for r in tensor.outputs):
                break  # another target reads it: not the last projection
            reaches_output |= id(tensor) in outputs
        else:
            if reaches_output:
                found.add(id(t))
    return found


def _accuracy_level(level: int | str, target: TargetProfile) -> int:
    if level != "auto":
        return int(level)
    # int8 activations inside MatMulNBits (accuracy_level 4) use the CPU's integer dot products; GPUs and
    # the generic profile keep fp32 accumulation of the dequantized weights
    return 0 if target.name in ("cuda", "generic") else 4


class WeightOnlyPass(ConfiguredPass[WeightOnlySettings]):
    """Quantize the weights of every MatMul with a constant weight (see the module docstring)."""

    name = "weight_only"
    settings_class = WeightOnlySettings
    reported_counts = ("layers_quantized", "layers_int8", "layers_left_float", "embeddings_quantized", "awq_groups_scaled", "segments_run")  # fmt: skip
    reports_notes = True
    calibrates_on_text_windows = True
    cache_answers_calibration = False

    def needs_calibration(self) -> bool:
        return self.settings.method != "rtn"

    def missing_calibration_message(self, recipe_name: str) -> str:
        return (f"preset/recipe '{recipe_name}' runs {self.settings.method.upper()}, which needs calibration text: "
                "--calib TOKENS.json (token ids) or a text file with --tokenizer, e.g. --calib-size 32 --seq-len 512; "
                "--preset w4-rtn needs none")  # fmt: skip

    def min_opset(self) -> tuple[int, str] | None:
        # blocked int4 DequantizeLinear needs opset 21; MatMulNBits is a contrib op and needs nothing
        return (21 if self.settings.format == "qdq" else 13), "blocked int4 DequantizeLinear needs opset 21"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        materialize_weight_transposes(graph)  # a tied weight's Transpose kept by constant folding
        settings = self.settings
        counts = {"layers_quantized": 0, "layers_int8": 0, "layers_left_float": 0, "embeddings_quantized": 0,
                  "awq_groups_scaled": 0, "awq_groups_unscaled": 0, "segments_run": 0}  # fmt: skip
        notes: list[str] = []
        self._fresh = FreshNames(graph)
        self._awq_unscaled: dict[str, str] = {}  # first MatMul of an AWQ group kept at s = 1 -> why
        self._refined = False  # whether refine_static_dims ran (once, when a fold first needs it)
        layers = self._layers(graph, counts, notes)
        if not layers and settings.embeddings == "float":
            return PassResult(graph, False, counts, notes + ["no MatMul with a constant weight to quantize"])
        if layers:
            self._quantize(graph, layers, ctx, counts)
        self._pack(graph, layers, ctx.target, ctx)
        if settings.format == "qdq" and layers:
            ensure_opset(graph, 21)
        if settings.embeddings == "int8":
            counts["embeddings_quantized"] = self._embeddings(graph, ctx)
        base = settings.grid.weight_grid()
        counts["layers_quantized"] = sum(1 for layer in layers if layer.grid == base)
        counts["layers_int8"] = len(layers) - counts["layers_quantized"]
        summary = self._summary_notes(layers, base, counts)
        notes[:0] = summary[:1]
        notes.extend(summary[1:])
        ctx.weight_only_layers = {
            layer.node.name: {"method": layer.method, "grid": str(layer.grid), "rel_error": layer.error}
            | ({"awq_ratio": layer.awq["ratio"], "awq_scored_on": layer.awq["scored_on"]} if layer.awq else {})
            for layer in layers
        }
        graph.cleanup().toposort()
        return PassResult(graph, True, counts, notes)

    def _layers(self, graph: gs.Graph, counts: dict[str, int], notes: list[str]) -> list[_Layer]:
        """The MatMuls to quantize, each with its grid (the output projection per ``lm_head``); counts and notes
        the ones left float."""
        settings = self.settings
        candidates = [n for n in graph.nodes if _weight_matmul(n)]
        gemms = [n for n in graph.nodes if n.op == "Gemm" and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant)]
        if gemms:
            notes.append(f"{len(gemms)} Gemm nodes left float (weight-only packing covers MatMul)")
        selected = [n for n in candidates if settings.selection.config_for(n.name, n.op) is not None]
        counts["layers_left_float"] = len(candidates) - len(selected)
        heads = output_projections(graph, selected)
        base = settings.grid.weight_grid()
        layers: list[_Layer] = []
        for n in selected:
            if id(n) in heads and settings.lm_head == "float":
                counts["layers_left_float"] += 1
                notes.append(f"output projection '{n.name}' left float (lm_head = \"float\")")
                continue
            grid = settings.grid.weight_grid(8) if id(n) in heads and settings.lm_head == "int8" else base
            layers.append(_Layer(n, grid))
        return layers

    def _quantize(self, graph: gs.Graph, layers: list[_Layer], ctx: PassContext, counts: dict[str, int]) -> None:
        """Quantize ``layers`` with the configured algorithm (RTN at once; GPTQ/AWQ segment by segment)."""
        method = self.settings.method
        if method == "rtn":
            self._rtn(graph, layers, ctx.target, ctx)
            return
        source = getattr(ctx.calibration, "source", None)
        if source is None:
            raise PassError(
                self.name,
                f"{method.upper()} needs calibration text (the inputs of every layer): pass --calib with token "
                "ids (.json) or text and --tokenizer, e.g. 32 windows of 512 tokens; or use --preset w4-rtn",
            )
        device = getattr(getattr(ctx.calibration, "spec", None), "device", "auto")
        runner = SegmentRunner(graph, [layer.node for layer in layers], source, providers=choose_providers(device))
        self._sequential(runner, layers, ctx, counts)
        counts["segments_run"] = runner.segments_run
        del runner

    def _summary_notes(self, layers: list[_Layer], base: WeightGrid, counts: dict[str, int]) -> list[str]:
        """The notes that sum the run up: the first goes before the pass's other notes, the rest after."""
        method = self.settings.method
        fmt = "com.microsoft.MatMulNBits" if self.settings.format == "matmulnbits" else "DequantizeLinear + MatMul (opset 21)"
        notes = [f"{method.upper()} {base} on {counts['layers_quantized']} MatMuls"
                 + (f", {counts['layers_int8']} output projection(s) in int8" if counts["layers_int8"] else "")
                 + f", packed as {fmt}"]  # fmt: skip
        errs = [layer.error for layer in layers if layer.error is not None]
        if errs:
            notes.append(f"{method.upper()}: relative output error per layer median {np.median(errs):.2e}, "
                         f"worst {max(errs):.2e} ({max(layers, key=lambda la: la.error or 0).node.name})")  # fmt: skip
        if counts["awq_groups_unscaled"]:
            unfoldable = [name for name, why in self._awq_unscaled.items() if why == "unfoldable"]
            notes.append(f"AWQ: {counts['awq_groups_scaled']} layer inputs scaled, {counts['awq_groups_unscaled']} kept s = 1 "
                         f"({counts['awq_groups_unscaled'] - len(unfoldable)} because no scale beat s = 1"
                         + (f"; {len(unfoldable)} because nothing before them can absorb 1/s exactly: "
                            f"{', '.join(unfoldable[:4])}{', ...' if len(unfoldable) > 4 else ''}" if unfoldable else "")
                         + "); their weights were still clip-searched")  # fmt: skip
        return notes

    # -- the three methods ------------------------------------------------------------------------------

    def _rtn(self, graph: gs.Graph, layers: list[_Layer], target: TargetProfile, ctx: PassContext) -> None:
        """Round each weight to nearest and pack it at once, so only one float weight is held at a time
        (when the weights are read lazily from external data)."""
        cache: dict[tuple[int, WeightGrid], QuantizedWeight] = {}
        readers: dict[int, int] = {}
        for layer in layers:
            readers[id(layer.node.inputs[1])] = readers.get(id(layer.node.inputs[1]), 0) + 1
        pending = 0  # bytes of float weights let go since the last release()
        with progress_bar(len(layers), "RTN", enabled=ctx.progress, unit="layers") as advance:
            for layer in layers:
                w = layer.node.inputs[1]
                pending += w.values.nbytes
                key = (id(w), layer.grid)
                if key not in cache:
                    qw = rtn(w.values, layer.grid)
                    if readers[id(w)] > 1:  # tied weight: quantize once
                        cache[key] = qw
                else:
                    qw = cache[key]
                layer.qw, layer.method = qw, "rtn"
                self._pack_one(graph, layer, target, ctx)
                if pending >= 256 << 20:  # a collection costs ~0.1 s on a large graph: not after every layer
                    release()
                    pending = 0
                advance(1)

    def _sequential(self, runner: SegmentRunner, layers: list[_Layer], ctx: PassContext, counts: dict[str, int]) -> None:
        algo = self.settings.algorithm
        awq = algo if isinstance(algo, AWQSettings) else algo.awq if isinstance(algo, GPTQSettings) else None
        by_node = {id(layer.node): layer for layer in layers}
        done: dict[int, QuantizedWeight] = {}  # weight constant id -> its quantized form (tied weights)
        label = algo.name.upper()
        with progress_bar(len(layers), label, enabled=ctx.progress, unit="layers") as advance:
            for wave in runner.waves():
                groups: dict[str, list[_Layer]] = {}
                for node in wave.nodes:
                    groups.setdefault(node.inputs[0].name, []).append(by_node[id(node)])
                for x_name, group in groups.items():
                    h, absmean = _statistics(wave, x_name)
                    if awq is not None:
                        h = self._awq_scale(runner, group, h, absmean, awq, counts, by_node)
                    for layer in group:
                        w = layer.node.inputs[1]
                        if id(w) in done:  # a weight shared with an earlier layer: quantized once
                            layer.qw, layer.method = done[id(w)], "shared"
                        elif isinstance(algo, GPTQSettings):
                            res = gptq(w.values, h, layer.grid, damp=algo.damp, act_order=algo.act_order,
                                       mse_range=algo.mse_range, compare_rtn=False)  # fmt: skip
                            layer.qw, layer.method = res.weight, "gptq"
                        else:
                            clip = awq_clip_search(w.values, h, layer.grid, n_grid=AWQ_CLIP_GRID) if awq and awq.clip else None
                            layer.qw, layer.method = rtn(w.values, layer.grid, clip=clip), "awq"
                        deq = layer.qw.dequantize()
                        layer.error = _relative_error(w.values, deq, h)
                        done[id(w)] = layer.qw
                        self._set_weight(layer.node, deq)
                        del deq
                        advance(1)

    def _awq_scale(self, runner: SegmentRunner, group: list[_Layer], h: np.ndarray, absmean: np.ndarray,
                   awq: AWQSettings, counts: dict[str, int], by_node: dict[int, _Layer]) -> np.ndarray:  # fmt: skip
        """Search AWQ's scale for the layers reading one activation, fold it, and return the scaled input's H.

        A group whose input cannot absorb ``1/s`` is not searched. Channels that must share a scale for
        the fold to stay exact (:func:`~onnxq.passes.scale_folding.channel_ties`: o_proj's inputs from query heads
        reading one KV head of a grouped-query attention, whose ``1/s`` goes into that head's V columns)
        get one scale, from their mean ``|x|``. When the group opens a module
        (:meth:`SegmentRunner.module_outputs`), candidates are scored on the module's output (the
        paper's loss; ``awq_loss = "module"``), run on the stored activations by a probe; otherwise on the
        linears' own output.
        For method ``awq`` with clipping, each candidate is scored with its clips applied."""
        x = group[0].node.inputs[0]
        nodes = [layer.node for layer in group]
        ties = self._fold_ties(runner, group, x)
        if ties is None:
            logger.debug("AWQ %s (%s): 1/s cannot be folded into its producer; not searched", x.name, nodes[0].name)
            self._awq_unscaled[nodes[0].name] = "unfoldable"
            counts["awq_groups_unscaled"] += 1
            return h
        tied = None if len(np.unique(ties)) == ties.size else ties
        constants = list({id(n.inputs[1]): n.inputs[1] for n in nodes}.values())  # a weight read twice counts once
        ws = [c.values for c in constants]
        score, scored_on = None, "linear output"
        module = runner.module_outputs(nodes) if awq.loss == "module" else None
        if module is not None:
            runs = 1 + awq.grid + (awq.grid + 1 if awq.duo else 0)  # the reference, the candidates
            probe = runner.probe(nodes, module, max_macs=AWQ_MODULE_MACS / runs)
            score = output_error(probe.run, ws)
            scored_on = f"output of {', '.join(t.name for t in module)} on {probe.samples} samples"
        clip = awq.clip  # off under GPTQ (see AWQSettings)

        def search(duo: bool) -> ScaleSearch:
            return awq_scale_search(ws, h, absmean, group[0].grid, n_grid=awq.grid, duo=duo, clip=clip,
                                    clip_grid=AWQ_SEARCH_CLIP_GRID, score=score, ties=tied)  # fmt: skip

        result = search(False)
        if awq.duo:
            duo = search(True)
            result = duo if duo.loss < result.loss else result
        s = np.asarray(result.scales, np.float32)
        edits = None if np.all(s == 1.0) else self._fold_plan(runner, group, x, s)
        for layer in group:
            layer.awq = {"ratio": result.ratio if edits else 0.0, "scored_on": "linear" if score is None else "module"}
        if edits is None:
            logger.debug("AWQ %s (%s): ratio %g (%s): not scaled", x.name, nodes[0].name, result.ratio, scored_on)
            self._awq_unscaled[nodes[0].name] = "s = 1 best"
            counts["awq_groups_unscaled"] += 1
            return h
        logger.debug("AWQ %s (%s): ratio %g, loss %.4g -> %.4g (%s%s)", x.name, nodes[0].name, result.ratio, result.rtn_loss,
                     result.loss, scored_on, f"; {len(np.unique(ties))} tied scales" if tied is not None else "")  # fmt: skip
        for e in edits:
            self._apply_edit(e, by_node)
        scaled: set[int] = set()
        for layer in group:
            w = layer.node.inputs[1]
            if id(w) not in scaled:
                self._set_weight(layer.node, (w.values * s[:, None]).astype(w.values.dtype), group=group)
                scaled.add(id(layer.node.inputs[1]))
        runner.scale_stored(x.name, 1.0 / s)
        counts["awq_groups_scaled"] += 1
        inv = (1.0 / s).astype(np.float64)
        return h * inv[:, None] * inv[None, :]

    def _fold_ties(self, runner: SegmentRunner, group: list[_Layer], x: gs.Tensor) -> np.ndarray | None:
        """A label per channel of ``x`` (channels with one label must share their scale, see
        :func:`~onnxq.passes.scale_folding.channel_ties`), or None when ``1/s`` cannot be folded into what
        produces ``x`` (see :meth:`_fold_plan`)."""
        if not isinstance(x, gs.Variable):
            return None
        ties = channel_ties(x)
        if ties is None and not self._refined:
            # the fold may pass reshapes whose sizes ONNX inference left symbolic (a grouped-query attention's
            # KV-head repeat); ORT's symbolic inference (a few seconds on a whole graph) is run once, when needed
            self._refined = True
            logger.debug("AWQ: %d tensor shapes made static by symbolic shape inference", refine_static_dims(runner.graph))
            ties = channel_ties(x)
        if ties is None or self._fold_plan(runner, group, x, np.ones(ties.shape, np.float32)) is None:
            return None
        return ties

    def _fold_plan(self, runner: SegmentRunner, group: list[_Layer], x: gs.Tensor, s: np.ndarray) -> list[ScaleEdit] | None:
        """Edits that divide ``x`` by ``s`` exactly, or None when that is impossible or would also change
        another activation the runner holds (the fold must change nothing but ``x``)."""
        readers = value_readers(x)
        members = {id(layer.node) for layer in group}
        if not isinstance(x, gs.Variable) or any(id(r) not in members for r in readers) or x.shape is None:
            return None
        rank = len(x.shape)
        f = (1.0 / s).astype(np.float32).reshape((1,) * (rank - 1) + (-1,))
        edits = plan_producer(x, f)
        if edits is None:
            return None
        # every edited node must be upstream of the cut, and nothing downstream of it may be held by the runner
        touched = _downstream([e.node for e in edits], stop=runner.index, cut=runner.cut)
        held = {name for name in runner.store if name != x.name}
        if touched & held:
            return None
        return edits

    def _apply_edit(self, e: ScaleEdit, by_node: dict[int, _Layer]) -> None:
        layer = by_node.get(id(e.node))
        if layer is not None and layer.qw is not None and e.index == 1 and not e.divide:
            # the previous projection is already quantized: scaling its output columns is exact on the grid
            layer.qw.scale_columns(np.asarray(e.factor).reshape(-1))
            self._set_weight(e.node, layer.qw.dequantize())
            return
        apply_edit(e, self._fresh, "_awq")

    def _set_weight(self, node: gs.Node, values: np.ndarray, group: list[_Layer] | None = None) -> None:
        """Give ``node`` weight ``values`` (in place when no other node reads the constant)."""
        w = node.inputs[1]
        readers = list(w.outputs)
        allowed = {id(node)} | ({id(layer.node) for layer in group} if group else set())
        if all(id(r) in allowed for r in readers):
            w.values = np.asarray(values, dtype=w.values.dtype)
        else:
            node.inputs[1] = gs.Constant(self._fresh(f"{w.name}_quantized"), np.asarray(values, dtype=w.values.dtype))

    # -- packing ------------------------------------------------------------------------------------------

    def _pack(self, graph: gs.Graph, layers: list[_Layer], target: TargetProfile, ctx: PassContext) -> None:
        for layer in layers:
            if layer.qw is not None and not layer.packed:
                self._pack_one(graph, layer, target, ctx)

    def _pack_one(self, graph: gs.Graph, layer: _Layer, target: TargetProfile, ctx: PassContext) -> None:
        """Rewrite one quantized MatMul into the recipe's format and let go of its float weight."""
        assert layer.qw is not None
        docs = ctx.doc_strings
        doc = f"onnxq: {layer.method.upper()} weight-only {layer.grid}"
        if layer.error is not None:
            doc += f"; relative output error on calibration data {layer.error:.2e}"
        node = layer.node
        if self.settings.format == "matmulnbits":
            level = _accuracy_level(self.settings.accuracy_level, target)
            new = [to_matmulnbits(graph, node, layer.qw, accuracy_level=level, names=self._fresh)]
            node.inputs.clear()  # the MatMul left the graph: its float weight can be freed now (unless shared)
            node.outputs.clear()
        else:
            ensure_opset(graph, 21)
            new = to_dequantize_matmul(graph, node, layer.qw, names=self._fresh)
        for n in new:
            n.doc_string = doc
            docs[n.name] = doc
        layer.packed = True
        layer.qw = None  # the packed initializers hold the codes now

    def _embeddings(self, graph: gs.Graph, ctx: PassContext) -> int:
        """Store constant Gather tables (token embeddings) as int8 rows with one scale each."""
        exclude = self.settings.selection.exclude
        return quantize_embedding_tables(graph, self._fresh, ctx.doc_strings, lambda node: exclude.excludes(node.name, node.op))


def _statistics(wave: Wave, name: str, rows_per_product: int = ROWS_PER_PRODUCT) -> tuple[np.ndarray, np.ndarray]:
    """``H = X^T X`` (float64) and mean |x| per channel of the wave's activation ``name``.

    Each float32 ``X^T X`` product covers at most ``rows_per_product`` rows (short samples are stacked up
    to it, a longer one is one product); the products are summed in float64."""
    k: int | None = None
    h: np.ndarray | None = None
    total: np.ndarray | None = None
    rows = 0
    pending: list[np.ndarray] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal h, total, pending_rows
        xf = pending[0] if len(pending) == 1 else np.concatenate(pending)
        if not np.isfinite(xf).all():
            raise PassError("weight_only", f"activation '{name}' holds NaN/Inf on a calibration sample; GPTQ/AWQ need finite inputs")
        g = (xf.T @ xf).astype(np.float64)
        a = np.abs(xf).sum(axis=0, dtype=np.float64)
        h = g if h is None else h + g
        total = a if total is None else total + a
        pending.clear()
        pending_rows = 0

    for x in wave.rows(name):
        xf = np.asarray(x, np.float32)
        k = xf.shape[1]
        if pending and pending_rows + xf.shape[0] > rows_per_product:
            flush()
        pending.append(xf)
        pending_rows += xf.shape[0]
        rows += xf.shape[0]
    if pending:
        flush()
    assert h is not None and total is not None and k is not None
    return h, total / max(rows, 1)


def _relative_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """``tr(dW^T H dW) / tr(W^T H W)``: the layer's squared output error relative to its output energy."""
    den = output_energy(w, h)
    return proxy_loss(w, wq, h) / den if den > 0 else 0.0


def _downstream(nodes: list[gs.Node], *, stop: dict[int, int], cut: int) -> set[str]:
    """Names of the tensors computed (before ``cut``) from the outputs of ``nodes``."""

    def follow(r: gs.Node) -> bool:  # Shape/Size read only the shape, which scaling keeps
        return r.op not in ("Shape", "Size") and stop.get(id(r), cut) < cut

    return {t.name for t in downstream_tensors([t for n in nodes for t in scaled_outputs(n)], follow)}


def quantize_weight_only(graph: gs.Graph, ctx: PassContext, recipe: Recipe | None = None) -> gs.Graph:
    """Convenience function: run :class:`WeightOnlyPass` configured from ``recipe`` (default: the ``w4-rtn``
    preset) on ``graph``."""
    from onnxq.presets import preset

    return WeightOnlyPass.from_recipe(recipe or preset("w4-rtn"))(graph, ctx).graph
