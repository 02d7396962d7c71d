"""The library entry point behind ``onnxq quantize``: load, run the recipe's passes, verify, save.

Files are touched only at the two ends (:mod:`onnxq.model`). Every failure before the final atomic
save leaves no output file; the input is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import onnx

from onnxq import __version__
from onnxq.calibration.cache import CachedCalibration, save_cache
from onnxq.calibration.runner import CalibrationSession
from onnxq.calibration.sources import IMAGE_SUFFIXES, CalibrationSource, open_source
from onnxq.destinations import Dest, Read, check_destinations
from onnxq.errors import OnnxqError
from onnxq.model import (
    default_opset,
    densify_sparse_initializers,
    load_model,
    model_hash,
    model_template,
    save_model,
    strip_initializer_inputs,
    to_graph,
    to_model,
    upgrade_opset,
)
from onnxq.passes import build_passes
from onnxq.pipeline import Pass, PassContext, Pipeline
from onnxq.mixed_precision import AccuracyBudget, EvalSet, search_mixed_precision
from onnxq.recipe import Override, Recipe, recipe_to_dict, unmatched_selectors
from onnxq.quantize_report import compare_into_report, record_sizes_and_report
from onnxq.report import Report, peak_rss_mb
from onnxq.scheme import QuantDtype
from onnxq.target import TargetProfile, resolve_target
from onnxq.model_folders import copy_companions, made_folder, resolve_folders
from onnxq.model_checks import ModelCheckError, check_operators, check_runnable, validate

__all__ = ["CalibrationOptions", "QuantizeResult", "quantize_model", "quantize_file"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationOptions:
    """Where calibration samples come from (``--calib`` and its companions)."""

    source: str | None = None
    preprocess: str | None = None
    resize: int | None = None
    crop: int | None = None
    tokenizer: str | None = None
    max_length: int | None = None
    seq_len: int | None = None
    seed: int = 0
    size: int | None = None  # the sample count asked for (--calib-size): a warning when the source holds fewer


@dataclass
class QuantizeResult:
    """What a quantize run produced."""

    model: onnx.ModelProto
    report: Report
    files: list[Path] = field(default_factory=list)
    calibration: Any = None  # the CalibrationSession (or cache) that answered the range questions
    recipe: Recipe | None = None  # the recipe as applied (with the mixed-precision overrides, if any)


def _required_opset(recipe: Recipe, passes: list[Pass]) -> tuple[int, str]:
    """The opset the run needs and why: what the passes declare (:meth:`Pass.min_opset`), else what the
    recipe's quantization dtypes need (per-channel QDQ: 13; int4/int16: 21)."""
    declared = [need for need in (p.min_opset() for p in passes) if need is not None]
    if declared:
        return max(declared, key=lambda need: need[0])
    dtypes = {QuantDtype(recipe.activations.dtype), QuantDtype(recipe.weights.dtype)}
    for o in recipe.overrides:
        for spec in (o.activations, o.weights):
            if "dtype" in spec:
                dtypes.add(QuantDtype(spec["dtype"]))
    return max([13] + [d.min_opset for d in dtypes]), "per-channel QDQ needs opset 13+, int4/int16 QDQ opset 21"


