"""Calibration engine benchmark: onnxq's observers vs onnxruntime's calibrators, one run, same images.

Measures the calibration issue's three acceptance criteria (MobileNetV2 and SqueezeNet 1.1, the
ImageNet images in ``../shared/assets``, preprocess ``torch``). Every quantization runs in its own
subprocess under ``/usr/bin/time`` (wall time and peak RSS of that process, ``run_measured``):

1. memory: peak RSS of ``onnxq quantize MODEL --calibrator entropy|percentile --calib-size N`` at N = 32
   and 500, beside onnxruntime ``quantize_static`` with ``CalibrationMethod.Entropy`` / ``Percentile`` at
   32 and 128 images. ORT at 500 is never run (it grows linearly, ~30 GB): its figure is extrapolated
   from the 32 and 128 runs. The ORT children watch their own RSS and stop themselves past
   ``--ort-rss-limit-gb`` (recorded as such);
2. speed at 128 images: whole ``onnxq quantize`` wall time and the calibration seconds it reports
   (``info.calibration.seconds``), for every observer, against ORT's MinMax / Entropy / Percentile
   (whole ``quantize_static`` wall time, and the calibrator's own seconds: create + collect + compute);
3. accuracy: top-1 and top-1 agreement with the float model on the 500 images for every observer with
   the default w8a8 preset (MSE weight ranges, the auto-detected target profile), 128 calibration images.

Usage:
    python benchmarks/bench_calibration.py [--repeat 3] [--write]
    python benchmarks/bench_calibration.py --skip-ort --skip-memory --models mnv2   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness
from _common import IMAGENET, image_list, load_images, make_session, predict  # noqa: E402
from _harness import (CPU_FLAGS, RESULTS_MD, VERSIONS, environment, fmt, ort_static_on_images,
                      parse_args_or_run_ort_child, ratio)
from bench_cnn import MODELS  # noqa: E402

OBSERVERS = ["minmax", "ema-minmax", "percentile", "mse", "entropy", "mse-percentile"]
ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
ORT_SETTING = {"per_channel": True, "activation_type": "QUInt8", "weight_type": "QInt8"}  # quantize_static keywords


@dataclass
class Run:
    """One quantization: who, how, and what it cost."""

    tool: str  # "onnxq" or "ort"
    model: str
    method: str
    n: int
    out: Path
    wall: float | None = None
    rss_mb: float | None = None
    calib_s: float | None = None
    error: str | None = None
    walls: list[float] = field(default_factory=list)
    calibs: list[float] = field(default_factory=list)
    top1: float | None = None
    agree: float | None = None


def log(msg: str) -> None:
    print(f"[calib-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


WAITS: list[float] = []


def wait_idle(enabled: bool, max_busy: float = 0.15, quiet_s: int = 3, timeout: float = 300.0) -> None:
    """Before a timed run: wait until the whole machine's CPU use (from /proc/stat) stays under
    ``max_busy`` for ``quiet_s`` one-second windows (other people's jobs finish), at most ``timeout`` s."""
    if not enabled:
        return

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)

    t0, quiet = time.perf_counter(), 0
    try:
        prev = sample()
    except OSError:
        return
    while time.perf_counter() - t0 < timeout and quiet < quiet_s:
        time.sleep(1.0)
        cur = sample()
        busy = 1 - (cur[0] - prev[0]) / max(1, cur[1] - prev[1])
        prev = cur
        quiet = quiet + 1 if busy < max_busy else 0
    waited = time.perf_counter() - t0
    WAITS.append(waited if quiet >= quiet_s else -waited)


# --------------------------------------------------------------------------- quantizers (subprocesses)


def quantize_onnxq(run: Run, workdir: Path, idle: bool = True) -> None:
    wait_idle(idle)
    spec = MODELS[run.model]
    report = workdir / f"report_{run.out.stem}"
    done = harness.quantize_onnxq([str(spec.path), "-o", str(run.out), "--preset", "w8a8", "--calib", str(IMAGENET),
                                   "--calib-preprocess", spec.preprocess, "--calib-size", str(run.n),
                                   "--calibrator", run.method, "--report", str(report), "--no-progress"])
    if not done.succeeded(run.out):
        run.error = done.failure("onnxq")
        return
    wall, rss = done.wall_s, done.peak_rss_mb
    info = json.loads((report / "report.json").read_text())["info"]
    run.walls.append(wall)
    run.calibs.append(float(info["calibration"]["seconds"]))
    run.rss_mb = max(run.rss_mb or 0.0, rss)
    run.wall, run.calib_s = statistics.median(run.walls), statistics.median(run.calibs)


