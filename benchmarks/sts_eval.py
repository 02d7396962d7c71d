"""STS-benchmark evaluation of a sentence-embedding ONNX model (MiniLM), shared by the transformer benchmarks.

Why: the int8 acceptance criteria for MiniLM are stated as STS-dev Spearman correlation (cosine of the two
sentences' embeddings vs the gold score; fp32 all-MiniLM-L6-v2: 0.867) and as the mean cosine similarity of
quantized to fp32 embeddings. Every benchmark computes them the same way through this module.

    python benchmarks/sts_eval.py MODEL.onnx [--reference fp32.onnx] [--limit N]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy.stats import spearmanr

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
TOKENIZER = ASSETS / "minilm" / "tokenizer.json"
STS_DEV = ASSETS / "sts" / "sts-dev.csv"
STS_TRAIN = ASSETS / "sts" / "sts-train.csv"


def read_pairs(path: Path = STS_DEV, limit: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(sentences A, sentences B, gold scores) of an STS benchmark file (tab-separated, columns 5-7)."""
    a: list[str] = []
    b: list[str] = []
    gold: list[float] = []
    with open(path, encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 7:
                continue
            gold.append(float(row[4]))
            a.append(row[5])
            b.append(row[6])
            if limit and len(gold) >= limit:
                break
    return a, b, np.asarray(gold)


def session(model: str | Path | bytes, threads: int | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=["CPUExecutionProvider"])


def embed(sess: ort.InferenceSession, sentences: list[str], batch: int = 64, max_length: int = 128) -> np.ndarray:
    """``sentence_embedding`` for each sentence (batches padded to their longest sentence)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    tok.no_padding()  # tokenizer.json pads to 128; pad here to each batch's longest with a real attention mask
    tok.enable_truncation(max_length)
    names = {i.name for i in sess.get_inputs()}
    out: list[np.ndarray] = []
    for i in range(0, len(sentences), batch):
        enc = tok.encode_batch(sentences[i : i + batch])
        n = max(len(e.ids) for e in enc)
        ids = np.zeros((len(enc), n), np.int64)
        mask = np.zeros((len(enc), n), np.int64)
        for j, e in enumerate(enc):
            ids[j, : len(e.ids)] = e.ids
            mask[j, : len(e.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        out.append(sess.run(["sentence_embedding"], {k: v for k, v in feed.items() if k in names})[0])
    return np.concatenate(out)


def evaluate(model: str | Path | bytes, reference: np.ndarray | None = None, limit: int | None = None) -> dict[str, float]:
    """STS-dev Spearman of ``model`` and, given fp32 embeddings ``reference``, their mean cosine to them."""
    a, b, gold = read_pairs(STS_DEV, limit)
    sess = session(model)
    ea, eb = embed(sess, a), embed(sess, b)
    cos = np.sum(ea * eb, axis=1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1))
    result = {"spearman": float(spearmanr(cos, gold).statistic)}
    if reference is not None:
        e = np.concatenate([ea, eb])
        result["cosine_to_fp32"] = float(np.mean(np.sum(e * reference, axis=1) /
                                                 (np.linalg.norm(e, axis=1) * np.linalg.norm(reference, axis=1))))  # fmt: skip
    result["embeddings"] = np.concatenate([ea, eb])  # type: ignore[assignment]
    return result


def latency(model: str | Path | bytes, batch: int = 32, seq: int = 64, runs: int = 10, threads: int | None = None) -> float:
    """Median seconds of one batch x seq forward pass (random token ids, all-ones mask), after a warm-up."""
    sess = session(model, threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (batch, seq)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    names = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}
    sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--reference", help="the fp32 model, for the mean cosine similarity of embeddings")
    ap.add_argument("--limit", type=int, help="only the first N pairs")
    args = ap.parse_args()
    ref = evaluate(args.reference, limit=args.limit)["embeddings"] if args.reference else None
    r = evaluate(args.model, ref, args.limit)
    print(f"STS-dev Spearman {r['spearman']:.6f}" + (f", mean cosine to fp32 {r['cosine_to_fp32']:.5f}" if ref is not None else ""))


if __name__ == "__main__":
    main()
