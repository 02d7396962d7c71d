"""Weight-only int4: onnxq ``w4-rtn`` / ``w4-gptq`` / ``w4-awq`` vs onnxruntime's ``MatMulNBitsQuantizer``.

ORT baselines (``onnxruntime.quantization.matmul_nbits_quantizer``, all QOperator ``MatMulNBits``):

* ``ort-rtn``: ``DefaultWeightOnlyQuantConfig`` (round to nearest, C++ kernel; asymmetric, and symmetric at
  block 128);
* ``ort-gptq``: ``GPTQWeightOnlyQuantConfig`` (ORT's bundled copy of Intel Neural Compressor's numpy GPTQ;
  needs a ``CalibrationDataReader``: the same token windows onnxq gets; ``percdamp`` 0.01, GPTQ lazy-batch
  block 128, no act-order, asymmetric);
* ``ort-hqq``: ``HQQWeightOnlyQuantConfig`` (half-quadratic optimisation of the zero points, float zero
  points; needs torch; asymmetric only).
* ``ort-rtn-fp32head`` (only when named in ``--methods``): ORT RTN with the lm_head MatMul excluded
  (``nodes_to_exclude``), which is how the assets README's RTN figures were made; ORT's default quantizes
  every MatMul with a constant weight, lm_head included, and leaves the embedding Gather in fp32.

onnxq: ``onnxq quantize IN -o OUT --preset w4-rtn|w4-gptq|w4-awq --block-size B [--calib TOKENS.json
--calib-size N --seq-len 512]``. While that CLI does not exist yet ("unknown preset", "unknown pass", "No
such option"), the onnxq rows are reported as skipped and the run goes on.

For every (model, method, block in ``--blocks``): quantization wall time and peak RSS (each quantizer in its
own subprocess under ``/usr/bin/time -f %M``), output size (model + external data), perplexity on the
shared tokens (``perplexity.py``'s default protocol: 512-token pieces, every token after the first scored
once), ORT CPU latency of one 1 x 256 forward (median of ``--runs`` after 2 warm-up runs, the models of one
LLM timed round-robin, ``intra_op_num_threads = 2``, ORT_ENABLE_ALL), and gap recovery
``(ppl_rtn - ppl) / (ppl_rtn - ppl_fp32)`` against onnxq RTN at the same block (ORT RTN asymmetric when
onnxq RTN is absent). Also fp32 (perplexity, size, latency).

Models: stories260K (``../shared/assets/llm/stories260K``, TinyStories tokens, fp32 ppl 3.520) and
SmolLM2-135M-Instruct (``/tmp/smollm2/smollm2.onnx``, built by ``models/smollm2.py`` from a Q4_1 GGUF
checkpoint, so every 4-bit figure on it is "from a Q4_1 checkpoint"; wikitext-2 tokens, fp32 ppl 28.72).

Calibration (GPTQ, AWQ):

* stories260K: the token file is also the evaluation text (no other TinyStories tokens exist for this
  tokenizer), so the main rows calibrate on its first 32 windows of 512 tokens (overlapping the evaluated
  text, as for every calibrated quantizer in bench_transformers.py). A held-out variant calibrates on
  windows 0..20 only and every stories row also reports ``ppl_heldout``: perplexity of tokens 21 x 512
  onwards (22 pieces), which no held-out calibration saw.
* SmolLM2: the eval tokens are the first 20,481 tokens of wikitext-2 test; calibration takes the 32 windows
  of 512 tokens that follow them in ``../shared/assets/text/wikitext2-test-head70.txt``. There is no
  tokenizer.json for SmolLM2 here, so the script rebuilds its byte-level BPE tokenizer from the GGUF's
  vocabulary and merges (``tokenizers``; needs the ``gguf`` package and the cached GGUF) and checks that it
  reproduces the shared eval token list exactly before using it; if it cannot, SmolLM2 calibrated rows are
  skipped with the reason. ORT GPTQ on SmolLM2 (first 8 of these windows) is off unless
  ``--ort-gptq-smollm2``: it was measured earlier at 68.5 min and 3.7 GB on this machine.

Each row's calibration windows are written as an exact token JSON (``N x 512`` tokens) under the work
folder, so onnxq (``--calib FILE --calib-size N --seq-len 512``) and ORT see the same windows.

Results are kept per row in ``WORKDIR/rows.json`` (a rerun measures only what is missing; ``--fresh``
redoes everything), and rows already in ``benchmarks/results/int4_ort_baselines.json`` (ORT and fp32) are
reused unless ``--remeasure-ort``; latency is re-measured for every row whose model file still exists, so
that the figures of one table come from one run. torch is imported only by the ORT HQQ child process,
never by onnxq.

Usage::

    python benchmarks/bench_int4.py [--models stories260K,smollm2]
        [--methods ort-rtn,ort-gptq,ort-hqq,onnxq-rtn,onnxq-gptq,onnxq-awq] [--blocks 32,128]
        [--ort-gptq-smollm2] [--limit N] [--runs 10] [--workdir /tmp/bench_int4] [--fresh] [--write]

``--write`` saves every row to ``benchmarks/results/int4.json`` (the ORT and fp32 rows also to
``benchmarks/results/int4_ort_baselines.json``) and prints the markdown section for RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as harness
from _common import ASSETS, cpu_info, make_session  # noqa: E402
from _harness import FeedReader, model_size_mb, parse_args_or_run_ort_child

SMOLLM2 = Path(os.environ.get("ONNXQ_SMOLLM2", "/tmp/smollm2/smollm2.onnx"))
SMOLLM2_GGUF = SMOLLM2.parent / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS_DIR = HERE / "results"
BASELINES = RESULTS_DIR / "int4_ort_baselines.json"
SEQ = 512
LOAD_NOTE = "shared with other jobs"

MODELS = {
    "stories260K": {
        "path": ASSETS / "llm/stories260K/stories260K.onnx",
        "tokens": ASSETS / "text/tokens/stories260K__tinystories_valid_shared.json",
        "fp32_ref": 3.520,
        "calib_windows": 32,
        "heldout_windows": 21,  # calibrate on windows 0..20, evaluate tokens 21*512 onwards
        "note": "dim 64, 5 layers, FFN 172 (K = 172 is not a multiple of 32), vocab 512, tied head exported "
                "as a separate [64, 512] MatMul weight",
    },
    "smollm2": {
        "path": SMOLLM2,
        "tokens": ASSETS / "text/tokens/smollm2__wikitext2_test_shared.json",
        "fp32_ref": 28.72,
        "calib_windows": 32,
        "ort_gptq_windows": 8,
        "text": ASSETS / "text/wikitext2-test-head70.txt",
        "note": "SmolLM2-135M-Instruct built from a Q4_1 GGUF checkpoint (4-bit figures are 'from a Q4_1 "
                "checkpoint'); tied embeddings exported as Gather [49152, 576] + a separate lm_head MatMul "
                "weight [576, 49152]",
    },
}
ALIASES = {"stories260k": "stories260K", "stories": "stories260K", "smollm2": "smollm2", "stories260K": "stories260K"}
METHODS = ["ort-rtn", "ort-gptq", "ort-hqq", "onnxq-rtn", "onnxq-gptq", "onnxq-awq", "onnxq-gptq-awq"]
# not run by default: ORT RTN with the lm_head MatMul left in fp32 (how the assets README's RTN figures were made)
# and onnxq with the lm_head left float (--lm-head float), to compare with those figures like for like
EXTRA_METHODS = ["ort-rtn-fp32head", "onnxq-rtn-fp32head", "onnxq-gptq-fp32head", "onnxq-awq-fp32head"]
CALIBRATED = {"ort-gptq", "onnxq-gptq", "onnxq-awq", "onnxq-gptq-awq", "onnxq-gptq-fp32head", "onnxq-awq-fp32head"}
ONNXQ_PRESET = {"onnxq-rtn": "w4-rtn", "onnxq-gptq": "w4-gptq", "onnxq-awq": "w4-awq", "onnxq-gptq-awq": "w4-gptq-awq",
                "onnxq-rtn-fp32head": "w4-rtn",
                "onnxq-gptq-fp32head": "w4-gptq", "onnxq-awq-fp32head": "w4-awq"}
# onnxq stderr fragments that mean "int4 not implemented yet" (skip, not a failure)
ONNXQ_MISSING = ("unknown preset", "unknown pass", "no such option", "invalid value for '--preset'")


# --------------------------------------------------------------------------- rows


def variant_name(method: str, block: int, symmetric: bool, heldout: bool = False) -> str:
    name = f"{method} b{block} {'sym' if symmetric else 'asym'}"
    return name + " calib 0-20" if heldout else name


def plan(models: list[str], methods: list[str], blocks: list[int], ort_gptq_smollm2: bool) -> list[dict]:
    """Every row to measure, fp32 first per model."""
    rows = []
    for model in models:
        rows.append({"model": model, "variant": "fp32", "method": "fp32", "block": None, "symmetric": None})
        for method in methods:
            for block in blocks:
                syms = [False, True] if method == "ort-rtn" and block == 128 else [False]
                for sym in syms:
                    row = {"model": model, "variant": variant_name(method, block, sym), "method": method,
                           "block": block, "symmetric": sym}
                    if method == "ort-gptq" and model == "smollm2" and not ort_gptq_smollm2:
                        row["skipped"] = ("skipped: 68.5 min measured earlier (3.7 GB peak RSS) for ORT GPTQ on "
                                          "SmolLM2; pass --ort-gptq-smollm2 to run it")
                    rows.append(row)
                    if method in CALIBRATED and model == "stories260K":
                        rows.append({**row, "variant": variant_name(method, block, sym, heldout=True), "heldout": True})
    return rows


def key(row: dict) -> str:
    return f"{row['model']}|{row['variant']}"


# --------------------------------------------------------------------------- calibration data


def _smollm2_tokenizer(work: Path):
    """SmolLM2's tokenizer rebuilt from the GGUF's vocabulary and merges, checked against the eval tokens.

    Returns (tokenizer, note) or (None, reason).
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError as e:
        return None, f"no `tokenizers` package ({e})"
    saved = work / "smollm2_tokenizer_from_gguf.json"
    for cand in (SMOLLM2.parent / "tokenizer.json", saved):
        if cand.is_file():
            tok, note = Tokenizer.from_file(str(cand)), f"tokenizer {cand}"
            break
    else:
        if not SMOLLM2_GGUF.is_file():
            return None, f"no tokenizer.json and no GGUF at {SMOLLM2_GGUF} to rebuild one from"
        try:
            import gguf
        except ImportError:
            return None, "no tokenizer.json, and the `gguf` package (to rebuild it from the GGUF) is not installed"
        reader = gguf.GGUFReader(str(SMOLLM2_GGUF))
        vocab = {t: i for i, t in enumerate(reader.fields["tokenizer.ggml.tokens"].contents())}
        merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
        # SmolLM2 ("smollm" pre-tokenizer): single digits, then GPT-2 byte-level BPE without a prefix space
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
        tok.save(str(saved))
        note = f"tokenizer rebuilt from {SMOLLM2_GGUF.name} (vocab + merges)"
    from perplexity import load_tokens

    ref = load_tokens(MODELS["smollm2"]["tokens"])
    text = Path(MODELS["smollm2"]["text"]).read_text()
    got = np.asarray(tok.encode(text[: 120_000]).ids[: len(ref)])
    if len(got) < len(ref) or not np.array_equal(got, ref):
        return None, f"{note} does not reproduce the shared eval tokens; no SmolLM2 calibration text"
    return tok, note + f", reproduces all {len(ref):,} shared eval tokens"


