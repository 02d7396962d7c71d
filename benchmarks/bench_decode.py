"""Decode speed of LLM decoders with a KV cache: time to first token and decode tokens/s, several models
timed round-robin in one run so that their ratios are like-for-like.

Two ways a model is run, as users run them:

- an **onnxruntime-genai folder** (it holds ``genai_config.json``: the model builder's output, or onnxq's
  quantized folder) goes through onnxruntime-genai: ``og.Model(folder)``, ``og.Generator`` with greedy
  search, ``append_tokens(prompt)``, then ``generate_next_token()`` until N new tokens;
- an **.onnx file** (an Optimum ``text-generation-with-past`` export, or any decoder with ``past_key_values.*``
  inputs, the builder's file included) goes through a plain onnxruntime loop: a prefill of the prompt with
  an empty past, then one run per token on the argmax of the last logits, the ``present.*`` outputs fed
  back as ``past_key_values.*`` (attention_mask ones over past + 1, position_ids the next position).

Every model gets the same prompt token ids (tokenized once) and generates N new tokens greedily.
Time to first token (TTFT): from the start of generation (generator made / empty past built) to the first
new token chosen, i.e. the prefill; decode tokens/s: the N-1 following tokens over their time. Each round
runs every model once, in turn (after ``--warmup`` untimed rounds); the table shows medians over
``--runs`` rounds and each model's greedy tokens compared with the first model's.

**Interpreter:** onnxruntime-genai is not a dependency of onnxq (nor of CI); run this script with the
Python that has it, on this machine ``/work/llm/venv-build/bin/python`` (see models/requirements-llm.txt).
Without onnxruntime-genai only ``.onnx`` files (the onnxruntime loop) can be timed.

Usage::

    /work/llm/venv-build/bin/python benchmarks/bench_decode.py fp32=/work/llm/genai-fp32 int4=/work/llm/genai-int4 \\
        optimum=/work/llm/optimum-fp32/model.onnx --new-tokens 32 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import append_results, environment, fmt, ratio, results_section  # noqa: E402
from _kvcache import GENAI_CONFIG, KVCacheError, KVCacheFeeds, kv_cache_feeds, model_file  # noqa: E402

DEFAULT_PROMPT = ("<|im_start|>user\nWrite a short story about a cat who learns to fly.<|im_end|>\n"
                  "<|im_start|>assistant\n")


class DecodeBenchError(Exception):
    """A model or option this benchmark cannot run; the message names it and the fix."""


@dataclass(frozen=True)
class Generation:
    """One timed generation: the new token ids, seconds to the first one, seconds of the rest."""

    tokens: list[int]
    ttft_s: float
    decode_s: float


class OgRunner:
    """An onnxruntime-genai folder, generating greedily through ``og.Generator``."""

    backend = "onnxruntime-genai"

    def __init__(self, folder: Path, threads: int | None) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError as e:
            raise DecodeBenchError(f"{folder} is an onnxruntime-genai folder but onnxruntime_genai is not installed "
                                   "in this Python; run the script with /work/llm/venv-build/bin/python") from e
        self.og = og
        config = og.Config(str(folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)

    def generate(self, prompt: Sequence[int], new_tokens: int) -> Generation:
        """Greedy generation of ``new_tokens`` tokens after ``prompt`` (fewer if the model emits EOS)."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
        t0 = time.perf_counter()
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(list(prompt))  # runs the prefill
        gen.generate_next_token()  # picks the first token from the prefill's logits
        t1 = time.perf_counter()
        tokens = [int(gen.get_next_tokens()[0])]
        while not gen.is_done():
            gen.generate_next_token()  # one decode step: the model on the last token, then the argmax
            tokens.append(int(gen.get_next_tokens()[0]))
        return Generation(tokens, t1 - t0, time.perf_counter() - t1)


