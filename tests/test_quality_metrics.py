"""Benchmark metrics (bench/quality/metrics.py) on hand-made truth with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from bench.quality.metrics import category_of, evaluate, objects_all_wrong
from schemas.geometry import box_to_quad, mask_to_rle
from schemas.records import new_annotation, source_of

W, H = 200, 100
SRC = source_of("test")


def _mask(box):
    m = np.zeros((H, W), bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    m[y0:y1, x0:x1] = True
    return mask_to_rle(m)


BALL, BOX, SIGN = [10, 10, 50, 50], [100, 20, 160, 80], [60, 60, 96, 80]
TRUTH = {"t.png": {
    "file": "t.png", "width": W, "height": H,
    "objects": [
        {"id": 0, "category": "ball", "colour": "red", "size": None, "box": BALL, "mask": _mask(BALL), "brief": "red ball", "area": 1600},
        {"id": 1, "category": "box", "colour": "blue", "size": "large", "box": BOX, "mask": _mask(BOX), "brief": "large blue box", "area": 3600},
        {"id": 2, "category": "sign", "colour": "white", "size": None, "box": SIGN, "mask": _mask(SIGN), "brief": "white sign", "area": 720, "text": "OPEN"},
    ],
    "texts": [{"text": "OPEN", "quad": box_to_quad([62, 62, 94, 78]), "box": [62, 62, 94, 78], "object_id": 2}],
    "captions": {"brief": "A red ball, a large blue box and a white sign on a plain grey background.",
                 "detailed": "The image shows three objects on a plain grey background. A large blue box sits on the right. "
                             "A red ball lies in the top left. A white sign reads \"OPEN\". The red ball is to the left of the large blue box."},
    "relations": [["red", "ball", "to the left of", "blue", "box"]],
}}


def region(box, label, brief=None, score=0.9, kind="object", mask=None, status="kept", quad=None):
    a = new_annotation(SRC, score, ann_id=f"{label}{box}", kind=kind, box=list(map(float, box)), quad=quad, polygon=None,
                       mask=mask, label=label, brief=brief)
    a["status"] = status
    return a


def text(tier, t, status="kept"):
    a = new_annotation(SRC, None, ann_id=f"{tier}{t}", tier=tier, text=t)
    a["status"] = status
    return a


def grounding(phrase, box):
    return new_annotation(SRC, 0.9, ann_id=phrase, text_ann_id="x", phrase=phrase, char_start=0, char_end=len(phrase), box=box, mask=None)


def record(regions=(), texts=(), groundings=()):
    return {"uri": "/any/where/t.png", "width": W, "height": H, "regions": list(regions), "texts": list(texts), "groundings": list(groundings)}


def perfect():
    t = TRUTH["t.png"]
    regions = [region(o["box"], o["category"], o["brief"], mask=o["mask"]) for o in t["objects"]]
    regions.append(region(t["texts"][0]["box"], "OPEN", kind="text", quad=t["texts"][0]["quad"]))
    texts = [text(tier, c) for tier, c in t["captions"].items()]
    gs = [grounding("a red ball", BALL), grounding("two blue boxes", BOX), grounding("The large blue box", BOX)]
    return record(regions, texts, gs)


def test_perfect_labels_score_perfectly():
    m = evaluate([perfect()], TRUTH)
    assert m["box_map"] == pytest.approx(1.0) and m["box_ap50"] == pytest.approx(1.0)
    assert m["ocr_cer"] == 0.0 and m["ocr_precision"] == m["ocr_recall"] == 1.0
    for key in ("obj_precision", "obj_recall", "category_accuracy", "brief_accuracy", "mask_iou", "grounding_accuracy",
                "brief_f1", "detailed_f1", "brief_coverage", "detailed_object_precision", "detailed_attribute_recall",
                "detailed_relation_recall"):
        assert m[key] == pytest.approx(1.0), key


def test_missing_everything_has_recall_zero():
    m = evaluate([record()], TRUTH)
    assert m["obj_recall"] == 0.0 and m["ocr_recall"] == 0.0 and m["box_map"] == 0.0
    assert m["ocr_cer"] == 1.0  # every true character deleted
    assert m["brief_coverage"] == 0.0 and m["brief_f1"] is None and m["obj_precision"] is None
    dropped = perfect()
    for a in dropped["regions"] + dropped["texts"] + dropped["groundings"]:
        a["status"] = "dropped"  # dropped annotations are not labels
    assert evaluate([dropped], TRUTH) == m


def test_errors_are_counted_where_they_belong():
    t = TRUTH["t.png"]
    regions = [
        region(BALL, "star", "red star", mask=_mask([10, 10, 30, 50])),  # right box, wrong category, half the mask
        region([105, 22, 160, 80], "box", "large red box"),  # IoU 0.92 box, wrong colour in the brief, no mask
        region([150, 0, 199, 10], "ball", "blue ball"),  # a false positive
        region(t["texts"][0]["box"], "OPFN", kind="text", quad=t["texts"][0]["quad"]),  # one wrong character
        region([0, 80, 40, 99], "EXIT", kind="text"),  # a line that is not there (no quad: its box counts)
    ]
    m = evaluate([record(regions)], TRUTH)
    assert m["obj_precision"] == pytest.approx(2 / 3, abs=1e-3) and m["obj_recall"] == pytest.approx(2 / 3, abs=1e-3)
    assert m["category_accuracy"] == 0.5 and m["brief_accuracy"] == 0.0
    assert m["mask_iou"] == pytest.approx(0.5)
    assert m["ocr_cer"] == pytest.approx((1 + 4) / 4)  # 1 substitution + 4 inserted characters, over 4 true ones
    assert m["ocr_cer_matched"] == pytest.approx(1 / 4)  # recognition only: the matched line's 1 substitution
    assert m["ocr_precision"] == 0.5 and m["ocr_recall"] == 1.0
    assert 0 < m["box_map"] < 1


def test_captions_and_groundings():
    t = TRUTH["t.png"]
    swapped = t["captions"]["brief"].replace("red ball", "green ball")
    hallucinated = t["captions"]["detailed"] + " Two yellow stars stand at the bottom."
    gs = [grounding("a red ball", BALL), grounding("the red ball", BOX), grounding("a purple moon", BALL),
          grounding("the image", BALL)]
    m = evaluate([record(texts=[text("brief", swapped), text("detailed", hallucinated)], groundings=gs)], TRUTH)
    assert m["brief_object_precision"] == pytest.approx(2 / 3, abs=1e-3)  # "green ball" is not in the image
    assert m["brief_attribute_recall"] == pytest.approx(2 / 3, abs=1e-3)
    assert m["detailed_object_precision"] < 1.0 and m["detailed_attribute_recall"] == 1.0
    assert m["detailed_relation_recall"] == 1.0
    # token F1 worked by hand: the truth's detailed caption has 43 word tokens, the hallucinated one 50 (+ "two
    # yellow stars stand at the bottom"), all 43 in common: precision 43/50, recall 1, F1 = 2 * 43 / (43 + 50);
    # precision alone would be 0.86, recall alone 1.0. The swapped brief: 15 of 16 tokens on both sides.
    assert m["detailed_f1"] == pytest.approx(86 / 93, abs=1e-3) and m["brief_f1"] == pytest.approx(15 / 16, abs=1e-3)
    assert m["grounding_accuracy"] == 0.25 and m["groundings_kept"] == 4  # right / wrong box / names nothing / no object


def test_category_of_region_labels():
    assert category_of("ball") == "ball" and category_of("Balls") == "ball" and category_of("large red box") == "box"
    assert category_of("loc_12>") is None and category_of("") is None and category_of(None) is None


def test_token_f1_floor_is_the_wording_with_every_object_wrong():
    t = TRUTH["t.png"]
    present = {(o["category"], o["colour"]) for o in t["objects"]}
    wrong = objects_all_wrong(t["captions"]["brief"], present)
    # objects not in the image, words no object of the image has first; article, size, count and wording kept
    assert wrong == "A green cone, a large orange star and a black ring on a plain grey background."
    assert objects_all_wrong("Two red balls sit.", {("ball", "red")}) == "Two green boxes sit."
    m = evaluate([perfect()], TRUTH)
    # by hand: 16 tokens each side, in common a x4, large, and, on, plain, grey, background: F1 = 2 * 10 / 32
    assert m["brief_f1"] == 1.0 and m["brief_f1_floor"] == pytest.approx(20 / 32)
    assert m["detailed_f1_floor"] < m["detailed_f1"] == 1.0


def test_labels_outside_the_world_count_against_precision_not_map():
    t = TRUTH["t.png"]
    regions = [region(o["box"], o["category"], o["brief"]) for o in t["objects"]]
    with_person = regions + [region([150, 0, 199, 10], "person")]
    a, b = evaluate([record(regions)], TRUTH), evaluate([record(with_person)], TRUTH)
    assert a["obj_precision"] == 1.0 and b["obj_precision"] == pytest.approx(3 / 4)
    assert a["box_map"] == b["box_map"] == pytest.approx(1.0)
