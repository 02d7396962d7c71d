"""A model with ~2.5 GB of MatMul weights: does onnxq quantize it within 2x the weights' size in peak RSS?

Why: models over 2 GB cannot be one protobuf; they live as a small .onnx plus external data, and a
careless tool holds several copies of the weights at once (the file bytes, a numpy copy, the graph's
copy, the serialised output). The issue's target: peak RSS under 2x the weights' size, output loads in ORT.

The model is generated without torch and without ever building a >2 GB protobuf: the weights are written
straight to the external-data file with numpy, and the .onnx references them by offset. It is a chain of
``LAYERS`` MatMuls [D, D] with a Relu between them (fp32, D = 4096: 64 MiB per layer).

    python benchmarks/bench_large.py [--layers 40] [--dim 4096] [--preset int8-dynamic] [--workdir DIR] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import cpu_info  # noqa: E402
from _harness import append_results


def make_model(folder: Path, layers: int, dim: int, seed: int = 0) -> Path:
    """Write big.onnx + big.onnx.data into ``folder``; weights streamed to disk one layer at a time."""
    rng = np.random.default_rng(seed)
    data = folder / "big.onnx.data"
    inits, nodes = [], []
    offset = 0
    x = "x"
    with open(data, "wb") as fh:
        for i in range(layers):
            w = (rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)
            raw = w.tobytes()
            fh.write(raw)
            t = TensorProto(name=f"layer{i}.weight", data_type=TensorProto.FLOAT, dims=[dim, dim])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(raw)
            inits.append(t)
            y = f"h{i}"
            nodes.append(helper.make_node("MatMul", [x, t.name], [y + "_mm"], name=f"layer{i}/MatMul"))
            nodes.append(helper.make_node("Relu", [y + "_mm"], [y], name=f"layer{i}/Relu"))
            x = y
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", dim])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--preset", default="int8-dynamic")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--write", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="onnxq-large-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    src = make_model(work, args.layers, args.dim)
    weights = args.layers * args.dim * args.dim * 4
    print(f"generated {src} ({weights / 1e9:.2f} GB of weights) in {time.perf_counter() - t:.0f} s", flush=True)
    out = work / "big.q.onnx"
    cmd = ["/usr/bin/time", "-v", "onnxq", "quantize", str(src), "-o", str(out), "--preset", args.preset, "--json"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    ok = r.returncode == 0
    print(r.stderr[-800:] if not ok else f"quantized in {wall:.0f} s, peak RSS {rss_kb / 1e6:.2f} GB", flush=True)
    loads = "n/a"
    out_bytes = 0
    if ok:
        out_bytes = sum(p.stat().st_size for p in work.glob("big.q.onnx*"))
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": np.ones((1, args.dim), np.float32)})[0]
        loads = f"yes (output {y.shape}, finite {bool(np.isfinite(y).all())})"
    ratio = rss_kb * 1e3 / weights
    cpu = cpu_info()
    text = "\n".join([
        f"## {datetime.date.today()} - a {weights / 1e9:.2f} GB model: onnxq quantize --preset {args.preset} (bench_large.py)", "",
        f"{cpu['model']}, {cpu['cores']} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
        f"{args.layers} MatMuls [{args.dim}, {args.dim}] fp32 + Relu, external data, generated without a >2 GB protobuf.", "",
        "| weights | quantize wall s | peak RSS GB | RSS / weights | output size GB | loads and runs in ORT |",
        "|---|---|---|---|---|---|",
        f"| {weights / 1e9:.2f} GB | {wall:.0f} | {rss_kb / 1e6:.2f} | {ratio:.2f}x {'(MET, < 2x)' if ratio < 2 else '(NOT MET, >= 2x)'} | "
        f"{out_bytes / 1e9:.2f} | {loads} |",
        "",
    ])  # fmt: skip
    print(text)
    if args.write:
        append_results(text)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
