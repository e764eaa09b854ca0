"""`python -m bench.quality --small`: the whole benchmark at smoke size completes, every metric of
every dataset version is computed on both splits, and every run's OUT stays queryable.
Thresholds are not asserted: at this size the numbers mean nothing."""
from __future__ import annotations

import json

import pytest

from bench.quality.report import BEGIN, END, METRICS
from bench.quality.run import SPLITS, main, out_dir, versions

# Computed whenever the truth has that kind of content (the small world has objects, signs,
# captions and groundings in every split); other metrics may be None when nothing was kept.
ALWAYS = ("box_map", "box_ap50", "obj_recall", "ocr_recall", "ocr_cer", "brief_coverage", "detailed_coverage")
WHEN_STAGE1 = ("obj_precision", "category_accuracy", "mask_iou", "grounding_accuracy", "brief_f1", "detailed_f1",
               "brief_object_precision", "detailed_attribute_recall")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_small_benchmark_end_to_end(tmp_path):
    report = tmp_path / "BENCH.md"
    report.write_text("# Benchmarks\n\nprose stays\n\n" + BEGIN + "\nold numbers\n" + END + "\n\nmore prose\n")
    res = main(["--small", "--work", str(tmp_path / "work"), "--jobs", "1", "--report", str(report)])
    assert not [r for r in res.runs if "error" in r]
    labels = [v[0] for v in versions(res.rounds)]
    assert res.rounds == 2 and len(res.metrics) == 2 * len(labels) * len(SPLITS)
    for row in res.metrics:
        m = row["metrics"]
        assert "error" not in m, row
        assert set(k for k, _ in METRICS) <= set(m), row["version"]
        for key in ALWAYS:
            assert m[key] is not None, (row["version"], row["noise"], row["split"], key)
        if row["folder"] == "stage1":
            for key in WHEN_STAGE1:
                assert m[key] is not None, (row["version"], row["noise"], row["split"], key)
    steps = {(c["noise"], c["arm"], c["split"], c["step"]) for c in res.costs}
    for noise in ("mild", "harsh"):
        for arm in ("full", "nofilter"):
            for split in SPLITS:
                assert {(noise, arm, split, f"round{k}") for k in (1, 2)} <= steps
    assert ("mild", "full", "train", "ocr") in steps and ("harsh", "full", "heldout", "stage2") in steps
    assert set(res.clip["thresholds"]) == {"region", "text"} and res.clip["auc"]["heldout"]["region"]["auc"] is not None

    work = tmp_path / "work"
    saved = json.loads((work / "results.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(res.metrics))
    assert (work / "quality_by_round.svg").read_text().startswith("<?xml")
    text = report.read_text()
    assert "prose stays" in text and "more prose" in text and "old numbers" not in text
    assert "| box mAP |" in text and "quality_by_round.svg" in text

    # every OUT is a normal engine output: fld stats and queries work on its rounds
    from engine.views.query import run_query
    from engine.views.stats import collect_stats

    train, heldout = out_dir(work, "harsh", "full", "train"), out_dir(work, "harsh", "full", "heldout")
    assert collect_stats(heldout, step="round2")  # what `fld stats OUT --step round2` prints
    assert set(json.loads((heldout / "manifest.json").read_text())["rounds"]) == {"1", "2"}
    cols, rows = run_query(heldout, "SELECT annotator, count(*) FROM regions GROUP BY ALL ORDER BY 1", step="stage1")
    assert {r[0] for r in rows} == {"ocr", "sim_detector"}
    # the held-out split trained nothing: its rounds used the train split's models
    for k in (1, 2):
        a = json.loads((train / "models" / f"round{k}" / "train_summary.json").read_text())
        b = json.loads((heldout / "models" / f"round{k}" / "train_summary.json").read_text())
        assert a == b and not (heldout / "models" / f"round{k}" / "checkpoints").exists()
    # the runs shared their first steps by copying committed shards; the engine accepted them as resumed
    manifest = json.loads((out_dir(work, "harsh", "nofilter", "train") / "manifest.json").read_text())
    assert manifest["pipeline"]["name"] == "nofilter_harsh" and "annotations/stage1" in manifest["shards"]
