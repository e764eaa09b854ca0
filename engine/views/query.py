"""Read-only DuckDB views over OUT, in a sandbox: one row per annotation, with its image_id.

Views: records (nested image records of one step), texts, regions, groundings, images
(without bytes), quarantine. Only committed, intact shards are visible (a damaged one is an
error naming it). `fld query` could be a shared query service, so the SQL is untrusted:
- one statement, SELECT-class only (SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE;
  EXPLAIN [ANALYZE] only of such a statement): no COPY, ATTACH, INSTALL/LOAD, SET, PRAGMA,
  CREATE, EXPORT, CALL ...;
- the connection is locked down after the views are built: files are readable only inside
  OUT (`allowed_directories`, `enable_external_access = false`: read_csv/read_text/glob of
  anything else and every write are refused), no extension auto-install/auto-load, memory and
  thread limits, then `lock_configuration = true` so the query cannot undo any of it;
- DuckDB adds its `temp_directory` to `allowed_directories` (default `<cwd>/.tmp`, shared by every
  query started there): each connection spills into a fresh private folder (mode 0700, removed with
  the connection) capped at `max_temp_directory_size`, so SQL sees no other query's spill files;
- options are checked first (threads 1..MAX_THREADS, memory limit 16MB..physical memory, timeout > 0);
- one timeout covers the whole command: views, query, fetching and printing (rows are streamed to
  the printer in batches, never held all at once); Ctrl-C stops it; output is bounded (table: rows
  and characters per cell; csv / json: bytes per cell and in all), each cut said on stderr.
Object stores are read through the store's fsspec filesystem (`register_filesystem`); with
external access off DuckDB applies `allowed_directories` to those URLs too (checked on
SeaweedFS and memory://), so other buckets and prefixes are refused as local paths are.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Protocol
from pathlib import Path

import duckdb

from engine.store import ShardStore

COMMON = (
    "a.source.annotator AS annotator, a.source.model AS model, a.source.revision AS revision, "
    "a.source.params_hash AS params_hash, a.round AS round, a.score AS score, a.checks AS checks, "
    "a.status AS status, a.reason AS reason"
)
VIEW_COLUMNS = {
    "texts": "a.ann_id AS ann_id, a.tier AS tier, a.text AS text",
    "regions": "a.ann_id AS ann_id, a.kind AS kind, a.box AS box, a.quad AS quad, a.polygon AS polygon, "
    "a.mask AS mask, a.label AS label, a.brief AS brief",
    "groundings": "a.ann_id AS ann_id, a.text_ann_id AS text_ann_id, a.phrase AS phrase, "
    "a.char_start AS char_start, a.char_end AS char_end, a.box AS box, a.mask AS mask",
}
ALLOWED_STATEMENTS = {"SELECT"}  # DESCRIBE / SHOW / SUMMARIZE / FROM / VALUES parse as SELECT
DEFAULT_TIMEOUT = 60.0
DEFAULT_MEMORY_LIMIT = "2GB"
DEFAULT_THREADS = 2
DEFAULT_MAX_ROWS = 1000
DEFAULT_TEMP_LIMIT = "4GB"  # spill space of one query
MAX_THREADS = 256  # DuckDB aborts the process on absurd thread counts (100000 measured)
MIN_MEMORY = 16 * 1000**2
FETCH_BATCH = 256  # rows moved from DuckDB to Python at a time


class QueryError(ValueError):
    pass


class QueryInterrupted(QueryError):
    """Stopped by Ctrl-C."""


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple]
    total: int  # rows the query produced; len(rows) is smaller when max_rows cut it

    @property
    def cut(self) -> int:
        return self.total - len(self.rows)


def _files_sql(paths: list[str]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def resolve_step(store: ShardStore, step: str | None) -> str | None:
    """The annotation folder a reader reads (default: the latest step or round with commits),
    after checking that it, images/ and quarantine/ are intact: every reader (query, stats,
    show, export) comes through here, so a damaged shard fails the read and is never skipped."""
    folders = [f for f in store.annotation_folders() if store.records(f)]
    if step is None:  # the dataset the engine produced: the last step or round whose every shard is committed
        images = len(store.records("images"))
        complete = [f for f in folders if len(store.records(f)) >= images]
        folder = (complete or folders or [None])[-1]
    else:
        folder = step if step.startswith("annotations/") else f"annotations/{step}"
        if folder not in folders:
            names = [f.split("/", 1)[1] for f in folders]
            raise QueryError(f"{store.out} has no committed step {step!r}; steps with data: {names}")
    store.require_intact(["images", "quarantine"] + ([folder] if folder else []))
    return folder


def _allowed_directories(store: ShardStore) -> list[str]:
    if store.local:
        return [store.root.rstrip("/") + "/"]
    url = store.url().rstrip("/") + "/"
    # DuckDB checks the URL as written and as fsspec spells it (memory:///ds for memory://ds)
    return sorted({url, f"{store.protocol}://{store.root.rstrip('/')}/"})


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 50


def _memory_limit(value: str, option: str = "--memory-limit") -> str:
    """A size DuckDB accepts, in bytes, between 16MB and this machine's physical memory."""
    m = re.fullmatch(r"(\d{1,15}(?:\.\d{1,6})?)\s*([KMGT]i?B|B)?", str(value).strip(), re.IGNORECASE)
    if not m:
        raise QueryError(f"{option} must look like 2GB or 512MiB, not {str(value)[:40]!r}")
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    top = _physical_memory()
    if not MIN_MEMORY <= size <= top:
        raise QueryError(f"{option} must be between 16MB and this machine's memory ({top / 1e9:.1f}GB), "
                         f"not {str(value)[:40]!r}")
    return f"{size}B"


