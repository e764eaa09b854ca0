"""Integrity of committed data (issue 11 item 4): damage after commit, kills, disk full.

A committed shard that is later truncated, replaced or deleted (or whose commit record is) must
be found against its commit record: readers (query, stats, export, show) fail naming the shard
and what differs, `fld verify` lists it, and the next `fld run` redoes it to the same rows.
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.store import ShardStore

runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _rows(out, folder):
    store = ShardStore(out)
    return {s: store.read_shard(folder, s).to_pylist() for s in store.shards(folder)}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _replace_with_other_shard(path):
    other = sorted(p for p in path.parent.glob("*.parquet") if p != path)[0]
    shutil.copy(other, path)


def _rewrite_same_rows(path):
    """Same rows and values, written again with other settings: another size / footer."""
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(path), path, compression="gzip", row_group_size=1)


def _flip_footer_byte(path):
    """Same size, same rows, a footer that still parses: only the footer hash can tell."""
    data = bytearray(path.read_bytes())
    at = data.rfind(b"parquet-cpp-arrow")  # the footer's created_by string
    data[at] = ord("P")
    path.write_bytes(bytes(data))


def _corrupt_footer(path):
    data = bytearray(path.read_bytes())
    data[-9] ^= 0xFF  # the end of the Thrift footer: it no longer parses
    path.write_bytes(bytes(data))


def _garble_record(path):
    record = path.parent / "_committed" / (path.stem + ".json")
    record.write_text("{not json")


def _copy_with_record(source):
    """A committed shard and its (valid, unedited) commit record copied over `path` and its record."""
    def damage(path):
        shutil.copy(source(path), path)
        shutil.copy(source(path).parent / "_committed" / (source(path).stem + ".json"),
                    path.parent / "_committed" / (path.stem + ".json"))
    return damage


DAMAGE = {
    "shard and record copied from another shard": (
        _copy_with_record(lambda p: sorted(x for x in p.parent.glob("*.parquet") if x != p)[0]), "copied over"),
    "shard and record copied from another folder": (
        _copy_with_record(lambda p: p.parents[2] / "images" / p.name), "copied over"),
    "truncated": (_truncate, "size"),
    "deleted": (lambda p: p.unlink(), "deleted"),
    "replaced by another shard": (_replace_with_other_shard, "committed"),
    "rewritten with the same rows": (_rewrite_same_rows, "committed"),
    "footer rewritten, same size and rows": (_flip_footer_byte, "footer differs"),
    "footer corrupted": (_corrupt_footer, ""),
    "commit record garbled": (_garble_record, "commit record unreadable"),
}


CASES = [("annotations/stage1", kind) for kind in DAMAGE] + [
    ("images", "truncated"), ("images", "replaced by another shard"), ("quarantine", "deleted"), ("quarantine", "truncated")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("folder,kind", CASES)
def test_damaged_shard_is_refused_by_readers_and_redone_by_a_run(tmp_path, ocr_run, ocr_pipelines, folder, kind, caplog):
    out = tmp_path / "out"
    shutil.copytree(ocr_run, out)
    before = {f: _rows(out, f) for f in ("images", "quarantine", "annotations/stage1")}
    shard = "part-00001"
    damage, expect = DAMAGE[kind]
    damage(out / folder / f"{shard}.parquet")

    for args in (("query", out, "SELECT count(*) FROM images"), ("stats", out), ("show", out, "--out", tmp_path / "r.html"),
                 ("export", out, "--format", "coco", "--dest", tmp_path / "coco")):
        res = _cli(*args)
        assert res.exit_code == 2, (args, res.output)
        assert f"{folder}/{shard}" in res.output and expect in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "coco" / "instances.json").exists()

    res = _cli("verify", out)
    assert res.exit_code == 1 and f"│ {folder}" in res.output and shard in res.output, res.output

    with caplog.at_level(logging.WARNING):
        res = _cli("run", ocr_pipelines, "--pipeline", "ocr", "--out", out)  # resume: no --input needed
    assert res.exit_code == 0, res.output
    assert any(f"{folder}/{shard} is damaged" in r.getMessage() for r in caplog.records)
    assert _cli("verify", out).exit_code == 0
    after = {f: _rows(out, f) for f in before}
    assert after == before
    assert _cli("query", out, "SELECT count(*) FROM images").exit_code == 0


@pytest.mark.timeout(120)
def test_a_flipped_data_byte_passes_the_cheap_checks_and_fld_verify_finds_it(tmp_path, ocr_run):
    """Size, rows and footer unchanged: only the sha256 of `fld verify` sees it (documented)."""
    out = tmp_path / "out"
    shutil.copytree(ocr_run, out)
    path = out / "images" / "part-00000.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    assert ShardStore(out).damaged("images") == {}
    res = _cli("verify", out)
    assert res.exit_code == 1 and "sha256" in res.output and "part-00000" in res.output, res.output
    assert "1 of 9 shards differ" in res.output


KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    import pyarrow as pa
    from engine.store import ShardStore
    os.replace = lambda *a: (print("written", flush=True), time.sleep(600))  # killed before the rename
    ShardStore(sys.argv[1]).write_shard("images", "part-00000", pa.table({"x": [1, 2]}))
""")


