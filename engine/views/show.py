"""`fld show OUT --out report.html`: one self-contained HTML page to look at a step's annotations.

Why this shape:
- each image is an inline SVG: the photo as an embedded JPEG <image>, every annotation a vector
  element in a layer (objects, OCR, groundings, masks, dropped), so a dense image stays readable
  by switching layers off (CSS-only toggles: no script runs, nothing is fetched) and every
  element carries a <title> tooltip (label, score; for dropped ones the reason);
- grounded phrases in the captions are coloured like their boxes, so a phrase-region link is
  checked at a glance; Florence-2's structure tokens (`<loc_12>`, `<poly>`...) a model leaks
  into its text are removed, never shown raw;
- the header names the pipeline, profile and models (manifest.json) and warns in red when a
  model is randomly initialised (`random:` reference): such annotations mean nothing;
- the filter funnel and a histogram of every check, with the pipeline's own thresholds marked,
  say why annotations were dropped and where a threshold would cut; the quarantine lists every
  input that was not used, with its reason.
All user data (file names, captions, labels, reasons) goes through html.escape.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import re
from pathlib import Path
from typing import Any, Iterable

from engine.views.calibrate import calibration_html
from engine.views.funnel import funnel, pipeline_thresholds, value_histograms
from engine.views.query import open_views, resolve_step
from engine.stage import decode_image, table_to_records
from engine.store import ShardStore
from engine.views.svg_plots import funnel_svg, histogram_svg
from schemas.geometry import mask_to_polygon, rle_to_mask
from schemas.records import ANNOTATION_KINDS

PALETTE = ["#e6194b", "#3cb44b", "#0082c8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#d2f53c",
           "#fabebe", "#008080", "#aa6e28", "#800000", "#aaffc3", "#808000", "#000080"]
OCR_COLOR = "#ffd400"
DROPPED_COLOR = "#9e9e9e"
LAYERS = (("objects", "object regions"), ("ocr", "OCR text"), ("groundings", "grounded phrases"),
          ("masks", "masks"), ("dropped", "dropped (hover: reason)"))
HIDDEN_AT_START = frozenset({"dropped"})
MANY_MASKS = 40  # more masks than this on the page: the masks layer starts hidden (a click shows them)
MASK_FILL = 0.18  # masks are light fills with a solid outline: the photo stays visible under them
QUARANTINE_ROWS = 500
# Florence-2 tokens that must never reach the page: whole ones anywhere, and pieces of a
# <loc_k> cut at either end of the text (generation stopped mid-token, a span cut inside one).
FLORENCE_TOKENS = re.compile(
    r"<loc_\d+>|</?(?:poly|sep|and|s|pad|unk)>|^(?:l?oc_|c_|_)?\d*>|<(?:l(?:o(?:c(?:_\d*)?)?)?)?$")
e = html.escape


def token_cuts(text: str) -> list[tuple[int, int]]:
    """Character ranges of `text` that are Florence-2 tokens (to be left out when shown)."""
    return [m.span() for m in FLORENCE_TOKENS.finditer(text or "") if m.end() > m.start()]


def visible_text(text: str | None, start: int = 0, end: int | None = None, cuts: list | None = None) -> str:
    """text[start:end] without Florence-2 tokens (cuts computed on the whole text)."""
    text = text or ""
    end = len(text) if end is None else end
    cuts = token_cuts(text) if cuts is None else cuts
    keep, pos = [], start
    for a, b in cuts:
        if b <= pos or a >= end:
            continue
        keep.append(text[pos:max(pos, a)])
        pos = max(pos, b)
    keep.append(text[pos:end] if pos < end else "")
    return "".join(keep)


def _label_color(label: str) -> str:
    return PALETTE[int(hashlib.md5((label or "").encode()).hexdigest(), 16) % len(PALETTE)]


def _jpeg_data_uri(data: bytes, max_side: int) -> str:
    img = decode_image(data)
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt_score(ann: dict) -> str:
    return "" if ann.get("score") is None else f" ({ann['score']:.2f})"


def _rect(box, color: str, tip: str, dashed: bool = False, extra: str = "") -> str:
    x0, y0, x1, y1 = (float(v) for v in box)
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    return (f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{max(x1 - x0, 0):.1f}" height="{max(y1 - y0, 0):.1f}" '
            f'fill="transparent" stroke="{color}"{dash}{extra}><title>{e(tip)}</title></rect>')


def _label(box, text: str, color: str, size: float) -> str:
    if not text:
        return ""
    return (f'<text x="{float(box[0]) + size * 0.2:.1f}" y="{float(box[1]) + size:.1f}" font-size="{size:.1f}" '
            f'fill="{color}" class="box-label">{e(text[:40])}</text>')


def _rings_path(rings: Iterable[list[float]]) -> str:
    parts = []
    for ring in rings:
        pts = [f"{float(ring[i]):.1f} {float(ring[i + 1]):.1f}" for i in range(0, len(ring) - 1, 2)]
        if len(pts) >= 3:
            parts.append("M " + " L ".join(pts) + " Z")
    return " ".join(parts)


class MaskLayer:
    """Masks of one image: a vector path each (hover shows whose mask it is) while the outline is
    compact; a speckled mask (a random SAM's) would make megabytes of path, so those are painted
    into one PNG at display size instead."""

    MAX_PATH_CHARS = 4000

    def __init__(self, width: int, height: int, max_side: int):
        self.width, self.height = width, height
        scale = min(1.0, max_side / max(width, height))
        self.size = (max(1, round(width * scale)), max(1, round(height * scale)))
        self.paths: list[str] = []
        self.canvas = None
        self.seen: set[str] = set()

    def add(self, ann: dict, color: str, what: str, opacity: float = MASK_FILL) -> bool:
        """Draw one annotation's mask (or polygon); False when it has none or the same mask is drawn
        already (a grounding shares its region's mask)."""
        key = (ann.get("mask") or {}).get("counts") or repr(ann.get("polygon"))
        if not (ann.get("mask") or ann.get("polygon")) or key in self.seen:
            return False
        self.seen.add(key)
        rings = ann.get("polygon")
        mask = rle_to_mask(ann["mask"]) if ann.get("mask") else None
        if not rings and mask is not None:
            rings = mask_to_polygon(mask, tolerance=1.0)
        path = _rings_path(rings or [])
        if path and len(path) <= self.MAX_PATH_CHARS:
            self.paths.append(f'<path d="{path}" fill="{color}" fill-opacity="{opacity}" fill-rule="evenodd" '
                              f'stroke="{color}" stroke-width="1.5" class="mask-outline"><title>mask: {e(what)}</title></path>')
        elif mask is not None or rings:
            self._paint(mask, rings, color, opacity)
        return True

    def _paint(self, mask, rings, color: str, opacity: float) -> None:
        import numpy as np
        from PIL import Image, ImageDraw

        if self.canvas is None:
            self.canvas = np.zeros((self.size[1], self.size[0], 4), np.uint8)
        if mask is not None:
            small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(self.size, Image.NEAREST)) > 0
        else:
            img = Image.new("L", self.size, 0)
            sx, sy = self.size[0] / self.width, self.size[1] / self.height
            for ring in rings:
                pts = [(ring[i] * sx, ring[i + 1] * sy) for i in range(0, len(ring) - 1, 2)]
                if len(pts) >= 3:
                    ImageDraw.Draw(img).polygon(pts, fill=255)
            small = np.asarray(img) > 0
        rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
        self.canvas[small] = (*rgb, int(255 * opacity))

    def svg(self) -> str:
        if self.canvas is None:
            return "".join(self.paths)
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.canvas, "RGBA").save(buf, format="PNG", optimize=True)
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return (f'<image href="{uri}" x="0" y="0" width="{self.width}" height="{self.height}" preserveAspectRatio="none">'
                "<title>masks too detailed to draw as outlines</title></image>" + "".join(self.paths))


