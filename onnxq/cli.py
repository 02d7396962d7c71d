"""The ``onnxq`` command line: thin click commands that build a Recipe and call the library.

Exit codes: 0 success, 1 failure (one line on stderr, no traceback; ``--debug`` shows it), 2 usage error,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM). With ``--json`` an error is also a JSON object on stdout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import click
from rich.console import Console
from rich.table import Table

from onnxq import __version__
from onnxq.cli_options import (
    RecipeChoice,
    RecipeFlags,
    calibration_options,
    recipe_flags,
    recipe_options,
)
from onnxq.errors import OnnxqError
from onnxq.text import PrintableFormatter, markup_safe, printable

if TYPE_CHECKING:  # the library is imported by each command when it runs: `onnxq --help` stays fast
    from onnxq.quantization import CalibrationOptions

__all__ = ["main"]

_err = Console(stderr=True)
_out = Console()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt so that the same clean-up runs
    (every ``except KeyboardInterrupt``; save_model removes its temporary files) and the command exits 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _install_sigterm(ctx: click.Context) -> None:
    """Handle SIGTERM like SIGINT for this command; the previous handler is restored when it ends."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (the CLI embedded in an application): leave its signals alone
        return
    ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous))


def _json_error(message: str, code: int) -> None:
    """With ``--json``, errors are also a JSON object on stdout, so a script reading stdout always gets JSON."""
    click.echo(json.dumps({"error": message, "exit_code": code}))


def _fail(message: str, code: int = 1) -> NoReturn:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.params.get("as_json"):
        _json_error(message, code)
    # the message is plain text: "[weight_only] block_size ..." must not be read as rich markup
    _err.print(f"[bold red]error:[/] {markup_safe(message)}", markup=True, highlight=False, soft_wrap=True)
    sys.exit(code)


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn onnxq errors into one line and exit code 1; ``--debug`` keeps the traceback.

    Ctrl-C exits 130 and SIGTERM 143 (128 + the signal), after the clean-up their exception triggers.
    With ``--json`` the error is also printed as ``{"error": ..., "exit_code": ...}`` on stdout.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except OnnxqError as exc:
            if debug:
                raise
            _fail(str(exc))
        except click.ClickException:
            raise  # usage errors: click prints them with the command's usage line and exits with 2
        except Terminated:
            _fail("terminated (SIGTERM); no output was written", 143)
        except KeyboardInterrupt:
            _fail("interrupted; no output was written", 130)
        except Exception as exc:  # noqa: BLE001 - last line of defence, still one line
            if debug:
                raise
            _fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback, and please report it)")

    return wrapper