class OrtLoopRunner:
    """An .onnx decoder with a KV cache, generating greedily in a plain onnxruntime loop."""

    backend = "onnxruntime loop"

    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.plan: KVCacheFeeds = kv_cache_feeds(self.session, path)
        if not self.plan.has_past:
            raise DecodeBenchError(f"{path}: no past_key_values.* inputs; this benchmark times KV-cache decoders "
                                   "(a model without a cache would recompute the whole sequence per token)")
        self.outputs = [self.plan.logits_name, *self.plan.present_names()]

    def _step(self, ids: list[int], past: dict[str, np.ndarray] | None, past_len: int) -> tuple[int, dict[str, np.ndarray]]:
        """Run ``ids`` after ``past_len`` cached tokens; the greedy next token and the next past."""
        logits, *presents = self.session.run(self.outputs, self.plan.feeds(np.asarray([ids], np.int64), past, past_len))
        return int(logits[0, -1].argmax()), self.plan.next_past(presents)

    def generate(self, prompt: Sequence[int], new_tokens: int) -> Generation:
        """Greedy generation of exactly ``new_tokens`` tokens after ``prompt`` (no EOS stop)."""
        t0 = time.perf_counter()
        token, past = self._step(list(prompt), None, 0)
        t1 = time.perf_counter()
        tokens = [token]
        for _ in range(new_tokens - 1):
            token, past = self._step([token], past, len(prompt) + len(tokens) - 1)
            tokens.append(token)
        return Generation(tokens, t1 - t0, time.perf_counter() - t1)


@dataclass
class Entry:
    """One model of the run: its label, path, runner and timed generations."""

    label: str
    path: Path
    runner: Any
    runs: list[Generation] = field(default_factory=list)

    def ttft_ms(self) -> float:
        """Median time to first token, ms."""
        return 1000 * statistics.median(g.ttft_s for g in self.runs)

    def decode_tps(self) -> float | None:
        """Decode tokens/s: the median over runs of (new tokens - 1) / decode seconds."""
        rates = [(len(g.tokens) - 1) / g.decode_s for g in self.runs if len(g.tokens) > 1 and g.decode_s > 0]
        return statistics.median(rates) if rates else None


def parse_model(spec: str) -> tuple[str, Path]:
    """``LABEL=PATH`` or ``PATH`` (label: the folder or file name) -> (label, path)."""
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = "", spec
    p = Path(path)
    return (label or (p.name if p.is_dir() else f"{p.parent.name}/{p.name}")), p


def make_runner(path: Path, threads: int | None) -> OgRunner | OrtLoopRunner:
    """onnxruntime-genai for a folder with genai_config.json, the onnxruntime loop for an .onnx file."""
    if path.is_dir() and (path / GENAI_CONFIG).is_file():
        return OgRunner(path, threads)
    if path.is_file():
        return OrtLoopRunner(path, threads)
    raise DecodeBenchError(f"{path}: neither an onnxruntime-genai folder (with {GENAI_CONFIG}) nor an .onnx file")


def tokenizer_file(paths: Sequence[Path], given: Path | None) -> Path:
    """``given``, else the first tokenizer.json beside (or in) one of the models."""
    if given:
        return given
    for p in paths:
        cand = (p if p.is_dir() else p.parent) / "tokenizer.json"
        if cand.is_file():
            return cand
    raise DecodeBenchError("no tokenizer.json beside any model; pass --tokenizer or --prompt-tokens")


def prompt_ids(args: argparse.Namespace, paths: Sequence[Path]) -> list[int]:
    """The prompt's token ids: the first --prompt-len of --prompt-tokens, else --prompt tokenized."""
    if args.prompt_tokens:
        from perplexity import load_tokens

        return [int(t) for t in load_tokens(args.prompt_tokens)[: args.prompt_len]]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file(paths, args.tokenizer)))
    return list(tok.encode(args.prompt, add_special_tokens=False).ids)


def run_rounds(entries: Sequence[Entry], prompt: Sequence[int], new_tokens: int, runs: int, warmup: int) -> None:
    """``warmup`` untimed then ``runs`` timed rounds, each model once per round in turn (same load for all)."""
    for r in range(warmup + runs):
        for e in entries:
            g = e.runner.generate(prompt, new_tokens)
            if r >= warmup:
                e.runs.append(g)


