"""``onnxq batch``: convert many models, in parallel worker processes, resumably.

Jobs come from a folder (every ``*.onnx`` in it, one recipe) or a TOML manifest (per-model preset or
recipe, calibration source and exclusions). Each model is converted in its own worker *process*
(``python -m onnxq.batch --worker``), so a crash, a hang-free out-of-memory kill or a hostile file
takes down only that model: its failure is recorded with a one-line reason and the others go on.

A job's *fingerprint* is the sha256 of its input model (with external data), its recipe and its
calibration options. A finished output records it (``metadata_props["onnxq.batch_fingerprint"]`` and
a marker file in ``OUTDIR/.onnxq-batch/`` that also holds the output's sha256 and size), so re-running
the same batch skips the models already converted with the same inputs and settings, once their
output still matches its record; a damaged or replaced output is converted again. ``batch-summary.json``
in OUTDIR lists every model's status, reason, time and sizes.

Which models run, and the checks on names and paths, are in :mod:`onnxq.batch_jobs`.

Signals: SIGINT and SIGTERM stop the batch: the workers are terminated (SIGKILLed after a grace
period) and waited for, their temporary files removed, the summary written, and
:class:`BatchInterrupted` raised (the CLI exits 130 or 143). A worker also exits if its parent dies,
even by SIGKILL (``PR_SET_PDEATHSIG`` on Linux, a ``getppid()`` watch elsewhere), so no orphan writes
an output later. One batch at a time writes into an OUTDIR (a lock in ``.onnxq-batch/``; a second one
waits), and each run first removes the temporary files that a killed earlier run left there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from onnxq.batch_jobs import MANIFEST_KEYS, BatchJob, check_output_name, jobs_from_folder, jobs_from_manifest
from onnxq.errors import OnnxqError
from onnxq.recipe import recipe_from_dict, recipe_to_dict
from onnxq.text import markup_safe

__all__ = ["BatchJob", "JobOutcome", "BatchInterrupted", "jobs_from_folder", "jobs_from_manifest", "run_batch",
           "check_output_name", "MANIFEST_KEYS"]  # fmt: skip

_STATE_DIR = ".onnxq-batch"
_SUMMARY = "batch-summary.json"
_GRACE_S = 5.0  # how long stopped workers get to clean up before SIGKILL
_SIGNAL_NAMES: dict[int, str] = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


@dataclass
class JobOutcome:
    """What happened to one job."""

    name: str
    model: str
    output: str
    status: str  # converted | skipped | failed | interrupted (stopped, or not started, by SIGINT/SIGTERM)
    reason: str = ""
    seconds: float = 0.0
    input_bytes: int = 0
    output_bytes: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)  # calibration-data warnings of a converted model


class BatchInterrupted(OnnxqError):
    """SIGINT or SIGTERM stopped the batch; the workers are gone and ``outcomes`` says what was written."""

    def __init__(self, signum: int, outcomes: list[JobOutcome], summary: Path) -> None:
        self.signum = signum
        self.outcomes = outcomes
        super().__init__(_interrupted_message(signum, outcomes, summary))


def _interrupted_message(signum: int, outcomes: list[JobOutcome], summary: Path) -> str:
    """One line: which models were written, which stopped, which never started."""

    def names(status: str, pick: Any = lambda o: True) -> list[str]:
        return [o.name for o in outcomes if o.status == status and pick(o)]

    parts = []
    for label, found in (("converted", names("converted")), ("up to date", names("skipped")), ("failed", names("failed")),
                         ("stopped before finishing", names("interrupted", lambda o: "not started" not in o.reason)),
                         ("not started", names("interrupted", lambda o: "not started" in o.reason))):  # fmt: skip
        if found:
            shown = ", ".join(found[:5]) + (f", ... ({len(found) - 5} more)" if len(found) > 5 else "")
            parts.append(f"{label}: {len(found)} ({shown})")
    return (f"batch interrupted by {_SIGNAL_NAMES.get(signum, signum)}; {'; '.join(parts) or 'no models'}; "
            f"the workers are stopped and no output was left half-written; summary in {summary}; "
            "run the same command again to finish the rest")  # fmt: skip


def _check_outputs(jobs: list[BatchJob], outdir: Path) -> None:
    """OnnxqError when a job's output would replace another job's input model (or an output is a folder)."""
    inputs = {os.path.realpath(j.model): j for j in jobs}
    for job in jobs:
        other = inputs.get(os.path.realpath(job.output))
        if other is not None:
            raise OnnxqError(f"the output {job.output} of model {job.name!r} is the input of model {other.name!r}; "
                             f"choose another -o folder than {outdir} or another name")  # fmt: skip


def _marker(job: BatchJob) -> Path:
    return job.output.parent / _STATE_DIR / f"{job.name}.done.json"


def _files_of(output: Path) -> dict[str, int]:
    """The output model and its external-data file (when there is one): name -> size in bytes."""
    files = [output, output.with_name(output.name + ".data")]
    return {p.name: p.stat().st_size for p in files if p.is_file()}


def _record(output: Path, fingerprint: str) -> dict[str, Any]:
    """The completion marker of an output: fingerprint, sha256 (with external data) and file sizes."""
    from onnxq.model import model_hash

    return {"fingerprint": fingerprint, "output": str(output), "sha256": model_hash(output), "files": _files_of(output)}


def _resume_check(job: BatchJob, fingerprint: str) -> tuple[bool, str]:
    """(up to date?, note): up to date when the marker's fingerprint matches and the output matches its record.

    The note says why an existing output is converted again (damaged, or an older marker without a hash).
    """
    from onnxq.model import model_hash

    marker = _marker(job)
    if not job.output.exists() or not marker.exists():
        return False, ""
    try:
        doc = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False, "the record of the previous output was unreadable; converted again"
    if not isinstance(doc, dict) or doc.get("fingerprint") != fingerprint:
        return False, ""
    if "sha256" not in doc:
        return False, "the previous output has no recorded hash (older onnxq); converted again"
    try:
        same = doc.get("files") == _files_of(job.output) and doc["sha256"] == model_hash(job.output)
    except (OSError, OnnxqError):
        same = False
    if not same:
        return False, "previous output was damaged (size or hash differs from its record); converted again"
    return True, ""


def _atomic_write(path: Path, text: str) -> None:
    """Write ``path`` through a ``.NAME.XXXX.tmp`` beside it and a rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the summary unreadable to the rest of a CI pipeline
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class _Running:
    """A started worker and the files the parent keeps for it."""

    job: BatchJob
    proc: subprocess.Popen[bytes]
    spec: Path
    status: Path
    stderr: Path
    started: float
    before: tuple[int, int] | None  # the output's (inode, mtime) before the worker started, or None


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _launch(job: BatchJob, fingerprint: str, state: Path, threads: int) -> _Running:
    spec, status, stderr = (state / f"{job.name}.{ext}" for ext in ("job.json", "status.json", "stderr.txt"))
    status.unlink(missing_ok=True)
    _marker(job).unlink(missing_ok=True)  # a new conversion: the old record no longer describes the output
    _atomic_write(spec, json.dumps({
        "model": str(job.model), "output": str(job.output), "recipe": recipe_to_dict(job.recipe),
        "calibration": job.calibration, "fingerprint": fingerprint,
    }, default=str))  # fmt: skip
    with open(stderr, "wb") as err:  # a file, not a pipe: a chatty worker must not block on a full pipe
        proc = subprocess.Popen(
            [sys.executable, "-m", "onnxq.batch", "--worker", str(spec), str(status)],
            stdout=subprocess.DEVNULL, stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "ONNXQ_THREADS": str(threads), "ONNXQ_BATCH_PARENT": str(os.getpid())},
        )  # fmt: skip
    return _Running(job, proc, spec, status, stderr, time.monotonic(), _stat_key(job.output))


