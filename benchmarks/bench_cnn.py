"""Side-by-side benchmark: onnxq vs onnxruntime.quantization.quantize_static on ImageNet CNNs.

For each model:

1. quantize it with onnxq's CLI (``onnxq quantize ... --preset w8a8``) and with ORT's
   ``quantize_static`` in several settings, each in its own subprocess so that its wall time and
   peak RSS (``/usr/bin/time -f %M``) are measured on their own;
2. evaluate every output on the 500 images: top-1, top-1 agreement with the float model;
3. measure file size and ORT CPU latency (batch 1 and 8, median of 20 runs after warm-up).

Both quantizers calibrate on the same images: ``--calib-size`` images evenly spaced over the sorted
image list (index ``i * N // k``), which is what onnxq's image-folder source picks.

Usage:
    python benchmarks/bench_cnn.py [--models mnv2,squeezenet,squeezenet-fp16] [--calib-size 128]
                                   [--skip-ort] [--ort-fp16] [--write]

A failing quantizer (for example an onnxq CLI still under construction) is reported in the table
as ``onnxq failed: <last stderr line>`` and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ASSETS, IMAGENET, REPO_ROOT, calibration_indices, cpu_info,  # noqa: E402
                     get_load_image, image_list, load_images, make_session, predict)

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass
class ModelSpec:
    """A benchmark model: file, input name, preprocessing, input dtype."""

    key: str
    title: str
    path: Path
    input: str
    preprocess: str
    dtype: type = np.float32


MODELS = {
    "mnv2": ModelSpec("mnv2", "MobileNetV2 1.0 (fp32)", ASSETS / "cnn/mobilenetv2-7/model.onnx", "input", "torch"),
    "squeezenet": ModelSpec("squeezenet", "SqueezeNet 1.1 (fp32)", ASSETS / "cnn/squeezenet1.1/model.onnx", "data",
                            "torch"),
    "squeezenet-fp16": ModelSpec("squeezenet-fp16", "SqueezeNet 1.1 (fp16, Caffe2)",
                                 ASSETS / "cnn/squeezenet1.1-fp16/model.onnx", "data_0", "caffe_bgr", np.float16),
}

# ORT quantize_static settings compared (keyword arguments as JSON-able strings).
# onnxruntime 1.32's quantize_static defaults to S8 activations / S8 weights, per-tensor.
ORT_VARIANTS = {
    "ort default": {},
    "ort default + reduce_range": {"reduce_range": True},
    "ort U8/S8 per-channel": {"per_channel": True, "activation_type": "QUInt8", "weight_type": "QInt8"},
    "ort U8/S8 per-channel + reduce_range": {"per_channel": True, "reduce_range": True,
                                              "activation_type": "QUInt8", "weight_type": "QInt8"},
}
ORT_REFERENCE = "ort default"  # the "vs ORT" latency ratios divide by this output's latency


@dataclass
class Result:
    """One row of the table (a float model or one quantized output)."""

    model: str
    method: str
    path: Path | None = None
    error: str | None = None
    quant_s: float | None = None
    peak_rss_mb: float | None = None
    size_mb: float | None = None
    top1: float | None = None
    agree: float | None = None
    lat: dict = field(default_factory=dict)  # batch -> ms


# --------------------------------------------------------------------------- subprocess quantizers


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


def run_measured(cmd: list[str], env: dict | None = None, timeout: float = 3600) -> tuple[int, float, float, str]:
    """Run ``cmd`` as a child; return (exit code, wall seconds, peak RSS MB of the child, stderr).

    Peak RSS: not ``ru_maxrss`` of a direct child, because Linux carries the *parent's* high-water mark
    across fork+exec (a child of this benchmark, which holds 300 MB of images, would never report less).
    ``/usr/bin/time -f %M`` (a small intermediate process) gives the true figure; without it, the
    child's VmHWM is polled from /proc (may miss growth in its last 50 ms).
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
    return proc.returncode, wall, rss, stderr


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(no stderr)"


