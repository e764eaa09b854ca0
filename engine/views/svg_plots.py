"""Small inline-SVG plots for the HTML report: the filter funnel and value histograms with
thresholds marked. Plain SVG text, no plotting library and nothing fetched, so the report stays
one self-contained file; every label passes through html.escape."""
from __future__ import annotations

from html import escape
from typing import Any, Sequence

KEPT_COLOR = "#4a7fb5"
DROPPED_COLOR = "#d9534f"
THRESHOLD_COLOR = "#e67e00"


def _num(v: float) -> str:
    """Short tick text: 0.25, 12, 1.5e-04."""
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.3g}"
    return f"{v:.1e}"


def histogram_svg(title: str, subtitle: str, lo: float, hi: float, kept: Sequence[int], dropped: Sequence[int],
                  thresholds: Sequence[tuple[str, float]] = (), width: int = 320, height: int = 160) -> str:
    """Stacked bars (kept below, dropped above) over [lo, hi], one vertical dashed line per
    threshold (hover: the rule). The x range grows to show thresholds within one data span of the
    data; farther ones are an arrow at the edge, so a far-off cut does not squash the bars."""
    bins = len(kept)
    span = hi - lo if hi > lo else 1.0
    x_lo, x_hi = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
    for _, v in thresholds:
        if lo - span <= v < x_lo:
            x_lo = v
        if x_hi < v <= hi + span:
            x_hi = v
    left, right, top, bottom = 34, 10, 32, 22
    pw, ph = width - left - right, height - top - bottom
    peak = max([k + d for k, d in zip(kept, dropped)] + [1])

    def x_of(v: float) -> float:
        return left + (v - x_lo) / (x_hi - x_lo) * pw

    parts = [f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f'<text x="{left}" y="12" class="plot-title" textLength="{pw}" lengthAdjust="spacingAndGlyphs">'
             f'{escape(title)}</text>' if len(title) > 40 else f'<text x="{left}" y="12" class="plot-title">{escape(title)}</text>',
             f'<text x="{left}" y="25" class="axis">{escape(subtitle)}</text>']
    bin_w = (hi - lo) / bins if hi > lo else 1.0
    for i, (k, d) in enumerate(zip(kept, dropped)):
        if not k and not d:
            continue
        b_lo = lo + i * bin_w if hi > lo else lo - 0.5
        x0, x1 = x_of(b_lo), x_of(b_lo + bin_w)
        w = max(1.0, x1 - x0 - 1)
        hk, hd = k / peak * ph, d / peak * ph
        base = top + ph
        label = f"{_num(b_lo)} .. {_num(b_lo + bin_w)}: {k} kept, {d} dropped"
        parts.append(f'<g><title>{escape(label)}</title>'
                     f'<rect x="{x0:.1f}" y="{base - hk:.1f}" width="{w:.1f}" height="{hk:.1f}" fill="{KEPT_COLOR}"/>'
                     f'<rect x="{x0:.1f}" y="{base - hk - hd:.1f}" width="{w:.1f}" height="{hd:.1f}" fill="{DROPPED_COLOR}"/></g>')
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#555"/>')
    parts.append(f'<text x="{left}" y="{height - 6}" class="axis">{escape(_num(x_lo))}</text>')
    parts.append(f'<text x="{left + pw}" y="{height - 6}" class="axis" text-anchor="end">{escape(_num(x_hi))}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 8}" class="axis" text-anchor="end">{peak}</text>')
    for rule, v in thresholds:
        tip = f"<title>{escape(rule)} = {escape(_num(v))}</title>"
        if x_lo <= v <= x_hi:
            x = x_of(v)
            parts.append(f'<g class="threshold">{tip}<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{top + ph}" '
                         f'stroke="{THRESHOLD_COLOR}" stroke-width="2" stroke-dasharray="4 3"/></g>')
        else:
            at_right = v > x_hi
            x = left + pw if at_right else left
            arrow = f"{_num(v)} ▸" if at_right else f"◂ {_num(v)}"
            parts.append(f'<g class="threshold">{tip}<text x="{x}" y="{top + 10}" fill="{THRESHOLD_COLOR}" '
                         f'class="axis" text-anchor="{"end" if at_right else "start"}">{escape(arrow)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def funnel_svg(rows: list[dict[str, Any]], width: int = 640) -> str:
    """engine.views.funnel.funnel rows as bars: per annotation type, one bar per filter, its length the
    annotations that reached it, the dropped part in red (hover: the reasons)."""
    line, label_w, right = 20, 150, 150
    types = list(dict.fromkeys(r["type"] for r in rows))
    height = 10 + sum(line * (1 + sum(1 for r in rows if r["type"] == t)) for t in types)
    bar_w = width - label_w - right
    parts = [f'<svg class="funnel" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    y = 10
    for t in types:
        mine = [r for r in rows if r["type"] == t]
        total = max([r["in"] for r in mine] + [1])
        parts.append(f'<text x="0" y="{y + 13}" class="plot-title">{escape(t)}</text>')
        y += line
        for r in mine:
            w_in = r["in"] / total * bar_w
            w_drop = r["dropped"] / total * bar_w
            reasons = ", ".join(f"{k} x{v}" for k, v in r["reasons"].items()) or "nothing dropped"
            parts.append(
                f'<g><title>{escape(r["filter"])}: {escape(reasons)}</title>'
                f'<text x="10" y="{y + 13}" class="axis">{escape(r["filter"])}</text>'
                f'<rect x="{label_w}" y="{y + 3}" width="{w_in - w_drop:.1f}" height="{line - 6}" fill="{KEPT_COLOR}"/>'
                f'<rect x="{label_w + w_in - w_drop:.1f}" y="{y + 3}" width="{w_drop:.1f}" height="{line - 6}" fill="{DROPPED_COLOR}"/>'
                f'<text x="{label_w + bar_w + 6}" y="{y + 13}" class="axis">{r["in"]} &#8594; {r["out"]} (-{r["dropped"]})</text></g>')
            y += line
    parts.append("</svg>")
    return "".join(parts)


def pr_curve_svg(title: str, subtitle: str, curve: Sequence[tuple[float, float, float]],
                 marks: Sequence[tuple[str, float, float, str]] = (), width: int = 320, height: int = 200) -> str:
    """A precision-recall curve (points (threshold, precision, recall), strictest first) on [0, 1] x [0, 1],
    with marked operating points (label, recall, precision, colour); hover a point for its threshold."""
    left, right, top, bottom = 34, 10, 32, 24
    pw, ph = width - left - right, height - top - bottom

    def xy(r: float, p: float) -> tuple[float, float]:
        return left + r * pw, top + (1 - p) * ph

    parts = [f'<svg class="pr" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f'<text x="{left}" y="12" class="plot-title">{escape(title)}</text>',
             f'<text x="{left}" y="25" class="axis">{escape(subtitle)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>']
    if curve:
        points = " ".join("{:.1f},{:.1f}".format(*xy(r, p)) for _, p, r in curve)
        parts.append(f'<polyline points="{points}" fill="none" stroke="{KEPT_COLOR}" stroke-width="1.5"/>')
        for t, p, r in curve:
            x, y = xy(r, p)
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{KEPT_COLOR}"><title>'
                         f'{escape(f"threshold {_num(t)}: precision {p:.3f}, recall {r:.3f}")}</title></circle>')
    for label, r, p, colour in marks:
        x, y = xy(r, p)
        parts.append(f'<g class="threshold"><title>{escape(f"{label}: precision {p:.3f}, recall {r:.3f}")}</title>'
                     f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="none" stroke="{colour}" stroke-width="2"/></g>')
    parts.append(f'<text x="{left}" y="{height - 8}" class="axis">recall 0</text>')
    parts.append(f'<text x="{left + pw}" y="{height - 8}" class="axis" text-anchor="end">1</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 8}" class="axis" text-anchor="end">P 1</text>')
    parts.append(f'<text x="{left - 4}" y="{top + ph}" class="axis" text-anchor="end">0</text>')
    parts.append("</svg>")
    return "".join(parts)
