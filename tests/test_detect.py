"""Stage `detect`: both detector families (tiny random, real architectures) on real photos."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from annotators.detect import ObjectDetector, load_detector
from engine.random_models.detectors import TINY_LABELS, tiny_detr
from engine.random_models.tokenizers import clip_tokenizer
from engine.stage import IMAGE_BYTES_COLUMN
from schemas.validate import validate_table

torch.set_num_threads(2)

OWL_VOCAB = ["person", "cat", "cup", "rocket", "dog"]


def _regions(table: pa.Table) -> list[list[dict]]:
    return [rec["regions"] for rec in table.drop_columns([IMAGE_BYTES_COLUMN]).to_pylist()]


def _check_regions(table: pa.Table, labels: set[str], threshold: float, max_detections: int) -> int:
    validate_table(table.drop_columns([IMAGE_BYTES_COLUMN]))
    total = 0
    for rec in table.to_pylist():
        assert rec["errors"] == []
        scores = [r["score"] for r in rec["regions"]]
        assert scores == sorted(scores, reverse=True)
        assert len(rec["regions"]) <= max_detections
        for r in rec["regions"]:
            x0, y0, x1, y1 = r["box"]
            assert 0 <= x0 < x1 <= rec["width"] and 0 <= y0 < y1 <= rec["height"]
            assert r["kind"] == "object" and r["label"] in labels and r["score"] > threshold
            assert r["source"]["annotator"] == "detect" and r["source"]["model"] == "random:tiny"
            assert r["source"]["revision"].startswith("random-") and r["source"]["params_hash"]
            assert r["status"] == "kept" and r["round"] == 0
        total += len(rec["regions"])
    return total


def test_detr_family_on_photos(photo_batch):
    stage = ObjectDetector({"model": "random:tiny", "family": "detr", "threshold": 0.05, "max_detections": 7})
    calls = []
    stage.ensure_setup()
    model = stage.detector.model
    original = model.forward
    model.forward = lambda *a, **k: calls.append(k["pixel_values"].shape[0]) or original(*a, **k)
    out = stage(photo_batch)
    assert calls == [photo_batch.num_rows]  # one batched forward for the whole batch
    assert type(model).__name__ == "ConditionalDetrForObjectDetection"
    assert _check_regions(out, set(TINY_LABELS), 0.05, 7) == 7 * photo_batch.num_rows
    # deterministic across workers: a second stage builds the same weights and ids
    again = ObjectDetector({"model": "random:tiny", "threshold": 0.05, "max_detections": 7})(photo_batch)
    assert _regions(again) == _regions(out)


def test_owlv2_zero_shot_on_photos(photos):
    from helpers import make_batch

    batch = make_batch({n: photos[n] for n in list(photos)[:6]})
    stage = ObjectDetector(
        {"model": "random:tiny", "family": "owlv2", "vocabulary": OWL_VOCAB, "threshold": 0.0, "max_detections": 10}
    )
    out = stage(batch)
    assert type(stage.detector.model).__name__ == "Owlv2ForObjectDetection"
    assert _check_regions(out, set(OWL_VOCAB), 0.0, 10) > 0
    # the queries were tokenized with the real CLIP vocabulary ("cat" is CLIP token 2368)
    assert 2368 in stage._queries["input_ids"][1].tolist()
    assert clip_tokenizer(16)("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_local_directory_round_trip(photo_batch, tmp_path):
    detector = load_detector("random:tiny", "detr", device="cpu")
    detector.save(str(tmp_path / "det"))
    params = {"family": "detr", "threshold": 0.05, "max_detections": 3}
    from_dir = ObjectDetector({"model": str(tmp_path / "det"), **params})(photo_batch)
    from_random = ObjectDetector({"model": "random:tiny", **params})(photo_batch)
    boxes = lambda t: [[(r["label"], r["box"], r["score"]) for r in regs] for regs in _regions(t)]  # noqa: E731
    assert boxes(from_dir) == boxes(from_random)
    assert _regions(from_dir)[0][0]["source"]["revision"].startswith("local-")


def test_alias_rerun_and_bad_image(photo_batch):
    stage = ObjectDetector({"threshold": 0.05, "max_detections": 2}, models={"detector": "random:tiny"})
    once = stage(photo_batch)
    twice = stage(once)  # rerunning replaces the stage's own regions, never duplicates them
    assert _regions(twice) == _regions(once)
    # a second detector in the same step (other family) adds its regions beside the first's
    owl = ObjectDetector({"model": "random:tiny", "family": "owlv2", "vocabulary": OWL_VOCAB, "threshold": 0.0})
    both = _regions(owl(once))
    assert all(regs[: len(first)] == first for regs, first in zip(both, _regions(once)))
    ids = [r["ann_id"] for regs in both for r in regs]
    assert len(ids) > 2 * once.num_rows and len(set(ids)) == len(ids)
    broken = once.set_column(
        once.column_names.index(IMAGE_BYTES_COLUMN),
        IMAGE_BYTES_COLUMN,
        pa.array([b"not an image"] + once.column(IMAGE_BYTES_COLUMN).to_pylist()[1:], pa.binary()),
    )
    out = stage(broken).to_pylist()
    # an image that cannot be decoded is not given to the stage: its record keeps what it had and
    # carries the decode error; the other images of the batch are detected as usual
    assert out[0]["regions"] == once.to_pylist()[0]["regions"] and out[0]["errors"][0]["stage"] == "decode"
    assert "UnidentifiedImageError" in out[0]["errors"][0]["error"]
    assert all(len(r["regions"]) == 2 and not r["errors"] for r in out[1:])


def test_region_rules_with_known_detections():
    """Clamping, degenerate boxes, vocabulary filter, order and top-k on hand-made detections."""
    stage = ObjectDetector(
        {"model": "random:tiny", "vocabulary": ["cat", "cup"], "max_detections": 2, "min_box_size": 2}
    )
    stage._source = stage.source("random:tiny", "r")
    record = {"image_id": "img", "width": 100, "height": 50, "regions": []}
    stage._add_regions(
        record,
        [
            (0.6, "cup", [-10.0, -5.0, 40.0, 20.0]),  # clamped to the image
            (0.9, "person", [0.0, 0.0, 10.0, 10.0]),  # not in the vocabulary
            (0.8, "cat", [99.5, 10.0, 130.0, 30.0]),  # 0.5 px wide once clamped: dropped
            (0.7, "cat", [10.0, 10.0, 20.0, 20.0]),
            (0.5, "cup", [1.0, 1.0, 5.0, 5.0]),  # beyond max_detections
        ],
    )
    got = [(r["label"], r["score"], r["box"]) for r in record["regions"]]
    assert got == [("cat", 0.7, [10.0, 10.0, 20.0, 20.0]), ("cup", 0.6, [0.0, 0.0, 40.0, 20.0])]
    assert len({r["ann_id"] for r in record["regions"]}) == 2


def test_params_and_setup_errors():
    with pytest.raises(ValidationError, match="vocabulary"):
        ObjectDetector({"model": "random:tiny", "family": "owlv2"})
    with pytest.raises(ValidationError, match="family"):
        ObjectDetector({"family": "yolo"})
    with pytest.raises(ValidationError, match="thresh"):
        ObjectDetector({"thresh": 0.3})
    with pytest.raises(ValidationError, match="prompt_template"):
        ObjectDetector({"family": "owlv2", "vocabulary": ["cat"], "prompt_template": "a cat"})
    stage = ObjectDetector({"model": "random:tiny", "vocabulary": ["unicorn"]})
    with pytest.raises(ValueError, match="unicorn"):
        stage.ensure_setup()
    with pytest.raises(ValueError, match="unknown detr preset"):
        load_detector("random:huge", "detr")
    with pytest.raises(OSError, match="'facebook/detr-resnet-50' \\(hub, family detr\\)"):
        load_detector("facebook/detr-resnet-50", "detr")  # HF_HUB_OFFLINE: fails fast, naming the id


def test_random_detector_from_config_file(tmp_path, photo_batch):
    """random:<file.json>: any DETR-family model_type of transformers, its image processor resolved."""
    import json

    config, processor_kwargs = tiny_detr()
    config.update(model_type="detr", num_queries=5, image_processor=processor_kwargs)
    path = tmp_path / "detr.json"
    path.write_text(json.dumps(config))
    stage = ObjectDetector({"model": f"random:{path}", "threshold": 0.0, "max_detections": 3})
    out = stage(photo_batch)
    assert type(stage.detector.model).__name__ == "DetrForObjectDetection"
    assert _regions(out)[0][0]["source"]["model"] == f"random:{path}"
    validate_table(out.drop_columns([IMAGE_BYTES_COLUMN]))
    (tmp_path / "dfine.json").write_text(json.dumps({"model_type": "d_fine"}))
    with pytest.raises(ValueError, match="image_processor_type"):
        load_detector(f"random:{tmp_path / 'dfine.json'}", "detr")


def test_detr_boxes_land_in_the_photo_pixels(photos, monkeypatch):
    """A DETR whose output the test chooses (forward replaced): one confident query with a known
    normalised box on a non-square photo must come out at exactly that place in its pixels, with its
    label; a (w, h) / (h, w) swap of the post-processing's target sizes would move it."""
    from transformers.models.conditional_detr.modeling_conditional_detr import ConditionalDetrObjectDetectionOutput

    from helpers import make_batch

    stage = ObjectDetector({"model": "random:tiny", "family": "detr", "threshold": 0.5, "max_detections": 5})
    stage.ensure_setup()
    cat, dog = TINY_LABELS.index("cat"), TINY_LABELS.index("dog")
    chosen = {3: ((0.30, 0.25, 0.20, 0.30), cat, 4.0), 11: ((0.70, 0.60, 0.40, 0.50), dog, 2.0)}

    def chosen_forward(pixel_values, **_):
        n, queries = pixel_values.shape[0], stage.detector.model.config.num_queries
        logits = torch.full((n, queries, len(TINY_LABELS)), -10.0)
        boxes = torch.full((n, queries, 4), 0.5)
        for q, (box, label, logit) in chosen.items():
            logits[:, q, label] = logit
            boxes[:, q] = torch.tensor(box)
        return ConditionalDetrObjectDetectionOutput(logits=logits, pred_boxes=boxes)

    monkeypatch.setattr(stage.detector.model, "forward", chosen_forward)
    rec = stage(make_batch({"chelsea": photos["chelsea"]})).drop_columns([IMAGE_BYTES_COLUMN]).to_pylist()[0]
    w, h = rec["width"], rec["height"]
    assert (w, h) == (451, 300)
    got = [(r["label"], r["box"], r["score"]) for r in rec["regions"]]
    assert [g[0] for g in got] == ["cat", "dog"]  # best score first
    for (label, box, score), ((cx, cy, bw, bh), _, logit) in zip(got, chosen.values()):
        assert box == pytest.approx([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], abs=1e-3)
        assert score == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-6)