class _Group(click.Group):
    """The command group; a usage error (exit 2) of a command run with ``--json`` is also JSON on stdout."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["onnxq.json_errors"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            if ctx.meta.get("onnxq.json_errors"):
                _json_error(exc.format_message(), exc.exit_code)
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="onnxq")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """onnxq: turn a float ONNX model into a smaller, faster quantized ONNX model.

    \b
    Typical use:
      onnxq quantize model.onnx -o model.int8.onnx --calib images/ --calib-preprocess torch
      onnxq inspect model.int8.onnx
      onnxq presets
    """
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))  # model names are quoted
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])
    _install_sigterm(ctx)


@main.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the quantized model (never the input).")
@recipe_options("A preset name (see `onnxq presets`); default w8a8.", "A TOML recipe file (instead of --preset).")
@calibration_options(
    calib="Calibration data: an image folder, .npz/.npy file or folder, a test_data_set folder, a text file (.txt/.jsonl/.tsv, with --tokenizer), a token-id .json list, or 'random[:N]'.",
    preprocess="Named image preprocessing (image folders): torch = ImageNet mean/std on RGB 0..1; caffe_bgr = BGR 0..255 minus means; tf127 = (x-127)/128; raw255 = RGB 0..255.",
    size="How many calibration samples to use (evenly spaced over the source). Default: the recipe's (128).",
    resize="Resize the shorter image side to this before cropping (default: crop*256/224).",
    crop="Center-crop size (default: the model's input size).",
    tokenizer="tokenizer.json (or its folder) for text calibration files (.txt, .jsonl, .tsv/.csv).",
    max_length="Truncate tokenized text samples to this many tokens (default 128).",
    seq_len="Window length for token-id .json files (default: the model's, else 512); with a text file and --tokenizer, the text is tokenized whole and cut into windows of this many tokens (LLM calibration; the default, 512, for the w4 presets).",
)  # fmt: skip
@recipe_flags()
@click.option("--calib-cache", type=click.Path(path_type=Path), help="Reuse ranges saved by `onnxq calibrate` (must match this model and calibration settings) instead of calibrating.")
@click.option("--accuracy-budget", "accuracy_budget", help="Mixed precision: the accuracy to keep, e.g. agreement=0.99 (top-1 agreement with the float model), sqnr=30 (output SQNR, dB) or cosine=0.999. Layers are ranked by sensitivity and the fewest fall back (int16 activations, then float) until it holds; the report lists them and the cost.")
@click.option("--eval", "eval_source", help="Samples the accuracy budget and the report's comparison are measured on (default: --calib). Same formats and preprocessing options as --calib.")
@click.option("--eval-size", type=click.IntRange(min=1), default=128, show_default=True, help="How many --eval samples (evenly spaced) the budget is measured on.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), help="Write report.json and a self-contained report.html into this folder (with a float-vs-quantized comparison: per-tensor SQNR, histograms; charts need onnxq[report]).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout instead of a summary.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--checked", is_flag=True, help="Validate the graph (onnx.checker + ORT load) after every pass (slower).")
@_handle_errors
def quantize(model: Path, output: str, choice: RecipeChoice, calibration: CalibrationOptions, flags: RecipeFlags,
             calib_cache: Path | None, accuracy_budget: str | None, eval_source: str | None, eval_size: int,
             report_dir: Path | None, as_json: bool, no_progress: bool, checked: bool) -> None:  # fmt: skip
    """Quantize MODEL into -o OUTPUT with a preset or recipe and calibration data.

    \b
    Example (MobileNetV2, 128 ImageNet images, the default w8a8 preset):
      onnxq quantize mobilenetv2.onnx -o mnv2.int8.onnx \\
            --calib imagenet/ --calib-preprocess torch --calib-size 128
    \b
    Example (an LLM in int4 with GPTQ, 32 windows of 512 tokens):
      onnxq quantize model.onnx -o model.int4.onnx --preset w4-gptq \\
            --calib tokens.json --calib-size 32 --seq-len 512 --block-size 128
    \b
    Example (keep 99% top-1 agreement; sensitive layers fall back; HTML report):
      onnxq quantize mobilenetv2.onnx -o m.onnx --calib calib_images/ --calib-preprocess torch \\
            --accuracy-budget agreement=0.99 --eval val_images/ --eval-size 400 --report report/

    The output is written atomically; on any error nothing is written and the exit code is 1.
    """
    from onnxq.api import calibration_defaults, check_calibration_given
    from onnxq.quantization import quantize_file

    recipe = flags.apply(choice.recipe(), calibration.size)
    check_calibration_given(recipe, calibration, calib_cache)
    opts = calibration_defaults(recipe, calibration)
    budget = None
    if accuracy_budget:
        from onnxq.mixed_precision import AccuracyBudget

        budget = AccuracyBudget.parse(accuracy_budget)
        if not (calibration.source or eval_source):
            raise click.UsageError("--accuracy-budget is measured on samples: give --calib or --eval")
    evaluation = dataclasses.replace(opts, source=eval_source) if eval_source else None
    result = quantize_file(model, output, recipe, calibration=opts, progress=not no_progress and not as_json,
                           checked=checked, report_dir=report_dir, calib_cache=calib_cache, budget=budget,
                           evaluation=evaluation, eval_size=eval_size, reads=choice.reads())  # fmt: skip
    if as_json:
        click.echo(json.dumps(result.report.to_dict(), indent=2, default=str))
        return
    _print_quantize_summary(result.report, output)


def _human(n: int) -> str:
    """Bytes as a short human-readable size."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _print_calibration_warnings(cal: dict[str, Any] | None) -> None:
    """The calibration data's warnings (bad samples and tensors, a sample count the source cannot give)."""
    for line in (cal or {}).get("warnings", []):
        _out.print(f"[bold yellow]warning:[/] {markup_safe(line)}", highlight=False, soft_wrap=True)


