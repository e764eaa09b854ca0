"""Shard store: atomic commits, commit records, the lock, uncommit."""
import multiprocessing as mp
import os

import pyarrow as pa
import pytest

from engine.store import RunLockedError, ShardStore


def _table(n):
    return pa.table({"x": list(range(n))})


def test_write_commit_and_read(tmp_path):
    store = ShardStore(tmp_path)
    rec = store.write_shard("annotations/s1", "part-00000", _table(3), {"config_hash": "h1"})
    assert rec["rows"] == 3 and len(rec["sha256"]) == 64
    assert store.is_committed("annotations/s1", "part-00000", "h1")
    assert not store.is_committed("annotations/s1", "part-00000", "h2")
    assert store.read_shard("annotations/s1", "part-00000").num_rows == 3
    assert not [p for p in (tmp_path / "annotations/s1").iterdir() if ".tmp" in p.name]


def test_shard_without_commit_record_is_not_committed(tmp_path):
    """A run killed between the parquet rename and the commit record redoes that shard."""
    store = ShardStore(tmp_path)
    store.write_shard("images", "part-00000", _table(2))
    (tmp_path / "images/_committed/part-00000.json").unlink()
    assert not store.is_committed("images", "part-00000")
    assert store.shards("images") == []


def _hold_lock(path, ready, release):
    store = ShardStore(path)
    with store.lock("holder"):
        ready.set()
        release.wait(20)


def test_lock_refuses_a_second_run_with_a_clear_message(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    p.start()
    try:
        assert ready.wait(20)
        with pytest.raises(RunLockedError, match=rf"is being written by another run \(pid {p.pid}"):
            with ShardStore(tmp_path).lock():
                pass
    finally:
        release.set()
        p.join(20)
    with ShardStore(tmp_path).lock():  # released when the holder ends
        pass


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    p.start()
    assert ready.wait(20)
    os.kill(p.pid, 9)
    p.join(20)
    with ShardStore(tmp_path).lock():
        pass


def test_uncommit_and_manifest(tmp_path):
    store = ShardStore(tmp_path)
    for i in range(3):
        store.write_shard("annotations/s1", f"part-{i:05d}", _table(i + 1))
    m = store.update_manifest(folder_order=["annotations/s1"], counters={"s1": {"a": 1}})
    assert sorted(m["shards"]["annotations/s1"]) == ["part-00000", "part-00001", "part-00002"]
    assert m["versions"]["pyarrow"]
    assert store.uncommit("annotations/s1") == 3
    assert store.shards("annotations/s1") == []