def quantize_model(
    model: onnx.ModelProto | str | os.PathLike,
    recipe: Recipe,
    *,
    calibration: CalibrationOptions | None = None,
    source: CalibrationSource | None = None,
    progress: bool = False,
    checked: bool = False,
    report: Report | None = None,
    calibration_session: Any = None,
    on_stage: Callable[[str], None] | None = None,
    copy_input: bool = True,
    budget: AccuracyBudget | None = None,
    evaluation: CalibrationOptions | None = None,
    eval_size: int = 128,
) -> QuantizeResult:
    """Quantize an in-memory model with ``recipe`` and return the new model and its report.

    Args:
        model: the float model (float32 or float16); not modified. Or its path: it is then loaded here and
            its protobuf released as soon as the graph holds the weights (the lowest peak memory).
        recipe: what to do (a preset or a loaded recipe file).
        calibration: where calibration samples come from (ignored when ``source`` is given).
        source: an already-open calibration source.
        progress: show progress bars.
        checked: validate the graph (onnx.checker + ORT load) after every pass.
        report: a report to add to (a new one when None).
        calibration_session: answers range questions instead of running calibration (a cache).
        on_stage: called with the name of each pass as it starts (batch workers report it).
        copy_input: work on a copy of ``model`` (False: ``model`` is consumed; its initializers are dropped).
        budget: an accuracy target: layers fall back to int16 activations or float until it holds
            (:mod:`onnxq.mixed_precision`).
        evaluation: the samples the budget is measured on (default: the calibration source), at most
            ``eval_size`` of them.
    """
    report = report or Report()
    t_start = time.perf_counter()
    float_ref: onnx.ModelProto | None = None
    if budget is not None:  # the float model's outputs are the reference the budget is measured against
        float_ref = load_model(Path(model)) if isinstance(model, (str, os.PathLike)) else model
    work, base_dir, copy_input = _working_copy(model, copy_input)
    passes = build_passes(recipe)
    work = _normalise_model(work, _required_opset(recipe, passes), report)
    target = _resolve_target(recipe, report)
    calib_session = _calibration_session(recipe, report, work, calibration, source, calibration_session, progress)

    ctx = PassContext(report=report, calibration=calib_session, checked=checked, progress=progress, target=target)
    applied = recipe  # the recipe as applied: the mixed-precision search adds its per-node overrides
    hook = (lambda p: on_stage(p.name)) if on_stage is not None else None
    graph_in = to_graph(work, base_dir=base_dir)
    # the graph now holds its own copy of every weight: keep only the model-level fields of the protobuf
    # (the template to_model restores) and drop the rest, so that a 2.5 GB model is not held twice for the
    # whole run (protobuf's arena frees its memory only with the whole message, not initializer by initializer)
    ops = {n.op_type for n in work.graph.node}
    for warning in unmatched_selectors(recipe, ((n.name, n.op_type) for n in work.graph.node)):
        report.note(warning)
    doubles = [t.name for t in [*work.graph.input, *work.graph.output] if t.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE]
    template = model_template(work)
    if copy_input:
        del work
    else:
        del work.graph.initializer[:]
        del model, work  # the caller handed the model over (a path, or quantize_file's copy_input=False)
    if budget is None:
        graph = Pipeline(passes, checked=checked).run(graph_in, ctx, on_pass=hook)
    else:
        assert float_ref is not None
        eval_source = _evaluation_source(float_ref, evaluation, calibration, eval_size)
        graph, applied = _run_with_budget(graph_in, recipe, passes, ctx, budget, float_ref, eval_source, template, hook)
    del graph_in
    _note_nothing_quantized(report, ops, doubles)
    _note_transformer_hint(report, recipe, ops)
    out = to_model(graph, template=template)
    _annotate(out, ctx.doc_strings, applied)
    if isinstance(calib_session, CalibrationSession):
        _record_calibration(report, calib_session, calibration)
    report.info["seconds"] = round(time.perf_counter() - t_start, 2)
    report.info["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return QuantizeResult(out, report, calibration=calib_session, recipe=applied)


def _working_copy(
    model: onnx.ModelProto | str | os.PathLike, copy_input: bool
) -> tuple[onnx.ModelProto, Path | None, bool]:
    """The model protobuf :func:`quantize_model` works on, the folder its external data lives in, and
    whether that protobuf is a copy (True) or handed over and free to consume (False).

    A path is loaded here without its external data (weights stay in their file until a pass reads them,
    see :class:`onnxq.model.ExternalValues`); an in-memory model is checked here, since
    :func:`onnxq.model.load_model`'s checks did not run: what cannot run is refused now, not after
    calibration.
    """
    if isinstance(model, (str, os.PathLike)):
        return load_model(Path(model), load_external_data=False), Path(os.path.abspath(model)).parent, False
    if copy_input:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    else:
        work = model  # the caller hands the model over (quantize_file): no second copy of the weights
    check_operators(work, "the model")
    check_runnable(work, "the model")
    return work, None, copy_input


def _normalise_model(work: onnx.ModelProto, opset: tuple[int, str], report: Report) -> onnx.ModelProto:
    """Dense initializers, no initializers listed as graph inputs, and the opset the run needs (``opset``: the
    version and why, :func:`_required_opset`); each change is a report note."""
    if densify_sparse_initializers(work):
        report.note("sparse initializers were made dense (onnxq quantizes dense weights)")
    stripped = strip_initializer_inputs(work)
    if stripped:
        report.note(f"{stripped} initializers were also listed as graph inputs (IR < 4); treated as constants")
    before = default_opset(work)
    version, why = opset
    work = upgrade_opset(work, version)
    if default_opset(work) != before:
        report.note(f"opset upgraded from {before} to {default_opset(work)} ({why})")
    return work


def _resolve_target(recipe: Recipe, report: Report) -> TargetProfile:
    """The recipe's target profile (``auto``: this CPU's), recorded in the report with the reason."""
    target, why = resolve_target(recipe.target)
    report.info["target"] = {"profile": target.name, "reason": why, "description": target.description}
    report.note(f"target profile {target.name}: {why}; {target.description}")
    return target


def _calibration_session(
    recipe: Recipe,
    report: Report,
    work: onnx.ModelProto,
    calibration: CalibrationOptions | None,
    source: CalibrationSource | None,
    given: Any,
    progress: bool,
) -> Any:
    """What answers the passes' range questions: the ``given`` session (a cache), else a new
    :class:`CalibrationSession` over ``source`` or the source ``calibration`` names, else None (a recipe
    that needs no calibration, or no data given: the passes that need it say so)."""
    if given is not None:
        report.info["calibration"] = {"source": getattr(given, "source_description", "given session"),
                                      "method": recipe.calibration.method,
                                      "samples_seen": getattr(given, "samples_seen", None),
                                      "provider": getattr(given, "provider_used", None),
                                      "seconds": 0.0}  # fmt: skip
        return given
    if not recipe.needs_calibration():
        return None
    if source is None and calibration is not None and calibration.source is not None:
        source = open_source(
            calibration.source,
            work,
            preprocess=calibration.preprocess,
            resize=calibration.resize,
            crop=calibration.crop,
            tokenizer=calibration.tokenizer,
            max_length=calibration.max_length,
            seq_len=calibration.seq_len,
            limit=recipe.calibration.samples,
            seed=calibration.seed,
        )
    if source is None:
        return None
    session = CalibrationSession(source, recipe.calibration, progress=progress)
    report.info["calibration"] = {"source": source.describe(), "samples": len(source),
                                  "method": recipe.calibration.method}  # fmt: skip
    return session


def _evaluation_source(
    float_ref: onnx.ModelProto,
    evaluation: CalibrationOptions | None,
    calibration: CalibrationOptions | None,
    eval_size: int,
) -> CalibrationSource:
    """The samples an accuracy budget is measured on: ``evaluation``'s, else the calibration source's."""
    opts = evaluation if evaluation is not None and evaluation.source else calibration
    if opts is None or not opts.source:
        raise OnnxqError("--accuracy-budget needs evaluation samples: --calib (or --eval) SOURCE")
    return open_source(opts.source, float_ref, preprocess=opts.preprocess, resize=opts.resize, crop=opts.crop,
                       tokenizer=opts.tokenizer, max_length=opts.max_length, seq_len=opts.seq_len,
                       limit=eval_size, seed=opts.seed)  # fmt: skip


def _note_nothing_quantized(report: Report, ops: set[str], doubles: list[str]) -> None:
    """When the static pass quantized no node, a note that says why (already quantized, float64, no op)."""
    qsteps = [st for st in report.steps if st.name == "insert_qdq"]
    if not qsteps or qsteps[-1].counts.get("nodes_quantized", 0) != 0:
        return
    already = sorted(op for op in ops if op.startswith("QLinear") or op in
                     ("QuantizeLinear", "MatMulInteger", "ConvInteger", "MatMulNBits"))  # fmt: skip
    why = f"the model is already quantized ({', '.join(already)})" if already else "no op the recipe quantizes was found"
    if doubles and not already:
        why = (f"the model computes in float64 ({doubles[0]!r} is float64), which QuantizeLinear cannot take; "
               "convert the model to float32 first")
    report.note(f"nothing was quantized: {why}")


def _note_transformer_hint(report: Report, recipe: Recipe, ops: set[str]) -> None:
    """Suggest w8a8-smoothquant when plain w8a8 percentile ranges meet a model that looks like a transformer."""
    if (recipe.runs("insert_qdq") and not recipe.runs("smoothquant") and recipe.calibration.method == "mse-percentile"
            and ops & ({"LayerNormalization", "SimplifiedLayerNormalization"} | ({"Softmax"} if "MatMul" in ops else set()))):  # fmt: skip
        report.note("this looks like a transformer: the w8a8 percentile ranges clip the rare large activations it "
                    "relies on; --preset w8a8-smoothquant (SmoothQuant + MSE ranges) is usually far more accurate "
                    "(MiniLM embedding cosine to fp32 0.86 -> 0.994)")  # fmt: skip


def _record_calibration(report: Report, session: CalibrationSession, options: CalibrationOptions | None) -> None:
    """Add what the calibration run did (provider, time, samples, data issues, warnings) to the report."""
    report.info["calibration"].update(
        {"provider": session.provider_used, "seconds": round(session.seconds, 2),
         "samples_seen": session.samples_seen, "data": session.data_issues(),
         "warnings": _calibration_warnings(session, options)}  # fmt: skip
    )


def _calibration_warnings(session: CalibrationSession, options: CalibrationOptions | None) -> list[str]:
    """What the summary warns about the calibration: bad samples and tensors (:meth:`CalibrationSession.warnings`)
    and a sample count asked for (``options.size``, ``--calib-size``) that the source cannot give (a
    recipe's default count over a small set is not worth a line; --calib-size 1000000 over 4 samples is)."""
    lines = session.warnings()
    have = len(session.source)
    if options is not None and options.size and options.size > have:
        lines.insert(0, f"--calib-size asked for {options.size} calibration samples but the source holds only {have}")
    return lines


def _run_with_budget(graph_in: Any, recipe: Recipe, passes: list[Pass], ctx: PassContext, budget: AccuracyBudget,
                     float_ref: onnx.ModelProto, eval_source: CalibrationSource, template: Any,
                     hook: Any) -> tuple[Any, Recipe]:  # fmt: skip
    """The pipeline with a mixed-precision search between preprocessing and quantization; returns the graph
    and the recipe as applied (with the search's per-node overrides).

    The passes before the quantizing one (``insert_qdq`` or ``dynamic``) run once; the quantizing pass and
    those after it run once per candidate on a copy of the preprocessed graph, built from ``recipe`` with
    per-node overrides.
    """
    names = [p.name for p in passes]
    cut = next((i for i, n in enumerate(names) if n in ("insert_qdq", "dynamic")), None)
    if cut is None:
        raise OnnxqError(f"--accuracy-budget applies to int8 recipes (w8a8, w8a8-smoothquant, int8-dynamic, ...); "
                         f"recipe '{recipe.name}' runs {', '.join(names)}")  # fmt: skip
    pre = Pipeline(passes[:cut], checked=ctx.checked).run(graph_in, ctx, on_pass=hook)
    pre_model = to_model(pre, template=template)
    del pre
    levels = ("int16", "float") if names[cut] == "insert_qdq" else ("float",)
    upgraded: dict[int, onnx.ModelProto] = {}
    memo: dict[Any, Any] = {}
    found: list[tuple[str, str]] = []

    def base_for(cfg: dict[str, str]) -> onnx.ModelProto:
        if "int16" not in cfg.values():
            return pre_model
        if 21 not in upgraded:  # int16 QuantizeLinear needs opset 21
            upgraded[21] = upgrade_opset(pre_model, 21) if default_opset(pre_model) < 21 else pre_model
        return upgraded[21]

    def build(cfg: dict[str, str]) -> onnx.ModelProto:
        sub = PassContext(report=Report(), calibration=ctx.calibration, progress=False, target=ctx.target,
                          weight_qparams_memo=memo)  # fmt: skip
        g = Pipeline(build_passes(with_levels(recipe, cfg))[cut:], release_memory=False).run(to_graph(base_for(cfg)), sub)
        if not cfg and not found:
            found.extend(sub.quantized_nodes)
        return to_model(g, template=template)

    status = _Status(ctx.progress)
    try:
        evalset = EvalSet(float_ref, eval_source)
        build({})
        result = search_mixed_precision(build, evalset, budget, list(found), levels=levels, progress=status.update)
    finally:
        status.stop()
    ctx.report.info["mixed_precision"] = result.to_dict()
    ctx.report.info["evaluation"] = {"source": eval_source.describe(), "samples": evalset.samples}
    n16 = sum(v == "int16" for v in result.levels.values())
    nfl = len(result.levels) - n16
    ctx.report.note(f"accuracy budget {result.target}: int8 {result.baseline} -> {result.final} "
                    f"({'met' if result.met else 'NOT met'}) with {n16} layer(s) at int16 activations and {nfl} in float, "
                    f"of {len(found)}; {result.forward_passes} forward passes, {result.builds} builds, {result.seconds} s")  # fmt: skip
    applied = with_levels(recipe, result.levels)
    graph = Pipeline(build_passes(applied)[cut:], checked=ctx.checked).run(to_graph(base_for(result.levels)), ctx, on_pass=hook)
    return graph, applied


class _Status:
    """One status line on stderr while the search runs (nothing when progress is off)."""

    def __init__(self, enabled: bool) -> None:
        self._s = None
        if enabled:
            from rich.console import Console

            self._s = Console(stderr=True).status("mixed precision: measuring the int8 model")
            self._s.start()

    def update(self, text: str) -> None:
        if self._s is not None:
            self._s.update(f"mixed precision: {text}")

    def stop(self) -> None:
        if self._s is not None:
            self._s.stop()


def with_levels(recipe: Recipe, levels: dict[str, str]) -> Recipe:
    """``recipe`` with one override per node: ``float`` leaves it unquantized, ``int16`` widens its inputs
    to 16 bits (and its weights to the full int8 range)."""
    # an int16 layer runs as DequantizeLinear + float op (no int16 integer kernels), so its weights can use the
    # full int8 range even where the target's u8s8 kernels need 7-bit weights
    extra = tuple(Override(name=n, skip=True) if lv == "float"
                  else Override(name=n, activations={"dtype": "int16"}, weights={"reduce_range": False})
                  for n, lv in sorted(levels.items()))  # fmt: skip
    return recipe.with_(overrides=recipe.overrides + extra) if extra else recipe


def _annotate(model: onnx.ModelProto, docs: dict[str, str], recipe: Recipe) -> None:
    """Doc strings on inserted nodes and the recipe + onnxq version in metadata_props (for Netron)."""
    for node in model.graph.node:
        if node.name in docs:
            node.doc_string = docs[node.name]
    if model.producer_name and model.producer_name != "onnxq":
        model.metadata_props.add(key="onnxq.source_producer", value=f"{model.producer_name} {model.producer_version}".strip())
    model.producer_name, model.producer_version = "onnxq", __version__
    meta = {p.key: p.value for p in model.metadata_props}
    meta["onnxq.version"] = __version__
    meta["onnxq.recipe"] = json.dumps(recipe_to_dict(recipe), sort_keys=True)
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)


