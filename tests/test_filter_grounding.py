"""Grounding filter: blacklist, box / phrase scores, box-mask agreement, spans, re-runs."""
from __future__ import annotations

import numpy as np
import pytest

from engine.registry import stage_class
from engine.stage import records_to_table, table_to_records
from filters.grounding import GroundingFilter
from schemas.geometry import mask_to_rle
from schemas.records import make_ann_id, new_annotation, source_of
from schemas.validate import validate_table

CAPTION = "A man and a dog stand near it in the image, under the picture of lots of birds."
DROPPED_CAPTION = "A cat."


def _mask(h: int, w: int, box: list[int]) -> dict:
    m = np.zeros((h, w), dtype=np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 1
    return mask_to_rle(m)


@pytest.fixture()
def record(photo_batch) -> dict:
    rec = table_to_records(photo_batch.drop_columns(["image_bytes"]))[0]
    h, w = rec["height"], rec["width"]
    src = source_of("florence2", "random:tiny")
    rec["texts"] = [
        new_annotation(src, ann_id="t0", tier="detailed", text=CAPTION),
        new_annotation(src, ann_id="t1", tier="brief", text=DROPPED_CAPTION),
    ]
    rec["texts"][1].update(status="dropped", reason="text_filter:low_object_complexity")
    gsrc = source_of("grounding", "random:tiny")

    def g(i, phrase, text_id="t0", box=(10, 10, 110, 210), score=0.8, phrase_score=0.6, mask_box=None, span=None):
        text = CAPTION if text_id == "t0" else DROPPED_CAPTION
        start = text.find(phrase) if span is None else span[0]
        end = start + len(phrase) if span is None else span[1]
        ann = new_annotation(gsrc, score=score, ann_id=make_ann_id(rec["image_id"], "grounding", "g", i),
                             text_ann_id=text_id, phrase=phrase, char_start=start, char_end=end,
                             box=[float(v) for v in box], mask=_mask(h, w, mask_box) if mask_box else None)
        ann["checks"]["grounding.text_score"] = phrase_score
        return ann

    rec["groundings"] = [
        g(0, "A man", mask_box=(10, 10, 110, 210)),  # kept: mask fills the box (IoU 1)
        g(1, "a dog", mask_box=(10, 10, 30, 30)),  # mask box 20x20 in a 100x200 box: IoU 0.02
        g(2, "it"),  # pronoun
        g(3, "the image"),  # the paper's blacklist
        g(4, "the picture"),  # kept unless blacklist_extra names it
        g(5, "lots"),  # the paper's blacklist ("lots of birds" would not be)
        g(6, "birds", score=0.2),  # low box score
        g(7, "A man", phrase_score=0.1),  # low phrase score
        g(8, "a cat", span=(10, 15)),  # CAPTION[10:15] is "a dog"
        g(9, "A cat", text_id="t1"),  # its caption was dropped
        g(10, "a dog", mask_box=(10, 10, 100, 200)),  # mask box 90x190 vs 100x200: IoU 0.855, kept
    ]
    return rec


EXPECTED = [
    None,
    "grounding_filter:mask_disagree",
    "grounding_filter:blacklist",
    "grounding_filter:blacklist",
    None,
    "grounding_filter:blacklist",
    "grounding_filter:low_box_score",
    "grounding_filter:low_phrase_score",
    "grounding_filter:span_mismatch",
    "grounding_filter:text_dropped",
    None,
]


def test_rules_and_checks(record):
    out = stage_class("grounding_filter")({})(records_to_table([record]))
    validate_table(out, name="grounding_filter output")
    gs = table_to_records(out)[0]["groundings"]
    assert [g["reason"] for g in gs] == EXPECTED
    assert gs[0]["checks"]["grounding_filter.mask_box_iou"] == pytest.approx(1.0)
    assert gs[1]["checks"]["grounding_filter.mask_box_iou"] == pytest.approx(400 / 20000)
    assert gs[10]["checks"]["grounding_filter.mask_box_iou"] == pytest.approx(90 * 190 / 20000)
    assert "grounding_filter.mask_box_iou" not in gs[2]["checks"]  # no mask, no value
    assert [g["checks"]["grounding_filter.blacklisted"] for g in gs[:6]] == [0, 0, 1, 1, 0, 1]
    assert gs[9]["checks"]["grounding_filter.text_kept"] == 0.0
    assert gs[8]["checks"]["grounding_filter.span_ok"] == 0.0
    assert gs[0]["checks"]["grounding.text_score"] == 0.6  # the annotator's checks are untouched
    statuses = [g["status"] for g in gs]
    assert statuses.count("kept") + statuses.count("dropped") == len(record["groundings"])


def test_blacklist_extension_and_rerun_undrops(record):
    strict = GroundingFilter({"blacklist_extra": ["The Picture"]})
    first = strict(records_to_table([record]))
    assert first.equals(strict(first))
    gs = table_to_records(first)[0]["groundings"]
    assert gs[4]["reason"] == "grounding_filter:blacklist"
    loose = GroundingFilter({"min_box_score": None, "min_mask_iou": 0.01, "drop_pronouns": False,
                             "drop_if_text_dropped": False})
    relaxed = table_to_records(loose(first))[0]["groundings"]
    assert [g["reason"] for g in relaxed] == [None, None, None, "grounding_filter:blacklist", None,
                                             "grounding_filter:blacklist", None,
                                             "grounding_filter:low_phrase_score",
                                             "grounding_filter:span_mismatch", None, None]


def test_earlier_reason_is_kept(record):
    record["groundings"][2].update(status="dropped", reason="grounding:duplicate")
    gs = table_to_records(GroundingFilter({})(records_to_table([record])))[0]["groundings"]
    assert gs[2]["reason"] == "grounding:duplicate"
    assert gs[2]["checks"]["grounding_filter.blacklisted"] == 1.0
