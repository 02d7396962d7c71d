"""Side-by-side benchmark: onnxq ``--preset int8-dynamic`` vs onnxruntime.quantization.quantize_dynamic.

Models and metrics (assets in ``../shared/assets``; SmolLM2 from ``/tmp/smollm2/smollm2.onnx`` or
``--smollm2 PATH``):

* ``minilm``: all-MiniLM-L6-v2, STS-dev Spearman of the cosine of the two sentence embeddings vs the gold
  score (fp32 0.867), mean cosine of every embedding to its fp32 embedding, ORT CPU latency at batch 32 x
  64 tokens (median of ``--runs``, the models timed round-robin) and its ratio to fp32, file size.
* ``stories260k``: llama2.c stories260K, perplexity on the TinyStories tokens (fp32 3.520).
* ``smollm2``: SmolLM2-135M-Instruct, perplexity on the wikitext-2 tokens (fp32 28.72).

Variants: fp32; onnxq int8-dynamic (its defaults: per-row activations, block-64 Hadamard rotation,
``--target auto``), the same on ``--target x86-avx2-u8``, onnxq per-row without rotation, onnxq per-tensor
(no rotation); onnxruntime ``quantize_dynamic`` per-tensor, per-channel, per-channel + reduce_range (its
defaults otherwise: QInt8 weights, every op type it supports), and ``ort per-channel, exact``: the
per-channel output with its int8 weights moved to uint8 (+128, zero point +128), which makes ORT run its
u8 x u8 kernels that do not saturate, so it shows what the per-channel model computes without the
int16 saturation of VPMADDUBSW. Each quantizer runs in its own subprocess (wall time, peak RSS).

STS data and embeddings come from ``sts_eval.py`` (batches padded to their longest sentence, with a real
attention mask), perplexity from ``perplexity.py`` (the shared protocol).

``--sensitivity`` instead prints, per SmolLM2 layer type, the output SQNR of the weight MatMuls under each
error source alone (per-tensor / per-row / rotated per-row activations, 8- / 7-bit weights), from one
512-token wikitext piece: which layers hurt and why.

Usage:
    python benchmarks/bench_dynamic.py [--models minilm,stories260k,smollm2] [--limit N] [--runs 10]
                                       [--workdir DIR] [--json OUT.json]
    python benchmarks/bench_dynamic.py --sensitivity
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness
from _common import ASSETS, cpu_info, make_session  # noqa: E402
from _harness import model_size_mb, parse_args_or_run_ort_child

SMOLLM2 = Path(os.environ.get("ONNXQ_SMOLLM2", "/tmp/smollm2/smollm2.onnx"))
MODELS = {
    "minilm": ASSETS / "minilm/model.onnx",
    "stories260k": ASSETS / "llm/stories260K/stories260K.onnx",
    "smollm2": SMOLLM2,
}
TOKENS = {
    "stories260k": ASSETS / "text/tokens/stories260K__tinystories_valid_shared.json",
    "smollm2": ASSETS / "text/tokens/smollm2__wikitext2_test_shared.json",
}
# onnxq variants: name -> (extra CLI flags, recipe TOML text or None)
ONNXQ = {
    "onnxq int8-dynamic": ([], None),
    "onnxq int8-dynamic, x86-avx2-u8": (["--target", "x86-avx2-u8"], None),
    "onnxq per-row, no rotation": ([], '[dynamic]\nhadamard_block = 0\n'),
    "onnxq per-tensor": ([], '[dynamic]\nactivation_granularity = "per-tensor"\nhadamard_block = 0\n'),
}
ORT = {
    "ort per-tensor": {},
    "ort per-channel": {"per_channel": True},
    "ort per-channel + reduce_range": {"per_channel": True, "reduce_range": True},
}


@dataclass
class Row:
    model: str
    variant: str
    path: str = ""
    quant_s: float | None = None
    peak_rss_mb: float | None = None
    size_mb: float | None = None
    metrics: dict = field(default_factory=dict)
    error: str = ""


def quantize_onnxq(model: str, src: Path, out: Path, name: str) -> Row:
    flags, toml = ONNXQ[name]
    args = [str(src), "-o", str(out), "--no-progress", *flags]
    if toml is None:
        args += ["--preset", "int8-dynamic"]
    else:
        recipe = out.with_suffix(".toml")
        recipe.write_text('preset = "int8-dynamic"\n' + toml)
        args += ["--recipe", str(recipe)]
    run = harness.quantize_onnxq(args)
    row = Row(model, name, str(out), run.wall_s, run.peak_rss_mb)
    if not run.succeeded(out):
        row.error = run.failure("onnxq")
    return row


def quantize_ort(model: str, src: Path, out: Path, name: str) -> Row:
    run = harness.quantize_ort_child(__file__, {"model": str(src), "out": str(out), "kwargs": ORT[name]})
    row = Row(model, name, str(out), run.wall_s, run.peak_rss_mb)
    if not run.succeeded(out):
        row.error = run.failure("ort")
    return row


def _ort_child(job: dict) -> None:
    """Child body: onnxruntime quantize_dynamic (QInt8 weights) with the job's keywords."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(job["model"], job["out"], weight_type=QuantType.QInt8, **job["kwargs"])


