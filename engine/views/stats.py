"""`fld stats OUT`: what OUT holds, section by section, from committed shards only.

Every number comes from the shards and their commit records, never from fields the driver
writes into manifest.json at the end of a run, so `fld stats` during a run shows what is
committed so far (the same data `fld query` sees).

Returns {section key: titled table}; the CLI renders the tables in this order and
`--format json` prints the dict as is. Section keys are stable (README "fld stats"):
ingest, quarantine, annotations, per_image, counters, table2, table3, funnel, checks, rounds, notes; with human
annotations also calibration, calibration_checks, calibration_rules, calibration_drops (engine/views/calibrate.py).
A section without data for this OUT (no annotation step yet, no rounds) is left out.
"""
from __future__ import annotations

from pathlib import Path

from engine.counters import summary_cells
from engine.views.fld5b import DEFAULT_SAMPLE, fld5b_tables
from engine.views.funnel import funnel_tables
from engine.views.query import open_views, resolve_step
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
        from engine.views.calibrate import calibration_sections

        sections.update(calibration_sections(store, step))
    t = round_metrics_table(store)
    if t["rows"]:
        sections["rounds"] = t
    pipe = store.read_manifest().get("pipeline") or {}
    from engine.views.show import clip_note  # the report says the same

    note = clip_note(pipe.get("config"), pipe.get("models") or {})
    if note:
        sections["notes"] = {"title": "notes", "columns": ["note"], "rows": [[note]]}
    return sections



def round_metrics(out) -> list[dict]:
    """Every completed refinement round's metrics from manifest.json (`rounds`), in round order."""
    store = out if isinstance(out, ShardStore) else ShardStore(out)
    rounds = store.read_manifest().get("rounds") or {}
    return [rounds[k] for k in sorted(rounds, key=int)]


def _health_cells(h: dict) -> list[str]:
    """The round's validation and health figures (refine.health), as three cells."""
    if not h:
        return ["-", "-", "-"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    v = h.get("validation") or {}
    loss = f"{v.get('images', 0)} / {fmt(h.get('val_loss'))}" + (f" (step {h['best_step']})" if h.get("best_step") else "")
    tasks = (h.get("tasks") or {}).values()
    distinct = [f["distinct"] for f in tasks if f.get("distinct") is not None]
    parse = [f["parse_rate"] for f in tasks if f.get("parse_rate") is not None]
    figures = " / ".join(fmt(x) for x in (min(distinct, default=None), min(parse, default=None), h.get("same_across_tasks"),
                                          h.get("box_recall"), h.get("box_precision"), h.get("mention_precision")))
    if not h.get("checked"):
        verdict = "unchecked"
    else:
        failed = h.get("failed") or []  # the first failed check; manifest.json rounds.<k>.health.failed lists all
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        tasks = h.get("dropped_tasks") or []
        if h.get("ok"):
            verdict = "passed"
        elif tasks and not h.get("model_failed"):  # per-task gating: only these tasks' relabels were dropped
            verdict = f"FAILED for {', '.join(tasks)} (those relabels dropped): " + (failed[0] if failed else "?") + more
        else:
            verdict = "FAILED: " + (failed[0] if failed else "?") + more
    return [loss, figures, verdict]


def round_metrics_table(store) -> dict:
    """The table `fld stats` prints: one row per round, saying plainly when a round added nothing."""
    cols = ["round", "train loss first -> last", "relabel: images with output / images, annotations added",
            "object F1@0.5 / mIoU vs k-1", "text F1@0.5", "brief / detailed caption F1 vs k-1", "mAP / mAP50 vs human",
            "validation images / loss (best step)", "model health: distinct min / parse min / same across tasks / "
            "box R / box P / mention P", "health check", "model"]
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
            *_health_cells(m.get("health") or {}),
            m.get("model_dir", ""),
        ])
    return {"title": "refinement rounds (stage 3)", "columns": cols, "rows": rows}


ROUND_KEYS = {"round", "round_hash", "model_dir", "train", "agreement", "ground_truth", "relabel", "seconds"}


def round_summaries(out) -> list[str]:
    """One plain line per completed round: what it trained, what it relabelled, what of its new
    annotations (round == k) the filters and the merge kept or refused and why, and any other verdict
    the round recorded in its metrics (e.g. a model health check)."""
    from engine.views.query import open_views

    store = ShardStore.of(out)
    lines = []
    for m in round_metrics(store):
        k = int(m["round"])
        t, r = m.get("train") or {}, m.get("relabel") or {}
        loss = (f" (loss {t['first_loss']:.2f} -> {t['last_loss']:.2f})"
                if t.get("first_loss") is not None and t.get("last_loss") is not None else "")
        con = open_views(store, f"round{k}")
        try:
            rows = con.execute(" UNION ALL ".join(
                f"SELECT '{kind}' AS kind, status, coalesce(reason, '') AS reason FROM {kind} WHERE round = {k}"
                for kind in ANNOTATION_KINDS).join(("SELECT status, reason, count(*) FROM (", ") GROUP BY ALL ORDER BY 3 DESC, 2"))
            ).fetchall()
        finally:
            con.close()
        kept = sum(n for status, _, n in rows if status == "kept")
        refused = ", ".join(f"{reason} x{n}" for status, reason, n in rows if status != "kept")
        line = (f"round {k}: trained {t.get('steps', '?')} steps{loss}, relabelled {r.get('images', '?')} images "
                f"({r.get('images_with_output', '?')} with parseable output); new annotations: {kept} merged"
                + (f", refused: {refused}" if refused else ", none refused"))
        other = {key: v for key, v in m.items() if key not in ROUND_KEYS}
        if other:
            line += "; " + "; ".join(f"{key}: {v}" for key, v in other.items())
        lines.append(line)
    return lines
