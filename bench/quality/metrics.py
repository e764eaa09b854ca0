"""Label quality against the world's ground truth: the kept annotations of one dataset version
(a step or a round folder of OUT) scored per annotation type.

Definitions (every figure is over the KEPT annotations, as an export would see them):
- objects: COCOeval bbox mAP@[.5:.95] and AP50 (pycocotools; the score is the annotation's
  score, 1 when it has none, as refine.metrics.coco_map ranks them); precision / recall at
  IoU >= 0.5 of a one-to-one matching of kept object boxes to true boxes (any category,
  refine.metrics.match_boxes); on the matched pairs: category accuracy, region-brief accuracy
  (exact text), mean mask IoU (pycocotools, pairs whose region has a mask). A label that names
  no category of the world ('person', '') counts against precision (its box is kept and matches
  nothing, or matches with a wrong category) but is INVISIBLE to mAP: COCOeval has no category
  to file it under, so it is left out of the detections. Mask IoU is kept because the
  benchmark's segmenter is real (GrabCut on the pixels, specialists.SimSegmenter), not the truth.
- OCR, detection and recognition apart: text-line precision / recall at IoU >= 0.5 of the quads
  as rotated polygons (true quads carry the usual line margin, world.render_sign);
  `ocr_cer_matched` = edit distance (rapidfuzz Levenshtein) over the matched lines / their true
  characters (how well the lines that were found are read); `ocr_cer` = end to end: matched
  edits + the characters of missed true lines + those of kept lines matching none, over all
  true characters (can exceed 1; it mixes detection and recognition).
- groundings: accuracy = share of kept groundings whose box has IoU >= 0.5 with a true box of
  the object(s) its phrase names (category and, if given, colour, read by the world's parser);
  a phrase naming nothing in the image is wrong.
- captions, per tier, mention level first: object precision (mentions whose colour + category
  is in the image); attribute recall (the colour + category pairs the true caption mentions that
  the kept caption mentions too); relation recall (detailed tier: true spatial relations
  stated); coverage (images with a kept caption of the tier). Then token F1
  (refine.metrics.token_f1, SQuAD style) of each kept caption with the true caption of its tier,
  and its FLOOR `<tier>_f1_floor`: the token F1 of the same caption with every object mention
  replaced by an object that is not in the image (`objects_all_wrong`), i.e. what the wording
  alone scores. Token F1 above the floor is content; the floor is template overlap.
"""
from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from typing import Iterable

from bench.quality.language import CATEGORIES, COLOURS, PLURALS, SINGULAR, parse_mentions, parse_relations
from bench.quality.world import truth_of
from refine.metrics import match_boxes, token_f1
from schemas.geometry import box_to_quad

IOU = 0.5
TIERS = ("brief", "detailed")


def category_of(label: str | None) -> str | None:
    """The world category a region label names: 'ball', 'Balls', or the last word of 'red ball'."""
    for w in reversed((label or "").lower().replace(".", " ").split()):
        if w in CATEGORIES:
            return w
        if w in SINGULAR:
            return SINGULAR[w]
    return None


