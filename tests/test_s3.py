"""OUT on a real S3 server (SeaweedFS, tests/seaweed.py): run, read, sandbox, integrity, kill + resume,
the single-writer lease, and bad endpoints / credentials."""
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from typer.testing import CliRunner

import seaweed
from engine.cli import app
from engine.store import ShardStore

runner = CliRunner()
BUCKET = "fld-test"


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _prefix(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


def _records(store, folder):
    """Every record of a folder across shards, by image: comparable between shardings."""
    rows = [r for s in store.shards(folder) for r in store.read_shard(folder, s).to_pylist()]
    return sorted(rows, key=lambda r: r["image_id"])


@pytest.fixture(scope="module")
def s3_ocr_run(s3_server, ocr_inputs, ocr_pipelines):
    out = _prefix("ocr")
    res = _cli("run", ocr_pipelines, "--pipeline", "ocr", "--input", ocr_inputs, "--out", out, *s3_server.cli_options())
    assert res.exit_code == 0, res.output
    assert seaweed.SECRET_KEY not in res.output
    return out


@pytest.mark.timeout(300)
def test_run_on_s3_writes_what_a_local_run_writes_and_every_reader_reads_it(s3_server, s3_ocr_run, ocr_run, tmp_path):
    opts = s3_server.cli_options()
    store = ShardStore(s3_ocr_run, s3_server.storage_options)
    local = ShardStore(ocr_run)
    for folder in ("images", "quarantine", "annotations/stage1"):
        assert store.shards(folder) == local.shards(folder)
        for shard in store.shards(folder):
            assert store.read_shard(folder, shard).to_pylist() == local.read_shard(folder, shard).to_pylist()
        assert all(rec.get("etag") for rec in store.committed(folder).values())
    manifest = store.read_bytes("manifest.json").decode()
    assert seaweed.SECRET_KEY not in manifest and seaweed.ACCESS_KEY not in manifest
    summary = json.loads(manifest)["shards"]["images"]
    assert summary["shards"] == 3 and summary["rows"] == 4
    assert not store.exists(".lease.json")  # released at the end

    res = _cli("query", s3_ocr_run, "SELECT r.label FROM regions r JOIN images i USING (image_id) "
               "WHERE i.uri LIKE '%sign.jpg' ORDER BY r.box[2]",
               "--format", "json", *opts)
    assert res.exit_code == 0, res.output
    assert [r["label"] for r in json.loads(res.stdout)] == ["STOP HERE", "OPEN 24 HOURS", "EXIT 12"]
    res = _cli("stats", s3_ocr_run, "--format", "json", *opts)
    assert res.exit_code == 0 and "inputs" in res.stdout
    res = _cli("export", s3_ocr_run, "--format", "coco", "--dest", tmp_path / "coco", *opts)
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "coco" / "instances.json").read_text())["images"]) == 4
    res = _cli("show", s3_ocr_run, "--out", tmp_path / "r.html", *opts)
    assert res.exit_code == 0 and "(4 images)" in res.output and "sign.jpg" in (tmp_path / "r.html").read_text()
    res = _cli("verify", s3_ocr_run, *opts)
    assert res.exit_code == 0 and "9 shards verified" in res.output


ATTACKS_ON_S3 = [
    "SELECT * FROM read_csv('s3://fld-test/{other}/secret.csv')",  # another prefix of the same bucket
    "SELECT * FROM read_csv('s3://fld-other/secret.csv')",  # another bucket
    "SELECT * FROM read_csv('{out}2/secret.csv')",  # a sibling prefix that starts like OUT
    "SELECT * FROM read_text('{out}/../{other}/secret.csv')",
    "SELECT * FROM glob('s3://fld-test/*')",
    "COPY (SELECT 1) TO '{out}/written.csv'",
    "SELECT * FROM read_text('/etc/passwd')",
]


@pytest.mark.timeout(180)
def test_the_sandbox_holds_on_an_object_store(s3_server, s3_ocr_run, ocr_run):
    """With external access off, DuckDB applies allowed_directories to the registered fsspec filesystem too."""
    from engine.views.query import QueryError, execute_query

    fs = s3_server.filesystem()
    other = f"other-{uuid.uuid4().hex[:6]}"
    fs.pipe_file(f"{BUCKET}/{other}/secret.csv", b"a\nTOPSECRET\n")
    fs.pipe_file(f"{s3_ocr_run[5:]}2/secret.csv", b"a\nTOPSECRET\n")
    if not fs.exists("fld-other"):
        fs.mkdir("fld-other")
    fs.pipe_file("fld-other/secret.csv", b"a\nTOPSECRET\n")
    store = ShardStore(s3_ocr_run, s3_server.storage_options)
    for sql in ATTACKS_ON_S3:
        with pytest.raises(QueryError) as err:
            execute_query(store, sql.format(out=s3_ocr_run, other=other))
        assert "TOPSECRET" not in str(err.value)
    assert not fs.exists(f"{s3_ocr_run[5:]}/written.csv")
    res = _cli("query", s3_ocr_run, "SELECT count(*) AS n FROM regions", "--format", "json", *s3_server.cli_options())
    assert res.exit_code == 0 and json.loads(res.stdout) == json.loads(
        _cli("query", ocr_run, "SELECT count(*) AS n FROM regions", "--format", "json").stdout)