def _read_status(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


class _Stop(BaseException):
    """Raised in the main thread by the SIGINT/SIGTERM handler of :func:`_signals`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _SignalGuard:
    """The first SIGINT/SIGTERM raises :class:`_Stop` (deferred out of critical sections); later ones are ignored."""

    def __init__(self) -> None:
        self.signum = 0
        self.deferring = False

    def handler(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        if self.signum:
            return  # already stopping: a second Ctrl-C must not cut the cleanup short
        self.signum = signum
        if not self.deferring:
            raise _Stop(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Defer a stop to the end of the block: a worker is started *and* registered, or reaped *and* recorded."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.signum:
            raise _Stop(self.signum)


@contextlib.contextmanager
def _signals() -> Iterator[_SignalGuard]:
    """Install the guard's handler for SIGINT and SIGTERM (main thread only) and restore the old ones after."""
    guard = _SignalGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = {s: signal.signal(s, guard.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield guard
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _outdir_lock(state: Path, outdir: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUTDIR for the batch; a second batch into it waits (and says so)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    with open(state / "lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            print(f"another onnxq batch (pid {holder}) is writing into {outdir}; waiting for it to finish", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_temps(job: BatchJob) -> None:
    """Remove the ``.NAME.onnx.*.tmp`` files that a stopped or killed writer of this job's output left."""
    for tmp in job.output.parent.glob(f".{glob.escape(job.output.name)}.*.tmp"):
        tmp.unlink(missing_ok=True)


def _remove_stale(jobs: list[BatchJob], state: Path, outdir: Path) -> None:
    """Remove what a killed earlier run left: worker temp files, job/status/stderr files, our own temp files."""
    for job in jobs:
        _remove_temps(job)
    for pattern in ("*.job.json", "*.status.json", "*.stderr.txt", ".*.tmp"):
        for p in state.glob(pattern):
            p.unlink(missing_ok=True)
    for p in outdir.glob(f".{_SUMMARY}.*.tmp"):
        p.unlink(missing_ok=True)


def _stop_workers(running: dict[str, _Running], grace: float = _GRACE_S) -> None:
    """SIGTERM every running worker, SIGKILL those still alive after ``grace`` seconds, and reap them all."""
    for r in running.values():
        if r.proc.poll() is None:
            with contextlib.suppress(OSError):
                r.proc.terminate()
    deadline = time.monotonic() + grace
    for r in running.values():
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                r.proc.kill()
            r.proc.wait()


def _collect(r: _Running, stopped_by: int = 0) -> JobOutcome:
    """The outcome of a finished (or stopped) worker; removes its temp, job, status and stderr files."""
    status = _read_status(r.status)
    try:
        err = r.stderr.read_text(errors="replace").strip()
    except OSError:
        err = ""
    code = r.proc.returncode
    if stopped_by and status.get("status") == "converted":
        code = 0  # it finished, then the stop's SIGTERM reached it on its way out
    out = _finish(r.job, code, status, err, time.monotonic() - r.started)
    if stopped_by and out.status != "converted":
        out.status = "interrupted"
        written = _stat_key(r.job.output) != r.before
        out.reason = (f"stopped by {_SIGNAL_NAMES.get(stopped_by, stopped_by)} after writing {r.job.output} but before "
                      "recording it; the next run converts it again" if written else
                      f"stopped by {_SIGNAL_NAMES.get(stopped_by, stopped_by)}; no output was written")  # fmt: skip
    if out.status != "converted":
        _remove_temps(r.job)
    for p in (r.spec, r.status, r.stderr):
        p.unlink(missing_ok=True)
    return out


def run_batch(jobs: list[BatchJob], outdir: Path, *, workers: int = 1, live: bool = True) -> list[JobOutcome]:
    """Run the jobs with up to ``workers`` processes; returns one outcome per job, in job order.

    Raises:
        BatchInterrupted: SIGINT or SIGTERM arrived; every worker is stopped and reaped, temp files are
            removed and ``batch-summary.json`` is written before it is raised.
    """
    if outdir.exists() and not outdir.is_dir():
        raise OnnxqError(f"output folder {outdir} exists and is not a folder; choose another -o")
    _check_outputs(jobs, outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    state = outdir / _STATE_DIR
    state.mkdir(exist_ok=True)
    with _signals() as guard:
        try:
            with _outdir_lock(state, outdir):
                _remove_stale(jobs, state, outdir)
                return _run_locked(jobs, outdir, state, workers, live, guard)
        except _Stop as stop:  # before any worker started (waiting for the lock, hashing the inputs)
            reason = f"not started: the batch was stopped by {_SIGNAL_NAMES.get(stop.signum, stop.signum)}"
            result = [JobOutcome(j.name, str(j.model), str(j.output), "interrupted", reason) for j in jobs]
            raise BatchInterrupted(stop.signum, result, outdir / _SUMMARY) from None


def _run_locked(jobs: list[BatchJob], outdir: Path, state: Path, workers: int, live: bool,
                guard: _SignalGuard) -> list[JobOutcome]:  # fmt: skip
    """run_batch with OUTDIR locked: on a stop, the workers are stopped, collected and summarised."""
    outcomes: dict[str, JobOutcome] = {}
    running: dict[str, _Running] = {}
    try:
        _run(jobs, state, workers, live, guard, outcomes, running)
    except _Stop as stop:
        _stop_workers(running)
        for name, r in running.items():
            outcomes[name] = _collect(r, stopped_by=stop.signum)
        running.clear()
        if not outcomes:
            raise  # nothing started: run_batch reports every model as not started
        reason = f"not started: the batch was stopped by {_SIGNAL_NAMES.get(stop.signum, stop.signum)}"
        for j in jobs:
            outcomes.setdefault(j.name, JobOutcome(j.name, str(j.model), str(j.output), "interrupted", reason))
        raise BatchInterrupted(stop.signum, _write_summary(jobs, outcomes, outdir), outdir / _SUMMARY) from None
    finally:
        _stop_workers(running)  # empty after a normal end; an unexpected error must not orphan workers
        for r in running.values():
            _remove_temps(r.job)
    return _write_summary(jobs, outcomes, outdir)


def _write_summary(jobs: list[BatchJob], outcomes: dict[str, JobOutcome], outdir: Path) -> list[JobOutcome]:
    result = [outcomes[j.name] for j in jobs]
    _atomic_write(outdir / _SUMMARY, json.dumps([dataclasses.asdict(o) for o in result], indent=2) + "\n")
    return result


def _run(jobs: list[BatchJob], state: Path, workers: int, live: bool, guard: _SignalGuard,
         outcomes: dict[str, JobOutcome], running: dict[str, _Running]) -> None:  # fmt: skip
    """The batch proper: skip what is up to date, run the rest with up to ``workers`` workers."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    stages: dict[str, str] = {j.name: "queued" for j in jobs}
    notes: dict[str, str] = {}
    pending: list[tuple[BatchJob, str]] = []
    for job in jobs:
        if job.refused:
            outcomes[job.name] = JobOutcome(job.name, str(job.model), str(job.output), "failed", job.refused)
            stages[job.name] = "failed (refused)"
            continue
        fp = job.fingerprint()
        fresh, notes[job.name] = _resume_check(job, fp)
        if fresh:
            outcomes[job.name] = JobOutcome(job.name, str(job.model), str(job.output), "skipped",
                                            "up to date (same input, recipe and calibration; output verified)")  # fmt: skip
            stages[job.name] = "skipped (up to date)"
        else:
            pending.append((job, fp))
    # each worker's ONNX Runtime sessions get their share of the cores instead of all of them
    threads = int(os.environ.get("ONNXQ_THREADS", "0") or 0) or max(1, (os.cpu_count() or 1) // max(1, workers))

    def table() -> Table:
        t = Table(title=f"onnxq batch: {len(jobs)} models, {workers} workers", header_style="bold")
        t.add_column("model")
        t.add_column("stage")
        for j in jobs:
            extra = f" ({time.monotonic() - running[j.name].started:.0f} s)" if j.name in running else ""
            t.add_row(markup_safe(j.name), markup_safe(stages[j.name] + extra))
        return t

    console = Console(stderr=True)
    view = Live(table(), console=console, refresh_per_second=4, transient=False) if live else contextlib.nullcontext()
    with view:
        while pending or running:
            with guard.critical():  # a stop lands in the sleep below, never between a step and its record
                _step(state, workers, threads, pending, running, outcomes, stages, notes)
            if live:
                view.update(table())  # type: ignore[union-attr]
            time.sleep(0.1)
        if live:
            view.update(table())  # type: ignore[union-attr]


def _step(state: Path, workers: int, threads: int, pending: list[tuple[BatchJob, str]], running: dict[str, _Running],
          outcomes: dict[str, JobOutcome], stages: dict[str, str], notes: dict[str, str]) -> None:  # fmt: skip
    """One turn of the batch loop: start workers up to ``workers``, record those that ended."""
    while pending and len(running) < max(1, workers):
        job, fp = pending.pop(0)
        running[job.name] = _launch(job, fp, state, threads)
        stages[job.name] = "starting"
    for name, r in list(running.items()):
        st = _read_status(r.status)
        if st.get("stage"):
            stages[name] = st["stage"]
        if r.proc.poll() is None:
            continue
        del running[name]
        out = outcomes[name] = _collect(r)
        if out.status == "converted" and notes.get(name):
            out.reason = notes[name]
        stages[name] = out.status if not out.reason else f"{out.status}: {out.reason}"


def _finish(job: BatchJob, code: int, status: dict[str, Any], stderr: str, seconds: float) -> JobOutcome:
    out = JobOutcome(job.name, str(job.model), str(job.output), "failed", seconds=round(seconds, 2))
    if code == 0 and status.get("status") == "converted":
        out.status = "converted"
        out.input_bytes = int(status.get("input_bytes", 0))
        out.output_bytes = int(status.get("output_bytes", 0))
        out.warnings = [str(w) for w in status.get("warnings", [])]
    elif status.get("reason"):
        out.reason = status["reason"]
    elif code < 0:
        out.reason = f"worker killed by signal {-code}" + (" (out of memory?)" if -code == 9 else "")
    else:
        last = stderr.splitlines()[-1] if stderr else "no message"
        out.reason = f"worker exited with code {code}: {last}"
    return out


def _die_with_parent() -> None:
    """Make this worker stop when the batch process that started it goes away, even by SIGKILL.

    SIGTERM raises SystemExit, so the code being interrupted (save_model's temp files) cleans up. On
    Linux the kernel sends SIGTERM when the parent dies (PR_SET_PDEATHSIG); a thread also watches
    ``getppid()`` (other platforms, and the race before prctl took effect).
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parent = int(os.environ.get("ONNXQ_BATCH_PARENT", "0") or 0)
    if not parent:
        return
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sys.exit(128 + signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="onnxq-parent-watch", daemon=True).start()


def _worker(spec_path: str, status_path: str) -> int:
    """Convert one model; report stages and the outcome in ``status_path`` (JSON, rewritten atomically)."""
    status = Path(status_path)

    def write(doc: dict[str, Any]) -> None:
        _atomic_write(status, json.dumps({**doc, "pid": os.getpid()}))

    try:
        from onnxq.quantization import CalibrationOptions, quantize_file

        write({"stage": "starting"})
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
        output = Path(spec["output"])
        marker = output.parent / _STATE_DIR / f"{output.stem}.done.json"
        _atomic_write(marker, json.dumps(_record(output, spec["fingerprint"])))
        warnings = (result.report.info.get("calibration") or {}).get("warnings", [])
        write({"status": "converted", "stage": "done", "input_bytes": size.get("input_bytes", 0),
               "output_bytes": size.get("output_bytes", 0), "warnings": warnings})  # fmt: skip
        return 0
    except OnnxqError as exc:
        write({"status": "failed", "reason": " ".join(str(exc).split())})
        return 1
    except MemoryError:
        write({"status": "failed", "reason": "out of memory"})
        return 1
    except (KeyboardInterrupt, SystemExit) as exc:
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 128 + signal.SIGINT
        write({"status": "failed", "reason": f"stopped by signal {code - 128}"})
        return code
    except Exception as exc:  # noqa: BLE001 - one line for the summary, whatever went wrong
        write({"status": "failed", "reason": f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"})
        return 1


if __name__ == "__main__":  # the worker entry point
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _die_with_parent()
        sys.exit(_worker(sys.argv[2], sys.argv[3]))
    print("usage: python -m onnxq.batch --worker JOB.json STATUS.json (run by `onnxq batch`)", file=sys.stderr)
    sys.exit(2)
