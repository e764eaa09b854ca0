"""`fld stats OUT`: counts per table and per status / reason, per-stage counters, funnel.

Returns plain data (list of titled tables) so the CLI renders it with rich and tests
assert on it.
"""
from __future__ import annotations

from pathlib import Path

from engine.counters import summary_cells
from engine.funnel import funnel_tables
from engine.query import open_views, resolve_step
from engine.store import ShardStore

Table = dict  # {"title": str, "columns": [...], "rows": [[...], ...]}


def _table(con, title: str, sql: str) -> Table:
    cur = con.execute(sql)
    return {"title": title, "columns": [d[0] for d in cur.description], "rows": [list(r) for r in cur.fetchall()]}


def collect_stats(out: "str | Path | ShardStore", step: str | None = None) -> list[Table]:
    store = ShardStore.of(out)
    folder = resolve_step(store, step)
    con = open_views(store, step)
    tables: list[Table] = []
    manifest = store.read_manifest()
    ingest = manifest.get("ingest", {})
    tables.append(
        {
            "title": "ingest (inputs = images + quarantined + duplicates)",
            "columns": ["inputs", "images", "quarantined", "duplicates"],
            "rows": [[ingest.get(k, 0) for k in ("inputs", "images", "quarantined", "duplicates")]],
        }
    )
    tables.append(_table(con, "quarantine by reason", "SELECT reason, count(*) AS n FROM quarantine GROUP BY reason ORDER BY n DESC"))
    if folder is not None:
        parts = [
            f"SELECT '{name}' AS type, status, coalesce(reason, '') AS reason, count(*) AS n FROM {name} GROUP BY ALL"
            for name in ("texts", "regions", "groundings")
        ]
        tables.append(_table(con, f"annotations of {folder} by status and reason",
                             " UNION ALL ".join(parts) + " ORDER BY type, status DESC, n DESC"))
        tables.append(_table(con, f"per image ({folder})", """
            SELECT count(*) AS images,
                   round(avg(len(texts)), 2) AS texts_per_image,
                   round(avg(len(regions)), 2) AS regions_per_image,
                   round(avg(len(groundings)), 2) AS groundings_per_image,
                   sum(len(errors)) AS stage_errors
            FROM records"""))
        tables.append(_table(con, "texts per tier (kept): count and mean words", """
            SELECT tier, count(*) AS n, round(avg(len(string_split(text, ' '))), 2) AS mean_words
            FROM texts WHERE status = 'kept' GROUP BY tier ORDER BY tier"""))
    counters = manifest.get("counters", {})
    rows = []
    for step_name, stages in counters.items():
        for stage, c in stages.items():
            rows.append([step_name, stage, *summary_cells(c)])
    tables.append({"title": "per-stage counters (all committed shards)",
                   "columns": ["step", "stage", "records in", "records out", "added", "dropped", "errors", "seconds"],
                   "rows": rows})
    if folder is not None:
        # only the first reason is stored, so the funnel follows the order the filters ran in
        order = [stage for step_counters in counters.values() for stage in step_counters] or None
        tables.extend(funnel_tables(con, order))
    try:
        from refine.metrics import round_metrics_table
    except ImportError:
        round_metrics_table = None
    if round_metrics_table is not None:
        t = round_metrics_table(store)
        if t and t.get("rows"):
            tables.append(t)
    con.close()
    return tables
