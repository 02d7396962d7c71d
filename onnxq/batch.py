"""``onnxq batch``: convert many models, in parallel worker processes, resumably.

Jobs come from a folder (every ``*.onnx`` in it, one recipe) or a TOML manifest (per-model preset or
recipe, calibration source and exclusions). Each model is converted in its own worker *process*
(``python -m onnxq.batch --worker``), so a crash, a hang-free out-of-memory kill or a hostile file
takes down only that model: its failure is recorded with a one-line reason and the others go on.

A job's *fingerprint* is the sha256 of its input model (with external data), its recipe and its
calibration options. A finished output records it (``metadata_props["onnxq.batch_fingerprint"]`` and
a marker file in ``OUTDIR/.onnxq-batch/``), so re-running the same batch skips the models already
converted with the same inputs and settings. ``batch-summary.json`` in OUTDIR lists every model's
status, reason, time and sizes.

Manifest format (strict: unknown keys are errors)::

    [defaults]                      # optional, applies to every model
    preset = "w8a8"
    calib = "images/"
    calib_preprocess = "torch"

    [[model]]
    path = "mobilenetv2.onnx"       # relative to the manifest
    [[model]]
    path = "minilm.onnx"
    name = "minilm-int8"            # output file stem (default: the input's)
    recipe = "transformer.toml"     # instead of preset
    calib = "sentences.txt"
    tokenizer = "tokenizer.json"
    exclude_op = ["MatMul"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxq.errors import OnnxqError, RecipeError
from onnxq.recipe import Recipe, load_recipe, preset, recipe_from_dict, recipe_to_dict
from onnxq.text import markup_safe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["BatchJob", "JobOutcome", "jobs_from_folder", "jobs_from_manifest", "run_batch", "MANIFEST_KEYS"]

_CALIB_KEYS = ("calib", "calib_preprocess", "calib_size", "calib_resize", "calib_crop", "tokenizer", "max_length", "seq_len")
MANIFEST_KEYS = ("path", "name", "preset", "recipe", *_CALIB_KEYS, "exclude_op", "exclude_node", "exclude_regex")
_STATE_DIR = ".onnxq-batch"


@dataclass
class BatchJob:
    """One model to convert: where from, where to, with which recipe and calibration options."""

    name: str
    model: Path
    output: Path
    recipe: Recipe
    calibration: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 of the input model, the recipe and the calibration options."""
        from onnxq.model import model_hash

        try:
            model_sha = model_hash(self.model)
        except (OSError, OnnxqError):
            model_sha = "unreadable"
        doc = json.dumps({"model": model_sha, "recipe": recipe_to_dict(self.recipe), "calib": self.calibration},
                         sort_keys=True, default=str)  # fmt: skip
        return hashlib.sha256(doc.encode()).hexdigest()


@dataclass
class JobOutcome:
    """What happened to one job."""

    name: str
    model: str
    output: str
    status: str  # converted | skipped | failed
    reason: str = ""
    seconds: float = 0.0
    input_bytes: int = 0
    output_bytes: int = 0


def _apply(recipe: Recipe, entry: dict[str, Any]) -> Recipe:
    ex = recipe.exclude
    ex = dataclasses.replace(
        ex,
        op_types=ex.op_types + tuple(entry.get("exclude_op", ())),
        names=ex.names + tuple(entry.get("exclude_node", ())),
        name_regex=ex.name_regex + tuple(entry.get("exclude_regex", ())),
    )
    calib = recipe.calibration
    if entry.get("calib_size"):
        calib = dataclasses.replace(calib, samples=int(entry["calib_size"]))
    return recipe.with_(exclude=ex, calibration=calib)


def _calib_options(entry: dict[str, Any], base: Path) -> dict[str, Any]:
    opts = {k: entry[k] for k in _CALIB_KEYS if k in entry and k != "calib_size"}
    for key in ("calib", "tokenizer"):
        if key in opts and not str(opts[key]).startswith("random") and not Path(opts[key]).is_absolute():
            opts[key] = str((base / opts[key]).resolve())
    return opts


def jobs_from_folder(folder: Path, outdir: Path, recipe: Recipe, calibration: dict[str, Any]) -> list[BatchJob]:
    """Every ``*.onnx`` file directly in ``folder``, with one recipe."""
    models = sorted(p for p in folder.glob("*.onnx") if p.is_file())
    if not models:
        raise OnnxqError(f"folder {folder} holds no *.onnx files")
    return [BatchJob(p.stem, p, outdir / f"{p.stem}.onnx", recipe, dict(calibration)) for p in models]


