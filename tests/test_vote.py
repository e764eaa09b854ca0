"""The `vote` filter (filters/vote.py): k of n stage-1 sources must agree; agreeing boxes are fused (WBF)."""
from __future__ import annotations

import io
import textwrap

import pytest
from PIL import Image

from engine.config import ConfigError, load_pipeline
from filters.vote import VoteFilter
from schemas.records import new_annotation, source_of

A, B, C = source_of("detect", "ssd", params={"m": "a"}), source_of("detect", "detr", params={"m": "b"}), source_of("florence2", "f2")


def _box(source, ann_id, box, label, score):
    return new_annotation(source, score=score, ann_id=ann_id, kind="object", box=box, quad=None, polygon=None,
                          mask=None, label=label, brief=None)


def _record(regions):
    return {"image_id": "img", "width": 200, "height": 200, "regions": regions, "texts": [], "groundings": [],
            "errors": []}


def _three_sources():
    return _record([
        _box(A, "a", [10, 10, 50, 50], "dog", 0.9),
        _box(B, "b", [14, 12, 54, 52], "Dog", 0.6),  # the same dog, found by a second detector
        _box(C, "c", [100, 100, 140, 140], "dog", 0.8),  # found by one source only
        _box(source_of("human"), "h", [100, 100, 140, 140], "dog", None),  # truth never votes
    ])


def test_two_of_three_sources_agreeing_keep_the_fused_box():
    (rec,) = VoteFilter({"min_sources": 2}).process_batch([_three_sources()], None)
    by_id = {r["ann_id"]: r for r in rec["regions"]}
    fused = [r for r in rec["regions"] if r["source"]["annotator"] == "vote"]
    assert len(fused) == 1
    (f,) = fused
    # hand-computed WBF: coordinates weighted by score (0.9 and 0.6), score = (0.9 + 0.6) / 3 sources
    assert f["box"] == pytest.approx([(0.9 * 10 + 0.6 * 14) / 1.5, (0.9 * 10 + 0.6 * 12) / 1.5,
                                      (0.9 * 50 + 0.6 * 54) / 1.5, (0.9 * 50 + 0.6 * 52) / 1.5])
    assert f["box"] == pytest.approx([11.6, 10.8, 51.6, 50.8])
    assert f["score"] == pytest.approx(0.5) and f["label"] == "dog" and f["status"] == "kept"
    assert f["checks"]["vote.agree"] == 2 and f["checks"]["vote.sources"] == 3
    assert by_id["a"]["reason"] == by_id["b"]["reason"] == "vote:fused"
    assert by_id["c"]["status"] == "dropped" and by_id["c"]["reason"] == "vote:too_few_sources"
    assert by_id["c"]["checks"]["vote.agree"] == 1 and by_id["c"]["checks"]["vote.sources"] == 3
    assert by_id["h"]["status"] == "kept" and "vote.agree" not in by_id["h"]["checks"]


def test_vote_is_idempotent_and_k_one_keeps_every_cluster():
    vote = VoteFilter({"min_sources": 2})
    once = vote.process_batch([_three_sources()], None)[0]
    twice = vote.process_batch([once], None)[0]
    assert twice["regions"] == once["regions"]
    (rec,) = VoteFilter({"min_sources": 1}).process_batch([_three_sources()], None)
    assert sum(r["source"]["annotator"] == "vote" for r in rec["regions"]) == 2


def test_categories_are_reconciled_and_iou_is_per_kind():
    rec = _record([_box(A, "a", [10, 10, 50, 50], "motorbike", 0.9), _box(B, "b", [10, 10, 50, 50], "Motorcycle", 0.9),
                   _box(C, "c", [30, 10, 70, 50], "motorcycle", 0.9)])  # IoU 1/3 with the others
    (out,) = VoteFilter({"min_sources": 2}).process_batch([rec], None)
    assert {r["ann_id"]: r["reason"] for r in out["regions"] if r["source"]["annotator"] != "vote"} == {
        "a": "vote:fused", "b": "vote:fused", "c": "vote:too_few_sources"}
    (out,) = VoteFilter({"min_sources": 3, "iou": {"object": 0.3}}).process_batch([rec], None)
    assert [r["checks"]["vote.agree"] for r in out["regions"] if r["source"]["annotator"] == "vote"] == [3]
    with pytest.raises(ValueError, match="iou.object"):
        VoteFilter({"iou": {"object": 0.0}})


def test_a_pipeline_runs_two_detectors_in_stage_1_and_votes_in_stage_2(tmp_path, photos):
    path = tmp_path / "pipelines.yaml"
    path.write_text(textwrap.dedent("""
        pipelines:
          ensemble:
            steps:
              - name: stage1
                stages:
                  - {stage: detect, params: {model: "opencv-ssd:mobilenet_v2_coco", family: ssd, threshold: 0.3}}
                  - {stage: detect, params: {model: "opencv-ssd:mobilenet_v2_coco", family: ssd, threshold: 0.5}}
              - name: stage2
                stages:
                  - {stage: vote, params: {min_sources: 2}}
        """))
    other_model = path.read_text().replace('{model: "opencv-ssd:mobilenet_v2_coco", family: ssd, threshold: 0.5}',
                                           '{model: "random:tiny", family: detr}')
    (tmp_path / "two.yaml").write_text(other_model)  # an SSD and a DETR side by side: a valid pipeline
    two = load_pipeline(tmp_path / "two.yaml", "ensemble")
    assert [s.params["model"] for s in two.steps[0].stages] == ["opencv-ssd:mobilenet_v2_coco", "random:tiny"]
    pipe = load_pipeline(path, "ensemble")
    detectors = pipe.build_stages(pipe.steps[0])
    assert detectors[0].params_hash != detectors[1].params_hash
    with Image.open(io.BytesIO(photos["coffee"])) as im:
        image = im.convert("RGB")
    rec = _record([]) | {"width": image.width, "height": image.height}
    for stage in detectors:
        stage.setup()
        rec = stage.process_batch([rec], [image])[0]
    assert len({r["ann_id"] for r in rec["regions"]}) == len(rec["regions"])  # ids unique across the two stages
    (rec,) = pipe.build_stages(pipe.steps[1])[0].process_batch([rec], None)
    fused = [r for r in rec["regions"] if r["source"]["annotator"] == "vote"]
    assert any(r["label"] == "cup" and r["checks"]["vote.agree"] == 2 for r in fused)  # both SSD settings find the cup
    with pytest.raises(ConfigError, match="min_sources"):
        path.write_text(path.read_text().replace("min_sources: 2", "min_sources: 0"))
        load_pipeline(path, "ensemble")