@pytest.mark.timeout(180)
def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_run(tmp_path, ocr_run, ocr_pipelines, caplog):
    out = tmp_path / "out"
    shutil.copytree(ocr_run, out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    leftover = out / "images" / f".part-00000.parquet.tmp-{proc.pid}"
    assert leftover.exists()
    stale_record = out / "annotations" / "stage1" / "_committed" / ".part-00000.json.tmp-123"
    stale_record.write_text("{}")
    assert ShardStore(out).shards("annotations/stage1") == ["part-00000", "part-00001", "part-00002"]
    with caplog.at_level(logging.WARNING):
        res = _cli("run", ocr_pipelines, "--pipeline", "ocr", "--out", out)
    assert res.exit_code == 0, res.output
    assert not leftover.exists() and not stale_record.exists()
    assert any("left by a killed run" in r.getMessage() for r in caplog.records)
    assert _cli("verify", out).exit_code == 0


def _disk_full_outcome(out, res, reference):
    """One clear line, exit 2, nothing half committed; afterwards the run completes to the same rows."""
    assert res.exit_code == 2, res.output
    assert "no space left" in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) <= 3, res.output
    temporaries = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert temporaries == []
    store = ShardStore(out)
    for folder in store.data_folders():
        assert store.damaged(folder) == {}
        for shard in store.records(folder):
            assert (out / folder / f"{shard}.parquet").exists()


@pytest.mark.timeout(300)
def test_disk_full_is_one_line_and_leaves_nothing_half_committed(tmp_path, ocr_run, ocr_inputs, ocr_pipelines, monkeypatch):
    """ENOSPC in the middle of a run (the third Parquet write raises it, as a full disk does)."""
    import errno

    import pyarrow.parquet as pq

    out = tmp_path / "out"
    real = pq.write_table
    calls = {"n": 0}

    def full_disk(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(where, "wb") as f:
                f.write(b"PAR1 half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", full_disk)
    res = _cli("run", ocr_pipelines, "--pipeline", "ocr", "--input", ocr_inputs, "--out", out)
    _disk_full_outcome(out, res, ocr_run)
    monkeypatch.setattr(pq, "write_table", real)
    res = _cli("run", ocr_pipelines, "--pipeline", "ocr", "--input", ocr_inputs, "--out", out)
    assert res.exit_code == 0, res.output
    assert _rows(out, "annotations/stage1") == _rows(ocr_run, "annotations/stage1")


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 300 KiB filesystem (tmpfs), when this machine lets us mount one."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()}); the monkeypatched ENOSPC test covers it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.timeout(300)
def test_disk_full_on_a_real_tiny_filesystem(tiny_tmpfs, ocr_run, ocr_inputs, ocr_pipelines):
    out = tiny_tmpfs / "out"
    res = _cli("run", ocr_pipelines, "--pipeline", "ocr", "--input", ocr_inputs, "--out", out)
    _disk_full_outcome(out, res, ocr_run)
    assert subprocess.run(["mount", "-o", "remount,size=20m", str(tiny_tmpfs)]).returncode == 0
    res = _cli("run", ocr_pipelines, "--pipeline", "ocr", "--input", ocr_inputs, "--out", out)
    assert res.exit_code == 0, res.output
    assert _cli("verify", out).exit_code == 0
    assert _rows(out, "annotations/stage1") == _rows(ocr_run, "annotations/stage1")


@pytest.mark.timeout(120)
def test_table_shapes_are_what_the_damage_helpers_expect(ocr_run):
    """The fixture has 3 shards per folder (the damage tests take part-00001 and compare all rows)."""
    store = ShardStore(ocr_run)
    assert store.shards("images") == ["part-00000", "part-00001", "part-00002"]
    assert isinstance(store.read_shard("images", "part-00001"), pa.Table)
    assert json.loads((ocr_run / "manifest.json").read_text())["shards"]["images"]["rows"] == 4


# ---- issue 21 item 6: a damaged manifest.json, read-only places, OUT inside its input ----
from bounded import fld_bounded  # noqa: E402

BAD_MANIFESTS = {
    "not JSON": b"{not json",
    "empty": b"",
    "a list": b"[]",
    "order as a string": json.dumps({"order": "annotations/stage1"}).encode(),
    "order of numbers": json.dumps({"order": [1, 2]}).encode(),
    "pipeline as a string": json.dumps({"pipeline": "x", "order": []}).encode(),
    "binary": bytes(range(256)),
}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", BAD_MANIFESTS)
def test_a_damaged_manifest_is_named_checked_past_and_rewritten(tmp_path, ocr_run, ocr_pipelines, kind):
    out = tmp_path / "out"
    shutil.copytree(ocr_run, out)
    reference = fld_bounded("verify", out).check(0)
    checked = int(reference.stderr.split()[0])
    (out / "manifest.json").write_bytes(BAD_MANIFESTS[kind])
    for args in (("query", out, "SELECT count(*) AS n FROM regions", "--format", "json"), ("stats", out, "-f", "json")):
        res = fld_bounded(*args).check(0)
        assert "manifest.json is damaged" in res.stderr, res.stderr
    res = fld_bounded("verify", out).check(1)  # every folder checked all the same, the manifest named
    assert f"of {checked} shards" in res.stdout and "manifest.json" in res.stdout, res.stdout
    fld_bounded("run", ocr_pipelines, "--pipeline", "ocr", "--out", out, timeout=240).check(0, seconds=200, rss_mib=3000)
    fld_bounded("verify", out).check(0)
    assert isinstance(json.loads((out / "manifest.json").read_text())["order"], list)


def _unwritable_root():
    """A folder even root cannot write to (a container's read-only /sys), or None."""
    try:
        os.mkdir("/sys/fld-probe")
    except OSError:
        return "/sys"
    os.rmdir("/sys/fld-probe")
    return None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["run OUT", "run OUT under a file", "export DEST", "show into cwd", "samples into cwd"])
