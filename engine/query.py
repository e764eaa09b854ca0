"""Read-only DuckDB views over an OUT folder: one row per annotation, with its image_id.

Views: records (nested image records of one step), texts, regions, groundings, images
(without bytes), quarantine. Only committed shards are visible. Statements other than
SELECT / WITH / EXPLAIN / DESCRIBE / SHOW / SUMMARIZE are refused, so `fld query` can never
change or copy out the dataset.
"""
from __future__ import annotations

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
ALLOWED_STATEMENTS = {"SELECT", "EXPLAIN"}  # DESCRIBE / SHOW / SUMMARIZE parse as SELECT


class QueryError(ValueError):
    pass


def _files_sql(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def resolve_step(store: ShardStore, step: str | None) -> str | None:
    """The annotation folder a reader shows: `step` when given, else the dataset the engine produced,
    i.e. the last step or refinement round (in the order they run) whose every shard is committed;
    a round still running is not the default view until it is complete."""
    folders = [f for f in store.annotation_folders() if store.shards(f)]
    if step is None:
        images = len(store.shards("images"))
        complete = [f for f in folders if len(store.shards(f)) >= images]
        return (complete or folders or [None])[-1]
    folder = step if step.startswith("annotations/") else f"annotations/{step}"
    if folder not in folders:
        names = [f.split("/", 1)[1] for f in folders]
        raise QueryError(f"{store.out} has no committed step {step!r}; steps with data: {names}")
    return folder


def open_views(out: str | Path, step: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views of OUT defined."""
    store = ShardStore(out)
    if not store.out.exists():
        raise QueryError(f"{out}: no such output folder")
    con = duckdb.connect()
    folder = resolve_step(store, step)
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
    return con


def check_read_only(sql: str) -> None:
    """Refuse anything but reading: DELETE, COPY ... TO, CREATE, ATTACH, SET, INSTALL ..."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"SQL does not parse: {exc}") from None
    if not statements:
        raise QueryError("empty SQL")
    for st in statements:
        kind = st.type.name if hasattr(st.type, "name") else str(st.type)
        if kind not in ALLOWED_STATEMENTS:
            raise QueryError(f"fld query is read-only: {kind} statements are refused ({st.query.strip()[:60]!r})")


def run_query(out: str | Path, sql: str, step: str | None = None):
    """(column names, rows) of a read-only SQL query over OUT's views."""
    check_read_only(sql)
    con = open_views(out, step)
    try:
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description] if cur.description else []
        return cols, cur.fetchall()
    except duckdb.Error as exc:
        raise QueryError(str(exc).splitlines()[0]) from None
    finally:
        con.close()
