"""Merge round k's relabelled annotations (already through the stage-2 filters) with round k-1.

Policy (the paper gives none; P §4 "merge"):
- Nothing is deleted. Every annotation of the merged record carries exactly one of the checks
  `merge.new` (made by round k), `merge.kept` (carried over from round k-1 unchanged) or
  `merge.replaced` (kept in round k-1, dropped now in favour of a round-k annotation) = 1.0.
- Texts, per tier: a round-k caption that passed the filters replaces the kept captions of that
  tier (they become `dropped`, reason `merge:replaced`); when the new caption was dropped by a
  filter, the old ones stay kept. Groundings follow their caption (a replaced caption's
  groundings are replaced; a new grounding of a dropped caption is dropped `merge:caption_dropped`).
- Regions, per kind (object / text): the union of the kept regions of both rounds. Each region
  gets `merge.agreement` = its best IoU with a region of the other round, and
  `merge.score` = score x ((1 - w) + w x agreement) (score 1.0 when the producer gives none),
  so boxes both rounds agree on rank first. Then NMS (torchvision.ops.batched_nms, by kind) at
  `nms_iou`: a suppressed old region is `merge:replaced`, a suppressed new one `merge:nms`.
  Imported ground truth (`source.annotator == "human"`) is never dropped: it enters NMS with
  score 2 (above any merged score) and suppresses its duplicates.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import Field

from engine.stage import Resources, Stage, StageParams
from refine.metrics import agreement_sums, is_human
from refine.relabel import PREVIOUS
from schemas.geometry import box_iou_matrix
from schemas.records import ANNOTATION_KINDS

NEW, KEPT, REPLACED = "merge.new", "merge.kept", "merge.replaced"


@dataclass(frozen=True)
class MergePolicy:
    nms_iou: float = 0.7  # above the usual 0.5 of detectors: two rounds' boxes of one object overlap a lot
    agreement_weight: float = 0.5  # 0: scores as produced; 1: unconfirmed regions rank last

    def __post_init__(self) -> None:
        if not 0 < self.nms_iou <= 1:
            raise ValueError(f"merge.nms_iou must be in (0, 1], got {self.nms_iou}")
        if not 0 <= self.agreement_weight <= 1:
            raise ValueError(f"merge.agreement_weight must be in [0, 1], got {self.agreement_weight}")


def _mark(ann: dict, state: str) -> None:
    checks = dict(ann.get("checks") or {})
    for key in (NEW, KEPT, REPLACED):
        checks.pop(key, None)
    checks[state] = 1.0
    ann["checks"] = checks


def _drop(ann: dict, reason: str) -> None:
    if ann["status"] == "kept":
        ann["status"] = "dropped"
        ann["reason"] = reason


def _merge_texts(old: list[dict], new: list[dict]) -> set[str]:
    """Returns the ann_ids of old texts that were replaced."""
    replaced = set()
    new_tiers = {t["tier"] for t in new if t["status"] == "kept"}
    for t in old:
        if t["status"] == "kept" and t["tier"] in new_tiers and not is_human(t):
            _drop(t, "merge:replaced")
            _mark(t, REPLACED)
            replaced.add(t["ann_id"])
        else:
            _mark(t, KEPT)
    for t in new:
        _mark(t, NEW)
    return replaced


def _merge_groundings(old: list[dict], new: list[dict], replaced_texts: set[str], new_texts: list[dict]) -> None:
    for g in old:
        if g["text_ann_id"] in replaced_texts and g["status"] == "kept":
            _drop(g, "merge:replaced")
            _mark(g, REPLACED)
        else:
            _mark(g, KEPT)
    kept_new = {t["ann_id"] for t in new_texts if t["status"] == "kept"}
    for g in new:
        if g["text_ann_id"] not in kept_new:
            _drop(g, "merge:caption_dropped")
        _mark(g, NEW)


def _merge_regions(old: list[dict], new: list[dict], policy: MergePolicy) -> None:
    import torch
    from torchvision.ops import batched_nms

    for r in old:
        _mark(r, KEPT)
    for r in new:
        _mark(r, NEW)
    cands = [(r, True) for r in old if r["status"] == "kept"] + [(r, False) for r in new if r["status"] == "kept"]
    if not cands:
        return
    boxes = np.array([r["box"] for r, _ in cands], dtype=float)
    is_old = np.array([o for _, o in cands])
    kinds = [r["kind"] for r, _ in cands]
    same_kind = np.array([[a == b for b in kinds] for a in kinds])
    iou = box_iou_matrix(boxes.tolist(), boxes.tolist())
    other_round = is_old[:, None] != is_old[None, :]
    agreement = np.where(other_round & same_kind, iou, 0.0).max(axis=1)
    w = policy.agreement_weight
    scores = []
    for (r, _), a in zip(cands, agreement):
        base = 1.0 if r.get("score") is None else float(r["score"])
        merged = 2.0 if is_human(r) else base * ((1 - w) + w * float(a))
        r["checks"] = {**r["checks"], "merge.agreement": float(a), "merge.score": float(merged)}
        scores.append(merged)
    kind_ids = {k: i for i, k in enumerate(sorted(set(kinds)))}
    keep = set(
        batched_nms(
            torch.tensor(boxes, dtype=torch.float64),
            torch.tensor(scores, dtype=torch.float64),
            torch.tensor([kind_ids[k] for k in kinds]),
            policy.nms_iou,
        ).tolist()
    )
    for i, (r, was_old) in enumerate(cands):
        if i in keep or is_human(r):
            continue
        if was_old:
            _drop(r, "merge:replaced")
            _mark(r, REPLACED)
        else:
            _drop(r, "merge:nms")


def merge_record(old: dict, new: dict, policy: MergePolicy = MergePolicy()) -> dict:
    """old: the image's round k-1 record; new: the same image relabelled by round k (filtered)."""
    if old["image_id"] != new["image_id"]:
        raise ValueError(f"merge: image_id {old['image_id']} (round k-1) != {new['image_id']} (round k)")
    out = dict(old)
    old_texts, new_texts = list(old.get("texts") or []), list(new.get("texts") or [])
    replaced = _merge_texts(old_texts, new_texts)
    old_g, new_g = list(old.get("groundings") or []), list(new.get("groundings") or [])
    _merge_groundings(old_g, new_g, replaced, new_texts)
    old_r, new_r = list(old.get("regions") or []), list(new.get("regions") or [])
    _merge_regions(old_r, new_r, policy)
    out["texts"] = old_texts + new_texts
    out["groundings"] = old_g + new_g
    out["regions"] = old_r + new_r
    out["errors"] = list(old.get("errors") or []) + list(new.get("errors") or [])
    return out