def calibration_file(model: str, n_windows: int, work: Path) -> tuple[Path | None, str]:
    """A token JSON holding exactly ``n_windows`` x 512 calibration tokens (or None, reason)."""
    out = work / "calib" / f"{model}_{n_windows}x{SEQ}.json"
    desc_path = out.with_suffix(".txt")
    if out.is_file() and desc_path.is_file():
        return out, desc_path.read_text()
    from perplexity import load_tokens

    if model == "stories260K":
        toks = load_tokens(MODELS[model]["tokens"])[: n_windows * SEQ]
        desc = (f"windows 0..{n_windows - 1} (tokens 0..{n_windows * SEQ - 1}) of the evaluation token file "
                "(the only TinyStories tokens for this tokenizer)")
    else:
        tok, note = _smollm2_tokenizer(work)
        if tok is None:
            return None, note
        n_eval = len(load_tokens(MODELS[model]["tokens"]))
        ids = tok.encode(Path(MODELS[model]["text"]).read_text()).ids
        toks = np.asarray(ids[n_eval: n_eval + n_windows * SEQ])
        desc = (f"{n_windows} windows of {SEQ} wikitext-2 test tokens right after the {n_eval:,} evaluation tokens "
                f"(tokens {n_eval:,}..{n_eval + n_windows * SEQ - 1:,} of {len(ids):,} in the head-70% file; {note})")
    if len(toks) < n_windows * SEQ:
        return None, f"only {len(toks)} calibration tokens for {n_windows} windows"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([int(t) for t in toks]))
    desc_path.write_text(desc)
    return out, desc


