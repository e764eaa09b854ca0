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


def collect_stats(out: str | Path, step: str | None = None) -> list[Table]:
    store = ShardStore(out)
    folder = resolve_step(store, step)
    con = open_views(out, step)
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
    t = round_metrics_table(store)
    if t["rows"]:
        tables.append(t)
    con.close()
    return tables


def round_metrics(out) -> list[dict]:
    """Every completed refinement round's metrics from manifest.json (`rounds`), in round order."""
    store = out if isinstance(out, ShardStore) else ShardStore(out)
    rounds = store.read_manifest().get("rounds") or {}
    return [rounds[k] for k in sorted(rounds, key=int)]


def round_metrics_table(store) -> dict:
    """The table `fld stats` prints: one row per round, saying plainly when a round added nothing."""
    cols = ["round", "train loss first -> last", "relabel: images with output / images, annotations added",
            "object F1@0.5 / mIoU vs k-1", "text F1@0.5", "brief / detailed caption F1 vs k-1", "mAP / mAP50 vs human", "model"]
    rows = []
    for m in round_metrics(store):
        a = m.get("agreement", {})
        gt = m.get("ground_truth") or {}
        t = m.get("train", {})
        r = m.get("relabel") or {}
        loss = f"{t.get('first_loss', float('nan')):.3f} -> {t.get('last_loss', float('nan')):.3f}" if t.get("last_loss") is not None else ""
        added = ", ".join(f"{k}={v}" for k, v in (r.get("added") or {}).items() if v)
        made = f"{r.get('images_with_output', '-')} / {r.get('images', '-')}, {added or 'NONE: the model produced no parseable annotation'}"
        rows.append([
            m.get("round"), loss, made,
            f"{a.get('object_f1@0.5', '-')} / {a.get('object_mean_iou', '-')}",
            a.get("text_f1@0.5", "-"),
            f"{a.get('brief_token_f1', '-')} / {a.get('detailed_token_f1', '-')}",
            f"{gt['map']} / {gt['map50']}" if gt else "-",
            m.get("model_dir", ""),
        ])
    return {"title": "refinement rounds (stage 3)", "columns": cols, "rows": rows}
