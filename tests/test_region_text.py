"""Stage `region_text`: tiny random CLIP + tiny random Florence-2 + real spaCy on real photos."""
from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from annotators.region_text import CAPTION, CATEGORY, CHUNK, RegionTextAnnotator, choose_brief, clean_caption
from engine.stage import IMAGE_BYTES_COLUMN, records_to_table, table_to_records
from schemas.records import make_ann_id, new_annotation, source_of
from schemas.validate import validate_table

torch.set_num_threads(2)

MODELS = {"clip": "random:tiny", "florence2": "random:tiny"}
FAST = {"max_new_tokens": 8, "num_beams": 1}


@pytest.fixture(scope="module")
def loaded() -> RegionTextAnnotator:
    stage = RegionTextAnnotator(FAST, models=MODELS)
    stage.ensure_setup()
    return stage


def make_stage(loaded: RegionTextAnnotator, **params) -> RegionTextAnnotator:
    """A stage with other params sharing the already loaded models (setup() is per worker)."""
    stage = RegionTextAnnotator({**FAST, **params}, models=MODELS)
    for attr in ("clip", "captioner", "nlp", "_suppress"):
        setattr(stage, attr, getattr(loaded, attr))
    stage._is_setup = True
    return stage


def _region(image_id: str, i: int, box, label: str | None, kind: str = "object", **extra) -> dict:
    ann = new_annotation(
        source=source_of("detect", "random:tiny", "r"), score=0.9, ann_id=make_ann_id(image_id, "detect", kind, i),
        kind=kind, box=[float(v) for v in box], quad=None, polygon=None, mask=None, label=label, brief=None,
    )
    ann.update(extra)
    return ann