@pytest.mark.timeout(300)
def test_a_replaced_shard_object_is_found_by_its_etag_and_redone(s3_server, s3_ocr_run, ocr_pipelines):
    fs = s3_server.filesystem()
    out = _prefix("damaged")
    fs.copy(s3_ocr_run[5:], out[5:], recursive=True)
    store = ShardStore(out, s3_server.storage_options)
    key = f"{out[5:]}/annotations/stage1/part-00000.parquet"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 3] ^= 0x01  # same size, rows and footer: locally only `fld verify` sees it, here the ETag does
    fs.pipe_file(key, bytes(data))
    assert "ETag" in ShardStore(out, s3_server.storage_options).damaged("annotations/stage1")["part-00000"]
    opts = s3_server.cli_options()
    res = _cli("query", out, "SELECT count(*) FROM regions", *opts)
    assert res.exit_code == 2 and "annotations/stage1/part-00000: replaced: ETag" in res.output, res.output
    assert _cli("verify", out, *opts).exit_code == 1
    res = _cli("run", ocr_pipelines, "--pipeline", "ocr", "--out", out, *opts)
    assert res.exit_code == 0, res.output
    assert "1 run / 2 resumed" in res.output
    assert _cli("verify", out, *opts).exit_code == 0
    assert _records(store, "annotations/stage1") == _records(ShardStore(s3_ocr_run, s3_server.storage_options), "annotations/stage1")


