"""The benchmark's controls and intervals on hand-made data (bench/quality/controls.py): the oracle
drops exactly the wrong annotations, the random drop keeps the filters' count per type, the fate
table counts right and wrong per drop reason, the hierarchical bootstrap's interval, the clip
switch and the --small banner."""
from __future__ import annotations

import numpy as np
import pytest

from bench.quality import controls
from bench.quality.run import clip_switch


TRUTH = {"a.png": {"width": 100, "height": 100, "texts": [], "relations": [],
                   "captions": {"brief": "a red ball.", "detailed": "a red ball."},
                   "objects": [{"category": "ball", "colour": "red", "box": [10, 10, 40, 40], "brief": "red ball"},
                               {"category": "box", "colour": "blue", "box": [60, 60, 90, 90], "brief": "blue box"}]}}


def _region(ann_id, box, label, status="kept", reason=None):
    return {"ann_id": ann_id, "kind": "object", "box": box, "label": label, "score": 0.5, "checks": {},
            "status": status, "reason": reason, "source": {"annotator": "sim_detector"}}


def _records():
    regions = [_region("r1", [10, 10, 40, 40], "ball"),                         # right
               _region("r2", [11, 10, 40, 41], "ball", "dropped", "region_filter:nms"),  # duplicate: wrong
               _region("r3", [60, 60, 90, 90], "ball", "dropped", "clip_score:region"),  # wrong category
               _region("r4", [60, 61, 90, 90], "box", "dropped", "clip_score:region"),  # right, dropped
               _region("r5", [0, 70, 20, 95], "box")]                            # matches nothing: wrong
    texts = [{"ann_id": "t1", "tier": "brief", "text": "a red ball.", "status": "kept", "reason": None, "source": {"annotator": "c"}},
             {"ann_id": "t2", "tier": "brief", "text": "a green cone.", "status": "kept", "reason": None, "source": {"annotator": "c"}}]
    return [{"uri": "/x/a.png", "regions": regions, "texts": texts, "groundings": []}]


def test_labels_oracle_and_fate():
    recs = _records()
    correct = controls.label_records(recs, TRUTH)
    assert correct == {"r1": True, "r2": False, "r3": False, "r4": True, "r5": False, "t1": True, "t2": False}
    oracle = controls.oracle_version(recs, correct)
    kept = {a["ann_id"] for r in oracle for lst in ("regions", "texts") for a in r[lst] if a["status"] == "kept"}
    assert kept == {"r1", "r4", "t1"}  # exactly the right ones, whatever the filters did
    assert recs[0]["regions"][1]["status"] == "dropped"  # the input is not changed
    fate = controls.fate_rows(recs, correct)
    assert fate[("object", "kept")] == [1, 1]
    assert fate[("object", "region_filter:nms")] == [0, 1]
    assert fate[("object", "clip_score:region")] == [1, 1]
    assert fate[("brief", "kept")] == [1, 1]


def test_random_drop_keeps_the_same_count_per_type():
    recs = _records()
    stage1 = controls.all_kept(recs)
    assert controls.keep_counts(stage1)["object"] == (5, 5)
    for seed in range(5):
        rand = controls.random_version(stage1, recs, seed)
        assert controls.keep_counts(rand)["object"] == controls.keep_counts(recs)["object"] == (2, 5)
        assert controls.keep_counts(rand)["brief"] == (2, 2)
    picks = {frozenset(a["ann_id"] for a in controls.random_version(stage1, recs, s)[0]["regions"] if a["status"] == "kept")
             for s in range(20)}
    assert len(picks) > 1  # random, not always the same subset


def test_image_counts_and_bootstrap_interval():
    counts = controls.image_counts(_records(), TRUTH)
    col = {k: i for i, k in enumerate(controls.KEYS)}
    assert counts.shape == (1, len(controls.KEYS))
    assert counts[0, col["obj_kept"]] == 2 and counts[0, col["obj_tp"]] == 1 and counts[0, col["obj_true"]] == 2
    # two runs of 50 images: precision 0.8 and 0.6 exactly in every image -> mean 0.7, interval spans the runs
    def run(p):
        m = np.zeros((50, len(controls.KEYS)))
        m[:, col["obj_kept"]], m[:, col["obj_tp"]], m[:, col["obj_true"]] = 10, 10 * p, 10 * p  # recall 1
        return m
    out = controls.bootstrap([run(0.8), run(0.6)], resamples=400)
    assert out["obj_precision"]["mean"] == pytest.approx(0.7)
    lo, hi = out["obj_precision"]["ci"]
    assert lo == pytest.approx(0.6) and hi == pytest.approx(0.8)  # only the runs vary: resampling runs gives 0.6..0.8
    assert out["obj_f1"]["mean"] == pytest.approx(np.mean([2 * p / (p + 1) for p in (0.8, 0.6)]))
    same = controls.bootstrap([run(0.7)], resamples=200)["obj_precision"]
    assert same["ci"] == pytest.approx([0.7, 0.7])
    noisy = np.zeros((40, len(controls.KEYS)))
    noisy[:, col["obj_kept"]] = 1
    noisy[:20, col["obj_tp"]] = 1
    ci = controls.bootstrap([noisy], resamples=500)["obj_precision"]["ci"]
    assert 0.3 < ci[0] < 0.5 < ci[1] < 0.7  # image-level spread of a 20/40 precision


def test_clip_switch_uses_the_lowest_pair_type():
    sw = clip_switch({"region": {"auc": 0.84}, "ocr": {"auc": 0.74}, "caption": {"auc": 0.57}}, 0.65)
    assert sw["region"]["on"] and not sw["text"]["on"] and sw["text"]["auc"] == 0.57
    assert not clip_switch({"region": {"auc": 0.84}, "ocr": {"auc": 0.6}, "caption": {"auc": 0.9}}, 0.65)["region"]["on"]