# --------------------------------------------------------------------------- quantizers (subprocesses)


def quantize_ort(row: dict, src: Path, out: Path, calib: Path | None, n_windows: int | None) -> None:
    job = {"model": str(src), "out": str(out), "method": row["method"], "block": row["block"],
           "symmetric": row["symmetric"], "calib": str(calib) if calib else None, "windows": n_windows,
           "external": Path(str(src) + ".data").exists() or src.stat().st_size > 1e9}
    run = harness.quantize_ort_child(__file__, job, timeout=4 * 3600)
    row.update(quant_s=round(run.wall_s, 2), peak_rss_mb=round(run.peak_rss_mb, 1))
    if not run.succeeded(out):
        row["error"] = run.failure("ort", "rc") + _where(run.stderr)
        (out.parent / (out.name + ".stderr.txt")).write_text(run.stderr)


def _where(stderr: str) -> str:
    """' (in FUNC, FILE:LINE)' for the innermost onnxruntime frame of a traceback, else ''."""
    import re

    frames = re.findall(r'File "([^"]*onnxruntime[^"]*)", line (\d+), in (\S+)', stderr)
    if not frames:
        return ""
    path, line, func = frames[-1]
    return f" (in {func}, {path.split('site-packages/')[-1]}:{line})"


def _ort_child(job: dict) -> None:
    """Quantize one model with ORT's MatMulNBitsQuantizer (runs in its own process)."""
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    method, block, sym = job["method"], job["block"], job["symmetric"]
    exclude = []
    if method in ("ort-rtn", "ort-rtn-fp32head"):
        cfg = mnb.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym)
        if method == "ort-rtn-fp32head":
            exclude = [_head_node(Path(job["model"]))]
    elif method == "ort-hqq":
        cfg = mnb.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
    elif method == "ort-gptq":
        toks = np.asarray(json.loads(Path(job["calib"]).read_text()), dtype=np.int64)
        windows = toks[: job["windows"] * SEQ].reshape(job["windows"], SEQ)
        reader = FeedReader([{"input_ids": w[None].astype(np.int64)} for w in windows])
        cfg = mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, percdamp=0.01,
                                            block_size=128, actorder=False, mse=False, perchannel=True)
    else:
        raise SystemExit(f"unknown ORT method {method}")
    q = mnb.MatMulNBitsQuantizer(job["model"], bits=4, block_size=block, is_symmetric=sym, algo_config=cfg,
                                 nodes_to_exclude=exclude)
    q.process()
    q.model.save_model_to_file(job["out"], job["external"])


