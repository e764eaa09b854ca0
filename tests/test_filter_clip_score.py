"""CLIP score filter: the real open_clip class (tiny, random) on crops of real photos, batched
scores equal one-at-a-time scores, and keep/drop logic with known (monkeypatched) scores."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from engine.registry import stage_class
from engine.stage import decode_image, records_to_table, table_to_records
from filters.clip_score import ClipScoreFilter, ClipScoreParams, crop_box
from schemas.records import make_ann_id, new_annotation, source_of
from schemas.validate import validate_table

torch.set_num_threads(2)

REGIONS = [  # kind, box, label, brief
    ("object", [10, 20, 200, 260], "astronaut", "a person in a white suit"),
    ("object", [100, 100, 140, 130], "flag", None),
    ("text", [0, 0, 60, 12], "NASA", None),
    ("object", [50, 50, 90, 90], None, None),  # no text to score against: no check
]
CAPTIONS = [("brief", "An astronaut posing in front of a flag."), ("detailed", "A cat on a table.")]


def _annotate(records: list[dict]) -> list[dict]:
    src = source_of("florence2", "random:tiny")
    for rec in records:
        rec["regions"] = [
            new_annotation(src, score=0.9, ann_id=make_ann_id(rec["image_id"], "florence2", "region", i),
                           kind=kind, box=[float(min(v, rec["width"] if j % 2 == 0 else rec["height"])) for j, v in enumerate(box)],
                           label=label, brief=brief)
            for i, (kind, box, label, brief) in enumerate(REGIONS)
        ]
        rec["texts"] = [
            new_annotation(src, ann_id=make_ann_id(rec["image_id"], "florence2", "text", i), tier=tier, text=text)
            for i, (tier, text) in enumerate(CAPTIONS)
        ]
    return records


@pytest.fixture(scope="module")
def batch(photo_batch):
    records = _annotate(table_to_records(photo_batch))
    table = records_to_table(records)
    return table.append_column("image_bytes", photo_batch.column("image_bytes"))


@pytest.fixture(scope="module")
def tiny_stage():
    stage = ClipScoreFilter({"model": "clip", "min_score": {"region": None, "text": None}},
                            models={"clip": "random:tiny"})
    stage.ensure_setup()
    return stage


def test_tiny_clip_end_to_end_on_real_crops(batch, tiny_stage, photo_batch):
    import open_clip

    assert isinstance(tiny_stage.clip.model, open_clip.CLIP)
    out = tiny_stage(batch)
    assert out.column_names[-1] == "image_bytes"
    validate_table(out.drop_columns(["image_bytes"]), name="clip_score output")
    rows = table_to_records(out)
    for rec in rows:
        assert rec["errors"] == []
        for r in rec["regions"][:3]:
            assert -1.0 <= r["checks"]["clip_score.region"] <= 1.0 and r["status"] == "kept"
        assert "clip_score.region" not in rec["regions"][3]["checks"]
        for t in rec["texts"]:
            assert -1.0 <= t["checks"]["clip_score.text"] <= 1.0
    # batched scores equal one-crop-at-a-time scores, with the text each region should use
    rec, data = rows[0], photo_batch.column("image_bytes")[0].as_py()
    image = decode_image(data)
    clip = tiny_stage.clip
    for region, text in zip(rec["regions"][:3], ["a person in a white suit", "flag", "NASA"]):
        one = (clip.encode_images([crop_box(image, region["box"])]) @ clip.encode_texts([text]).T).item()
        assert region["checks"]["clip_score.region"] == pytest.approx(one, abs=1e-4)
    whole = (clip.encode_images([image]) @ clip.encode_texts([CAPTIONS[1][1]]).T).item()
    assert rec["texts"][1]["checks"]["clip_score.text"] == pytest.approx(whole, abs=1e-4)
    # different crops of a real photo give different scores: pixels are looked at
    scores = {r["checks"]["clip_score.region"] for rec in rows for r in rec["regions"][:3]}
    assert len(scores) >= 6


SCORES = {"a person in a white suit": 0.31, "flag": 0.12, "NASA": 0.26,
          CAPTIONS[0][1]: 0.30, CAPTIONS[1][1]: 0.05}


def _fake_scores(stage: ClipScoreFilter, seen: list):
    def pair_scores(images, texts):
        seen.extend(zip([im.size for im in images], texts))
        return [SCORES[t] for t in texts]

    stage.pair_scores = pair_scores  # known scores: only the keep/drop logic is under test


def test_min_score_drops_with_reason(batch):
    stage = ClipScoreFilter({"model": "random:tiny"})  # defaults: region 0.2, text 0.24
    seen: list = []
    _fake_scores(stage, seen)
    out = table_to_records(stage(batch))
    for rec in out:
        assert [r["reason"] for r in rec["regions"]] == [None, "clip_score:low_score", None, None]
        assert [t["reason"] for t in rec["texts"]] == [None, "clip_score:low_score"]
        assert rec["regions"][1]["checks"]["clip_score.region"] == 0.12
    # crops have the box's size; captions see the whole image
    assert seen[0] == ((190, 240), "a person in a white suit")
    assert seen[3] == (Image.open(__import__("io").BytesIO(batch.column("image_bytes")[0].as_py())).size, CAPTIONS[0][1])
    n = sum(len(r["regions"]) + len(r["texts"]) for r in out)
    kept = sum(a["status"] == "kept" for r in out for a in r["regions"] + r["texts"])
    dropped = sum(a["status"] == "dropped" for r in out for a in r["regions"] + r["texts"])
    assert n == kept + dropped == 24


def test_keep_top_fraction_per_image_and_rerun_undrops(batch):
    stage = ClipScoreFilter({"model": "random:tiny", "min_score": {"region": None, "text": None},
                             "keep_top_fraction": {"region": 0.5}})
    _fake_scores(stage, [])
    first = stage(batch)
    for rec in table_to_records(first):  # 3 scored regions per image: keep ceil(1.5) = 2 best
        assert [r["reason"] for r in rec["regions"]] == [None, "clip_score:not_top", None, None]
        assert all(t["reason"] is None for t in rec["texts"])
    again = stage(first)
    assert again.equals(first)
    loose = ClipScoreFilter({"model": "random:tiny", "min_score": {"region": 0.3, "text": None}})
    _fake_scores(loose, [])
    for rec in table_to_records(loose(first)):
        assert [r["reason"] for r in rec["regions"]] == [None, "clip_score:low_score", "clip_score:low_score", None]


def test_skip_dropped_and_first_reason(batch):
    records = table_to_records(batch)
    for rec in records:
        rec["regions"][0].update(status="dropped", reason="region_filter:nms")
    table = records_to_table(records).append_column("image_bytes", batch.column("image_bytes"))
    stage = ClipScoreFilter({"model": "random:tiny", "skip_dropped": True})
    seen: list = []
    _fake_scores(stage, seen)
    out = table_to_records(stage(table))
    assert all(text != "a person in a white suit" for _, text in seen)
    assert out[0]["regions"][0]["reason"] == "region_filter:nms"
    assert "clip_score.region" not in out[0]["regions"][0]["checks"]


def test_crop_box_and_params():
    image = Image.new("RGB", (100, 50))
    assert crop_box(image, [10.2, 5.0, 20.7, 15.0]).size == (11, 10)
    assert crop_box(image, [10, 10, 20, 20], padding=0.5).size == (20, 20)
    assert crop_box(image, [99.5, 49.5, 100, 50]).size == (1, 1)  # never empty
    assert ClipScoreParams(min_score={"text": 0.3}).min_score["region"] == 0.2
    with pytest.raises(ValueError, match="keep_top_fraction"):
        ClipScoreParams(keep_top_fraction={"region": 1.5})
    with pytest.raises(ValueError, match="unknown key"):
        ClipScoreParams(min_score={"regions": 0.3})
    assert stage_class("clip_score").needs_images
