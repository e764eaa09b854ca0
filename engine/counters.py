"""Per-stage counters (datatrove style): every step counts what it did.

Counters are computed by comparing a batch before and after a stage, so stages do not have
to count anything themselves and every runner reports the same numbers.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from schemas.records import ANNOTATION_KINDS as ANNOTATION_COLUMNS  # noqa: E402


def snapshot(table: pa.Table) -> dict[str, Any]:
    """Counts of a batch: records, annotations per type, dropped per reason, errors."""
    out: dict[str, Any] = {"records": table.num_rows, "errors": 0, "annotations": {}, "dropped": {}}
    if "errors" in table.column_names:
        out["errors"] = int(pc.sum(pc.list_value_length(table.column("errors"))).as_py() or 0)
    for col in ANNOTATION_COLUMNS:
        if col not in table.column_names:
            continue
        flat = pc.list_flatten(table.column(col))
        out["annotations"][col] = len(flat)
        if len(flat):
            reasons = pc.struct_field(flat, "reason").to_pylist()
            status = pc.struct_field(flat, "status").to_pylist()
            dropped = Counter(r for r, s in zip(reasons, status) if s == "dropped")
            out["dropped"].update({f"{col}/{r}": n for r, n in dropped.items()})
    return out


def delta(before: dict, after: dict, seconds: float) -> dict[str, Any]:
    """What one stage did to a batch."""
    added = {k: after["annotations"].get(k, 0) - before["annotations"].get(k, 0) for k in ANNOTATION_COLUMNS}
    dropped = {}
    for key, n in after["dropped"].items():
        d = n - before["dropped"].get(key, 0)
        if d:
            dropped[key] = d
    return {
        "records_in": before["records"],
        "records_out": after["records"],
        "annotations_added": {k: v for k, v in added.items() if v},
        "dropped": dropped,
        "errors": after["errors"] - before["errors"],
        "seconds": round(seconds, 4),
    }


def merge(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Add counters of one batch / shard into a running total (nested dicts of numbers)."""
    for key, value in part.items():
        if isinstance(value, dict):
            merge(total.setdefault(key, {}), value)
        else:
            total[key] = round(total.get(key, 0) + value, 4) if isinstance(value, float) else total.get(key, 0) + value
    return total


def summary_cells(c: dict[str, Any]) -> list:
    """One stage's counters as table cells: records in, out, added, dropped, errors, seconds."""
    return [c.get("records_in", 0), c.get("records_out", 0),
            ", ".join(f"{k}={v}" for k, v in c.get("annotations_added", {}).items()),
            ", ".join(f"{k}={v}" for k, v in c.get("dropped", {}).items()),
            c.get("errors", 0), c.get("seconds", 0)]
