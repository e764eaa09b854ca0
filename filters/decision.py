"""Keep/drop bookkeeping shared by every stage-2 filter.

The filter convention: a filter never deletes an annotation; it writes each value it computes
to `checks["<filter>.<check>"]` and, when it drops a kept annotation, sets status="dropped"
and reason="<filter>:<rule>". The first reason wins. A re-run (new thresholds on the same
stage-1 shards) must be able to un-drop, so a filter first forgets what it decided itself:
its own reason and its own checks. That makes every filter idempotent.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple

from schemas.records import ANNOTATION_KINDS

KEPT = "kept"
DROPPED = "dropped"


class Threshold(NamedTuple):
    """Where a filter rule cuts one value: `fld show` marks it on that value's histogram.
    `value_of` is a check key (`<filter>.<check>`) or "score" (the annotation's own score)."""

    annotations: str  # texts | regions | groundings
    value_of: str
    rule: str  # the parameter, e.g. "brief min_object_complexity"
    value: float
    # what `fld calibrate` needs to measure the rule and write it back (engine/views/calibrate.py):
    upper: bool = False  # the rule keeps value <= threshold (max_*, nms_iou); else value >= threshold
    where: tuple[str, str] | None = None  # only annotations with this field value, e.g. ("kind", "object")
    param: tuple[str, ...] = ()  # the stage parameter's path, e.g. ("min_score", "object")


def reset_own(ann: dict, filter_name: str, keep: Iterable[str] = ()) -> None:
    """Undo a previous run of this filter: its drop (if it was the first reason) and its checks.

    `keep` names checks that record a change the filter made to the data itself (a clamped
    box): the re-run cannot see it any more, so the fact is carried over.
    """
    checks = ann.get("checks")
    if checks is None:
        checks = ann["checks"] = {}
    prefix = filter_name + "."
    kept = {f"{filter_name}.{k}" for k in keep}
    for key in [k for k in checks if k.startswith(prefix) and k not in kept]:
        del checks[key]
    reason = ann.get("reason") or ""
    if ann.get("status") == DROPPED and reason.startswith(filter_name + ":"):
        ann["status"] = KEPT
        ann["reason"] = None


def reset_all(
    records: Iterable[dict], filter_name: str, lists: Iterable[str] = ANNOTATION_KINDS, keep: Iterable[str] = ()
) -> None:
    keep = tuple(keep)
    for rec in records:
        for key in lists:
            for ann in rec.get(key) or []:
                reset_own(ann, filter_name, keep)


def set_check(ann: dict, filter_name: str, check: str, value: float | bool | int) -> None:
    """checks["<filter>.<check>"] = float(value); non-finite values are refused (SQL must read them)."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"check {filter_name}.{check} of annotation {ann.get('ann_id')!r} is not finite: {value}")
    ann.setdefault("checks", {})[f"{filter_name}.{check}"] = value


def drop(ann: dict, filter_name: str, rule: str) -> bool:
    """Drop a kept annotation with reason "<filter>:<rule>"; an already dropped one keeps its reason.

    Returns True when this call dropped it.
    """
    if ann.get("status") == DROPPED:
        return False
    ann["status"] = DROPPED
    ann["reason"] = f"{filter_name}:{rule}"
    return True


def is_kept(ann: dict) -> bool:
    return ann.get("status", KEPT) != DROPPED