def verify_loads(model: onnx.ModelProto, *, ort_load: bool = True) -> None:
    """The final check before saving: onnx.checker, with ONNX Runtime's schemas for the ops only it knows, and
    (unless ``ort_load`` is False) an ORT CPU load (see :func:`onnxq.model_checks.validate`)."""
    try:
        validate(model, ort_load=ort_load, optimization="basic")
    except ModelCheckError as exc:
        raise OnnxqError(f"the quantized model does not load ({exc}); nothing was written. Please report this.") from None


def quantize_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    recipe: Recipe,
    *,
    calibration: CalibrationOptions | None = None,
    progress: bool = False,
    checked: bool = False,
    report_dir: str | os.PathLike | None = None,
    calib_cache: str | os.PathLike | None = None,
    on_stage: Callable[[str], None] | None = None,
    metadata: dict[str, str] | None = None,
    budget: AccuracyBudget | None = None,
    evaluation: CalibrationOptions | None = None,
    eval_size: int = 128,
    compare_samples: int = 32,
    reads: Iterable[Read] = (),
) -> QuantizeResult:
    """Quantize the model file ``input_path`` into ``output_path`` (written atomically, input untouched).

    ``calib_cache``: a file written by :func:`calibrate_file` for this model and these calibration
    settings; its ranges are used instead of running calibration. ``metadata``: extra
    ``metadata_props`` entries for the output (batch runs record their fingerprint there).
    ``budget``/``evaluation``/``eval_size``: see :func:`quantize_model`.

    With ``report_dir``, the result is also compared with the float model on ``compare_samples`` samples
    of the evaluation (else calibration) source: per-tensor SQNR goes into the report and into the doc
    string of each tensor's QuantizeLinear/DequantizeLinear, and ``report.html`` is written beside
    ``report.json``.

    ``input_path`` may be a model folder (:mod:`onnxq.model_folders`): its decoder is quantized into the new
    folder ``output_path`` under the same name, its other files copied beside it; a failed run removes the folder.

    Before any work, every destination is checked (:func:`onnxq.destinations.check_destinations`): the output,
    its ``.data`` sibling and the report files must be regular files or absent, in writable folders, and none of
    the files this run reads (model, external data, calibration and evaluation sources, tokenizer, cache, ``reads``).
    """
    folder = Path(input_path)
    src, dst, from_folder = resolve_folders(folder, Path(output_path))  # a model folder: its decoder, into a folder
    if from_folder:
        output_path = dst  # else as given: the destination checks name the path as the user wrote it
    with made_folder(dst.parent if from_folder else None):  # removed again if the run fails
        report = Report()
        if on_stage:
            on_stage("loading")
        files = _model_files(src)  # validates the file and its external data before any work
        in_bytes = sum(f.stat().st_size for f in files)
        check_destinations(output_destinations(output_path, report_dir),
                           [*_reads(files, calibration, evaluation, calib_cache), *reads])  # fmt: skip
        sha = model_hash(src)
        report.info.update({"input": str(src), "output": str(dst), "input_sha256": sha,
                            "onnxq_version": __version__, "recipe": recipe.name})  # fmt: skip
        session = CachedCalibration(calib_cache, model_sha256=sha, spec=recipe.calibration) if calib_cache else None
        # quantize_model loads the file itself, so no frame here keeps the (large) protobuf alive during the passes
        result = quantize_model(src, recipe, calibration=calibration, progress=progress, checked=checked, report=report,
                                calibration_session=session, on_stage=on_stage, budget=budget, evaluation=evaluation,
                                eval_size=eval_size)  # fmt: skip
        result.model.metadata_props.add(key="onnxq.input_sha256", value=report.info["input_sha256"])
        for key, value in (metadata or {}).items():
            result.model.metadata_props.add(key=key, value=value)
        if on_stage:
            on_stage("verifying")
        bf16 = _verify(result, recipe, report)
        comparison = None
        opts = evaluation if evaluation is not None and evaluation.source else calibration
        if report_dir is not None and opts is not None and opts.source and not bf16 and in_bytes < 1_500_000_000:
            if on_stage:
                on_stage("comparing")
            comparison = compare_into_report(src, result, opts, compare_samples, progress, report, recipe)
        elif report_dir is not None:
            report.note("no accuracy comparison in the report: it needs --calib or --eval samples (and a model under 1.5 GB)")
        if on_stage:
            on_stage("saving")
        result.files = save_model(result.model, dst, input_path=src)
        if from_folder:  # the tokenizer and config files beside the quantized model
            copied = copy_companions(folder, dst.parent, files)
            result.files = [*result.files, *copied]
            report.info["copied"] = [p.name for p in copied]
    record_sizes_and_report(result, report, in_bytes, comparison, report_dir)
    return result