def with_regions(batch: pa.Table, per_image: int = 2) -> pa.Table:
    """Hand-placed regions on each photo: `per_image` describable ones plus the cases to leave alone."""
    records = table_to_records(batch)
    for rec in records:
        w, h, iid = rec["width"], rec["height"], rec["image_id"]
        regs = [_region(iid, i, [i * 10, i * 5, w // 2 + i * 10, h // 2 + i * 5], ["person", "cat", "cup"][i % 3])
                for i in range(per_image)]
        regs.append(_region(iid, 90, [0, 0, 4, 50], "cup"))  # 4 px wide: too small to describe
        regs.append(_region(iid, 91, [0, 0, w, h], "car", status="dropped", reason="region_filter:low_score"))
        regs.append(_region(iid, 92, [0, 0, w / 3, h / 3], "STOP", kind="text"))  # OCR region: not an object
        regs.append(_region(iid, 93, [w / 4, h / 4, w, h], "dog", brief="a human-written brief"))
        rec["regions"] = regs
    table = records_to_table(records)
    return table.append_column(IMAGE_BYTES_COLUMN, batch.column(IMAGE_BYTES_COLUMN))


def _count_calls(monkeypatch, obj, method: str) -> list[int]:
    calls: list[int] = []
    original = getattr(obj, method)
    monkeypatch.setattr(obj, method, lambda items, *a, **k: calls.append(len(items)) or original(items, *a, **k))
    return calls


def test_region_text_on_photos(loaded, photo_batch, monkeypatch):
    stage = make_stage(loaded, caption_batch_size=5)
    image_calls = _count_calls(monkeypatch, stage.clip, "encode_images")
    caption_calls = _count_calls(monkeypatch, stage.captioner, "run")
    out = stage(with_regions(photo_batch))
    validate_table(out.drop_columns([IMAGE_BYTES_COLUMN]))
    n = photo_batch.num_rows
    assert image_calls == [2 * n]  # every crop of every image in one CLIP call
    assert caption_calls == [5, 2 * n - 5]  # caption_batch_size crops per generate
    kinds_seen = set()
    for rec in table_to_records(out):
        assert rec["errors"] == []
        described, untouched = rec["regions"][:2], rec["regions"][2:]
        for r in described:
            checks = r["checks"]
            choice = int(checks["region_text.choice"])
            assert {"region_text.sim_category", "region_text.choice"} <= set(checks)
            assert all(-1.0 - 1e-4 <= v <= 1.0 + 1e-4 for k, v in checks.items() if k.startswith("region_text.sim"))
            # the brief is the winning candidate, and the winner scored highest
            assert r["brief"] == r["label"] if choice == CATEGORY else r["brief"] and r["brief"] != r["label"]
            best = max(v for k, v in checks.items() if k.startswith("region_text.sim"))
            assert checks[f"region_text.{['sim_category', 'sim_caption', 'sim_chunk_best'][choice]}"] == best
            assert r["source"]["annotator"] == "detect" and r["score"] == 0.9  # detector provenance kept
            kinds_seen |= {k for k in checks if k.startswith("region_text.sim")}
        too_small, dropped, text, human = untouched
        assert too_small["brief"] is None and too_small["checks"] == {}
        assert dropped["brief"] is None and dropped["status"] == "dropped"
        assert text["brief"] is None and human["brief"] == "a human-written brief"
    # the real captioner produced captions and spaCy found chunks in them: all three candidates competed
    assert kinds_seen == {"region_text.sim_category", "region_text.sim_caption", "region_text.sim_chunk_best"}


def test_caption_and_chunks_are_candidates(loaded, photo_batch, monkeypatch):
    """The crop caption and its spaCy noun chunks reach the chooser (real spaCy parse)."""
    stage = make_stage(loaded)
    captions = iter(["a red cup on a wooden table", "it is the image", "", "a small cat with green eyes"] * 4)
    monkeypatch.setattr(stage.captioner, "run", lambda crops, task, **k: [{task: next(captions)} for _ in crops])
    seen = []
    original = RegionTextAnnotator._choose
    monkeypatch.setattr(
        RegionTextAnnotator, "_choose", lambda self, regions: seen.extend(regions) or original(self, regions)
    )
    stage(with_regions(photo_batch))
    got = [(r.caption, r.chunks) for r in seen[:4]]
    assert got == [
        ("a red cup on a wooden table", ("a red cup", "a wooden table")),
        ("it is the image", ()),  # pronoun-only and blacklisted chunks are no region text
        ("", ()),
        ("a small cat with green eyes", ("a small cat", "green eyes")),
    ]


def test_choice_follows_known_similarities(loaded, photo_batch, monkeypatch):
    """Embeddings set by hand: the text most similar to each crop must become its brief."""
    stage = make_stage(loaded)
    caption = "a red cup on a wooden table"
    monkeypatch.setattr(stage.captioner, "run", lambda crops, task, **k: [{task: caption}] * len(crops))
    texts = ["person", "cat", "a red cup on a wooden table", "a red cup", "a wooden table"]
    monkeypatch.setattr(stage.clip, "encode_texts", lambda ts, **k: torch.eye(8)[[texts.index(t) for t in ts]])
    # region 0 of each image: most similar to "a wooden table" (chunk); region 1: to the caption;
    # on the last image region 0 prefers its category "person"
    def encode_images(crops, **k):
        rows = []
        for i in range(len(crops)):
            v = torch.zeros(8)
            if i == len(crops) - 2:
                v[[0, 2, 4]] = torch.tensor([0.9, 0.3, 0.2])
            elif i % 2 == 0:
                v[[0, 2, 3, 4]] = torch.tensor([0.1, 0.2, 0.3, 0.7])
            else:
                v[[1, 2, 3]] = torch.tensor([0.2, 0.6, 0.5])
            rows.append(v)
        return torch.stack(rows)

    monkeypatch.setattr(stage.clip, "encode_images", encode_images)
    records = table_to_records(stage(with_regions(photo_batch)))
    for k, rec in enumerate(records):
        r0, r1 = rec["regions"][:2]
        if k == len(records) - 1:
            assert r0["brief"] == "person" and r0["checks"]["region_text.choice"] == CATEGORY
            assert r0["checks"]["region_text.sim_category"] == pytest.approx(0.9)
        else:
            assert r0["brief"] == "a wooden table" and r0["checks"]["region_text.choice"] == CHUNK
            assert r0["checks"] == pytest.approx({"region_text.sim_category": 0.1, "region_text.sim_caption": 0.2,
                                                  "region_text.sim_chunk_best": 0.7, "region_text.choice": 2.0})
        assert r1["brief"] == "a red cup on a wooden table" and r1["checks"]["region_text.choice"] == CAPTION
        assert r1["checks"]["region_text.sim_chunk_best"] == pytest.approx(0.5)  # "a red cup" beat "a wooden table"


def test_choose_brief_rules():
    sims = {"cat": 0.3, "a cat on a mat": 0.3, "a cat": 0.1, "a mat": 0.2}
    tie = choose_brief("cat", "a cat on a mat", ["a cat", "a mat"], sims, "rt")
    assert tie.kind == CATEGORY and tie.text == "cat"  # ties go to the category phrase
    assert tie.checks == {"rt.sim_category": 0.3, "rt.sim_caption": 0.3, "rt.sim_chunk_best": 0.2, "rt.choice": 0.0}
    no_label = choose_brief(None, "a cat on a mat", ["a cat", "a mat"], sims, "rt")
    assert no_label.kind == CAPTION and "rt.sim_category" not in no_label.checks
    assert choose_brief(None, "", [], {}, "rt") is None
    assert clean_caption("<s><loc_12> a  cat </s>") == "a cat"


def test_overwrite_and_bad_image(loaded, photo_batch):
    table = with_regions(photo_batch)
    images = table.column(IMAGE_BYTES_COLUMN).to_pylist()
    broken = table.set_column(
        table.column_names.index(IMAGE_BYTES_COLUMN), IMAGE_BYTES_COLUMN, pa.array([b"\x89PNG broken"] + images[1:])
    )
    records = table_to_records(make_stage(loaded, overwrite=True)(broken))
    assert records[0]["errors"][0]["stage"] == "decode"
    assert all(r["brief"] in (None, "a human-written brief") for r in records[0]["regions"])
    for rec in records[1:]:
        assert not rec["errors"]
        assert rec["regions"][-1]["brief"] != "a human-written brief"  # overwrite re-describes it
        assert "region_text.choice" in rec["regions"][-1]["checks"]


@pytest.mark.slow
def test_detect_then_region_text(photo_batch):
    """The two stages chained as a pipeline runs them, both from model aliases."""
    from annotators.detect import ObjectDetector

    models = {**MODELS, "detector": "random:tiny"}
    detected = ObjectDetector({"threshold": 0.05, "max_detections": 1}, models=models)(photo_batch)
    out = RegionTextAnnotator(FAST, models=models)(detected)
    validate_table(out.drop_columns([IMAGE_BYTES_COLUMN]))
    regions = [r for rec in table_to_records(out) for r in rec["regions"]]
    assert len(regions) == photo_batch.num_rows
    assert all(r["brief"] and "region_text.choice" in r["checks"] for r in regions)
