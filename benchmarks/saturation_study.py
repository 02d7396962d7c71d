"""Why does onnxruntime's quantize_static lose so much accuracy on AVX2 CPUs without VNNI?

Hypothesis: on x86 without VNNI, ORT's u8 x s8 integer GEMM/conv kernels (MLAS) use VPMADDUBSW,
which adds pairs of u8*s8 products into int16 *with saturation*. With 8-bit weights (|w| <= 127)
and u8 activations (<= 255), 2*255*127 = 64770 > 32767, so sums can clip. 7-bit weights
(reduce_range, |w| <= 64) give at most 2*255*64 = 32640 and cannot clip.

Test: quantize MobileNetV2 with ``quantize_static`` (QDQ, MinMax, 128 calibration images) in
several variants and evaluate each quantized model twice:

* ``ORT_DISABLE_ALL``: no QDQ fusion, the Q/DQ nodes run as written and every Conv/Gemm runs in
  float. This is an exact simulation of the quantization rounding with no integer kernel.
* ``ORT_ENABLE_ALL``: the QDQ groups are fused into QLinearConv / integer kernels (what users get).

If simulation agrees with fp32 but the fused model does not, and only for 8-bit s8 weights, the
loss comes from the kernel, not from the quantization itself.

Run:  python benchmarks/saturation_study.py [--calib-size 128] [--variants a,b,c,d,e]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ASSETS, calibration_indices, load_images, make_session, predict  # noqa: E402
from _harness import FeedReader

MODEL = ASSETS / "cnn" / "mobilenetv2-7" / "model.onnx"
WORKDIR = Path("/tmp/onnxq_saturation_study")


def variants():
    """name -> (description, quantize_static keyword arguments).

    Note: in onnxruntime 1.32 ``quantize_static`` defaults to ``activation_type=QInt8`` (S8S8);
    older releases (and the anchor figures) used U8 activations / S8 weights. Every variant other
    than ``a`` therefore names both types explicitly.
    """
    from onnxruntime.quantization import QuantType

    u8, s8 = QuantType.QUInt8, QuantType.QInt8
    return {
        "a": ("ORT 1.32 defaults (per-tensor, S8 act / S8 w)", dict()),
        "a2": ("per-tensor, U8 act / S8 w", dict(activation_type=u8, weight_type=s8)),
        "b": ("per-channel, U8 act / S8 w", dict(per_channel=True, activation_type=u8, weight_type=s8)),
        "c": ("per-channel, U8/S8 + reduce_range (7-bit w)",
              dict(per_channel=True, reduce_range=True, activation_type=u8, weight_type=s8)),
        "d": ("per-channel, U8 act / U8 w", dict(per_channel=True, activation_type=u8, weight_type=u8)),
        "e": ("per-channel, S8 act / S8 w", dict(per_channel=True, activation_type=s8, weight_type=s8)),
        "f": ("per-tensor, U8/S8 + reduce_range (7-bit w)",
              dict(reduce_range=True, activation_type=u8, weight_type=s8)),
    }


def kernel_probe() -> list[tuple[str, int, int]]:
    """Direct test of ORT's MatMulInteger kernel: A = [[a, a]], B = [[b], [b]] -> exact 2*a*b.

    Returns (case, exact, ORT result). A u8 x s8 pair sum beyond 32767 shows int16 saturation.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    out = []
    for at, bt, a, b in (("u8", "s8", 255, 127), ("u8", "s8", 255, 64), ("u8", "s8", 255, -128),
                         ("u8", "u8", 255, 255), ("s8", "s8", -128, -128), ("s8", "s8", 127, 127)):
        tp = {"u8": (TensorProto.UINT8, np.uint8), "s8": (TensorProto.INT8, np.int8)}
        g = helper.make_graph(
            [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe",
            [helper.make_tensor_value_info("A", tp[at][0], [1, 2])], [
                helper.make_tensor_value_info("Y", TensorProto.INT32, [1, 1])],
            [numpy_helper.from_array(np.full((2, 1), b, tp[bt][1]), "B")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        y = int(sess.run(None, {"A": np.full((1, 2), a, tp[at][1])})[0][0, 0])
        out.append((f"{at}({a}) x {bt}({b}), K=2", 2 * a * b, y))
    return out


def quantize(out_path: Path, calib: np.ndarray, kwargs: dict) -> float:
    """Run ORT quantize_static (QDQ, MinMax) with ``kwargs``; returns seconds taken."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    name = onnx.load(str(MODEL), load_external_data=False).graph.input[0].name
    t = time.perf_counter()
    reader = FeedReader([{name: calib[i:i + 1]} for i in range(len(calib))])  # one image per feed
    quantize_static(str(MODEL), str(out_path), reader, quant_format=QuantFormat.QDQ,
                    calibrate_method=CalibrationMethod.MinMax, **kwargs)
    return time.perf_counter() - t


def weight_stats(path: Path) -> dict:
    """Count quantized weight values (8-bit initializers feeding DequantizeLinear) by magnitude.

    For s8 weights: how many have |q| > 64 (could saturate VPMADDUBSW pairs with u8 inputs).
    For u8 weights the count is |q - zero_point| > 64.
    """
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    total = big = 0
    maxabs = 0
    dtype = None
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[n.input[0]])
        if q.dtype not in (np.int8, np.uint8) or q.ndim < 2:  # skip biases (int32) and scalars
            continue
        dtype = q.dtype.name
        zp = np.zeros(1, np.int32)
        if len(n.input) > 2 and n.input[2] in inits:
            zp = numpy_helper.to_array(inits[n.input[2]]).astype(np.int32)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if zp.size > 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            zp = zp.reshape(shape)
        v = np.abs(q.astype(np.int32) - zp)
        total += v.size
        big += int((v > 64).sum())
        maxabs = max(maxabs, int(v.max()))
    return {"dtype": dtype, "total": total, "gt64": big, "max": maxabs}


def fused_ops(sess_path: Path) -> str:
    """Op types in the graph ORT actually runs at ORT_ENABLE_ALL (saved optimized model)."""
    import onnxruntime as ort

    opt = sess_path.with_suffix(".opt.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(sess_path), so, providers=["CPUExecutionProvider"])
    m = onnx.load(str(opt))
    counts: dict[str, int] = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    keep = ("QLinearConv", "QLinearMatMul", "QLinearAdd", "Conv", "Gemm", "MatMulIntegerToFloat",
            "QLinearGlobalAveragePool", "DequantizeLinear", "QuantizeLinear")
    return ", ".join(f"{k}:{counts[k]}" for k in keep if k in counts)


def _dequantized_weights(path: Path) -> dict[str, np.ndarray]:
    """float weight name -> its dequantized value in a QDQ model (8-bit weight DQs only, no biases)."""
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        q = inits[n.input[0]]
        if q.dtype not in (np.int8, np.uint8) or q.ndim < 2:
            continue
        scale = inits[n.input[1]].astype(np.float32)
        zp = inits[n.input[2]].astype(np.float32) if len(n.input) > 2 and n.input[2] in inits else np.zeros(1, np.float32)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if scale.size > 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        out[n.input[0].rsplit("_quantized", 1)[0]] = ((q.astype(np.float32) - zp) * scale).astype(np.float32)
    return out


def ablated_model(path: Path, out: Path, keep: str) -> Path:
    """Model with only the weight (``keep='weights'``) or only the activation (``'acts'``) quantization.

    ``weights``: the fp32 model with each weight replaced by its dequantized value from ``path``.
    ``acts``: the QDQ model with every weight DequantizeLinear replaced by the original float weight.
    (Bypassing activation Q/DQ in the QDQ model is wrong: ORT's quantizer drops Clip/Relu nodes that the
    activation range already implies.)
    """
    deq = _dequantized_weights(path)
    if keep == "weights":
        m = onnx.load(str(MODEL))
        for i, init in enumerate(m.graph.initializer):
            if init.name in deq:
                m.graph.initializer[i].CopyFrom(numpy_helper.from_array(deq[init.name], init.name))
        onnx.save(m, str(out))
        return out
    m = onnx.load(str(path))
    fp = {i.name: i for i in onnx.load(str(MODEL)).graph.initializer}
    inits = {i.name for i in m.graph.initializer}
    keep_nodes = []
    for n in m.graph.node:
        name = n.input[0].rsplit("_quantized", 1)[0] if n.input else ""
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and name in deq and name in fp:
            m.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(fp[name]), n.output[0]))
        else:
            keep_nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep_nodes)
    onnx.save(m, str(out))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--variants", default="a,a2,b,c,d,e,f")
    ap.add_argument("--ablate", action="store_true",
                    help="also split the simulated loss of variant b into weight-only / activation-only")
    ap.add_argument("--show-ops", action="store_true", help="list the op types ORT runs after fusion")
    args = ap.parse_args(argv)

    WORKDIR.mkdir(parents=True, exist_ok=True)
    print("MatMulInteger probe (exact vs ORT CPU):")
    for case, exact, got in kernel_probe():
        print(f"  {case}: exact {exact}, ORT {got}{'   <-- saturated' if exact != got else ''}")
    t0 = time.perf_counter()
    x, y, origin = load_images("torch")
    print(f"{len(x)} images ({origin}), {time.perf_counter() - t0:.1f}s", flush=True)
    calib = x[calibration_indices(len(x), args.calib_size)]

    ref = predict(make_session(MODEL, "all"), x)
    ref_none = predict(make_session(MODEL, "none"), x)
    print(f"fp32 top-1 {100 * (ref == y).mean():.1f}% (DISABLE_ALL vs ENABLE_ALL agree "
          f"{100 * (ref == ref_none).mean():.1f}%)", flush=True)

    rows = []
    table = variants()
    for key in args.variants.split(","):
        desc, kw = table[key]
        out = WORKDIR / f"mnv2_{key}.onnx"
        secs = quantize(out, calib, kw)
        ws = weight_stats(out)
        res = {}
        for level in ("none", "all"):
            p = predict(make_session(out, level), x)
            res[level] = (100 * (p == ref).mean(), 100 * (p == y).mean())
        rows.append((key, desc, res, ws, secs))
        print(f"[{key}] {desc}: sim agree {res['none'][0]:.1f}% top1 {res['none'][1]:.1f}% | "
              f"fused agree {res['all'][0]:.1f}% top1 {res['all'][1]:.1f}% | "
              f"w {ws['dtype']} |q|>64: {ws['gt64']}/{ws['total']} | quantize {secs:.0f}s", flush=True)
        if args.show_ops:
            print("    fused graph:", fused_ops(out), flush=True)

    ablation = []
    if args.ablate:
        src = WORKDIR / "mnv2_b.onnx"
        if not src.exists():
            quantize(src, calib, table["b"][1])
        for keep, label in (("weights", "(b) weights only (per-channel 8-bit), float activations"),
                            ("acts", "(b) activations only (U8 MinMax), float weights")):
            p = predict(make_session(ablated_model(src, WORKDIR / f"mnv2_b_{keep}.onnx", keep), "none"), x)
            ablation.append((label, 100 * (p == ref).mean(), 100 * (p == y).mean()))
            print(f"[ablate] {label}: agree {ablation[-1][1]:.1f}% top1 {ablation[-1][2]:.1f}%", flush=True)

    print()
    print(f"MobileNetV2, ORT quantize_static QDQ MinMax, {len(calib)} calibration images, "
          f"{len(x)} eval images; fp32 top-1 {100 * (ref == y).mean():.1f}%")
    print()
    print("| variant | simulated (DISABLE_ALL) agree / top-1 | fused kernels (ENABLE_ALL) agree / top-1 "
          "| weights with abs(q)>64 |")
    print("|---|---|---|---|")
    for key, desc, res, ws, _ in rows:
        frac = f"{ws['gt64']}/{ws['total']} ({100 * ws['gt64'] / max(ws['total'], 1):.2f}%), max {ws['max']}"
        print(f"| ({key}) {desc} | {res['none'][0]:.1f}% / {res['none'][1]:.1f}% "
              f"| {res['all'][0]:.1f}% / {res['all'][1]:.1f}% | {frac} |")
    for label, agree, top1 in ablation:
        print(f"| {label} | {agree:.1f}% / {top1:.1f}% | - | - |")


if __name__ == "__main__":
    main()
