"""MiniLM int8 latency against fp32, timed round-robin (the transformers issue's latency criterion).

The criterion: batch 32 x 64 tokens, ORT CPU, median of 10, the fastest int8 variant at least 1.5x faster
than fp32. Every model is loaded once (ORT_ENABLE_ALL, default threads); in each of 2 rounds every model in
turn gets 2 warm-up runs and ``--runs / 2`` timed consecutive runs, so load changes on the machine hit every
model alike (see ``time_round_robin`` for why runs of one model are consecutive).

Variants:

* ``fp32``: the asset as given.
* ``fp32 + canonical GELU``: the asset with only onnxq's GELU rewrite (passes/canonical_gelu.py), so that
  the int8 speed-up can also be read against an fp32 model that gets ORT's Gelu fusion.
* onnxq ``w8a8-smoothquant`` (QDQ and ``--format qoperator``; 128 STS-train sentences), ``int8-dynamic``
  (defaults: per-token, Hadamard) and ``int8-dynamic`` per-tensor without rotation (a recipe file).
* onnxruntime ``quantize_dynamic`` (QInt8, per-tensor) on the asset, and on the rewritten fp32 model
  (ORT given the same GELU rewrite); onnxruntime ``quantize_static`` (QDQ, MinMax, per-channel int8
  weights, the same 128 sentences; bench_transformers.py's settings) on the rewritten fp32 model.

With ``--accuracy``: STS-dev Spearman and the mean cosine of each embedding to fp32 (sts_eval.py), so a
speed-up is never read without the accuracy it costs.

Usage:
    python benchmarks/bench_minilm_latency.py [--runs 10] [--accuracy] [--workdir DIR] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_transformers  # noqa: E402
import sts_eval  # noqa: E402
from _common import cpu_info  # noqa: E402
from _harness import append_results

MINILM = sts_eval.ASSETS / "minilm" / "model.onnx"
CALIB = ["--calib", str(sts_eval.STS_TRAIN), "--tokenizer", str(sts_eval.TOKENIZER), "--calib-size", "128"]
PER_TENSOR = 'preset = "int8-dynamic"\n[dynamic]\nactivation_granularity = "per-tensor"\nhadamard_block = 0\n'


def _onnxq(dst: Path, *args: str) -> None:
    cmd = ["onnxq", "quantize", str(MINILM), "-o", str(dst), "--no-progress", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-800:]}")


def _rewritten_fp32(dst: Path) -> None:
    from onnxq.passes.canonical_gelu import canonical_gelu

    onnx.save(gs.export_onnx(canonical_gelu(gs.import_onnx(onnx.load(MINILM)))), dst)


def _ort_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False)


def build(work: Path) -> list[tuple[str, Path]]:
    """Make every variant under ``work``; returns (name, path) in table order."""
    recipe = work / "per_tensor.toml"
    recipe.write_text(PER_TENSOR)
    fp32c = work / "fp32_gelu.onnx"
    jobs = [
        ("fp32", None),
        ("fp32 + canonical GELU (onnxq's rewrite only)", lambda p: _rewritten_fp32(p)),
        ("onnxq w8a8-smoothquant", lambda p: _onnxq(p, "--preset", "w8a8-smoothquant", *CALIB)),
        ("onnxq w8a8-smoothquant --format qoperator",
         lambda p: _onnxq(p, "--preset", "w8a8-smoothquant", *CALIB, "--format", "qoperator")),
        ("onnxq int8-dynamic (per-token + Hadamard)", lambda p: _onnxq(p, "--preset", "int8-dynamic")),
        ("onnxq int8-dynamic per-tensor, no rotation", lambda p: _onnxq(p, "--recipe", str(recipe))),
        ("onnxruntime quantize_dynamic", lambda p: _ort_dynamic(MINILM, p)),
        ("onnxruntime quantize_dynamic on fp32 + canonical GELU", lambda p: _ort_dynamic(fp32c, p)),
        ("onnxruntime quantize_static (QDQ, MinMax) on fp32 + canonical GELU",
         lambda p: bench_transformers._ort_static(fp32c, p, bench_transformers._minilm_feeds(128), "MinMax")),
    ]  # fmt: skip
    out = []
    for i, (name, make) in enumerate(jobs):
        path = MINILM if make is None else work / ("fp32_gelu.onnx" if i == 1 else f"v{i}.onnx")
        if make is not None and not path.exists():
            t = time.perf_counter()
            make(path)
            print(f"built {name} in {time.perf_counter() - t:.1f} s", flush=True)
        out.append((name, path))
    return out


def time_round_robin(models: list[tuple[str, Path]], runs: int, batch: int = 32, seq: int = 64,
                     rounds: int = 2) -> dict[str, list[float]]:  # fmt: skip
    """Milliseconds of each model's ``runs`` timed forwards, taken in ``rounds`` rounds of consecutive runs per
    model (models in turn within a round, so load drift hits every model alike).

    Runs of one model are consecutive because ORT's intra-op threads keep spinning for a while after a run:
    alternating sessions run by run on 2 cores makes each run compete with the previous session's spinning
    threads (measured: w8a8-smoothquant 303 ms run-by-run vs 225-248 ms alone, fp32 barely affected)."""
    ids = np.random.default_rng(0).integers(1000, 20000, (batch, seq)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    sessions = {name: sts_eval.session(path) for name, path in models}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(2):  # warm-up (and let the previous session's threads go idle)
                s.run(None, feed)
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feed)
                times[name].append((time.perf_counter() - t) * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--accuracy", action="store_true", help="also STS-dev Spearman and cosine to fp32")
    ap.add_argument("--workdir", type=Path, help="keep the built models here (reused when present)")
    ap.add_argument("--write", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="minilm_latency_"))
    work.mkdir(parents=True, exist_ok=True)
    models = build(work)
    load0 = os.getloadavg()[0]
    times = time_round_robin(models, args.runs)
    load1 = os.getloadavg()[0]
    med = {k: float(np.median(v)) for k, v in times.items()}
    base, base_c = med["fp32"], med[models[1][0]]
    acc: dict[str, dict[str, float]] = {}
    if args.accuracy:
        ref = None
        for name, path in models:
            r = sts_eval.evaluate(path, ref)
            ref = r["embeddings"] if ref is None else ref
            acc[name] = r
    cpu = cpu_info()
    lines = [
        f"## {dt.datetime.now():%Y-%m-%d %H:%M} - MiniLM int8 latency, round-robin (bench_minilm_latency.py)",
        "",
        f"{cpu['model']}, {cpu['cores']} cores (AVX2 {cpu['avx2']}, AVX-512 {cpu['avx512f']}, "
        f"VNNI {cpu['avx512_vnni'] or cpu['avx_vnni']}); onnxruntime {ort.__version__} CPU, ORT_ENABLE_ALL, "
        f"default threads; batch 32 x 64 tokens, median of {args.runs} runs per model (2 rounds of "
        f"consecutive runs after 2 warm-up runs, models in turn); load average {load0:.2f} before, {load1:.2f} after.",
        "",
        "| variant | median ms | speed-up vs fp32 | vs fp32 + canonical GELU | size MB |"
        + (" STS-dev Spearman | cosine to fp32 |" if acc else ""),
        "|---|---|---|---|---|" + ("---|---|" if acc else ""),
    ]
    for name, path in models:
        row = (f"| {name} | {med[name]:.1f} | {base / med[name]:.2f}x | {base_c / med[name]:.2f}x | "
               f"{path.stat().st_size / 1e6:.1f} |")  # fmt: skip
        if acc:
            row += f" {acc[name]['spearman']:.4f} | {acc[name].get('cosine_to_fp32', 1.0):.4f} |"
        lines.append(row)
    text = "\n".join(lines)
    print(text + "\n")
    if args.write:
        append_results(text)


if __name__ == "__main__":
    main()
