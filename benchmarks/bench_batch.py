"""Batch conversion over the shared models: failures isolated, resumable, and -j 2 vs -j 1 wall time.

Builds a folder in a scratch directory holding copies of the shared CNNs, MiniLM and stories260K, a
corrupt file and a model whose external data escapes its folder, plus a manifest giving each model its
calibration source; runs `onnxq batch` with -j 1 and -j 2 (fresh output folders), then once more to
show that nothing is redone. Prints a markdown table; --write appends it to RESULTS.md.

    python benchmarks/bench_batch.py [--write] [--workdir DIR]
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
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ASSETS, cpu_info  # noqa: E402
from _harness import append_results

MODELS = {
    "mobilenetv2": ("cnn/mobilenetv2-7/model.onnx", {"calib": "imagenet", "calib_preprocess": "torch"}),
    "squeezenet": ("cnn/squeezenet1.1/model.onnx", {"calib": "imagenet", "calib_preprocess": "torch"}),
    "squeezenet_fp16": ("cnn/squeezenet1.1-fp16/model.onnx", {"calib": "imagenet", "calib_preprocess": "caffe_bgr"}),
    "mobilenetv2_int8_zoo": ("cnn/mobilenetv2-12-int8-zoo/model.onnx", {"calib": "imagenet", "calib_preprocess": "torch"}),
    "minilm": ("minilm/model.onnx", {"calib": "sts/sts-train.csv", "tokenizer": "minilm/tokenizer.json"}),
    "stories260k": ("llm/stories260K/stories260K.onnx", {"calib": "text/tokens/stories260K__tinystories_valid_shared.json", "seq_len": 256}),
}


def build(work: Path) -> Path:
    """The model folder and its manifest; returns the manifest path."""
    models = work / "models"
    models.mkdir(parents=True)
    lines = ["[defaults]", "calib_size = 32", ""]
    for name, (rel, calib) in MODELS.items():
        shutil.copy(ASSETS / rel, models / f"{name}.onnx")
        lines += ["[[model]]", f'path = "models/{name}.onnx"']
        for k, v in calib.items():
            lines.append(f"{k} = {json.dumps(str(ASSETS / v)) if k in ('calib', 'tokenizer') else json.dumps(v)}")
        lines.append("")
    (models / "corrupt.onnx").write_bytes((ASSETS / MODELS["squeezenet"][0]).read_bytes()[:100_000])
    esc = onnx.load(ASSETS / MODELS["squeezenet"][0])
    t = esc.graph.initializer[0]
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../outside.data"), ("offset", "0"), ("length", str(len(t.raw_data)))):
        t.external_data.add(key=k, value=v)
    (work / "outside.data").write_bytes(t.raw_data)
    t.ClearField("raw_data")
    (models / "escaping.onnx").write_bytes(esc.SerializeToString())
    for name in ("corrupt", "escaping"):
        lines += ["[[model]]", f'path = "models/{name}.onnx"', f'calib = "{ASSETS / "imagenet"}"', 'calib_preprocess = "torch"', ""]
    manifest = work / "manifest.toml"
    manifest.write_text("\n".join(lines))
    return manifest


def run(manifest: Path, out: Path, jobs: int) -> tuple[float, list[dict], int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxq.cli", "batch", str(manifest), "-o", str(out), "-j", str(jobs), "--json"],
                          capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    return wall, json.loads(proc.stdout) if proc.stdout.strip() else [], proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="onnxq_bench_batch_"))
    manifest = build(work)
    rows = []
    for jobs in (1, 2):
        wall, outcomes, code = run(manifest, work / f"out_j{jobs}", jobs)
        rows.append((f"-j {jobs}", wall, outcomes, code))
    wall, outcomes, code = run(manifest, work / "out_j2", 2)
    rows.append(("-j 2 again (resume)", wall, outcomes, code))
    info = cpu_info()
    lines = [f"## {_dt.datetime.now():%Y-%m-%d %H:%M} - bench_batch.py", "",
             f"- Machine: {info['model']}, {os.cpu_count()} cores; AVX2 {info['avx2']}, AVX-512 {info['avx512f']}, "
             f"VNNI {info['avx512_vnni'] or info['avx_vnni']}",
             f"- Load average (1 min) at end: {os.getloadavg()[0]:.1f}", "",
             "| run | wall s | converted | skipped | failed | exit |", "|---|---|---|---|---|---|"]  # fmt: skip
    for label, wall, outcomes, code in rows:
        count = {s: sum(o["status"] == s for o in outcomes) for s in ("converted", "skipped", "failed")}
        lines.append(f"| {label} | {wall:.1f} | {count['converted']} | {count['skipped']} | {count['failed']} | {code} |")
    lines += ["", f"-j 2 / -j 1 wall time: {rows[1][1] / rows[0][1]:.2f}", "", "Failures (one line each):", ""]
    lines += [f"- {o['name']}: {o['reason']}" for o in rows[0][2] if o["status"] == "failed"]
    lines += ["", "Per model (-j 1): " + ", ".join(f"{o['name']} {o['seconds']:.1f} s" for o in rows[0][2] if o["status"] == "converted"), ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        append_results(text)


if __name__ == "__main__":
    main()
