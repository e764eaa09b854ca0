"""fld calibrate on hand-made data: labels from human annotations, AUC with its interval, fitted thresholds,
and the profile overlay it writes (engine/views/calibrate.py)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import yaml

from engine.views.calibrate import auc, auc_interval, calibrate, fit_threshold, label_record, measure_rule, overlay_yaml
from engine.config import load_pipeline
from schemas.records import new_annotation, source_of

HUMAN, DETECTOR, OCR = source_of("human"), source_of("detect", "ssd"), source_of("ocr", "rapidocr")


def _region(source, ann_id, box, label, kind="object", score=None, checks=None, quad=None):
    ann = new_annotation(source, ann_id=ann_id, kind=kind, box=box, quad=quad, polygon=None, mask=None, label=label,
                         brief=None, score=score)
    ann["checks"] = dict(checks or {})
    return ann


def _record(i, regions, texts=(), groundings=()):
    return {"image_id": f"img{i}", "width": 200, "height": 200, "regions": list(regions), "texts": list(texts),
            "groundings": list(groundings)}


def test_a_separating_check_gets_auc_one_and_a_threshold_between_the_classes():
    wrong, right = np.array([0.1, 0.2, 0.3, 0.35, 0.4]), np.array([0.6, 0.7, 0.8, 0.9, 0.95])
    values, labels = np.r_[wrong, right], np.r_[np.zeros(5, bool), np.ones(5, bool)]
    assert auc(values, labels) == 1.0
    assert auc_interval(values, labels, 300) == (1.0, 1.0)
    t = fit_threshold(values, labels, target=0.9)
    assert 0.4 < t < 0.6
    # an upper rule (keeps value <= t) on the mirrored values: the same cut, the other way
    assert -0.6 < fit_threshold(-values, labels, 0.9, upper=True) < -0.4
    m = measure_rule(values, labels, current=0.2, upper=False, target=0.9, resamples=300)
    assert m["decision"] == "fit" and m["now"]["precision"] == pytest.approx(5 / 9) and m["now"]["recall"] == 1.0
    assert m["at_fitted"]["precision"] == 1.0 and m["at_fitted"]["recall"] == 1.0 and m["n"] == 10


def test_ties_use_mid_ranks_and_one_class_has_no_auc():
    assert auc(np.array([1.0, 1.0, 1.0, 1.0]), np.array([True, False, True, False])) == 0.5
    assert auc(np.array([0.1, 0.2]), np.array([True, True])) is None
    assert auc(np.array([0.1, 0.2, 0.3]), np.array([True, False, False])) == 0.0


def _calibration_records(n=60, seed=3):
    """Per image: a human cat box; the detector finds it (score 0.6-0.99) and adds a box where nothing is
    (score 0.05-0.45); `region_filter.aspect` is noise."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        human = _region(HUMAN, f"h{i}", [10, 10, 60, 60], "cat")
        hit = _region(DETECTOR, f"d{i}a", [12, 11, 61, 60], "Cat", score=float(rng.uniform(0.6, 0.99)),
                      checks={"region_filter.aspect": float(rng.uniform(1, 3))})
        miss = _region(DETECTOR, f"d{i}b", [120, 120, 170, 170], "cat", score=float(rng.uniform(0.05, 0.45)),
                       checks={"region_filter.aspect": float(rng.uniform(1, 3))})
        records.append(_record(i, [human, hit, miss]))
    return records


CONFIG = {"steps": [{"name": "stage2", "stages": [{"stage": "region_filter", "params": {"max_aspect": {"object": 2.5}}}]}]}


