"""Run segments on Ray: the steps between two barriers as ONE streaming execution. Models load once per
actor, images are decoded once per run, each step's shards are committed with the records a
step-by-step run writes, and a run killed between two steps of a segment resumes exactly."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from engine import registry
from engine.config import load_pipeline
from engine.run import run_pipeline, segments
from engine.stage import Resources, Stage, StageParams
from engine.store import ShardStore
from helpers import kill_run
from schemas.records import make_ann_id, new_annotation, source_of

# where the stages count model builds and image decodes (child processes inherit it)
COUNT_DIR = os.environ.setdefault("FLD_TEST_COUNT_DIR", os.path.join(tempfile.gettempdir(), f"fld-segments-{os.getpid()}"))


class MeanParams(StageParams):
    tag: str = "a"


class MeanModel(Stage):
    """A "model" stage (an actor pool on Ray) that needs pixels; counts its model builds in COUNT_DIR."""

    name = "mean_model"
    Params = MeanParams
    default_resources = Resources(cpus=0.5, batch_size=2, concurrency=1)
    needs_images = True
    uses_model = True

    def setup(self) -> None:
        with open(os.path.join(COUNT_DIR, f"builds-{self.params.tag}"), "a") as f:
            f.write(f"{os.getpid()}\n")

    def process_batch(self, records, images):
        for rec, image in zip(records, images):
            if image is None:  # could not be decoded: the error is on the record already
                continue
            value = float(np.asarray(image.convert("L"), dtype=np.float32).mean())
            rec["texts"].append(new_annotation(source_of(self.name), ann_id=make_ann_id(rec["image_id"], self.params.tag, "text", 0),
                                               tier="brief", text=f"{self.params.tag} {value:.2f}"))
        return records


class CountTexts(Stage):
    """A CPU-only stage without images (a Ray task): checks each text it sees."""

    name = "count_texts"
    Params = StageParams
    default_resources = Resources(cpus=0.5, batch_size=3)
    uses_model = False

    def process_batch(self, records, images):
        for rec in records:
            for ann in rec["texts"]:
                ann["checks"]["count_texts.n"] = float(len(rec["texts"]))
        return records


PIPELINES = """
pipelines:
  three:
    ingest: {shard_size: 2}
    steps:
      - {name: s1, stages: [{stage: mean_model, params: {tag: a}}]}
      - {name: s2, stages: [{stage: count_texts}]}
      - {name: s3, stages: [{stage: mean_model, params: {tag: b}}]}
  apart:
    ingest: {shard_size: 2}
    steps:
      - {name: s1, stages: [{stage: mean_model, params: {tag: a}}]}
      - {name: s2, stages: [{stage: count_texts}], barrier: true}
      - {name: s3, stages: [{stage: mean_model, params: {tag: b}}]}
