"""Region filter: hand-computed NMS, clamping, size/aspect/score rules, idempotent re-runs."""
from __future__ import annotations

import pytest

from engine.registry import stage_class
from engine.stage import records_to_table, table_to_records
from filters.region import RegionFilter, RegionFilterParams, nms_in_rank_order
from schemas.records import make_ann_id, new_annotation, source_of
from schemas.validate import validate_table

# name: (kind, box, score, label)
REGIONS = {
    "E": ("object", [0, 0, 100, 150], 0.95, "cat"),
    "A": ("object", [0, 0, 100, 100], 0.90, "cat"),  # IoU with E = 10000/15000 = 0.667 < 0.7: survives
    "C": ("object", [10, 0, 110, 100], 0.85, "dog"),  # other label: survives per label
    "B": ("object", [10, 0, 110, 100], 0.80, "Cat"),  # IoU with A = 9000/11000 = 0.818 > 0.7: nms
    "D": ("object", [200, 200, 300, 300], 0.70, "cat"),  # far away: survives
    "F": ("object", [0, 0, 100, 100], 0.10, "cat"),  # low_score
    "G": ("object", [-20, -10, 50, 40], 0.90, "bird"),  # clamped to [0, 0, 50, 40]
    "H": ("object", [300, 300, 301, 350], 0.90, "pole"),  # 1 px wide: too_small
    "I": ("object", [100, 400, 400, 410], 0.90, "rail"),  # aspect 30 > 10
    "J": ("text", [100, 400, 400, 410], 0.90, "STOP"),  # aspect 30 <= 40 for text lines
    "K": ("object", [400, 0, 500, 100], None, "cat"),  # no score (human / Florence-2 OD): ranks as 1.0
    "L": ("object", [405, 0, 505, 100], 0.99, "cat"),  # IoU with K = 9500/10500 = 0.905: nms
}
EXPECTED = {
    "E": None, "A": None, "C": None, "B": "region_filter:nms", "D": None, "F": "region_filter:low_score",
    "G": None, "H": "region_filter:too_small", "I": "region_filter:aspect", "J": None, "K": None,
    "L": "region_filter:nms",
}


def _with_regions(record: dict, regions: dict) -> dict:
    src = source_of("detect", "random:tiny")
    record["regions"] = [
        new_annotation(src, score=score, ann_id=make_ann_id(record["image_id"], "detect", "region", i),
                       kind=kind, box=[float(v) for v in box], label=label)
        for i, (kind, box, score, label) in enumerate(regions.values())
    ]
    return record


@pytest.fixture()
def record(photo_batch) -> dict:
    rec = table_to_records(photo_batch.drop_columns(["image_bytes"]))[0]
    assert rec["width"] >= 505 and rec["height"] >= 410  # the boxes above lie inside (but G)
    return _with_regions(rec, REGIONS)


def _by_name(rec: dict) -> dict:
    return dict(zip(REGIONS, rec["regions"]))


def test_hand_computed_nms_and_rules(record):
    out = stage_class("region_filter")({})(records_to_table([record]))
    validate_table(out, name="region_filter output")
    regions = _by_name(table_to_records(out)[0])
    assert {k: r["reason"] for k, r in regions.items()} == EXPECTED
    assert regions["A"]["checks"]["region_filter.nms_iou"] == pytest.approx(10000 / 15000)
    assert regions["B"]["checks"]["region_filter.nms_iou"] == pytest.approx(9000 / 11000)
    assert regions["L"]["checks"]["region_filter.nms_iou"] == pytest.approx(9500 / 10500)
    assert regions["F"]["checks"]["region_filter.nms_iou"] == pytest.approx(1.0)  # dropped: IoU with survivor A
    assert regions["E"]["checks"]["region_filter.nms_iou"] == 0.0
    assert regions["G"]["box"] == [0.0, 0.0, 50.0, 40.0]
    assert regions["G"]["checks"]["region_filter.clamped"] == 1.0
    assert regions["A"]["checks"]["region_filter.clamped"] == 0.0
    assert regions["I"]["checks"]["region_filter.aspect"] == pytest.approx(30.0)
    assert regions["H"]["checks"]["region_filter.min_side"] == pytest.approx(1.0)
    w, h = record["width"], record["height"]
    assert regions["D"]["checks"]["region_filter.area_frac"] == pytest.approx(10000 / (w * h))
    kept = sum(r["status"] == "kept" for r in regions.values())
    dropped = sum(r["status"] == "dropped" for r in regions.values())
    assert kept + dropped == len(REGIONS) and dropped == 5


