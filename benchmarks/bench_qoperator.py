"""QDQ vs its QOperator lowering (``--format qoperator`` / ``--preset qoperator``) on real models.

For each QDQ model (onnxq's own w8a8 MobileNetV2, and onnxruntime ``quantize_static`` QDQ models of
MobileNetV2, SqueezeNet and MiniLM) this lowers it with onnxq's ``qoperator`` pass and compares, in ONNX
Runtime on the CPU:

* the lowered model against the QDQ model run *without* graph optimisations (the exact QDQ arithmetic:
  float ops between DequantizeLinear and QuantizeLinear) and *with* them (what ORT really executes: it
  fuses the QDQ units into the same integer kernels);
* max and mean |difference| of the outputs in units of the output quantization step (the scale of the
  DequantizeLinear before the output; for float logits, 1/255 of the reference logits' range), top-1
  agreement on ImageNet images (MiniLM: cosine of the sentence embeddings on STS sentences);
* latency (median of ``--runs`` runs, batch 1, one intra-op thread, the models' runs interleaved) of the
  QDQ model (ORT default optimisations) and of the lowered model.

Usage:
    python benchmarks/bench_qoperator.py [--images 100] [--runs 30] [--calib-size 32] [--workdir DIR]

Prints a Markdown section to paste into RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ASSETS, IMAGENET, calibration_indices, cpu_info, load_images, make_session  # noqa: E402
from _harness import FeedReader, round_robin

from onnxq.model import to_graph, to_model  # noqa: E402
from onnxq.passes import build_passes  # noqa: E402
from onnxq.pipeline import PassContext, Pipeline  # noqa: E402
from onnxq.recipe import preset  # noqa: E402
from onnxq.report import Report  # noqa: E402
from onnxq.target import PROFILES, detect_target  # noqa: E402


def lower(path: Path, out: Path, target: str | None = None) -> tuple[dict, list[str], float]:
    """Lower a QDQ file with the qoperator preset's passes for ``target`` (default: this machine's profile)."""
    model = onnx.load(path)
    ctx = PassContext(report=Report(), progress=False, target=PROFILES[target] if target else detect_target()[0])
    t0 = time.perf_counter()
    graph = Pipeline(build_passes(preset("qoperator"))).run(to_graph(model), ctx)
    seconds = time.perf_counter() - t0
    onnx.save(to_model(graph, template=model), out)
    step = ctx.report.steps[-1]
    return step.counts, step.notes, seconds


def output_step(path: Path, ref: np.ndarray) -> tuple[float, str]:
    """Scale of the DequantizeLinear that writes the first graph output, else the float logits' range / 255."""
    m = onnx.load(path)
    name = m.graph.output[0].name
    inits = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:
        if n.output[0] == name and n.op_type == "DequantizeLinear" and n.input[1] in inits:
            return float(onnx.numpy_helper.to_array(inits[n.input[1]]).reshape(-1)[0]), "output scale"
    return float(ref.max() - ref.min()) / 255, "logit range / 255"


def latencies(paths: dict[str, Path], feed: dict, runs: int) -> dict[str, float]:
    """Median ms per run of each model (ORT default optimisations, one intra-op thread), runs interleaved so
    that load changes on a shared machine hit every model alike."""
    sessions = {k: make_session(p, "all", threads=1) for k, p in paths.items()}
    times = round_robin({k: lambda s=s: s.run(None, feed) for k, s in sessions.items()}, runs, warmup=3)
    return {k: float(np.median(v)) * 1000 for k, v in times.items()}