def _area(ann: dict) -> float:
    x0, y0, x1, y1 = ann["box"]
    return (x1 - x0) * (y1 - y0)


def image_svg(rec: dict, data: bytes, max_side: int = 1024) -> tuple[str, dict[str, str]]:
    """The image with its annotations as SVG layers; returns (svg, colour of each kept grounding)."""
    w, h = int(rec["width"]), int(rec["height"])
    size = max(w, h) / 45
    kept = lambda anns: sorted((a for a in anns if a["status"] == "kept"), key=_area, reverse=True)  # noqa: E731
    layers: dict[str, list[str]] = {name: [] for name, _ in LAYERS}
    colors: dict[str, str] = {}
    masks = MaskLayer(w, h, max_side)
    for r in kept(rec["regions"]):
        label = visible_text(r.get("brief") or r.get("label"))
        if r["kind"] == "text":
            tip = f"OCR: {visible_text(r.get('label'))}{_fmt_score(r)}"
            if r.get("quad"):
                q = [float(v) for v in r["quad"]]
                pts = " ".join(f"{q[i]:.1f},{q[i + 1]:.1f}" for i in range(0, 8, 2))
                layers["ocr"].append(f'<polygon points="{pts}" fill="transparent" stroke="{OCR_COLOR}"><title>{e(tip)}</title></polygon>')
            else:
                layers["ocr"].append(_rect(r["box"], OCR_COLOR, tip))
            layers["ocr"].append(_label(r["box"], visible_text(r.get("label")), OCR_COLOR, size * 0.8))
            color = OCR_COLOR
        else:
            color = _label_color(visible_text(r.get("label")))
            layers["objects"].append(_rect(r["box"], color, f"{label}{_fmt_score(r)}"))
            layers["objects"].append(_label(r["box"], label, color, size))
        masks.add(r, color, label)
    for j, g in enumerate(kept(rec["groundings"])):
        color = colors[g["ann_id"]] = PALETTE[j % len(PALETTE)]
        phrase = visible_text(g.get("phrase"))
        layers["groundings"].append(_rect(g["box"], color, f'"{phrase}"{_fmt_score(g)}', dashed=True))
        masks.add(g, color, phrase)
    dropped = [a for a in rec["regions"] + rec["groundings"] if a["status"] == "dropped" and a.get("box")]
    for a in sorted(dropped, key=_area, reverse=True):
        what = visible_text(a.get("phrase") if "phrase" in a else (a.get("brief") or a.get("label")))
        layers["dropped"].append(_rect(a["box"], DROPPED_COLOR, f"dropped by {a.get('reason')}: {what}{_fmt_score(a)}",
                                       dashed=True, extra=' class="dropped-box"'))
    layers["masks"].append(masks.svg())
    body = "".join(f'<g class="layer layer-{name}">{"".join(layers[name])}</g>'
                   for name in ("masks", "objects", "ocr", "groundings", "dropped"))
    svg = (f'<svg class="annotated" viewBox="0 0 {w} {h}" preserveAspectRatio="xMidYMid meet" role="img">'
           f'<image href="{_jpeg_data_uri(data, max_side)}" x="0" y="0" width="{w}" height="{h}" preserveAspectRatio="none"/>'
           f"{body}</svg>")
    return svg, colors


