"""One self-contained HTML page for a quantize run's report (the dict written as ``report.json``).

Why: ``report.json`` is complete but hard to read, and a deployment engineer wants to see at a glance
what a run did, what it cost and where accuracy was lost. The page has no external resources (inline
CSS, plots as base64 PNG) so it can be mailed, attached to a ticket or opened offline.

Plots use matplotlib (the optional ``report`` extra), imported lazily with the Agg backend. Without it
(or with ``charts=False``) every table is still there and a visible notice says how to get the charts.
Every key of the report may be missing: sections render what is present, unknown keys are ignored.
Every string from the report is HTML-escaped (tensor and node names may contain ``< > &``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from onnxq.destinations import write_text_atomic

__all__ = ["CHARTS_NOTICE", "render_html", "write_html"]

CHARTS_NOTICE = 'Charts need matplotlib: pip install "onnxq[report]"'
MAX_SQNR_BARS = 60
WORST_TENSORS = 20
TOP_RANKING = 20

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;color:#222;background:#fff;margin:0}
.wrap{max-width:1100px;margin:0 auto;padding:12px 24px 40px}
h1{font-size:1.5em;margin:.6em 0 .3em}
h2{font-size:1.2em;border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:1.8em}
h3{font-size:1em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:6px 0 14px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f4f7}
td.n{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
table.kv th{width:11em}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:12.5px}
td code{word-break:break-all}
pre{background:#f7f7f7;border:1px solid #ddd;padding:8px;overflow:auto}
.notice{background:#fff4ce;border:1px solid #e0c060;padding:8px 12px;margin:12px 0}
.ok{color:#17662a;font-weight:600}.bad{color:#b00020;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:10px;margin-bottom:12px}
img{max-width:100%;height:auto;display:block}
"""


# -- small formatting helpers (each returns safe HTML) ------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _code(value: Any) -> str:
    return f"<code>{_e(value)}</code>"