def _head_node(path: Path) -> str:
    """Name of the MatMul that produces the logits (through at most 4 ops)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in m.graph.node for o in n.output}
    node = producer.get(m.graph.output[0].name)
    for _ in range(5):
        if node is None or node.op_type in ("MatMul", "Gemm"):
            break
        node = producer.get(node.input[0])
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        raise SystemExit(f"{path}: no MatMul found behind the output")
    return node.name


def quantize_onnxq(row: dict, src: Path, out: Path, calib: Path | None, n_windows: int | None) -> None:
    args = [str(src), "-o", str(out), "--preset", ONNXQ_PRESET[row["method"]], "--block-size", str(row["block"]),
            "--no-progress"]
    if row["method"] in CALIBRATED:
        args += ["--calib", str(calib), "--calib-size", str(n_windows), "--seq-len", str(SEQ)]
    if row["method"].endswith("-fp32head"):
        args += ["--lm-head", "float"]
    run = harness.quantize_onnxq(args, timeout=4 * 3600)
    row.update(quant_s=round(run.wall_s, 2), peak_rss_mb=round(run.peak_rss_mb, 1), command=" ".join(["quantize", *args]))
    if not run.succeeded(out):
        if any(s in run.stderr.lower() for s in ONNXQ_MISSING):
            row["skipped"] = f"onnxq int4 not available yet: {harness.last_line(run.stderr)}"
            for k in ("quant_s", "peak_rss_mb"):
                row.pop(k, None)
        else:
            row["error"] = run.failure("onnxq", "rc")
        (out.parent / (out.name + ".stderr.txt")).write_text(run.stderr)


def describe(path: Path) -> dict:
    """What a quantizer did to the graph: MatMulNBits count and K/N/block, float weight MatMuls left, lm_head."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    float_mm = [n.name for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits]
    gathers = [n for n in m.graph.node if n.op_type in ("Gather", "GatherBlockQuantized") and n.input and n.input[0] in inits]
    out_name = m.graph.output[0].name
    producer = {o: n for n in m.graph.node for o in n.output}
    head = producer.get(out_name)
    hops = 0
    while head is not None and head.op_type not in ("MatMul", "MatMulNBits", "Gemm") and hops < 4:
        head = producer.get(head.input[0])
        hops += 1
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    return {
        "matmulnbits": len(nbits),
        "float_weight_matmuls": len(float_mm),
        "dequantizelinear_weights": len(dq),
        "k_values": sorted({int(a.get("K", 0)) for a in attrs}),
        "k_not_multiple_of_block": sorted({f"K={a['K']} block={a['block_size']}" for a in attrs
                                           if a.get("K", 0) % a.get("block_size", 1)}),
        "accuracy_level": sorted({int(a.get("accuracy_level", 0)) for a in attrs}),
        "lm_head": head.op_type if head is not None else None,
        "embedding": sorted({n.op_type for n in gathers}),
        "zero_points": sorted({"float" if any(t.name == n.input[3] and t.data_type in (1, 10) for t in m.graph.initializer)
                               else "uint4 packed" for n in nbits if len(n.input) > 3 and n.input[3]}) or ["none (symmetric)"],
    }