def caption_html(text: dict, groundings: list[dict], colors: dict[str, str]) -> str:
    """The caption with each grounded phrase span coloured like its box (first of overlapping wins)."""
    raw = text.get("text") or ""
    cuts = token_cuts(raw)
    spans = sorted({(g["char_start"], g["char_end"], g["ann_id"]) for g in groundings
                    if g["text_ann_id"] == text["ann_id"] and g["ann_id"] in colors
                    and g["char_start"] is not None and 0 <= g["char_start"] < g["char_end"] <= len(raw)})
    out, pos = [], 0
    for start, end, ann in spans:
        if start < pos:
            continue
        out.append(e(visible_text(raw, pos, start, cuts)))
        out.append(f'<b class="phrase" style="color:{colors[ann]}">{e(visible_text(raw, start, end, cuts))}</b>')
        pos = end
    out.append(e(visible_text(raw, pos, len(raw), cuts)))
    return "".join(out)


def _card(rec: dict, data: bytes) -> tuple[str, dict[str, int]]:
    svg, colors = image_svg(rec, data)
    items = []
    for t in rec["texts"]:
        if t["status"] == "kept":
            items.append(f"<li><i>{e(t['tier'])}</i>: {caption_html(t, rec['groundings'], colors)}</li>")
        else:
            items.append(f'<li class="layer layer-dropped dropped-text" title="{e(str(t.get("reason")))}">'
                         f"<i>{e(t['tier'])}</i>: <s>{e(visible_text(t.get('text')))}</s> "
                         f"<small>({e(str(t.get('reason')))})</small></li>")
    reasons: dict[str, int] = {}
    for key in ANNOTATION_KINDS:
        for a in rec[key]:
            if a["status"] == "dropped":
                reasons[a["reason"]] = reasons.get(a["reason"], 0) + 1
    counts = {
        "objects": sum(a["status"] == "kept" and a["kind"] == "object" for a in rec["regions"]),
        "ocr": sum(a["status"] == "kept" and a["kind"] == "text" for a in rec["regions"]),
        "groundings": sum(a["status"] == "kept" for a in rec["groundings"]),
        "masks": len({(a.get("mask") or {}).get("counts") or repr(a.get("polygon")) for a in rec["regions"] + rec["groundings"]
                      if a["status"] == "kept" and (a.get("mask") or a.get("polygon"))}),
        "dropped": sum(reasons.values()),
    }
    errors = "".join(f"<li>{e(err['stage'])}: {e(err['error'])}</li>" for err in rec["errors"])
    dropped_line = ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items(), key=lambda kv: str(kv[0])))
    return (
        f'<article class="card"><h3>{e(rec["uri"])}</h3>{svg}'
        f"<p class='meta'>{rec['width']}x{rec['height']} &middot; id {e(rec['image_id'][:12])} &middot; kept: "
        f"{counts['objects']} objects, {counts['ocr']} OCR lines, {counts['groundings']} groundings, {counts['masks']} masks</p>"
        f"<ul class='captions'>{''.join(items)}</ul>"
        + (f"<p class='dropped'>dropped: {e(dropped_line)}</p>" if reasons else "")
        + (f"<ul class='errors'>{errors}</ul>" if errors else "")
        + "</article>"
    ), counts