def quantize_ort(run: Run, limit_gb: float, idle: bool = True) -> None:
    wait_idle(idle)
    spec = MODELS[run.model]
    job = {"model": str(spec.path), "out": str(run.out), "input": spec.input, "preprocess": spec.preprocess,
           "calib_size": run.n, "method": ORT_METHODS[run.method], "rss_limit_mb": limit_gb * 1024,
           "kwargs": ORT_SETTING}
    done = harness.quantize_ort_child(__file__, job)
    wall, rss, err = done.wall_s, done.peak_rss_mb, done.stderr
    run.rss_mb = max(run.rss_mb or 0.0, rss)
    marks = [ln for ln in err.splitlines() if ln.startswith("ORT_CALIB_SECONDS ")]
    if "RSS_WATCHDOG" in err:
        run.error = f"stopped by the RSS watchdog at {limit_gb:g} GB after {wall:.0f} s"
        run.wall = wall
        return
    if not done.succeeded(run.out):
        run.error = done.failure("ort", "exit")
        return
    run.walls.append(wall)
    if marks:
        run.calibs.append(float(marks[-1].split()[1]))
    run.wall = statistics.median(run.walls)
    run.calib_s = statistics.median(run.calibs) if run.calibs else None


def _rss_watchdog(limit_mb: float) -> None:
    """Child-side: exit at once when this process's resident set passes ``limit_mb``."""

    def watch() -> None:
        while True:
            try:
                with open("/proc/self/status") as f:
                    rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024
            except (OSError, StopIteration):
                return
            if rss > limit_mb:
                print(f"RSS_WATCHDOG {rss:.0f} MB > {limit_mb:.0f} MB", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def _ort_child(job: dict) -> None:
    """Child body: quantize_static (QDQ, U8 activations / S8 per-channel weights) with one calibrator, which
    prints its own seconds (create_calibrator + collect_data + compute_data) as ``ORT_CALIB_SECONDS s``."""
    import importlib

    _rss_watchdog(job["rss_limit_mb"])
    qmod = importlib.import_module("onnxruntime.quantization.quantize")
    made = qmod.create_calibrator
    clock: dict[str, float] = {}

    def timed_calibrator(*a, **kw):  # calibration = create + collect_data + compute_data
        clock["t0"] = time.perf_counter()
        cal = made(*a, **kw)
        compute = cal.compute_data

        def compute_data(*ca, **ckw):
            out = compute(*ca, **ckw)
            print(f"ORT_CALIB_SECONDS {time.perf_counter() - clock['t0']:.2f}", file=sys.stderr, flush=True)
            return out

        cal.compute_data = compute_data
        return cal

    qmod.create_calibrator = timed_calibrator
    ort_static_on_images(job)


# --------------------------------------------------------------------------- tables


def _cell(r: Run | None, what: str) -> str:
    if r is None:
        return "not run"
    if r.error:
        return r.error
    return fmt(getattr(r, what), "{:.0f}" if what == "rss_mb" else "{:.1f}")


def memory_table(runs: dict, sizes: list[int], ort_sizes: list[int], target_n: int) -> tuple[str, list[str]]:
    head = ["quantizer", "calibrator"] + [f"RSS MB @ {n}" for n in sorted(set(sizes) | set(ort_sizes))] + \
        [f"wall s @ {n}" for n in sorted(set(sizes) | set(ort_sizes))] + ["RSS change / verdict"]
    cols = sorted(set(sizes) | set(ort_sizes))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    verdicts = []
    for tool in ("onnxq", "ort"):
        for method in ("entropy", "percentile"):
            row = [tool if tool == "onnxq" else "onnxruntime", method]
            got = {n: runs.get((tool, "mnv2", method, n)) for n in cols}
            row += [_cell(got[n], "rss_mb") for n in cols]
            row += [_cell(got[n], "wall") for n in cols]
            ok = [n for n in cols if got[n] is not None and not got[n].error and got[n].rss_mb]
            note = ""
            if tool == "onnxq" and len(ok) >= 2:
                lo, hi = got[min(ok)].rss_mb, got[max(ok)].rss_mb
                change = (hi - lo) / lo * 100
                met = abs(change) < 10 and max(g.rss_mb for n, g in got.items() if n in ok) < 1024
                note = f"{change:+.1f}% from {min(ok)} to {max(ok)} images; {'MET' if met else 'NOT met'} (<10%, <1 GB)"
                verdicts.append(f"Memory, onnxq {method}: {note}.")
            elif tool == "ort" and len(ok) >= 2:
                a, b = min(ok), max(ok)
                slope = (got[b].rss_mb - got[a].rss_mb) / (b - a)
                est = got[b].rss_mb + slope * (target_n - b)
                note = f"{slope:.0f} MB per image; {target_n} images ~{est / 1024:.1f} GB (extrapolated, not run)"
                verdicts.append(f"Memory, onnxruntime {method}: {note}.")
            row.append(note or "")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), verdicts


