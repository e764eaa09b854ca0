"""Geometry edge cases (issue 11 item 8): mask polygons along pixel edges, text that cleans to
nothing in Florence-2 targets, NMS over zero-area boxes."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from engine.stage import records_to_table, table_to_records
from filters.region import RegionFilter
from schemas.task_codec import TaskCodec
from schemas import loc_tokens as lt
from schemas.geometry import mask_to_polygon, polygon_to_rle, rle_to_mask
from schemas.records import empty_record, make_ann_id, new_annotation, source_of

SRC = source_of("test", "none")
H, W = 96, 120


def _raster(rings: list[list[float]], width: int = W, height: int = H) -> np.ndarray:
    """What COCO tools see: the polygon rasterised by pycocotools."""
    return rle_to_mask(polygon_to_rle(rings, width, height)) if rings else np.zeros((height, width), bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def _shapes() -> dict[str, tuple[np.ndarray, int]]:
    """name -> (mask, its thinnest width in pixels)."""
    yy, xx = np.mgrid[:H, :W]
    dist2 = (yy - 48) ** 2 + (xx - 60) ** 2
    out: dict[str, tuple[np.ndarray, int]] = {}
    m = np.zeros((H, W), bool)
    m[10:20, 30:40] = True
    out["square 10x10"] = (m, 10)
    out["disc r20"] = (dist2 < 20 ** 2, 40)
    out["disc r2"] = (dist2 < 2.3 ** 2, 3)
    m = np.zeros((H, W), bool)
    m[5:80, 5:15] = True
    m[70:80, 5:90] = True
    out["L-shape"] = (m, 10)
    out["ring with hole"] = ((dist2 < 30 ** 2) & (dist2 >= 20 ** 2), 10)
    m = (dist2 < 40 ** 2) & (dist2 >= 25 ** 2)
    m[40:56, 52:68] = True  # an island inside the hole, its own part
    m[45:50, 57:62] = False  # ... with its own hole
    out["ring, island, hole in island"] = (m, 5)
    m = np.zeros((H, W), bool)
    m[:, :] = True
    out["whole image"] = (m, H)
    m = np.zeros((H, W), bool)
    m[0:30, 100:120] = True
    out["corner of the image"] = (m, 20)
    for width in (1, 2, 3, 5):
        m = np.zeros((H, W), bool)
        for i in range(80):
            m[i + 5, 10 + i: 10 + i + width] = True  # staircase: `width` pixels per row
        out[f"diagonal line {width} px"] = (m, width)
    m = np.zeros((H, W), bool)
    m[50, 5:100] = True
    out["horizontal line 1 px"] = (m, 1)
    m = np.zeros((H, W), bool)
    m[3, 3] = True
    m[4, 4] = True  # two pixels touching at a corner
    out["two diagonal pixels"] = (m, 1)
    m = np.zeros((H, W), bool)
    m[60, 7] = True
    out["single pixel"] = (m, 1)
    rng = np.random.default_rng(0)
    m = np.zeros((H, W), bool)
    m[20:70, 20:100] = rng.random((50, 80)) < 0.5  # speckle: holes, diagonal contacts everywhere
    out["random speckle"] = (m, 1)
    return out


SHAPES = _shapes()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(SHAPES))
def test_mask_polygon_traces_pixel_edges(name):
    mask, thinnest = SHAPES[name]
    exact = mask_to_polygon(mask, tolerance=0)
    assert exact, f"{name}: no polygon"
    assert np.array_equal(_raster(exact), mask), f"{name}: exact rings do not rasterise back to the mask"
    simplified = mask_to_polygon(mask)  # the default tolerance the pipeline uses
    assert simplified, f"{name}: no polygon at the default tolerance"
    if thinnest >= 3:
        assert _iou(_raster(simplified), mask) >= 0.95, name
    assert all(len(r) >= 6 and len(r) % 2 == 0 for r in simplified)


@pytest.mark.timeout(60)
def test_square_polygon_is_its_corners():
    mask, _ = SHAPES["square 10x10"]
    assert mask_to_polygon(mask) == [[30.0, 10.0, 40.0, 10.0, 40.0, 20.0, 30.0, 20.0]]


@pytest.mark.timeout(60)
def test_real_photo_segmentation_round_trips():
    """Thresholded coins (scikit-image): dozens of parts with holes and ragged edges."""
    from skimage import data

    coins = data.coins()
    mask = coins > 110
    h, w = mask.shape
    exact = mask_to_polygon(mask, tolerance=0)
    assert np.array_equal(_raster(exact, w, h), mask)
    assert _iou(_raster(mask_to_polygon(mask), w, h), mask) >= 0.95


@pytest.mark.timeout(60)
def test_random_masks_round_trip_exactly():
    rng = np.random.default_rng(7)
    for trial in range(30):
        h, w = rng.integers(1, 40, size=2)
        mask = rng.random((h, w)) < rng.uniform(0.05, 0.95)
        if not mask.any():
            continue
        assert np.array_equal(_raster(mask_to_polygon(mask, tolerance=0), w, h), mask), trial


# ---------------------------------------------------------------- text that cleans to nothing
@pytest.fixture(scope="module")
def processor():
    from engine.random_models.florence2 import offline_processor

    return offline_processor("tiny")


EMPTY_AFTER_CLEANING = ["<>", "  ", "<\n>", "\t<<>>\r\n", "><"]


def _record(w: int = 640, h: int = 480) -> dict:
    rec = empty_record({"image_id": "img", "uri": "x.png", "width": w, "height": h, "source": "t"})
    regions, texts, groundings = [], [], []
    good_lines = {"EXIT": [40, 40, 200, 80], "STOP here": [40, 300, 260, 360]}
    for i, (label, box) in enumerate(good_lines.items()):
        regions.append(new_annotation(SRC, 0.9, ann_id=make_ann_id("img", "t", "line", i), kind="text", box=box,
                                      quad=None, polygon=None, mask=None, label=label, brief=None))
    for i, label in enumerate(EMPTY_AFTER_CLEANING):  # between the good lines in reading order
        box = [300, 100 + 30 * i, 400, 120 + 30 * i]
        regions.append(new_annotation(SRC, 0.9, ann_id=make_ann_id("img", "t", "bad", i), kind="text", box=box,
                                      quad=None, polygon=None, mask=None, label=label, brief=label))
        regions.append(new_annotation(SRC, 0.9, ann_id=make_ann_id("img", "t", "badobj", i), kind="object",
                                      box=[10 + 40 * i, 200, 40 + 40 * i, 240], quad=None, polygon=None, mask=None,
                                      label=label, brief=label))
    regions.append(new_annotation(SRC, 0.9, ann_id="obj", kind="object", box=[400, 300, 600, 460], quad=None,
                                  polygon=[[400, 300, 600, 300, 600, 460]], mask=None, label="sign", brief="a red sign"))
    caption = "a sign <loc_5> next to a door"
    texts.append(new_annotation(SRC, None, ann_id="cap", tier="brief", text=caption))
    texts.append(new_annotation(SRC, None, ann_id="cap2", tier="detailed", text="<>"))
    for i, (phrase, start) in enumerate([("a sign", 0), ("<loc_5>", 7), ("<>", 15)]):
        groundings.append(new_annotation(SRC, 0.8, ann_id=f"g{i}", text_ann_id="cap", phrase=phrase, char_start=start,
                                         char_end=start + len(phrase), box=[400, 300, 600, 460], mask=None))
    rec.update(regions=regions, texts=texts, groundings=groundings)
    return rec


@pytest.mark.timeout(120)
def test_text_that_cleans_to_nothing_never_reaches_a_target(processor):
    rec = _record()
    w, h = rec["width"], rec["height"]
    examples = TaskCodec().encode(rec)
    by_task: dict[str, list] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
        assert lt.clean_phrase(ex.target) or ex.target.startswith("<loc_"), ex
        if not ex.task.startswith("<REGION_TO") and ex.task != "<REFERRING_EXPRESSION_SEGMENTATION>":
            assert "<loc_" not in ex.text_input, ex

    (ocr,) = by_task["<OCR_WITH_REGION>"]
    parsed = processor.post_process_generation(text="<s>" + ocr.target + "</s>", task="<OCR_WITH_REGION>",
                                               image_size=(w, h))["<OCR_WITH_REGION>"]
    assert parsed["labels"] == ["EXIT", "STOP here"]  # the empty lines do not glue onto "STOP here"
    for quad, box in zip(parsed["quad_boxes"], ([40, 40, 200, 80], [40, 300, 260, 360])):
        assert abs(quad[0] - box[0]) <= 1 and abs(quad[5] - box[3]) <= 1

    (plain,) = by_task["<OCR>"]
    assert plain.target == "EXIT STOP here"
    for task in ("<OD>", "<DENSE_REGION_CAPTION>"):
        (ex,) = by_task[task]
        parsed = processor.post_process_generation(text="<s>" + ex.target + "</s>", task=task, image_size=(w, h))[task]
        assert parsed["labels"] == (["sign"] if task == "<OD>" else ["a red sign"])
    # captions: the literal "<loc_5>" is text, not a location token; "<>" gives no example
    assert [ex.target for ex in by_task["<CAPTION>"]] == ["a sign loc_5 next to a door"]
    assert "<DETAILED_CAPTION>" not in by_task
    (grounding,) = by_task["<CAPTION_TO_PHRASE_GROUNDING>"]
    assert grounding.text_input == "a sign loc_5 next to a door"
    parsed = processor.post_process_generation(text="<s>" + grounding.target + "</s>",
                                               task="<CAPTION_TO_PHRASE_GROUNDING>", image_size=(w, h))
    assert parsed["<CAPTION_TO_PHRASE_GROUNDING>"]["labels"] == ["a sign", "loc_5"]
    assert [ex.target for ex in by_task["<REGION_TO_DESCRIPTION>"]] == ["a red sign"]
    assert [ex.text_input for ex in by_task["<REFERRING_EXPRESSION_SEGMENTATION>"]] == ["a red sign"]


# ---------------------------------------------------------------- NMS with zero-area boxes
ZERO_AREA = [
    [100.0, 100.0, 100.0, 100.0],  # a point
    [100.0, 100.0, 100.0, 100.0],  # the same point again
    [100.0, 100.0, 150.0, 100.0],  # a horizontal segment through it
    [120.0, 80.0, 120.0, 140.0],  # a vertical segment crossing it
    [100.0, 100.0, 150.0, 100.0],  # the segment again
    [90.0, 90.0, 160.0, 110.0],  # a real box around them all
    [90.0, 90.0, 160.0, 110.0],  # and its duplicate (suppressed)
]


def _nms_record(order: list[int], scores: list[float | None]) -> dict:
    rec = empty_record({"image_id": "img", "uri": "x.png", "width": 640, "height": 480, "source": "t"})
    rec["regions"] = [
        new_annotation(SRC, scores[i], ann_id=f"r{i}", kind=kind, box=list(ZERO_AREA[i]), quad=None, polygon=None,
                       mask=None, label="thing", brief=None)
        for i in order for kind in ("object", "text")
    ]
    return rec


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scores", [[0.9] * 7, [None] * 7, [0.9, 0.9, 0.8, float("nan"), 0.8, 0.95, float("nan")]],
                         ids=["equal scores", "no scores", "NaN scores"])
def test_nms_with_zero_area_boxes_is_finite_and_deterministic(scores):
    stage = RegionFilter({"min_side": 0, "min_area_frac": 0, "max_aspect": {"object": None, "text": None},
                          "min_score": {"object": 0.0, "text": 0.0}})
    outcomes = []
    rng = random.Random(3)
    for trial in range(6):
        order = list(range(len(ZERO_AREA)))
        rng.shuffle(order)
        (out,) = table_to_records(stage(records_to_table([_nms_record(order, scores)])))
        for ann in out["regions"]:
            assert all(not math.isnan(v) for v in ann["checks"].values()), ann
        outcomes.append(sorted((a["kind"], a["ann_id"], a["status"], a["reason"] or "",
                                round(a["checks"]["region_filter.nms_iou"], 9)) for a in out["regions"]))
    assert all(o == outcomes[0] for o in outcomes), "NMS result depends on the input order"
    reasons = {(kind, ann_id): reason for kind, ann_id, _, reason, _ in outcomes[0]}
    nan_scored = {f"r{i}" for i, s in enumerate(scores) if s is not None and math.isnan(s)}
    for kind in ("object", "text"):
        expected = {f"r{i}": "" for i in range(len(ZERO_AREA))}
        if nan_scored:
            expected.update({i: "region_filter:low_score" for i in nan_scored})  # a NaN score passes no threshold
        else:
            expected["r6"] = "region_filter:nms"  # the duplicate real box; zero-area boxes overlap nothing
        assert {i: reasons[(kind, i)] for i in expected} == expected, kind