def _broken_card(rec: dict, shard: str, exc: Exception) -> str:
    what = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyError) else f"no image bytes for {exc} in images/{shard}"
    return (f'<article class="card broken"><h3>{e(str(rec.get("uri")))}</h3>'
            f"<p class='errors'>could not draw this record ({e(shard)}): {e(what)}</p></article>")


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def model_uses(config: dict | None, models: dict[str, str]) -> dict[str, list[str]]:
    """alias -> the stages whose params name it (and "refine" for stage 3's model)."""
    uses: dict[str, list[str]] = {}
    for step in (config or {}).get("steps", []):
        for spec in step.get("stages", []):
            for s in _strings(spec.get("params") or {}):
                if s in models and spec["stage"] not in uses.setdefault(s, []):
                    uses[s].append(spec["stage"])
    refine_model = ((config or {}).get("refine") or {}).get("model")
    if (config or {}).get("rounds") and refine_model in models:
        uses.setdefault(refine_model, []).append("refine")
    return uses


def _round_health(manifest: dict) -> str:
    """One line per refinement round: what its model showed on its validation images (refine.health);
    a round whose model failed is a red warning (its relabels were dropped as round:unhealthy_model)."""
    from engine.run import health_messages

    lines = []
    for k, m in sorted((manifest.get("rounds") or {}).items(), key=lambda kv: int(kv[0])):
        h = m.get("health") or {}
        if not h:
            continue
        v = h.get("validation") or {}
        figures = ", ".join(f"{name.replace('_', ' ')} {h[name]:.2f}" for name in
                            ("same_across_tasks", "box_recall", "box_precision", "mention_precision", "mention_lift") if h.get(name) is not None)
        tasks = "; ".join(f"{t} distinct {f['distinct']:.2f}" if f.get("distinct") is not None else t
                          for t, f in (h.get("tasks") or {}).items())
        text = (f"round {k}: {v.get('images', 0)} validation images, val loss {h['val_loss']:.3f}" if h.get("val_loss") is not None
                else f"round {k}: {v.get('images', 0)} validation images")
        text += f" &middot; {e(tasks)}" + (f" &middot; {e(figures)}" if figures else "")
        messages = health_messages(h)
        if messages:
            lines.append(f"<div class='warning' id='round{k}-health'>&#9888; {'<br>'.join(e(m) for m in messages)}. {text}</div>")
        else:
            lines.append(f"<p class='facts' id='round{k}-health'>{text} &middot; health check passed</p>")
    return "".join(lines)


