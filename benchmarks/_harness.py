"""How the benchmark scripts run and record a quantizer: measured child processes, the onnxq CLI and
onnxruntime child runs, calibration readers for onnxruntime, round-robin latency, the RESULTS.md writer.

``_common.py`` holds the data side (asset paths, images, ORT sessions, top-1, CPU flags); this module the
machinery every ``bench_*.py`` used to carry its own copy of. Nothing here is part of the onnxq package;
benchmarks import it as a sibling module. onnxruntime.quantization is imported only inside the functions
that quantize, so that importing this module stays cheap in the parent processes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
from _common import REPO_ROOT, calibration_indices, cpu_info, get_load_image, image_list

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
ORT_CHILD_FLAG = "--_ort-child"  # hidden option: the script re-run as the onnxruntime child process

Feed = dict[str, np.ndarray]
K = TypeVar("K")


# --------------------------------------------------------------------------- measured child processes


class Measured(NamedTuple):
    """One child process run by ``run_measured``: exit code, wall seconds, peak RSS (MB), its stderr."""

    returncode: int
    wall_s: float
    peak_rss_mb: float
    stderr: str

    def succeeded(self, out: Path) -> bool:
        """True when the child exited 0 and wrote ``out`` (a quantizer that exits 0 but writes nothing failed)."""
        return self.returncode == 0 and out.exists()

    def failure(self, tool: str, code_label: str | None = None) -> str:
        """``'<tool> failed: <last stderr line>'``, with ``(<code_label> <exit code>)`` after 'failed' if given."""
        code = f" ({code_label} {self.returncode})" if code_label else ""
        return f"{tool} failed{code}: {last_line(self.stderr)}"


def _vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set (VmHWM) of a live process, from /proc; None when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def run_measured(cmd: list[str], env: dict | None = None, timeout: float = 3600) -> Measured:
    """Run ``cmd`` as a child in the repository root; return its exit code, wall seconds, peak RSS MB, stderr.

    Peak RSS: not ``ru_maxrss`` of a direct child, because Linux carries the *parent's* high-water mark
    across fork+exec (a child of this benchmark, which holds 300 MB of images, would never report less).
    ``/usr/bin/time -f %M`` (a small intermediate process) gives the true figure; without it, the
    child's VmHWM is polled from /proc (may miss growth in its last 50 ms). A child still running after
    ``timeout`` seconds is killed.
    """
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile(suffix=".rss") as rssf:
        full = [timer, "-f", "%M", "-o", rssf.name] + cmd if timer else cmd
        t = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=str(REPO_ROOT))
        polled = 0.0
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            while proc.poll() is None:
                if not timer:
                    polled = max(polled, _vm_hwm_mb(proc.pid) or 0.0)
                if time.perf_counter() - t > timeout:
                    proc.kill()
                    proc.wait()
                    break
                time.sleep(0.05)
        wall = time.perf_counter() - t
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        rss = polled
        if timer:
            try:
                rss = int(Path(rssf.name).read_text().split()[-1]) / 1024.0
            except (ValueError, IndexError, OSError):
                rss = float("nan")
    return Measured(proc.returncode, wall, rss, stderr)


def last_line(text: str) -> str:
    """The last non-blank line of ``text`` (at most 200 characters): the one-line reason a child failed."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(no stderr)"


# --------------------------------------------------------------------------- the two quantizers


def onnxq_command() -> list[str]:
    """The onnxq CLI: the installed entry point, else ``python -m onnxq.cli``."""
    exe = shutil.which("onnxq")
    return [exe] if exe else [sys.executable, "-m", "onnxq.cli"]


def quantize_onnxq(args: Sequence[str], timeout: float = 3600) -> Measured:
    """``onnxq quantize ARGS`` in its own measured process (``args`` start with the model path)."""
    return run_measured(onnxq_command() + ["quantize", *args], timeout=timeout)


def quantize_ort_child(script: str | Path, job: Mapping[str, Any], timeout: float = 3600) -> Measured:
    """Re-run ``script`` as its own onnxruntime child (``--_ort-child JOB``) in a measured process.

    The child quantizes with onnxruntime.quantization in a fresh interpreter, so its wall time and peak RSS
    are onnxruntime's alone; ``job`` (JSON-able) tells it what to do, ``ort_child_job`` reads it back.
    """
    cmd = [sys.executable, str(Path(script).resolve()), ORT_CHILD_FLAG, json.dumps(job)]
    return run_measured(cmd, timeout=timeout)


def parse_args_or_run_ort_child(ap: argparse.ArgumentParser, argv: Sequence[str] | None,
                                child: Callable[[dict], object]) -> argparse.Namespace | None:
    """Parse the script's options plus the hidden ``--_ort-child JOB`` through which ``quantize_ort_child``
    starts it. In such a child run, call ``child(job)`` and return None; else return the options."""
    ap.add_argument(ORT_CHILD_FLAG, dest="ort_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ort_child:
        child(json.loads(args.ort_child))
        return None
    return args


# --------------------------------------------------------------------------- calibration data for onnxruntime


class FeedReader:
    """An onnxruntime ``CalibrationDataReader`` over a sequence of feeds (one ``{input name: array}`` each).

    Index-based, so onnxruntime can deepcopy it (GPTQ, SmoothQuant) and iterate it; ``rewind`` starts over.
    It does not subclass ORT's class, which accepts any class with ``get_next`` (its ``__subclasshook__``),
    so that this module does not import onnxruntime.quantization. ``feeds`` may be lazy (``ImageFeeds``).
    """

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self.feeds, self.i = feeds, 0

    def get_next(self) -> Feed | None:
        """The next feed, or None after the last (ORT's protocol)."""
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self) -> None:
        """Start again from the first feed."""
        self.i = 0

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self) -> Iterator[Feed]:
        return self

    def __next__(self) -> Feed:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


