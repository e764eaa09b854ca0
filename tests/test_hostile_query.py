"""`fld query` is a sandbox (issue 11 item 1): untrusted SQL reads the dataset and nothing else.

Every attack goes through the real CLI against a real OUT (RapidOCR run on real photos); each
must exit 2 with a one-line error, leak nothing and change nothing.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.views.query import check_read_only, QueryError
from engine.store import ShardStore

runner = CliRunner()
SECRET = "TOP-SECRET-4711"
FOREVER = "SELECT count(*) FROM range(10000000000000::BIGINT) t(i) WHERE hash(i) % 3 = 1"  # hours


@pytest.fixture(scope="module")
def target(tmp_path_factory, ocr_run):
    """OUT plus secrets next to it: a file above it and a sibling folder whose name starts like OUT's."""
    base = tmp_path_factory.mktemp("hostile")
    out = base / "out"
    shutil.copytree(ocr_run, out)
    (base / "secret.txt").write_text(SECRET)
    (base / "secret.csv").write_text(f"a,b\n{SECRET},1\n")
    (base / "secret.json").write_text(json.dumps({"a": SECRET}))
    sibling = base / "out2"  # a prefix match of "out" without the slash would allow this
    sibling.mkdir()
    (sibling / "s.csv").write_text(f"a\n{SECRET}\n")
    shutil.copy(out / "images" / "part-00000.parquet", sibling / "x.parquet")
    os.symlink(base, out / "escape")  # a link inside OUT to the folder above it
    return out


def _query(out, sql, *extra):
    return runner.invoke(app, ["query", str(out), sql, *extra])


def _refused(out, sql, *extra):
    res = _query(out, sql, *extra)
    assert res.exit_code == 2, (sql, res.output)
    assert SECRET not in res.output, sql
    assert "Traceback" not in res.output
    assert res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) <= 3, res.output
    return res.output


@pytest.mark.timeout(120)
def test_the_views_still_work_inside_the_sandbox(target):
    res = _query(target, "SELECT count(*) AS n FROM images", "--format", "json")
    assert res.exit_code == 0 and json.loads(res.stdout) == [{"n": 4}]
    for sql in ("SELECT label FROM regions ORDER BY box[2]", "DESCRIBE images", "SHOW TABLES", "SUMMARIZE images",
                "WITH t AS (SELECT * FROM texts) SELECT count(*) FROM t", "FROM quarantine", "VALUES (1, 2)",
                "EXPLAIN SELECT * FROM images", "EXPLAIN ANALYZE SELECT count(*) FROM regions",
                "/* comment */ EXPLAIN (FORMAT json) SELECT 1",
                f"SELECT count(*) FROM read_parquet('{target}/images/*.parquet')"):  # inside OUT: allowed
        res = _query(target, sql, "--format", "csv")
        assert res.exit_code == 0, (sql, res.output)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_text('{base}/secret.txt')",
    "SELECT * FROM read_blob('{base}/secret.txt')",
    "SELECT * FROM read_csv('{base}/secret.csv')",
    "SELECT * FROM read_csv_auto('{base}/secret.csv')",
    "SELECT * FROM '{base}/secret.csv'",
    "SELECT * FROM read_json('{base}/secret.json')",
    "SELECT * FROM read_json_auto('{base}/secret.json')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM glob('{base}/*')",
    "SELECT * FROM parquet_scan('{base}/out2/x.parquet')",
    "SELECT * FROM read_parquet('{base}/out2/x.parquet')",
    "SELECT * FROM read_csv('{base}/out2/s.csv')",
    "SELECT * FROM read_text('{out}/../secret.txt')",
    "SELECT * FROM read_text('{out}/escape/secret.txt')",
    "SELECT * FROM read_text('{out}/./escape/../../secret.txt')",
])
def test_no_file_outside_the_dataset_is_readable(target, sql):
    _refused(target, sql.format(base=target.parent, out=target))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1) TO '{base}/written.csv'",
    "COPY images TO '{base}/written.parquet' (FORMAT parquet)",
    "COPY (SELECT * FROM images LIMIT 0) TO '{out}/images/part-00000.parquet' (FORMAT parquet)",
    "EXPLAIN ANALYZE COPY (SELECT * FROM images LIMIT 0) TO '{out}/images/part-00000.parquet' (FORMAT parquet)",
    "explain analyse copy (select 1) to '{base}/written.csv'",
    "/* hidden */ EXPLAIN -- x\n ANALYZE (FORMAT json) COPY (SELECT 1) TO '{base}/written.csv'",
    "EXPLAIN COPY (SELECT 1) TO '{base}/written.csv'",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "SELECT 1; COPY (SELECT 1) TO '{base}/written.csv'",
    "SELECT 1; SELECT 2",
    "ATTACH '{base}/written.duckdb' AS x",
    "ATTACH ':memory:' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "SET threads = 64",
    "RESET memory_limit",
    "PRAGMA version",
    "CALL pragma_version()",
    "CREATE TABLE t AS SELECT 1",
    "CREATE OR REPLACE VIEW images AS SELECT 1",
    "DROP VIEW images",
    "EXPORT DATABASE '{base}/exported'",
    "IMPORT DATABASE '{base}/exported'",
    "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "SELECT * FROM query('COPY (SELECT 1) TO ''{base}/written.csv''')",
    "SELECT getenv('HOME')",
    "",
])
def test_only_select_class_statements_run(target, sql):
    before = (target / "images" / "part-00000.parquet").read_bytes()
    _refused(target, sql.format(base=target.parent, out=target))
    assert not any((target.parent / n).exists() for n in ("written.csv", "written.parquet", "written.duckdb", "exported"))
    assert (target / "images" / "part-00000.parquet").read_bytes() == before
    assert ShardStore(target).damaged("images") == {}


