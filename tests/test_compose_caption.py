"""compose_caption: captions composed from the specialists' regions, grounded by construction."""
from __future__ import annotations

import io
import hashlib

import numpy as np
import pyarrow as pa
from PIL import Image

from annotators.compose_caption import ComposeCaptioner, clean_ocr, plural, where
from engine.stage import IMAGE_BYTES_COLUMN, records_to_table, table_to_records
from schemas.geometry import mask_to_rle
from schemas.records import empty_record, make_ann_id, new_annotation, source_of

W, H = 300, 200


def scene() -> bytes:
    """Gray background, a red block on the left, two blue blocks on the right."""
    img = np.full((H, W, 3), 128, np.uint8)
    img[60:140, 20:100] = (220, 20, 20)
    img[20:60, 200:240] = (20, 40, 220)
    img[120:180, 220:280] = (20, 40, 220)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def record(regions: list[tuple], image_id: str = "img") -> dict:
    rec = empty_record({"image_id": image_id, "uri": "scene.png", "width": W, "height": H, "source": "test"})
    src = source_of("detect", "opencv-ssd:test")
    for k, (kind, label, box, score) in enumerate(regions):
        mask = None
        if kind == "object":
            m = np.zeros((H, W), bool)
            m[int(box[1]):int(box[3]), int(box[0]):int(box[2])] = True
            mask = mask_to_rle(m)
        rec["regions"].append(new_annotation(src, score, ann_id=make_ann_id(image_id, "t", "r", k), kind=kind,
                                             box=list(box), quad=None, polygon=None, mask=mask, label=label,
                                             brief=None))
    return rec


def run(records: list[dict]) -> list[dict]:
    data = scene()
    table = records_to_table(records).append_column(IMAGE_BYTES_COLUMN, pa.array([data] * len(records), pa.binary()))
    return table_to_records(ComposeCaptioner({})(table))


OBJECTS = [("object", "car", (20, 60, 100, 140), 0.9), ("object", "cup", (200, 20, 240, 60), 0.8),
           ("object", "cup", (220, 120, 280, 180), 0.7), ("text", "BUS STOP\ufffd", (110, 10, 190, 30), 0.95)]


def test_captions_name_what_was_found_with_exact_groundings():
    rec = run([record(OBJECTS)])[0]
    texts = {t["tier"]: t for t in rec["texts"]}
    assert set(texts) == {"brief", "detailed", "more_detailed"}
    brief = texts["brief"]["text"]
    assert "red car" in brief and "two blue cups" in brief
    assert '"BUS STOP"' in texts["detailed"]["text"] and "\ufffd" not in texts["detailed"]["text"]
    assert "on the left" in texts["detailed"]["text"]
    assert "The car is to the left of" not in texts["detailed"]["text"]  # the cups are two: no single-object relation
    boxes = {tuple(r["box"]): r for r in rec["regions"]}
    for g in rec["groundings"]:
        caption = next(t for t in rec["texts"] if t["ann_id"] == g["text_ann_id"])["text"]
        assert caption[g["char_start"]:g["char_end"]] == g["phrase"]
        assert tuple(g["box"]) in boxes and g["mask"] == boxes[tuple(g["box"])]["mask"]
    cups = [g for g in rec["groundings"] if g["text_ann_id"] == texts["brief"]["ann_id"] and "cups" in g["phrase"]]
    assert sorted(tuple(g["box"]) for g in cups) == [(200, 20, 240, 60), (220, 120, 280, 180)]
    assert [r["brief"] for r in rec["regions"] if r["kind"] == "object"] == ["red car", "blue cup", "blue cup"]
    assert len({g["ann_id"] for g in rec["groundings"]}) == len(rec["groundings"])


def test_nothing_found_no_caption_and_rerun_replaces_its_own():
    empty, text_only = run([record([], "a"), record([OBJECTS[3]], "b")])
    assert empty["texts"] == [] and empty["groundings"] == []
    assert [t["text"] for t in text_only["texts"] if t["tier"] == "brief"] == ['An image with the text "BUS STOP".']
    again = run([text_only])[0]
    assert again["texts"] == text_only["texts"] and again["groundings"] == text_only["groundings"]


def test_relation_and_template_variety():
    two = [("object", "dog", (10, 120, 80, 190), 0.9), ("object", "cat", (200, 10, 260, 70), 0.9)]
    texts = {t["tier"]: t["text"] for t in run([record(two)])[0]["texts"]}
    assert "The dog is to the left of the cat." in texts["detailed"]
    briefs = {t["text"].split(" a ")[0] for i in range(12)
              for t in run([record(two, hashlib.sha1(str(i).encode()).hexdigest())])[0]["texts"] if t["tier"] == "brief"}
    assert len(briefs) >= 3  # several sentence shapes over images


def test_helpers():
    assert [plural(w) for w in ("person", "bus", "wine glass", "sheep", "teddy bear", "knife")] == [
        "people", "buses", "wine glasses", "sheep", "teddy bears", "knives"]
    assert clean_ocr('"OPEN\ufffd"') == "OPEN" and clean_ocr("x") == "" and clean_ocr("a" * 50) == ""
    assert where([0, 0, 10, 10], 300, 300) == "in the top left" and where([100, 100, 200, 200], 300, 300) == "in the center"


def test_no_colour_from_a_mask_that_missed_its_object():
    rec = record(OBJECTS[:1])
    car = rec["regions"][0]
    tiny = np.zeros((H, W), bool)
    tiny[60:64, 20:24] = True
    car["mask"] = mask_to_rle(tiny)
    car["checks"] = {"masks.box_mask_iou": 0.0025}
    brief = [t["text"] for t in run([rec])[0]["texts"] if t["tier"] == "brief"][0]
    assert "car" in brief and "red" not in brief