def compare_images(key: str, qdq: Path, qop: Path, x: np.ndarray, runs: int, qop_int8: Path | None = None) -> dict:
    """``qop_int8``: the same model lowered for an int32-accumulating target (int8 weights kept)."""
    name = onnx.load(qdq).graph.input[0].name
    s_ref, s_ort, s_qop = make_session(qdq, "none"), make_session(qdq, "all"), make_session(qop, "all")
    sessions = [("ref", s_ref), ("ort", s_ort), ("qop", s_qop)]
    if qop_int8 is not None:
        sessions.append(("qop8", make_session(qop_int8, "all")))
    outs = {k: np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))]) for k, s in sessions}
    step, unit = output_step(qdq, outs["ref"])
    row = {"model": key, "unit": unit, "step": step}
    for other in ("ref", "ort"):
        d = np.abs(outs["qop"].astype(np.float64) - outs[other])
        row[f"max_{other}"], row[f"mean_{other}"] = d.max() / step, d.mean() / step
        row[f"agree_{other}"] = 100 * float(np.mean(outs["qop"].argmax(1) == outs[other].argmax(1)))
    row["agree_ort_ref"] = 100 * float(np.mean(outs["ort"].argmax(1) == outs["ref"].argmax(1)))
    paths = {"ort": qdq, "qop": qop, **({"qop8": qop_int8} if qop_int8 is not None else {})}
    ms = latencies(paths, {name: x[:1]}, runs)
    row["ms_qdq"], row["ms_qop"] = ms["ort"], ms["qop"]
    if qop_int8 is not None:
        row["max_qop8_ort"] = float(np.abs(outs["qop8"].astype(np.float64) - outs["ort"]).max()) / step
        row["ms_qop8"] = ms["qop8"]
    return row


