"""A refinement round on Ray with OUT on an object store (SeaweedFS, tests/seaweed.py): the relabel actors of a
node share one local copy of the round's model (engine/local_cache.py), fetched once per node, and none of
them reads a copy that is incomplete or was written into."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from engine.config import load_pipeline
from engine.run import run_pipeline
from engine.store import ShardStore
from helpers import assert_close, coco_input

pytestmark = pytest.mark.slow

CALLS = os.environ.setdefault("FLD_TEST_CACHE_CALLS", os.path.join(tempfile.gettempdir(), f"fld-cache-calls-{os.getpid()}"))

PIPELINE = """
models:
  florence2: random:tiny
pipelines:
  one_round:
    ingest: {shard_size: 2}
    steps:
      - name: filtered
        stages:
          - {stage: region_filter}
    rounds: 1
    refine:
      model: florence2
      train_tasks: ["<CAPTION>", "<OD>"]
      train: {steps: 4, batch_size: 4, lr: 1.0e-3, warmup_steps: 1, checkpoint_every: 4, log_every: 2, num_workers: 1}
      relabel: {tasks: [caption, od], batch_size: 2, max_new_tokens: 8, num_beams: 1, concurrency: 2}
      cross_fit: 0
"""


def _log_cache_calls() -> None:
    """Ray worker set-up hook: every cached_copy of this worker leaves a line (actor or pid, folder, slot) in CALLS."""
    import ray

    import engine.local_cache

    real = engine.local_cache.cached_copy

    def logged(fs, root, store_url, rel):
        slot = real(fs, root, store_url, rel)
        with open(CALLS, "a") as f:
            f.write(json.dumps([ray.get_runtime_context().get_actor_id() or os.getpid(), rel, str(slot)]) + "\n")
        return slot

    engine.local_cache.cached_copy = logged


def _calls(rel: str) -> list[tuple[str | int, str]]:
    lines = Path(CALLS).read_text().splitlines() if os.path.exists(CALLS) else []
    return [(pid, slot) for pid, r, slot in map(json.loads, lines) if r == rel]


def _slots(cache: Path, rel: str) -> list[Path]:
    """Every slot (copy) of `rel` on this node: one per download; a killed download leaves a .tmp-<pid>."""
    (root,) = [p for p in cache.iterdir() if p.is_dir()]  # one store
    return sorted(p for p in (root / rel).parent.iterdir() if p.is_dir() and p.name.startswith(Path(rel).name + "@"))


def _round(store: ShardStore) -> list[dict]:
    rows = [r for s in store.shards("annotations/round1") for r in store.read_shard("annotations/round1", s).to_pylist()]
    return sorted(rows, key=lambda r: r["image_id"])


@pytest.mark.timeout(300)
def test_round_on_s3_with_two_relabel_actors_fetches_the_model_once_per_node(s3_server, photos, tmp_path, monkeypatch):
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLD_CACHE_DIR", str(cache))  # the workers of the local cluster inherit it
    if os.path.exists(CALLS):
        os.unlink(CALLS)
    src = coco_input(photos, (tmp_path / "coco").mkdir() or tmp_path / "coco")
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(PIPELINE)
    pipeline = load_pipeline(cfg, "one_round")
    local = tmp_path / "local"
    run_pipeline(pipeline, str(src), str(local))
    out = ShardStore(f"s3://fld-test/rounds-{uuid.uuid4().hex[:8]}", s3_server.storage_options)
    temp = tempfile.mkdtemp(prefix="fldrr", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _log_cache_calls})
    try:
        run_pipeline(pipeline, str(src), out, runner="ray", runner_options={"fuse": "never"})
        first = _calls("models/round1")
        assert_close(_round(out), _round(ShardStore(local)), "ray on s3 vs local")
        # the training task's working copy first, then the published model: 2 actors, one copy between them
        work, published = Path(first[0][1]), Path(first[-1][1])
        assert sorted(_slots(cache, "models/round1")) == sorted([work, published]), first
        relabel = first[1:]  # from 2 actors (actor ids; the training task logs its pid)
        assert {slot for _, slot in relabel} == {str(published)} and len({a for a, _ in relabel if isinstance(a, str)}) == 2, first

        # a copy written into after its download (a trainer's working folder, a torn file) and a killed
        # download's leftover: the resumed round's actors must fetch a fresh copy, once, and read only that
        weights = next(published.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        leftover = Path(f"{published}.1.tmp-999999999")
        shutil.copytree(published, leftover)
        out.uncommit("annotations/round1")
        os.unlink(CALLS)
        run_pipeline(pipeline, str(src), out, runner="ray", runner_options={"fuse": "never"})
        second = _calls("models/round1")
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    assert_close(_round(out), _round(ShardStore(local)), "resumed ray round on s3 vs local")
    slots = _slots(cache, "models/round1")
    assert slots == sorted([work, published, Path(f"{published}.1")]), slots  # one more download, not one per actor
    assert {slot for _, slot in second} == {f"{published}.1"} and len({a for a, _ in second if isinstance(a, str)}) == 2, second
    assert not leftover.exists()  # the resumed download cleared the killed one's folder
