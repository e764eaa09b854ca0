"""Controls and bounds of the label-quality benchmark (issue 18 item 3, issue 19 item 4), computed
from the dataset versions the engine wrote and the world's truth:

- `label_records`: every annotation of a version gets `correct` True / False against the truth,
  whatever its status (the stage-1 set: stage 2's records hold every stage-1 annotation with its
  status and drop reason):
  object regions: a one-to-one matching (scipy linear_sum_assignment over IoU) to true boxes of
  the SAME category (metrics.category_of) at IoU >= 0.5, so a duplicate or a wrong label is wrong;
  OCR lines: one-to-one quad matching at IoU >= 0.5 (metrics.match_quads, detection only, as the
  OCR precision row); groundings: the rule of metrics.Tally.add_groundings; captions: at least one
  mention and every mention names a colour + category present in the image.
- `oracle_version`: keeps exactly the correct annotations (a CONTROL that reads the truth: the
  best any filter could do on these specialists' output without adding labels).
- `random_version`: keeps a uniformly random subset of each annotation type of the same size as
  the engine's filters kept (same keep rate, per type, over the whole OUT).
- `fate_rows`: per drop reason (the first filter that dropped it, `reason` in the data), how many
  right and wrong annotations it removed.
- `rule_values`: (value, correct) of every numeric rule of the pipeline (engine.views.calibrate.pipeline_rules:
  each filter's `thresholds()` in its direction) for the threshold sweep / PR curves.
- `image_counts` + `bootstrap`: per-image counts and a hierarchical percentile bootstrap (runs,
  i.e. world x specialist seeds, resampled; then images within each run) of the ratio metrics.
"""
from __future__ import annotations

import copy
import random
from typing import ClassVar, Iterable

import numpy as np

from bench.quality.language import parse_mentions
from bench.quality.metrics import IOU, Tally, category_of, match_quads
from bench.quality.specialists import SimDetector
from bench.quality.world import truth_of
from schemas.geometry import box_iou, box_iou_matrix, box_to_quad

KINDS = ("object", "ocr", "grounding", "brief", "detailed")


class SimDetector2(SimDetector):
    """A second, independently seeded simulated detector for the ensemble arm (its own name: its own
    `source` and annotation ids)."""

    name: ClassVar[str] = "sim_detector_2"


class SimDetector3(SimDetector):
    name: ClassVar[str] = "sim_detector_3"


# ------------------------------------------------------------------------------------- labels
def kind_of(list_name: str, ann: dict) -> str | None:
    """The benchmark's annotation type of one annotation (None: not scored)."""
    if list_name == "regions":
        return {"object": "object", "text": "ocr"}.get(ann.get("kind"))
    if list_name == "groundings":
        return "grounding"
    if list_name == "texts":
        return ann.get("tier") if ann.get("tier") in ("brief", "detailed") else None
    return None


def _machine(anns) -> list[dict]:
    return [a for a in anns or [] if (a.get("source") or {}).get("annotator") != "human"]


def label_record(rec: dict, truth: dict) -> dict[str, bool]:
    """ann_id -> correct, for every machine annotation of one record (kept or not)."""
    from scipy.optimize import linear_sum_assignment

    out: dict[str, bool] = {}
    regions = _machine(rec.get("regions"))
    objs = [r for r in regions if r.get("kind") == "object"]
    true_objs = truth["objects"]
    if objs:
        ok = [False] * len(objs)
        if true_objs:
            iou = np.asarray(box_iou_matrix([r["box"] for r in objs], [o["box"] for o in true_objs]), float)
            same = np.array([[category_of(r.get("label")) == o["category"] for o in true_objs] for r in objs])
            iou = np.where(same, iou, 0.0)
            for i, j in zip(*linear_sum_assignment(-iou)):
                ok[i] = bool(iou[i, j] >= IOU)
        out.update({r["ann_id"]: v for r, v in zip(objs, ok)})
    lines = [r for r in regions if r.get("kind") == "text"]
    if lines:
        quads = [r.get("quad") or box_to_quad(r["box"]) for r in lines]
        matched = {i for i, _, v in match_quads(quads, [t["quad"] for t in truth["texts"]], truth["width"], truth["height"]) if v >= IOU}
        out.update({r["ann_id"]: i in matched for i, r in enumerate(lines)})
    for g in _machine(rec.get("groundings")):
        mentions = parse_mentions(g.get("phrase") or "")
        right = False
        if mentions:
            m = mentions[-1]
            named = [o for o in true_objs if o["category"] == m.category and (m.colour is None or o["colour"] == m.colour)]
            right = any(box_iou(g["box"], o["box"]) >= IOU for o in named)
        out[g["ann_id"]] = right
    present = {(o["category"], o["colour"]) for o in true_objs}
    for t in _machine(rec.get("texts")):
        mentions = parse_mentions(t.get("text") or "")
        out[t["ann_id"]] = bool(mentions) and all((m.category, m.colour) in present for m in mentions)
    return out


