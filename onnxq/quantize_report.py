"""The report side of :func:`onnxq.quantization.quantize_file`: the float-vs-quantized comparison that goes into
the report and the Q/DQ doc strings, and writing ``report.json`` / ``report.html`` beside the output."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from onnxq.calibration.sources import open_source
from onnxq.model import load_model
from onnxq.recipe import Recipe
from onnxq.report import Report

if TYPE_CHECKING:
    from onnxq.quantization import CalibrationOptions, QuantizeResult

__all__ = ["annotate_sqnr", "compare_into_report", "record_sizes_and_report", "report_view", "write_report"]


def compare_into_report(
    src: Path, result: QuantizeResult, opts: CalibrationOptions, samples: int, progress: bool, report: Report, recipe: Recipe
) -> dict[str, Any]:
    """Compare the result with the float model; the figures go into the report and each tensor's SQNR into
    the doc strings of the model's Q/DQ nodes."""
    comparison = compare_for_report(src, result.model, opts, samples, progress)
    report.info["comparison"] = {k: v for k, v in comparison.items() if k != "histograms"}
    report.info["histograms"] = with_ranges(comparison["histograms"], report, recipe)
    annotate_sqnr(result.model, comparison, comparison["samples"])
    return comparison


def record_sizes_and_report(
    result: QuantizeResult, report: Report, in_bytes: int, comparison: dict[str, Any] | None,
    report_dir: str | os.PathLike | None,
) -> None:
    """Sizes into the report, then the report files; on any failure (or interrupt) the written model files
    are removed: never a model without its report."""
    try:
        out_bytes = sum(p.stat().st_size for p in result.files)
        report.info["size"] = {"input_bytes": in_bytes, "output_bytes": out_bytes, "ratio": round(out_bytes / max(in_bytes, 1), 4)}
        if comparison is not None:
            report.info["comparison"]["models"]["quant"]["bytes"] = out_bytes
        if report_dir is not None:
            write_report(report, Path(report_dir))
    except BaseException:
        for f in result.files:
            f.unlink(missing_ok=True)
        raise


def write_report(report: Report, folder: Path) -> None:
    """report.json and report.html into ``folder`` (created)."""
    from onnxq.report_html import write_html

    folder.mkdir(parents=True, exist_ok=True)
    report.write_json(folder / "report.json")
    write_html(report_view(report), folder / "report.html")


def report_view(report: Report) -> dict[str, Any]:
    """The report as the HTML page reads it: info's comparison, histograms and mixed precision at the top."""
    d = json.loads(json.dumps(report.to_dict(), default=str))
    for key in ("comparison", "histograms", "mixed_precision"):
        if key in d["info"]:
            d[key] = d["info"].pop(key)
    return d


def compare_for_report(src: Path, quant: onnx.ModelProto, opts: CalibrationOptions, samples: int,
                        progress: bool) -> dict[str, Any]:  # fmt: skip
    """Float vs quantized on ``samples`` samples (per-tensor SQNR, outputs, size, latency) as a dict."""
    from onnxq.evaluate import compare_models

    if not opts.source:
        raise ValueError("compare_for_report needs a calibration or evaluation source (opts.source)")
    float_model = load_model(src)
    source = open_source(opts.source, float_model, preprocess=opts.preprocess, resize=opts.resize, crop=opts.crop,
                         tokenizer=opts.tokenizer, max_length=opts.max_length, seq_len=opts.seq_len, limit=samples,
                         seed=opts.seed)  # fmt: skip
    return compare_models(float_model, quant, source, float_path=src, progress=progress).to_dict()


def with_ranges(hists: list[dict[str, Any]], report: Report, recipe: Recipe) -> list[dict[str, Any]]:
    """The histograms of the worst tensors with the clipping range calibration chose for each."""
    ranges = report.info.get("activation_ranges", {})
    out = []
    for h in hists:
        r = ranges.get(h["tensor"])
        out.append({**h, "range": r if r is not None else h.get("data_range"),
                    "method": recipe.calibration.method if r is not None else "not quantized (data range)"})  # fmt: skip
    return out


def annotate_sqnr(model: onnx.ModelProto, comparison: dict[str, Any], samples: int) -> int:
    """Append the measured SQNR to the doc string of each compared tensor's Q/DQ nodes (read in Netron)."""
    by_tensor = {r["float_name"]: r for r in comparison.get("tensors", [])}
    count = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        base = node.name.rsplit("/", 1)[0] if "/" in node.name else ""
        row = by_tensor.get(base)
        if row is None:
            continue
        sqnr = row.get("sqnr_db")
        text = "exact" if sqnr is None else f"{sqnr:.1f} dB"
        node.doc_string = (node.doc_string + "; " if node.doc_string else "") + f"measured SQNR {text} over {samples} samples"
        count += 1
    return count
