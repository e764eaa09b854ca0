"""Reject a table that does not match a schema, naming the column and the row."""
from __future__ import annotations

import math

import pyarrow as pa

from schemas.records import IMAGE_RECORD_SCHEMA, REGION_KINDS, STATUSES, TIERS


class SchemaError(ValueError):
    """A table or record does not follow the data model; the message names where."""


def _check_box(box, where: str, width: int, height: int, tol: float = 1.0) -> None:
    if box is None:
        raise SchemaError(f"{where}: box is null")
    if len(box) != 4 or any(v is None or not math.isfinite(v) for v in box):
        raise SchemaError(f"{where}: box must be 4 finite numbers, got {box}")
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        raise SchemaError(f"{where}: box {box} has x1<x0 or y1<y0")
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise SchemaError(f"{where}: box {box} outside the image {width}x{height}")


def _check_common(ann: dict, where: str) -> None:
    if not ann.get("ann_id"):
        raise SchemaError(f"{where}: ann_id is empty")
    if ann.get("status") not in STATUSES:
        raise SchemaError(f"{where}: status must be one of {STATUSES}, got {ann.get('status')!r}")
    if ann["status"] == "dropped" and not ann.get("reason"):
        raise SchemaError(f"{where}: dropped without a reason")
    src = ann.get("source") or {}
    if not src.get("annotator"):
        raise SchemaError(f"{where}: source.annotator is empty (provenance is required)")


def validate_table(table: pa.Table, schema: pa.Schema = IMAGE_RECORD_SCHEMA, name: str = "table") -> None:
    """Raise SchemaError naming the first column / row / annotation that breaks the model."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SchemaError(f"{name}: missing column(s) {missing}")
    for field in schema:
        got = table.schema.field(field.name).type
        if not got.equals(field.type):
            raise SchemaError(f"{name}: column {field.name!r} has type {got}, expected {field.type}")
    if schema is not IMAGE_RECORD_SCHEMA:
        return
    seen_ids: set[str] = set()
    for i, rec in enumerate(table.to_pylist()):
        where = f"{name} row {i} (image_id={rec.get('image_id')})"
        if not rec["image_id"]:
            raise SchemaError(f"{where}: image_id is empty")
        w, h = rec["width"], rec["height"]
        if not w or not h or w <= 0 or h <= 0:
            raise SchemaError(f"{where}: width/height must be positive, got {w}x{h}")
        for j, t in enumerate(rec["texts"] or []):
            at = f"{where} texts[{j}]"
            _check_common(t, at)
            if t["tier"] not in TIERS:
                raise SchemaError(f"{at}: tier must be one of {TIERS}, got {t['tier']!r}")
            seen_ids.add(t["ann_id"])
        for j, r in enumerate(rec["regions"] or []):
            at = f"{where} regions[{j}]"
            _check_common(r, at)
            if r["kind"] not in REGION_KINDS:
                raise SchemaError(f"{at}: kind must be one of {REGION_KINDS}, got {r['kind']!r}")
            _check_box(r["box"], at, w, h)
            if r["quad"] is not None and len(r["quad"]) != 8:
                raise SchemaError(f"{at}: quad must have 8 numbers, got {len(r['quad'])}")
        for j, g in enumerate(rec["groundings"] or []):
            at = f"{where} groundings[{j}]"
            _check_common(g, at)
            _check_box(g["box"], at, w, h)
            if g["text_ann_id"] not in seen_ids:
                raise SchemaError(f"{at}: text_ann_id {g['text_ann_id']!r} names no text of this image")
            s, e = g["char_start"], g["char_end"]
            if s is None or e is None or not 0 <= s < e:
                raise SchemaError(f"{at}: char span [{s}, {e}) is invalid")