def _kept(anns) -> list[dict]:
    return [a for a in anns or [] if a.get("status") == "kept"]


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def box_map(pairs: Iterable[tuple[dict, list[dict]]]) -> tuple[float, float]:
    """COCOeval bbox (mAP, AP50) of kept object regions against the true objects."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat_ids = {c: i + 1 for i, c in enumerate(CATEGORIES)}
    images, gts, dets = [], [], []
    for i, (truth, regions) in enumerate(pairs, start=1):
        images.append({"id": i, "width": truth["width"], "height": truth["height"]})
        for o in truth["objects"]:
            x0, y0, x1, y1 = o["box"]
            gts.append({"id": len(gts) + 1, "image_id": i, "category_id": cat_ids[o["category"]], "iscrowd": 0,
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
        for r in regions:
            cat = category_of(r.get("label"))
            if cat is None:
                continue  # no category of the world: a false positive precision counts, mAP cannot
            x0, y0, x1, y1 = r["box"]
            dets.append({"image_id": i, "category_id": cat_ids[cat], "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "score": 1.0 if r.get("score") is None else float(r["score"])})
    if not gts:
        return float("nan"), float("nan")
    if not dets:
        return 0.0, 0.0
    gt = COCO()
    gt.dataset = {"images": images, "annotations": gts, "categories": [{"id": v, "name": k} for k, v in cat_ids.items()]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[0]), 0.0), max(float(ev.stats[1]), 0.0)


def quad_iou_matrix(a: list[list[float]], b: list[list[float]], width: int, height: int):
    """IoU of every pair of quads as rotated polygons (pycocotools rasterises them): an upright
    box around a rotated text line would count the empty corners as overlap."""
    import numpy as np
    from pycocotools import mask as mask_utils

    if not a or not b:
        return np.zeros((len(a), len(b)))
    enc = lambda quads: mask_utils.frPyObjects([list(map(float, q)) for q in quads], height, width)  # noqa: E731
    return np.asarray(mask_utils.iou(enc(a), enc(b), [0] * len(b)), dtype=float).reshape(len(a), len(b))


def match_quads(a: list[list[float]], b: list[list[float]], width: int, height: int) -> list[tuple[int, int, float]]:
    """One-to-one matching of text-line quads maximising total polygon IoU: [(i, j, iou)]."""
    from scipy.optimize import linear_sum_assignment

    iou = quad_iou_matrix(a, b, width, height)
    if not iou.size:
        return []
    rows, cols = linear_sum_assignment(-iou)
    return [(int(i), int(j), float(iou[i, j])) for i, j in zip(rows, cols) if iou[i, j] > 0]


def _mask_iou(a: dict, b: dict) -> float:
    from pycocotools import mask as mask_utils

    enc = lambda m: {"size": list(m["size"]), "counts": m["counts"].encode() if isinstance(m["counts"], str) else m["counts"]}  # noqa: E731
    return float(mask_utils.iou([enc(a)], [enc(b)], [0])[0][0])


def _edit_distance(a: str, b: str) -> int:
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(a, b))


def objects_all_wrong(text: str, present: set[tuple[str, str]]) -> str:
    """`text` with every object mention's colour and category replaced by a (category, colour)
    that is not in the image (`present`), preferring words no object of the image has; count and
    wording kept: the token-F1 floor's caption."""
    cats, cols = {c for c, _ in present}, {col for _, col in present}
    absent = sorted(((c, col) for c in CATEGORIES if c != "sign" for col in COLOURS if (c, col) not in present),
                    key=lambda p: (p[0] in cats) + (p[1] in cols))  # words the image's objects do not use first
    out, last = [], 0
    for k, m in enumerate(parse_mentions(text)):
        category, colour = absent[(7 * k) % len(absent)]
        words = ([colour] if m.colour is not None else []) + [PLURALS[category] if m.count > 1 else category]
        span = text[m.start:m.end].split()
        head = [w for w in span[:-1] if w.lower() not in COLOURS]  # article / number / size
        out += [text[last:m.start], " ".join(head + words)]
        last = m.end
    return "".join(out) + text[last:]


def _norm(text: str | None) -> str:
    return " ".join((text or "").split())