def compare_minilm(qdq: Path, qop: Path, runs: int, n: int = 40) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ASSETS / "minilm" / "tokenizer.json"))
    lines = (ASSETS / "sts" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[100:100 + n]
    feeds = []
    for line in lines:
        ids = np.array([tok.encode(line.split("\t")[5]).ids], np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    sess = {k: make_session(p, o) for k, p, o in (("ref", qdq, "none"), ("ort", qdq, "all"), ("qop", qop, "all"))}
    emb = {k: [s.run(["sentence_embedding"], f)[0][0] for f in feeds] for k, s in sess.items()}

    def cos(a: list, b: list) -> float:
        return float(np.mean([(u * v).sum() / np.linalg.norm(u) / np.linalg.norm(v) for u, v in zip(a, b)]))

    ms = latencies({"ort": qdq, "qop": qop}, feeds[0], runs)
    return {"model": "MiniLM (ORT QDQ)", "cos_ref": cos(emb["qop"], emb["ref"]), "cos_ort": cos(emb["qop"], emb["ort"]),
            "cos_ort_ref": cos(emb["ort"], emb["ref"]), "ms_qdq": ms["ort"], "ms_qop": ms["qop"]}  # fmt: skip


def ort_quantize(src: Path, dst: Path, feeds: list[dict]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(dst), FeedReader(feeds), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_qop_"))
    work.mkdir(parents=True, exist_ok=True)
    x_all, _, _ = load_images("torch")
    x = x_all[[i * len(x_all) // args.images for i in range(args.images)]]
    calib = calibration_indices(len(x_all), args.calib_size)
    mnv2, squeeze = ASSETS / "cnn" / "mobilenetv2-7" / "model.onnx", ASSETS / "cnn" / "squeezenet1.1" / "model.onnx"

    models: list[tuple[str, Path]] = []
    onnxq_qdq = work / "mnv2.onnxq.qdq.onnx"
    subprocess.run(["onnxq", "quantize", str(mnv2), "-o", str(onnxq_qdq), "--calib", str(IMAGENET), "--calib-preprocess",
                    "torch", "--calib-size", str(args.calib_size), "--no-progress"], check=True, capture_output=True)  # fmt: skip
    models.append(("MobileNetV2 (onnxq w8a8 QDQ)", onnxq_qdq))
    for key, src, inp in (("MobileNetV2 (ORT QDQ)", mnv2, "input"), ("SqueezeNet 1.1 (ORT QDQ)", squeeze, "data")):
        dst = work / f"{src.parent.name}.ort.qdq.onnx"
        ort_quantize(src, dst, [{inp: x_all[i:i + 1]} for i in calib])
        models.append((key, dst))
    rows, notes = [], {}
    for key, qdq in models:
        qop = qdq.with_name(qdq.name.replace(".qdq.", ".qop."))
        counts, step_notes, secs = lower(qdq, qop)
        notes[key] = (counts, step_notes, secs)
        qop8 = None
        if "ORT" in key:  # full 8-bit weights: also lowered keeping int8 (what a VNNI / ARM target gets)
            qop8 = qdq.with_name(qdq.name.replace(".qdq.", ".qop-int8."))
            lower(qdq, qop8, "x86-vnni")
        rows.append(compare_images(key, qdq, qop, x, args.runs, qop8))
    minilm_qdq = work / "minilm.ort.qdq.onnx"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ASSETS / "minilm" / "tokenizer.json"))
    sents = [ln.split("\t")[5] for ln in (ASSETS / "sts" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[:16]]
    feeds = []
    for s in sents:
        ids = np.array([tok.encode(s).ids], np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    ort_quantize(ASSETS / "minilm" / "model.onnx", minilm_qdq, feeds)
    minilm_qop = work / "minilm.ort.qop.onnx"
    notes["MiniLM (ORT QDQ)"] = lower(minilm_qdq, minilm_qop)
    mrow = compare_minilm(minilm_qdq, minilm_qop, args.runs)

    info = cpu_info()
    target = detect_target()[0].name
    import onnxruntime

    print(f"## {_dt.datetime.now():%Y-%m-%d %H:%M} - bench_qoperator.py\n")
    print(f"Machine: {info['model']}, {info['cores']} cores; avx2={info['avx2']} avx512f={info['avx512f']} "
          f"avx512_vnni={info['avx512_vnni']} avx_vnni={info['avx_vnni']}; target profile {target}; "
          f"onnxruntime {onnxruntime.__version__}; {args.images} images, calibration {args.calib_size} images.\n")  # fmt: skip
    print("| model | unit | QOp vs QDQ exact: max / mean steps, top-1 agree | QOp vs QDQ as ORT runs it: max / mean, agree "
          "| ORT-run QDQ vs exact: agree | latency QDQ / QOp (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['unit']} ({r['step']:.4g}) | {r['max_ref']:.1f} / {r['mean_ref']:.2f}, {r['agree_ref']:.0f}% "
              f"| {r['max_ort']:.1f} / {r['mean_ort']:.2f}, {r['agree_ort']:.0f}% | {r['agree_ort_ref']:.0f}% "
              f"| {r['ms_qdq']:.2f} / {r['ms_qop']:.2f} ({r['ms_qop'] / r['ms_qdq']:.2f}x) |")  # fmt: skip
    print(f"\nMiniLM (ORT QDQ): mean cosine of sentence embeddings, QOp vs exact QDQ {mrow['cos_ref']:.4f}, vs ORT-run QDQ "
          f"{mrow['cos_ort']:.4f} (ORT-run vs exact {mrow['cos_ort_ref']:.4f}); latency {mrow['ms_qdq']:.2f} / "
          f"{mrow['ms_qop']:.2f} ms ({mrow['ms_qop'] / mrow['ms_qdq']:.2f}x)\n")  # fmt: skip
    for key, (counts, step_notes, secs) in notes.items():
        lowered = {k: v for k, v in counts.items() if "->" in k}
        other = {k: v for k, v in counts.items() if "->" not in k and v}
        print(f"- {key}: lowered in {secs:.2f} s; {other}; {lowered}")
        for n in step_notes[1:]:
            print(f"  - {n}")
    for r in rows:
        if "max_qop8_ort" in r:
            print(f"- {r['model']} lowered for --target x86-vnni (int8 weights kept): max {r['max_qop8_ort']:.1f} steps from "
                  f"the QDQ model as ORT runs it on this CPU; latency {r['ms_qop8']:.2f} ms ({r['ms_qop8'] / r['ms_qdq']:.2f}x QDQ)")


if __name__ == "__main__":
    main()
