"""Stage 3 through the one driver: rounds on every runner, kills during training and relabel, the bar.

Input: real photos + a COCO file with human boxes and captions. Model: the tiny random Florence-2
trained for a few steps (what it says does not matter; that every runner says the same does).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from engine.config import load_pipeline
from engine.views.query import resolve_step, run_query
from engine.run import run_pipeline
from engine.store import ShardStore
from helpers import assert_close as _close
from helpers import coco_input as _coco_input
from helpers import kill_run as _kill

pytestmark = pytest.mark.slow

PIPELINE = """
models:
  florence2: random:tiny
pipelines:
  two_rounds:
    ingest: {shard_size: SHARD}
    steps:
      - name: filtered
        stages:
          - {stage: text_filter}
          - {stage: region_filter}
    rounds: 2
    refine:
      model: florence2
      train_tasks: ["<CAPTION>", "<OD>"]
      train: {steps: STEPS, batch_size: 4, lr: 1.0e-3, warmup_steps: 2, checkpoint_every: 4, log_every: 2, num_workers: WORKERS}
      relabel: {tasks: [caption, od], batch_size: 2, max_new_tokens: 16, num_beams: 1}
      cross_fit: FOLDS
"""


def _pipeline_file(tmp_path, shard=2, steps=8, workers=1, rounds=2, folds="auto"):
    path = tmp_path / f"p_{shard}_{steps}_{workers}_{rounds}_{folds}.yaml"
    text = (PIPELINE.replace("SHARD", str(shard)).replace("STEPS", str(steps)).replace("WORKERS", str(workers))
            .replace("FOLDS", str(folds)))
    path.write_text(text.replace("rounds: 2", f"rounds: {rounds}"))
    return path


def _round_view(out) -> dict:
    store = ShardStore(out)
    return {f: [r for s in store.shards(f) for r in store.read_shard(f, s).to_pylist()]
            for f in ("annotations/round1", "annotations/round2")}


def _metrics(out) -> dict:
    rounds = json.loads((out / "manifest.json").read_text())["rounds"]
    return {k: {key: v[key] for key in ("round_hash", "agreement", "ground_truth", "relabel")}
            | {"loss": (v["train"]["first_loss"], v["train"]["last_loss"])} for k, v in rounds.items()}


@pytest.fixture(scope="module")
def coco(tmp_path_factory, photos):
    return _coco_input(photos, tmp_path_factory.mktemp("coco_in"), both_folds=True)


@pytest.mark.timeout(1500)
def test_two_rounds_write_the_same_shards_and_metrics_on_every_runner(tmp_path, coco):
    """local and Beam in this process; Ray through the CLI, which is also the bar: `fld run --runner ray`
    with rounds: 2 on a COCO input with human boxes finishes, and `fld query OUT "SELECT count(*) FROM
    regions"` without --step reads round 2. (Two Ray Train workers: tests/test_trainer.py.) Cross-fitted
    (2 folds: each round trains two fold models and its own on every runner, relabels each image with its
    fold's model)."""
    cfg = _pipeline_file(tmp_path, folds=2)
    outs = {runner: tmp_path / f"out_{runner}" for runner in ("local", "ray", "beam")}
    for runner in ("local", "beam"):
        summary = run_pipeline(load_pipeline(cfg, "two_rounds"), str(coco), str(outs[runner]), runner=runner)
        assert [r["round"] for r in summary.rounds] == [1, 2]
    with open(tmp_path / "ray.log", "w") as log:
        proc = _fld(cfg, coco, outs["ray"], log, runner="ray")
        assert proc.wait(timeout=1000) == 0, (tmp_path / "ray.log").read_text()[-3000:]
    local = _round_view(outs["local"])
    assert all(len(rows) == 4 for rows in local.values())
    for runner in ("ray", "beam"):
        _close(_round_view(outs[runner]), local, runner)
        _close(_metrics(outs[runner]), _metrics(outs["local"]), f"{runner} metrics")
        store = ShardStore(outs[runner])
        assert {r["runner"] for r in store.committed("annotations/round2").values()} == {runner}
        for k in (1, 2):
            fold_models = [f"models/round{k}-folds/fold{i}" for i in (0, 1)]
            assert all(store.read_json(f"{m}/train_summary.json")["steps"] == 8 for m in fold_models)
            _, made_by = run_query(outs[runner], "SELECT DISTINCT model FROM regions WHERE annotator = 'refine' "
                                   f"AND round = {k} UNION SELECT DISTINCT model FROM texts WHERE annotator = 'refine' "
                                   f"AND round = {k}", f"round{k}")
            assert {m for (m,) in made_by} <= set(fold_models), made_by
    # every reader defaults to the dataset the engine produced: the last complete round
    assert resolve_step(ShardStore(outs["local"]), None) == "annotations/round2"
    out = outs["ray"]
    env = dict(os.environ, COLUMNS="200")
    default = subprocess.run(["fld", "query", str(out), "SELECT count(*) AS n FROM regions", "--format", "json"],
                             capture_output=True, text=True, env=env)
    round2 = subprocess.run(["fld", "query", str(out), "SELECT count(*) AS n FROM regions", "--format", "json",
                             "--step", "round2"], capture_output=True, text=True, env=env)
    stage2 = subprocess.run(["fld", "query", str(out), "SELECT count(*) AS n FROM regions", "--format", "json",
                             "--step", "filtered"], capture_output=True, text=True, env=env)
    assert default.returncode == 0 and default.stdout == round2.stdout, default.stderr
    assert round2.stdout != stage2.stdout  # round 2 holds the relabelled regions too: the default is not stage 2
    assert run_query(out, "SELECT count(*) FROM records")[1] == run_query(out, "SELECT count(*) FROM records", "round2")[1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["rounds"]) == ["1", "2"]
    assert all(json.loads(line)["samples_per_s"] for line in (out / "models/round1/train_log.jsonl").read_text().splitlines())


_RAY_TEMPS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _remove_ray_temps():
    """The CLI runs' Ray session folders (short /tmp paths: Ray's socket paths must stay < 108 bytes)."""
    yield
    for temp in _RAY_TEMPS:
        shutil.rmtree(temp, ignore_errors=True)


def _fld(cfg, src, out, log, runner="local", extra=()):
    _RAY_TEMPS.append(tempfile.mkdtemp(prefix="fldrk", dir="/tmp"))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               FLD_RAY_TEMP_DIR=_RAY_TEMPS[-1])
    cmd = [sys.executable, "-m", "engine.cli", "run", str(cfg), "-p", "two_rounds", "-o", str(out), "--runner", runner,
           *(["-i", str(src)] if src else []), *extra]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _run_until(cfg, src, out, log_path, ready, what: str, timeout: float = 400) -> None:
    with open(log_path, "w") as log:
        proc = _fld(cfg, src, out, log)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                assert proc.poll() is None, f"the run ended before {what}: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no {what} within {timeout} s"
                time.sleep(0.05)
        finally:
            _kill(proc)


