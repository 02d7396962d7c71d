"""The HTML report page: self-contained, escaped, well-formed, and readable with or without matplotlib."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from onnxq.report_html import CHARTS_NOTICE, render_html, write_html

SECTIONS = ["Summary", "Notes", "Steps", "Accuracy", "Mixed precision",
            "Activation histograms (ten worst tensors)", "Recipe"]
CHECKED_TAGS = {"html", "body", "table", "tr", "td", "th", "section", "div", "ul", "li", "pre"}


class _TagChecker(HTMLParser):
    """Checks that every opened tag among CHECKED_TAGS is closed, in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.srcs += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag in CHECKED_TAGS:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag not in CHECKED_TAGS:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def _check_markup(page: str) -> _TagChecker:
    checker = _TagChecker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert not checker.stack, f"never closed: {checker.stack}"
    return checker


def _histogram(name: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    counts, edges = np.histogram(rng.standard_normal(20000) * (1 + seed), bins=128)
    lo, hi = float(edges[8]), float(edges[-6])
    return {"tensor": name, "edges": edges.tolist(), "counts": counts.tolist(), "range": [lo, hi],
            "sqnr_db": 30.0 + seed, "method": "mse-percentile"}


@pytest.fixture
def report() -> dict:
    tensors = [{"float_name": f"/features.{i}/conv<{i}>&relu_output_0", "quant_name": f"/features.{i}/q_out",
                "node": f"Conv<{i}>", "op_type": "Conv" if i % 2 else "Relu", "sqnr_db": 12.0 + i * 0.7,
                "cosine": 0.99 + i * 1e-4} for i in range(70)]
    return {
        "info": {
            "input": "models/mnv2<fp32>&.onnx", "output": "out/mnv2<int8>&.onnx", "input_sha256": "ab" * 32,
            "onnxq_version": "0.1.0", "recipe": "w8a8",
            "recipe_full": {"preset": "w8a8", "exclude": ["<hd>&"], "calibrator": "mse-percentile"},
            "target": {"profile": "ort-cpu-avx2", "reason": "no --target given & AVX2 host",
                       "description": "ONNX Runtime CPU, u8 activations"},
            "calibration": {"source": "imagenet/", "samples": 128, "method": "mse-percentile",
                            "provider": "CPUExecutionProvider", "seconds": 12.5, "samples_seen": 128},
            "size": {"input_bytes": 13_964_571, "output_bytes": 3_910_000, "ratio": 0.28},
            "seconds": 31.2, "peak_rss_mb": 812.4, "unknown_extra": {"x": 1},
        },
        "notes": ["kept Softmax <out> in float & why", "per-channel weights"],
        "steps": [{"name": "fold_bn", "seconds": 0.12, "modified": True, "counts": {"folded": 52},
                   "notes": ["folded 52 <BN>"], "peak_rss_mb": 300.0},
                  {"name": "insert_qdq", "seconds": 1.5, "modified": True, "counts": {"q": 105, "dq": 210},
                   "notes": [], "peak_rss_mb": 410.5}],
        "comparison": {
            "samples": 64, "top1_agreement": 0.958, "forward_passes": 128,
            "outputs": {"output<0>": {"sqnr_db": 21.3, "cosine": 0.9963, "max_abs_err": 0.82}},
            "tensors": tensors, "unmatched": ["dangling<&>"],
            "models": {"float": {"bytes": 13_964_571, "latency_ms": 9.1},
                       "quant": {"bytes": 3_910_000, "latency_ms": 5.2}},
        },
        "mixed_precision": {
            "target": "agreement >= 0.99", "metric": "top1_agreement", "baseline": 0.958, "final": 0.991,
            "met": True, "forward_passes": 420, "seconds": 88.0,
            "ranking": [{"node": f"/blk{i}/Conv<{i}>", "op_type": "Conv", "metric_if_float": 0.96 + 0.001 * (25 - i),
                         "gain": 0.001 * (25 - i)} for i in range(25)],
            "fallbacks": [{"node": "/blk0/Conv<0>&", "op_type": "Conv", "level": "int16", "metric_without": 0.975, "effect": 0.01, "gain_if_float": 1.2},
                          {"node": "/blk1/Conv<1>", "op_type": "Conv", "level": "float", "metric_without": 0.98, "effect": 0.011, "gain_if_float": 0.8}],
            "notes": ["stopped at <target>"],
        },
        "histograms": [_histogram(f"/features.{i}/relu<{i}>&", i) for i in range(10)],
        "something_new": [1, 2, 3],
    }


def test_render_with_charts(report: dict) -> None:
    pytest.importorskip("matplotlib")
    page = render_html(report, charts=True)
    assert "data:image/png;base64," in page
    # SQNR chart + ranking chart + one per histogram
    assert page.count("<img ") == 2 + len(report["histograms"])
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    assert "<title>onnxq report — mnv2&lt;int8&gt;&amp;.onnx</title>" in page
    assert "/features.0/conv&lt;0&gt;&amp;relu_output_0" in page
    assert "conv<0>" not in page and "<hd>" not in page and "&lt;hd&gt;&amp;" in page and "dangling<" not in page
    assert CHARTS_NOTICE not in page
    assert "95.8%" in page
    checker = _check_markup(page)
    assert checker.srcs, "expected image sources"
    for ref in checker.srcs:
        assert not re.match(r"\s*(https?:)?//", ref), ref
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)


