"""Stage 3: agreement figures, refine config validation, and one full round end to end on CPU
(the merge policy: test_merge_policy.py)."""
from __future__ import annotations


import pytest
import torch

from helpers import coco_input as _coco_input
from refine.metrics import agreement_sums, coco_map, reduce_agreement, token_f1
from schemas.records import ANNOTATION_KINDS, new_annotation, source_of

OLD = source_of("florence2", "random:tiny")
NEW = source_of("refine", "models/round1")
HUMAN = source_of("human")


def _region(src, i, box, label="dog", score=0.9, round_=0, kind="object"):
    ann = new_annotation(src, score, ann_id=f"{src['annotator']}-r{i}", kind=kind, box=box, quad=None, polygon=None,
                         mask=None, label=label, brief=None)
    ann["round"] = round_
    return ann


def _text(src, i, text, tier="brief", status="kept", round_=0):
    ann = new_annotation(src, None, ann_id=f"{src['annotator']}-t{i}", tier=tier, text=text)
    ann["round"] = round_
    if status == "dropped":
        ann.update(status="dropped", reason="text_filter:too_few_objects")
    return ann


def _flags(ann):
    return sorted(k for k, v in ann["checks"].items() if k in ("merge.new", "merge.kept", "merge.replaced") and v == 1.0)


def test_agreement_figures():
    old = [{"regions": [_region(OLD, 0, [0, 0, 10, 10]), _region(OLD, 1, [20, 20, 30, 30])],
            "texts": [_text(OLD, 0, "a dog on the grass")]}]
    new = [{"regions": [_region(NEW, 0, [0, 0, 10, 11])], "texts": [_text(NEW, 0, "a dog on grass")]}]
    m = reduce_agreement([agreement_sums(old, new)])
    assert m["object_precision@0.5"] == 1.0 and m["object_recall@0.5"] == 0.5
    assert m["object_mean_iou"] == pytest.approx(10 / 11, abs=1e-3)
    # worked by hand: 4 of the new caption's 4 tokens are in the old one's 5: precision 1, recall 4/5, F1 8/9
    assert m["brief_token_f1"] == pytest.approx(8 / 9, abs=1e-4)
    assert token_f1("A dog.", "a DOG") == 1.0
    # precision 2/2, recall 2/5: F1 = 2 * 1 * 0.4 / 1.4 = 4/7, either way round
    assert token_f1("a dog", "a dog on the grass") == pytest.approx(4 / 7)
    assert token_f1("a dog on the grass", "a dog") == pytest.approx(4 / 7)
    assert token_f1("a dog dog", "a dog") == pytest.approx(0.8)  # common counts clip: 2 of 3 and 2 of 2


def test_coco_map_scores_round_k_against_human_boxes():
    gt = _region(HUMAN, 0, [10, 10, 50, 50], score=None)
    hit, miss = _region(NEW, 0, [10, 10, 50, 50], round_=1), _region(NEW, 1, [60, 60, 90, 90], round_=1)
    recs = lambda *regions: [{"width": 100, "height": 100, "regions": list(regions)}]  # noqa: E731
    assert coco_map(recs(_region(OLD, 0, [10, 10, 50, 50])), 1) is None  # no ground truth
    assert coco_map(recs(gt, hit), 1)["map"] == pytest.approx(1.0)
    assert coco_map(recs(gt, miss), 1)["map"] == 0.0
    assert coco_map(recs(gt, hit), 2)["predictions"] == 0  # only round k's regions are predictions


# ---------------------------------------------------------------------- end to end


PIPELINE = """
models:
  florence2: random:tiny
pipelines:
  refine_test:
    ingest: {shard_size: 2}
    steps:
      - name: stage2
        stages:
          - {stage: text_filter}
          - {stage: region_filter}
    rounds: 1
    refine:
      model: florence2
      train_tasks: ["<CAPTION>", "<OD>", "<REGION_PROPOSAL>", "<REGION_TO_DESCRIPTION>"]
      train: {steps: 40, batch_size: 4, lr: 1.0e-3, warmup_steps: 2, checkpoint_every: 20, log_every: 10}
      relabel: {tasks: [caption, od], batch_size: 4, max_new_tokens: 24, num_beams: 1}
"""


def test_refine_config_errors_name_the_yaml_path(tmp_path):
    from engine.config import ConfigError, load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.replace("lr: 1.0e-3", "lrr: 1.0e-3"))
    with pytest.raises(ConfigError, match=r"pipelines\.refine_test\.refine\.train\.lrr"):
        load_pipeline(path, "refine_test")
    path.write_text(PIPELINE.replace("tasks: [caption, od]", "tasks: [caption, oops]"))
    with pytest.raises(ConfigError, match=r"refine\.relabel\.tasks\[1\]: Input should be"):
        load_pipeline(path, "refine_test")


