"""Perplexity of a causal language model in ONNX Runtime, on a pre-tokenized token list.

Why: float-vs-quantized comparisons of LLMs (SmoothQuant, GPTQ, AWQ, int4 RTN) need one protocol that
every benchmark shares, so that figures in RESULTS.md are comparable with the reference figures in
``../shared/assets/README.md``. Protocol: pieces of ``seq_len + 1`` tokens (default 513), feed the first
``seq_len``, score the next-token negative log-likelihood of all ``seq_len`` positions, report
``ppl = exp(mean NLL)`` over every scored token; a trailing remainder shorter than a piece is dropped.

Pieces start every ``seq_len`` tokens by default, so consecutive pieces share one token (the last target
of a piece is the first input of the next) and every token after the first is scored exactly once. That
is how the README's reference figures were made: this default reproduces them (SmolLM2 wikitext 28.72,
stories260K TinyStories 3.520), while strictly non-overlapping pieces (``--stride 513``, the README's
wording) give 28.87 and 3.521. The wikitext list holds 20,481 = 40 x 512 + 1 tokens for this reason.

Works for any model whose input is ``input_ids`` int64 [batch, seq] (or a single int64 input of that
shape) and whose output is ``logits`` [batch, seq, vocab] (or the first output); an ``attention_mask``
input is fed ones and a ``position_ids`` input 0..seq-1. Decoders exported with a KV cache (onnxruntime-
genai's model builder, Optimum's ``text-generation-with-past``: ``past_key_values.*`` inputs) get every
piece as a prefill with an empty past (past length 0; the layout is read by ``_kvcache.py``), so their
figures are those of the same windows; an onnxruntime-genai folder is accepted for its decoder file.
``--agreement REFERENCE`` runs a second model (the fp32 one) on the same pieces and reports the greedy
next-token agreement over the scored tokens.

Usage::

    python benchmarks/perplexity.py MODEL.onnx --tokens ../shared/assets/text/tokens/FILE.json [--limit N]
    python benchmarks/perplexity.py GENAI_INT4_DIR --tokens ... --agreement GENAI_FP32_DIR

The token file is a JSON list of integer token ids (or an object holding one under ``"tokens"`` or
``"input_ids"``). ``perplexity()`` is importable for other benchmark scripts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _kvcache import KVCacheError, KVCacheFeeds, kv_cache_feeds, model_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["PerplexityResult", "load_tokens", "pieces", "perplexity", "main"]


class PerplexityError(Exception):
    """A user-fixable problem with the model or the token file; the message names the file and the fix."""


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity run: ``ppl = exp(nll_mean)`` over ``tokens_scored`` next-token predictions."""

    ppl: float
    nll_mean: float
    pieces: int
    seq_len: int
    tokens_scored: int
    seconds: float
    agreement: float | None = None  # greedy next-token agreement with the reference model (perplexity(reference=...))
    reference_ppl: float | None = None  # the reference model's perplexity on the same pieces