def speed_table(runs: dict, n: int) -> tuple[str, list[str]]:
    head = ["quantizer", "calibrator", "quantize wall s", "calibration s", "wall / onnxq minmax",
            "calib / onnxq minmax", "ORT same method / onnxq (wall, calib)", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = runs.get(("onnxq", "mnv2", "minmax", n))
    verdicts = []

    for tool in ("onnxq", "ort"):
        for method in (OBSERVERS if tool == "onnxq" else list(ORT_METHODS)):
            r = runs.get((tool, "mnv2", method, n))
            if r is None:
                continue
            name = "onnxq" if tool == "onnxq" else "onnxruntime"
            if r.error:
                lines.append(f"| {name} | {method} | {r.error} |" + " |" * (len(head) - 3))
                continue
            ok_base = base is not None and not base.error
            other = runs.get(("ort", "mnv2", method, n)) if tool == "onnxq" else None
            ort_vs = ""
            if other is not None and not other.error:
                ort_vs = f"{fmt(ratio(other.wall, r.wall), '{:.1f}x')}, {fmt(ratio(other.calib_s, r.calib_s), '{:.1f}x')}"
            reps = f" (median of {len(r.walls)})" if len(r.walls) > 1 else ""
            lines.append("| " + " | ".join([
                name, method, fmt(r.wall, "{:.2f}") + reps, fmt(r.calib_s, "{:.2f}"),
                fmt(ratio(r.wall, base.wall) if ok_base else None, "{:.2f}x"),
                fmt(ratio(r.calib_s, base.calib_s) if ok_base else None, "{:.2f}x"),
                ort_vs, fmt(r.rss_mb, "{:.0f}")]) + " |")
    e, o = runs.get(("onnxq", "mnv2", "entropy", n)), runs.get(("ort", "mnv2", "entropy", n))
    if e is not None and not e.error:
        if o is not None and not o.error:
            sw, sc = o.wall / e.wall, (o.calib_s / e.calib_s if o.calib_s and e.calib_s else None)
            verdicts.append(f"Speed vs onnxruntime Entropy ({n} images): onnxq entropy is {sw:.1f}x faster in "
                            f"wall time, {fmt(sc, '{:.1f}x')} in calibration seconds; "
                            f"{'MET' if sw >= 3 else 'NOT met'} (>= 3x).")
        if base is not None and not base.error:
            rw, rc = e.wall / base.wall, e.calib_s / base.calib_s if base.calib_s else None
            verdicts.append(f"Speed vs onnxq minmax ({n} images): entropy takes {rw:.2f}x the whole quantize wall "
                            f"time ({'MET' if rw <= 1.5 else 'NOT met'}, <= 1.5x) and {fmt(rc, '{:.2f}x')} the "
                            f"calibration seconds ({'MET' if rc is not None and rc <= 1.5 else 'NOT met'}).")
    return "\n".join(lines), verdicts


def accuracy_table(runs: dict, floats: dict, models: list[str], n: int) -> str:
    head = ["model", "calibrator", "top-1 %", "agree with fp32 %", "quantize s", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        lines.append(f"| {m} | float | {fmt(floats.get(m))} | 100.0 | | |")
        for method in OBSERVERS:
            r = runs.get(("onnxq", m, method, n))
            if r is None:
                continue
            if r.error:
                lines.append(f"| {m} | {method} | {r.error} | | | |")
                continue
            lines.append(f"| {m} | {method} | {fmt(r.top1)} | {fmt(r.agree)} | {fmt(r.wall, '{:.2f}')} | "
                         f"{fmt(r.rss_mb, '{:.0f}')} |")
    return "\n".join(lines)


def write_results(sections: list[tuple[str, str]], env: dict, args_line: str, notes: list[str]) -> None:
    """Append a dated section to benchmarks/RESULTS.md: machine (with FMA), versions (with numpy), notes, sections."""
    flags = (CPU_FLAGS[0], ("FMA", "fma"), *CPU_FLAGS[1:])
    versions = (*VERSIONS[:2], ("numpy", "numpy"), VERSIONS[2])
    blocks = [f"### {title}\n\n{body}" for title, body in sections]
    harness.append_results(harness.results_section("bench_calibration.py", env, args_line, notes, blocks, flags, versions))


# --------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description="onnxq calibration engine vs onnxruntime calibrators")
    ap.add_argument("--models", default="mnv2,squeezenet", help="accuracy models (mnv2, squeezenet)")
    ap.add_argument("--memory-sizes", default="32,500", help="onnxq calibration sizes for the memory check")
    ap.add_argument("--ort-sizes", default="32,128", help="ORT Entropy/Percentile calibration sizes")
    ap.add_argument("--calib-size", type=int, default=128, help="calibration images for speed and accuracy")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each MobileNetV2 speed quantization (median)")
    ap.add_argument("--ort-rss-limit-gb", type=float, default=14.0, help="stop an ORT child past this RSS")
    ap.add_argument("--skip-ort", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true", help="time only (no evaluation)")
    ap.add_argument("--no-wait-idle", dest="wait_idle", action="store_false",
                    help="do not wait for the machine to be idle before each timed run")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--write", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = parse_args_or_run_ort_child(ap, argv, _ort_child)
    if args is None:  # the --_ort-child run is done
        return

    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in ("mnv2", "squeezenet"):
            ap.error(f"unknown model {m}")
    n = args.calib_size
    mem_sizes = [int(v) for v in args.memory_sizes.split(",") if v]
    ort_sizes = [int(v) for v in args.ort_sizes.split(",") if v]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="onnxq_calib_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    runs: dict[tuple[str, str, str, int], Run] = {}

    def new(tool, model, method, size):
        r = Run(tool, model, method, size, workdir / f"{tool}_{model}_{method}_{size}.onnx")
        runs[(tool, model, method, size)] = r
        return r

    # 2 + 3: every observer at n images (MobileNetV2 repeated for timing), interleaved so that a burst of
    # background load does not land on one calibrator only
    speed = [new("onnxq", "mnv2", m, n) for m in OBSERVERS]  # always MobileNetV2: the criteria are on it
    for rep in range(max(1, args.repeat)):
        for r in speed:
            log(f"onnxq mnv2 {r.method} n={n} (run {rep + 1}/{args.repeat})")
            quantize_onnxq(r, workdir, args.wait_idle)
            log(f"  -> {r.error or f'wall {r.walls[-1]:.2f}s calib {r.calibs[-1]:.2f}s rss {r.rss_mb:.0f}MB'}")
    for m in models:
        if m == "mnv2":
            continue
        for method in OBSERVERS:
            r = new("onnxq", m, method, n)
            log(f"onnxq {m} {method} n={n}")
            quantize_onnxq(r, workdir, args.wait_idle)
    # 1: memory
    if not args.skip_memory:
        for method in ("entropy", "percentile"):
            for size in mem_sizes:
                if (r := runs.get(("onnxq", "mnv2", method, size))) is None:
                    r = new("onnxq", "mnv2", method, size)
                    log(f"onnxq mnv2 {method} n={size} (memory)")
                    quantize_onnxq(r, workdir, args.wait_idle)
                log(f"  -> {r.error or f'rss {r.rss_mb:.0f}MB wall {r.wall:.1f}s'}")
    if not args.skip_ort:
        for method in ORT_METHODS:
            for size in sorted(set(ort_sizes + [n]) if method != "minmax" else [n]):
                r = new("ort", "mnv2", method, size)
                log(f"onnxruntime mnv2 {ORT_METHODS[method]} n={size}")
                quantize_ort(r, args.ort_rss_limit_gb, args.wait_idle)
                log(f"  -> {r.error or f'wall {r.wall:.1f}s calib {fmt(r.calib_s)}s rss {r.rss_mb:.0f}MB'}")
    load_mid = os.getloadavg()
    # 3: accuracy on the 500 images
    floats: dict[str, float] = {}
    if not args.skip_accuracy:
        for m in models:
            spec = MODELS[m]
            x, y, _ = load_images(spec.preprocess, dtype=spec.dtype)
            ref = predict(make_session(spec.path), x)
            floats[m] = 100.0 * float((ref == y).mean())
            for method in OBSERVERS:
                r = runs.get(("onnxq", m, method, n))
                if r is None or r.error:
                    continue
                pred = predict(make_session(r.out), x)
                r.top1 = 100.0 * float((pred == y).mean())
                r.agree = 100.0 * float((pred == ref).mean())
                log(f"{m} {method}: top-1 {r.top1:.1f} agree {r.agree:.1f}")

    env = environment()
    mem_md, mem_v = memory_table(runs, mem_sizes, ort_sizes if not args.skip_ort else [], 500)
    speed_md, speed_v = speed_table(runs, n)
    sections = []
    if not args.skip_memory:
        sections.append(("1. Memory: MobileNetV2, peak RSS of the whole quantize process", mem_md))
    sections.append((f"2. Speed: MobileNetV2, {n} calibration images", speed_md))
    if not args.skip_accuracy:
        sections.append((f"3. Accuracy: top-1 on the 500 images, {n} calibration images, w8a8 defaults",
                         accuracy_table(runs, floats, models, n)))
    verdicts = mem_v + speed_v
    notes = [
        f"Calibration images: N evenly spaced over the sorted list of {IMAGENET.name}/ ({len(image_list())} images; "
        "index i * 500 // N), the same files for onnxq and onnxruntime (which reads and preprocesses them "
        "itself, as onnxq does).",
        "onnxq: `onnxq quantize MODEL -o OUT --preset w8a8 --calib IMAGES --calib-preprocess torch --calib-size N "
        "--calibrator C --report DIR`; calibration seconds are the report's info.calibration.seconds (what "
        "--json prints). onnxruntime: quantize_static, QDQ, U8 activations / S8 per-channel weights, "
        "CalibrationMethod.C; its calibration seconds cover create_calibrator + collect_data + compute_data.",
        "Each quantization ran in its own subprocess; wall time and peak RSS (/usr/bin/time %M) of that process.",
        f"Load average (1/5/15 min) at start {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f}, after the "
        f"timed runs {load_mid[0]:.1f}/{load_mid[1]:.1f}/{load_mid[2]:.1f}, on {os.cpu_count()} cores "
        "(timings are only trustworthy when these stay below ~1).",
        f"Total benchmark time {time.perf_counter() - t_start:.0f} s."
        + (f" Before each timed run the benchmark waited for the machine to be idle (<15% CPU for 3 s): "
           f"{sum(1 for w in WAITS if w >= 0)} of {len(WAITS)} runs found it so (median wait "
           f"{statistics.median(abs(w) for w in WAITS):.0f} s)"
           + ("." if all(w >= 0 for w in WAITS) else "; the others started after 300 s regardless.")
           if WAITS else ""),
    ]
    print(f"\n{env['cpu']}, {env['cores']} cores, AVX2 {env['avx2']}, VNNI {env['vnni']}; onnxruntime "
          f"{env['onnxruntime']}, numpy {env['numpy']}\n")
    for title, body in sections:
        print(f"### {title}\n\n{body}\n")
    for v in verdicts:
        print(f"- {v}")
    for note in notes:
        print(f"- {note}")
    if args.write:
        write_results(sections + [("Acceptance", "\n".join(f"- {v}" for v in verdicts))], env,
                      " ".join(argv if argv is not None else sys.argv[1:]), notes)
        print(f"\nappended to {RESULTS_MD}")


if __name__ == "__main__":
    main()
