"""Merge round k's relabelled annotations (already through the stage-2 filters) with round k-1.

The policy (the paper gives none; P §4 "merge"), written out with its reasons in docs/refine-merge.md:
- Nothing is deleted. Every annotation of the merged record carries exactly one of the checks
  `merge.new` (made by round k), `merge.kept` (carried over from round k-1) or `merge.replaced`
  (kept in round k-1, dropped now in favour of a round-k annotation) = 1.0.
- Confidence: an annotation's *own* score is what its producer gave (a Florence-2 box or caption:
  the model's token probabilities, annotators.florence2_scores); `merge.own_score` keeps it once a
  merge has raised `score`. No score: a human annotation outranks everything, another producer's
  counts 1.0 (a specialist that gives none vouches for what passed its filters), a model's 0.0.
- Regions, per kind (object / text), among kept ones:
  1. duplicates within one round (IoU > nms_iou, class-agnostic; region_filter's NMS is per label)
     are dropped `merge:duplicate`, the lower own score going (human never);
  2. round k's boxes are matched one-to-one to round k-1's (Hungarian on IoU, refine.metrics), a
     pair at IoU > nms_iou is one object seen twice:
     - with a human box: the human box stays, the model's is dropped `merge:human_kept`;
     - else the newer box wins when its own score is at least the older one's (ties go to the newer
       round only when it is at least as confident); the loser is dropped `merge:replaced` (old)
       or `merge:outscored` (new);
     - same label, and one of the two is the model's while the other is a specialist's: two
       independent producers agree, so the kept box's score becomes 1 - (1 - a)(1 - b) of their
       own scores (noisy-OR, recomputed from own scores, so repeated rounds never compound) and
       `merge.confirmed` = 1.0. Two model boxes (rounds of one lineage) are no such evidence.
     Every matched box gets `merge.agreement` = the pair's IoU (0.0: no partner).
  3. an unmatched round-k box is added, kept, with its own score; one that still overlaps a
     kept box above nms_iou (its partner went to another box) is dropped `merge:duplicate`.
- Texts, per tier: round k's kept caption is compared with round k-1's kept (non-human) ones, not
  blindly swapped in. Its grounding agreement is `merge.caption_agreement`: the mean of (a) the
  fraction of its groundings whose box matches a kept object region (IoU >= 0.5) and (b) its mention
  F1: precision (the fraction of the categories it mentions which are kept regions' categories of
  the image) and coverage (the fraction of those kept categories it mentions), so a short caption
  naming one kept object no longer beats a complete one; a category counts as mentioned when it is one of the image's region labels
  or of the round's training vocabulary (every `<OD>` category the round trained on: `vocabulary`,
  from the round's train_summary.json), so a caption naming an object the image does not hold is
  penalised, not ignored; undefined parts are left out, none at all counts 0. The new
  caption replaces the old ones when (agreement, own score) is at least theirs (lexicographic);
  otherwise the new caption is dropped `merge:outscored`. Both passed the same stage-2 text
  filters before (a filtered-out new caption never competes). A caption keeps its groundings:
  groundings follow their caption (`merge:replaced` / `merge:caption_dropped`).
- Imported ground truth (`source.annotator == "human"`) is never dropped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import Field

from engine.stage import Resources, Stage, StageParams
from refine.metrics import MATCH_IOU, agreement_sums, is_human, match_boxes
from refine.relabel import ANNOTATOR as MODEL_ANNOTATOR
from refine.relabel import PREVIOUS
from schemas.geometry import box_iou_matrix
from schemas.records import ANNOTATION_KINDS

NEW, KEPT, REPLACED = "merge.new", "merge.kept", "merge.replaced"
OWN_SCORE, AGREEMENT, CONFIRMED = "merge.own_score", "merge.agreement", "merge.confirmed"
CAPTION_AGREEMENT = "merge.caption_agreement"
HUMAN_SCORE = 2.0  # above any probability: ground truth wins every comparison


@dataclass(frozen=True)
class MergePolicy:
    nms_iou: float = 0.7  # above the usual 0.5 of detectors: two rounds' boxes of one object overlap a lot
    vocabulary: frozenset = frozenset()  # the categories the round trained on (normalised: _norm)

    def __post_init__(self) -> None:
        if not 0 < self.nms_iou <= 1:
            raise ValueError(f"merge.nms_iou must be in (0, 1], got {self.nms_iou}")


def _mark(ann: dict, state: str) -> None:
    checks = dict(ann.get("checks") or {})
    for key in (NEW, KEPT, REPLACED):
        checks.pop(key, None)
    checks[state] = 1.0
    ann["checks"] = checks


def _check(ann: dict, key: str, value: float) -> None:
    ann["checks"] = {**(ann.get("checks") or {}), key: float(value)}


def _drop(ann: dict, reason: str) -> None:
    if ann["status"] == "kept" and not is_human(ann):
        ann["status"] = "dropped"
        ann["reason"] = reason


def is_model(ann: dict) -> bool:
    return (ann.get("source") or {}).get("annotator") == MODEL_ANNOTATOR


def own_score(ann: dict) -> float:
    """The producer's confidence (before any merge raised `score`); see the module docstring for None."""
    checks = ann.get("checks") or {}
    if OWN_SCORE in checks:
        return float(checks[OWN_SCORE])
    if is_human(ann):
        return HUMAN_SCORE
    if ann.get("score") is None:
        return 0.0 if is_model(ann) else 1.0
    return float(ann["score"])