def clip_note(config: dict | None, models: dict[str, str], template: str = "{}") -> str:
    """Why the CLIP score rule is not applied where no real CLIP is available (the pipeline's CLIP is a
    random: model): its stage left out, or run with its scores recorded only; else ""."""
    if not config:
        return ""
    specs = [spec for step in config.get("steps", []) for spec in step.get("stages", []) if spec["stage"] == "clip_score"]
    ref = str(models.get((specs[0].get("params") or {}).get("model", "clip") if specs else "clip", ""))
    if not ref.startswith("random:"):
        return ""
    if not specs:
        return template.format(f"CLIP score rule: off - no real CLIP model is available (clip = {ref}), so this "
                               "pipeline runs no CLIP stage: a random CLIP's scores would mean nothing.")
    return template.format(f"CLIP score rule: off - the CLIP model is {ref} (random); its scores are recorded, "
                           "not used to drop anything.")


def _header(out, folder: str, manifest: dict, con, shown: int, total: int) -> str:
    pipe = manifest.get("pipeline", {})
    models: dict[str, str] = pipe.get("models") or {}
    uses = model_uses(pipe.get("config"), models)
    used = {a: r for a, r in models.items() if a in uses} if uses else models
    provenance = con.execute(
        "SELECT DISTINCT annotator, model FROM (SELECT annotator, model FROM texts UNION ALL "
        "SELECT annotator, model FROM regions UNION ALL SELECT annotator, model FROM groundings) "
        "WHERE model IS NOT NULL AND model <> '' ORDER BY 1, 2").fetchall()
    made = con.execute(
        "SELECT kind, annotator, round > 0, count(*) FROM (SELECT 'texts' kind, annotator, round FROM texts UNION ALL "
        "SELECT 'regions', annotator, round FROM regions UNION ALL SELECT 'groundings', annotator, round FROM groundings) "
        "GROUP BY ALL").fetchall()

    def made_by(stages: list[str]) -> str:
        n: dict[str, int] = {}
        for kind, annotator, refined, count in made:
            if ("refine" in stages and refined) or (not refined and annotator in stages):
                n[kind] = n.get(kind, 0) + count
        what = ", ".join(f"{k} {v}" for k, v in n.items() if v)
        return f": this step's annotations from it: {what}" if what else ": none of this step's annotations come from it"

    random_refs = [f"{a} = {r} (used by {', '.join(uses.get(a, [])) or 'the pipeline'}){made_by(uses.get(a, []))}"
                   for a, r in used.items() if str(r).startswith("random:")]
    random_refs += [f"{ann} annotations were made by {m}" for ann, m in provenance
                    if str(m).startswith("random:") and not any(str(r) == m for r in used.values())]
    warning = ""
    if random_refs:
        warning = ("<div class='warning' id='random-models'><b>&#9888; Randomly initialised models:</b> "
                   + "; ".join(e(x) for x in random_refs)
                   + ". Their annotations are not meaningful (the plumbing runs); point these aliases at real "
                   "weights (a hub id or a local directory) for real annotations.</div>")
    warning += clip_note(pipe.get("config"), models, "<p class='note' id='clip-rule'>{}</p>")
    rows = "".join(f"<tr><td>{e(a)}</td><td>{e(str(r))}</td><td>{e(', '.join(uses.get(a, [])))}</td></tr>"
                   for a, r in used.items())
    if not rows:  # an OUT written before manifests carried the models: what the data says
        rows = "".join(f"<tr><td>{e(str(ann))}</td><td>{e(str(m))}</td><td>(from the annotations)</td></tr>"
                       for ann, m in provenance)
    run = manifest.get("last_run", {})
    facts = [("pipeline", pipe.get("name")), ("file", pipe.get("file")), ("profile", pipe.get("profile") or "none"),
             ("input", pipe.get("input")), ("runner", run.get("runner")), ("updated", manifest.get("updated"))]
    return (
        f"<header><h1>fld-engine report: {e(str(out))} &middot; {e(folder)}</h1>"
        + "<p class='facts'>" + " &middot; ".join(f"{k} <b>{e(str(v))}</b>" for k, v in facts if v) + "</p>"
        + warning + _round_health(manifest)
        + f"<p>{shown} of {total} images shown.</p>"
        + f"<table class='models'><tr><th>model alias</th><th>reference</th><th>used by</th></tr>{rows}</table></header>"
    )