@pytest.mark.timeout(30)
def test_statement_check_unit():
    for ok in ("SELECT 1", "EXPLAIN SELECT 1", "EXPLAIN ANALYZE WITH a AS (SELECT 1) SELECT * FROM a", "DESCRIBE SELECT 1"):
        check_read_only(ok)
    for bad in ("EXPLAIN ANALYZE COPY (SELECT 1) TO 'x'", "EXPLAIN ANALYZE", "EXPLAIN (FORMAT json)", "COPY x TO 'y'"):
        with pytest.raises(QueryError):
            check_read_only(bad)


@pytest.mark.timeout(60)
def test_a_query_that_runs_forever_is_stopped_by_the_timeout(target):
    t0 = time.monotonic()
    out = _refused(target, FOREVER, "--timeout", "1.5")
    assert "stopped after 1.5 s" in out and time.monotonic() - t0 < 30


@pytest.mark.timeout(60)
def test_memory_limit_and_threads_hold(target):
    out = _refused(target, "SELECT list(i) FROM range(40000000) t(i)", "--memory-limit", "30MB")
    assert "memory" in out.lower()
    res = _query(target, "SELECT current_setting('threads') AS t, current_setting('memory_limit') AS m",
                 "--threads", "1", "--memory-limit", "300MB", "--format", "json")
    row = json.loads(res.stdout)[0]
    assert row["t"] == 1 and row["m"].startswith(("286", "300"))
    _refused(target, "SELECT 1", "--memory-limit", "lots")


@pytest.mark.timeout(60)
def test_table_output_is_capped_and_says_how_many_rows_were_cut(target):
    res = _query(target, "SELECT i FROM range(2500) t(i)", "--max-rows", "100")
    assert res.exit_code == 0
    assert "2400 more rows not shown (2500 in all" in res.output
    assert "│ 99 " in res.stdout and "│ 100 " not in res.stdout
    res = _query(target, "SELECT i FROM range(2500) t(i)", "--max-rows", "100", "--format", "csv")
    assert len(res.stdout.splitlines()) == 2501  # csv / json are not capped