def _d(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _l(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


def _isnum(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _f(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals; '—' when absent; other values escaped as they are."""
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if _isnum(value) and math.isfinite(value) else _e(value)


def _pct(value: Any) -> str:
    return f"{value * 100:.1f}%" if _isnum(value) and math.isfinite(value) else _f(value)


def _bytes(value: Any) -> str:
    """Bytes in binary multiples with the usual KB/MB/GB labels."""
    if not _isnum(value):
        return _f(value)
    if abs(value) < 1024:
        return f"{int(value)} B"
    exp = min(3, int(math.log(abs(value), 1024)))
    return f"{value / 1024**exp:.1f} {('KB', 'MB', 'GB')[exp - 1]}"


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], numeric: Iterable[int] = ()) -> str:
    """A table; ``rows`` hold HTML already escaped; columns in ``numeric`` are right-aligned."""
    num = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if i in num else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>\n"
        for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>\n"


def _kv(pairs: Iterable[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>\n" for k, v in pairs if v)
    return f'<table class="kv"><tbody>\n{rows}</tbody></table>\n' if rows else ""


def _ul(items: Iterable[Any]) -> str:
    lis = "".join(f"<li>{_e(x)}</li>\n" for x in items)
    return f"<ul>\n{lis}</ul>\n" if lis else ""


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{_e(title)}</h2>\n{body}</section>\n' if body else ""


# -- charts ------------------------------------------------------------------------------------------

def _pyplot(charts: bool | None) -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None (charts off or matplotlib missing)."""
    if charts is False:
        return None
    try:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:  # never switch (and close) an existing session's backend
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if charts:
            raise ImportError(CHARTS_NOTICE) from None
        return None
    return plt


def _label(name: Any, width: int = 48) -> str:
    """A chart label: shortened from the left, ``$`` escaped so matplotlib does not read mathtext."""
    text = str(name)
    text = text if len(text) <= width else "…" + text[-(width - 1):]
    return text.replace("$", r"\$")


def _img(plt: Any, draw: Callable[[Any], Any], size: tuple[float, float], alt: str) -> str:
    """Run ``draw(ax)`` on a new figure and return it as an inline PNG (a notice if drawing failed)."""
    fig, ax = plt.subplots(figsize=size)
    try:
        draw(ax)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    except Exception as exc:  # noqa: BLE001 - a malformed entry must not lose the whole page
        return f'<p class="notice">Chart not drawn: {_e(exc)}</p>\n'
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">\n'


def _hbars(labels: list[str], values: list[float], xlabel: str, color: str) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        ax.barh(range(len(values)), values, color=color)
        ax.set_yticks(range(len(values)), [_label(x) for x in labels], fontsize=7)
        ax.margins(y=0.01)
        ax.invert_yaxis()  # first (worst / most sensitive) on top
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    return draw


# -- sections ----------------------------------------------------------------------------------------

def _header(info: Mapping[str, Any]) -> tuple[str, str]:
    out = info.get("output")
    title = f"onnxq report — {Path(str(out)).name}" if out else "onnxq report"
    rows = [("Input", _code(info["input"]) if "input" in info else ""),
            ("Output", _code(out) if out else ""),
            ("Recipe", _e(info["recipe"]) if "recipe" in info else ""),
            ("onnxq version", _e(info["onnxq_version"]) if "onnxq_version" in info else ""),
            ("Input sha256", _code(info["input_sha256"]) if "input_sha256" in info else "")]
    return title, f"<h1>{_e(title)}</h1>\n{_kv(rows)}"


def _summary(info: Mapping[str, Any]) -> str:
    size, cal, target = _d(info.get("size")), _d(info.get("calibration")), _d(info.get("target"))
    size_txt = ""
    if size:
        a, b = size.get("input_bytes"), size.get("output_bytes")
        ratio = b / a if _isnum(a) and _isnum(b) and a else size.get("ratio")
        size_txt = f"{_bytes(a)} → {_bytes(b)}" + (f" (ratio {_f(ratio, 3)})" if ratio is not None else "")
    cal_txt = ", ".join(p for p in [
        _e(cal["method"]) if "method" in cal else "",
        f"{_e(cal['samples'])} samples" if "samples" in cal else "",
        f"{_e(cal['samples_seen'])} seen" if "samples_seen" in cal else "",
        f"{_f(cal['seconds'])} s" if "seconds" in cal else "",
        f"from {_code(cal['source'])}" if "source" in cal else ""] if p)
    target_txt = ""
    if target:
        target_txt = _code(target.get("profile", "?"))
        target_txt += "".join(f" — {_e(target[k])}" for k in ("reason", "description") if target.get(k))
    return _kv([("Size", size_txt),
                ("Total time", f"{_f(info['seconds'])} s" if "seconds" in info else ""),
                ("Peak RSS", f"{_f(info['peak_rss_mb'], 1)} MB" if "peak_rss_mb" in info else ""),
                ("Provider", _e(cal["provider"]) if "provider" in cal else ""),
                ("Calibration", cal_txt), ("Target profile", target_txt)])


def _steps(steps: list[Any]) -> str:
    rows = []
    for s in map(_d, steps):
        counts = ", ".join(f"{_e(k)}={_e(v)}" for k, v in _d(s.get("counts")).items())
        rows.append([_code(s.get("name", "?")), _f(s.get("seconds"), 3), _f(s.get("peak_rss_mb"), 1),
                     "yes" if s.get("modified") else "no", counts, "<br>".join(_e(n) for n in _l(s.get("notes")))])
    return _table(["step", "time s", "peak RSS MB", "modified", "counts", "notes"], rows, numeric=(1, 2)) if rows else ""


def _accuracy(comp: Mapping[str, Any], plt: Any | None) -> str:
    parts = []
    outputs = _d(comp.get("outputs"))
    if outputs:
        rows = [[_code(k), _f(_d(v).get("sqnr_db")), _f(_d(v).get("cosine"), 5), _f(_d(v).get("max_abs_err"), 4)]
                for k, v in outputs.items()]
        parts.append("<h3>Outputs</h3>\n" + _table(["output", "SQNR dB", "cosine", "max abs err"], rows, (1, 2, 3)))
    facts = [("Samples", _e(comp["samples"]) if "samples" in comp else ""),
             ("Forward passes", _e(comp["forward_passes"]) if "forward_passes" in comp else "")]
    if "top1_agreement" in comp:
        t1 = comp["top1_agreement"]
        facts.insert(0, ("Top-1 agreement", _pct(t1) if t1 is not None else "not measured"))
    parts.append(_kv(facts))
    models = _d(comp.get("models"))
    fm, qm = _d(models.get("float")), _d(models.get("quant"))
    if fm or qm:
        def ratio(key: str) -> str:
            a, b = fm.get(key), qm.get(key)
            return f"{b / a:.3f}x" if _isnum(a) and _isnum(b) and a else "—"
        rows = [["float", _bytes(fm.get("bytes")), _f(fm.get("latency_ms"))],
                ["quantized", _bytes(qm.get("bytes")), _f(qm.get("latency_ms"))],
                ["quantized / float", ratio("bytes"), ratio("latency_ms")]]
        parts.append("<h3>Models</h3>\n" + _table(["model", "size", "latency ms"], rows, (1, 2)))
    tensors = [_d(t) for t in _l(comp.get("tensors"))]
    if tensors:
        shown = [t for t in tensors if _isnum(t.get("sqnr_db")) and math.isfinite(t["sqnr_db"])][:MAX_SQNR_BARS]
        if plt is not None and shown:
            draw = _hbars([t.get("float_name", "?") for t in shown], [t["sqnr_db"] for t in shown], "SQNR (dB)", "#4c72b0")
            parts.append(f"<h3>Per-tensor SQNR (worst {len(shown)})</h3>\n"
                         + _img(plt, draw, (9, 1.0 + 0.17 * len(shown)), "per-tensor SQNR"))
        rows = [[str(i), _code(t.get("float_name", "?")), _code(t.get("node", "")), _e(t.get("op_type", "")),
                 _f(t.get("sqnr_db")), _f(t.get("cosine"), 5)] for i, t in enumerate(tensors[:WORST_TENSORS], 1)]
        parts.append(f"<h3>Worst {len(rows)} tensors</h3>\n"
                     + _table(["#", "tensor", "node", "op", "SQNR dB", "cosine"], rows, (0, 4, 5)))
    unmatched = _l(comp.get("unmatched"))
    if unmatched:
        parts.append(f"<p>Float tensors with no quantized counterpart ({len(unmatched)}):</p>\n"
                     f"<ul>\n{''.join(f'<li>{_code(u)}</li>' for u in unmatched[:50])}</ul>\n")
    return "".join(parts)


def _mixed(mp: Mapping[str, Any], plt: Any | None) -> str:
    parts = []
    if mp:
        met = mp.get("met")
        status = "" if met is None else ('<span class="ok">met</span>' if met else '<span class="bad">NOT met</span>')
        line = f"Target {_code(mp.get('target', '?'))}"
        if "metric" in mp:
            line += f" (metric {_code(mp['metric'])})"
        line += f": baseline {_f(mp.get('baseline'), 4)} → final {_f(mp.get('final'), 4)}"
        line += f", {status}" if status else ""
        cost = [f"{_e(mp['forward_passes'])} forward passes" if "forward_passes" in mp else "",
                f"{_f(mp['seconds'], 1)} s" if "seconds" in mp else ""]
        if any(cost):
            line += "; cost " + ", ".join(c for c in cost if c)
        parts.append(f"<p>{line}.</p>\n")
    fallbacks = [_d(f) for f in _l(mp.get("fallbacks"))]
    if fallbacks:
        rows = [[_code(f.get("node", "?")), _e(f.get("op_type", "")), _e(f.get("level", "")),
                 ("&lt; " if f.get("metric_without_is_bound") else "") + _f(f.get("metric_without"), 4),
                 _f(f.get("effect"), 4), _f(f.get("gain_if_float"), 2)]
                for f in fallbacks]  # fmt: skip
        metric = _e(mp.get("metric", "metric"))
        parts.append("<h3>Fallbacks</h3>\n<p>Each row: the budget metric measured with every other fallback kept "
                     "but this one back at int8, and the difference it makes (&lt;: the measurement stopped once the "
                     "target was out of reach, so the value is an upper bound).</p>\n"
                     + _table(["node", "op", "level", f"{metric} without it", "effect", "ranking gain (dB)"], rows, (3, 4, 5)))
    ranking = [_d(r) for r in _l(mp.get("ranking"))][:TOP_RANKING]
    if ranking:
        gains = [r for r in ranking if _isnum(r.get("gain")) and math.isfinite(r["gain"])]
        if plt is not None and gains:
            draw = _hbars([r.get("node", "?") for r in gains], [r["gain"] for r in gains],
                          "output SQNR gain (dB) if left in float", "#dd8452")
            parts.append(_img(plt, draw, (9, 1.0 + 0.2 * len(gains)), "sensitivity ranking"))
        rows = [[str(i), _code(r.get("node", "?")), _e(r.get("op_type", "")), _f(r.get("metric_if_float"), 3),
                 _f(r.get("gain"), 3)] for i, r in enumerate(ranking, 1)]
        n_rank = mp.get("rank_samples")
        parts.append(f"<h3>Sensitivity ranking (top {len(rows)})</h3>\n<p>Each layer alone left in float, "
                     f"everything else int8: output SQNR on the first {_e(n_rank if n_rank else 'few')} samples.</p>\n"
                     + _table(["#", "node", "op", "output SQNR dB if float", "gain dB"], rows, (0, 3, 4)))
    parts.append(_ul(_l(mp.get("notes"))))
    return "".join(parts)


def _outside_share(edges: list[float], counts: list[float], lo: float, hi: float) -> float | None:
    """Share of the histogram mass outside [lo, hi], counts spread evenly within each bin."""
    total = float(sum(counts))
    if total <= 0:
        return None
    inside = 0.0
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        if b > a:
            inside += c * max(0.0, min(b, hi) - max(a, lo)) / (b - a)
        elif lo <= a <= hi:
            inside += c
    return max(0.0, 1.0 - inside / total)


def _histograms(hists: list[Any], plt: Any | None) -> str:
    imgs, rows = [], []
    for h in map(_d, hists):
        name, edges, counts = h.get("tensor", "?"), _l(h.get("edges")), _l(h.get("counts"))
        rng = _l(h.get("range"))
        ok = (len(edges) == len(counts) + 1 and len(counts) > 0 and all(map(_isnum, edges + counts)))
        lo, hi = (rng[0], rng[1]) if len(rng) == 2 and all(map(_isnum, rng)) else (None, None)
        share = _outside_share(edges, counts, lo, hi) if ok and lo is not None and hi is not None else None
        rows.append([_code(name), f"{_f(edges[0], 4)} .. {_f(edges[-1], 4)}" if ok else "—",
                     f"{_f(lo, 4)} .. {_f(hi, 4)}" if lo is not None else "—",
                     f"{share * 100:.3f}%" if share is not None else "—", _f(h.get("sqnr_db")), _e(h.get("method", ""))])
        if plt is None or not ok:
            continue

        def draw(ax: Any, edges: list[float] = edges, counts: list[float] = counts, lo: Any = lo, hi: Any = hi,
                 title: str = f"{_label(name, 40)}  SQNR {_f(h.get('sqnr_db'), 1)} dB") -> None:
            ax.stairs(counts, edges, fill=True, color="#4c72b0")
            if any(c > 0 for c in counts):
                ax.set_yscale("log")
            for x in (lo, hi):
                if x is not None:
                    ax.axvline(x, color="red", linewidth=1.2)
            ax.set_title(title, fontsize=8)
            ax.tick_params(labelsize=7)
        imgs.append(_img(plt, draw, (4.2, 2.4), f"histogram of {name}"))
    if not rows:
        return ""
    grid = f'<div class="grid">\n{"".join(f"<div>{i}</div>" for i in imgs)}</div>\n' if imgs else ""
    table = _table(["tensor", "data min .. max", "chosen range", "mass outside range", "SQNR dB", "method"],
                   rows, numeric=(3, 4))
    return grid + table


def render_html(report: Mapping[str, Any], *, charts: bool | None = None) -> str:
    """The report as one self-contained HTML page.

    ``charts``: None draws the plots when matplotlib is importable, False never draws them (a notice
    says how to get them), True requires matplotlib (ImportError with the install hint otherwise).
    """
    report = _d(report)
    info, comp, mp = _d(report.get("info")), _d(report.get("comparison")), _d(report.get("mixed_precision"))
    hists = _l(report.get("histograms"))
    plt = _pyplot(charts)
    title, header = _header(info)
    wants_charts = bool(_l(comp.get("tensors")) or hists or _l(mp.get("ranking")))
    notice = f'<div class="notice">{_e(CHARTS_NOTICE)}</div>\n' if plt is None and wants_charts else ""
    recipe = info.get("recipe_full")
    body = "".join([
        header, notice,
        _section("summary", "Summary", _summary(info)),
        _section("notes", "Notes", _ul(_l(report.get("notes")))),
        _section("steps", "Steps", _steps(_l(report.get("steps")))),
        _section("accuracy", "Accuracy", _accuracy(comp, plt) if comp else ""),
        _section("mixed-precision", "Mixed precision", _mixed(mp, plt) if mp else ""),
        _section("histograms", "Activation histograms (ten worst tensors)", _histograms(hists, plt)),
        _section("recipe", "Recipe",
                 f"<pre>{_e(json.dumps(recipe, indent=2, default=str))}</pre>\n" if recipe is not None else ""),
    ])
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{_e(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n<div class=\"wrap\">\n{body}</div>\n</body>\n</html>\n")


def write_html(report: Mapping[str, Any], path: str | os.PathLike[str], *, charts: bool | None = None) -> Path:
    """Render ``report`` and write it to ``path`` atomically (temp file in the same folder, then rename;
    mode 0644 under the usual umask, a report is meant to be shared; special files are refused)."""
    return write_text_atomic(path, render_html(report, charts=charts), role="report file (--report)")
