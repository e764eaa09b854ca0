"""`fld stats OUT`: what OUT holds, section by section, from committed shards only.

Every number comes from the shards and their commit records, never from fields the driver
writes into manifest.json at the end of a run, so `fld stats` during a run shows what is
committed so far (the same data `fld query` sees).

Returns {section key: titled table}; the CLI renders the tables in this order and
`--format json` prints the dict as is. Section keys are stable (README "fld stats"):
ingest, quarantine, annotations, per_image, counters, table2, table3, funnel, checks, rounds; with human
annotations also calibration, calibration_checks, calibration_rules, calibration_drops (engine/calibrate.py).
A section without data for this OUT (no annotation step yet, no rounds) is left out.
"""
from __future__ import annotations

from pathlib import Path

from engine.counters import summary_cells
from engine.fld5b import DEFAULT_SAMPLE, fld5b_tables
from engine.funnel import funnel_tables
from engine.query import open_views, resolve_step
from engine.run import aggregate_counters
from engine.store import ShardStore
from schemas.records import ANNOTATION_KINDS

Table = dict  # {"title": str, "columns": [...], "rows": [[...], ...]}
INGEST_KEYS = ("inputs", "images", "quarantined", "duplicates")


def _table(con, title: str, sql: str) -> Table:
    cur = con.execute(sql)
    return {"title": title, "columns": [d[0] for d in cur.description], "rows": [list(r) for r in cur.fetchall()]}


def committed_folders(store: ShardStore) -> list[str]:
    """Annotation folders (steps, then rounds) with at least one committed shard."""
    return [f for f in store.annotation_folders() if store.shards(f)]


def collect_stats(out: "str | Path | ShardStore", step: str | None = None, sample: int = DEFAULT_SAMPLE) -> dict[str, Table]:
    """All sections for OUT; `step` narrows the annotation sections to one step or round
    (default: the latest for status / funnel, every step side by side for Tables 2 and 3)."""
    store = ShardStore.of(out)
    folder = resolve_step(store, step)
    con = open_views(store, step)
    sections: dict[str, Table] = {}
    ingest = aggregate_counters(store, "images")
    sections["ingest"] = {
        "title": "ingest, committed shards (inputs = images + quarantined + duplicates)",
        "columns": list(INGEST_KEYS),
        "rows": [[ingest.get(k, 0) for k in INGEST_KEYS]],
    }
    sections["quarantine"] = _table(con, "quarantine by reason",
                                    "SELECT reason, count(*) AS n FROM quarantine GROUP BY reason ORDER BY n DESC, reason")
    counters = {f.split("/", 1)[1]: aggregate_counters(store, f) for f in committed_folders(store)}
    if folder is not None:
        parts = [
            f"SELECT '{name}' AS type, status, coalesce(reason, '') AS reason, count(*) AS n FROM {name} GROUP BY ALL"
            for name in ANNOTATION_KINDS
        ]
        sections["annotations"] = _table(con, f"annotations of {folder} by status and reason",
                                         " UNION ALL ".join(parts) + " ORDER BY type, status DESC, n DESC, reason")
        sections["per_image"] = _table(con, f"per image ({folder})", """
            SELECT count(*) AS images,
                   round(avg(len(texts)), 2) AS texts_per_image,
                   round(avg(len(regions)), 2) AS regions_per_image,
                   round(avg(len(groundings)), 2) AS groundings_per_image,
                   sum(len(errors)) AS stage_errors
            FROM records""")
    sections["counters"] = {
        "title": "per-stage counters (committed shards)",
        "columns": ["step", "stage", "records in", "records out", "added", "dropped", "errors", "seconds"],
        "rows": [[step_name, stage, *summary_cells(c)] for step_name, stages in counters.items() for stage, c in stages.items()],
    }
    if folder is not None:
        sections.update(fld5b_tables(out, [folder] if step else committed_folders(store), sample))
        # only the first reason is stored, so the funnel follows the order the filters ran in
        order = [stage for step_counters in counters.values() for stage in step_counters] or None
        sections["funnel"], sections["checks"] = funnel_tables(con, order)
    con.close()
    if folder is not None:  # filter quality against the human annotations, where OUT has some (fld calibrate)
        from engine.calibrate import calibration_sections

        sections.update(calibration_sections(store, step))
    t = round_metrics_table(store)
    if t["rows"]:
        sections["rounds"] = t
    return sections



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
