"""Region filter (stage 2): boxes clamped to the image, then confidence, size and aspect rules,
then non-maximum suppression (torchvision) among the regions still kept.

Florence-2 (P §4.2) drops boxes under a confidence threshold and applies NMS; the thresholds are
ours. Every value is written to `checks` (`region_filter.clamped`, `.area_frac`, `.min_side`,
`.aspect`, `.mask_box_iou`, `.nms_iou`) so a user can re-threshold with SQL; reasons are
`region_filter:invalid_box`, `:low_score`, `:too_small`, `:aspect`, `:mask_disagree`, `:nms`.

NMS runs per image and per kind (object boxes never suppress OCR lines), per label or
class-agnostic (per kind). Ranking is by score, ties broken by ann_id, and torchvision sees
rank-derived scores: a sort of equal floats is not stable, and the same records must give the
same survivors on every runner. A region without a score (Florence-2 <OD> gives none) ranks as
score 1.0. Human (imported) regions are never suppressed and suppress nothing.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, ClassVar, Literal

from pydantic import field_validator

from engine.stage import Resources, Stage, StageParams
from filters.decision import Threshold, drop, is_kept, reset_all, set_check
from filters.per_kind import merge_per_key
from schemas.geometry import box_iou, box_iou_matrix, clamp_box, clamp_points, mask_box_iou
from schemas.records import REGION_KINDS

NmsMode = Literal["per_label", "class_agnostic"]

DEFAULT_MIN_SCORE: dict[str, float | None] = {"object": 0.3, "text": 0.5}
DEFAULT_NMS_IOU: dict[str, float | None] = {"object": 0.7, "text": 0.5}
DEFAULT_NMS_MODE: dict[str, NmsMode] = {"object": "per_label", "text": "class_agnostic"}
DEFAULT_MAX_ASPECT: dict[str, float | None] = {"object": 10.0, "text": 40.0}


class RegionFilterParams(StageParams):
    min_score: dict[str, float | None] = DEFAULT_MIN_SCORE  # per kind; null = no threshold
    nms_iou: dict[str, float | None] = DEFAULT_NMS_IOU  # suppress when IoU > this; null = no NMS
    nms_mode: dict[str, NmsMode] = DEFAULT_NMS_MODE
    min_side: float = 2.0  # pixels, after clamping
    min_area_frac: float = 1e-4  # of the image area, after clamping
    max_aspect: dict[str, float | None] = DEFAULT_MAX_ASPECT  # max(w/h, h/w); null = any
    clamp: bool = True  # write the clamped box (and quad / polygon) back
    min_mask_iou: float | None = 0.5  # box vs its mask's tight box, where a mask exists

    @field_validator("min_score", "nms_iou", "nms_mode", "max_aspect", mode="before")
    @classmethod
    def _per_kind(cls, value: Any, info) -> dict:
        defaults = {
            "min_score": DEFAULT_MIN_SCORE,
            "nms_iou": DEFAULT_NMS_IOU,
            "nms_mode": DEFAULT_NMS_MODE,
            "max_aspect": DEFAULT_MAX_ASPECT,
        }[info.field_name]
        return merge_per_key(value, defaults, REGION_KINDS, info.field_name)

    @field_validator("nms_iou")
    @classmethod
    def _iou_range(cls, value: dict) -> dict:
        for kind, v in value.items():
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"nms_iou.{kind} must be in [0, 1], got {v}")
        return value


def _valid_box(box: Any) -> bool:
    return (
        isinstance(box, (list, tuple))
        and len(box) == 4
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
    )


def rank_key(ann: dict) -> tuple[float, str]:
    """Higher score first, then ann_id: a total order, the same on every runner. A NaN score
    ranks last (NaN compares false both ways, so it would make the order depend on input order)."""
    score = ann.get("score")
    value = 1.0 if score is None else float(score)
    return (math.inf if math.isnan(value) else -value, ann.get("ann_id") or "")


def nms_group(ann: dict, mode: NmsMode) -> str:
    """Boxes of one group may suppress each other: same label (case / spaces ignored) or all."""
    return " ".join((ann.get("label") or "").lower().split()) if mode == "per_label" else ""


def nms_in_rank_order(boxes: list[list[float]], groups: list[int], iou_threshold: float) -> tuple[list[bool], list[float]]:
    """NMS of boxes given in rank order (best first), within each group. Returns (survives, max IoU
    with a better-ranked survivor of the same group).

    torchvision.ops.batched_nms does the suppression (boxes of different groups never overlap);
    the IoU value is what lets a user ask later "which would survive at threshold t" in SQL.
    """
    import torch
    from torchvision.ops import batched_nms

    n = len(boxes)
    if n == 0:
        return [], []
    b = torch.tensor(boxes, dtype=torch.float64)
    scores = torch.arange(n, 0, -1, dtype=torch.float64)  # strictly decreasing: rank order, no ties
    idxs = torch.tensor(groups, dtype=torch.int64)
    keep = batched_nms(b, scores, idxs, iou_threshold)
    survives = torch.zeros(n, dtype=torch.bool)
    survives[keep] = True
    # Two zero-area boxes (allowed with min_side 0) have IoU 0/0: box_iou_matrix counts it as no overlap,
    # as torchvision's NMS does (NaN > threshold is false), so no NaN reaches the checks.
    iou = torch.as_tensor(box_iou_matrix(boxes, boxes))
    same_group = idxs[:, None] == idxs[None, :]
    better = torch.ones(n, n, dtype=torch.bool).tril(-1)  # better[i, j]: j ranked before i
    mask = same_group & better & survives[None, :]
    max_iou = torch.where(mask, iou, torch.zeros_like(iou)).amax(dim=1)
    return survives.tolist(), [float(v) for v in max_iou]


class RegionFilter(Stage):
    """Clamp, threshold and de-duplicate region boxes; never deletes one."""

    name: ClassVar[str] = "region_filter"
    Params: ClassVar[type[StageParams]] = RegionFilterParams
    default_resources: ClassVar[Resources] = Resources(cpus=0.5, batch_size=64)

    def process_batch(self, records: list[dict], images: list[bytes] | None) -> list[dict]:
        reset_all(records, self.name, ("regions",), keep=("clamped",))
        for rec in records:
            self.guarded(rec, lambda rec=rec: self.filter_record(rec))
        return records

    def thresholds(self) -> list[Threshold]:
        """Every active rule, on the check (or score) it reads."""
        p: RegionFilterParams = self.params  # type: ignore[assignment]
        out = [Threshold("regions", "region_filter.min_side", "min_side", p.min_side, param=("min_side",)),
               Threshold("regions", "region_filter.area_frac", "min_area_frac", p.min_area_frac, param=("min_area_frac",))]
        for kind in REGION_KINDS:
            for value_of, rule, value in (("score", "min_score", p.min_score.get(kind)),
                                          ("region_filter.aspect", "max_aspect", p.max_aspect.get(kind)),
                                          ("region_filter.nms_iou", "nms_iou", p.nms_iou.get(kind))):
                if value is not None:
                    out.append(Threshold("regions", value_of, f"{kind} {rule}", float(value), upper=rule != "min_score",
                                         where=("kind", kind), param=(rule, kind)))
        if p.min_mask_iou is not None:
            out.append(Threshold("regions", "region_filter.mask_box_iou", "min_mask_iou", p.min_mask_iou,
                                 param=("min_mask_iou",)))
        return out

    def filter_record(self, rec: dict) -> None:
        p: RegionFilterParams = self.params  # type: ignore[assignment]
        width, height = int(rec["width"]), int(rec["height"])
        regions = rec.get("regions") or []
        scored: list[dict] = []
        for ann in regions:
            kind = ann.get("kind")
            if kind not in REGION_KINDS:
                raise ValueError(f"region {ann.get('ann_id')!r}: kind must be one of {REGION_KINDS}, got {kind!r}")
            if not _valid_box(ann.get("box")):
                drop(ann, self.name, "invalid_box")
                continue
            box = [float(v) for v in ann["box"]]
            clamped = clamp_box(box, width, height)
            was_clamped = clamped != box
            # A box clamped by an earlier run is now inside: it stays marked as clamped.
            earlier = ann["checks"].get(f"{self.name}.clamped", 0.0)
            set_check(ann, self.name, "clamped", max(float(was_clamped), earlier))
            if p.clamp:
                if was_clamped:
                    ann["box"] = clamped
                if ann.get("quad"):
                    ann["quad"] = clamp_points(ann["quad"], width, height)
                if ann.get("polygon"):
                    ann["polygon"] = [clamp_points(ring, width, height) for ring in ann["polygon"]]
            w, h = clamped[2] - clamped[0], clamped[3] - clamped[1]
            set_check(ann, self.name, "area_frac", (w * h) / float(width * height))
            set_check(ann, self.name, "min_side", min(w, h))
            if min(w, h) > 0:
                set_check(ann, self.name, "aspect", max(w / h, h / w))
            mask_iou = mask_box_iou(ann["box"], ann.get("mask"))
            if mask_iou is not None:
                set_check(ann, self.name, "mask_box_iou", mask_iou)
            scored.append(ann)

            min_score = p.min_score.get(kind)
            score = ann.get("score")
            if min_score is not None and score is not None and not float(score) >= min_score:  # NaN fails too
                drop(ann, self.name, "low_score")
            if min(w, h) < p.min_side or (w * h) / float(width * height) < p.min_area_frac:
                drop(ann, self.name, "too_small")
            max_aspect = p.max_aspect.get(kind)
            if max_aspect is not None and min(w, h) > 0 and max(w / h, h / w) > max_aspect:
                drop(ann, self.name, "aspect")
            if p.min_mask_iou is not None and mask_iou is not None and mask_iou < p.min_mask_iou:
                drop(ann, self.name, "mask_disagree")
        self._nms(scored, width, height)

    def _nms(self, regions: list[dict], width: int, height: int) -> None:
        p: RegionFilterParams = self.params  # type: ignore[assignment]
        by_kind: dict[str, list[dict]] = defaultdict(list)
        for ann in regions:
            if p.nms_iou.get(ann["kind"]) is not None:
                by_kind[ann["kind"]].append(ann)
        for kind, anns in sorted(by_kind.items()):
            # Only regions still kept take part; the others get their IoU against the survivors.
            ranked = sorted(anns, key=rank_key)
            mode = p.nms_mode[kind]
            group_ids: dict[str, int] = {}
            # imported ground truth (source annotator "human") takes no part: a human box suppressing the
            # machine box it confirms would hide that box's quality from `fld calibrate` (and the merge of
            # stage 3 already lets human boxes win); it still gets its IoU with the survivors
            participants = [a for a in ranked if is_kept(a) and (a.get("source") or {}).get("annotator") != "human"]
            groups = [group_ids.setdefault(nms_group(a, mode), len(group_ids)) for a in participants]
            # the clamped, ordered box: with clamp off, ann["box"] may still be flipped or outside
            box_of = {id(a): clamp_box(a["box"], width, height) for a in ranked}
            survives, max_iou = nms_in_rank_order([box_of[id(a)] for a in participants], groups, float(p.nms_iou[kind]))
            for ann, ok, iou in zip(participants, survives, max_iou):
                set_check(ann, self.name, "nms_iou", iou)
                if not ok:
                    drop(ann, self.name, "nms")
            self._iou_of_non_participants(ranked, participants, survives, groups, group_ids, mode, box_of)

    def _iou_of_non_participants(self, ranked, participants, survives, groups, group_ids, mode, box_of) -> None:
        """Already dropped regions still get nms_iou: their max IoU with a better-ranked survivor."""
        order = {id(a): i for i, a in enumerate(ranked)}
        survivors = [(order[id(a)], g, box_of[id(a)]) for a, ok, g in zip(participants, survives, groups) if ok]
        part_ids = {id(a) for a in participants}
        for ann in ranked:
            if id(ann) in part_ids:
                continue
            g = group_ids.get(nms_group(ann, mode))
            rank = order[id(ann)]
            ious = [box_iou(box_of[id(ann)], b) for r, sg, b in survivors if sg == g and r < rank]
            set_check(ann, self.name, "nms_iou", max(ious, default=0.0))