def check_limits(memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int = DEFAULT_THREADS,
                 timeout: float | None = DEFAULT_TIMEOUT, max_rows: int | None = None) -> None:
    """Every option of a query checked before anything runs: one QueryError naming it."""
    _memory_limit(memory_limit)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise QueryError(f"--threads must be between 1 and {MAX_THREADS}, not {threads}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise QueryError(f"--timeout must be a positive number of seconds, not {timeout}")
    if max_rows is not None and max_rows < 0:
        raise QueryError(f"--max-rows must be 0 or more, not {max_rows}")


def _private_temp(con: duckdb.DuckDBPyConnection) -> str:
    """A fresh 0700 folder for this connection's spill files, removed with the connection."""
    folder = tempfile.mkdtemp(prefix="fld-query-")
    weakref.finalize(con, shutil.rmtree, folder, True)
    return folder


def lock_down(con: duckdb.DuckDBPyConnection, store: ShardStore, memory_limit: str = DEFAULT_MEMORY_LIMIT,
              threads: int = DEFAULT_THREADS) -> None:
    """After the views exist: reads only inside OUT, no writes, no extensions, limits, locked."""
    check_limits(memory_limit, threads, None)
    con.execute(f"SET temp_directory = {_files_sql([_private_temp(con)])[1:-1]}")
    con.execute(f"SET max_temp_directory_size = '{DEFAULT_TEMP_LIMIT}'")
    con.execute(f"SET allowed_directories = {_files_sql(_allowed_directories(store))}")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute(f"SET memory_limit = '{_memory_limit(memory_limit)}'")
    con.execute(f"SET threads = {int(threads)}")
    con.execute("SET lock_configuration = true")


def open_views(out: ShardStore | str | Path, step: str | None = None, storage_options: dict | None = None,
               memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int = DEFAULT_THREADS) -> duckdb.DuckDBPyConnection:
    """An in-memory, locked-down DuckDB connection with the views of OUT defined."""
    store = ShardStore.of(out, storage_options)
    check_limits(memory_limit, threads, None)
    store.probe()
    with store.snapshot():
        folder = resolve_step(store, step)
        con = duckdb.connect()
        try:
            _create_views(con, store, folder)
            lock_down(con, store, memory_limit, threads)
        except BaseException:
            con.close()
            raise
    return con


def _create_views(con: duckdb.DuckDBPyConnection, store: ShardStore, folder: str | None) -> None:
    store.register_with(con)
    images = store.shard_files("images")
    if images:
        con.execute(
            "CREATE VIEW images AS SELECT image_id, uri, source, width, height, format, mode "
            f"FROM read_parquet({_files_sql(images)})"
        )
    else:
        con.execute("CREATE VIEW images AS SELECT NULL::VARCHAR image_id, NULL::VARCHAR uri, NULL::VARCHAR source, "
                    "NULL::INT width, NULL::INT height, NULL::VARCHAR format, NULL::VARCHAR mode WHERE false")
    quarantine = store.shard_files("quarantine")
    if quarantine:
        con.execute(f"CREATE VIEW quarantine AS SELECT * FROM read_parquet({_files_sql(quarantine)})")
    else:
        con.execute("CREATE VIEW quarantine AS SELECT NULL::VARCHAR uri, NULL::VARCHAR source, NULL::VARCHAR reason, "
                    "NULL::VARCHAR detail, NULL::VARCHAR image_id, NULL::VARCHAR duplicate_of WHERE false")
    if folder is not None:
        con.execute(f"CREATE VIEW records AS SELECT * FROM read_parquet({_files_sql(store.shard_files(folder))})")
        for name, cols in VIEW_COLUMNS.items():
            con.execute(
                f"CREATE VIEW {name} AS SELECT image_id, {cols}, {COMMON} "
                f"FROM (SELECT image_id, UNNEST({name}) AS a FROM records)"
            )


def _explained(sql: str) -> str:
    """The statement an EXPLAIN [ANALYZE] [(options)] statement is about."""
    tokens = [(pos, kind.name) for pos, kind in duckdb.tokenize(sql) if kind.name != "comment"]
    i = 1  # tokens[0] is EXPLAIN
    if i < len(tokens) and sql[tokens[i][0]:].upper().startswith(("ANALYZE", "ANALYSE")):
        i += 1
    if i < len(tokens) and sql[tokens[i][0]] == "(":
        depth = 0
        for j in range(i, len(tokens)):
            ch = sql[tokens[j][0]]
            if tokens[j][1] == "operator" and ch in "()":
                depth += 1 if ch == "(" else -1
                if depth == 0:
                    i = j + 1
                    break
    return sql[tokens[i][0]:] if i < len(tokens) else ""


def check_read_only(sql: str) -> None:
    """Exactly one SELECT-class statement (or EXPLAIN of one); anything else is refused."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"SQL does not parse: {str(exc).splitlines()[0]}") from None
    if not statements:
        raise QueryError("empty SQL")
    if len(statements) > 1:
        raise QueryError(f"fld query runs one statement at a time, got {len(statements)}")
    st = statements[0]
    kind = st.type.name if hasattr(st.type, "name") else str(st.type)
    if kind == "EXPLAIN":
        inner = _explained(st.query)
        try:
            inner_statements = duckdb.extract_statements(inner)
        except duckdb.Error:
            inner_statements = []
        inner_kinds = [s.type.name for s in inner_statements]
        if inner_kinds != ["SELECT"]:
            raise QueryError(f"fld query is read-only: EXPLAIN is allowed of a SELECT only, not of {inner_kinds or inner[:40]!r}")
        return
    if kind not in ALLOWED_STATEMENTS:
        raise QueryError(f"fld query is read-only: {kind} statements are refused ({st.query.strip()[:60]!r})")


class RowSink(Protocol):
    """Where streamed rows go (engine.cli prints them): called on the query's worker thread."""

    def start(self, columns: list[str]) -> None: ...

    def write(self, rows: list[tuple]) -> bool: ...  # False: the sink is full, stop fetching

    def finish(self, total: int | None) -> None: ...  # total: rows the query produced (None: not counted)


class _Collect:
    """The default sink: rows in memory up to max_rows, the rest counted."""

    def __init__(self, max_rows: int | None):
        self.max_rows = max_rows
        self.columns: list[str] = []
        self.rows: list[tuple] = []
        self.total: int | None = 0

    def start(self, columns: list[str]) -> None:
        self.columns = columns

    def write(self, rows: list[tuple]) -> bool:
        room = len(rows) if self.max_rows is None else max(0, self.max_rows - len(self.rows))
        self.rows.extend(rows[:room])
        return True  # the rest is counted, not held

    def finish(self, total: int | None) -> None:
        self.total = total


def execute_query(out: ShardStore | str | Path, sql: str, step: str | None = None, *, storage_options: dict | None = None,
                  max_rows: int | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                  memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int = DEFAULT_THREADS,
                  sink: RowSink | None = None) -> QueryResult | None:
    """Run untrusted read-only SQL over OUT's views with the sandbox's limits.

    Without `sink` the rows come back as a QueryResult (at most max_rows of them, the rest
    counted). With a sink, rows are streamed to it FETCH_BATCH at a time on the worker thread
    and nothing is returned: the timeout then covers its printing too (one deadline from this
    call: views, query, fetch, sink), and a sink that returns False ends the fetching.

    The query runs on a worker thread while this thread waits in short steps, so the timeout
    and Ctrl-C both end in `con.interrupt()`. Ctrl-C is taken by a SIGINT handler rather than
    as KeyboardInterrupt: DuckDB 2.0 aborts the process when a KeyboardInterrupt is raised
    while another thread runs a query (measured), and its connection then refuses to close."""
    started = time.monotonic()
    check_limits(memory_limit, threads, timeout, max_rows)
    check_read_only(sql)
    collect = None
    if sink is None:
        sink = collect = _Collect(max_rows)
    state: dict = {"con": None, "stopped_by": None}

    def on_sigint(signum, frame) -> None:
        if state["con"] is None:
            raise KeyboardInterrupt
        state["stopped_by"] = state["stopped_by"] or "ctrl-c"
        state["con"].interrupt()

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    try:
        try:
            con = open_views(out, step, storage_options, memory_limit, threads)
        except KeyboardInterrupt:
            raise QueryInterrupted("query interrupted (Ctrl-C)") from None
        state["con"] = con
        deadline = None if timeout is None else started + timeout
        _run_interruptible(con, sql, sink, deadline, timeout, state)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if collect is None:
        return None
    return QueryResult(collect.columns, collect.rows, collect.total if collect.total is not None else len(collect.rows))


GRACE = 5.0  # seconds a sink may take to notice a stop before the caller is answered anyway


def _run_interruptible(con: duckdb.DuckDBPyConnection, sql: str, sink: RowSink, deadline: float | None,
                       timeout: float | None, state: dict) -> None:
    outcome: dict = {}

    def work() -> None:
        try:
            cur = con.execute(sql)
            sink.start([d[0] for d in cur.description] if cur.description else [])
            total: int | None = 0
            while state["stopped_by"] is None and (chunk := cur.fetchmany(FETCH_BATCH)):
                total += len(chunk)
                if not sink.write(chunk):
                    total = None
                    break
            if state["stopped_by"] is None:
                sink.finish(total)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc
        finally:
            outcome["done"] = True

    worker = threading.Thread(target=work, name="fld-query", daemon=True)
    worker.start()
    stopped_at = None
    while worker.is_alive():
        worker.join(0.05)
        if deadline is not None and state["stopped_by"] is None and time.monotonic() > deadline:
            state["stopped_by"] = "timeout"
        if state["stopped_by"] is not None:
            if stopped_at is None:
                stopped_at = time.monotonic()
                con.interrupt()
            elif time.monotonic() - stopped_at > GRACE:
                break  # a sink busy printing: answer now, the daemon thread ends with the process
    if not worker.is_alive():
        con.close()
    if state["stopped_by"] == "timeout":
        raise QueryError(f"query stopped after {timeout:g} s (--timeout, counted over the whole command); "
                         "narrow it down or raise the limit")
    if state["stopped_by"] == "ctrl-c":
        raise QueryInterrupted("query interrupted (Ctrl-C)")
    if "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, duckdb.Error):
            raise QueryError(str(exc).splitlines()[0]) from None
        raise exc


def run_query(out: ShardStore | str | Path, sql: str, step: str | None = None, **limits):
    """(column names, rows) of a read-only SQL query over OUT's views (see execute_query)."""
    result = execute_query(out, sql, step, **limits)
    return result.columns, result.rows