def _reported_counts(report: Any) -> dict[str, int]:
    """The counts the passes report to users (each pass's ``reported_counts``), summed over the steps, in
    pipeline order; the zeros left out."""
    from onnxq.passes import PASSES

    counts: dict[str, int] = {}
    for step in report.steps:
        for key in getattr(PASSES.get(step.name), "reported_counts", ()):
            if step.counts.get(key):
                counts[key] = counts.get(key, 0) + step.counts[key]
    return counts


def _print_quantize_summary(report: Any, output: str) -> None:
    info = report.info
    size = info.get("size", {})
    output = info.get("output", output)  # a model folder's run: the model file inside the output folder
    _out.print(f"[bold green]wrote[/] {markup_safe(output)}  ({size.get('input_bytes', 0) / 1e6:.2f} MB -> "
               f"{size.get('output_bytes', 0) / 1e6:.2f} MB, {100 * size.get('ratio', 0):.1f}% of the input)")  # fmt: skip
    if info.get("copied"):
        _out.print(f"copied beside it from the input folder: {', '.join(info['copied'])}", markup=False, highlight=False)
    tgt = info.get("target", {})
    if any(st.name == "insert_qdq" for st in report.steps):
        _out.print(f"target profile: [bold]{tgt.get('profile')}[/] ({tgt.get('reason')})")
    cal = info.get("calibration")
    if cal and any(st.name == "weight_only" for st in report.steps):
        _out.print(f"calibration: {cal.get('samples')} samples from {printable(cal.get('source'))}", markup=False,
                   highlight=False)
    elif cal and not cal.get("provider") and not cal.get("samples_seen"):  # no session ran: nothing needed a range
        _out.print(f"calibration: nothing needed an activation range; source: {printable(cal.get('source'))}",
                   markup=False, highlight=False)  # fmt: skip
    elif cal:
        where = f" on {cal['provider']}" if cal.get("provider") else ""  # a cache may not say where it ran
        _out.print(f"calibration: {cal.get('method')} over {cal.get('samples_seen')} samples{where} in "
                   f"{cal.get('seconds')} s; source: {printable(cal.get('source'))}", markup=False, highlight=False)  # fmt: skip
    _print_calibration_warnings(cal)
    counts = _reported_counts(report)
    _out.print("done: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    from onnxq.passes import PASSES

    step_notes = [n for st in report.steps if getattr(PASSES.get(st.name), "reports_notes", False) for n in st.notes]
    for note in [*report.notes, *step_notes]:
        if not note.startswith("target profile"):
            _out.print(f"note: {printable(note)}", markup=False, highlight=False)
    _out.print(f"time {info.get('seconds')} s, peak RSS {info.get('peak_rss_mb')} MB")


@main.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the statistics (JSON).")
@recipe_options("The preset the statistics are for (default w8a8).", "A TOML recipe file (instead of --preset).")
@calibration_options(required=True)
@recipe_flags("calibrator", "device", device="Where calibration runs.")
@click.option("--json", "as_json", is_flag=True, help="Print what was saved as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_handle_errors
def calibrate(model: Path, output: str, choice: RecipeChoice, calibration: CalibrationOptions, flags: RecipeFlags, as_json: bool,
              no_progress: bool) -> None:  # fmt: skip
    """Calibrate MODEL and save the activation ranges to -o STATS.json for `quantize --calib-cache`.

    \b
    The file is keyed by the model's sha256 and the calibration settings; quantize refuses it for
    another model or other settings. Example:
      onnxq calibrate model.onnx --calib images/ --calib-preprocess torch -o stats.json
      onnxq quantize model.onnx -o model.int8.onnx --calib-cache stats.json
    """
    from onnxq.quantization import calibrate_file

    recipe = flags.apply(choice.recipe(), calibration.size)
    info = calibrate_file(model, output, recipe, calibration=calibration, progress=not no_progress and not as_json,
                          reads=choice.reads())  # fmt: skip
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        where = f" on {info['provider']}" if info.get("provider") else ""
        _out.print(f"[bold green]wrote[/] {markup_safe(output)}: ranges of {info['tensors']} tensors, "
                   f"{info.get('method')} over {info.get('samples_seen')} samples{where} in {info.get('seconds')} s")  # fmt: skip
        _print_calibration_warnings(info)


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder (one <name>.onnx per model, batch-summary.json).")
@recipe_options("Preset for every model (a manifest can override it per model).", "TOML recipe for every model (instead of --preset).")
@click.option("-j", "--jobs", "workers", type=click.IntRange(min=1), default=1, show_default=True, help="Models converted in parallel (worker processes).")
@calibration_options(only=("calib", "preprocess", "size", "tokenizer"), calib="Calibration data for every model (a manifest can set calib per model).",
                     preprocess="Named image preprocessing.", size="Calibration samples per model.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@_handle_errors
def batch(source: Path, outdir: Path, choice: RecipeChoice, workers: int, calibration: CalibrationOptions, as_json: bool) -> None:
    """Convert every model in SOURCE (a folder of *.onnx, or a TOML manifest) into OUTDIR.

    \b
    Each model runs in its own worker process: one model's failure (a corrupt file, an unsupported op,
    out of memory) is recorded with a one-line reason and the others go on. Re-running skips models
    already converted with the same input, recipe and calibration. Exit code 1 if any model failed.
      onnxq batch models/ -o out/ --preset w8a8 --calib images/ -j 2
      onnxq batch manifest.toml -o out/ -j 2 --json
    SIGINT/SIGTERM stop every worker and exit 130/143, saying which models were written.
    """
    from onnxq.batch import BatchInterrupted, jobs_from_folder, jobs_from_manifest, run_batch

    calib_size = calibration.size
    recipe = choice.recipe(default=source.is_dir())  # a manifest's models may each name their own
    if recipe is not None and calib_size:
        recipe = recipe.with_(calibration=dataclasses.replace(recipe.calibration, samples=calib_size))
    given = {"calib": calibration.source, "calib_preprocess": calibration.preprocess, "tokenizer": calibration.tokenizer}
    settings = {k: v for k, v in given.items() if v}
    if source.is_dir():
        jobs = jobs_from_folder(source, outdir, recipe, settings)
    else:  # --calib-size is every model's default; a manifest's calib_size overrides it
        jobs = jobs_from_manifest(source, outdir, recipe, settings, calib_size=calib_size)
    try:
        outcomes = run_batch(jobs, outdir, workers=workers, live=not as_json and sys.stderr.isatty())
    except BatchInterrupted as stop:
        if as_json:  # the error object every --json failure prints, with what each model got to
            click.echo(json.dumps({"error": str(stop), "exit_code": 128 + stop.signum,
                                   "outcomes": [dataclasses.asdict(o) for o in stop.outcomes]}, indent=2))  # fmt: skip
        _err.print(f"[bold red]error:[/] {markup_safe(str(stop))}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(128 + stop.signum)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(o) for o in outcomes], indent=2))
    else:
        table = Table(header_style="bold", title=f"batch summary ({outdir / 'batch-summary.json'})")
        for col in ("model", "status", "time s", "size", "reason"):
            table.add_column(col)
        for o in outcomes:
            size = f"{_human(o.input_bytes)} -> {_human(o.output_bytes)}" if o.status == "converted" else ""
            style = {"converted": "green", "skipped": "cyan", "failed": "red"}.get(o.status, "yellow")
            reason = o.reason or (f"{len(o.warnings)} calibration warning(s), first: {o.warnings[0]}" if o.warnings else "")
            table.add_row(markup_safe(o.name), f"[{style}]{o.status}[/]", f"{o.seconds:.1f}", size, markup_safe(reason))
        _out.print(table)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        sys.exit(1)


@main.command()
@click.argument("float_model", type=click.Path(path_type=Path))
@click.argument("quant_model", type=click.Path(path_type=Path))
@calibration_options(required=True, size_default=64, calib="Inputs to run both models on (any --calib source of `onnxq quantize`).",
                     size="How many samples (evenly spaced over the source).", tokenizer="tokenizer.json for text files.",
                     seq_len="Window length for token-id .json files / running text.")  # fmt: skip
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True, help="Worst tensors to show.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@click.option("--outputs-only", is_flag=True, help="Compare the outputs only (faster on many samples: no per-tensor SQNR).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON (all tensors, worst first).")
@_handle_errors
def compare(float_model: Path, quant_model: Path, calibration: CalibrationOptions, top: int, no_latency: bool, outputs_only: bool,
            as_json: bool) -> None:  # fmt: skip
    """Run FLOAT_MODEL and QUANT_MODEL on the same inputs and show where they differ.

    \b
    Per-tensor SQNR (worst first) between matching tensors: QDQ models are matched through their
    QuantizeLinear/DequantizeLinear pairs and names, QOperator models (QLinearConv, ...) by their
    output scales and, where names differ, by aligning layers with equal weight shapes. Then output
    SQNR, cosine and top-1 agreement (classifiers), size and ORT CPU latency of each model.
      onnxq compare model.onnx model.int8.onnx --calib images/ --calib-preprocess torch --json
    """
    from onnxq.calibration.sources import open_source
    from onnxq.evaluate import compare_models
    from onnxq.model import load_model

    fm, qm = load_model(float_model), load_model(quant_model)
    c = calibration
    assert c.source is not None  # --calib is required
    source = open_source(c.source, fm, preprocess=c.preprocess, resize=c.resize, crop=c.crop, limit=c.size,
                         tokenizer=c.tokenizer, max_length=c.max_length, seq_len=c.seq_len)  # fmt: skip
    result = compare_models(fm, qm, source, float_path=float_model, quant_path=quant_model, latency=not no_latency,
                            tensors=not outputs_only, histograms=0, progress=not as_json)  # fmt: skip
    d = result.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    _print_comparison(d, float_model, quant_model, top)


def _db(v: float | None) -> str:
    return "exact" if v is None else f"{v:.1f}"


def _print_comparison(d: dict[str, Any], float_model: Path, quant_model: Path, top: int) -> None:
    t = Table(title=f"outputs ({d['samples']} samples)", header_style="bold")
    for col in ("output", "SQNR dB", "cosine", "max |err|", "top-1 agreement"):
        t.add_column(col)
    for name, o in d["outputs"].items():
        agree = "" if o.get("top1_agreement") is None else f"{100 * o['top1_agreement']:.1f}%"
        t.add_row(markup_safe(name), _db(o["sqnr_db"]), f"{o['cosine']:.5f}", f"{o['max_abs_err']:.4g}", agree)
    _out.print(t)
    for name, o in d["outputs"].items():  # a dead output must not hide behind a plausible-looking number
        if o.get("degenerate"):
            _out.print(f"[bold yellow]warning:[/] output {markup_safe(repr(name))} of the quantized model is degenerate: "
                       f"{markup_safe(o['degenerate'])}", highlight=False, soft_wrap=True)  # fmt: skip
    if not d["tensors"]:
        _print_models(d, float_model, quant_model)
        return
    t = Table(title=f"worst tensors ({len(d['tensors'])} matched)", header_style="bold")
    for col in ("tensor", "quantized tensor", "op", "SQNR dB", "cosine"):
        t.add_column(col, overflow="fold")
    for r in d["tensors"][:top]:
        t.add_row(markup_safe(r["float_name"]), markup_safe(r["quant_name"]), markup_safe(r["op_type"]),
                  _db(r["sqnr_db"]), f"{r['cosine']:.4f}")  # fmt: skip
    _out.print(t)
    if d["unmatched"]:
        more = f" and {len(d['unmatched']) - 5} more" if len(d["unmatched"]) > 5 else ""
        _out.print(f"not matched (no counterpart found): {printable(', '.join(d['unmatched'][:5]))}{more}",
                   markup=False, highlight=False)
    _print_models(d, float_model, quant_model)


def _print_models(d: dict[str, Any], float_model: Path, quant_model: Path) -> None:
    t = Table(title="models", header_style="bold")
    for col in ("model", "size", "latency ms (1 sample, ORT CPU)"):
        t.add_column(col, overflow="fold")
    for key, path in (("float", float_model), ("quant", quant_model)):
        m = d["models"][key]
        lat = m.get("latency_ms")
        t.add_row(markup_safe(path), _human(m["bytes"]), "" if lat is None else f"{lat:.2f}")
    _out.print(t)
    f, q = d["models"]["float"], d["models"]["quant"]
    if f.get("latency_ms") and q.get("latency_ms"):
        _out.print(f"size {q['bytes'] / max(f['bytes'], 1):.1%} of float; speed-up {f['latency_ms'] / q['latency_ms']:.2f}x")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_handle_errors
def inspect(model: Path, as_json: bool) -> None:
    """Show MODEL's op census, dtypes, sizes and the share of compute that is quantized."""
    from onnxq.model import load_model
    from onnxq.summary import render_summary, summarize

    summary = summarize(load_model(model, load_external_data=False, runnable=False), model)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2, default=str))
    else:
        render_summary(summary, _out)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-p", "--port", type=click.IntRange(0, 65535), default=None,
              help="Port to serve on (default: 8080, else 8081, else a free one; 0 = any free port).")
@click.option("--host", default="localhost", show_default=True,
              help="Interface to listen on; localhost keeps the model on this machine (0.0.0.0 exposes it to the network).")
@click.option("--browse/--no-browse", default=False, show_default=True, help="Also open the address in a web browser.")
@_handle_errors
def view(model: Path, port: int | None, host: str, browse: bool) -> None:
    """Open MODEL in Netron, served on this machine, and print the address; Ctrl-C stops it.

    \b
    Inserted nodes are named after the tensor or node they serve (<tensor>/QuantizeLinear) and their
    doc strings (Netron's node panel) give the scheme, calibration method, range and measured SQNR;
    the model properties hold the recipe, onnxq version and input hash. Needs: pip install "onnxq[view]"
      onnxq view mnv2.int8.onnx            # then open http://localhost:8080
    """
    from onnxq.view import view_model

    view_model(model, port=port, browse=browse, echo=click.echo, host=host)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the presets as JSON.")
@_handle_errors
def presets(as_json: bool) -> None:
    """List the presets, one line each."""
    from onnxq.recipe import PRESETS, recipe_to_dict

    if as_json:
        click.echo(json.dumps({k: recipe_to_dict(v) for k, v in PRESETS.items()}, indent=2))
        return
    table = Table(box=None, show_header=True, header_style="bold")
    table.add_column("preset")
    table.add_column("what it does")
    for name, r in PRESETS.items():
        table.add_row(name, r.description)
    _out.print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