# --------------------------------------------------------------------------- evaluation


def _session(path: str | Path):
    """An ORT CPU session with 2 intra-op threads (every figure of this benchmark)."""
    return make_session(path, "all", threads=2)


def eval_ppl(row: dict, limit: int | None) -> None:
    from perplexity import load_tokens, perplexity

    spec = MODELS[row["model"]]
    tokens = load_tokens(spec["tokens"])
    sess = _session(row["path"])
    t = time.perf_counter()
    if not row.get("heldout"):
        res = perplexity(sess, tokens, limit=limit, progress=False)
        row.update(ppl=round(res.ppl, 4), pieces=res.pieces)
    if "heldout_windows" in spec:
        res = perplexity(sess, tokens[spec["heldout_windows"] * SEQ:], limit=limit, progress=False)
        row.update(ppl_heldout=round(res.ppl, 4), pieces_heldout=res.pieces)
    row["ppl_s"] = round(time.perf_counter() - t, 1)


def eval_latency(rows: list[dict], runs: int) -> None:
    """Median 1 x 256 forward per model file, all variants of one LLM timed round-robin."""
    from perplexity import load_tokens

    by_model: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("path") and Path(r["path"]).exists() and not r.get("error") and not r.get("skipped"):
            by_model.setdefault(r["model"], []).append(r)
    for model, live in by_model.items():
        ids = load_tokens(MODELS[model]["tokens"])[:256][None]
        sessions = {key(r): _session(r["path"]) for r in live}
        calls = {k: lambda s=s, ids=ids: s.run(None, {"input_ids": ids}) for k, s in sessions.items()}
        times = harness.round_robin(calls, runs, warmup=2)
        for r in live:
            r["latency_ms"] = round(1000 * float(np.median(times[key(r)])), 2)
            r["latency_runs"] = runs
        del sessions, calls  # free one LLM's sessions before the next one's


