"""Automatic mixed precision (``--accuracy-budget``) on MobileNetV2 and on a model where plain w8a8 collapses.

1. MobileNetV2 (``cnn/mobilenetv2-7``), the 500 shared ImageNet images split in two: every fifth image
   (100) calibrates, the other 400 are the evaluation set the budget is measured on. Runs, each with the
   CLI as a user would: plain ``w8a8`` and ``w8a8 --accuracy-budget agreement=0.99 --eval <400> --report``.
   Then ``onnxq compare`` of each output against fp32 on all 500 images and on the 400 held-out ones:
   top-1 agreement, size, latency. The report's mixed-precision section gives the fallbacks and the cost.
2. ``--outlier``: the planted-outlier MLP from ``models/outlier_mlp.py`` (one hidden layer's input has a
   channel 300x larger than the rest, so per-tensor int8 activations crush every other channel of that
   layer's input). Plain w8a8 vs ``--accuracy-budget sqnr=30``: the ranking must put the planted layer first.

3. ``--minilm cosine=0.99``: MiniLM-L6 w8a8 without SmoothQuant (output cosine 0.86 on STS sentences)
   and with the budget measured on STS-dev sentences (calibration on STS-train).

Usage: python benchmarks/bench_mixed_precision.py [--budget agreement=0.99] [--outlier] [--minilm cosine=0.99]
       [--skip-mnv2] [--out /tmp/bench_mp]
Prints a JSON summary (and writes it to OUT/summary.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ASSETS, IMAGENET, REPO_ROOT, cpu_info  # noqa: E402

MNV2 = ASSETS / "cnn/mobilenetv2-7/model.onnx"


def _split(out: Path) -> tuple[Path, Path]:
    """Symlink folders: every fifth image calibrates, the other four fifths evaluate."""
    images = sorted((IMAGENET / "images").iterdir())
    cal, ev = out / "calib_images", out / "eval_images"
    for d in (cal, ev):
        d.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(images):
        link = (cal if i % 5 == 0 else ev) / p.name
        if not link.exists():
            link.symlink_to(p)
    return cal, ev


def _run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0, r.stdout


def _compare(model: Path, fp32: Path, data: Path, n: int) -> dict:
    _, out = _run(["onnxq", "compare", str(fp32), str(model), "--calib", str(data), "--calib-preprocess", "torch",
                   "--calib-size", str(n), "--json", "--outputs-only"])  # fmt: skip
    return json.loads(out)


def mobilenet(out: Path, budget: str) -> dict:
    cal, ev = _split(out)
    rows = {}
    for name, extra in (("w8a8", []), ("w8a8+budget", ["--accuracy-budget", budget, "--eval", str(ev),
                                                         "--eval-size", "400", "--report", str(out / "report")])):
        dst = out / f"mnv2.{name}.onnx"
        secs, _ = _run(["onnxq", "quantize", str(MNV2), "-o", str(dst), "--calib", str(cal), "--calib-preprocess",
                        "torch", "--calib-size", "100", "--no-progress", *extra])  # fmt: skip
        all500 = _compare(dst, MNV2, IMAGENET / "images", 500)
        held = _compare(dst, MNV2, ev, 400)
        rows[name] = {"seconds": round(secs, 1), "agreement_500": all500["top1_agreement"],
                      "agreement_heldout400": held["top1_agreement"], "bytes": all500["models"]["quant"]["bytes"],
                      "latency_ms": all500["models"]["quant"]["latency_ms"],
                      "fp32_latency_ms": all500["models"]["float"]["latency_ms"]}  # fmt: skip
    report = json.loads((out / "report" / "report.json").read_text())
    mp = report["info"]["mixed_precision"]
    rows["mixed_precision"] = {k: mp[k] for k in ("target", "baseline", "final", "met", "forward_passes", "builds",
                                                   "seconds", "eval_samples", "rank_samples")}  # fmt: skip
    rows["mixed_precision"]["fallbacks"] = mp["fallbacks"]
    rows["mixed_precision"]["ranking_top10"] = mp["ranking"][:10]
    return rows


def outlier(out: Path) -> dict:
    sys.path.insert(0, str(REPO_ROOT / "models"))
    from outlier_mlp import build  # noqa: PLC0415

    model, data, planted = build(out / "outlier")
    rows = {}
    for name, extra in (("w8a8", []), ("w8a8+budget", ["--accuracy-budget", "sqnr=30", "--report", str(out / "outlier_report")])):
        dst = out / f"outlier.{name}.onnx"
        secs, _ = _run(["onnxq", "quantize", str(model), "-o", str(dst), "--calib", str(data), "--no-progress", *extra])
        _, cmp_out = _run(["onnxq", "compare", str(model), str(dst), "--calib", str(data), "--json", "--no-latency", "--outputs-only"])
        c = json.loads(cmp_out)
        rows[name] = {"seconds": round(secs, 1), "output_sqnr_db": next(iter(c["outputs"].values()))["sqnr_db"]}
    mp = json.loads((out / "outlier_report" / "report.json").read_text())["info"]["mixed_precision"]
    rows["planted_layer"] = planted
    rows["ranking_top3"] = [r["node"] for r in mp["ranking"][:3]]
    rows["fallbacks"] = mp["fallbacks"]
    rows["cost"] = {k: mp[k] for k in ("forward_passes", "builds", "seconds")}
    return rows


def minilm(out: Path, budget: str) -> dict:
    """MiniLM-L6 (sentence embeddings) with plain w8a8, which clips the rare large activations transformers
    rely on, then with the budget: calibration on STS-train sentences, the budget measured on STS-dev ones."""
    import sts_eval  # noqa: PLC0415

    model = ASSETS / "minilm" / "model.onnx"
    text = ["--tokenizer", str(sts_eval.TOKENIZER)]
    rows = {}
    for name, extra in (("w8a8", []), ("w8a8+budget", ["--accuracy-budget", budget, "--eval", str(sts_eval.STS_DEV),
                                                         "--eval-size", "128", "--report", str(out / "minilm_report")])):
        dst = out / f"minilm.{name}.onnx"
        secs, _ = _run(["onnxq", "quantize", str(model), "-o", str(dst), "--calib", str(sts_eval.STS_TRAIN), *text,
                        "--calib-size", "128", "--no-progress", *extra])  # fmt: skip
        _, cmp_out = _run(["onnxq", "compare", str(model), str(dst), "--calib", str(sts_eval.STS_DEV), *text,
                           "--calib-size", "256", "--json", "--outputs-only"])  # fmt: skip
        c = json.loads(cmp_out)
        o = next(iter(c["outputs"].values()))
        rows[name] = {"seconds": round(secs, 1), "dev_cosine": o["cosine"], "dev_sqnr_db": o["sqnr_db"],
                      "bytes": c["models"]["quant"]["bytes"], "latency_ms": c["models"]["quant"]["latency_ms"],
                      "fp32_latency_ms": c["models"]["float"]["latency_ms"]}  # fmt: skip
    mp = json.loads((out / "minilm_report" / "report.json").read_text())["info"]["mixed_precision"]
    rows["mixed_precision"] = {k: mp[k] for k in ("target", "baseline", "final", "met", "forward_passes", "builds", "seconds")}
    rows["ranking_top5"] = [(r["node"], r["gain"]) for r in mp["ranking"][:5]]
    rows["fallbacks"] = mp["fallbacks"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="agreement=0.99")
    ap.add_argument("--outlier", action="store_true", help="also run the planted-outlier model")
    ap.add_argument("--skip-mnv2", action="store_true")
    ap.add_argument("--minilm", default=None, help="also run MiniLM with this budget, e.g. cosine=0.99")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_mp"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"machine": cpu_info(), "date": time.strftime("%Y-%m-%d")}
    if not args.skip_mnv2:
        summary["mobilenetv2"] = mobilenet(args.out, args.budget)
    if args.outlier:
        summary["outlier_mlp"] = outlier(args.out)
    if args.minilm:
        summary["minilm"] = minilm(args.out, args.minilm)
    text = json.dumps(summary, indent=2, default=str)
    (args.out / "summary.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