def onnxq_command() -> list[str]:
    """The onnxq CLI: the installed entry point, else ``python -m onnxq.cli``."""
    exe = shutil.which("onnxq")
    return [exe] if exe else [sys.executable, "-m", "onnxq.cli"]


def quantize_onnxq(spec: ModelSpec, out: Path, calib_size: int) -> Result:
    """Quantize with ``onnxq quantize --preset w8a8`` on the image folder."""
    cmd = onnxq_command() + ["quantize", str(spec.path), "-o", str(out), "--preset", "w8a8",
                             "--calib", str(IMAGENET), "--calib-preprocess", spec.preprocess,
                             "--calib-size", str(calib_size)]
    rc, wall, rss, err = run_measured(cmd)
    res = Result(spec.key, "onnxq w8a8", out, quant_s=wall, peak_rss_mb=rss)
    if rc != 0 or not out.exists():
        res.error = f"onnxq failed: {_last_line(err)}"
    return res


def quantize_ort(spec: ModelSpec, name: str, out: Path, calib_size: int) -> Result:
    """Quantize with ORT quantize_static in a child process (this file's ``--_ort-child`` mode)."""
    job = {"model": str(spec.path), "out": str(out), "input": spec.input, "preprocess": spec.preprocess,
           "dtype": np.dtype(spec.dtype).name, "calib_size": calib_size, "kwargs": ORT_VARIANTS[name]}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_ort-child", json.dumps(job)]
    rc, wall, rss, err = run_measured(cmd)
    res = Result(spec.key, name, out, quant_s=wall, peak_rss_mb=rss)
    if rc != 0 or not out.exists():
        res.error = f"ort failed: {_last_line(err)}"
    return res