@pytest.mark.timeout(120)
def test_ctrl_c_stops_a_query_without_a_traceback(target):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "query", str(target), FOREVER, "--timeout", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    time.sleep(5)  # imports + views, then the query is running (an earlier Ctrl-C ends the same way)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err, err
    assert time.monotonic() - t0 < 15


@pytest.mark.timeout(60)
def test_ctrl_c_inside_a_long_lived_process_stops_only_the_query(target):
    """A service calling execute_query keeps running: SIGINT interrupts the query, not the process."""
    import threading

    from engine.views.query import QueryInterrupted, execute_query

    timer = threading.Timer(3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(QueryInterrupted):
        execute_query(target, FOREVER, timeout=40)
    timer.join()
    assert execute_query(target, "SELECT count(*) FROM images").rows == [(4,)]



# ---- issue 21 item 4: bounded all the way (temp folder, streaming, cell / output caps, options, JSON) ----
from bounded import fld_bounded  # noqa: E402


def _planted_temp(cwd):
    """Secrets where DuckDB spills by default (<cwd>/.tmp) and in another query's private folder."""
    (cwd / ".tmp").mkdir(parents=True)
    (cwd / ".tmp" / "spill.txt").write_text(SECRET)
    other = cwd.parent / "tmp" / "fld-query-other"
    other.mkdir(parents=True)
    (other / "duckdb_temp_storage-0.tmp").write_text(SECRET)
    return other


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_text('.tmp/spill.txt')",
    "SELECT * FROM read_text('{cwd}/.tmp/spill.txt')",
    "SELECT * FROM glob('{cwd}/.tmp/*')",
    "SELECT * FROM read_text('{other}/duckdb_temp_storage-0.tmp')",
    "SELECT * FROM glob('{tmp}/*/*')",
    "SELECT * FROM read_text(current_setting('temp_directory') || '/../fld-query-other/duckdb_temp_storage-0.tmp')",
])
def test_no_spill_folder_but_the_querys_own_is_readable(target, tmp_path, sql):
    cwd = tmp_path / "cwd"
    other = _planted_temp(cwd)
    res = fld_bounded("query", target, sql.format(cwd=cwd, other=other, tmp=other.parent), cwd=cwd,
                      env={"TMPDIR": str(other.parent)}).check(2, clean=False)
    assert SECRET not in res.stdout + res.stderr
    assert sorted(p.name for p in other.parent.iterdir()) == ["fld-query-other"]  # the query's own folder is gone