def _label(ann: dict) -> str:
    return " ".join((ann.get("label") or "").lower().split())


def _rank(ann: dict) -> tuple[float, str]:
    return (-own_score(ann), ann.get("ann_id") or "")


# ------------------------------------------------------------------------- regions
def _dedupe(regions: list[dict], iou_threshold: float) -> list[dict]:
    """Within one round: greedy NMS by own score (ann_id breaks ties), class-agnostic per kind;
    returns the survivors, the others dropped `merge:duplicate` (human boxes always survive)."""
    survivors: list[dict] = []
    for r in sorted(regions, key=_rank):
        if not is_human(r) and survivors:
            same = [s for s in survivors if s["kind"] == r["kind"]]
            if same and box_iou_matrix([r["box"]], [s["box"] for s in same]).max() > iou_threshold:
                _drop(r, "merge:duplicate")
                continue
        survivors.append(r)
    return survivors


def _confirm(winner: dict, a: dict, b: dict) -> None:
    """Two independent producers (the model and a specialist) agree: noisy-OR of their own scores."""
    sa, sb = min(own_score(a), 1.0), min(own_score(b), 1.0)
    _check(winner, OWN_SCORE, own_score(winner))
    winner["score"] = 1.0 - (1.0 - sa) * (1.0 - sb)
    _check(winner, CONFIRMED, 1.0)


def _merge_regions(old: list[dict], new: list[dict], policy: MergePolicy) -> None:
    for r in old:
        _mark(r, KEPT)
    for r in new:
        _mark(r, NEW)
    thr = policy.nms_iou
    for kind in sorted({r["kind"] for r in old + new}):
        olds = _dedupe([r for r in old if r["status"] == "kept" and r["kind"] == kind], thr)
        news = _dedupe([r for r in new if r["status"] == "kept" and r["kind"] == kind], thr)
        for r in olds + news:
            _check(r, AGREEMENT, 0.0)
        matched_new = set()
        for i, j, iou in match_boxes([r["box"] for r in olds], [r["box"] for r in news]):
            o, n = olds[i], news[j]
            _check(o, AGREEMENT, iou)
            _check(n, AGREEMENT, iou)
            if iou <= thr:
                continue
            matched_new.add(j)
            if is_human(o):
                _drop(n, "merge:human_kept")
                continue
            winner, loser = (n, o) if own_score(n) >= own_score(o) else (o, n)
            if _label(o) == _label(n) and is_model(o) != is_model(n):
                _confirm(winner, o, n)
            _drop(loser, "merge:replaced" if loser is o else "merge:outscored")
            if loser is o:
                _mark(o, REPLACED)
        for j, n in enumerate(news):
            if j in matched_new:
                continue
            kept = [r["box"] for r in olds + news if r["status"] == "kept" and r is not n]
            if kept and not is_human(n) and box_iou_matrix([n["box"]], kept).max() > thr:
                _drop(n, "merge:duplicate")


# ----------------------------------------------------------------------- captions
_WORD = re.compile(r"\w+(?:[-']\w+)*")
MAX_CATEGORY_WORDS = 6


def _norm(category: str) -> str:
    """A category as the words a caption can name it with ("Traffic  light" -> "traffic light")."""
    return " ".join(_WORD.findall(category.lower()))


def _mentions(text: str, categories: set[str]) -> set[str]:
    """The categories (normalised, _norm) a caption names, as whole words (plural s / es allowed):
    a set lookup of the caption's n-grams, so a vocabulary of thousands costs no regex each."""
    words = _WORD.findall(text.lower())
    longest = min(MAX_CATEGORY_WORDS, max((c.count(" ") + 1 for c in categories), default=0))
    found = set()
    for n in range(1, longest + 1):
        for i in range(len(words) - n + 1):
            gram = " ".join(words[i:i + n])
            for form in (gram, gram[:-1] if gram.endswith("s") else None, gram[:-2] if gram.endswith("es") else None):
                if form and form in categories:
                    found.add(form)
    return found


