"""`python -m bench.quality.stage3 --small`: the stage-3 benchmark's structure on a smoke-size world
(pretraining cached, rounds ran from the pretrained model, held-out OUTs only relabel, every table
cell with its interval, every round's health recorded). The numbers mean nothing at this size."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.quality.stage3 import HEADLINE, SIZES, TruthLabels, arm_outs, main, model_view, pooled, pretrain, score


def test_truth_labels_score_perfectly(tmp_path):
    """The clean-label arm's stage writes the truth: the benchmark's metrics give it 1.0."""
    from bench.quality.world import WorldConfig, load_truth, world_records, write_world

    write_world(tmp_path / "world", WorldConfig(n_train=3, n_heldout=0, sign_prob=1.0))
    stage = TruthLabels({"world": str(tmp_path / "world")})
    stage.setup()
    records = [stage.process_batch([r], None)[0] for r in world_records(tmp_path / "world", "train")]
    m, per_image = score(records, load_truth(tmp_path / "world", ["train"]), resamples=20)
    assert len(per_image) == 3 and pooled(per_image + per_image, 20)["obj_recall"] == pytest.approx(1.0)
    for key in ("obj_precision", "obj_recall", "category_accuracy", "ocr_precision", "ocr_recall", "grounding_accuracy",
                "brief_object_precision", "detailed_object_precision", "brief_coverage", "detailed_coverage"):
        assert m[key] == pytest.approx(1.0), key
    assert m["obj_recall_ci"] == [1.0, 1.0]


def test_model_view_keeps_only_the_rounds_own_annotations():
    refine = {"annotator": "refine"}
    rec = {"uri": "x.png", "texts": [{"round": 1, "source": refine, "status": "dropped", "tier": "brief", "text": "a"},
                                     {"round": 0, "source": {"annotator": "sim_captioner"}, "status": "kept"}],
           "regions": [{"round": 2, "source": refine, "status": "kept"}, {"round": 1, "source": refine, "status": "dropped"}],
           "groundings": []}
    (one,) = model_view([rec], 1)
    assert [t["text"] for t in one["texts"]] == ["a"] and one["texts"][0]["status"] == "kept"
    assert len(one["regions"]) == 1 and one["regions"][0]["round"] == 1
    assert rec["texts"][0]["status"] == "dropped"  # the input is not changed


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_small_stage3_end_to_end(tmp_path):
    work = tmp_path / "work"
    res = main(["--small", "--work", str(work)])
    size = SIZES["small"]
    assert res.rounds == 2
    arms = {(r["arm"], r["round"], r["view"]) for r in res.rows}
    assert ("stage 2", 0, "dataset") in arms
    for arm, rounds in (("rounds", 2), ("clean", 2), ("pretrained", 1)):
        for k in range(1, rounds + 1):
            assert {(arm, k, "dataset"), (arm, k, "model")} <= arms
    for row in res.rows:  # every headline figure the truth allows has its bootstrap interval
        m = row["metrics"]
        assert m["images"] == 3
        for key in ("obj_recall", "brief_coverage", "detailed_coverage", "ocr_recall"):
            lo, hi = m[f"{key}_ci"]
            assert 0.0 <= lo <= hi <= 1.0, (row["arm"], row["view"], key)

    outs = arm_outs(work / "stage3", Path(res.pretrain["model"]).name)
    for arm in ("rounds", "clean"):
        manifest = json.loads((outs[arm]["train"] / "manifest.json").read_text())
        assert set(manifest["rounds"]) == {"1", "2"}, arm
        for k in (1, 2):  # the held-out OUT relabelled with the train OUT's models and never trained
            held = outs[arm]["heldout"] / "models" / f"round{k}"
            assert (held / "train_summary.json").exists() and not (held / "checkpoints").exists()
            assert (outs[arm]["heldout"] / "annotations" / f"round{k}" / "_committed").is_dir()
    assert (outs["clean"]["train"] / "annotations" / "truth" / "_committed").is_dir()
    # rounds start from the pretrained model: round 1's training was a fine-tuning at the size's LR
    summary = json.loads((outs["rounds"]["train"] / "models" / "round1" / "train_summary.json").read_text())
    assert summary["lr"] == size.train["lr"]
    health = {(h["arm"], h["round"]): h["health"] for h in res.health}
    assert set(health) == {("rounds", 1), ("rounds", 2), ("clean", 1), ("clean", 2), ("pretrained", 1)}
    for h in health.values():
        assert "ok" in h and "failed" in h and h["images"] >= 2

    # pretraining: the engine's trainer ran the size's steps, health-checked, cached by hash
    assert res.pretrain["summary"]["steps"] == size.pretrain["steps"] and "tasks" in res.pretrain["health"]
    import yaml

    cfg = yaml.safe_load((work / "stage3" / f"stage3-pretrain{size.pretrain_images}.yaml").read_text())
    said = []
    folder, _ = pretrain(work / "stage3" / f"pretrain_{size.pretrain_images}", cfg, size, res.pretrain["world"], said.append)
    assert str(folder) == res.pretrain["model"] and said and "cached" in said[0]

    md = (work / "stage3" / "stage3.md").read_text()
    assert md.startswith("> **Smoke test")
    assert all(label in md for _, label in HEADLINE) and " [" in md and "| pretrained model | 1 |" in md
    assert set(res.cpu_seconds) >= {"pretrain", "rounds", "clean", "pretrained", "total"}


def test_world_seeds_are_pooled_image_by_image(tmp_path):
    """combine: each headline figure of several worlds is their images' counts summed, with one interval over
    all images; the tables show the pooled rows and each world's own figures."""
    from bench.quality.stage3 import Stage3Result, combine, tables

    def world(seed, recall_hits):  # 2 images, 2 true objects each
        tallies = [{"obj_tp": h, "obj_kept": h, "obj_true": 2} for h in recall_hits]
        m = {**pooled(tallies, 10), "box_map": 0.5}
        return Stage3Result("default", "mild", 1, world_seed=seed, cpu_seconds={"total": 1.0}, seconds={"total": 2.0},
                            rows=[{"arm": "stage 2", "round": 0, "view": "dataset", "metrics": m, "tallies": tallies}])

    res = combine([world(0, [2, 2]), world(1, [0, 0])], 50)
    (row,) = res.rows
    assert row["metrics"]["images"] == 4 and row["metrics"]["obj_recall"] == pytest.approx(0.5)
    lo, hi = row["metrics"]["obj_recall_ci"]
    assert lo < 0.5 < hi
    assert res.cpu_seconds == {"w0 total": 1.0, "w1 total": 1.0}
    md = tables(res)
    assert "world seeds 0, 1 pooled" in md
    assert "| 0 | stage 2 (no round) | 0 |" in md and "| 1 | stage 2 (no round) | 0 |" in md
