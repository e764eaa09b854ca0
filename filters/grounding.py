"""Grounding filter (stage 2) for text-phrase-region triplets.

Florence-2 (P §4.2) keeps a triplet when both its phrase and its box are confident enough and
its phrase is not in a blacklist of phrases that name no region (pronouns, "the image", "a
group", "lots" ...). We add two consistency rules the stored data makes cheap: the box must
agree with its SAM mask (IoU of the box with the mask's tight box), and the phrase must still
be the caption's text at [char_start, char_end) of a caption that is kept.

Checks: grounding_filter.blacklisted, .mask_box_iou, .span_ok, .text_kept.
Reasons: grounding_filter:blacklist, :low_box_score, :low_phrase_score, :mask_disagree,
:span_mismatch, :text_dropped. Run it after text_filter (for text_dropped).
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from annotators.phrases import GROUNDING_BLACKLIST, is_blacklisted, normalize_phrase
from engine.stage import Resources, Stage, StageParams
from filters.decision import Threshold, drop, is_kept, reset_all, set_check
from schemas.geometry import mask_box_iou


class GroundingFilterParams(StageParams):
    blacklist: list[str] = Field(default_factory=lambda: sorted(GROUNDING_BLACKLIST))  # the paper's list
    blacklist_extra: list[str] = Field(default_factory=list)  # added to `blacklist`
    drop_pronouns: bool = True  # phrases made only of pronouns ("it", "they", "this one")
    # Grounding DINO's demo defaults: box_threshold 0.35, text_threshold 0.25.
    min_box_score: float | None = 0.35  # on the annotation's score; null: off
    min_phrase_score: float | None = 0.25  # on checks[phrase_score_key]; null: off
    phrase_score_key: str = "grounding.text_score"  # what annotators/grounding.py writes
    # SAM masks prompted with a box fill it: their tight box overlaps the prompt box by ~0.8-0.95.
    min_mask_iou: float | None = 0.5
    check_span: bool = True
    drop_if_text_dropped: bool = True


class GroundingFilter(Stage):
    """Blacklist, confidence and consistency rules on phrase-box(-mask) triplets."""

    name: ClassVar[str] = "grounding_filter"
    Params: ClassVar[type[StageParams]] = GroundingFilterParams
    default_resources: ClassVar[Resources] = Resources(cpus=0.5, batch_size=64)

    def setup(self) -> None:
        p: GroundingFilterParams = self.params  # type: ignore[assignment]
        self.banned = {normalize_phrase(b) for b in [*p.blacklist, *p.blacklist_extra]}

    def process_batch(self, records: list[dict], images: list[bytes] | None) -> list[dict]:
        reset_all(records, self.name, ("groundings",))
        for rec in records:
            self.guarded(rec, lambda rec=rec: self.filter_record(rec))
        return records

    def thresholds(self) -> list[Threshold]:
        """Every active numeric rule, on the check (or score) it reads."""
        p: GroundingFilterParams = self.params  # type: ignore[assignment]
        rules = (("score", "min_box_score", p.min_box_score), (p.phrase_score_key, "min_phrase_score", p.min_phrase_score),
                 (f"{self.name}.mask_box_iou", "min_mask_iou", p.min_mask_iou))
        return [Threshold("groundings", value_of, rule, float(v), param=(rule,)) for value_of, rule, v in rules if v is not None]

    def is_blacklisted(self, phrase: str) -> bool:
        """Empty, in the blacklist, or (with drop_pronouns) pronouns only; compared lower-cased."""
        return is_blacklisted(phrase, self.banned, pronouns=self.params.drop_pronouns)

    def filter_record(self, rec: dict) -> None:
        p: GroundingFilterParams = self.params  # type: ignore[assignment]
        texts = {t["ann_id"]: t for t in rec.get("texts") or []}
        for ann in rec.get("groundings") or []:
            phrase = ann.get("phrase") or ""
            blacklisted = self.is_blacklisted(phrase)
            set_check(ann, self.name, "blacklisted", blacklisted)
            if blacklisted:
                drop(ann, self.name, "blacklist")

            text = texts.get(ann.get("text_ann_id"))
            if text is not None:
                set_check(ann, self.name, "text_kept", is_kept(text))
                if p.drop_if_text_dropped and not is_kept(text):
                    drop(ann, self.name, "text_dropped")
            if p.check_span:
                s, e = ann.get("char_start"), ann.get("char_end")
                span_ok = (
                    text is not None
                    and s is not None
                    and e is not None
                    and (text.get("text") or "")[s:e] == phrase
                )
                set_check(ann, self.name, "span_ok", span_ok)
                if not span_ok:
                    drop(ann, self.name, "span_mismatch")

            if p.min_box_score is not None and ann.get("score") is not None and ann["score"] < p.min_box_score:
                drop(ann, self.name, "low_box_score")
            phrase_score = (ann.get("checks") or {}).get(p.phrase_score_key)
            if p.min_phrase_score is not None and phrase_score is not None and phrase_score < p.min_phrase_score:
                drop(ann, self.name, "low_phrase_score")

            iou = mask_box_iou(ann.get("box"), ann.get("mask"))
            if iou is not None:
                set_check(ann, self.name, "mask_box_iou", iou)
                if p.min_mask_iou is not None and iou < p.min_mask_iou:
                    drop(ann, self.name, "mask_disagree")