def test_calibrate_fits_the_separating_rule_and_switches_the_random_one_off(tmp_path):
    records = _calibration_records()
    cal = calibrate(None, records=records, config=CONFIG, target=0.9, resamples=400)
    assert cal.labelled == {"regions": {"n": 120, "correct": 60}}  # human boxes are never predictions
    rules = {r["rule"]: r for r in cal.rules}
    score, aspect = rules["object min_score"], rules["object max_aspect"]
    assert score["auc"] == 1.0 and score["decision"] == "fit" and 0.45 < score["fitted"] < 0.6
    lo, hi = aspect["auc_ci"]
    assert lo < 0.5 < hi and aspect["decision"] == "off"
    assert rules["object nms_iou"]["decision"] == "unmeasured" and rules["object nms_iou"]["n"] == 0

    text = overlay_yaml(cal, "offline", "out/x")
    assert "# fit: precision 0.9 reached; n 120 (60 correct); AUC 1.000 [1.000, 1.000]" in text
    assert "# off: AUC interval includes 0.5" in text
    overlay = yaml.safe_load(text)
    assert overlay["extends"] == "offline"
    rf = overlay["params"]["region_filter"]
    assert rf["max_aspect"] == {"object": None, "text": 40.0}
    assert 0.45 < rf["min_score"]["object"] < 0.6 and rf["min_score"]["text"] == 0.5  # the other kind as it was

    path = tmp_path / "calibrated.yaml"
    path.write_text(text)
    pipe = load_pipeline(None, "quickstart", str(path))
    (spec,) = [s for step in pipe.steps for s in step.stages if s.stage == "region_filter"]
    assert spec.params["max_aspect"]["object"] is None
    assert spec.params["min_score"]["object"] == rf["min_score"]["object"]
    assert spec.params["min_mask_iou"] is None  # the quickstart's own params stay
    assert pipe.models["detector"] == "opencv-ssd:mobilenet_v2_coco"  # the offline profile it extends


def test_labels_ocr_lines_by_quad_and_text_and_groundings_by_named_category():
    human_line = _region(HUMAN, "hl", [20, 20, 120, 50], "OPEN 24 HOURS", kind="text")
    rec = _record(0, [
        _region(HUMAN, "hc", [100, 100, 180, 180], "car"),
        human_line,
        _region(OCR, "o1", [22, 21, 119, 50], "open 24  hours", kind="text", score=0.9,
                quad=[22, 21, 119, 21, 119, 50, 22, 50]),
        _region(OCR, "o2", [22, 21, 119, 50], "OPEN 24 HOURS", kind="text", score=0.5),  # duplicate: wrong
        _region(OCR, "o3", [150, 20, 190, 40], "EXIT", kind="text", score=0.95),
    ], groundings=[
        {"ann_id": "g1", "phrase": "two red cars", "box": [101, 99, 181, 178], "source": DETECTOR, "checks": {}},
        {"ann_id": "g2", "phrase": "a car", "box": [0, 0, 30, 30], "source": DETECTOR, "checks": {}},
        {"ann_id": "g3", "phrase": "the sky", "box": [0, 0, 200, 60], "source": DETECTOR, "checks": {}},
    ])
    got = {i.ann["ann_id"]: i.correct for i in label_record(rec)}
    assert got == {"o1": True, "o2": False, "o3": False, "g1": True, "g2": False}  # g3 names no human category


@pytest.mark.slow
def test_fld_calibrate_on_the_shipped_sample_and_its_overlay_runs(tmp_path):
    """fld samples --human -> fld run (quickstart, offline) -> fld calibrate -> fld run --profile calibrated.yaml."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def fld(*args):
        done = subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    fld("samples", "samples", "--human")
    fld("run", "--pipeline", "quickstart", "--input", "samples/instances.json", "--out", "out/cal", "--profile", "offline")
    figures = json.loads(fld("calibrate", "out/cal", "--out", "calibrated.yaml", "--min-labels", "3",
                             "--bootstrap", "200", "--format", "json"))
    regions = figures["labelled"]["regions"]
    # 5 real SSD objects (all on a human box of their category) and 6 RapidOCR lines (3 match a human line)
    assert regions["n"] >= 11 and 0 < regions["correct"] < regions["n"], regions
    text_score = next(r for r in figures["rules"] if r["rule"] == "text min_score")
    assert text_score["n"] >= 6 and text_score["auc"] is not None
    overlay = yaml.safe_load((tmp_path / "calibrated.yaml").read_text())
    assert overlay["extends"] == "offline" and overlay["params"]
    fld("run", "--pipeline", "quickstart", "--out", "out/cal", "--profile", "calibrated.yaml", "--from", "stage2")
    manifest = json.loads((tmp_path / "out/cal/manifest.json").read_text())
    assert manifest["pipeline"]["profile"] == "calibrated.yaml"
    stats = json.loads(fld("stats", "out/cal", "--format", "json"))
    assert stats["calibration"]["rows"]  # fld stats shows the figures when OUT has human annotations
    assert stats["calibration"]["figures"]["labelled"]["regions"] == regions
    fld("show", "out/cal", "--out", "report.html")
    html = (tmp_path / "report.html").read_text()
    assert "<section id='calibration'>" in html and "region_filter text min_score" in html
    assert "<polyline" in html and re.search(r"current [0-9.e-]+: precision", html)  # curve + current threshold