def _verify(result: QuantizeResult, recipe: Recipe, report: Report) -> bool:
    """Check that the output loads (onnx.checker, and ONNX Runtime unless it is bfloat16); record the full
    recipe. Returns True for a bfloat16 output (which ORT's CPU provider cannot run)."""
    bf16 = not all(p.runs_on_ort_cpu() for p in build_passes(recipe))
    if bf16:
        report.note("bfloat16 output: ONNX Runtime's CPU provider has no bfloat16 kernels for most ops, so the "
                    "model was checked with onnx.checker only; run it on a bfloat16-capable provider (CUDA)")  # fmt: skip
    verify_loads(result.model, ort_load=not bf16)
    report.info["recipe_full"] = recipe_to_dict(result.recipe or recipe)
    return bf16


def calibrate_file(
    input_path: str | os.PathLike,
    cache_path: str | os.PathLike,
    recipe: Recipe,
    *,
    calibration: CalibrationOptions,
    progress: bool = False,
    reads: Iterable[Read] = (),
) -> dict[str, Any]:
    """Calibrate ``input_path`` for ``recipe`` and save the ranges to ``cache_path`` (no model written).

    The cache holds exactly the tensors the recipe's quantization asks for, so a later
    ``quantize_file(..., calib_cache=cache_path)`` with the same recipe needs no calibration run.
    ``cache_path`` is checked before calibrating, as :func:`quantize_file` checks its destinations.
    """
    src = Path(input_path)
    files = _model_files(src)
    check_destinations([Dest(cache_path, "statistics file (-o)", example="stats.json")],
                       [*_reads(files, calibration, None, None), *reads])  # fmt: skip
    sha = model_hash(src)
    result = quantize_model(src, recipe, calibration=calibration, progress=progress)
    info = result.report.info.get("calibration")
    if not info:
        raise OnnxqError(f"recipe '{recipe.name}' needs no calibration, so there is nothing to save")
    ranges = result.calibration.computed if isinstance(result.calibration, CalibrationSession) else {}
    save_cache(cache_path, model_sha256=sha, spec=recipe.calibration, ranges=ranges, source=info["source"],
               provider=info.get("provider"), samples=int(info.get("samples_seen", 0)))  # fmt: skip
    return {"cache": str(cache_path), "tensors": len(ranges), **info}


