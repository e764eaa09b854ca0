"""Shard store: atomic commits, commit records, the lock, uncommit; any fsspec URL (memory:// here), the lease."""
import json
import multiprocessing as mp
import os
import pickle
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from engine.store.lease import LEASE, Lease
from engine.store import RunLockedError, ShardStore, StoreError, StoreSpec


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
    summary = m["shards"]["annotations/s1"]  # per-folder summary; per-shard truth stays in commit records
    assert summary["shards"] == 3 and summary["rows"] == 6
    assert summary["bytes"] == sum((tmp_path / f"annotations/s1/part-{i:05d}.parquet").stat().st_size for i in range(3))
    assert m["versions"]["pyarrow"]
    assert store.uncommit("annotations/s1") == 3
    assert store.shards("annotations/s1") == []


# ------------------------------------------------------------------ any fsspec URL (memory://)


@pytest.fixture
def mem_store():
    return ShardStore(f"memory://fld-{uuid.uuid4().hex[:12]}/out")


@pytest.mark.timeout(60)
def test_object_store_commit_is_shard_then_record(mem_store):
    """No rename on object stores: the shard object is PUT under its final name, then its record."""
    rec = mem_store.write_shard("images", "part-00000", _table(4), {"config_hash": "h"})
    assert mem_store.list("images") == ["_committed", "part-00000.parquet"]
    assert mem_store.list("images/_committed") == ["part-00000.json"]
    assert json.loads(mem_store.read_bytes("images/_committed/part-00000.json"))["sha256"] == rec["sha256"]
    assert mem_store.shard_files("images") == [mem_store.url("images/part-00000.parquet")]
    assert mem_store.url("images/part-00000.parquet").startswith("memory://fld-")
    assert mem_store.read_shard("images", "part-00000").num_rows == 4
    # a shard object whose record was never written (killed between the two PUTs) does not exist
    mem_store.write_bytes("images/part-00001.parquet", mem_store.read_bytes("images/part-00000.parquet"))
    assert mem_store.shards("images") == ["part-00000"] and not mem_store.is_committed("images", "part-00001")
    assert mem_store.uncommit("images") == 1 and mem_store.shards("images") == []
    assert "part-00000.parquet" not in mem_store.list("images")


@pytest.mark.timeout(60)
def test_bytes_dirs_and_manifest_on_object_store(mem_store, tmp_path):
    mem_store.write_bytes("logs/a.txt", b"one")
    mem_store.write_bytes("logs/a.txt", b"two")
    assert mem_store.read_bytes("logs/a.txt") == b"two" and mem_store.exists("logs/a.txt")
    mem_store.delete("logs/a.txt")
    assert not mem_store.exists("logs/a.txt")
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "sub" / "weights.bin").write_bytes(b"\0" * 1000)
    mem_store.upload_dir(ckpt, "models/round1")
    back = mem_store.download_dir("models/round1", tmp_path / "back")
    assert (back / "config.json").read_text() == "{}" and (back / "sub" / "weights.bin").stat().st_size == 1000
    mem_store.write_shard("annotations/s1", "part-00000", _table(2))
    m = mem_store.update_manifest(folder_order=["annotations/s1"])
    assert m["shards"]["annotations/s1"]["rows"] == 2 and mem_store.read_manifest()["order"] == ["annotations/s1"]


@pytest.mark.timeout(60)
def test_spec_pickles_with_options_and_never_prints_them(tmp_path):
    secret = "s3cr3t-value-never-printed"
    store = ShardStore(f"memory://fld-{uuid.uuid4().hex[:8]}/x", {"secret_option": secret})
    spec = store.spec()
    assert isinstance(spec, StoreSpec) and secret not in repr(spec) and "secret_option" in repr(spec)
    assert secret not in repr(store) and secret not in str(store)
    again = pickle.loads(pickle.dumps(store))
    assert again.url() == store.url() and again.storage_options == {"secret_option": secret}
    assert "pw" not in repr(StoreSpec("ftp://user:pw@host/x")) and "host/x" in repr(StoreSpec("ftp://user:pw@host/x"))
    local = ShardStore.from_spec(ShardStore(tmp_path / "rel").spec())
    assert local.root == str(tmp_path / "rel") and local.local


