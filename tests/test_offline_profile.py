"""Acceptance of the offline profile (quickstart pipeline, --profile offline): every annotation comes
from a real component and says only what those components found.

Run on the quickstart's sample images AND on held-out real photos that are not among the samples
(scikit-image photos, Debian darknet photos where installed): every kept caption names only COCO
categories the detector found on that image, every grounding box is one of that image's region boxes
with an exact char span, masks lie inside their prompt boxes, no caption is malformed.
"""
from __future__ import annotations

import glob
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from annotators.compose_caption import plural
from annotators.grabcut import box_pixels
from conftest import make_batch
from engine.config import load_pipeline
from engine.samples import DARKNET_PHOTOS, SKIMAGE_PHOTOS, write_samples
from engine.stage import IMAGE_BYTES_COLUMN, table_to_records
from filters.text import malformed
from schemas.geometry import rle_to_mask

pytestmark = pytest.mark.slow  # real OCR + SSD + GrabCut on ~20 images: ~40 s on one core

HELD_OUT_SKIMAGE = ("motorcycle_left", "camera", "coins", "page", "hubble_deep_field")
HELD_OUT_DARKNET = ("eagle.jpg", "giraffe.jpg", "kite.jpg", "scream.jpg")
COLOR_WORDS = ("black", "gray", "white", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")


def held_out_photos() -> dict[str, bytes]:
    import skimage

    assert not set(HELD_OUT_SKIMAGE) & set(SKIMAGE_PHOTOS) and not set(HELD_OUT_DARKNET) & set(DARKNET_PHOTOS)
    root = os.path.join(os.path.dirname(skimage.__file__), "data")
    out = {}
    for name in HELD_OUT_SKIMAGE:
        path = glob.glob(os.path.join(root, name + ".*"))[0]
        buf = io.BytesIO()
        with Image.open(path) as im:
            im.convert("RGB").save(buf, format="PNG")
        out[f"heldout_{name}"] = buf.getvalue()
    for name in HELD_OUT_DARKNET:
        path = os.path.join("/usr/share/darknet/data", name)
        if os.path.exists(path):
            out[f"heldout_darknet_{name}"] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def offline():
    """The quickstart pipeline's stage 1 and stage 2 stages with the offline profile, set up once."""
    pipeline = load_pipeline(None, "quickstart", "offline")
    stages = [s for step in pipeline.steps for s in pipeline.build_stages(step)]
    for s in stages:
        s.ensure_setup()
    return stages


def annotate(stages, images: dict[str, bytes]) -> list[dict]:
    table = make_batch(images)
    for stage in stages:
        table = stage(table)
        if IMAGE_BYTES_COLUMN not in table.column_names:
            table = table.append_column(IMAGE_BYTES_COLUMN, make_batch(images).column(IMAGE_BYTES_COLUMN))
    return table_to_records(table)


def _categories(stages) -> list[str]:
    detect = next(s for s in stages if s.name == "detect")
    return sorted(set(detect.detector.labels.values()))


def mentioned(caption: str, categories: list[str]) -> set[str]:
    """COCO categories a caption names, quoted OCR text and colour adjectives left out."""
    text = re.sub(r'"[^"]*"', " ", caption.lower())
    colors = "|".join(COLOR_WORDS)
    text = re.sub(rf"\bmostly ({colors})\b", " ", text)  # "is mostly orange"
    text = re.sub(rf"\b({colors}) (?=\w)", " ", text)  # "an orange cup"
    found = set()
    for c in categories:
        if re.search(rf"\b({re.escape(c)}|{re.escape(plural(c))})\b", text):
            found.add(c)
    return found


def check_records(records: list[dict], categories: list[str]) -> dict:
    seen = {"captions": 0, "groundings": 0, "masks": 0, "nothing_found": 0}
    for rec in records:
        assert rec["errors"] == [], (rec["uri"], rec["errors"])
        detected = {r["label"] for r in rec["regions"] if r["kind"] == "object"}
        boxes = [r["box"] for r in rec["regions"]]
        texts = {t["ann_id"]: t for t in rec["texts"]}
        for t in rec["texts"]:
            assert t["source"]["annotator"] == "compose_caption" and not t["source"]["model"].startswith("random:")
            assert not malformed(t["text"]), (rec["uri"], t["text"])
            if t["status"] == "kept":
                seen["captions"] += 1
                assert mentioned(t["text"], categories) <= detected, (rec["uri"], t["text"], detected)
        if not rec["regions"]:
            assert rec["texts"] == [] and rec["groundings"] == []  # nothing found: nothing said
            seen["nothing_found"] += 1
        for g in rec["groundings"]:
            assert g["box"] in boxes, (rec["uri"], g["phrase"], g["box"])
            caption = texts[g["text_ann_id"]]["text"]
            assert caption[g["char_start"]:g["char_end"]] == g["phrase"]
            source = next(r for r in rec["regions"] if r["box"] == g["box"])
            assert g["mask"] == source["mask"]
            seen["groundings"] += g["status"] == "kept"
        for r in rec["regions"]:
            if r["mask"] is None:
                assert r["kind"] == "text"
                continue
            mask = rle_to_mask(r["mask"]).astype(bool)
            x0, y0, x1, y1 = box_pixels(r["box"], rec["width"], rec["height"])
            assert mask[y0:y1, x0:x1].sum() == mask.sum(), (rec["uri"], r["label"])
            seen["masks"] += 1
    return seen


def test_samples_say_only_what_the_specialists_found(offline, tmp_path):
    paths = write_samples(tmp_path / "samples")
    records = annotate(offline, {p.name: p.read_bytes() for p in paths})
    seen = check_records(records, _categories(offline))
    assert seen["captions"] >= 2 * len(records) and seen["groundings"] >= len(records) and seen["masks"] >= 5
    by_uri = {r["uri"]: r for r in records}
    stop = [t["text"] for t in by_uri["scene_stop_sign.png"]["texts"]]
    assert any('"STOP"' in t for t in stop) and any("stop sign" in t for t in stop)
    dropped = [t for r in records for t in r["texts"] if t["status"] == "dropped"]
    kept = [t for r in records for t in r["texts"] if t["status"] == "kept"]
    assert kept and all(t["reason"].startswith("text_filter:") for t in dropped)


def test_held_out_photos_say_only_what_the_specialists_found(offline):
    images = held_out_photos()
    records = annotate(offline, images)
    seen = check_records(records, _categories(offline))
    assert seen["captions"] >= 3 and seen["groundings"] >= 2 and seen["masks"] >= 2
    by_uri = {r["uri"]: r for r in records}
    moto = " ".join(t["text"] for t in by_uri["heldout_motorcycle_left"]["texts"])
    assert "motorcycle" in moto


def test_mentioned_sees_categories_and_ignores_colours_and_quotes():
    cats = ["cup", "orange", "person", "dog", "dining table"]
    assert mentioned('An orange cup. The cup is mostly orange. "DOG" is written.', cats) == {"cup"}
    assert mentioned("Two people and an orange.", cats) == {"person", "orange"}
    assert mentioned("A dining table.", cats) == {"dining table"}