def _toggles(totals: dict[str, int]) -> str:
    hidden = HIDDEN_AT_START | ({"masks"} if totals.get("masks", 0) > MANY_MASKS else set())
    inputs = "".join(f'<input type="checkbox" id="layer-{n}" class="toggle"{"" if n in hidden else " checked"}>'
                     for n, _ in LAYERS)
    swatch = {"objects": PALETTE[0], "ocr": OCR_COLOR, "groundings": PALETTE[2], "masks": PALETTE[1], "dropped": DROPPED_COLOR}
    labels = "".join(
        f'<label for="layer-{n}" class="legend-{n}"><span class="tick"></span>'
        f'<span class="swatch" style="border-color:{swatch[n]}"></span>{e(text)} ({totals.get(n, 0)})</label>'
        for n, text in LAYERS)
    return inputs + f"<nav class='legend'>Layers: {labels}</nav>"


def _plots(con, manifest: dict) -> str:
    config = manifest.get("pipeline", {}).get("config")
    order = [spec["stage"] for step in (config or {}).get("steps", []) for spec in step.get("stages", [])] or None
    rows = funnel(con, order)
    thresholds = pipeline_thresholds(config)
    hists = []
    for h in value_histograms(con):
        marks = [(t.rule, t.value) for t in thresholds if t.annotations == h["type"] and t.value_of == h["value_of"]]
        listed = "".join(f"<li>{e(rule)} = {v:g}</li>" for rule, v in marks)
        subtitle = f"{h['type']}, n={h['n']}: {sum(h['kept'])} kept, {sum(h['dropped'])} dropped"
        plot = histogram_svg(h["value_of"], subtitle, h["lo"], h["hi"], h["kept"], h["dropped"], marks)
        hists.append(f"<figure class='hist'>{plot}<figcaption><ul>{listed}</ul></figcaption></figure>")
    note = "" if config else "<p>This OUT's manifest has no pipeline config (written by an older fld): thresholds are not marked.</p>"
    return (
        "<section id='funnel'><h2>Filter funnel</h2><p>Per annotation type, the annotations each filter saw "
        "(blue: passed, red: dropped by it; only the first reason of a drop is kept, so filters are in run order).</p>"
        + (funnel_svg(rows) if rows else "<p>No annotations.</p>")
        + "</section><section id='checks'><h2>Checks and scores</h2><p>Histogram of every value the stages wrote "
        "(blue kept, red dropped); dashed orange lines: the pipeline's thresholds (hover for the rule).</p>"
        + note + "".join(hists) + "</section>"
    )


def _quarantine(con) -> str:
    n = con.execute("SELECT count(*) FROM quarantine").fetchall()[0][0]
    rows = con.execute(f"SELECT uri, reason, detail FROM quarantine ORDER BY reason, uri LIMIT {QUARANTINE_ROWS}").fetchall()
    body = "".join(f"<tr><td>{e(str(u))}</td><td>{e(str(r))}</td><td>{e(str(d or ''))}</td></tr>" for u, r, d in rows)
    more = f"<p>... and {n - len(rows)} more (fld query OUT \"SELECT * FROM quarantine\").</p>" if n > len(rows) else ""
    return (f"<section id='quarantine'><h2>Quarantine ({n} inputs not used)</h2>"
            + (f"<table class='quarantine'><tr><th>input</th><th>reason</th><th>detail</th></tr>{body}</table>{more}"
               if n else "<p>Every input became an image.</p>") + "</section>")