class Tally:
    """Sums over images; `figures()` turns them into the metrics."""

    def __init__(self) -> None:
        self.n = defaultdict(float)
        self.map_pairs: list[tuple[dict, list[dict]]] = []

    def add_objects(self, truth: dict, regions: list[dict]) -> None:
        objects = truth["objects"]
        self.map_pairs.append((truth, regions))
        pairs = [p for p in match_boxes([r["box"] for r in regions], [o["box"] for o in objects]) if p[2] >= IOU]
        self.n["obj_kept"] += len(regions)
        self.n["obj_true"] += len(objects)
        self.n["obj_tp"] += len(pairs)
        for i, j, _ in pairs:
            r, o = regions[i], objects[j]
            self.n["cat_right"] += category_of(r.get("label")) == o["category"]
            if r.get("brief"):
                self.n["brief_n"] += 1
                self.n["brief_right"] += _norm(r["brief"]).lower() == o["brief"]
            if r.get("mask"):
                self.n["mask_n"] += 1
                self.n["mask_iou"] += _mask_iou(r["mask"], o["mask"])

    def add_ocr(self, truth: dict, lines: list[dict]) -> None:
        true = truth["texts"]
        quads = [r.get("quad") or box_to_quad(r["box"]) for r in lines]
        pairs = [p for p in match_quads(quads, [t["quad"] for t in true], truth["width"], truth["height"]) if p[2] >= IOU]
        self.n["ocr_kept"] += len(lines)
        self.n["ocr_true"] += len(true)
        self.n["ocr_tp"] += len(pairs)
        matched_pred, matched_true = {i for i, _, _ in pairs}, {j for _, j, _ in pairs}
        self.n["ocr_chars"] += sum(len(t["text"]) for t in true)
        matched_edits = sum(_edit_distance(_norm(lines[i]["label"]), true[j]["text"]) for i, j, _ in pairs)
        self.n["ocr_matched_edits"] += matched_edits
        self.n["ocr_matched_chars"] += sum(len(true[j]["text"]) for _, j, _ in pairs)
        self.n["ocr_edits"] += matched_edits
        self.n["ocr_edits"] += sum(len(t["text"]) for j, t in enumerate(true) if j not in matched_true)
        self.n["ocr_edits"] += sum(len(_norm(r["label"])) for i, r in enumerate(lines) if i not in matched_pred)

    def add_groundings(self, truth: dict, groundings: list[dict]) -> None:
        from schemas.geometry import box_iou

        for g in groundings:
            self.n["gnd_kept"] += 1
            mentions = parse_mentions(g.get("phrase") or "")
            if not mentions:
                continue
            m = mentions[-1]
            named = [o for o in truth["objects"] if o["category"] == m.category and (m.colour is None or o["colour"] == m.colour)]
            self.n["gnd_right"] += any(box_iou(g["box"], o["box"]) >= IOU for o in named)

    def add_captions(self, truth: dict, texts: list[dict]) -> None:
        present = {(o["category"], o["colour"]) for o in truth["objects"]}
        for tier in TIERS:
            kept = [t for t in texts if t["tier"] == tier]
            self.n[f"{tier}_images"] += 1
            if not kept:
                continue
            self.n[f"{tier}_covered"] += 1
            reference = truth["captions"][tier]
            wanted = {(m.category, m.colour) for m in parse_mentions(reference)}
            relations = set(map(tuple, truth["relations"])) if tier == "detailed" else set()
            for t in kept:
                text = t["text"] or ""
                self.n[f"{tier}_captions"] += 1
                self.n[f"{tier}_f1"] += token_f1(text, reference)
                self.n[f"{tier}_f1_floor"] += token_f1(objects_all_wrong(text, present), reference)
                mentions = parse_mentions(text)
                self.n[f"{tier}_mentions"] += len(mentions)
                self.n[f"{tier}_mentions_right"] += sum((m.category, m.colour) in present for m in mentions)
                said = {(m.category, m.colour) for m in mentions}
                self.n[f"{tier}_attr_wanted"] += len(wanted)
                self.n[f"{tier}_attr_said"] += len(wanted & said)
                if relations:
                    self.n[f"{tier}_rel_wanted"] += len(relations)
                    self.n[f"{tier}_rel_said"] += len(relations & parse_relations(text))

    def figures(self) -> dict[str, float | None]:
        n = self.n
        m, ap50 = box_map(self.map_pairs)
        out: dict[str, float | None] = {
            "images": int(len(self.map_pairs)),
            "box_map": round(m, 4), "box_ap50": round(ap50, 4),
            "obj_precision": _ratio(n["obj_tp"], n["obj_kept"]), "obj_recall": _ratio(n["obj_tp"], n["obj_true"]),
            "obj_kept": int(n["obj_kept"]),
            "category_accuracy": _ratio(n["cat_right"], n["obj_tp"]),
            "brief_accuracy": _ratio(n["brief_right"], n["brief_n"]),
            "mask_iou": _ratio(n["mask_iou"], n["mask_n"]),
            "ocr_precision": _ratio(n["ocr_tp"], n["ocr_kept"]), "ocr_recall": _ratio(n["ocr_tp"], n["ocr_true"]),
            "ocr_cer_matched": _ratio(n["ocr_matched_edits"], n["ocr_matched_chars"]),
            "ocr_cer": _ratio(n["ocr_edits"], n["ocr_chars"]),
            "grounding_accuracy": _ratio(n["gnd_right"], n["gnd_kept"]), "groundings_kept": int(n["gnd_kept"]),
        }
        for tier in TIERS:  # mention level first, then token F1 and its floor
            out[f"{tier}_object_precision"] = _ratio(n[f"{tier}_mentions_right"], n[f"{tier}_mentions"])
            out[f"{tier}_attribute_recall"] = _ratio(n[f"{tier}_attr_said"], n[f"{tier}_attr_wanted"])
            if tier == "detailed":
                out["detailed_relation_recall"] = _ratio(n["detailed_rel_said"], n["detailed_rel_wanted"])
            out[f"{tier}_coverage"] = _ratio(n[f"{tier}_covered"], n[f"{tier}_images"])
            out[f"{tier}_f1"] = _ratio(n[f"{tier}_f1"], n[f"{tier}_captions"])
            out[f"{tier}_f1_floor"] = _ratio(n[f"{tier}_f1_floor"], n[f"{tier}_captions"])
        return out


def evaluate(records: Iterable[dict], truth: dict[str, dict]) -> dict[str, float | None]:
    """Metrics of the kept annotations of image records (one dataset version) against the truth."""
    tally = Tally()
    for rec in records:
        t = truth_of(truth, rec["uri"])
        regions = _kept(rec.get("regions"))
        tally.add_objects(t, [r for r in regions if r["kind"] == "object"])
        tally.add_ocr(t, [r for r in regions if r["kind"] == "text"])
        tally.add_groundings(t, _kept(rec.get("groundings")))
        tally.add_captions(t, _kept(rec.get("texts")))
    return tally.figures()


def read_version(out, step: str) -> list[dict]:
    """The image records of one dataset version of OUT (a step or `round<k>`), through the
    engine's DuckDB views (what `fld query --step` reads)."""
    from engine.views.query import open_views

    con = open_views(out, step)
    try:
        return con.sql("SELECT uri, width, height, texts, regions, groundings FROM records").to_arrow_table().to_pylist()
    finally:
        con.close()
