"""Shared helpers for the benchmark scripts: asset paths, image loading, evaluation.

Nothing here is part of the onnxq package; benchmarks import it as a sibling module.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("ONNXQ_ASSETS", REPO_ROOT.parent / "shared" / "assets")).resolve()
IMAGENET = ASSETS / "imagenet"
CACHE_DIR = Path(os.environ.get("ONNXQ_BENCH_CACHE", "/tmp/onnxq_bench_cache"))


# --------------------------------------------------------------------------- images


def get_load_image():
    """Return (load_image, origin): onnxq's image loader and its name, for the RESULTS.md notes."""
    from onnxq.calibration.sources import load_image

    return load_image, "onnxq.calibration.sources.load_image"


def image_list(root: Path = IMAGENET) -> list[tuple[Path, int]]:
    """All evaluation images with labels, sorted by file name (labels.csv: file,label,wnid)."""
    rows = []
    with open(root / "labels.csv", newline="") as f:
        for r in csv.DictReader(f):
            rows.append((root / r["file"], int(r["label"])))
    rows.sort(key=lambda t: str(t[0]))
    return rows


def calibration_indices(n_total: int, n_calib: int) -> list[int]:
    """Indices of ``n_calib`` images evenly spaced over a sorted list of ``n_total``."""
    n_calib = min(n_calib, n_total)
    return [i * n_total // n_calib for i in range(n_calib)]


def load_images(preprocess: str = "torch", dtype=np.float32, use_cache: bool = True):
    """Preprocess all images once -> (X [N,3,224,224], labels [N], loader origin). Cached in /tmp."""
    load_image, origin = get_load_image()
    items = image_list()
    cache = CACHE_DIR / f"imagenet{len(items)}_{preprocess}_{np.dtype(dtype).name}_onnxq.npz"
    if use_cache and cache.exists():
        d = np.load(cache)
        return d["x"], d["y"], str(d["origin"])
    xs = [load_image(str(p), preprocess=preprocess, dtype=dtype) for p, _ in items]
    x = np.concatenate(xs, axis=0)
    y = np.array([lab for _, lab in items], dtype=np.int64)
    if use_cache:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        np.savez(cache, x=x, y=y, origin=origin)
    return x, y, origin


# --------------------------------------------------------------------------- evaluation


def make_session(model_path, opt_level: str = "all", threads: int | None = None):
    """ORT CPU session; ``opt_level`` is 'all' (ORT_ENABLE_ALL) or 'none' (ORT_DISABLE_ALL)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only (QDQ models trigger many harmless warnings)
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if opt_level == "all"
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def predict(sess, x: np.ndarray, batch: int = 25) -> np.ndarray:
    """Top-1 class index for every image in ``x`` (runs in batches; models have a dynamic N)."""
    inp = sess.get_inputs()[0]
    fixed_batch = not isinstance(inp.shape[0], str) and inp.shape[0] is not None
    bs = 1 if fixed_batch else batch
    want = np.float16 if "float16" in inp.type else np.float32
    preds = []
    for i in range(0, len(x), bs):
        out = sess.run(None, {inp.name: x[i:i + bs].astype(want, copy=False)})[0]
        preds.append(np.asarray(out, dtype=np.float32).reshape(out.shape[0], -1).argmax(1))
    return np.concatenate(preds)


def cpu_info() -> dict:
    """CPU model, core count and the ISA flags that matter for int8 kernels."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "model": model,
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "fma": "fma" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
    }
