"""One corrupt calibration sample against the default w8a8 calibration (issue 15, acceptance 2).

For SqueezeNet 1.1 and MobileNetV2: a calibration .npz of 32 real ImageNet images (evenly spaced over
the sorted list, ``torch`` preprocessing with onnxq's own image loader) is written clean and with one
corrupt sample: one element of one image set to 1e6, or to 1e4, or 16 elements set to NaN. Each .npz
calibrates the default ``w8a8`` preset (``onnxq.quantize_file``, nothing else set), and each quantized
model's top-1 agreement with the fp32 model is measured on the other 468 images (ORT CPU, all
optimisations). The warnings the summary prints are listed per run.

    python benchmarks/outlier_calibration.py                      # both models, all variants
    python benchmarks/outlier_calibration.py --models squeezenet --variants clean,1e6

Acceptance: every corrupt variant within 1 point of agreement of the clean calibration.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ASSETS, calibration_indices, cpu_info, load_images, make_session, predict

MODELS = {"squeezenet": ASSETS / "cnn/squeezenet1.1/model.onnx", "mnv2": ASSETS / "cnn/mobilenetv2-7/model.onnx"}
VARIANTS = ("clean", "1e6", "1e4", "nan")


def corrupt(x: np.ndarray, variant: str) -> np.ndarray:
    """The calibration images with one sample damaged (sample 5: one element, or a 4x4 patch of NaN)."""
    x = x.copy()
    if variant in ("1e6", "1e4"):
        x[5, 1, 100, 100] = float(variant)
    elif variant == "nan":
        x[5, 0, 50:54, 60:64] = np.nan
    return x


def quantize(model: Path, npz: Path, out: Path) -> tuple[float, list[str]]:
    """Default w8a8 on ``npz``; (seconds, the calibration warnings of the report)."""
    from onnxq.quantization import CalibrationOptions, quantize_file
    from onnxq.recipe import preset

    t0 = time.perf_counter()
    result = quantize_file(model, out, preset("w8a8"), calibration=CalibrationOptions(source=str(npz)))
    return time.perf_counter() - t0, list(result.report.info.get("calibration", {}).get("warnings", []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="squeezenet,mnv2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calib", type=int, default=32, help="calibration images (evenly spaced)")
    args = ap.parse_args()
    x, _, origin = load_images("torch")
    calib = calibration_indices(len(x), args.calib)
    rest = np.setdiff1d(np.arange(len(x)), calib)
    info = cpu_info()
    print(f"# {info['model']}, {info['cores']} cores; avx2 {info['avx2']}, avx512f {info['avx512f']}, "
          f"avx512_vnni {info['avx512_vnni']}, avx_vnni {info['avx_vnni']}; loader {origin}")
    print(f"# calibration: {len(calib)} images; evaluation: the other {len(rest)}")
    print("| model | calibration data | agreement % | agreement change vs clean (points) | quantize s | warnings |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            sess = make_session(MODELS[name])
            input_name = sess.get_inputs()[0].name
            ref = predict(sess, x[rest])
            clean_agree = None
            for variant in args.variants.split(","):
                npz = work / f"calib_{variant}.npz"
                np.savez(npz, **{input_name: corrupt(x[calib], variant)})
                out = work / f"{name}_{variant}.onnx"
                secs, warns = quantize(MODELS[name], npz, out)
                agree = 100.0 * float(np.mean(predict(make_session(out), x[rest]) == ref))
                clean_agree = agree if variant == "clean" else clean_agree
                delta = "" if clean_agree is None or variant == "clean" else f"{agree - clean_agree:+.1f}"
                shown = "; ".join(warns)[:200]
                print(f"| {name} | {variant} | {agree:.1f} | {delta} | {secs:.1f} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
