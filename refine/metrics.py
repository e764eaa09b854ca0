"""Per-round quality figures: agreement of round k with round k-1, and COCO mAP against imported
ground truth (`human` annotations) when the input carries some.

Agreement is accumulated as sums per shard (written in each shard's commit record) and
reduced over shards, so resumed rounds and any runner give the same totals.
- regions: one-to-one matching (Hungarian on IoU, pycocotools IoU) of round k-1's kept regions
  and round k's kept predictions, per kind; precision / recall / F1 at IoU >= 0.5 and the mean
  IoU of the matched pairs.
- captions: bag-of-words token F1 (SQuAD style) between the kept captions of a tier.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from engine.ingest.human import HUMAN
from schemas.geometry import box_iou_matrix
from schemas.records import REGION_KINDS, TIERS

MATCH_IOU = 0.5
_WORD = re.compile(r"[a-z0-9]+")


def is_human(ann: dict) -> bool:
    """Imported ground truth (engine.ingest.human): what the mAP is measured against, and what a merge never replaces."""
    return (ann.get("source") or {}).get("annotator") == HUMAN


def _kept(anns) -> list[dict]:
    return [a for a in anns or [] if a.get("status") == "kept"]


def match_boxes(a: list[list[float]], b: list[list[float]]) -> list[tuple[int, int, float]]:
    """One-to-one matching maximising total IoU: [(i, j, iou)] with iou > 0."""
    from scipy.optimize import linear_sum_assignment

    if not a or not b:
        return []
    iou = box_iou_matrix(a, b)
    rows, cols = linear_sum_assignment(-iou)
    return [(int(i), int(j), float(iou[i, j])) for i, j in zip(rows, cols) if iou[i, j] > 0]


def token_f1(prediction: str, reference: str) -> float:
    p, r = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def agreement_sums(old_records: Iterable[dict], new_records: Iterable[dict], iou_threshold: float = MATCH_IOU) -> dict:
    """Additive counts of one shard: old = round k-1 records, new = round k relabelled (filtered)."""
    s: dict[str, float] = Counter()
    for old, new in zip(old_records, new_records):
        for kind in REGION_KINDS:
            a = [r["box"] for r in _kept(old.get("regions")) if r["kind"] == kind]
            b = [r["box"] for r in _kept(new.get("regions")) if r["kind"] == kind]
            pairs = match_boxes(a, b)
            s[f"{kind}.prev"] += len(a)
            s[f"{kind}.new"] += len(b)
            s[f"{kind}.matched"] += len(pairs)
            s[f"{kind}.iou_sum"] += sum(p[2] for p in pairs)
            s[f"{kind}.tp"] += sum(1 for p in pairs if p[2] >= iou_threshold)
        for tier in TIERS:
            prev = [t["text"] for t in _kept(old.get("texts")) if t["tier"] == tier]
            cur = [t["text"] for t in _kept(new.get("texts")) if t["tier"] == tier]
            if prev and cur:
                s[f"{tier}.f1_sum"] += max(token_f1(c, p) for c in cur for p in prev)
                s[f"{tier}.pairs"] += 1
    return dict(s)


def reduce_agreement(sums: Iterable[dict]) -> dict:
    """Summed shard counts -> the round's agreement figures."""
    total: Counter = Counter()
    for s in sums:
        total.update(s)
    out: dict[str, float | int] = {}
    for kind in REGION_KINDS:
        prev, new, tp = total[f"{kind}.prev"], total[f"{kind}.new"], total[f"{kind}.tp"]
        if not prev and not new:
            continue
        p = tp / new if new else 0.0
        r = tp / prev if prev else 0.0
        out[f"{kind}_prev"] = int(prev)
        out[f"{kind}_new"] = int(new)
        out[f"{kind}_precision@{MATCH_IOU}"] = round(p, 4)
        out[f"{kind}_recall@{MATCH_IOU}"] = round(r, 4)
        out[f"{kind}_f1@{MATCH_IOU}"] = round(2 * p * r / (p + r), 4) if p + r else 0.0
        m = total[f"{kind}.matched"]
        out[f"{kind}_mean_iou"] = round(total[f"{kind}.iou_sum"] / m, 4) if m else 0.0
    for tier in TIERS:
        n = total[f"{tier}.pairs"]
        if n:
            out[f"{tier}_token_f1"] = round(total[f"{tier}.f1_sum"] / n, 4)
    return out


def coco_map(records: Iterable[dict], round_: int) -> dict | None:
    """COCOeval bbox mAP of round k's object predictions against the `human` object regions.

    Predictions: round-k object regions that passed the filters (kept, or dropped only by the
    merge because they duplicate another box); a missing score counts as 1. None without ground truth.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, gts, dets, cats = [], [], [], {}
    for i, rec in enumerate(records, start=1):
        images.append({"id": i, "width": rec["width"], "height": rec["height"]})
        for r in rec.get("regions") or []:
            if r["kind"] != "object" or not (r.get("label") or "").strip():
                continue
            label = r["label"].strip().lower()
            x0, y0, x1, y1 = r["box"]
            item = {"image_id": i, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
            if is_human(r) and r["status"] == "kept":
                item["category_id"] = cats.setdefault(label, len(cats) + 1)
                gts.append(item | {"id": len(gts) + 1})
            elif r.get("round") == round_ and (r["status"] == "kept" or (r.get("reason") or "").startswith("merge:")):
                dets.append((label, item, 1.0 if r.get("score") is None else float(r["score"])))
    if not gts:
        return None
    gt = COCO()
    gt.dataset = {"images": images, "annotations": gts, "categories": [{"id": c, "name": n} for n, c in cats.items()]}
    gt.createIndex()
    results = [d[1] | {"category_id": cats[d[0]], "score": d[2]} for d in dets if d[0] in cats]
    if not results:
        return {"map": 0.0, "map50": 0.0, "gt_boxes": len(gts), "predictions": 0}
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its table
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": round(float(max(ev.stats[0], 0.0)), 4), "map50": round(float(max(ev.stats[1], 0.0)), 4),
            "gt_boxes": len(gts), "predictions": len(results)}