@pytest.mark.timeout(60)
def test_unknown_protocol_and_missing_output_are_one_line_errors(tmp_path):
    with pytest.raises(StoreError, match="unknown protocol nosuchproto://"):
        ShardStore("nosuchproto://bucket/x")
    with pytest.raises(StoreError, match=r"gs://bucket/x: needs gcsfs"):  # not installed here
        ShardStore("gs://bucket/x")
    with pytest.raises(StoreError, match="no such output folder"):
        ShardStore(tmp_path / "absent").probe()
    ShardStore(tmp_path / "absent").probe(for_writing=True)  # a writer creates it


# --------------------------------------------------------------------------- lease
def _lease_holder(store, **fields):
    """A lease as another host wrote it."""
    body = {"token": "other", "host": "elsewhere", "pid": 4242, "what": "fld run x", "since": "2026-01-01T00:00:00Z",
            "expires": "2026-01-01T00:01:00Z", "expires_at": time.time() + 60, "host_key": "elsewhere:boot:ns"}
    body.update(fields)
    store.write_bytes(LEASE, json.dumps(body).encode())


@pytest.mark.timeout(60)
def test_lease_refuses_a_second_writer_naming_the_holder(mem_store):
    with mem_store.lock("fld run first", lease_seconds=30):
        holder = json.loads(mem_store.read_bytes(LEASE))
        assert holder["pid"] == os.getpid()
        with pytest.raises(RunLockedError) as err:
            with ShardStore(mem_store.url()).lock("fld run second"):
                pass
        msg = str(err.value)
        assert f"pid {os.getpid()}" in msg and "since" in msg and "expires" in msg and "fld run first" in msg
    assert not mem_store.exists(LEASE)  # released
    with ShardStore(mem_store.url()).lock("third"):
        pass


@pytest.mark.timeout(60)
def test_lease_of_another_host_is_taken_over_only_after_expiry(mem_store):
    _lease_holder(mem_store)
    with pytest.raises(RunLockedError, match="pid 4242 on elsewhere"):
        with mem_store.lock():
            pass
    _lease_holder(mem_store, expires_at=time.time() - 1)
    with mem_store.lock("taker"):
        assert json.loads(mem_store.read_bytes(LEASE))["pid"] == os.getpid()
    assert not any(n.startswith(".lease-takeover") for n in mem_store.list())


@pytest.mark.timeout(60)
def test_lease_of_a_dead_pid_on_this_host_is_taken_over_at_once(mem_store):
    from engine.store.lease import host_key

    dead = mp.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    _lease_holder(mem_store, pid=dead.pid, host_key=host_key())
    with mem_store.lock("resume"):
        pass


