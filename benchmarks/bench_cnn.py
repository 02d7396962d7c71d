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
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness
from _common import ASSETS, IMAGENET, get_load_image, image_list, load_images, make_session, predict  # noqa: E402
from _harness import RESULTS_MD, environment, fmt, ort_static_on_images, parse_args_or_run_ort_child, ratio


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


def quantize_onnxq(spec: ModelSpec, out: Path, calib_size: int) -> Result:
    """Quantize with ``onnxq quantize --preset w8a8`` on the image folder."""
    run = harness.quantize_onnxq([str(spec.path), "-o", str(out), "--preset", "w8a8", "--calib", str(IMAGENET),
                                  "--calib-preprocess", spec.preprocess, "--calib-size", str(calib_size)])
    res = Result(spec.key, "onnxq w8a8", out, quant_s=run.wall_s, peak_rss_mb=run.peak_rss_mb)
    if not run.succeeded(out):
        res.error = run.failure("onnxq")
    return res


def quantize_ort(spec: ModelSpec, name: str, out: Path, calib_size: int) -> Result:
    """Quantize with ORT quantize_static (QDQ, MinMax) in a child process (this file's ``--_ort-child`` mode)."""
    job = {"model": str(spec.path), "out": str(out), "input": spec.input, "preprocess": spec.preprocess,
           "dtype": np.dtype(spec.dtype).name, "calib_size": calib_size, "method": "MinMax",
           "kwargs": ORT_VARIANTS[name]}
    run = harness.quantize_ort_child(__file__, job)
    res = Result(spec.key, name, out, quant_s=run.wall_s, peak_rss_mb=run.peak_rss_mb)
    if not run.succeeded(out):
        res.error = run.failure("ort")
    return res


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
        calls = {}
        for i, (r, sess) in enumerate(live):
            inp = sess.get_inputs()[0]
            if isinstance(inp.shape[0], int) and inp.shape[0] != b:
                r.lat[b] = None  # fixed batch dimension
                continue
            want = np.float16 if "float16" in inp.type else np.float32
            feed = {inp.name: np.concatenate([x] * -(-b // len(x)))[:b].astype(want)}
            calls[i] = lambda sess=sess, feed=feed: sess.run(None, feed)
        times = harness.round_robin(calls, runs, warmup=5)
        for i, (r, _sess) in enumerate(live):
            if i in times:
                r.lat[b] = float(np.median(times[i]) * 1e3)


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
        size = f"{r.size_mb:.2f} ({fmt(ratio(r.size_mb, fp.size_mb if fp else None), '{:.2f}')})"
        row = [r.model, r.method, fmt(r.top1), fmt(r.agree), size, fmt(r.quant_s), fmt(r.peak_rss_mb, "{:.0f}")]
        for b in batches:
            v = r.lat.get(b)
            row += [fmt(v, "{:.2f}"),
                    fmt(ratio(v, fp.lat.get(b) if fp else None), "{:.2f}"),
                    fmt(ratio(v, ortref.lat.get(b) if ortref and not ortref.error else None), "{:.2f}")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_results(table: str, env: dict, args_line: str, notes: list[str]) -> None:
    """Append a dated section to benchmarks/RESULTS.md."""
    harness.append_results(harness.results_section("bench_cnn.py", env, args_line, notes, [table]))


# --------------------------------------------------------------------------- main


def bench_model(spec: ModelSpec, args, workdir: Path, batches: tuple[int, ...]) -> list[Result]:
    """Quantize and evaluate one model with every method; prints progress to stderr."""
    log = lambda m: print(f"[{spec.key}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    x, y, _ = load_images(spec.preprocess, dtype=spec.dtype)
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    fp = Result(spec.key, f"float ({np.dtype(spec.dtype).name})", spec.path)
    ref = evaluate(fp, x, y, None, batches, args.runs)
    log(f"float top-1 {fmt(fp.top1)}%")
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
        log(f"{name}: " + (r.error or f"top-1 {fmt(r.top1)}% agree {fmt(r.agree)}% "
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
    args = parse_args_or_run_ort_child(ap, argv, ort_static_on_images)
    if args is None:  # the --_ort-child run is done
        return

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