BAD = {
    "unreachable endpoint": lambda srv: {**srv.storage_options, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{seaweed.free_port()}"}},
    "wrong secret": lambda srv: {**srv.storage_options, "secret": "not-the-secret-" + "x" * 10},
    "unknown key": lambda srv: {**srv.storage_options, "key": "nobody"},
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("bad", list(BAD))
def test_bad_endpoint_or_credentials_is_one_line_exit_2_and_nothing_written(s3_server, s3_ocr_run, ocr_inputs, ocr_pipelines,
                                                                          tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    fs = s3_server.filesystem()
    before = sorted(fs.find(BUCKET))
    opts = [a for k, v in BAD[bad](s3_server).items()
            for a in ("--storage-option", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]
    new_out = _prefix("never")
    commands = [
        ("run", ocr_pipelines, "--pipeline", "ocr", "--input", ocr_inputs, "--out", new_out),
        ("query", s3_ocr_run, "SELECT 1"),
        ("stats", s3_ocr_run),
        ("export", s3_ocr_run, "--format", "coco", "--dest", tmp_path / "coco"),
        ("show", s3_ocr_run, "--out", tmp_path / "r.html"),
        ("verify", s3_ocr_run),
    ]
    if bad != "wrong secret":
        commands = commands[:2]  # every command goes through the same probe: all of them once is enough
    for cmd in commands:
        t0 = time.monotonic()
        res = _cli(*cmd, *opts)
        assert res.exit_code == 2, (cmd, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (cmd, res.output)
        assert ("cannot reach" in lines[0]) if bad == "unreachable endpoint" else ("denied" in lines[0]), lines[0]
        assert seaweed.SECRET_KEY not in res.output and "not-the-secret" not in res.output
        assert time.monotonic() - t0 < 30, cmd
    assert sorted(fs.find(BUCKET)) == before
    assert os.listdir(tmp_path) == []  # no local "s3:" folder, no report, no export


@pytest.mark.timeout(60)
def test_missing_bucket_is_one_line(s3_server, ocr_inputs, ocr_pipelines):
    res = _cli("run", ocr_pipelines, "--pipeline", "ocr", "--input", ocr_inputs, "--out", "s3://no-such-bucket-here/x",
               *s3_server.cli_options())
    assert res.exit_code == 2 and "bucket 'no-such-bucket-here' does not exist" in res.output, res.output
    res = _cli("query", "s3://fld-test/no-such-prefix", "SELECT 1", *s3_server.cli_options())
    assert res.exit_code == 2 and "no such output folder" in res.output, res.output


def _kill_group(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.fixture(scope="module")
def many_inputs(tmp_path_factory, photos):
    """Eight distinct real images, one per shard below: a kill lands mid-step."""
    from PIL import Image

    d = tmp_path_factory.mktemp("many")
    names = [n for n in photos if n != "camera"][:4]
    for name in names:
        im = Image.open(io.BytesIO(photos[name])).convert("RGB")
        for k, side in enumerate((320, 256)):
            im.resize((side, side)).save(d / f"{name}_{k}.png")
    return d


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_then_resume_on_s3_and_a_concurrent_run_is_refused(s3_server, many_inputs, tmp_path):
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text("pipelines:\n  ocr1:\n    ingest: {shard_size: 1}\n    steps:\n"
                   "      - name: stage1\n        stages:\n          - {stage: ocr, params: {batch_size: 1}}\n")
    out = _prefix("killed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "AWS_ACCESS_KEY_ID": seaweed.ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": seaweed.SECRET_KEY, "AWS_ENDPOINT_URL": s3_server.endpoint}  # credentials from env
    fs = s3_server.filesystem()
    committed = f"{out[5:]}/annotations/stage1/_committed"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg), "--pipeline", "ocr1", "--input",
                                 str(many_inputs), "--out", out], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not fs.exists(f"{out[5:]}/.lease.json"):
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            res = _cli("run", cfg, "--pipeline", "ocr1", "--input", many_inputs, "--out", out, *s3_server.cli_options())
            assert res.exit_code == 2, res.output
            assert f"is being written by another run: pid {proc.pid} on" in res.output and "expires" in res.output
            while not (fs.exists(committed) and fs.ls(committed, refresh=True)):
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no stage1 commit within 240 s"
                time.sleep(0.02)
        finally:
            _kill_group(proc)
    store = ShardStore(out, s3_server.storage_options)
    before = store.committed("annotations/stage1")
    assert 1 <= len(before) < 8, f"the kill should land mid-step, {len(before)} of 8 shards were committed"
    assert fs.exists(f"{out[5:]}/.lease.json")  # the dead run's lease is still there...

    res = _cli("run", cfg, "--pipeline", "ocr1", "--out", out, *s3_server.cli_options())  # ...and taken over (dead pid)
    assert res.exit_code == 0, res.output
    after = store.committed("annotations/stage1")
    assert len(after) == 8
    for shard, rec in before.items():
        assert after[shard]["committed_at"] == rec["committed_at"]  # resumed, not redone
    reference = tmp_path / "reference"
    res = _cli("run", cfg, "--pipeline", "ocr1", "--input", many_inputs, "--out", reference)
    assert res.exit_code == 0, res.output
    for folder in ("images", "quarantine", "annotations/stage1"):
        ref = ShardStore(reference)
        assert store.shards(folder) == ref.shards(folder)
        for shard in ref.shards(folder):
            assert store.read_shard(folder, shard).to_pylist() == ref.read_shard(folder, shard).to_pylist(), (folder, shard)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_pipeline_with_out_on_s3_then_query_stats_export(s3_server, tmp_path):
    """The README's object-storage walk-through: fld samples, fld run --out s3://..., readers."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    samples = tmp_path / "samples"
    assert _cli("samples", samples).exit_code == 0
    out = _prefix("quickstart")
    opts = s3_server.cli_options()
    t0 = time.monotonic()
    res = _cli("run", os.path.join(repo, "pipelines.yaml"), "--pipeline", "quickstart", "--profile", "offline",
               "--input", samples, "--out", out, *opts)
    assert res.exit_code == 0, res.output
    print(f"quickstart with OUT on SeaweedFS: {time.monotonic() - t0:.1f} s")
    res = _cli("query", out, "SELECT count(*) AS n FROM images", "--format", "json", *opts)
    assert json.loads(res.stdout) == [{"n": len(os.listdir(samples))}]
    # the offline captioner writes one brief caption per image where a specialist found something
    res = _cli("query", out, "SELECT (SELECT count(*) FROM texts WHERE tier = 'brief') AS briefs, "
               "(SELECT count(DISTINCT image_id) FROM regions) AS found", "--format", "json", *opts)
    counts = json.loads(res.stdout)[0]
    assert 0 < counts["briefs"] == counts["found"] <= len(os.listdir(samples)), counts
    res = _cli("stats", out, *opts)
    assert res.exit_code == 0 and "grounding_filter" in res.output
    for fmt in ("florence", "coco", "webdataset"):
        res = _cli("export", out, "--format", fmt, "--dest", tmp_path / fmt, *opts)
        assert res.exit_code == 0, res.output
    assert _cli("verify", out, *opts).exit_code == 0


@pytest.mark.timeout(120)
def test_a_shard_commit_is_two_puts_and_a_shard_read_one_get(s3_server, monkeypatch):
    """The cost of object-store OUT is per request, not per byte: committing a shard is its PUT and
    its record's PUT (the ETag comes with the PUT's answer, no HEAD), reading one back is one GET
    (not a Parquet reader's size, footer and column-chunk requests); the driver's check of 1,000 such
    shards is a handful of batched calls (tests/test_store.py)."""
    import collections

    import pyarrow as pa
    import s3fs.core

    store = ShardStore(_prefix("requests"), s3_server.storage_options)
    calls = collections.Counter()
    real = s3fs.core.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        calls[method] += 1
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_call_s3", counted)
    table = pa.table({"image_id": [f"i{k}" for k in range(50)], "bytes": [os.urandom(2000) for _ in range(50)]})
    record = store.write_shard("images", "part-00000", table, {"config_hash": "h"})
    assert dict(calls) == {"put_object": 2}, calls
    assert record["etag"]  # from the PUT's answer; the listing's ETag vouches for the shard later
    calls.clear()
    assert store.read_shard("images", "part-00000", columns=["image_id", "bytes"]).equals(table)
    assert dict(calls) == {"get_object": 1}, calls
    calls.clear()
    assert ShardStore(store.url(), s3_server.storage_options).damaged("images") == {}
    assert calls["get_object"] == 1 and "head_object" not in calls, calls  # one record fetch, no footer read