def add_recovery(rows: list[dict]) -> None:
    """gap recovery = (ppl_rtn - ppl) / (ppl_rtn - ppl_fp32) vs onnxq RTN at the same block, else ORT RTN."""
    for r in rows:
        r.pop("recovery", None), r.pop("recovery_heldout", None), r.pop("recovery_ref", None)
    for r in rows:
        if r["method"] == "fp32" or r.get("error") or r.get("skipped"):
            continue
        same = {x["variant"]: x for x in rows if x["model"] == r["model"] and not x.get("error") and not x.get("skipped")}
        fp = same.get("fp32")
        head = "-fp32head" if r["method"].endswith("-fp32head") else ""  # like for like: same lm_head treatment
        ref = (same.get(variant_name("onnxq-rtn" + head, r["block"], False))
               or same.get(variant_name("ort-rtn" + head, r["block"], False)))  # fmt: skip
        if fp is None or ref is None or ref is r:
            continue
        r["recovery_ref"] = ref["variant"]
        for field, out in (("ppl", "recovery"), ("ppl_heldout", "recovery_heldout")):
            if r.get(field) is not None and ref.get(field) is not None and fp.get(field) is not None:
                gap = ref[field] - fp[field]
                if abs(gap) > 1e-9:
                    r[out] = round((ref[field] - r[field]) / gap, 3)


# --------------------------------------------------------------------------- output


def _f(v, spec: str) -> str:  # noqa: ANN001
    return "" if v is None else format(v, spec)


