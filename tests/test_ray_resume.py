"""Kill `fld run` mid-step (SIGKILL after the first shard commit) and rerun: no loss, no duplicates.

Runs the real CLI in a subprocess with the local, Ray and Beam runners on real photos with real
RapidOCR, one image per shard, and compares the resumed output with an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from engine.config import load_pipeline
from engine.run import run_pipeline
from engine.store import ShardStore

pytestmark = pytest.mark.slow

PIPELINE_YAML = """
pipelines:
  ocr1:
    ingest: {shard_size: 1}
    steps:
      - name: stage1
        stages:
          - {stage: ocr, params: {batch_size: 1, threads: 1}}
"""
FOLDER = "annotations/stage1"


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("resume")
    src = root / "in"
    src.mkdir()
    names = ["coffee", "rocket", "chelsea", "astronaut"] + [n for n in photos if n.startswith("jpeg_")][:2]
    for n in names:
        (src / (f"{n}.png" if photos[n][:4] == b"\x89PNG" else f"{n}.jpg")).write_bytes(photos[n])
    cfg = root / "pipelines.yaml"
    cfg.write_text(PIPELINE_YAML)
    reference = root / "reference"
    run_pipeline(load_pipeline(cfg, "ocr1"), str(src), str(reference), runner="local")
    return src, cfg, reference


@pytest.fixture
def ray_temp():
    """A short Ray session folder (socket paths must stay < 108 chars), removed afterwards."""
    d = tempfile.mkdtemp(prefix="fldrk", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _fld_run(cfg, src, out, runner: str, log, ray_temp: str) -> subprocess.Popen:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", FLD_RAY_TEMP_DIR=ray_temp)
    cmd = [sys.executable, "-m", "engine.cli", "run", str(cfg), "-p", "ocr1", "-i", str(src), "-o", str(out), "--runner", runner]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver (the crash), then whatever it had started in its session (Ray's daemons)."""
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("runner", ["local", "ray", "beam"])
def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, setup_dirs, runner, ray_temp):
    src, cfg, reference = setup_dirs
    out = tmp_path / "out"
    committed = out / FOLDER / "_committed"
    with open(tmp_path / "first.log", "w") as log:
        proc = _fld_run(cfg, src, out, runner, log, ray_temp)
        deadline = time.monotonic() + 240
        try:
            while not (committed.is_dir() and any(committed.glob("*.json"))):
                assert proc.poll() is None, f"run ended before any commit: {(tmp_path / 'first.log').read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no shard commit within 240 s"
                time.sleep(0.02)
        finally:
            _kill_group(proc)
    store = ShardStore(out)
    before = store.committed(FOLDER)
    assert 1 <= len(before) < 6, f"the kill should land mid-step, {len(before)} of 6 shards were committed"
    assert all(r["runner"] == runner for r in before.values())

    with open(tmp_path / "second.log", "w") as log:
        proc = _fld_run(cfg, src, out, runner, log, ray_temp)
        try:
            assert proc.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
        finally:
            _kill_group(proc)

    after = store.committed(FOLDER)
    ref = ShardStore(reference)
    assert sorted(after) == ref.shards(FOLDER) and len(after) == 6
    for shard, rec in before.items():  # committed before the kill: skipped on resume, not rewritten
        assert after[shard]["sha256"] == rec["sha256"] and after[shard]["committed_at"] == rec["committed_at"]
    rows, ref_rows = [], []
    for shard in after:
        assert after[shard]["runner"] == runner
        got, want = store.read_shard(FOLDER, shard).to_pylist(), ref.read_shard(FOLDER, shard).to_pylist()
        assert json.dumps(got, sort_keys=True, default=str) == json.dumps(want, sort_keys=True, default=str), shard
        rows += got
        ref_rows += want
    assert len(rows) == 6 and len({r["image_id"] for r in rows}) == 6
    assert sum(len(r["regions"]) for r in rows) == sum(len(r["regions"]) for r in ref_rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counters"]["stage1"]["ocr"]["records_in"] == 6  # resumed shards' counters are aggregated too