def _ort_child(job_json: str) -> None:
    """Child-process body: read calibration images from disk lazily and call quantize_static."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    job = json.loads(job_json)
    load_image, _ = get_load_image()
    files = [p for p, _ in image_list()]
    files = [files[i] for i in calibration_indices(len(files), job["calib_size"])]
    dtype = np.dtype(job["dtype"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(files)

        def get_next(self):
            p = next(self.it, None)
            if p is None:
                return None
            return {job["input"]: load_image(str(p), preprocess=job["preprocess"], dtype=dtype)}

        def rewind(self):
            self.it = iter(files)

    kw = dict(job["kwargs"])
    for k in ("activation_type", "weight_type"):
        if k in kw:
            kw[k] = getattr(QuantType, kw[k])
    quantize_static(job["model"], job["out"], Reader(), quant_format=QuantFormat.QDQ,
                    calibrate_method=CalibrationMethod.MinMax, **kw)


# --------------------------------------------------------------------------- evaluation


def evaluate(res: Result, x: np.ndarray, y: np.ndarray, ref: np.ndarray | None,
             batches: tuple[int, ...], runs: int) -> np.ndarray | None:
    """Fill accuracy, size and latency into ``res``; returns its predictions (None on failure)."""
    if res.error:
        return None
    try:
        res.size_mb = res.path.stat().st_size / 2**20
        sess = make_session(res.path, "all")
        pred = predict(sess, x)
        res.top1 = 100.0 * float((pred == y).mean())
        res.agree = 100.0 * float((pred == ref).mean()) if ref is not None else 100.0
        return pred
    except Exception as e:  # noqa: BLE001 - a broken output must not stop the benchmark
        res.error = f"evaluation failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return None


def measure_latencies(results: list[Result], x: np.ndarray, batches: tuple[int, ...], runs: int) -> None:
    """Median latency of every output, measured round-robin (one run of each model in turn).

    Interleaving makes every model see the same machine load: a background burst slows all of them
    alike instead of whichever model happened to be timed then.
    """
    live = [(r, make_session(r.path, "all")) for r in results if not r.error]
    for b in batches:
        timed = []
        for r, sess in live:
            shape0 = sess.get_inputs()[0].shape[0]
            if isinstance(shape0, int) and shape0 != b:
                r.lat[b] = None  # fixed batch dimension
                continue
            inp = sess.get_inputs()[0]
            want = np.float16 if "float16" in inp.type else np.float32
            feed = {inp.name: np.concatenate([x] * -(-b // len(x)))[:b].astype(want)}
            for _ in range(5):
                sess.run(None, feed)
            timed.append((r, sess, feed, []))
        for _ in range(runs):
            for r, sess, feed, times in timed:
                t0 = time.perf_counter()
                sess.run(None, feed)
                times.append(time.perf_counter() - t0)
        for r, _sess, _feed, times in timed:
            r.lat[b] = float(np.median(times) * 1e3)


def _fmt(v, spec="{:.1f}", none="n/a"):
    return none if v is None else spec.format(v)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def markdown_table(results: list[Result], batches: tuple[int, ...]) -> str:
    """Render all rows as one markdown table (ratios per model vs its float row and ORT reference)."""
    head = ["model", "method", "top-1 %", "agree %", "size MB (x fp)", "quantize s", "peak RSS MB"]
    for b in batches:
        head += [f"b{b} ms", f"b{b} vs fp", f"b{b} vs ORT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_model: dict[str, dict[str, Result]] = {}
    for r in results:
        by_model.setdefault(r.model, {})[r.method] = r
    for r in results:
        fp = next((v for k, v in by_model[r.model].items() if k.startswith("float")), None)
        ortref = by_model[r.model].get(ORT_REFERENCE)
        if r.error:
            lines.append(f"| {r.model} | {r.method} | {r.error} |" + " |" * (len(head) - 3))
            continue
        size = f"{r.size_mb:.2f} ({_fmt(_ratio(r.size_mb, fp.size_mb if fp else None), '{:.2f}')})"
        row = [r.model, r.method, _fmt(r.top1), _fmt(r.agree), size, _fmt(r.quant_s), _fmt(r.peak_rss_mb, "{:.0f}")]
        for b in batches:
            v = r.lat.get(b)
            row += [_fmt(v, "{:.2f}"),
                    _fmt(_ratio(v, fp.lat.get(b) if fp else None), "{:.2f}"),
                    _fmt(_ratio(v, ortref.lat.get(b) if ortref and not ortref.error else None), "{:.2f}")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def environment() -> dict:
    import onnx
    import onnxruntime

    info = cpu_info()
    return {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": info["model"], "cores": info["cores"],
            "avx2": info["avx2"], "avx512f": info["avx512f"],
            "vnni": info["avx512_vnni"] or info["avx_vnni"],
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "python": sys.version.split()[0]}


def write_results(table: str, env: dict, args_line: str, notes: list[str]) -> None:
    """Append a dated section to benchmarks/RESULTS.md."""
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    sec = [f"\n## {env['date']} - bench_cnn.py\n",
           f"- Machine: {env['cpu']}, {env['cores']} cores; AVX2 {yn(env['avx2'])}, AVX-512 {yn(env['avx512f'])}, "
           f"VNNI {yn(env['vnni'])}",
           f"- onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, Python {env['python']}",
           f"- Command: `python benchmarks/bench_cnn.py {args_line}`", *[f"- {n}" for n in notes], "", table, ""]
    new = not RESULTS_MD.exists()
    with open(RESULTS_MD, "a") as f:
        if new:
            f.write("# Benchmark results\n\nSections are appended by `benchmarks/bench_cnn.py --write`.\n")
        f.write("\n".join(sec))


# --------------------------------------------------------------------------- main


def bench_model(spec: ModelSpec, args, workdir: Path, batches: tuple[int, ...]) -> list[Result]:
    """Quantize and evaluate one model with every method; prints progress to stderr."""
    log = lambda m: print(f"[{spec.key}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    x, y, _ = load_images(spec.preprocess, dtype=spec.dtype)
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    fp = Result(spec.key, f"float ({np.dtype(spec.dtype).name})", spec.path)
    ref = evaluate(fp, x, y, None, batches, args.runs)
    log(f"float top-1 {_fmt(fp.top1)}%")
    results = [fp]

    jobs = []
    if not args.skip_onnxq:
        jobs.append(("onnxq w8a8", lambda: quantize_onnxq(spec, workdir / f"{spec.key}_onnxq.onnx", args.calib_size)))
    if not args.skip_ort and (spec.dtype != np.float16 or args.ort_fp16):
        for i, name in enumerate(ORT_VARIANTS):
            out = workdir / f"{spec.key}_ort{i}.onnx"
            jobs.append((name, lambda name=name, out=out: quantize_ort(spec, name, out, args.calib_size)))
    for name, job in jobs:
        log(f"quantizing: {name}")
        r = job()
        evaluate(r, x, y, ref, batches, args.runs)
        log(f"{name}: " + (r.error or f"top-1 {_fmt(r.top1)}% agree {_fmt(r.agree)}% "
                                      f"quantize {r.quant_s:.1f}s rss {r.peak_rss_mb:.0f}MB"))
        results.append(r)
    log("latency (round-robin over all outputs)")
    measure_latencies(results, x, batches, args.runs)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description="onnxq vs onnxruntime quantize_static on ImageNet CNNs")
    ap.add_argument("--models", default="mnv2,squeezenet", help=f"comma list of {','.join(MODELS)}")
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--skip-ort", action="store_true", help="do not run onnxruntime's quantize_static")
    ap.add_argument("--skip-onnxq", action="store_true", help="do not run onnxq")
    ap.add_argument("--ort-fp16", action="store_true", help="also try ORT quantize_static on the fp16 model")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per latency figure (median)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate on the first N images only (smoke test)")
    ap.add_argument("--workdir", default=None, help="where quantized models go (default: a temp dir)")
    ap.add_argument("--write", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    ap.add_argument("--_ort-child", dest="ort_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ort_child:
        return _ort_child(args.ort_child)

    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    batches = (1, 8)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="onnxq_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    _, loader = get_load_image()
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    results = []
    for key in args.models.split(","):
        results += bench_model(MODELS[key], args, workdir, batches)
    env = environment()
    table = markdown_table(results, batches)
    notes = [f"Calibration: {args.calib_size} images evenly spaced over the sorted list of {IMAGENET.name}/ "
             f"({len(image_list())} images); evaluation on {args.limit or len(image_list())} images; "
             f"image loader: {loader}.",
             "Latency: ORT CPUExecutionProvider, ORT_ENABLE_ALL, default threads, median of "
             f"{args.runs} runs after 5 warm-up runs, the models timed round-robin (one run each in turn). 'vs ORT' divides by the '{ORT_REFERENCE}' row.",
             f"Load average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f} on "
             f"{os.cpu_count()} cores (latency is only trustworthy when these are below 1).",
             "ORT quantize_static: QDQ, MinMax; onnxruntime 1.32's default is S8 activations / S8 weights, "
             "per-tensor. Each quantizer ran in its own subprocess (wall time and peak RSS of that process)."]
    print(f"\n{env['cpu']}, {env['cores']} cores, AVX2 {env['avx2']}, AVX-512 {env['avx512f']}, VNNI {env['vnni']}; "
          f"onnxruntime {env['onnxruntime']}, onnx {env['onnx']}; {time.perf_counter() - t0:.0f}s total\n")
    print(table)
    for n in notes:
        print(f"\n{n}", end="")
    print()
    if args.write:
        write_results(table, env, " ".join(argv if argv is not None else sys.argv[1:]), notes)
        print(f"\nappended to {RESULTS_MD}")


if __name__ == "__main__":
    main()