def table(rows: list[dict], meta: dict) -> str:
    cpu = meta["cpu"]
    lines = [f"## {meta['date']} - weight-only int4: onnxq vs onnxruntime MatMulNBitsQuantizer (bench_int4.py)", "",
             f"{cpu['model']}, {cpu['cores']} cores (AVX2 {cpu['avx2']}, AVX-512 {cpu['avx512f']}, VNNI "
             f"{cpu['avx512_vnni'] or cpu['avx_vnni']}); onnxruntime {meta['onnxruntime']}, torch {meta['torch']} "
             f"(ORT HQQ only); load: {meta['load']} (load average {meta['loadavg_start']:.1f} -> "
             f"{meta['loadavg_end']:.1f}), so times and latencies are noisy.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == model]
        held = model == "stories260K"
        lines += [f"**{model}** ({MODELS[model]['note']})", ""]
        head = "| variant | ppl | vs fp32 | gap recovery |"
        head += " ppl held-out | recovery held-out |" if held else ""
        head += " quantize s | peak RSS MB | size MB | latency ms (1x256) | lm_head |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        fp = next((r for r in mr if r["variant"] == "fp32"), {})
        for r in mr:
            if r.get("skipped") or r.get("error"):
                lines.append(f"| {r['variant']} | {r.get('skipped') or r.get('error')} |")
                continue
            ppl = r.get("ppl")
            rel = f"{100 * (ppl / fp['ppl'] - 1):+.1f}%" if ppl is not None and fp.get("ppl") else ""
            cells = [r["variant"], _f(ppl, ".3f"), rel, _f(r.get("recovery"), ".2f")]
            if held:
                cells += [_f(r.get("ppl_heldout"), ".3f"), _f(r.get("recovery_heldout"), ".2f")]
            d = r.get("graph", {})
            cells += [_f(r.get("quant_s"), ".1f"), _f(r.get("peak_rss_mb"), ".0f"), _f(r.get("size_mb"), ".2f"),
                      _f(r.get("latency_ms"), ".1f"), "fp32 MatMul" if r["method"] == "fp32" else (d.get("lm_head") or "")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    calib = {r.get("calib") for r in rows if r.get("calib")}
    if calib:
        lines += ["Calibration: " + "; ".join(sorted(calib)) + ".", ""]
    lines += ["Gap recovery = (ppl_RTN - ppl) / (ppl_RTN - ppl_fp32), vs onnxq RTN at the same block, ORT RTN "
              "asymmetric when onnxq RTN is absent (1 = all the RTN loss won back, 0 = none, < 0 worse than RTN). "
              "Latency: ORT CPU, intra_op_num_threads 2, median of the timed runs of one 1 x 256 forward.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _load(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {key(r): r for r in (data["rows"] if isinstance(data, dict) else data)}


def main(argv: list[str] | None = None) -> int | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="stories260K,smollm2")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma list of {', '.join(METHODS)}; also {', '.join(EXTRA_METHODS)} (lm_head left fp32)")
    ap.add_argument("--blocks", default="32,128")
    ap.add_argument("--ort-gptq-smollm2", action="store_true",
                    help="also run ORT GPTQ on SmolLM2 (8 windows; measured earlier at 68.5 min, 3.7 GB)")
    ap.add_argument("--limit", type=int, default=None, help="perplexity pieces (quick runs only)")
    ap.add_argument("--runs", type=int, default=10, help="timed 1x256 forwards per model (median)")
    ap.add_argument("--workdir", default="/tmp/bench_int4")
    ap.add_argument("--fresh", action="store_true", help="ignore the rows kept in WORKDIR/rows.json")
    ap.add_argument("--remeasure-ort", action="store_true", help=f"do not reuse rows from {BASELINES.name}")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency round (keeps stored figures)")
    ap.add_argument("--write", action="store_true",
                    help="save benchmarks/results/int4.json (+ ORT/fp32 rows to int4_ort_baselines.json) and print markdown")
    args = parse_args_or_run_ort_child(ap, argv, _ort_child)
    if args is None:  # the --_ort-child run is done
        return None

    models = [ALIASES.get(m.strip(), m.strip()) for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    blocks = [int(b) for b in args.blocks.split(",")]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r} (stories260K, smollm2)")
    for m in methods:
        if m not in METHODS + EXTRA_METHODS:
            ap.error(f"unknown method {m!r} ({', '.join(METHODS + EXTRA_METHODS)})")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "rows.json"
    kept = {} if args.fresh else _load(store)
    baseline = {} if (args.fresh or args.remeasure_ort) else _load(BASELINES)
    load0 = os.getloadavg()[0]
    t_start = time.time()

    rows = plan(models, methods, blocks, args.ort_gptq_smollm2)
    for row in rows:
        k = key(row)
        old = kept.get(k) or (baseline.get(k) if not row["method"].startswith("onnxq") else None)
        if old and not old.get("error") and not row.get("skipped") and (old.get("ppl") or old.get("ppl_heldout")) \
                and (args.limit is None) == (old.get("limit") is None):
            row.update({kk: v for kk, v in old.items() if kk not in ("recovery", "recovery_heldout", "recovery_ref")})
            row["reused"] = True
            print(f"{k}: reused ({'kept rows' if k in kept else BASELINES.name})", flush=True)
            continue
        if row.get("skipped"):
            print(f"{k}: {row['skipped']}", flush=True)
            continue
        spec = MODELS[row["model"]]
        src = Path(spec["path"])
        if not src.is_file():
            row["skipped"] = f"{src} not found (build it: python models/smollm2.py -o {src})"
            print(f"{k}: {row['skipped']}", flush=True)
            continue
        row["limit"] = args.limit
        if row["method"] == "fp32":
            row.update(path=str(src), size_mb=round(model_size_mb(src), 3))
        else:
            calib, n_win = None, None
            if row["method"] in CALIBRATED:
                n_win = spec["heldout_windows"] if row.get("heldout") else spec["calib_windows"]
                if row["method"] == "ort-gptq" and "ort_gptq_windows" in spec:
                    n_win = spec["ort_gptq_windows"]
                calib, desc = calibration_file(row["model"], n_win, work)
                if calib is None:
                    row["skipped"] = f"no calibration data: {desc}"
                    print(f"{k}: {row['skipped']}", flush=True)
                    continue
                row["calib"] = f"{row['model']} {n_win} windows: {desc}"
            safe = row["variant"].replace(" ", "_")
            out = work / row["model"] / f"{safe}.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            for stale in (out, Path(str(out) + ".data")):
                stale.unlink(missing_ok=True)
            print(f"{k}: quantizing ...", flush=True)
            (quantize_ort if row["method"].startswith("ort") else quantize_onnxq)(row, src, out, calib, n_win)
            if row.get("skipped") or row.get("error"):
                print(f"  {row.get('skipped') or row.get('error')}", flush=True)
                kept[k] = row
                store.write_text(json.dumps(list(kept.values()), indent=1))
                continue
            row.update(path=str(out), size_mb=round(model_size_mb(out), 3))
            try:
                row["graph"] = describe(out)
            except Exception as e:  # noqa: BLE001 - a description failure must not lose the row
                row["graph"] = {"error": str(e)}
            print(f"  {row['quant_s']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB, {row['size_mb']:.2f} MB", flush=True)
        try:
            eval_ppl(row, args.limit)
        except Exception as e:  # noqa: BLE001 - e.g. a model ORT cannot load
            row["error"] = f"evaluation failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(f"  ppl {row.get('ppl')} held-out {row.get('ppl_heldout')} ({row.get('ppl_s')} s) {row.get('error', '')}",
              flush=True)
        row["measured"] = datetime.datetime.now().isoformat(timespec="seconds")
        kept[k] = row
        store.write_text(json.dumps(list(kept.values()), indent=1))

    if not args.no_latency:
        print("latency ...", flush=True)
        eval_latency(rows, args.runs)
        for r in rows:
            if "latency_ms" in r and not r.get("skipped"):
                kept[key(r)] = r
        store.write_text(json.dumps(list(kept.values()), indent=1))
    add_recovery(rows)

    import onnxruntime

    try:
        from importlib.metadata import version

        torch_v = version("torch")
    except Exception:  # noqa: BLE001
        torch_v = "not installed"
    meta = {"date": str(datetime.date.today()), "cpu": cpu_info(), "load": LOAD_NOTE,
            "loadavg_start": load0, "loadavg_end": os.getloadavg()[0], "onnxruntime": onnxruntime.__version__,
            "torch": torch_v, "python": platform.python_version(), "seconds": round(time.time() - t_start),
            "seq_len": SEQ, "latency": f"1x256, median of {args.runs} after 2 warm-up, intra_op_num_threads 2",
            "protocol": "perplexity.py defaults: 512-token pieces starting every 512 tokens"}
    text = table(rows, meta)
    print()
    print(text)
    if args.write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / "int4.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        base = _load(BASELINES)
        for r in rows:
            if (r["method"] == "fp32" or r["method"].startswith("ort")) and (r.get("ppl") or r.get("ppl_heldout")
                                                                               or r.get("skipped") or r.get("error")):
                base[key(r)] = copy.deepcopy(r)
        BASELINES.write_text(json.dumps({"meta": meta, "rows": list(base.values())}, indent=1))
        print(f"\nwrote {RESULTS_DIR / 'int4.json'} and {BASELINES}")
    return None


if __name__ == "__main__":
    main()
