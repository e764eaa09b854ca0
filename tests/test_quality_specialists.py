"""Simulated specialists (bench/quality/specialists.py): they are ordinary stages, their error
rates are the ones their parameters give, perfect settings reproduce the truth, and the engine's
own filters catch the errors they are meant to catch."""
from __future__ import annotations

import numpy as np
import pytest

from bench.quality.metrics import evaluate
from bench.quality.specialists import SimCaptioner, SimDetector, SimGrounder, SimSegmenter
from bench.quality.world import WorldConfig, load_truth, truth_of, world_records, write_world
from engine.config import load_pipeline
from engine.registry import stage_class
from engine.stage import records_to_table, table_to_records

PERFECT_DETECTOR = dict(miss_rate=0, false_positives=0, duplicate_rate=0, box_jitter=0, mislocalised_rate=0,
                        confusion_rate=0, colour_error_rate=0)
PERFECT_CAPTIONER = dict(swap_rate=0, omission_rate=0, hallucinations=0, generic_rate=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root, WorldConfig(seed=5, n_train=24, n_heldout=2))
    return root


def run(stages, records):
    table = records_to_table(records)
    for stage in stages:
        table = stage(table)
    return table_to_records(table)


def test_import_paths_resolve_like_any_stage(world, tmp_path):
    assert stage_class("bench.quality.specialists:SimDetector") is SimDetector
    yaml = tmp_path / "p.yaml"
    yaml.write_text(f"""
pipelines:
  p:
    steps:
      - name: s1
        stages:
          - stage: bench.quality.specialists:SimDetector
            params: {{world: {world}, miss_rate: 2.0}}
""")
    with pytest.raises(Exception, match=r"steps\[0\].stages\[0\].params.miss_rate"):
        load_pipeline(yaml, "p")


def test_perfect_detector_gives_map_one_and_the_truth(world):
    recs = run([SimDetector({"world": str(world), **PERFECT_DETECTOR}), SimSegmenter({"world": str(world), "boundary_noise": 0})],
               world_records(world, "train"))
    m = evaluate(recs, load_truth(world))
    assert m["box_map"] == pytest.approx(1.0) and m["box_ap50"] == pytest.approx(1.0)
    assert m["obj_precision"] == m["obj_recall"] == m["category_accuracy"] == m["brief_accuracy"] == 1.0
    assert m["mask_iou"] == pytest.approx(1.0)
    r = recs[0]["regions"][0]
    assert r["source"]["annotator"] == "sim_detector" and r["source"]["model"] == "simulated"


def test_detector_that_misses_everything_has_recall_zero(world):
    recs = run([SimDetector({"world": str(world), "miss_rate": 1.0, "false_positives": 0})], world_records(world, "train"))
    m = evaluate(recs, load_truth(world))
    assert m["obj_recall"] == 0.0 and m["obj_kept"] == 0 and m["box_map"] == 0.0


def test_detector_error_rates_are_the_parameters(world):
    recs = run([SimDetector({"world": str(world), "miss_rate": 0.3, "false_positives": 2.0, "duplicate_rate": 0,
                             "mislocalised_rate": 0, "confusion_rate": 0.5, "box_jitter": 0.02})], world_records(world, "train"))
    truth = load_truth(world)
    n_true = sum(len(truth_of(truth, r["uri"])["objects"]) for r in recs)
    m = evaluate(recs, truth)
    assert m["obj_recall"] == pytest.approx(0.7, abs=0.1)  # misses
    fps = m["obj_kept"] - round(m["obj_precision"] * m["obj_kept"])
    assert fps / len(recs) == pytest.approx(2.0, abs=0.7)  # false positives per image (Poisson mean)
    assert m["category_accuracy"] == pytest.approx(0.5, abs=0.12)
    assert n_true > 80
    # scores are higher for right boxes than for wrong ones (what region_filter's low_score uses)
    right, wrong = [], []
    for rec in recs:
        objs = truth_of(truth, rec["uri"])["objects"]
        for r in rec["regions"]:
            hit = any(r["label"] == o["category"] and _iou(r["box"], o["box"]) >= 0.5 for o in objs)
            (right if hit else wrong).append(r["score"])
    assert np.mean(right) > np.mean(wrong) + 0.2


def _iou(a, b):
    from schemas.geometry import box_iou

    return box_iou(a, b)


def test_same_output_whatever_the_batching(world):
    recs = world_records(world, "train")
    one = run([SimDetector({"world": str(world)}), SimCaptioner({"world": str(world)})], recs)
    halves = run([SimDetector({"world": str(world)}), SimCaptioner({"world": str(world)})], recs[:5]) + \
        run([SimDetector({"world": str(world)}), SimCaptioner({"world": str(world)})], recs[5:])
    assert one == halves
    other_seed = run([SimDetector({"world": str(world), "seed": 9})], recs)
    assert [r["regions"] for r in other_seed] != [r["regions"] for r in one]