def _race_takers(store, n: int, start: threading.Barrier | None = None):
    """n takers try to acquire the lease at once: (leases won, refusal messages)."""
    wins, refusals = [], []

    def take():
        lease = Lease(ShardStore(store.url()), "taker", 30)
        if start is not None:
            start.wait()
        try:
            lease.acquire()
            wins.append(lease)
        except RunLockedError as exc:
            refusals.append(str(exc))

    threads = [threading.Thread(target=take) for _ in range(n)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    return wins, refusals


@pytest.mark.timeout(60)
def test_two_takers_of_a_stale_lease_cannot_both_win(mem_store):
    _lease_holder(mem_store, expires_at=time.time() - 1)
    wins, refusals = _race_takers(mem_store, 6, threading.Barrier(6))
    try:
        assert len(wins) == 1 and len(refusals) == 5, (wins, refusals)
        assert json.loads(mem_store.read_bytes(LEASE))["token"] == wins[0].token
    finally:
        [w.release() for w in wins]


@pytest.mark.timeout(60)
def test_takers_that_interleave_worst_case_cannot_both_win(mem_store, monkeypatch):
    """Both takers pass every check before either writes, then write and read back one after the
    other: without the claim object both would hold the lease (what a non-atomic If-Match allows)."""
    _lease_holder(mem_store, expires_at=time.time() - 1)
    at_replace, turn = threading.Barrier(2, timeout=2), threading.Lock()
    real_replace, real_confirm = Lease._replace, Lease._confirm

    def replace(self, data, etag):
        try:
            at_replace.wait()
        except threading.BrokenBarrierError:
            pass  # the other taker never got this far
        turn.acquire()
        return real_replace(self, data, etag)

    def confirm(self):
        try:
            return real_confirm(self)
        finally:
            if turn.locked():
                turn.release()

    monkeypatch.setattr(Lease, "_replace", replace)
    monkeypatch.setattr(Lease, "_confirm", confirm)
    wins, refusals = _race_takers(mem_store, 2)
    try:
        assert len(wins) == 1 and len(refusals) == 1 and "taking over" in refusals[0], (wins, refusals)
    finally:
        [w.release() for w in wins]


@pytest.mark.timeout(60)
def test_a_writer_that_lost_its_lease_stops_writing(mem_store):
    with mem_store.lock("slow run", lease_seconds=0.6):
        mem_store._lease._stop.set()  # renewal stalls (e.g. the process was paused)
        time.sleep(0.8)
        with pytest.raises(RunLockedError, match="lost its writer lease"):
            mem_store.write_shard("images", "part-00000", _table(1))
    assert mem_store.shards("images") == []


@pytest.mark.timeout(60)
def test_readers_list_each_folder_once_and_fetch_no_record_twice(mem_store, monkeypatch):
    """At 200k shards a folder listing is ~200 requests: building the query views lists each folder
    (and its _committed/) once, and a record already read is not fetched again."""
    from collections import Counter

    from engine.views.query import open_views
    from engine.stage import records_to_table
    from schemas.records import empty_record

    images = pa.table({"image_id": ["a"], "uri": ["u"], "source": ["s"], "width": [1], "height": [1],
                       "format": ["PNG"], "mode": ["RGB"], "bytes": [b""]})
    for shard in ("part-00000", "part-00001"):
        mem_store.write_shard("images", shard, images)
        mem_store.write_shard("quarantine", shard, pa.table({"uri": pa.array([], pa.string())}))
        mem_store.write_shard("annotations/s1", shard, records_to_table(
            [empty_record({"image_id": "a", "uri": "u", "width": 1, "height": 1, "source": "s"})]))
    listed, fetched = Counter(), Counter()
    real_ls, real_cat = mem_store.fs.ls, mem_store.fs.cat
    monkeypatch.setattr(mem_store.fs, "ls", lambda path, **kw: (listed.update([path]), real_ls(path, **kw))[1])
    monkeypatch.setattr(mem_store.fs, "cat", lambda paths, **kw: (fetched.update(paths), real_cat(paths, **kw))[1])
    con = open_views(mem_store)
    assert con.execute("SELECT count(*) FROM records").fetchall() == [(2,)]
    assert listed and max(listed.values()) == 1, listed
    assert sum(fetched.values()) == 6 and max(fetched.values()) == 1, fetched
    mem_store.committed("images")
    assert sum(fetched.values()) == 6  # cached by the listing's key


@pytest.mark.timeout(60)
def test_json_logs_trees_and_local_dir_on_an_object_store(mem_store, tmp_path, monkeypatch):
    monkeypatch.setenv("FLD_CACHE_DIR", str(tmp_path / "cache"))
    assert mem_store.read_json("models/round1/round.json") is None
    mem_store.write_json("models/round1/round.json", {"round": 1})
    mem_store.write_bytes("models/round1/weights.bin", b"w" * 10)
    mem_store.write_log("s.ray-stats.txt", "stats")
    assert mem_store.read_json("models/round1/round.json") == {"round": 1}
    assert mem_store.read_bytes("logs/s.ray-stats.txt") == b"stats"
    local = Path(mem_store.local_dir("models/round1"))
    assert local.is_dir() and str(local).startswith(str(tmp_path / "cache"))
    assert (local / "weights.bin").read_bytes() == b"w" * 10
    mem_store.delete_tree("models")
    assert not mem_store.exists("models/round1/round.json")
    for i in range(3):
        mem_store.write_shard("images", f"part-{i:05d}", _table(1))
    assert mem_store.uncommit("images", ["part-00001"]) == 1
    assert mem_store.shards("images") == ["part-00000", "part-00002"]


@pytest.mark.timeout(120)
def test_runner_epilogue_reads_1000_shards_in_a_constant_number_of_requests(mem_store, monkeypatch):
    """After a step the driver checks every shard the workers committed: at 200k shards a request
    per shard is hours, so it is a fixed number of (batched) store calls whatever the shard count."""
    from collections import Counter

    from engine.runners.base import StepJob, finished_records
    from engine.runners.tagged import PARTS, clear_parts

    shards = [f"part-{i:05d}" for i in range(1000)]
    job = StepJob("s1", [], "images", "annotations/s1", shards, "h", {s: {"rows": 1} for s in shards})
    for shard in shards:  # what the workers write
        mem_store.write_shard("annotations/s1", shard, _table(1), {"config_hash": "h"})
    mem_store.write_shard(f"{PARTS}/annotations/s1/part-00007", "rows-000000000", _table(1))  # a killed run's part
    driver = ShardStore(mem_store.url())  # the driver's own store: no record cached from the writes
    calls, depth = Counter(), [0]

    def counted(name, real):
        def call(*a, **kw):  # the store's own calls only (memory://'s cat loops over cat_file inside)
            if depth[0] == 0:
                calls.update([name])
            depth[0] += 1
            try:
                return real(*a, **kw)
            finally:
                depth[0] -= 1
        return call

    for name in ("ls", "cat", "cat_file", "cat_ranges", "info", "exists", "open", "rm", "find"):
        monkeypatch.setattr(driver.fs, name, counted(name, getattr(driver.fs, name)))
    clear_parts(driver, job)
    assert driver.list(f"{PARTS}/annotations/s1/part-00007/_committed") == []
    before = sum(calls.values())
    assert before <= 15, calls  # one listing of the parts folder, then the one shard that has parts
    records = finished_records(driver, job, "ray")
    assert len(records) == 1000 and all(r["config_hash"] == "h" for r in records.values())
    assert sum(calls.values()) - before == 4, calls  # ls x2, cat x1 (records), cat_ranges x1 (footers)
    # a shard a worker never committed, or committed with other settings, is named
    mem_store.delete("annotations/s1/_committed/part-00500.json")
    with pytest.raises(RuntimeError, match=r"without committing annotations/s1/part-00500$"):
        finished_records(ShardStore(mem_store.url()), job, "ray")


def _local_dir_in_child(url, rel, log, results):
    """A relabel actor / training worker of the same node: its own store, the node's cache."""
    store = ShardStore(url)
    real_get = store.fs.get

    def slow_get(*a, **kw):  # a download that takes a while: the other process must wait, not fetch too
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return real_get(*a, **kw)

    store.fs.get = slow_get
    path = store.local_dir(rel)
    results.put((path, (Path(path) / "weights.bin").read_bytes()))


@pytest.mark.timeout(60)
def test_local_dir_downloads_once_per_node_and_never_deletes_a_copy_in_use(mem_store, tmp_path, monkeypatch):
    monkeypatch.setenv("FLD_CACHE_DIR", str(tmp_path / "cache"))
    mem_store.write_bytes("models/round1/config.json", b"{}")
    mem_store.write_bytes("models/round1/weights.bin", b"w1" * 100)
    ctx = mp.get_context("fork")  # the children see this process's memory:// store
    log, results = tmp_path / "downloads.log", ctx.Queue()
    procs = [ctx.Process(target=_local_dir_in_child, args=(mem_store.url(), "models/round1", str(log), results))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert len(log.read_text().split()) == 1, "two processes of a node downloaded the same folder"
    assert got[0] == got[1] and got[0][1] == b"w1" * 100
    first = Path(got[0][0])
    # the folder changes in the store (a new model): a new copy, the one in use stays as it was
    mem_store.write_bytes("models/round1/weights.bin", b"w2" * 100)
    second = Path(mem_store.local_dir("models/round1"))
    assert second != first and (second / "weights.bin").read_bytes() == b"w2" * 100
    assert (first / "weights.bin").read_bytes() == b"w1" * 100 and (first / "config.json").exists()
    assert Path(mem_store.local_dir("models/round1")) == second  # unchanged: reused, not fetched again
    # a process wrote into its copy (a trainer's working folder): the next caller gets a clean one
    (second / "checkpoint-4").mkdir()
    (second / "checkpoint-4" / "state.bin").write_bytes(b"s")
    third = Path(mem_store.local_dir("models/round1"))
    assert third != second and not (third / "checkpoint-4").exists() and (second / "checkpoint-4" / "state.bin").exists()
    # a folder not in the store yet (a first training): an empty working copy, nothing of the cache inside
    empty = Path(mem_store.local_dir("models/round2"))
    assert list(empty.iterdir()) == [] and Path(mem_store.local_dir("models/round2")) == empty