def test_unwritable_out_dest_or_cwd_is_one_line(tmp_path, ocr_run, ocr_pipelines, ocr_inputs, case):
    ro = _unwritable_root()
    if ro is None and "under a file" not in case:
        pytest.skip("no read-only folder here (root can write everywhere)")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cwd = None
    if case == "run OUT":
        args = ("run", ocr_pipelines, "-p", "ocr", "-i", ocr_inputs, "-o", f"{ro}/fld-out")
    elif case == "run OUT under a file":
        args = ("run", ocr_pipelines, "-p", "ocr", "-i", ocr_inputs, "-o", blocker / "out")
    elif case == "export DEST":
        args = ("export", ocr_run, "--dest", f"{ro}/fld-export")
    else:
        cwd = __import__("pathlib").Path(ro)
        args = ("show", ocr_run) if case.startswith("show") else ("samples",)
    res = fld_bounded(*args, cwd=cwd).check(2, seconds=120, rss_mib=3000, clean=cwd is None)
    assert any(word in res.stderr for word in ("not permitted", "Permission denied", "Read-only", "Not a directory"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["the input folder itself", "a sub-folder", "through a link to the input"])
def test_out_inside_its_input_folder_is_refused(tmp_path, ocr_inputs, ocr_pipelines, where):
    src = tmp_path / "photos"
    shutil.copytree(ocr_inputs, src)
    given = src
    if where == "the input folder itself":
        out = src
    elif where == "a sub-folder":
        out = src / "runs" / "out"
    else:
        given = tmp_path / "link"
        os.symlink(src, given)
        out = src / "out"
    before = sorted(p.name for p in src.rglob("*"))
    res = fld_bounded("run", ocr_pipelines, "-p", "ocr", "-i", given, "-o", out).check(2, seconds=60)
    assert "inside the input folder" in res.stderr
    assert sorted(p.name for p in src.rglob("*")) == before  # nothing written


def _endpoint_lost():
    import botocore.exceptions

    return botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/\nsecond line")


def _server_gone():
    import aiohttp

    return aiohttp.ServerDisconnectedError("Server disconnected\n" + "frame\n" * 50)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("error", [_endpoint_lost, _server_gone, lambda: ConnectionResetError(104, "Connection reset by peer")])
def test_an_object_store_lost_mid_run_is_one_line_and_the_rerun_resumes(tmp_path, ocr_run, ocr_inputs, ocr_pipelines,
                                                                        monkeypatch, error):
    """The client's exception escapes a shard write after the first commit (as when the S3
    endpoint goes away): one line, exit 2; the rerun then finishes with the same rows."""
    from engine.store import ShardStore as Store

    out = tmp_path / "out"
    real, calls = Store.write_shard, {"n": 0}

    def lost_after_one(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise error()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "write_shard", lost_after_one)
    res = _cli("run", ocr_pipelines, "--pipeline", "ocr", "--input", ocr_inputs, "--out", out)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and len([line for line in lines if line.startswith("error:")]) == 1, res.output
    assert "rerun" in lines[-1] or "reset" in lines[-1]
    monkeypatch.setattr(Store, "write_shard", real)
    assert _cli("run", ocr_pipelines, "--pipeline", "ocr", "--input", ocr_inputs, "--out", out).exit_code == 0
    assert {f: _rows(out, f) for f in ("images", "annotations/stage1")} == \
        {f: _rows(ocr_run, f) for f in ("images", "annotations/stage1")}
