"""The stage-2 filter funnel: per annotation type and filter, how many came in, how many it
dropped and why; plus quantiles of every check, so thresholds can be chosen from the data
(and re-applied in SQL) instead of guessed.

Works on the DuckDB views of engine.views.query.open_views (texts, regions, groundings: one row
per annotation with status, reason, checks). Only the first reason of a drop is stored, so the
funnel is sequential: a filter's "in" is what no earlier filter dropped. The order is the
pipeline's stage order when given, else the usual stage-2 order below, then any other reason
prefix alphabetically.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from schemas.records import ANNOTATION_KINDS

STAGE2_ORDER = ("text_filter", "region_filter", "clip_score", "grounding_filter")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
QUANTILE_NAMES = tuple(f"p{round(q * 100)}" for q in QUANTILES)


def _views(con) -> list[str]:
    names = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    return [v for v in ANNOTATION_KINDS if v in names]


def _prefix(reason: str) -> str:
    return reason.split(":", 1)[0]


def _ordered(filters: Iterable[str], order: Sequence[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(order)}
    return sorted(set(filters), key=lambda f: (rank.get(f, len(rank)), f))


def funnel(con, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per (annotation type, filter) in funnel order, then a `total` row per type:
    {"type", "filter", "in", "dropped", "out", "reasons": {reason: count}}.

    A filter appears when it dropped something or wrote a check on that type.
    """
    order = list(order or []) + [f for f in STAGE2_ORDER if f not in (order or [])]
    rows: list[dict[str, Any]] = []
    for view in _views(con):
        total, dropped_total = con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE status = 'dropped') FROM {view}"
        ).fetchall()[0]
        by_reason = con.execute(
            f"SELECT coalesce(reason, '(none)'), count(*) FROM {view} WHERE status = 'dropped' "
            "GROUP BY ALL ORDER BY 2 DESC, 1"
        ).fetchall()
        check_prefixes = {
            r[0]
            for r in con.execute(
                f"SELECT DISTINCT split_part(k, '.', 1) FROM (SELECT unnest(map_keys(checks)) AS k FROM {view})"
            ).fetchall()
        }
        filters = {_prefix(reason) for reason, _ in by_reason} | (check_prefixes & set(order))
        remaining = int(total)
        for name in _ordered(filters, order):
            reasons = {reason: int(n) for reason, n in by_reason if _prefix(reason) == name}
            dropped = sum(reasons.values())
            rows.append(
                {"type": view, "filter": name, "in": remaining, "dropped": dropped, "out": remaining - dropped,
                 "reasons": reasons}
            )
            remaining -= dropped
        rows.append(
            {"type": view, "filter": "total", "in": int(total), "dropped": int(dropped_total),
             "out": int(total) - int(dropped_total), "reasons": {r: int(n) for r, n in by_reason}}
        )
    return rows


def check_quantiles(con, only_kept: bool = False) -> list[dict[str, Any]]:
    """Per annotation type and check key: n, mean and p5/p25/p50/p75/p95 of the values."""
    rows: list[dict[str, Any]] = []
    where = "WHERE status = 'kept'" if only_kept else ""
    qs = "[" + ", ".join(str(q) for q in QUANTILES) + "]"
    for view in _views(con):
        result = con.execute(
            f"SELECT k, count(v), avg(v), quantile_cont(v, {qs}) FROM ("
            f"SELECT unnest(map_keys(checks)) AS k, unnest(map_values(checks)) AS v FROM {view} {where}"
            ") WHERE v IS NOT NULL GROUP BY k ORDER BY k"
        ).fetchall()
        for key, n, mean, quantiles in result:
            row = {"type": view, "check": key, "n": int(n), "mean": float(mean)}
            row.update({name: float(v) for name, v in zip(QUANTILE_NAMES, quantiles)})
            rows.append(row)
    return rows


def funnel_tables(con, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The funnel and the check quantiles as plain titled tables (what `fld stats` prints)."""
    rows = [[r["type"], r["filter"], r["in"], r["dropped"], r["out"],
             f"{100.0 * r['dropped'] / r['in']:.1f}" if r["in"] else "-",
             ", ".join(f"{k.split(':', 1)[-1]} {v}" for k, v in r["reasons"].items())] for r in funnel(con, order)]
    quant = [[r["type"], r["check"], r["n"], round(r["mean"], 4), *(round(r[q], 4) for q in QUANTILE_NAMES)]
             for r in check_quantiles(con)]
    return [
        {"title": "filter funnel (first reason of each drop)",
         "columns": ["type", "filter", "in", "dropped", "out", "% dropped", "reasons"], "rows": rows},
        {"title": "checks (all annotations, dropped included)",
         "columns": ["type", "check", "n", "mean", *QUANTILE_NAMES], "rows": quant},
    ]


def value_histograms(con, bins: int = 20) -> list[dict[str, Any]]:
    """Per annotation type: a histogram of every check and of `score`, kept and dropped apart:
    {"type", "value_of", "lo", "hi", "n", "kept": [bins], "dropped": [bins]} (bin i covers
    lo + i * (hi - lo) / bins; a constant value falls in bin 0)."""
    out: list[dict[str, Any]] = []
    for view in _views(con):
        rows = con.execute(f"""
            WITH v AS (
                SELECT unnest(map_keys(checks)) AS k, unnest(map_values(checks)) AS x, status FROM {view}
                UNION ALL SELECT 'score', score, status FROM {view}
            ), f AS (SELECT k, x, status FROM v WHERE x IS NOT NULL AND isfinite(x)),
            r AS (SELECT k, min(x) AS lo, max(x) AS hi FROM f GROUP BY k)
            SELECT k AS value_of, lo, hi,
                   least({bins - 1}, CASE WHEN hi > lo THEN floor((x - lo) / (hi - lo) * {bins}) ELSE 0 END)::INT AS b,
                   count(*) FILTER (WHERE status = 'kept'), count(*) FILTER (WHERE status = 'dropped')
            FROM f JOIN r USING (k) GROUP BY 1, 2, 3, 4 ORDER BY value_of <> 'score', value_of, b""").fetchall()
        by_key: dict[str, dict[str, Any]] = {}
        for key, lo, hi, b, kept, dropped in rows:
            h = by_key.setdefault(key, {"type": view, "value_of": key, "lo": float(lo), "hi": float(hi), "n": 0,
                                        "kept": [0] * bins, "dropped": [0] * bins})
            h["kept"][b] += int(kept)
            h["dropped"][b] += int(dropped)
            h["n"] += int(kept) + int(dropped)
        out.extend(by_key.values())
    return out


def pipeline_thresholds(config: dict | None) -> list:
    """The filter thresholds of a pipeline config (manifest `pipeline.config`): each stage of each
    step that has `thresholds()` (filters.decision.Threshold), built from its params as the run did.
    A stage that cannot be built here (a plug-in not installed) is skipped."""
    from pydantic import ValidationError

    from engine.registry import UnknownStageError, stage_class

    out = []
    for step in (config or {}).get("steps", []):
        for spec in step.get("stages", []):
            try:
                cls = stage_class(spec["stage"])
                if hasattr(cls, "thresholds"):
                    out.extend(cls(spec.get("params") or {}).thresholds())
            except (UnknownStageError, ValidationError, ImportError):
                continue
    return out