def load_tokens(path: Path) -> np.ndarray:
    """The token ids of a JSON token file as int64 [n]."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise PerplexityError(f"{path}: no such token file (see ../shared/assets/text/tokens/)") from e
    except (OSError, ValueError) as e:
        raise PerplexityError(f"{path}: not a readable JSON token file ({e})") from e
    if isinstance(data, dict):
        data = data.get("tokens", data.get("input_ids"))
    if not isinstance(data, list) or not data or not all(isinstance(t, int) for t in data):
        raise PerplexityError(f"{path}: expected a JSON list of integer token ids (or {{\"tokens\": [...]}})")
    return np.asarray(data, dtype=np.int64)


def pieces(tokens: np.ndarray, seq_len: int = 512, limit: int | None = None, stride: int | None = None) -> np.ndarray:
    """Pieces of ``seq_len + 1`` tokens starting every ``stride`` tokens, [n_pieces, seq_len + 1].

    The default stride, ``seq_len``, makes consecutive pieces share one token, so every token but the
    first is scored exactly once (the protocol of the shared reference figures); ``seq_len + 1`` gives
    non-overlapping pieces. A remainder too short for a whole piece is dropped.
    """
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len + 1:
        raise PerplexityError(f"stride {stride} must be between 1 and seq_len + 1 = {seq_len + 1}")
    n = (len(tokens) - (seq_len + 1)) // stride + 1 if len(tokens) > seq_len else 0
    if limit is not None:
        n = min(n, limit)
    if n <= 0:
        raise PerplexityError(f"only {len(tokens)} tokens: need at least seq_len + 1 = {seq_len + 1} for one piece")
    starts = np.arange(n) * stride
    return tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]]


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Next-token NLL per position: logsumexp(logits) - logits[target], in float64. [b, s, v] -> [b, s]."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1)) + m[..., 0]
    return lse - np.take_along_axis(x, targets[..., None], axis=-1)[..., 0]


def _open(model: str | Path | Any, providers: Sequence[str]) -> tuple[Any, KVCacheFeeds, str]:
    """(session, its input layout, a name for messages) of a model path, genai folder or open session."""
    import onnxruntime as ort

    if isinstance(model, (str, Path)):
        path = model_file(model)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=list(providers))
        return sess, kv_cache_feeds(sess, path), str(model)
    return model, kv_cache_feeds(model, "model"), "model"


def _logits(sess: Any, plan: KVCacheFeeds, ids: np.ndarray, name: str) -> np.ndarray:
    """Logits [batch, seq, vocab] of ``ids`` [batch, seq], fed as one prefill (an empty past for a KV-cache model)."""
    (logits,) = sess.run([plan.logits_name], plan.feeds(ids))
    if logits.shape[:2] != ids.shape:
        raise PerplexityError(f"{name}: output {plan.logits_name!r} has shape {logits.shape}, expected "
                              f"[{ids.shape[0]}, {ids.shape[1]}, vocab] (logits for every position)")
    return logits


def perplexity(model: str | Path | Any, tokens: np.ndarray | Sequence[int], *, seq_len: int = 512,
               limit: int | None = None, stride: int | None = None, batch: int = 1, progress: bool = True,
               providers: Sequence[str] = ("CPUExecutionProvider",),
               reference: str | Path | Any | None = None) -> PerplexityResult:
    """Perplexity of ``model`` (a path, an onnxruntime-genai folder or an ``onnxruntime.InferenceSession``) on ``tokens``.

    ``limit`` caps the number of pieces (the first ``limit``); ``stride`` is where pieces start (see
    :func:`pieces`; default ``seq_len``); ``batch`` pieces go through the model per run (memory grows
    with batch x seq_len x vocab). A KV-cache decoder gets each piece as a prefill with an empty past.
    With ``reference`` (e.g. the fp32 model), the same pieces also go through it and the result holds the
    greedy next-token agreement (argmax equal) over the scored positions and the reference's perplexity.
    """
    sess, plan, name = _open(model, providers)
    ref = None if reference is None else _open(reference, providers)
    data = pieces(np.asarray(tokens, dtype=np.int64), seq_len, limit, stride)
    total, ref_total, agree = 0.0, 0.0, 0
    start = time.perf_counter()
    with _progress(len(data), "perplexity", progress) as advance:
        for b in range(0, len(data), batch):
            chunk = data[b : b + batch]
            logits = _logits(sess, plan, chunk[:, :-1], name)
            total += float(_nll(logits, chunk[:, 1:]).sum())
            if ref is not None:
                ref_logits = _logits(ref[0], ref[1], chunk[:, :-1], ref[2])
                ref_total += float(_nll(ref_logits, chunk[:, 1:]).sum())
                agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
            advance(len(chunk))
    scored = data.shape[0] * seq_len
    mean = total / scored
    extra = {} if ref is None else {"agreement": agree / scored, "reference_ppl": math.exp(ref_total / scored)}
    return PerplexityResult(math.exp(mean), mean, data.shape[0], seq_len, scored, time.perf_counter() - start, **extra)


def _progress(total: int, description: str, enabled: bool) -> Any:
    import contextlib

    try:
        from onnxq.progress import progress_bar
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        try:
            from onnxq.progress import progress_bar
        except ImportError:
            return contextlib.nullcontext(lambda n=1: None)
    return progress_bar(total, description, enabled=enabled, unit="pieces")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/perplexity.py",
        description=("Perplexity of an input_ids -> logits ONNX model (a KV-cache decoder gets each piece as a prefill with an empty past) on a JSON token list, with the protocol of "
                     "../shared/assets/README.md: pieces of SEQ_LEN+1 tokens starting every SEQ_LEN tokens (so "
                     "consecutive pieces share one token and every token after the first is scored once), feed "
                     "SEQ_LEN, score the next-token NLL of all SEQ_LEN positions, ppl = exp(mean NLL). This "
                     "reproduces the README's reference figures; --stride 513 gives strictly non-overlapping pieces."),
        epilog=("Example: python benchmarks/perplexity.py /tmp/smollm2/smollm2.onnx "
                "--tokens ../shared/assets/text/tokens/smollm2__wikitext2_test_shared.json   (fp32: 28.72)"),
    )
    parser.add_argument("model", type=Path,
                        help="the .onnx model (input_ids int64 [batch, seq] -> logits [batch, seq, vocab], optionally "
                             "with a KV cache: past_key_values.* inputs, fed an empty past) or an onnxruntime-genai "
                             "folder (its genai_config.json names the decoder)")
    parser.add_argument("--tokens", type=Path, required=True, help="JSON list of token ids (tokenized for this model)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N pieces (quick checks)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens fed per piece (default 512; pieces are SEQ_LEN+1)")
    parser.add_argument("--stride", type=int, default=None,
                        help="start a piece every STRIDE tokens (default SEQ_LEN: consecutive pieces share one "
                             "token, as the reference figures were made; SEQ_LEN+1: non-overlapping pieces)")
    parser.add_argument("--batch", type=int, default=1, help="pieces per ONNX Runtime run (default 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="execution provider (default cpu)")
    parser.add_argument("--agreement", type=Path, default=None, metavar="REFERENCE",
                        help="also run REFERENCE (e.g. the fp32 model or folder) on the same pieces and report the "
                             "greedy next-token agreement (argmax equal) over the scored tokens and its perplexity")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.seq_len < 1 or args.batch < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--seq-len, --batch and --limit must be positive")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    try:
        tokens = load_tokens(args.tokens)
        r = perplexity(args.model, tokens, seq_len=args.seq_len, limit=args.limit, stride=args.stride, batch=args.batch,
                       progress=not args.no_progress, providers=providers, reference=args.agreement)
    except (PerplexityError, KVCacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"model": str(args.model), "tokens": str(args.tokens), "reference": args.agreement and
                          str(args.agreement), **asdict(r)}))
    else:
        print(f"ppl {r.ppl:.3f}  ({args.model.name} on {args.tokens.name}: {r.pieces} pieces x {r.seq_len} = "
              f"{r.tokens_scored} tokens scored, mean NLL {r.nll_mean:.4f}, {r.seconds:.1f} s)")
        if r.agreement is not None:
            print(f"agreement {r.agreement:.4f} with {args.agreement} (greedy next token over the same "
                  f"{r.tokens_scored} tokens; its ppl {r.reference_ppl:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