@pytest.mark.slow
def test_one_full_round_end_to_end(photos, tmp_path):
    from engine.config import load_pipeline
    from engine.views.query import run_query
    from engine.run import run_pipeline
    from engine.views.stats import round_metrics, round_metrics_table
    from engine.store import ShardStore
    from schemas.validate import validate_table

    torch.set_num_threads(1)
    src = _coco_input(photos, tmp_path)
    (tmp_path / "pipelines.yaml").write_text(PIPELINE)
    pipeline = load_pipeline(tmp_path / "pipelines.yaml", "refine_test")
    out = tmp_path / "out"
    summary = run_pipeline(pipeline, str(src), str(out))
    store = ShardStore(out)
    assert store.shards("annotations/round1") == ["part-00000", "part-00001"]
    assert (out / "models" / "round1" / "model.safetensors").exists()

    rows = []
    for shard in store.shards("annotations/round1"):
        table = store.read_shard("annotations/round1", shard)
        validate_table(table, name=shard)
        rows += table.to_pylist()
    assert len(rows) == 4
    for rec in rows:
        anns = [a for kind in ANNOTATION_KINDS for a in rec[kind]]
        humans = [a for a in anns if a["source"]["annotator"] == "human"]
        assert humans and all(a["round"] == 0 for a in humans)
        assert all(a["status"] == "kept" for a in humans if a in rec["regions"])
        refined = [a for a in anns if a["source"]["annotator"] == "refine"]
        assert refined and all(a["round"] == 1 for a in refined)  # the new model said something for every image
        for a in anns:
            flags = [k for k, v in dict(a["checks"]).items() if k in ("merge.new", "merge.kept", "merge.replaced") and v == 1]
            assert len(flags) == 1 and (flags == ["merge.new"]) == (a["round"] == 1)
        assert len({a["ann_id"] for a in anns}) == len(anns)
    # the stage-2 filters ran on the new annotations
    assert any(k.startswith("region_filter.") for rec in rows for r in rec["regions"] if r["round"] == 1
               for k in dict(r["checks"]))
    new_texts = [t for rec in rows for t in rec["texts"] if t["round"] == 1]
    assert new_texts and all(any(k.startswith("text_filter.") for k in dict(t["checks"])) for t in new_texts)
    assert all(t["status"] == "kept" for rec in rows for t in rec["texts"] if t["round"] == 0)  # human captions stay

    (m,) = round_metrics(out)
    assert summary.rounds[0]["round"] == 1 and m["round"] == 1
    assert m["train"]["steps"] == 40 and m["train"]["last_loss"] < m["train"]["first_loss"]
    assert set(m["train"]["examples"]) == {"<CAPTION>", "<OD>", "<REGION_PROPOSAL>"}  # no brief region texts
    assert m["relabel"]["images"] == 4 and not m.get("empty")
    assert set(m["train"]["loss_by_task"]) <= {"<CAPTION>", "<OD>", "<REGION_PROPOSAL>"}
    assert m["agreement"]["object_prev"] == 4 and "object_f1@0.5" in m["agreement"]
    # mAP of round 1's predictions against the 4 human boxes: the one the round's own shards give (the
    # metric itself is checked on known boxes in test_coco_map_scores_round_k_against_human_boxes)
    predictions = [r for rec in rows for r in rec["regions"] if r["round"] == 1 and r["kind"] == "object"
                   and (r["label"] or "").strip().lower() == "thing"
                   and (r["status"] == "kept" or (r["reason"] or "").startswith("merge:"))]
    assert m["ground_truth"] == coco_map(rows, 1)
    assert m["ground_truth"]["gt_boxes"] == 4 and m["ground_truth"]["predictions"] == len(predictions) > 0
    assert m["ground_truth"]["map50"] > 0, m["ground_truth"]  # the trained model finds some human boxes
    assert round_metrics_table(store)["rows"][0][0] == 1

    cols, q = run_query(out, "SELECT round, count(*) FROM regions GROUP BY round ORDER BY round", step="round1")
    assert [r[0] for r in q][0] == 0 and q[-1][0] == 1

    # a rerun resumes: nothing is retrained or rewritten
    model_mtime = (out / "models" / "round1" / "model.safetensors").stat().st_mtime
    commits = store.committed("annotations/round1")
    again = run_pipeline(pipeline, None, str(out)).rounds
    assert again[0]["round_hash"] == m["round_hash"]
    assert (out / "models" / "round1" / "model.safetensors").stat().st_mtime == model_mtime
    assert store.committed("annotations/round1") == commits

    # a stale round: another training setting is refused with the way out, never mixed into the round
    from engine.run import StaleOutputError

    (tmp_path / "changed.yaml").write_text(PIPELINE.replace("lr: 1.0e-3,", "lr: 2.0e-3,"))
    with pytest.raises(StaleOutputError, match=r"round 1 .* another configuration; rerun with --force"):
        run_pipeline(load_pipeline(tmp_path / "changed.yaml", "refine_test"), None, str(out))
    assert store.committed("annotations/round1") == commits
    # a changed execution setting (relabel's batch size is not part of the identity) is not stale: resumed
    (tmp_path / "batch.yaml").write_text(PIPELINE.replace("batch_size: 4, max_new_tokens", "batch_size: 2, max_new_tokens"))
    resumed = run_pipeline(load_pipeline(tmp_path / "batch.yaml", "refine_test"), None, str(out)).rounds
    assert resumed[0]["round_hash"] == m["round_hash"] and store.committed("annotations/round1") == commits


def test_target_limit_is_set_once(tmp_path):
    from engine.config import ConfigError, load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.replace("lr: 1.0e-3,", "lr: 1.0e-3, max_target_tokens: 64,"))
    with pytest.raises(ConfigError, match=r"refine\.train: .*set refine\.max_target_tokens"):
        load_pipeline(path, "refine_test")