def label_records(records: Iterable[dict], truth: dict[str, dict]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for rec in records:
        out.update(label_record(rec, truth_of(truth, rec["uri"])))
    return out


def _annotations(records: list[dict]):
    """(record, list name, annotation, kind) of every scored machine annotation."""
    for rec in records:
        for list_name in ("regions", "texts", "groundings"):
            for a in _machine(rec.get(list_name)):
                kind = kind_of(list_name, a)
                if kind:
                    yield rec, list_name, a, kind


# ----------------------------------------------------------------------------------- controls
def with_status(records: list[dict], keep) -> list[dict]:
    """A copy of the records whose scored annotations are kept iff keep(annotation, kind)."""
    out = copy.deepcopy(records)
    for _rec, _list, a, kind in _annotations(out):
        a["status"] = "kept" if keep(a, kind) else "dropped"
    return out


def oracle_version(records: list[dict], correct: dict[str, bool]) -> list[dict]:
    """Keeps exactly the correct annotations of the stage-1 set (CONTROL: reads the truth)."""
    return with_status(records, lambda a, _k: correct[a["ann_id"]])


def keep_counts(records: list[dict]) -> dict[str, tuple[int, int]]:
    """kind -> (kept, all) over the records."""
    n = {k: [0, 0] for k in KINDS}
    for _rec, _list, a, kind in _annotations(records):
        n[kind][1] += 1
        n[kind][0] += a.get("status") == "kept"
    return {k: (v[0], v[1]) for k, v in n.items()}


def random_version(stage1: list[dict], filtered: list[dict], seed: int) -> list[dict]:
    """Keeps a uniformly random subset of each kind of the stage-1 set, as many as `filtered` kept."""
    kept = {k: c[0] for k, c in keep_counts(filtered).items()}
    ids: dict[str, list[str]] = {k: [] for k in KINDS}
    for _rec, _list, a, kind in _annotations(stage1):
        ids[kind].append(a["ann_id"])
    rng = random.Random(seed)
    chosen: set[str] = set()
    for kind, all_ids in ids.items():
        chosen |= set(rng.sample(sorted(all_ids), min(kept[kind], len(all_ids))))
    return with_status(stage1, lambda a, _k: a["ann_id"] in chosen)


def all_kept(records: list[dict]) -> list[dict]:
    """Stage 1 as the specialists left it: every annotation kept."""
    return with_status(records, lambda _a, _k: True)


def fate_rows(filtered: list[dict], correct: dict[str, bool]) -> dict[tuple[str, str], list[int]]:
    """(kind, reason or 'kept') -> [right, wrong] over the annotations of a filtered version."""
    out: dict[tuple[str, str], list[int]] = {}
    for _rec, _list, a, kind in _annotations(filtered):
        key = (kind, "kept" if a.get("status") == "kept" else (a.get("reason") or "(none)"))
        c = out.setdefault(key, [0, 0])
        c[0 if correct[a["ann_id"]] else 1] += 1
    return out


def rule_values(filtered: list[dict], correct: dict[str, bool], config: dict) -> list[dict]:
    """Every numeric rule of the pipeline with the (value, correct) pairs of the annotations it reads."""
    from engine.views.calibrate import pipeline_rules

    out = []
    for rule in pipeline_rules(config):
        t = rule.threshold
        values, labels = [], []
        for rec in filtered:
            for a in _machine(rec.get(t.annotations)):
                if t.where is not None and a.get(t.where[0]) != t.where[1] or a["ann_id"] not in correct:
                    continue
                v = a.get("score") if t.value_of == "score" else (a.get("checks") or {}).get(t.value_of)
                if v is None or not np.isfinite(float(v)):
                    continue
                values.append(float(v))
                labels.append(correct[a["ann_id"]])
        out.append({"stage": rule.stage, "rule": t.rule, "value_of": t.value_of, "type": t.annotations,
                    "where": list(t.where) if t.where else None, "threshold": t.value, "upper": t.upper,
                    "values": values, "labels": labels})
    return out


# ------------------------------------------------------------------------------ intervals
# ratio metrics: name -> (numerator count, denominator count) of metrics.Tally
RATIOS = {
    "obj_precision": ("obj_tp", "obj_kept"), "obj_recall": ("obj_tp", "obj_true"),
    "category_accuracy": ("cat_right", "obj_tp"),
    "ocr_precision": ("ocr_tp", "ocr_kept"), "ocr_recall": ("ocr_tp", "ocr_true"),
    "ocr_cer_matched": ("ocr_matched_edits", "ocr_matched_chars"),
    "grounding_accuracy": ("gnd_right", "gnd_kept"), "groundings_per_image": ("gnd_kept", "images"),
    "brief_object_precision": ("brief_mentions_right", "brief_mentions"),
    "brief_coverage": ("brief_covered", "brief_images"),
    "detailed_object_precision": ("detailed_mentions_right", "detailed_mentions"),
    "detailed_attribute_recall": ("detailed_attr_said", "detailed_attr_wanted"),
}
F1S = {"obj_f1": ("obj_precision", "obj_recall"), "ocr_f1": ("ocr_precision", "ocr_recall")}
KEYS = sorted({k for pair in RATIOS.values() for k in pair})


def image_counts(records: Iterable[dict], truth: dict[str, dict]) -> np.ndarray:
    """images x KEYS matrix of the kept annotations' counts (metrics.Tally per image)."""
    from bench.quality.metrics import _kept

    rows = []
    for rec in records:
        t, tally = truth_of(truth, rec["uri"]), Tally()
        regions = _kept(rec.get("regions"))
        tally.add_objects(t, [r for r in regions if r["kind"] == "object"])
        tally.add_ocr(t, [r for r in regions if r["kind"] == "text"])
        tally.add_groundings(t, _kept(rec.get("groundings")))
        tally.add_captions(t, _kept(rec.get("texts")))
        tally.n["images"] = 1
        rows.append([tally.n.get(k, 0.0) for k in KEYS])
    return np.asarray(rows, float).reshape(-1, len(KEYS))


def figures(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Ratio metrics (and F1) of summed counts; sums: (..., KEYS). NaN where the denominator is 0."""
    col = {k: sums[..., i] for i, k in enumerate(KEYS)}
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, (num, den) in RATIOS.items():
            out[name] = np.where(col[den] > 0, col[num] / np.where(col[den] > 0, col[den], 1), np.nan)
        for name, (p, r) in F1S.items():
            s = out[p] + out[r]
            out[name] = np.where(s > 0, 2 * out[p] * out[r] / np.where(s > 0, s, 1), 0.0)
    return out


def bootstrap(runs: list[np.ndarray], resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Mean over runs of each run's figure, with a hierarchical percentile bootstrap interval: each
    resample draws runs with replacement (the seed-to-seed spread), then images with replacement
    within each drawn run (the image-to-image spread), and averages the drawn runs' figures."""
    rng = np.random.default_rng(seed)
    point = {k: np.nanmean(np.stack([v for v in [figures(m.sum(0))[k] for m in runs]])) if runs else np.nan
             for k in list(RATIOS) + list(F1S)}
    draws = np.empty((resamples, len(runs), len(KEYS)))
    for b in range(resamples):
        for slot, r in enumerate(rng.integers(0, len(runs), len(runs))):
            m = runs[r]
            w = rng.multinomial(len(m), np.full(len(m), 1 / len(m))) if len(m) else np.zeros(0)
            draws[b, slot] = w @ m
    figs = figures(draws)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for k, v in figs.items():
        with np.errstate(all="ignore"):
            means = np.nanmean(v, axis=1) if v.size else v
        means = means[np.isfinite(means)]
        p = float(point[k])
        out[k] = {"mean": None if not np.isfinite(p) else p,
                  "ci": [float(np.percentile(means, lo)), float(np.percentile(means, hi))] if means.size else None}
    return out


def runs_interval(values: list[float], resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of per-run values with a percentile bootstrap interval over runs (for mAP: no per-image counts)."""
    v = np.asarray([x for x in values if x is not None], float)
    if not v.size:
        return {"mean": None, "ci": None}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (resamples, len(v)))].mean(1)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {"mean": float(v.mean()), "ci": [float(np.percentile(means, lo)), float(np.percentile(means, hi))]}
