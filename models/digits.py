"""Build ``digits-cnn.onnx``: a tiny CNN for scikit-learn's 8x8 hand-written digits, trained with plain numpy.

Why: onnxq's examples and tests need a small, real, *trained* CNN whose accuracy can be measured in a
second, without downloads and without torch. scikit-learn ships the UCI digits set inside its wheel
(``sklearn.datasets.load_digits``: 1797 images, 8x8, values 0..16, 10 classes), so this script needs
numpy, onnx and scikit-learn only (scikit-learn just for the data; onnxq never imports it).

Model (opset 13), input ``image`` float32 [N, 1, 8, 8] with pixels scaled to 0..1 (value / 16), output
``logits`` float32 [N, 10]::

    Conv(16 filters 3x3, pad 1) -> Relu -> MaxPool 2x2 -> Flatten -> Gemm(256 -> 10)

2,730 parameters, about 11 KB. Data split, in the dataset's own order (deterministic): samples 0..999
train, 1000..1299 calibration pool, 1300..1796 test (497); the set is not shuffled first. Training: softmax cross-entropy, Adam with
cosine learning-rate decay and L2 weight decay, mini-batches of 32, random shifts of up to one pixel as
augmentation (without it test accuracy stays at 91-94%), fixed seed, manual backprop (im2col
convolution); about 7 s on 2 cores.

Outputs:

- ``models/digits-cnn.onnx`` (``-o``)
- ``calibration_data/digits/calib.npz`` (``--calib-out``): ``image`` [64, 1, 8, 8] float32, 64 samples
  evenly spaced over the calibration pool
- ``calibration_data/digits/test.npz``: ``image`` [497, 1, 8, 8] float32 and ``label`` [497] int64

Usage: ``python models/digits.py [-o models/digits-cnn.onnx] [--calib-out calibration_data/digits]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
FILTERS = 16
N_TRAIN, N_CALIB_POOL = 1000, 300
N_CALIB = 64
EPOCHS = 100
BATCH = 32
LR = 3e-3
WEIGHT_DECAY = 1e-3


def load_data() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 [N, 1, 8, 8] in 0..1 and int64 labels, in the dataset's order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    return x, d.target.astype(np.int64)


# ------------------------------------------------------------------------------------------- the network
def _im2col(x: np.ndarray) -> np.ndarray:
    """[N, 1, 8, 8] -> [N, 64, 9] patches of the zero-padded (pad 1) image; patch index kh*3 + kw."""
    n = x.shape[0]
    xp = np.pad(x[:, 0], ((0, 0), (1, 1), (1, 1)))
    cols = np.empty((n, 8, 8, 9), np.float32)
    for kh in range(3):
        for kw in range(3):
            cols[:, :, :, kh * 3 + kw] = xp[:, kh:kh + 8, kw:kw + 8]
    return cols.reshape(n, 64, 9)


def init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """He-initialised weights in ONNX layouts: conv_w [C, 1, 3, 3], fc_w [10, C*16] (Gemm transB=1)."""
    feat = FILTERS * 16
    return {
        "conv_w": (rng.standard_normal((FILTERS, 1, 3, 3)) * np.sqrt(2.0 / 9)).astype(np.float32),
        "conv_b": np.zeros(FILTERS, np.float32),
        "fc_w": (rng.standard_normal((10, feat)) * np.sqrt(1.0 / feat)).astype(np.float32),
        "fc_b": np.zeros(10, np.float32),
    }


def forward(p: dict[str, np.ndarray], x: np.ndarray, cache: bool = False):
    """Logits [N, 10] (and the intermediates backprop needs when ``cache``)."""
    n = x.shape[0]
    cols = _im2col(x)                                                   # [N, 64, 9]
    w = p["conv_w"].reshape(FILTERS, 9)
    conv = cols @ w.T + p["conv_b"]                                     # [N, 64, C], position h*8 + w
    relu = np.maximum(conv, 0.0)
    blocks = relu.reshape(n, 4, 2, 4, 2, FILTERS).transpose(0, 1, 3, 5, 2, 4).reshape(n, 4, 4, FILTERS, 4)
    arg = blocks.argmax(-1)                                             # [N, 4, 4, C] which of the 2x2
    pooled = np.take_along_axis(blocks, arg[..., None], -1)[..., 0]     # [N, 4, 4, C]
    flat = pooled.transpose(0, 3, 1, 2).reshape(n, -1)                  # ONNX Flatten of NCHW: c*16 + h*4 + w
    logits = flat @ p["fc_w"].T + p["fc_b"]
    if not cache:
        return logits
    return logits, (cols, conv, arg, flat)


def backward(p: dict[str, np.ndarray], logits: np.ndarray, y: np.ndarray, saved) -> tuple[float, dict[str, np.ndarray]]:
    """Mean softmax cross-entropy and its gradients."""
    cols, conv, arg, flat = saved
    n = logits.shape[0]
    z = logits - logits.max(1, keepdims=True)
    prob = np.exp(z)
    prob /= prob.sum(1, keepdims=True)
    loss = float(-np.log(prob[np.arange(n), y] + 1e-12).mean())
    d = prob
    d[np.arange(n), y] -= 1.0
    d /= n                                                              # dL/dlogits
    g = {"fc_w": d.T @ flat, "fc_b": d.sum(0)}
    dflat = d @ p["fc_w"]                                               # [N, C*16]
    dpool = dflat.reshape(n, FILTERS, 4, 4).transpose(0, 2, 3, 1)      # [N, 4, 4, C]
    dblocks = np.zeros((n, 4, 4, FILTERS, 4), np.float32)
    np.put_along_axis(dblocks, arg[..., None], dpool[..., None], -1)
    drelu = dblocks.reshape(n, 4, 4, FILTERS, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(n, 64, FILTERS)
    dconv = drelu * (conv > 0)
    g["conv_w"] = np.einsum("npc,npk->ck", dconv, cols).reshape(FILTERS, 1, 3, 3)
    g["conv_b"] = dconv.sum((0, 1))
    return loss, g


def shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Augmentation: each image moved by -1, 0 or +1 pixel in each direction (zero fill)."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    d = rng.integers(0, 3, (len(x), 2))
    return np.stack([xp[i, :, dy:dy + 8, dx:dx + 8] for i, (dy, dx) in enumerate(d)])


def train(x: np.ndarray, y: np.ndarray, seed: int = SEED, log: bool = True) -> dict[str, np.ndarray]:
    """Adam on shifted mini-batches; deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    p = init_params(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2, eps, t = 0.9, 0.999, 1e-8, 0
    for epoch in range(EPOCHS):
        order = rng.permutation(len(x))
        losses = []
        for s in range(0, len(x), BATCH):
            idx = order[s:s + BATCH]
            logits, saved = forward(p, shift(x[idx], rng), cache=True)
            loss, g = backward(p, logits, y[idx], saved)
            losses.append(loss)
            t += 1
            lr = LR * 0.5 * (1 + np.cos(np.pi * epoch / EPOCHS))         # cosine decay per epoch
            for k in p:
                gk = g[k] + (WEIGHT_DECAY * p[k] if k.endswith("_w") else 0.0)
                m[k] = b1 * m[k] + (1 - b1) * gk
                v[k] = b2 * v[k] + (1 - b2) * gk * gk
                mh, vh = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
                p[k] = (p[k] - lr * mh / (np.sqrt(vh) + eps)).astype(np.float32)
        if log and (epoch % 20 == 19 or epoch == 0):
            print(f"epoch {epoch + 1:3d}  loss {np.mean(losses):.4f}  train acc {accuracy(p, x, y):.2%}")
    return p


def accuracy(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float((forward(p, x).argmax(1) == y).mean())


# -------------------------------------------------------------------------------------------- export
def to_onnx(p: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The trained network as an opset-13 ONNX model with a dynamic batch dim."""
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], name="conv", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("MaxPool", ["relu"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(p[k], k) for k in ("conv_w", "conv_b", "fc_w", "fc_b")],
    )  # fmt: skip
    graph.doc_string = ("Digits classifier for sklearn.datasets.load_digits (8x8, pixels / 16 -> 0..1); "
                        "built by onnxq models/digits.py")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="onnxq models/digits.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "models" / "digits-cnn.onnx")
    ap.add_argument("--calib-out", type=Path, default=ROOT / "calibration_data" / "digits")
    args = ap.parse_args()

    x, y = load_data()
    n_test_start = N_TRAIN + N_CALIB_POOL
    x_tr, y_tr = x[:N_TRAIN], y[:N_TRAIN]
    x_pool = x[N_TRAIN:n_test_start]
    x_te, y_te = x[n_test_start:], y[n_test_start:]

    t0 = time.perf_counter()
    p = train(x_tr, y_tr)
    print(f"trained in {time.perf_counter() - t0:.1f} s")
    train_acc, test_acc = accuracy(p, x_tr, y_tr), accuracy(p, x_te, y_te)
    print(f"numpy: train accuracy {train_acc:.2%} ({N_TRAIN}), test accuracy {test_acc:.2%} ({len(y_te)})")

    model = to_onnx(p)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, args.output)

    calib_idx = [i * N_CALIB_POOL // N_CALIB for i in range(N_CALIB)]  # evenly spaced over the pool
    args.calib_out.mkdir(parents=True, exist_ok=True)
    np.savez(args.calib_out / "calib.npz", image=np.ascontiguousarray(x_pool[calib_idx], np.float32))
    np.savez(args.calib_out / "test.npz", image=np.ascontiguousarray(x_te, np.float32), label=y_te)

    try:  # check the exported model against the numpy forward pass
        import onnxruntime as ort

        sess = ort.InferenceSession(args.output.as_posix(), providers=["CPUExecutionProvider"])
        ort_logits = sess.run(None, {"image": x_te})[0]
        np.testing.assert_allclose(ort_logits, forward(p, x_te), rtol=1e-4, atol=1e-4)
        print(f"onnxruntime: test accuracy {(ort_logits.argmax(1) == y_te).mean():.2%} (matches numpy)")
    except ImportError:
        pass
    for f in (args.output, args.calib_out / "calib.npz", args.calib_out / "test.npz"):
        print(f"wrote {f} ({f.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
