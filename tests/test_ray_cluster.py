"""A real two-node Ray cluster (`ray start --head` + `ray start --address`), driven by `fld run --address`.

Both nodes run on this machine with their own temp dirs and 1 CPU each; the test checks that both
nodes ran ingest tasks and stage work (node ids recorded in the manifest) and that the shards equal
a local run's. Each node is a `ray start --block` process in its own session, stopped by killing its
process group (never `ray stop`, which would stop every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine.store import ShardStore

PIPELINE = """
models: {ocr: rapidocr}
pipelines:
  two_nodes:
    ingest: {shard_size: 2, workers: 0}
    steps:
      - name: read
        stages:
          - {stage: ocr, params: {model: ocr, batch_size: 2, threads: 1, cpus: 1, concurrency: 2}}
      - name: filter
        stages:
          - {stage: region_filter}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster():
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temps = [tempfile.mkdtemp(prefix="fldh", dir="/tmp"), tempfile.mkdtemp(prefix="fldw", dir="/tmp")]
    common = ["--num-cpus", "1", "--disable-usage-stats", "--block"]
    head = subprocess.Popen(["ray", "start", "--head", "--port", str(port), "--include-dashboard", "false",
                             "--temp-dir", temps[0], *common], env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [head]
    try:
        _wait_nodes(address, 1)
        procs.append(subprocess.Popen(["ray", "start", "--address", address, "--temp-dir", temps[1], *common],
                                      env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        _wait_nodes(address, 2)
        yield address
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(5)  # `ray start --block` takes longer than this to stop on SIGTERM; its group is killed
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


def _wait_nodes(address: str, n: int, timeout: float = 120) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        res = subprocess.run([sys.executable, "-c", code, address], env=_env(), capture_output=True, text=True, timeout=60)
        if res.returncode == 0 and res.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise TimeoutError(f"the Ray cluster at {address} did not reach {n} nodes")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fld_run_on_a_two_node_cluster_uses_both_nodes(cluster, tmp_path, photos, s3_server):
    """OUT on a real S3 server (SeaweedFS): every node reads and writes the bucket, none shares a folder."""
    src = tmp_path / "in"
    src.mkdir()
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "jpeg_0", "jpeg_1", "jpeg_2"]
    for name in names:
        (src / (f"{name}.png" if photos[name][:4] == b"\x89PNG" else f"{name}.jpg")).write_bytes(photos[name])
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(PIPELINE)
    out = f"s3://fld-test/cluster-{os.getpid()}-{time.time_ns()}"
    cmd = ["fld", "run", str(cfg), "--pipeline", "two_nodes", "--input", str(src), "--out", out,
           "--runner", "ray", "--address", cluster, *s3_server.cli_options()]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    b = ShardStore(out, s3_server.storage_options)
    manifest = b.read_manifest()
    metrics = manifest["engine_metrics"]
    assert len(metrics["ingest"]["nodes"]) == 2, metrics["ingest"]  # ingest chunks ran on both nodes
    assert len(metrics["read"]["nodes"]["ocr"]) == 2, metrics["read"]  # the OCR actors sat on both nodes
    assert sum(metrics["read"]["nodes"]["ocr"].values()) == 8

    local = tmp_path / "out_local"
    res = subprocess.run(cmd[:7] + ["--out", str(local)], env=_env(), capture_output=True, text=True, timeout=800)
    assert res.returncode == 0, res.stderr[-3000:]
    a = ShardStore(local)
    for folder in ("images", "annotations/read", "annotations/filter"):
        assert a.shards(folder) == b.shards(folder) and len(a.shards(folder)) == 4
        for shard in a.shards(folder):
            assert a.read_shard(folder, shard).equals(b.read_shard(folder, shard)), f"{folder}/{shard}"