"""


def _count_decodes() -> None:
    """Ray worker set-up hook: every image decode of this worker leaves a line in COUNT_DIR."""
    import engine.stage

    real = engine.stage.decode_pixels

    def counted(data, *args, **kwargs):
        with open(os.path.join(COUNT_DIR, "decodes"), "a") as f:
            f.write("1\n")
        return real(data, *args, **kwargs)

    engine.stage.decode_pixels = counted


@pytest.fixture(scope="module", autouse=True)
def stages_registered():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    registry.STAGES["mean_model"] = f"{__name__}:MeanModel"
    registry.STAGES["count_texts"] = f"{__name__}:CountTexts"
    yield
    registry.STAGES.pop("mean_model", None)
    registry.STAGES.pop("count_texts", None)


@pytest.fixture
def counts():
    shutil.rmtree(COUNT_DIR, ignore_errors=True)
    os.makedirs(COUNT_DIR)
    yield lambda name: len(open(os.path.join(COUNT_DIR, name)).read().split()) if os.path.exists(os.path.join(COUNT_DIR, name)) else 0
    shutil.rmtree(COUNT_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photos):
    src = tmp_path_factory.mktemp("seg_in")
    for name in ["coffee", "rocket", "chelsea", "astronaut", "jpeg_0"]:
        (src / (f"{name}.png" if photos[name][:4] == b"\x89PNG" else f"{name}.jpg")).write_bytes(photos[name])
    # a complete PNG whose pixels are garbage: ingested (verify: header), every step that decodes it records
    # the failure; the chain must record it as often as a step-by-step run does
    data = bytearray(photos["camera"])
    idat = data.find(b"IDAT")
    data[idat + 100: idat + 600] = bytes(range(250)) * 2
    (src / "zz_bad.png").write_bytes(bytes(data))
    cfg = tmp_path_factory.mktemp("seg_cfg") / "pipelines.yaml"
    cfg.write_text(PIPELINES)
    return src, cfg


def _rows(out, folder):
    store = ShardStore(out)
    return {s: store.read_shard(folder, s).to_pylist() for s in store.shards(folder)}


def test_segments_split_at_barriers(inputs):
    from engine.runners.local import LocalRunner
    from engine.runners.ray_runner import RayRunner

    _, cfg = inputs
    assert segments(load_pipeline(cfg, "three"), RayRunner()) == [[0, 1, 2]]
    assert segments(load_pipeline(cfg, "apart"), RayRunner()) == [[0], [1], [2]]
    assert segments(load_pipeline(cfg, "three"), LocalRunner()) == [[0], [1], [2]]  # no chain: step by step
    from engine.runners.beam_runner import BeamRunner

    assert segments(load_pipeline(cfg, "three"), BeamRunner()) == [[0, 1, 2]]  # one pipeline
    assert segments(load_pipeline(cfg, "apart"), BeamRunner()) == [[0], [1], [2]]


def test_check_pools_fit_names_the_pools_and_the_way_out():
    from engine.runners.ray_runner import check_pools_fit

    check_pools_fit([("ocr", 0.5, 2, 0.0), ("florence2", 1.0, 1, 0.5)], 1.0)
    with pytest.raises(ValueError, match=r"need 3 GPUs \(florence2 2x1, sam 1x1\) and the cluster has 2: .*barrier: true"):
        check_pools_fit([("florence2", 1.0, 2, 1.0), ("ocr", 0.5, 1, 0.0), ("sam", 1.0, 1, 1.0)], 2.0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_steps_run_as_one_execution_models_built_once_images_decoded_once(inputs, counts, tmp_path):
    import ray

    src, cfg = inputs
    local = tmp_path / "local"
    run_pipeline(load_pipeline(cfg, "three"), str(src), str(local))
    assert counts("decodes") == 0 and counts("builds-a") == 1  # (the decode hook counts Ray workers only)
    os.unlink(os.path.join(COUNT_DIR, "builds-a"))
    os.unlink(os.path.join(COUNT_DIR, "builds-b"))
    temp = tempfile.mkdtemp(prefix="fldseg", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _count_decodes})
    try:
        out = tmp_path / "ray"
        summary = run_pipeline(load_pipeline(cfg, "three"), str(src), str(out), runner="ray")
        chained = {"builds": (counts("builds-a"), counts("builds-b")), "decodes": counts("decodes")}
        apart = tmp_path / "apart"
        for name in ("builds-a", "builds-b", "decodes"):
            if os.path.exists(os.path.join(COUNT_DIR, name)):
                os.unlink(os.path.join(COUNT_DIR, name))
        run_pipeline(load_pipeline(cfg, "apart"), str(src), str(apart), runner="ray")
        barrier = {"builds": (counts("builds-a"), counts("builds-b")), "decodes": counts("decodes")}
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    images = sum(len(v) for v in _rows(local, "images").values())
    assert images == 6
    bad = [r for rows in _rows(local, "annotations/s3").values() for r in rows if r["uri"].endswith("zz_bad.png")]
    assert [e["stage"] for e in bad[0]["errors"]] == ["decode", "decode"]  # s1 and s3 decode it, step by step
    # one pool per model stage, each model built once; every image decoded once for the whole run (the
    # undecodable one again where s3 needs it, to record its error as a step-by-step run does)
    assert chained == {"builds": (1, 1), "decodes": images + 1}, chained
    assert barrier == {"builds": (1, 1), "decodes": 2 * images}, barrier  # step by step: s1 and s3 each decode
    for folder in ("annotations/s1", "annotations/s2", "annotations/s3"):
        assert _rows(out, folder) == _rows(local, folder) == _rows(apart, folder), folder
        recs = ShardStore(out).committed(folder)
        assert {r["runner"] for r in recs.values()} == {"ray"} and len(recs) == 3, recs
    # each step's commit record names the input it was made from, as a step-by-step run's does
    store = ShardStore(out)
    for prev, folder in (("annotations/s1", "annotations/s2"), ("annotations/s2", "annotations/s3")):
        made_from = {s: r["input_sha256"] for s, r in store.committed(folder).items()}
        assert made_from == {s: r["sha256"] for s, r in store.committed(prev).items()}
    assert summary.steps["s3"]["shards_run"] == 3 and summary.steps["s3"]["counters"]["mean_model"]["records_in"] == 6
    stats = (out / "logs" / "s1+s2+s3.ray-stats.txt").read_text()
    assert stats.count("MeanModelActor") >= 2 and stats.count("commit_segment_step") >= 3, stats


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fused_segment_runs_every_step_in_one_task_models_built_once_per_process(inputs, counts, tmp_path):
    """fuse: always (what auto picks where the pools do not fit side by side): the segment's stages and
    commits run in one task per shard; each model loads once per worker process, images decode once,
    and the shards and records are the step-by-step ones."""
    import ray

    src, cfg = inputs
    local = tmp_path / "local"
    run_pipeline(load_pipeline(cfg, "three"), str(src), str(local))
    for name in ("builds-a", "builds-b"):
        os.unlink(os.path.join(COUNT_DIR, name))
    temp = tempfile.mkdtemp(prefix="fldfuse", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _count_decodes})
    try:
        out = tmp_path / "ray"
        run_pipeline(load_pipeline(cfg, "three"), str(src), str(out), runner="ray", runner_options={"fuse": "always"})
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    pids = {tag: open(os.path.join(COUNT_DIR, f"builds-{tag}")).read().split() for tag in "ab"}
    assert all(pids[tag] and len(set(pids[tag])) == len(pids[tag]) for tag in "ab"), pids  # once per process
    assert counts("decodes") == 6 + 1  # once per image, the undecodable one again in s3 (as step by step)
    for folder in ("annotations/s1", "annotations/s2", "annotations/s3"):
        assert _rows(out, folder) == _rows(local, folder), folder
    store = ShardStore(out)
    for prev, folder in (("annotations/s1", "annotations/s2"), ("annotations/s2", "annotations/s3")):
        made_from = {s: r["input_sha256"] for s, r in store.committed(folder).items()}
        assert made_from == {s: r["sha256"] for s, r in store.committed(prev).items()}
    stats = (out / "logs" / "s1+s2+s3.ray-stats.txt").read_text()
    assert "MapBatches(FusedMeanModelCountTextsMeanModel)" in stats and "Actor" not in stats, stats


def _fld(cfg, src, out, log, temp, runner):
    """`fld run --runner RUNNER` in a child process that registers this module's stages first
    ("ray-fused": Ray with --ray-fuse always)."""
    runner, _, fused = runner.partition("-")
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; import test_segments as t; from engine import registry; "
            "import ray.cloudpickle; ray.cloudpickle.register_pickle_by_value(t); "
            "registry.STAGES.update(mean_model='test_segments:MeanModel', count_texts='test_segments:CountTexts'); "
            "from engine.cli import app; sys.argv = ['fld'] + sys.argv[2:]; app()")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", FLD_RAY_TEMP_DIR=temp,
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), "run", str(cfg), "-p", "three",
           "-i", str(src), "-o", str(out), "--runner", runner] + (["--ray-fuse", "always"] if fused else [])
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("runner", ["ray", "ray-fused", "beam"])
def test_killed_between_two_steps_of_a_segment_resumes_exactly(inputs, counts, tmp_path, runner):
    """SIGKILL once step s1 committed a shard, then also the state of a kill right after a shard's s1
    commit (its s2 and s3 not yet written); the rerun gives the shards of an uninterrupted run and
    leaves what was committed before the kill as it was."""
    src, cfg = inputs
    reference = tmp_path / "reference"
    run_pipeline(load_pipeline(cfg, "three"), str(src), str(reference))
    out = tmp_path / "out"
    committed = out / "annotations" / "s1" / "_committed"
    temp = tempfile.mkdtemp(prefix="fldseg", dir="/tmp")
    try:
        with open(tmp_path / "1.log", "w") as log:
            proc = _fld(cfg, src, out, log, temp, runner)
            deadline = time.monotonic() + 300
            try:
                while not (committed.is_dir() and any(committed.glob("*.json"))):
                    assert proc.poll() is None, (tmp_path / "1.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, "no s1 commit within 300 s"
                    time.sleep(0.02)
            finally:
                kill_run(proc)
        store = ShardStore(out)
        s1 = store.committed("annotations/s1")
        assert 1 <= len(s1) <= 3
        # the exact moment between two steps of the segment, for one shard: s1 committed, s2 and s3 not
        first = sorted(s1)[0]
        store.uncommit("annotations/s2", [first])
        store.uncommit("annotations/s3", [first])
        before = {f: store.committed(f) for f in ("annotations/s1", "annotations/s2", "annotations/s3")}
        with open(tmp_path / "2.log", "w") as log:
            proc = _fld(cfg, src, out, log, temp, runner)
            assert proc.wait(timeout=600) == 0, (tmp_path / "2.log").read_text()[-3000:]
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    store = ShardStore(out)
    for folder in ("annotations/s1", "annotations/s2", "annotations/s3"):
        assert _rows(out, folder) == _rows(reference, folder), folder
        after = store.committed(folder)
        for shard, rec in before[folder].items():  # committed before the kill: not redone
            assert after[shard]["committed_at"] == rec["committed_at"] and after[shard]["sha256"] == rec["sha256"]
    assert store.committed("annotations/s2")[first]["input_sha256"] == store.committed("annotations/s1")[first]["sha256"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counters"]["s3"]["mean_model"]["records_in"] == 6


@pytest.mark.timeout(600)
def test_beam_runs_a_segment_as_one_pipeline_with_the_step_by_step_records(inputs, counts, tmp_path, monkeypatch):
    """Beam: the three steps in ONE pipeline (not one per step); each step's shards and commit records
    are the local runner's, each record names the input the previous step just committed; images
    decoded once for the segment (the undecodable one again where s3 needs it)."""
    import engine.stage
    from engine.runners.beam_runner import BeamRunner

    src, cfg = inputs
    local = tmp_path / "local"
    run_pipeline(load_pipeline(cfg, "three"), str(src), str(local))
    pipelines, decodes, real_pipeline, real_decode = [], [], BeamRunner._pipeline, engine.stage.decode_pixels
    monkeypatch.setattr(BeamRunner, "_pipeline", lambda self: pipelines.append(1) or real_pipeline(self))
    monkeypatch.setattr(engine.stage, "decode_pixels", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    out = tmp_path / "beam"
    summary = run_pipeline(load_pipeline(cfg, "three"), str(src), str(out), runner="beam")
    assert len(pipelines) == 1 + 1  # the ingest tasks, then one pipeline for s1+s2+s3
    assert len(decodes) == 6 + 1, len(decodes)
    metrics = json.loads((out / "manifest.json").read_text())["engine_metrics"]  # Beam's, per step of the segment
    assert {step: (m["segment"], m["write"]) for step, m in metrics.items()} == {
        s: ("s1+s2+s3", {"shards": 3, "records": 6}) for s in ("s1", "s2", "s3")}
    assert metrics["s1"]["mean_model"]["records"] == 6 and "count_texts" not in metrics["s1"]
    store = ShardStore(out)
    for folder in ("annotations/s1", "annotations/s2", "annotations/s3"):
        assert _rows(out, folder) == _rows(local, folder), folder
        assert {r["runner"] for r in store.committed(folder).values()} == {"beam"}
    for prev, folder in (("annotations/s1", "annotations/s2"), ("annotations/s2", "annotations/s3")):
        made_from = {s: r["input_sha256"] for s, r in store.committed(folder).items()}
        assert made_from == {s: r["sha256"] for s, r in store.committed(prev).items()}
    assert summary.steps["s3"]["shards_run"] == 3 and summary.steps["s3"]["counters"]["mean_model"]["records_in"] == 6
    # resumed from the middle of the segment: s2 and s3 of one shard lost -> only those redone
    first = sorted(store.committed("annotations/s1"))[0]
    before = {f: store.committed(f) for f in ("annotations/s1", "annotations/s2", "annotations/s3")}
    store.uncommit("annotations/s2", [first])
    store.uncommit("annotations/s3", [first])
    run_pipeline(load_pipeline(cfg, "three"), str(src), str(out), runner="beam")
    for folder in ("annotations/s1", "annotations/s2", "annotations/s3"):
        assert _rows(out, folder) == _rows(local, folder), folder
        after = store.committed(folder)
        for shard, rec in before[folder].items():
            if shard != first or folder == "annotations/s1":
                assert after[shard]["committed_at"] == rec["committed_at"], (folder, shard)
            else:
                assert after[shard]["input_sha256"] == store.committed("annotations/s1" if folder.endswith("s2") else "annotations/s2")[shard]["sha256"]