class ImageFeeds(Sequence[Feed]):
    """Feeds of image files, each read and preprocessed from disk when asked for (as onnxq's image source
    does), so that an onnxruntime child's time and memory include reading the images."""

    def __init__(self, files: Sequence[Path], input_name: str, preprocess: str, dtype: str = "float32") -> None:
        self.files, self.input_name, self.preprocess, self.dtype = list(files), input_name, preprocess, np.dtype(dtype)
        self.load_image = get_load_image()[0]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Feed:  # type: ignore[override]  # no slices needed
        return {self.input_name: self.load_image(str(self.files[i]), preprocess=self.preprocess, dtype=self.dtype)}


def calibration_files(n: int) -> list[Path]:
    """The ``n`` calibration images: evenly spaced over the sorted image list, what onnxq's image source picks."""
    files = [p for p, _ in image_list()]
    return [files[i] for i in calibration_indices(len(files), n)]


def ort_static_on_images(job: Mapping[str, Any]) -> None:
    """ORT child body: ``quantize_static`` (QDQ) of ``job['model']`` calibrated on ``job['calib_size']`` images.

    ``job``: model, out, input (name), preprocess, dtype (of the input), calib_size, method (a
    ``CalibrationMethod`` name, default MinMax) and kwargs (quantize_static keywords; ``activation_type`` /
    ``weight_type`` as ``QuantType`` names).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    feeds = ImageFeeds(calibration_files(job["calib_size"]), job["input"], job["preprocess"], job.get("dtype", "float32"))
    kw = dict(job.get("kwargs", {}))
    for k in ("activation_type", "weight_type"):
        if k in kw:
            kw[k] = getattr(QuantType, kw[k])
    quantize_static(job["model"], job["out"], FeedReader(feeds), quant_format=QuantFormat.QDQ,
                    calibrate_method=getattr(CalibrationMethod, job.get("method", "MinMax")), **kw)


# --------------------------------------------------------------------------- measuring outputs


def round_robin(calls: Mapping[K, Callable[[], object]], runs: int, warmup: int) -> dict[K, list[float]]:
    """Seconds of ``runs`` timed calls of each entry, taken in turn (one call of each per round).

    Every call is first made ``warmup`` times. Interleaving makes every model see the same machine load: a
    background burst slows all of them alike instead of whichever model happened to be timed then.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[K, list[float]] = {k: [] for k in calls}
    for _ in range(runs):
        for k, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - t0)
    return times


def model_size_mb(path: Path) -> float:
    """Size in MB (10^6 bytes) of a model file plus its ``<file>.data`` external data, if any."""
    extra = Path(str(path) + ".data")
    return (path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)) / 1e6


def fmt(v: float | None, spec: str = "{:.1f}", none: str = "n/a") -> str:
    """A table cell: ``v`` formatted with ``spec``, or ``none`` when there is no value."""
    return none if v is None else spec.format(v)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return None if a is None or b is None or b == 0 else a / b


# --------------------------------------------------------------------------- RESULTS.md


def environment() -> dict[str, Any]:
    """Date, CPU (model, cores, ISA flags that matter for int8 kernels) and versions, for a results section."""
    import onnx
    import onnxruntime

    info = cpu_info()
    return {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": info["model"], "cores": info["cores"],
            "avx2": info["avx2"], "fma": info["fma"], "avx512f": info["avx512f"],
            "vnni": info["avx512_vnni"] or info["avx_vnni"], "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "numpy": np.__version__, "python": sys.version.split()[0]}


# (label in the Machine line, environment key) and (label in the versions line, environment key)
CPU_FLAGS = (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("VNNI", "vnni"))
VERSIONS = (("onnxruntime", "onnxruntime"), ("onnx", "onnx"), ("Python", "python"))


def results_section(script: str, env: Mapping[str, Any], args_line: str, notes: Sequence[str], blocks: Sequence[str],
                    flags: Sequence[tuple[str, str]] = CPU_FLAGS,
                    versions: Sequence[tuple[str, str]] = VERSIONS) -> str:
    """A dated RESULTS.md section: heading, machine and versions, the command, the notes, then ``blocks``."""
    lines = [f"## {env['date']} - {script}\n",
             f"- Machine: {env['cpu']}, {env['cores']} cores; "
             + ", ".join(f"{label} {'yes' if env[k] else 'no'}" for label, k in flags),
             "- " + ", ".join(f"{label} {env[k]}" for label, k in versions),
             f"- Command: `python benchmarks/{script} {args_line}`", *[f"- {n}" for n in notes], "",
             "\n\n".join(blocks)]
    return "\n".join(lines)


def append_results(text: str) -> None:
    """Append ``text`` to benchmarks/RESULTS.md after a blank line (the file is started when missing)."""
    new = not RESULTS_MD.exists()
    with open(RESULTS_MD, "a", encoding="utf-8") as f:
        if new:
            f.write("# Benchmark results\n\nSections are appended by the benchmark scripts' `--write`.\n")
        f.write("\n" + text + "\n")