def merge_records(old: list[dict], new: list[dict], policy: MergePolicy = MergePolicy()) -> list[dict]:
    if len(old) != len(new):
        raise ValueError(f"merge: {len(old)} records of round k-1 but {len(new)} relabelled")
    return [merge_record(o, n, policy) for o, n in zip(old, new)]


class MergeParams(StageParams):
    nms_iou: float = Field(0.7, gt=0, le=1)
    agreement_weight: float = Field(0.5, ge=0, le=1)


class MergeStage(Stage):
    """The last stage of a round's step: the relabelled (and filtered) record merged with the
    record as it was before the round (set aside by the relabel stage). Reports the agreement
    sums of refine.metrics as the stage's metrics, so they are summed per shard by every runner."""

    name: ClassVar[str] = "merge"
    Params: ClassVar[type[StageParams]] = MergeParams
    default_resources: ClassVar[Resources] = Resources(cpus=1.0, batch_size=64)

    params: MergeParams

    def process_batch(self, records: list[dict], images=None) -> list[dict]:
        policy = MergePolicy(self.params.nms_iou, self.params.agreement_weight)
        out = []
        for new in records:
            stashed = new.pop(PREVIOUS, None)
            if stashed is None:
                raise ValueError(f"merge: image {new['image_id']} has no previous annotations set aside "
                                 "(the merge stage follows the relabel stage in a round's step)")
            old = {**new, **json.loads(stashed)}
            new = {**new, **{k: new.get(k) or [] for k in ANNOTATION_KINDS}}
            for key, value in agreement_sums([old], [new]).items():
                self.report(key, value)
            out.append(merge_record(old, new, policy))
        return out