def jobs_from_manifest(
    manifest: Path, outdir: Path, recipe: Recipe | None, calibration: dict[str, Any]
) -> list[BatchJob]:
    """Jobs from a TOML manifest; per-model keys override ``[defaults]``, which override the CLI's."""
    try:
        data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"manifest {manifest} is not readable TOML: {exc}") from exc
    for key in data:
        if key not in ("defaults", "model"):
            raise RecipeError(f"unknown key '{key}' in manifest {manifest}; valid keys: defaults, model")
    defaults = data.get("defaults", {})
    entries = data.get("model", [])
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"manifest {manifest} lists no models: add [[model]] tables with a path")
    base = manifest.parent
    jobs: list[BatchJob] = []
    for i, raw in enumerate(entries):
        entry = {**defaults, **raw}
        for key in entry:
            if key not in MANIFEST_KEYS:
                raise RecipeError(f"unknown key '{key}' in [[model]] #{i + 1} of {manifest}; valid keys: {', '.join(MANIFEST_KEYS)}")
        if "path" not in raw:
            raise RecipeError(f"[[model]] #{i + 1} of {manifest} has no path")
        if "preset" in entry and "recipe" in entry:
            raise RecipeError(f"[[model]] #{i + 1} of {manifest} gives both preset and recipe")
        if "recipe" in entry:
            r = load_recipe(base / entry["recipe"])
        elif "preset" in entry:
            r = preset(entry["preset"])
        else:
            r = recipe or preset("w8a8")
        path = (base / entry["path"]).resolve()
        name = str(entry.get("name") or path.stem)
        jobs.append(BatchJob(name, path, outdir / f"{name}.onnx", _apply(r, entry), {**calibration, **_calib_options(entry, base)}))
    names = [j.name for j in jobs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RecipeError(f"manifest {manifest} gives two models the output name {dup[0]!r}: set name = ... on one")
    return jobs


def _marker(job: BatchJob) -> Path:
    return job.output.parent / _STATE_DIR / f"{job.name}.done.json"


def _up_to_date(job: BatchJob, fingerprint: str) -> bool:
    marker = _marker(job)
    if not job.output.exists() or not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def _launch(job: BatchJob, fingerprint: str, state: Path, threads: int) -> tuple[subprocess.Popen[bytes], Path, Path]:
    spec = state / f"{job.name}.job.json"
    status = state / f"{job.name}.status.json"
    status.unlink(missing_ok=True)
    spec.write_text(json.dumps({
        "model": str(job.model), "output": str(job.output), "recipe": recipe_to_dict(job.recipe),
        "calibration": job.calibration, "fingerprint": fingerprint,
    }, default=str))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxq.batch", "--worker", str(spec), str(status)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "ONNXQ_THREADS": str(threads)},
    )  # fmt: skip
    return proc, spec, status


