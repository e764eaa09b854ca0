"""Relabel: the round-k checkpoint annotates every image for every task it was trained on.

Why a subclass of the `florence2` stage: the mapping from parsed Florence-2 output to records
(clamping, phrase spans of groundings, captions feeding grounding) is that stage's job; the
refinement round only changes who signs the annotations (`source.annotator = "refine"`,
`round = k`) and makes the ids unique across rounds (the round is part of the id, and the
groundings' `text_ann_id` follow their captions).
"""
from __future__ import annotations

import pyarrow as pa

from annotators.florence2 import Florence2Annotator, Florence2Params
from engine.stage import PIXELS_COLUMN, records_to_table, table_to_records
from schemas.records import empty_record, make_ann_id

ANNOTATOR = "refine"


class RefineRelabeler(Florence2Annotator):
    """The florence2 stage under the name `refine` (not a pipeline stage: the loop builds it)."""

    name = "refine"
    Params = Florence2Params


def blank_table(table: pa.Table) -> pa.Table:
    """Same images, no annotations: the relabel output holds only what the new model says
    (only the image columns are read; the old annotations are never converted)."""
    images = table.select(["image_id", "uri", "width", "height", "source"]).to_pylist()
    return records_to_table(empty_record(image) for image in images)


def stamp_round(records: list[dict], round_: int) -> list[dict]:
    """round = k on every annotation, ids re-derived with the round (unique across rounds)."""
    for rec in records:
        iid = rec["image_id"]
        new_ids: dict[str, str] = {}
        for key in ("texts", "regions", "groundings"):
            for i, ann in enumerate(rec.get(key) or []):
                old = ann["ann_id"]
                ann["ann_id"] = make_ann_id(iid, ANNOTATOR, key, i, f"round{round_}", old)
                ann["round"] = round_
                new_ids[old] = ann["ann_id"]
        for g in rec.get("groundings") or []:
            g["text_ann_id"] = new_ids.get(g["text_ann_id"], g["text_ann_id"])
    return records


def relabel_table(stage: RefineRelabeler, table: pa.Table, round_: int) -> pa.Table:
    """table: image records + pixels -> new records (annotations of this round only) + pixels."""
    from engine.execute import run_stage

    if PIXELS_COLUMN not in table.column_names:
        raise ValueError(f"relabel needs the {PIXELS_COLUMN!r} column (attach images/ first)")
    blank = blank_table(table)
    blank = blank.append_column(PIXELS_COLUMN, table.column(PIXELS_COLUMN))
    out = run_stage(stage, blank)
    records = stamp_round(table_to_records(out), round_)
    return records_to_table(records).append_column(PIXELS_COLUMN, out.column(PIXELS_COLUMN))
