"""`fld show OUT --out report.html`: a self-contained page to look at annotations.

Each image is drawn with its kept regions (object boxes, OCR quads), masks and grounded
phrases; captions are printed with each grounded phrase coloured like its box, so a person
can check a phrase-region link at a glance. Dropped annotations are listed with their reason.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine.query import resolve_step
from engine.stage import decode_image, table_to_records
from engine.store import ShardStore
from schemas.geometry import rle_to_mask

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0)]


def _color(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def _hex(c: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % c


def render_image(record: dict, data: bytes, max_side: int = 768) -> tuple[bytes, dict[str, tuple]]:
    """PNG of the image with kept annotations drawn; returns the colour of each grounding's ann_id."""
    img = decode_image(data).convert("RGBA")
    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    colors: dict[str, tuple] = {}
    kept = lambda anns: [a for a in anns if a["status"] == "kept"]  # noqa: E731
    for i, r in enumerate(kept(record["regions"])):
        c = _color(i)
        if r["mask"]:
            m = rle_to_mask(r["mask"])
            layer = np.zeros((*m.shape, 4), np.uint8)
            layer[m] = (*c, 70)
            overlay = Image.alpha_composite(overlay, Image.fromarray(layer, "RGBA"))
            draw = ImageDraw.Draw(overlay)
        if r["quad"]:
            draw.polygon(list(zip(r["quad"][0::2], r["quad"][1::2])), outline=(*c, 255), width=2)
        else:
            draw.rectangle(r["box"], outline=(*c, 255), width=2)
        label = (r["brief"] or r["label"] or "")[:40]
        if label:
            draw.text((r["box"][0] + 3, r["box"][1] + 2), label, fill=(*c, 255))
    for j, g in enumerate(kept(record["groundings"])):
        c = _color(j + 5)
        colors[g["ann_id"]] = c
        draw.rectangle(g["box"], outline=(*c, 255), width=3)
    out = Image.alpha_composite(img, overlay).convert("RGB")
    out.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue(), colors


def _caption_html(text: dict, groundings: list[dict], colors: dict) -> str:
    """The caption with each grounded phrase span coloured like its box."""
    spans = sorted({(g["char_start"], g["char_end"], g["ann_id"]) for g in groundings
                    if g["text_ann_id"] == text["ann_id"] and g["ann_id"] in colors})
    out, pos = [], 0
    for start, end, ann in spans:
        if start < pos:
            continue  # overlapping phrases: the first one wins the colour
        out.append(html.escape(text["text"][pos:start]))
        out.append(f'<b style="color:{_hex(colors[ann])}">{html.escape(text["text"][start:end])}</b>')
        pos = end
    out.append(html.escape(text["text"][pos:]))
    return "".join(out)


def build_report(out: str | Path, dest: str | Path, step: str | None = None, limit: int = 50) -> int:
    """Write the HTML report of up to `limit` images; returns how many were drawn."""
    store = ShardStore.of(out)
    folder = resolve_step(store, step)
    if folder is None:
        raise ValueError(f"{out} has no committed annotations to show")
    cards = []
    for shard in store.shards(folder):
        if len(cards) >= limit:
            break
        images = store.read_shard("images", shard, columns=["image_id", "bytes"])
        by_id = dict(zip(images.column("image_id").to_pylist(), images.column("bytes").to_pylist()))
        for rec in table_to_records(store.read_shard(folder, shard)):
            if len(cards) >= limit:
                break
            png, colors = render_image(rec, by_id[rec["image_id"]])
            texts = "".join(
                f"<li><i>{t['tier']}</i>: {_caption_html(t, rec['groundings'], colors)}</li>"
                for t in rec["texts"] if t["status"] == "kept")
            dropped = [a for key in ("texts", "regions", "groundings") for a in rec[key] if a["status"] == "dropped"]
            reasons: dict[str, int] = {}
            for a in dropped:
                reasons[a["reason"]] = reasons.get(a["reason"], 0) + 1
            errors = "".join(f"<li>{html.escape(e['stage'])}: {html.escape(e['error'])}</li>" for e in rec["errors"])
            cards.append(
                f'<div class="card"><h3>{html.escape(rec["uri"])}</h3>'
                f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                f"<p>{rec['width']}x{rec['height']} &middot; id {rec['image_id'][:12]} &middot; "
                f"kept: {sum(a['status'] == 'kept' for a in rec['regions'])} regions, "
                f"{sum(a['status'] == 'kept' for a in rec['groundings'])} groundings</p>"
                f"<ul>{texts}</ul>"
                + (f"<p class='dropped'>dropped: {html.escape(', '.join(f'{k} x{v}' for k, v in sorted(reasons.items())))}</p>"
                   if reasons else "")
                + (f"<ul class='errors'>{errors}</ul>" if errors else "")
                + "</div>"
            )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>fld-engine: "
        f"{html.escape(str(out))} {html.escape(folder)}</title><style>"
        "body{font-family:sans-serif;margin:16px;background:#fafafa}"
        ".card{display:inline-block;vertical-align:top;width:800px;margin:8px;padding:8px;background:#fff;"
        "border:1px solid #ddd}.card img{max-width:100%}.dropped{color:#888}.errors{color:#b00}"
        f"</style></head><body><h1>{html.escape(str(out))}: {html.escape(folder)}</h1>"
        + "".join(cards) + "</body></html>"
    )
    Path(dest).write_text(page)
    return len(cards)