def test_perfect_captioner_reproduces_the_truth_and_errors_show(world):
    truth = load_truth(world)
    recs = run([SimCaptioner({"world": str(world), **PERFECT_CAPTIONER})], world_records(world, "train"))
    for rec in recs:
        t = truth_of(truth, rec["uri"])
        assert {x["tier"]: x["text"] for x in rec["texts"]} == t["captions"]
    m = evaluate(recs, truth)
    assert m["brief_f1"] == m["detailed_f1"] == m["detailed_relation_recall"] == m["brief_object_precision"] == 1.0
    noisy = evaluate(run([SimCaptioner({"world": str(world), "hallucinations": 2.0, "omission_rate": 0.5,
                                        "swap_rate": 0, "generic_rate": 0})], world_records(world, "train")), truth)
    assert noisy["brief_object_precision"] < 0.85 and noisy["detailed_attribute_recall"] < 0.75
    assert noisy["detailed_f1"] < 0.95


@pytest.mark.timeout(180)
def test_engine_filters_catch_the_simulated_errors(world):
    """Generic captions fail text_filter; mislocalised boxes disagree with the object mask they
    snap to (region_filter mask_disagree); low-score groundings fail grounding_filter."""
    from filters.grounding import GroundingFilter
    from filters.region import RegionFilter
    from filters.text import TextFilter

    w = str(world)
    recs = run([SimDetector({"world": w, **{**PERFECT_DETECTOR, "mislocalised_rate": 1.0}}),
                SimCaptioner({"world": w, **{**PERFECT_CAPTIONER, "generic_rate": 1.0}}),
                SimSegmenter({"world": w, "boundary_noise": 0}),
                TextFilter(), RegionFilter({"min_score": {"object": None}}), GroundingFilter()], world_records(world, "train"))
    assert all(t["reason"].startswith("text_filter:") for r in recs for t in r["texts"])
    reasons = [x["reason"] for r in recs for x in r["regions"]]
    assert reasons.count("region_filter:mask_disagree") > 0.6 * len(reasons)

    recs = run([SimCaptioner({"world": w, **PERFECT_CAPTIONER}),
                SimGrounder({"world": w, "miss_rate": 0, "wrong_object_rate": 0.5, "phantom_rate": 0}),
                GroundingFilter({"phrase_score_key": "sim_grounder.text_score", "min_mask_iou": None})],
               world_records(world, "train"))
    truth = load_truth(world)
    before = evaluate([{**r, "groundings": [dict(g, status="kept") for g in r["groundings"]]} for r in recs], truth)
    after = evaluate(recs, truth)
    assert before["groundings_kept"] > after["groundings_kept"] > 0
    assert after["grounding_accuracy"] > before["grounding_accuracy"] + 0.1


def test_perfect_grounder_on_true_captions(world):
    w = str(world)
    recs = run([SimCaptioner({"world": w, **PERFECT_CAPTIONER}),
                SimGrounder({"world": w, "miss_rate": 0, "wrong_object_rate": 0, "phantom_rate": 0, "box_jitter": 0})],
               world_records(world, "train"))
    m = evaluate(recs, load_truth(world))
    assert m["grounding_accuracy"] == 1.0 and m["groundings_kept"] > 50
    g = recs[0]["groundings"][0]
    caption = next(t for t in recs[0]["texts"] if t["ann_id"] == g["text_ann_id"])
    assert caption["text"][g["char_start"]:g["char_end"]] == g["phrase"]
    wrong = evaluate(run([SimCaptioner({"world": w, **PERFECT_CAPTIONER}),
                          SimGrounder({"world": w, "miss_rate": 0, "wrong_object_rate": 1.0, "phantom_rate": 0})],
                         world_records(world, "train")), load_truth(world))
    assert wrong["grounding_accuracy"] < 0.3


def test_bad_records_get_an_error_and_the_batch_goes_on(world):
    recs = world_records(world, "train")[:3]
    recs[0] = dict(recs[0], uri="/somewhere/else.png")
    recs[1] = dict(recs[1], width=recs[1]["width"] + 8)
    out = run([SimDetector({"world": str(world)}), SimCaptioner({"world": str(world)})], recs)
    assert "else.png" in out[0]["errors"][0]["error"] and out[0]["errors"][0]["stage"] == "sim_detector"
    assert "was the image re-encoded" in out[1]["errors"][0]["error"]
    assert out[2]["regions"] and out[2]["texts"] and not out[2]["errors"]