def exact_copy(src: Path, out: Path) -> Path:
    """The ORT model with every int8 MatMulInteger weight moved to uint8 (+128, zero point +128)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    inits = {t.name: t for t in m.graph.initializer}
    moved = 0
    for node in m.graph.node:
        if node.op_type != "MatMulInteger" or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.dtype != np.int8:
            continue
        zp = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] in inits else np.zeros((), np.int8)
        wn, zn = f"{node.input[1]}_u8", f"{node.input[1]}_zp_u8"
        if wn not in inits:
            for name, arr in ((wn, (w.astype(np.int16) + 128).astype(np.uint8)), (zn, (zp.astype(np.int16) + 128).astype(np.uint8))):
                t = numpy_helper.from_array(arr, name)
                m.graph.initializer.append(t)
                inits[name] = t
        while len(node.input) < 4:
            node.input.append("")
        node.input[1], node.input[3] = wn, zn
        moved += 1
    onnx.save(m, str(out))
    print(f"  exact copy: {moved} MatMulInteger weights moved to uint8")
    return out


# --------------------------------------------------------------------------- evaluation


def eval_minilm(rows: list[Row], limit: int | None, runs: int) -> None:
    from scipy.stats import spearmanr
    from sts_eval import embed, read_pairs

    a, b, gold = read_pairs(limit=limit)
    ref = None
    for r in rows:
        if r.error:
            continue
        sess = make_session(r.path)
        ea, eb = embed(sess, a), embed(sess, b)
        cos = np.sum(ea * eb, 1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1))
        e = np.concatenate([ea, eb])
        ref = e if ref is None else ref
        r.metrics["spearman"] = float(spearmanr(cos, gold).statistic)
        r.metrics["cosine_to_fp32"] = float(np.mean(np.sum(e * ref, 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))))
        print(f"  {r.variant:40s} spearman {r.metrics['spearman']:.4f}  cosine {r.metrics['cosine_to_fp32']:.5f}", flush=True)
    # latency: batch 32 x 64 random tokens, every model once per round, median over rounds
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (32, 64)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    live = [r for r in rows if not r.error]
    sessions = {r.variant: make_session(r.path) for r in live}
    times = harness.round_robin({v: lambda s=s: s.run(None, feed) for v, s in sessions.items()}, runs, warmup=1)
    base = float(np.median(times[live[0].variant]))
    for r in live:
        r.metrics["latency_ms"] = 1000 * float(np.median(times[r.variant]))
        r.metrics["latency_vs_fp32"] = float(np.median(times[r.variant])) / base


def eval_llm(rows: list[Row], tokens_file: Path, limit: int | None) -> None:
    from perplexity import load_tokens, perplexity

    tokens = load_tokens(tokens_file)
    for r in rows:
        if r.error:
            continue
        res = perplexity(make_session(r.path), tokens, limit=limit, progress=False)
        r.metrics["ppl"] = res.ppl
        r.metrics["pieces"] = res.pieces
        print(f"  {r.variant:40s} ppl {res.ppl:.3f} ({res.pieces} pieces, {res.seconds:.0f}s)", flush=True)


# --------------------------------------------------------------------------- layer sensitivity


def sensitivity(model_path: Path, tokens_file: Path, workdir: Path, piece: int = 1) -> str:
    """Output SQNR (dB) of every weight MatMul under each error source alone, averaged per layer type.

    Runs the float model once on one 512-token piece with every weight MatMul's input exposed, then in
    numpy compares ``x @ W`` with: per-tensor uint8 activations (DynamicQuantizeLinear's grid), per-row
    symmetric int8-grid activations, the same after a block-64 Hadamard rotation; per-column symmetric
    weights in 8 and 7 bits (min-max). Higher is better; 10 dB more is 10x less error power.
    """
    import collections

    import onnx
    from onnx import numpy_helper
    from perplexity import load_tokens

    model = onnx.load(str(model_path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    mms = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights and weights[n.input[1]].ndim == 2]
    acts = sorted({n.input[0] for n in mms})
    for a in acts:
        model.graph.output.append(onnx.helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, None))
    probe = workdir / "probe.onnx"
    onnx.save(model, str(probe), save_as_external_data=True, location="probe.onnx.data")
    tokens = load_tokens(tokens_file)[piece * 512:(piece + 1) * 512][None]
    values = dict(zip(acts, make_session(str(probe)).run(acts, {"input_ids": tokens})))

    def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
        return float(10 * np.log10((ref ** 2).sum() / max(((ref - got) ** 2).sum(), 1e-30)))

    def per_tensor(x: np.ndarray) -> np.ndarray:
        lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
        s = (hi - lo) / 255
        zp = np.rint(-lo / s)
        return (np.clip(np.rint(x / s) + zp, 0, 255) - zp) * s

    def per_row(x: np.ndarray) -> np.ndarray:
        s = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-30) / 127
        return np.rint(x / s) * s

    def weight(w: np.ndarray, qmax: int) -> np.ndarray:
        s = np.maximum(np.abs(w).max(0), 1e-30) / qmax
        return np.rint(w / s) * s

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from onnxq.passes.dynamic import hadamard

    h = hadamard(64)
    rows: dict[str, list[tuple[float, ...]]] = collections.defaultdict(list)
    for n in mms:
        x = values[n.input[0]].reshape(-1, values[n.input[0]].shape[-1]).astype(np.float64)
        w = weights[n.input[1]].astype(np.float64)
        y = x @ w
        k = w.shape[0]
        xr = (x.reshape(-1, 64) @ h).reshape(x.shape) if k % 64 == 0 else x
        wr = np.einsum("li,jln->jin", h, w.reshape(k // 64, 64, -1)).reshape(w.shape) if k % 64 == 0 else w
        kind = "lm_head" if "lm_head" in n.name else n.name.split("/")[-2]
        rows[kind].append((sqnr(y, per_tensor(x) @ w), sqnr(y, per_row(x) @ w), sqnr(y, per_row(xr) @ wr),
                           sqnr(y, x @ weight(w, 127)), sqnr(y, x @ weight(w, 64)),
                           sqnr(y, per_row(xr) @ weight(wr, 64)), sqnr(y, per_row(xr) @ weight(wr, 127))))  # fmt: skip
    head = ("| layer type | n | activations per-tensor | per-row | per-row + Hadamard-64 | weights 8-bit | 7-bit | "
            "onnxq default on x86-avx2 (rotated per-row + 7-bit) | same, 8-bit weights |")
    out = [head, "|---" * 9 + "|"]
    for kind, vals in list(rows.items()) + [("all", [v for vs in rows.values() for v in vs])]:
        m, lo = np.mean(vals, axis=0), np.min(vals, axis=0)
        out.append(f"| {kind} | {len(vals)} | " + " | ".join(f"{a:.1f} (min {b:.1f})" for a, b in zip(m, lo)) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def bench(model: str, workdir: Path, args) -> list[Row]:
    src = MODELS[model]
    if not src.exists():
        print(f"{model}: {src} not found, skipped")
        return []
    print(f"{model}: quantizing", flush=True)
    rows = [Row(model, "fp32", str(src), size_mb=model_size_mb(src))]
    for name in ONNXQ:
        rows.append(quantize_onnxq(model, src, workdir / f"{model}.{len(rows)}.onnx", name))
    for name in ORT:
        rows.append(quantize_ort(model, src, workdir / f"{model}.{len(rows)}.onnx", name))
        if name == "ort per-channel" and not rows[-1].error:
            rows.append(Row(model, "ort per-channel, exact u8 x u8 arithmetic",
                            str(exact_copy(Path(rows[-1].path), workdir / f"{model}.{len(rows)}.onnx"))))
    for r in rows:
        if not r.error and r.size_mb is None and r.variant.startswith(("onnxq", "ort per")) and "exact" not in r.variant:
            r.size_mb = model_size_mb(Path(r.path))
        print(f"  {r.variant:40s} {r.error or f'{r.quant_s or 0:.1f}s {r.size_mb or 0:.1f} MB'}", flush=True)
    if model == "minilm":
        eval_minilm(rows, args.limit, args.runs)
    else:
        eval_llm(rows, TOKENS[model], args.limit)
    return rows


def _opt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    minilm_head = ["| variant | STS-dev Spearman | Δ vs fp32 | mean cosine to fp32 | latency ms (32x64) | vs fp32 | "
                   "size MB | quantize s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    llm_head = ["| variant | perplexity | vs fp32 | size MB | quantize s | peak RSS MB |", "|---|---|---|---|---|---|"]
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        mr = [r for r in rows if r.model == model]
        fp = mr[0].metrics
        out += [f"\n**{model}**\n", *(minilm_head if model == "minilm" else llm_head)]
        for r in mr:
            m = r.metrics
            if r.error:
                out.append(f"| {r.variant} | {r.error} |")
            elif model == "minilm":
                out.append(f"| {r.variant} | {m['spearman']:.4f} | {m['spearman'] - fp['spearman']:+.4f} | "
                           f"{m['cosine_to_fp32']:.4f} | {m['latency_ms']:.0f} | {m['latency_vs_fp32']:.2f}x | "
                           f"{_opt(r.size_mb, '.1f')} | {_opt(r.quant_s, '.1f')} |")  # fmt: skip
            else:
                out.append(f"| {r.variant} | {m['ppl']:.3f} | {100 * (m['ppl'] / fp['ppl'] - 1):+.1f}% | "
                           f"{_opt(r.size_mb, '.1f')} | {_opt(r.quant_s, '.0f')} | {_opt(r.peak_rss_mb, '.0f')} |")  # fmt: skip
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,stories260k,smollm2")
    ap.add_argument("--limit", type=int, default=None, help="STS pairs / perplexity pieces (quick runs)")
    ap.add_argument("--runs", type=int, default=10, help="latency rounds (median)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--sensitivity", action="store_true",
                    help="instead: per-layer-type output SQNR of SmolLM2 under each error source (one piece)")
    args = parse_args_or_run_ort_child(ap, argv, _ort_child)
    if args is None:  # the --_ort-child run is done
        return
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="onnxq_dyn_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.sensitivity:
        print(sensitivity(MODELS["smollm2"], TOKENS["smollm2"], workdir))
        return
    load0 = os.getloadavg()[0]
    rows: list[Row] = []
    for model in args.models.split(","):
        rows += bench(model, workdir, args)
    info = cpu_info()
    import onnxruntime

    print(f"\n{info['model']}, {info['cores']} cores; AVX2 {info['avx2']}, AVX-512 {info['avx512f']}, "
          f"VNNI {info['avx512_vnni'] or info['avx_vnni']}; onnxruntime {onnxruntime.__version__}; "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