@pytest.mark.timeout(1500)
def test_killed_during_training_and_relabel_the_rerun_equals_an_uninterrupted_run(tmp_path, coco):
    """SIGKILL after the first training checkpoint, then again after the first relabelled shard of
    round 1; the final rerun gives the same model and the same round shards as a run never killed."""
    cfg = _pipeline_file(tmp_path, shard=1, steps=12, rounds=1)
    reference = tmp_path / "reference"
    run_pipeline(load_pipeline(cfg, "two_rounds"), str(coco), str(reference))
    out = tmp_path / "killed"
    checkpoints = out / "models" / "round1" / "checkpoints"
    _run_until(cfg, coco, out, tmp_path / "1.log", lambda: checkpoints.is_dir() and any(checkpoints.glob("step-*")),
               "training checkpoint")
    assert not (out / "models" / "round1" / "train_summary.json").exists()  # killed mid-training
    committed = out / "annotations" / "round1" / "_committed"
    _run_until(cfg, None, out, tmp_path / "2.log", lambda: committed.is_dir() and any(committed.glob("*.json")),
               "relabelled shard")
    store = ShardStore(out)
    assert 1 <= len(store.shards("annotations/round1")) < 4, "the second kill should land mid-relabel"
    with open(tmp_path / "3.log", "w") as log:
        proc = _fld(cfg, None, out, log)
        assert proc.wait(timeout=600) == 0, (tmp_path / "3.log").read_text()[-3000:]
    log_steps = [json.loads(x)["step"] for x in (out / "models/round1/train_log.jsonl").read_text().splitlines()]
    assert sorted(set(log_steps)) == list(range(2, 13, 2))
    assert (out / "models/round1/model.safetensors").read_bytes() == (reference / "models/round1/model.safetensors").read_bytes()
    ref = ShardStore(reference)
    assert store.shards("annotations/round1") == ref.shards("annotations/round1")
    for shard in ref.shards("annotations/round1"):
        _close(store.read_shard("annotations/round1", shard).to_pylist(), ref.read_shard("annotations/round1", shard).to_pylist(), shard)
