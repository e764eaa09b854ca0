"""Rounds build on each other: round k+1 starts from round k's weights and trains on round k's
merged labels, so two rounds whose models differ give different round datasets, seen with SQL.

Input: real photos + a COCO file with one human box and caption each; model: the tiny random
Florence-2 trained a few steps per round (what it says does not matter; that round 2 says
something else than round 1, with its own confidence, does).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict

import pytest
import torch

from engine import identity
from engine.config import load_pipeline
from engine.views.query import run_query
from engine.run import run_pipeline
from engine.store import ShardStore
from helpers import coco_input as _coco_input

PIPELINE = """
models:
  florence2: random:tiny
pipelines:
  two_rounds:
    ingest: {shard_size: 4}
    steps:
      - name: filtered
        stages:
          - {stage: text_filter}
          - {stage: region_filter, params: {min_score: {object: null, text: null}}}
    rounds: 2
    refine:
      model: florence2
      round_start: START
      train_tasks: ["<CAPTION>", "<OD>"]
      train: {steps: 30, batch_size: 4, lr: 3.0e-4, warmup_steps: 3, checkpoint_every: 30, log_every: 5}
      relabel: {tasks: [caption, od], batch_size: 4, max_new_tokens: 20, num_beams: 1}
      # 30 steps from random weights: the health check (tests/test_learning.py) would refuse both rounds; this
      # test is about what the merge makes of two different models, so it is off here
      health: {min_distinct: null, max_same_across_tasks: null, min_parse_rate: null}
"""


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rounds_start_where_round_start_says(tmp_path):
    """The plan: round 2 starts from round 1's folder (read from the store) or from refine.model again."""
    from engine.registry import rounds_plan

    for start, expected in (("previous", ("models/round1", {"round": "h1"}, True)),
                            ("init", ("random:tiny", {"ref": "random:tiny"}, False))):
        path = tmp_path / f"{start}.yaml"
        path.write_text(PIPELINE.replace("START", start))
        plan = rounds_plan(load_pipeline(path, "two_rounds"))
        assert plan.next_start("models/round1", "h1", plan.start_model(), {"ref": "random:tiny"}) == expected
        ref, _, in_store = expected
        (job,) = plan.train_jobs(2, start_ref=ref, start_store=ShardStore(tmp_path / "out") if in_store else None,
                                 input_folder="annotations/round1", model_folder="models/round2", config_hash="h2",
                                 data_hash="d")
        assert job.params["start"] == ref and (job.params["start_store"] is not None) == in_store
        assert (job.model_folder, job.config_hash, job.meta) == ("models/round2", "h2", {"data_hash": "d"})


@pytest.mark.slow
def test_two_rounds_with_different_models_give_different_round_datasets(photos, tmp_path):
    torch.set_num_threads(1)
    src = _coco_input(photos, tmp_path)
    (tmp_path / "pipelines.yaml").write_text(PIPELINE.replace("START", "previous"))
    out = tmp_path / "out"
    summary = run_pipeline(load_pipeline(tmp_path / "pipelines.yaml", "two_rounds"), str(src), str(out))
    assert [r["round"] for r in summary.rounds] == [1, 2]
    models = [out / "models" / f"round{k}" / "model.safetensors" for k in (1, 2)]
    assert _digest(models[0]) != _digest(models[1])  # round 2 trained on: the models differ

    # SQL over the finished run: round 2's dataset holds round 1's annotations (round = 1) and round 2's own
    q = "SELECT round, image_id, text, score FROM texts WHERE round > 0 ORDER BY round, image_id"
    _, rows = run_query(out, q, step="round2")
    by_round = {k: [r[1:] for r in rows if r[0] == k] for k in (1, 2)}
    assert by_round[1] and by_round[2]
    assert by_round[1] != by_round[2]  # other captions (or the same words with another confidence)
    assert all(0 < r[3] < 1 for r in rows)  # each with its model's own confidence, never 1.0
    q = "SELECT round, label, box, score, status, reason FROM regions WHERE round > 0 ORDER BY ALL"
    by_round = defaultdict(list)
    for row in run_query(out, q, step="round2")[1]:
        by_round[row[0]].append(row[1:])
    assert by_round[1] != by_round[2] and by_round[1] + by_round[2]
    # round 1's own dataset has no round-2 annotation; round 2's carries every round-1 one, merged
    for table in ("texts", "regions", "groundings"):
        _, r1 = run_query(out, f"SELECT coalesce(max(round), 0), count(*) FROM {table}", step="round1")
        _, carried = run_query(out, f"SELECT count(*) FROM {table} WHERE round <= 1", step="round2")
        assert r1[0][0] <= 1 and carried[0][0] == r1[0][1]
    # round 2 trained on round 1's merged dataset, starting from round 1's weights
    store = ShardStore(out)
    marker = store.read_json("models/round2/round.json")
    assert marker["data_hash"] == identity.digest({s: r["sha256"] for s, r in store.committed("annotations/round1").items()})
    train = [store.read_json(f"models/round{k}/train_summary.json") for k in (1, 2)]
    assert train[1]["first_loss"] < train[0]["first_loss"]  # not random weights again