def test_class_agnostic_suppresses_across_labels(record):
    out = RegionFilter({"nms_mode": {"object": "class_agnostic"}})(records_to_table([record]))
    regions = _by_name(table_to_records(out)[0])
    assert regions["C"]["reason"] == "region_filter:nms"  # the dog box overlaps cat box A by 0.818
    assert regions["B"]["reason"] == "region_filter:nms"
    assert regions["J"]["reason"] is None  # text lines are never suppressed by object boxes


def test_nms_in_rank_order_ties_are_broken_by_rank():
    same = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]
    survives, ious = nms_in_rank_order(same, [0, 0, 0], 0.5)
    assert survives == [True, False, False] and ious == [0.0, 1.0, 1.0]
    survives, _ = nms_in_rank_order(same, [0, 1, 0], 0.5)  # per-group: the second group keeps its own
    assert survives == [True, True, False]
    assert nms_in_rank_order([], [], 0.5) == ([], [])


def test_rerun_is_idempotent_and_rethresholding_undrops(record):
    record["regions"][1]["status"] = "dropped"  # A: dropped earlier by another filter
    record["regions"][1]["reason"] = "clip_score:low_score"
    first = RegionFilter({})(records_to_table([record]))
    assert first.equals(RegionFilter({})(first))
    regions = _by_name(table_to_records(first)[0])
    assert regions["A"]["reason"] == "clip_score:low_score"  # first reason kept, checks filled
    assert "region_filter.nms_iou" in regions["A"]["checks"]
    assert regions["B"]["reason"] is None  # A no longer takes part, so B survives
    loose = RegionFilter({"nms_iou": {"object": 0.95}, "min_score": {"object": 0.05}, "max_aspect": {"object": None}})
    relaxed = _by_name(table_to_records(loose(first))[0])
    assert relaxed["L"]["reason"] is None and relaxed["F"]["reason"] is None and relaxed["I"]["reason"] is None
    assert relaxed["H"]["reason"] == "region_filter:too_small"


def test_params_per_kind_merge_and_errors():
    p = RegionFilterParams(min_score={"object": 0.5})
    assert p.min_score == {"object": 0.5, "text": 0.5}
    with pytest.raises(ValueError, match="unknown key"):
        RegionFilterParams(min_score={"objects": 0.5})
    with pytest.raises(ValueError, match="nms_iou.object"):
        RegionFilterParams(nms_iou={"object": 1.5})
    with pytest.raises(ValueError):
        RegionFilterParams(nms_mode={"object": "per_class"})


def test_mask_box_agreement(photo_batch):
    import numpy as np

    from schemas.geometry import mask_to_rle

    rec = table_to_records(photo_batch.drop_columns(["image_bytes"]))[0]
    h, w = rec["height"], rec["width"]
    rec = _with_regions(rec, {"M": ("object", [100, 100, 200, 200], 0.9, "a"), "N": ("object", [300, 300, 400, 400], 0.9, "b")})
    for region, (y0, y1, x0, x1) in zip(rec["regions"], [(100, 200, 100, 200), (300, 320, 300, 320)]):
        m = np.zeros((h, w), dtype=np.uint8)
        m[y0:y1, x0:x1] = 1
        region["mask"] = mask_to_rle(m)
    out = table_to_records(RegionFilter({})(records_to_table([rec])))[0]["regions"]
    assert out[0]["checks"]["region_filter.mask_box_iou"] == pytest.approx(1.0) and out[0]["status"] == "kept"
    assert out[1]["checks"]["region_filter.mask_box_iou"] == pytest.approx(400 / 10000)
    assert out[1]["reason"] == "region_filter:mask_disagree"
