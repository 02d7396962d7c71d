"""onnxq's transformer presets against onnxruntime.quantization on MiniLM and stories260K, same run, same data.

MiniLM (all-MiniLM-L6-v2): STS-dev Spearman (fp32 0.867), mean cosine of sentence embeddings to fp32, and
latency (batch 32 x 64 tokens, ORT CPU, median of 10) for: fp32; onnxq w8a8, w8a8-smoothquant (alpha 0.5
and auto), int8-dynamic; onnxruntime quantize_static (QDQ, MinMax and Percentile, per-channel weights) and
quantize_dynamic. Calibration: the first 128 sentence pairs of STS-train (sentence 1), tokenized without
padding, for every static quantizer.

stories260K: TinyStories perplexity (shared tokens, fp32 3.520) of the same variants; calibration on 32
windows of 512 tokens of the same token file (the assets hold no other TinyStories tokens for this
tokenizer, so calibration and evaluation text overlap for every quantizer alike).

    python benchmarks/bench_transformers.py [--models minilm,stories] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sts_eval  # noqa: E402
from _common import cpu_info  # noqa: E402
from _harness import FeedReader, append_results

ASSETS = HERE.parent.parent / "shared" / "assets"
MINILM = ASSETS / "minilm" / "model.onnx"
STORIES = ASSETS / "llm" / "stories260K" / "stories260K.onnx"
STORIES_TOKENS = ASSETS / "text" / "tokens" / "stories260K__tinystories_valid_shared.json"


def _onnxq(src: Path, dst: Path, preset: str, calib: list[str], extra: list[str] = ()) -> dict:
    cmd = ["onnxq", "quantize", str(src), "-o", str(dst), "--preset", preset, *calib, *extra, "--json"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-500:]}")
    rep = json.loads(r.stdout)
    return {"seconds": round(time.perf_counter() - t, 1), "rss_mb": rep["info"].get("peak_rss_mb")}


def _minilm_feeds(n: int = 128) -> list[dict[str, np.ndarray]]:
    from tokenizers import Tokenizer

    a, _b, _ = sts_eval.read_pairs(sts_eval.STS_TRAIN, n)
    tok = Tokenizer.from_file(str(sts_eval.TOKENIZER))
    tok.no_padding()
    tok.enable_truncation(128)
    feeds = []
    for e in tok.encode_batch(a):
        ids = np.array([e.ids], np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    return feeds


def _stories_feeds(n: int = 32) -> list[dict[str, np.ndarray]]:
    tokens = json.loads(STORIES_TOKENS.read_text())
    windows = [tokens[i : i + 512] for i in range(0, len(tokens) - 512, 512)]
    pick = np.linspace(0, len(windows) - 1, n).round().astype(int)
    return [{"input_ids": np.array([windows[i]], np.int64)} for i in pick]


def _ort_static(src: Path, dst: Path, feeds: list, method: str) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    t = time.perf_counter()
    extra = {"CalibPercentile": 99.999} if method == "Percentile" else {}

    def run(data: list) -> None:
        quantize_static(str(src), str(dst), FeedReader(data), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method), extra_options=extra)  # fmt: skip

    try:
        run(feeds)
        note = ""
    except ValueError:
        # ORT's histogram calibrators stack every sample's activations into one array: sentences of different
        # lengths fail ("inhomogeneous shape"). Its users must pad; do that (mask 0 on the padding).
        n = max(f["input_ids"].shape[1] for f in feeds)
        padded = []
        for f in feeds:
            pad = n - f["input_ids"].shape[1]
            padded.append({k: np.pad(v, ((0, 0), (0, pad))) for k, v in f.items()})
        t = time.perf_counter()
        run(padded)
        note = f" (inputs padded to {n} tokens: ORT's histogram calibrators refuse different lengths)"
    return {"seconds": round(time.perf_counter() - t, 1), "rss_mb": None, "note": note}


def _ort_dynamic(src: Path, dst: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t = time.perf_counter()
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False)
    return {"seconds": round(time.perf_counter() - t, 1), "rss_mb": None}


def _attempt(variants: list, rows: list, model: str, name: str, dst: Path, fn) -> None:  # noqa: ANN001
    """Run one competitor's quantizer; a crash becomes a 'failed' row (users hit the same crash)."""
    try:
        variants.append((name, dst, fn()))
    except Exception as exc:  # noqa: BLE001
        rows.append({"model": model, "variant": name, "failed": f"{type(exc).__name__}: {str(exc)[:120]}"})
        print(rows[-1], flush=True)


def _perplexity(model: Path) -> float:
    r = subprocess.run([sys.executable, str(HERE / "perplexity.py"), str(model), "--tokens", str(STORIES_TOKENS),
                        "--json", "--no-progress"], capture_output=True, text=True)  # fmt: skip
    if r.returncode:
        raise RuntimeError(r.stderr[-500:])
    return float(json.loads(r.stdout)["ppl"])


# (row name, preset, extra flags) of the onnxq variants, and (row name, CalibrationMethod) of ORT's static ones
ONNXQ_VARIANTS = (("onnxq w8a8", "w8a8", []), ("onnxq w8a8-smoothquant", "w8a8-smoothquant", []),
                  ("onnxq w8a8-smoothquant --alpha auto", "w8a8-smoothquant", ["--alpha", "auto"]),
                  ("onnxq int8-dynamic", "int8-dynamic", []))
