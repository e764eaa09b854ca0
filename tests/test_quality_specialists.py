"""Simulated specialists (bench/quality/specialists.py): they are ordinary stages, their error
rates are the ones their parameters give, and nothing a filter reads is an oracle: the segmenter
sees pixels (never the truth), scores rank correctness exactly as well as their `score_auc` says,
a duplicate's kept copy is a coin toss, errors rise with difficulty, and the captioner words its
captions in its own templates."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from bench.quality.metrics import evaluate
from bench.quality.specialists import (
    SimCaptioner,
    SimDetector,
    SimGrounder,
    SimSegmenter,
    difficulty,
    draw_score,
    error_rate,
)
from bench.quality.world import WorldConfig, image_dir, load_truth, truth_of, world_records, write_world
from engine.config import load_pipeline
from engine.registry import stage_class
from engine.stage import IMAGE_BYTES_COLUMN, records_to_table, table_to_records
from schemas.geometry import box_iou, rle_to_mask

PERFECT_DETECTOR = dict(miss_rate=0, false_positives=0, duplicate_rate=0, box_jitter=0, mislocalised_rate=0,
                        confusion_rate=0, colour_error_rate=0)
PERFECT_CAPTIONER = dict(swap_rate=0, omission_rate=0, hallucinations=0, generic_rate=0, background_error_rate=0,
                         position_error_rate=0, relation_error_rate=0, verb_error_rate=0)


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


def segment(records, image_bytes=None):
    """SimSegmenter on records whose images are read from their uri (or given as bytes by uri)."""
    table = records_to_table(records)
    data = [(image_bytes or {}).get(r["uri"]) or open(r["uri"], "rb").read() for r in records]
    return table_to_records(SimSegmenter()(table.append_column(IMAGE_BYTES_COLUMN, pa.array(data, pa.binary()))))


def auc(pos, neg) -> float:
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def right_box(region, objects) -> bool:
    return any(region["label"] == o["category"] and box_iou(region["box"], o["box"]) >= 0.5 for o in objects)


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


def test_perfect_detector_gives_map_one_and_grabcut_masks_fit(world):
    recs = segment(run([SimDetector({"world": str(world), **PERFECT_DETECTOR})], world_records(world, "train")))
    m = evaluate(recs, load_truth(world))
    assert m["box_map"] == pytest.approx(1.0) and m["box_ap50"] == pytest.approx(1.0)
    assert m["obj_precision"] == m["obj_recall"] == m["category_accuracy"] == m["brief_accuracy"] == 1.0
    assert 0.7 < m["mask_iou"] < 1.0  # GrabCut on the pixels: close to the truth's masks, never equal
    r = recs[0]["regions"][0]
    assert r["source"]["annotator"] == "sim_detector" and r["source"]["model"] == "simulated"
    assert "masks.fg_fraction" in r["checks"]  # GrabCut's own quality checks, as the masks stage writes them


def test_detector_that_misses_everything_has_recall_zero(world):
    recs = run([SimDetector({"world": str(world), "miss_rate": 1.0, "false_positives": 0})], world_records(world, "train"))
    m = evaluate(recs, load_truth(world))
    assert m["obj_recall"] == 0.0 and m["obj_kept"] == 0 and m["box_map"] == 0.0


def test_detector_error_rates_are_the_parameters(world):
    recs = run([SimDetector({"world": str(world), "miss_rate": 0.3, "false_positives": 2.0, "duplicate_rate": 0,
                             "mislocalised_rate": 0, "confusion_rate": 0.5, "box_jitter": 0.02, "difficulty": 0})],
               world_records(world, "train"))
    truth = load_truth(world)
    n_true = sum(len(truth_of(truth, r["uri"])["objects"]) for r in recs)
    m = evaluate(recs, truth)
    assert m["obj_recall"] == pytest.approx(0.7, abs=0.1)  # misses
    fps = m["obj_kept"] - round(m["obj_precision"] * m["obj_kept"])
    assert fps / len(recs) == pytest.approx(2.0, abs=0.7)  # false positives per image (Poisson mean)
    assert m["category_accuracy"] == pytest.approx(0.5, abs=0.12)
    assert n_true > 80


def test_same_output_whatever_the_batching(world):
    recs = world_records(world, "train")
    one = run([SimDetector({"world": str(world)}), SimCaptioner({"world": str(world)})], recs)
    halves = run([SimDetector({"world": str(world)}), SimCaptioner({"world": str(world)})], recs[:5]) + \
        run([SimDetector({"world": str(world)}), SimCaptioner({"world": str(world)})], recs[5:])
    assert one == halves
    other_seed = run([SimDetector({"world": str(world), "seed": 9})], recs)
    assert [r["regions"] for r in other_seed] != [r["regions"] for r in one]


def test_perfect_captioner_names_the_truth_in_its_own_words_and_errors_show(world):
    truth = load_truth(world)
    recs = run([SimCaptioner({"world": str(world), **PERFECT_CAPTIONER})], world_records(world, "train"))
    for rec in recs:
        t = truth_of(truth, rec["uri"])
        texts = {x["tier"]: x["text"] for x in rec["texts"]}
        assert texts["brief"] != t["captions"]["brief"] and texts["detailed"] != t["captions"]["detailed"]
        for word in (t["background"][1], " background"):  # its own background words, not the truth's
            assert word not in texts["brief"] and word not in texts["detailed"]
    m = evaluate(recs, truth)
    # every object right: the mention-level metrics are perfect, token F1 is not (other wording)
    assert m["brief_object_precision"] == m["brief_attribute_recall"] == m["detailed_object_precision"] == 1.0
    assert m["detailed_attribute_recall"] == m["detailed_relation_recall"] == 1.0
    assert m["detailed_f1"] < 0.9 and m["brief_f1"] < 0.9
    assert m["detailed_f1_floor"] < m["detailed_f1"] and m["brief_f1_floor"] < m["brief_f1"]
    noisy = evaluate(run([SimCaptioner({"world": str(world), "hallucinations": 2.0, "omission_rate": 0.5,
                                        "swap_rate": 0, "generic_rate": 0})], world_records(world, "train")), truth)
    assert noisy["brief_object_precision"] < 0.85 and noisy["detailed_attribute_recall"] < 0.75
    slips = evaluate(run([SimCaptioner({"world": str(world), **{**PERFECT_CAPTIONER, "relation_error_rate": 1.0}})],
                         world_records(world, "train")), truth)
    assert slips["detailed_relation_recall"] == 0.0 and slips["detailed_object_precision"] == 1.0


@pytest.mark.timeout(180)
def test_engine_filters_catch_the_simulated_errors(world):
    """Generic captions fail text_filter; GrabCut masks of mislocalised boxes disagree with their
    box more often than those of right boxes (region_filter mask_disagree: a real pixel signal, not
    a truth lookup); low-score groundings fail grounding_filter."""
    from filters.grounding import GroundingFilter
    from filters.region import RegionFilter
    from filters.text import TextFilter

    w = str(world)
    truth = load_truth(world)
    recs = run([SimDetector({"world": w, **{**PERFECT_DETECTOR, "mislocalised_rate": 0.5, "difficulty": 0}}),
                SimCaptioner({"world": w, **{**PERFECT_CAPTIONER, "generic_rate": 1.0}})], world_records(world, "train"))
    recs = run([TextFilter(), RegionFilter({"min_score": {"object": None}})], segment(recs))
    assert all(t["reason"].startswith("text_filter:") for r in recs for t in r["texts"])
    fate = {True: [], False: []}
    for rec in recs:
        objs = truth_of(truth, rec["uri"])["objects"]
        for x in rec["regions"]:
            fate[right_box(x, objs)].append(x["reason"] == "region_filter:mask_disagree")
    assert len(fate[True]) > 30 and len(fate[False]) > 30
    assert np.mean(fate[False]) > np.mean(fate[True]) + 0.1

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


# ------------------------------------------------------------------- no oracle (issue 18)
def test_segmenter_mask_never_leaves_its_prompt_box(world):
    recs = segment(run([SimDetector({"world": str(world), "false_positives": 2.0, "mislocalised_rate": 0.3,
                                     "box_jitter": 0.1})], world_records(world, "train")[:8]))
    n = 0
    for rec in recs:
        for r in rec["regions"]:
            mask = rle_to_mask(r["mask"])
            x0, y0, x1, y1 = r["box"]
            ys, xs = np.nonzero(mask)
            if len(xs):
                assert xs.min() >= np.floor(x0) and xs.max() < np.ceil(x1) and ys.min() >= np.floor(y0) and ys.max() < np.ceil(y1)
                n += 1
    assert n > 20


def test_segmenter_sees_pixels_not_truth(world, tmp_path):
    """The same boxes on the same pixels give the same masks whatever the truth says; the same
    boxes on other pixels (the objects painted over) give other masks though the truth is unchanged."""
    records = run([SimDetector({"world": str(world), **PERFECT_DETECTOR})], world_records(world, "train")[:4])
    before = segment(records)
    # another truth, same pixels: every object's mask and box in the truth file moved away
    other = tmp_path / "other"
    shutil.copytree(world, other)
    lines = []
    for line in (other / "truth" / "train.jsonl").read_text().splitlines():
        t = json.loads(line)
        for o in t["objects"]:
            o["box"] = [0, 0, 5, 5]
            o["mask"] = {"size": o["mask"]["size"], "counts": "0"}
        lines.append(json.dumps(t))
    (other / "truth" / "train.jsonl").write_text("\n".join(lines) + "\n")
    moved = [dict(r, uri=str(image_dir(other, "train") / r["uri"].rsplit("/", 1)[-1])) for r in records]
    assert [[x["mask"] for x in r["regions"]] for r in segment(moved)] == [[x["mask"] for x in r["regions"]] for r in before]
    # other pixels, same truth: the first image with its objects painted over with the background colour
    rec = records[0]
    img = np.asarray(Image.open(rec["uri"]).convert("RGB")).copy()
    img[:, :] = img[0, 0]
    painted = tmp_path / "painted.png"
    Image.fromarray(img).save(painted)
    after = segment([rec], {rec["uri"]: painted.read_bytes()})
    assert [x["mask"] for x in after[0]["regions"]] != [x["mask"] for x in before[0]["regions"]]


@pytest.mark.parametrize("target", [0.65, 0.8])
def test_score_auc_is_its_parameter(target):
    rng = np.random.default_rng(0)
    right = [draw_score(rng, True, target) for _ in range(20000)]
    wrong = [draw_score(rng, False, target) for _ in range(20000)]
    assert auc(right, wrong) == pytest.approx(target, abs=0.03)
    assert all(0 < s < 1 for s in right + wrong)


@pytest.mark.parametrize("target", [0.65, 0.8])
def test_detector_scores_rank_correctness_at_their_auc(world, target):
    """Through the stage: the AUC of the box scores against the metric's own correctness (IoU >= 0.5
    and the right category) on ~1500 boxes of several specialist seeds."""
    truth = load_truth(world)
    right, wrong = [], []
    for seed in range(8):
        recs = run([SimDetector({"world": str(world), "seed": seed, "score_auc": target, "box_jitter": 0, "duplicate_rate": 0,
                                 "miss_rate": 0.1, "false_positives": 2.0, "confusion_rate": 0.3, "mislocalised_rate": 0.15})],
                   world_records(world, "train"))
        for rec in recs:
            objs = truth_of(truth, rec["uri"])["objects"]
            for r in rec["regions"]:
                (right if right_box(r, objs) else wrong).append(r["score"])
    assert len(right) > 400 and len(wrong) > 400
    assert auc(right, wrong) == pytest.approx(target, abs=0.03)


def test_duplicate_keep_choice_is_a_coin_toss(world):
    """Every found object gets two boxes: the higher-scored copy (the one NMS keeps) is the better
    placed one about half the time, and its score is no different."""
    truth = load_truth(world)
    better_kept = []
    for seed in range(3):
        recs = run([SimDetector({"world": str(world), "seed": seed, "duplicate_rate": 1.0, "box_jitter": 0.08,
                                 "false_positives": 0, "miss_rate": 0, "mislocalised_rate": 0, "confusion_rate": 0})],
                   world_records(world, "train"))
        for rec in recs:
            for o in truth_of(truth, rec["uri"])["objects"]:
                copies = sorted((r for r in rec["regions"] if r["label"] == o["category"] and box_iou(r["box"], o["box"]) > 0.3),
                                key=lambda r: -r["score"])
                if len(copies) == 2:
                    better_kept.append(box_iou(copies[0]["box"], o["box"]) > box_iou(copies[1]["box"], o["box"]))
    assert len(better_kept) > 200
    assert np.mean(better_kept) == pytest.approx(0.5, abs=0.07)


def test_errors_rise_with_difficulty(world):
    """Miss rate by occlusion and by size, through the detector: the hard objects are missed more."""
    assert error_rate(0.2, 0.5, 2.0) == pytest.approx(0.2)
    assert error_rate(0.2, 1.0, 2.0) > 0.2 > error_rate(0.2, 0.0, 2.0)
    assert error_rate(0.2, 1.0, 0.0) == 0.2 and error_rate(0.0, 1.0, 3.0) == 0.0
    truth = load_truth(world)
    missed = {"occluded": [], "whole": [], "small": [], "large": []}
    for seed in range(6):
        recs = run([SimDetector({"world": str(world), **{**PERFECT_DETECTOR, "miss_rate": 0.3, "difficulty": 3.0}, "seed": seed})],
                   world_records(world, "train"))
        for rec in recs:
            t = truth_of(truth, rec["uri"])
            for o in t["objects"]:
                miss = not any(box_iou(r["box"], o["box"]) > 0.9 for r in rec["regions"])
                missed["occluded" if o["visible_fraction"] < 0.85 else "whole"].append(miss)
                side = (o["area"] / (t["width"] * t["height"])) ** 0.5
                if side < 0.15 or side > 0.25:
                    missed["small" if side < 0.15 else "large"].append(miss)
                assert 0 <= difficulty(o, t["width"], t["height"]) <= 1
    assert min(len(v) for v in missed.values()) > 40
    assert np.mean(missed["occluded"]) > np.mean(missed["whole"]) + 0.05
    assert np.mean(missed["small"]) > np.mean(missed["large"]) + 0.1