def caption_agreement(caption: dict, groundings: list[dict], regions: list[dict],
                      vocabulary: frozenset = frozenset()) -> float | None:
    """Mean of the grounded-box match rate and the mention F1 against the kept regions' categories
    (each where defined); None when neither is (no grounding, nothing named, no kept object). Known
    categories: the image's region labels and `vocabulary` (the round's training categories)."""
    kept = [r for r in regions if r["status"] == "kept" and r["kind"] == "object"]
    parts = []
    own = [g for g in groundings if g["text_ann_id"] == caption["ann_id"] and g.get("box")]
    if own:
        if kept:
            iou = box_iou_matrix([g["box"] for g in own], [r["box"] for r in kept])
            parts.append(float((iou.max(axis=1) >= MATCH_IOU).mean()))
        else:
            parts.append(0.0)
    known = {_norm(_label(r)) for r in regions if r["kind"] == "object"} | set(vocabulary)
    named = _mentions(caption.get("text") or "", known - {""})
    present = {_norm(_label(r)) for r in kept} - {""}
    if named or present:  # mention F1: precision alone let a short caption ("a dog") beat a complete one
        hit = len(named & present)
        parts.append(2 * hit / (len(named) + len(present)))
    return float(np.mean(parts)) if parts else None


def _merge_texts(old: list[dict], new: list[dict], groundings: list[dict], regions: list[dict],
                 vocabulary: frozenset = frozenset()) -> tuple[set[str], set[str]]:
    """Returns (ann_ids of old texts replaced, ann_ids of new texts outscored)."""
    replaced, outscored = set(), set()
    for t in old:
        _mark(t, KEPT)
    for t in new:
        _mark(t, NEW)

    def key(t: dict) -> tuple[float, float]:
        a = caption_agreement(t, groundings, regions, vocabulary)
        if a is not None:
            _check(t, CAPTION_AGREEMENT, a)
        return (0.0 if a is None else a, own_score(t))

    for tier in sorted({t["tier"] for t in new if t["status"] == "kept"}):
        rivals = [t for t in old if t["status"] == "kept" and t["tier"] == tier and not is_human(t)]
        mine = [t for t in new if t["status"] == "kept" and t["tier"] == tier]
        best_new = max(key(t) for t in mine)
        if rivals and best_new < max(key(t) for t in rivals):
            for t in mine:
                _drop(t, "merge:outscored")
                outscored.add(t["ann_id"])
            continue
        for t in rivals:
            _drop(t, "merge:replaced")
            _mark(t, REPLACED)
            replaced.add(t["ann_id"])
    return replaced, outscored


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


def merge_record(old: dict, new: dict, policy: MergePolicy = MergePolicy()) -> dict:
    """old: the image's round k-1 record; new: the same image relabelled by round k (filtered)."""
    if old["image_id"] != new["image_id"]:
        raise ValueError(f"merge: image_id {old['image_id']} (round k-1) != {new['image_id']} (round k)")
    out = dict(old)
    old_r, new_r = list(old.get("regions") or []), list(new.get("regions") or [])
    _merge_regions(old_r, new_r, policy)
    old_texts, new_texts = list(old.get("texts") or []), list(new.get("texts") or [])
    old_g, new_g = list(old.get("groundings") or []), list(new.get("groundings") or [])
    replaced, _ = _merge_texts(old_texts, new_texts, old_g + new_g, old_r + new_r, policy.vocabulary)
    _merge_groundings(old_g, new_g, replaced, new_texts)
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
    nms_iou: float = Field(0.7, gt=0, le=1, description="IoU above which two boxes of a kind are one object")
    vocabulary: list[str] = Field(default_factory=list, description="the categories the round trained on (its "
                                  "train_summary.json `categories`, set by refine.rounds): a caption naming one the "
                                  "image has no kept region of loses caption agreement")


class MergeStage(Stage):
    """The last stage of a round's step: the relabelled (and filtered) record merged with the
    record as it was before the round (set aside by the relabel stage). Reports the agreement
    sums of refine.metrics as the stage's metrics, so they are summed per shard by every runner."""

    name: ClassVar[str] = "merge"
    Params: ClassVar[type[StageParams]] = MergeParams
    default_resources: ClassVar[Resources] = Resources(cpus=1.0, batch_size=64)

    params: MergeParams

    def process_batch(self, records: list[dict], images=None) -> list[dict]:
        policy = MergePolicy(self.params.nms_iou, frozenset(_norm(c) for c in self.params.vocabulary) - {""})
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