def _read_status(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_batch(jobs: list[BatchJob], outdir: Path, *, workers: int = 1, live: bool = True) -> list[JobOutcome]:
    """Run the jobs with up to ``workers`` processes; returns one outcome per job, in job order."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    outdir.mkdir(parents=True, exist_ok=True)
    state = outdir / _STATE_DIR
    state.mkdir(exist_ok=True)
    outcomes: dict[str, JobOutcome] = {}
    stages: dict[str, str] = {j.name: "queued" for j in jobs}
    pending: list[tuple[BatchJob, str]] = []
    for job in jobs:
        fp = job.fingerprint()
        if _up_to_date(job, fp):
            outcomes[job.name] = JobOutcome(job.name, str(job.model), str(job.output), "skipped",
                                            "up to date (same input, recipe and calibration)")  # fmt: skip
            stages[job.name] = "skipped (up to date)"
        else:
            pending.append((job, fp))
    running: dict[str, tuple[BatchJob, subprocess.Popen[bytes], Path, float]] = {}
    # each worker's ONNX Runtime sessions get their share of the cores instead of all of them
    threads = int(os.environ.get("ONNXQ_THREADS", "0") or 0) or max(1, (os.cpu_count() or 1) // max(1, workers))

    def table() -> Table:
        t = Table(title=f"onnxq batch: {len(jobs)} models, {workers} workers", header_style="bold")
        t.add_column("model")
        t.add_column("stage")
        for j in jobs:
            extra = f" ({time.monotonic() - running[j.name][3]:.0f} s)" if j.name in running else ""
            t.add_row(markup_safe(j.name), markup_safe(stages[j.name] + extra))
        return t

    console = Console(stderr=True)
    view = Live(table(), console=console, refresh_per_second=4, transient=False) if live else contextlib.nullcontext()
    with view:
        while pending or running:
            while pending and len(running) < max(1, workers):
                job, fp = pending.pop(0)
                proc, _spec, status = _launch(job, fp, state, threads)
                running[job.name] = (job, proc, status, time.monotonic())
                stages[job.name] = "starting"
            for name, (job, proc, status, t0) in list(running.items()):
                st = _read_status(status)
                if st.get("stage"):
                    stages[name] = st["stage"]
                if proc.poll() is None:
                    continue
                del running[name]
                err = (proc.stderr.read().decode(errors="replace") if proc.stderr else "").strip()
                outcomes[name] = _finish(job, proc.returncode, _read_status(status), err, time.monotonic() - t0)
                stages[name] = outcomes[name].status if not outcomes[name].reason else f"{outcomes[name].status}: {outcomes[name].reason}"
            if live:
                view.update(table())  # type: ignore[union-attr]
            time.sleep(0.1)
        if live:
            view.update(table())  # type: ignore[union-attr]
    result = [outcomes[j.name] for j in jobs]
    summary = outdir / "batch-summary.json"
    summary.write_text(json.dumps([dataclasses.asdict(o) for o in result], indent=2) + "\n")
    return result


def _finish(job: BatchJob, code: int, status: dict[str, Any], stderr: str, seconds: float) -> JobOutcome:
    out = JobOutcome(job.name, str(job.model), str(job.output), "failed", seconds=round(seconds, 2))
    if code == 0 and status.get("status") == "converted":
        out.status = "converted"
        out.input_bytes = int(status.get("input_bytes", 0))
        out.output_bytes = int(status.get("output_bytes", 0))
    elif status.get("reason"):
        out.reason = status["reason"]
    elif code < 0:
        out.reason = f"worker killed by signal {-code}" + (" (out of memory?)" if -code == 9 else "")
    else:
        last = stderr.splitlines()[-1] if stderr else "no message"
        out.reason = f"worker exited with code {code}: {last}"
    return out


def _worker(spec_path: str, status_path: str) -> int:
    """Convert one model; report stages and the outcome in ``status_path`` (JSON, rewritten atomically)."""
    status = Path(status_path)

    def write(doc: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=status.parent, prefix=".status.")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, status)

    try:
        from onnxq.quantize import CalibrationOptions, quantize_file

        spec = json.loads(Path(spec_path).read_text())
        recipe = recipe_from_dict(spec["recipe"], where=f"the recipe of {spec['model']}")
        c = spec["calibration"]
        opts = CalibrationOptions(source=c.get("calib"), preprocess=c.get("calib_preprocess"), resize=c.get("calib_resize"),
                                  crop=c.get("calib_crop"), tokenizer=c.get("tokenizer"), max_length=c.get("max_length"),
                                  seq_len=c.get("seq_len"))  # fmt: skip
        if recipe.needs_calibration() and not opts.source:
            raise OnnxqError(f"recipe '{recipe.name}' needs calibration data: give calib = ... for this model (or --calib)")
        result = quantize_file(spec["model"], spec["output"], recipe, calibration=opts,
                               on_stage=lambda s: write({"stage": s}),
                               metadata={"onnxq.batch_fingerprint": spec["fingerprint"]})  # fmt: skip
        size = result.report.info.get("size", {})
        marker = Path(spec["output"]).parent / _STATE_DIR / f"{Path(spec['output']).stem}.done.json"
        marker.write_text(json.dumps({"fingerprint": spec["fingerprint"], "output": spec["output"]}))
        write({"status": "converted", "stage": "done", "input_bytes": size.get("input_bytes", 0),
               "output_bytes": size.get("output_bytes", 0)})  # fmt: skip
        return 0
    except OnnxqError as exc:
        write({"status": "failed", "reason": " ".join(str(exc).split())})
        return 1
    except MemoryError:
        write({"status": "failed", "reason": "out of memory"})
        return 1
    except Exception as exc:  # noqa: BLE001 - one line for the summary, whatever went wrong
        write({"status": "failed", "reason": f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"})
        return 1


if __name__ == "__main__":  # the worker entry point
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3]))
    print("usage: python -m onnxq.batch --worker JOB.json STATUS.json (run by `onnxq batch`)", file=sys.stderr)
    sys.exit(2)