def test_render_without_charts(report: dict) -> None:
    page = render_html(report, charts=False)
    assert "<img" not in page
    assert 'pip install &quot;onnxq[report]&quot;' in page  # the notice, escaped
    worst = re.search(r"<h3>Worst 20 tensors</h3>\s*<table>(.*?)</table>", page, re.S)
    assert worst and worst.group(1).count("<tr>") == 21  # header + 20 rows
    fallbacks = re.search(r"<h3>Fallbacks</h3>.*?<table>(.*?)</table>", page, re.S)
    assert fallbacks and "/blk0/Conv&lt;0&gt;&amp;" in fallbacks.group(1) and "int16" in fallbacks.group(1)
    assert "Sensitivity ranking (top 20)" in page
    hist = re.search(r'<section id="histograms">(.*?)</section>', page, re.S)
    assert hist and hist.group(1).count("<tr>") == 11 and "%" in hist.group(1)
    _check_markup(page)


def test_render_when_matplotlib_is_missing(report: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    page = render_html(report)
    assert "<img" not in page and CHARTS_NOTICE.replace('"', "&quot;") in page
    assert "<h3>Worst 20 tensors</h3>" in page
    with pytest.raises(ImportError, match="onnxq\\[report\\]"):
        render_html(report, charts=True)


def test_minimal_report() -> None:
    page = render_html({"info": {"input": "a.onnx", "output": "b.onnx"},
                        "steps": [{"name": "fold_bn", "seconds": 0.1}]})
    assert "<h2>Steps</h2>" in page and "fold_bn" in page
    assert "Accuracy" not in page and "Mixed precision" not in page and CHARTS_NOTICE not in page
    _check_markup(page)
    _check_markup(render_html({}))
    # absent, null and wrongly typed values never crash the page
    page = render_html({"info": {"size": {"input_bytes": 10}, "calibration": None}, "steps": [None, {}],
                        "comparison": {"top1_agreement": None, "tensors": [{"sqnr_db": float("inf")}]},
                        "mixed_precision": {"met": False, "ranking": [{"gain": None}]},
                        "histograms": [{"tensor": "t", "edges": [0.0], "counts": [1, 2]}, {}]}, charts=False)
    assert "NOT met" in page and "not measured" in page
    _check_markup(page)


def test_write_html_atomic(report: dict, tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.html"
    out = write_html(report, target, charts=False)
    assert out == target and out.is_file()
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]
    write_html({"info": {}}, target)  # overwrite in place
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]


BROWSERS = ("chromium", "chromium-browser", "google-chrome")
"""The binary names looked for on PATH (``.ci/run`` installs Debian's ``chromium`` when none is there)."""


def _browser() -> str:
    """The Chromium binary; skips without one, but fails under ONNXQ_REQUIRE_ASSETS=1 (CI), like the assets."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    msg = f"no Chromium binary ({', '.join(BROWSERS)}) on PATH"
    if os.environ.get("ONNXQ_REQUIRE_ASSETS") == "1":
        pytest.fail(f"{msg}; ONNXQ_REQUIRE_ASSETS=1 makes this a failure (apt-get install -y chromium, as .ci/run does)")
    pytest.skip(msg)


def test_browser_render(report: dict, tmp_path: Path) -> None:
    browser = _browser()
    image = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    page = write_html(report, tmp_path / "report.html", charts=True)
    png = tmp_path / "screenshot.png"
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}"]
    run = subprocess.run([*base, f"--screenshot={png}", "--window-size=1280,2000", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"no screenshot (rc {run.returncode}): {run.stderr[-2000:]}"
    assert png.stat().st_size > 5000
    with image.open(png) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, f"flat page: {len(colours)} colours"
    if os.environ.get("ONNXQ_SCREENSHOT_DIR"):
        dest = Path(os.environ["ONNXQ_SCREENSHOT_DIR"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, dest / "report_screenshot.png")
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in dom.stdout, title


def test_ci_installs_the_browser_this_test_looks_for() -> None:
    """.ci/run looks for the same binary names as _browser and installs Debian's chromium when none is there."""
    script = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert all(f"command -v {name} " in script for name in BROWSERS), script
    assert "apt-get install -y chromium" in script and "apt-get update" in script
    assert script.index("apt-get install") < script.index("python -m pytest")