def output_destinations(output_path: str | os.PathLike, report_dir: str | os.PathLike | None) -> list[Dest]:
    """What :func:`quantize_file` may write: the model, its ``.data`` sibling, and the report folder and files."""
    dests = [Dest(output_path, "output (-o)"), Dest(os.fspath(output_path) + ".data", "external data file of the output (-o)")]
    if report_dir is not None:
        dests += [Dest(report_dir, "report folder (--report)", example="report.json and report.html", folder=True),
                  *(Dest(Path(report_dir) / n, "report file (--report)", example=n) for n in ("report.json", "report.html"))]
    return dests


#: The files a calibration folder's readers take samples from (an output of another type may sit beside them).
_SAMPLE_SUFFIXES = frozenset({*IMAGE_SUFFIXES, ".npz", ".npy", ".pb"})


def _model_files(path: Path) -> list[Path]:
    """The model file and its external-data files (validated, not loaded)."""
    files: list[Path] = []
    load_model(path, load_external_data=False, external_files=files)
    return [path, *files]


def _reads(model_files: list[Path], calibration: CalibrationOptions | None, evaluation: CalibrationOptions | None,
           calib_cache: str | os.PathLike | None) -> list[Read]:  # fmt: skip
    """Everything a quantize or calibrate run reads, named for the messages of check_destinations."""
    reads = [Read(model_files[0], "input model"), *(Read(f, "external data file of the input model") for f in model_files[1:])]
    for opts, role in ((calibration, "calibration data (--calib)"), (evaluation, "evaluation data (--eval)")):
        if opts is not None:
            reads += [Read(opts.source, role, _SAMPLE_SUFFIXES), Read(opts.tokenizer, "tokenizer (--tokenizer)")]
    return [*reads, Read(calib_cache, "calibration cache (--calib-cache)")]