STYLE = """
body{font-family:system-ui,sans-serif;margin:0 16px 16px;background:#fafafa;color:#222}
h1{font-size:1.3em}.facts b{font-weight:600}
.warning{background:#fdecea;border:2px solid #d32f2f;color:#8b0000;padding:8px 12px;margin:8px 0}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
.toggle{position:absolute;opacity:0;width:1px;height:1px}
nav.legend{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid #ccc;padding:6px 0}
nav.legend label{margin-right:14px;cursor:pointer;user-select:none}
.swatch{display:inline-block;width:14px;height:10px;border:2px solid;margin:0 4px;vertical-align:middle}
.tick{display:inline-block;width:1em;text-align:center}
.legend-dropped .swatch{border-style:dashed}.legend-groundings .swatch{border-style:dashed}
.card{display:inline-block;vertical-align:top;width:min(800px,95vw);margin:8px;padding:8px;background:#fff;border:1px solid #ddd}
.card svg.annotated{width:100%;height:auto;display:block;background:#eee}
svg.annotated rect,svg.annotated polygon,svg.annotated path{stroke-width:2px;vector-effect:non-scaling-stroke}
svg.annotated path.mask-outline{stroke-width:1.5px}
.box-label{paint-order:stroke;stroke:#000;stroke-width:2px;vector-effect:non-scaling-stroke;font-family:sans-serif}
.dropped,.meta{color:#666}.errors{color:#b00}.phrase{font-weight:600}
.plot-title{font-size:12px;font-weight:600}.axis{font-size:10px}
figure.hist{display:inline-block;margin:4px;vertical-align:top}figcaption{font-size:11px;max-width:320px}
figcaption ul{margin:0;padding-left:16px;color:#b35c00}
"""


def _layer_css() -> str:
    rules = []
    for name, _ in LAYERS:
        rules.append(f"#layer-{name}:not(:checked)~main .layer-{name}{{display:none}}")
        rules.append(f"#layer-{name}:checked~nav .legend-{name} .tick::before{{content:'\\2611'}}")
        rules.append(f"#layer-{name}:not(:checked)~nav .legend-{name} .tick::before{{content:'\\2610'}}")
        rules.append(f"#layer-{name}:focus-visible~nav .legend-{name}{{outline:2px solid #0082c8}}")
    return "\n".join(rules)


def build_report(out: str | Path, dest: str | Path, step: str | None = None, limit: int = 50) -> int:
    """Write the HTML report of up to `limit` images of one step (default: the latest); returns
    how many images were drawn."""
    store = ShardStore.of(out)
    folder = resolve_step(store, step)
    if folder is None:
        raise ValueError(f"{out} has no committed annotations to show")
    manifest = store.read_manifest()
    cards, totals = [], {name: 0 for name, _ in LAYERS}
    committed = store.committed(folder)
    total_images = sum(int(c.get("rows", 0)) for c in committed.values())
    for shard in sorted(committed):
        if len(cards) >= limit:
            break
        records = table_to_records(store.read_shard(folder, shard))
        images = store.read_shard("images", shard, columns=["image_id", "bytes"])
        by_id = dict(zip(images.column("image_id").to_pylist(), images.column("bytes").to_pylist()))
        for rec in records[: limit - len(cards)]:
            try:
                card, counts = _card(rec, by_id[rec["image_id"]])
            except Exception as exc:  # noqa: BLE001 - one bad record never blocks the report
                card, counts = _broken_card(rec, shard, exc), {}
            cards.append(card)
            for k, v in counts.items():
                totals[k] += v
    con = open_views(out, folder)
    try:
        page = (
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>fld-engine: {e(str(out))} {e(folder)}</title><style>{STYLE}{_layer_css()}</style></head><body>"
            + _header(out, folder, manifest, con, len(cards), total_images)
            + _toggles(totals)
            + "<main><section id='images'><h2>Images</h2>" + "".join(cards) + "</section>"
            + _plots(con, manifest) + calibration_html(store, step) + _quarantine(con) + "</main></body></html>"
        )
    finally:
        con.close()
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    Path(dest).write_text(page, encoding="utf-8")
    return len(cards)