ORT_STATIC = (("ORT quantize_static MinMax", "MinMax"), ("ORT quantize_static Percentile 99.999", "Percentile"))


def quantize_variants(work: Path, rows: list[dict], model: str, src: Path, stem: str, calib: list[str],
                      feeds: list[dict[str, np.ndarray]]) -> list[tuple[str, Path, dict]]:
    """fp32, then every onnxq and ORT variant of ``src`` (files ``work/<stem>.*.onnx``), as (name, path, info).

    The onnxq variants see ``calib`` (CLI flags), ORT's static ones the same data as ``feeds``; an ORT crash
    becomes a 'failed' row in ``rows`` instead of a variant.
    """
    variants: list[tuple[str, Path, dict]] = [("fp32", src, {})]
    for name, preset, extra in ONNXQ_VARIANTS:
        dst = work / f"{stem}.{len(variants)}.onnx"
        info = _onnxq(src, dst, preset, calib if preset != "int8-dynamic" else ["--no-progress"], extra)
        variants.append((name, dst, info))
    for name, method in ORT_STATIC:
        dst = work / f"{stem}.{len(variants)}.onnx"
        _attempt(variants, rows, model, name, dst, lambda d=dst, m=method: _ort_static(src, d, list(feeds), m))
    dst = work / f"{stem}.ortdyn.onnx"
    _attempt(variants, rows, model, "ORT quantize_dynamic", dst, lambda: _ort_dynamic(src, dst))
    return variants


def run_minilm(work: Path, rows: list[dict]) -> None:
    calib = ["--calib", str(sts_eval.STS_TRAIN), "--tokenizer", str(sts_eval.TOKENIZER), "--calib-size", "128", "--no-progress"]
    variants = quantize_variants(work, rows, "MiniLM", MINILM, "minilm", calib, _minilm_feeds(128))
    ref = None
    base_lat = None
    for name, path, info in variants:
        r = sts_eval.evaluate(path, ref)
        if ref is None:
            ref = r["embeddings"]
        lat = sts_eval.latency(path)
        base_lat = base_lat or lat
        rows.append({"model": "MiniLM", "variant": name + info.pop("note", ""), "spearman": round(r["spearman"], 4),
                     "cosine": round(r.get("cosine_to_fp32", 1.0), 4), "latency_ms": round(lat * 1e3, 1),
                     "latency_vs_fp32": round(lat / base_lat, 2), "size_mb": round(path.stat().st_size / 1e6, 1), **info})  # fmt: skip
        print(rows[-1], flush=True)


def run_stories(work: Path, rows: list[dict]) -> None:
    calib = ["--calib", str(STORIES_TOKENS), "--seq-len", "512", "--calib-size", "32", "--no-progress"]
    variants = quantize_variants(work, rows, "stories260K", STORIES, "stories", calib, _stories_feeds(32))
    for name, path, info in variants:
        rows.append({"model": "stories260K", "variant": name + info.pop("note", ""), "ppl": round(_perplexity(path), 3), **info})
        print(rows[-1], flush=True)


def format_rows(rows: list[dict], seconds: float) -> str:
    """The RESULTS.md section for the collected rows."""
    cpu = cpu_info()
    isa = ", ".join(f"{k} {v}" for k, v in cpu.items() if k not in ("model", "cores"))
    load = os.getloadavg()[0]
    lines = [f"## {datetime.date.today()} - transformers: onnxq presets vs onnxruntime.quantization (bench_transformers.py)", "",
             f"{cpu['model']}, {cpu['cores']} cores ({isa}); onnxruntime {ort.__version__}; {seconds:.0f} s total; "
             f"load average at the end {load:.1f} (latency is only trustworthy below 1)", ""]  # fmt: skip
    mini = [r for r in rows if r["model"] == "MiniLM"]
    mini = [r for r in mini if "failed" not in r] + [r for r in mini if "failed" in r]
    if mini:
        lines += ["| MiniLM variant | STS-dev Spearman | cosine to fp32 | latency ms (b32 x 64) | vs fp32 | size MB | quantize s |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['variant']} | failed: {r['failed']} ||||||" if "failed" in r else
                  f"| {r['variant']} | {r['spearman']} | {r['cosine']} | {r['latency_ms']} | {r['latency_vs_fp32']} | {r['size_mb']} | {r.get('seconds', 'n/a')} |" for r in mini]  # fmt: skip
        lines.append("")
    st = [r for r in rows if r["model"] == "stories260K"]
    if st:
        lines += ["| stories260K variant | TinyStories ppl | vs fp32 | quantize s |", "|---|---|---|---|"]
        base = next(r["ppl"] for r in st if r["variant"] == "fp32")
        st = [r for r in st if "failed" not in r] + [r for r in st if "failed" in r]
        lines += [f"| {r['variant']} | failed: {r['failed']} |||" if "failed" in r else
                  f"| {r['variant']} | {r['ppl']} | {100 * (r['ppl'] / base - 1):+.1f}% | {r.get('seconds', 'n/a')} |" for r in st]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,stories")
    ap.add_argument("--write", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    rows: list[dict] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "minilm" in args.models:
            run_minilm(work, rows)
        if "stories" in args.models:
            run_stories(work, rows)
    text = format_rows(rows, time.time() - t0)
    print(text)
    if args.write:
        append_results(text)


if __name__ == "__main__":
    main()