def same_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def table(entries: Sequence[Entry], baseline: Entry, decode_text: Any) -> str:
    """The markdown table: backend, TTFT, decode tokens/s and ratios to the baseline, greedy tokens vs the first model."""
    first = entries[0].runs[0].tokens
    base_tps = baseline.decode_tps()
    rows = ["| model | backend | file | TTFT ms | decode tok/s | x " + baseline.label + " | new tokens | same as "
            + entries[0].label + " | text (start) |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for e in entries:
        toks = e.runs[0].tokens
        steady = all(g.tokens == toks for g in e.runs)
        text = decode_text(toks)[:60].replace("\n", " ").replace("|", "/") if decode_text else ""
        rows.append(f"| {e.label} | {e.runner.backend} | {model_file(e.path).name} | {e.ttft_ms():.0f} | "
                    f"{fmt(e.decode_tps())} | {fmt(ratio(e.decode_tps(), base_tps), '{:.2f}')} | {len(toks)}"
                    f"{'' if steady else ' (varied)'} | {same_prefix(toks, first)}/{len(first)} | {text!r} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bench_decode.py",
        description="Time to first token and decode tokens/s of KV-cache decoders, timed round-robin "
                    "(onnxruntime-genai for a genai folder, a plain onnxruntime loop for an .onnx file).",
        epilog="Run with the Python that has onnxruntime-genai (here /work/llm/venv-build/bin/python).")
    ap.add_argument("models", nargs="+", metavar="[LABEL=]PATH",
                    help="an onnxruntime-genai folder (genai_config.json) or a KV-cache .onnx file")
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens per generation (default 32)")
    ap.add_argument("--runs", type=int, default=3, help="timed rounds (default 3; medians reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for every model (default: the runtimes' default, one per core)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (default: a SmolLM2 chat-template request)")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="tokenizer.json for --prompt (default: the one beside the first model that has one)")
    ap.add_argument("--prompt-tokens", type=Path, default=None,
                    help="take the prompt from a JSON token list instead (the first --prompt-len ids)")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt length with --prompt-tokens (default 128)")
    ap.add_argument("--baseline", default=None, help="label the tokens/s ratios are taken against (default: the first)")
    ap.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.new_tokens < 2 or args.runs < 1 or args.warmup < 0 or args.prompt_len < 1:
        ap.error("--new-tokens must be >= 2, --runs and --prompt-len >= 1, --warmup >= 0")
    specs = [parse_model(s) for s in args.models]
    labels = [label for label, _ in specs]
    if len(set(labels)) != len(labels) or (args.baseline and args.baseline not in labels):
        ap.error(f"labels must be unique and --baseline one of them (labels: {labels})")
    load = os.getloadavg()[0]
    try:
        prompt = prompt_ids(args, [p for _, p in specs])
        entries = [Entry(label, path, make_runner(path, args.threads)) for label, path in specs]
        run_rounds(entries, prompt, args.new_tokens, args.runs, args.warmup)
    except (DecodeBenchError, KVCacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    decode_text = None
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_file([p for _, p in specs], args.tokenizer)))
        decode_text = tok.decode
    except (ImportError, DecodeBenchError):  # the text column is a courtesy, not a result
        decode_text = None
    baseline = next(e for e in entries if e.label == (args.baseline or entries[0].label))
    env = environment()
    try:
        import onnxruntime_genai as og

        env["og"] = og.__version__
    except ImportError:
        env["og"] = "not installed"
    notes = [f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, greedy; {args.warmup} warm-up + "
             f"{args.runs} timed rounds, models in turn; medians; threads {args.threads or 'runtime default'}",
             f"load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end; interpreter {sys.executable}"]
    section = results_section("bench_decode.py", env, " ".join(argv if argv is not None else sys.argv[1:]), notes,
                              [table(entries, baseline, decode_text)],
                              versions=(("onnxruntime", "onnxruntime"), ("onnxruntime-genai", "og"), ("Python", "python")))
    print(section)
    if args.write:
        append_results(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