@pytest.mark.timeout(180)
def test_a_query_that_spills_leaves_nothing_behind(target):
    """30MB of memory for a 3M-row sort: it spills into its private folder, which goes with it."""
    res = fld_bounded("query", target, "SELECT count(*) AS n FROM (SELECT hash(i)::VARCHAR s FROM range(3000000) t(i) "
                      "ORDER BY s)", "--memory-limit", "60MB", "--threads", "1", "--format", "json").check(0)
    assert json.loads(res.stdout) == [{"n": 3000000}]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_csv_and_json_rows_are_streamed_not_held(target, fmt):
    """500k rows of 200 characters (100 MB of output) in a bounded process: held at once they
    cost several times that (measured before streaming: over 500 MiB)."""
    res = fld_bounded("query", target, "SELECT i, repeat('x', 200) AS s FROM range(500000) t(i)", "--format", fmt,
                      address_space_gib=4).check(0, rss_mib=350)
    if fmt == "json":
        rows = json.loads(res.stdout)
        assert len(rows) == 500000 and rows[-1] == {"i": 499999, "s": "x" * 200}
    else:
        assert res.stdout.count("\n") == 500001


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fmt,extra", [("csv", []), ("json", []), ("table", ["--max-rows", "10"])])
def test_output_bounds_are_kept_and_said(target, fmt, extra):
    res = fld_bounded("query", target, "SELECT i, repeat('y', 3000) AS s FROM range(1000000) t(i)", "--format", fmt,
                      "--max-bytes", "200000", *extra).check(0, seconds=60, rss_mib=600)
    if fmt == "table":
        assert "999990 more rows not shown" in res.stderr and "cells cut to 2000" in res.stderr
        assert len(res.stdout) < 100_000
    else:
        assert len(res.stdout.encode()) <= 200_000 + 10 and "output cut at" in res.stderr and "--max-bytes" in res.stderr
        if fmt == "json":
            assert 0 < len(json.loads(res.stdout)) < 100  # still a valid array


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sql,fmt", [
    ("SELECT repeat('z', 60000000) AS big", "table"),
    ("SELECT repeat('z', 60000000) AS big", "csv"),
    ("SELECT repeat('z', 60000000) AS big", "json"),
    ("SELECT range(3000000) AS big", "json"),
    ("SELECT range(3000000) AS big", "table"),
    ("SELECT {'a': repeat('q', 5000000)} AS big", "csv"),
    ("SELECT repeat('z', 5000000)::BLOB AS big", "json"),
])
def test_huge_cells_are_cut_and_said(target, sql, fmt):
    res = fld_bounded("query", target, sql, "--format", fmt, "--max-cell", "1000", "--timeout", "30").check(
        0, seconds=40, rss_mib=1500)
    assert "cells cut to" in res.stderr, res.stderr
    assert len(res.stdout) < 10_000
    if fmt == "json":
        assert json.loads(res.stdout)[0]["big"].endswith("chars]")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_one_timeout_covers_fetching_and_printing(target, fmt):
    """An endless stream of rows: each batch is fast, the whole command is not."""
    t0 = time.monotonic()
    res = fld_bounded("query", target, "SELECT i, repeat('w', 100) FROM range(1000000000000) t(i)", "--format", fmt,
                      "--timeout", "3").check(2, seconds=40, rss_mib=800)
    assert "stopped after 3 s" in res.stderr and time.monotonic() - t0 < 40


@pytest.mark.timeout(180)
@pytest.mark.parametrize("option,value,says", [
    ("--threads", "100000", "--threads"), ("--threads", "0", "--threads"), ("--threads", "-3", "--threads"),
    ("--max-rows", "-5", "--max-rows"), ("--memory-limit", "99999999TB", "--memory-limit"),
    ("--memory-limit", "0B", "--memory-limit"), ("--memory-limit", "1e9", "--memory-limit"),
    ("--memory-limit", "5MB", "--memory-limit"), ("--memory-limit", "1" * 40, "--memory-limit"),
    ("--timeout", "-1", "--timeout"), ("--timeout", "nan", "--timeout"), ("--timeout", "inf", "--timeout"),
    ("--timeout", "0", "--timeout"), ("--max-bytes", "0", "--max-bytes"), ("--max-cell", "-1", "--max-cell"),
])
def test_query_options_are_checked_in_one_line(target, option, value, says):
    res = fld_bounded("query", target, "SELECT 1", option, value).check(2, seconds=30)
    assert says in res.stderr


@pytest.mark.timeout(120)
def test_json_output_is_strict_and_keeps_same_named_columns(target):
    sql = ("SELECT 'NaN'::DOUBLE AS a, 'Infinity'::DOUBLE AS a, '-inf'::FLOAT AS a_2, [1.5, 'nan'::DOUBLE] AS l, "
           "{'x': 'inf'::DOUBLE, 'y': 2.0::DOUBLE} AS s, 1 AS n, 2 AS n")
    res = fld_bounded("query", target, sql, "--format", "json").check(0)

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    assert json.loads(res.stdout, parse_constant=no_constants) == [
        {"a": None, "a_2": None, "a_2_2": None, "l": [1.5, None], "s": {"x": None, "y": 2.0}, "n": 1, "n_2": 2}]
