"""CLIP score filter (stage 2): how well each annotation's text matches its pixels.

- regions: the crop of the box against the region's text (its brief description when it has
  one, else its label; OCR regions: the recognised string) -> checks `clip_score.region`;
- texts (captions): the whole image against the caption -> `clip_score.text`;
- groundings (optional): the crop of the box against the phrase -> `clip_score.grounding`.

The score is the cosine similarity of open_clip's normalised embeddings (ClipModel), in
[-1, 1]. Every crop of the whole batch goes through the image tower in chunks of
`clip_batch_size` (one forward per chunk, not one per region), texts likewise, deduplicated.

Two ways to drop, per annotation type (both may be set; the threshold applies first):
- `min_score`: a global cosine threshold. Reproducible: an annotation's fate depends on itself
  only, the same on every runner, shard size and batch size; but the right value depends on the
  CLIP model (LAION-400M used 0.3 with ViT-B/32; DataComp's top-30% cut with ViT-L/14 is ~0.24).
- `keep_top_fraction`: DataComp-style "keep the best fraction", computed PER IMAGE (the best
  ceil(f * n) kept annotations of that type in the image, ties by ann_id). Per image because an
  image is always processed whole, so it is reproducible too; a fraction over a runner's batch
  would change with batch size and shard boundaries. The price: it is relative, so an image
  whose regions are all good still loses some, and one whose are all bad keeps some.
Reasons: clip_score:low_score, clip_score:not_top.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from engine.stage import Resources, Stage, StageParams
from filters.decision import Threshold, drop, is_kept, reset_all, set_check
from filters.per_kind import merge_per_key

ANN_TYPES = ("region", "text", "grounding")
LIST_OF_TYPE = {"region": "regions", "text": "texts", "grounding": "groundings"}
DEFAULT_MIN_SCORE: dict[str, float | None] = {"region": 0.2, "text": 0.24, "grounding": None}
DEFAULT_TOP_FRACTION: dict[str, float | None] = {"region": None, "text": None, "grounding": None}


class ClipScoreParams(StageParams):
    model: str = "clip"  # the models: alias region_text uses too (ViT-L-14/openai for real runs)
    types: list[Literal["region", "text", "grounding"]] = Field(default_factory=lambda: ["region", "text"])
    min_score: dict[str, float | None] = DEFAULT_MIN_SCORE  # per type; null: off
    keep_top_fraction: dict[str, float | None] = DEFAULT_TOP_FRACTION  # per type, per image; null: off
    region_text: Literal["auto", "label", "brief"] = "auto"  # auto: brief if any, else label
    region_template: str = "{}"  # e.g. "a photo of {}." for one-word labels
    crop_padding: float = Field(0.0, ge=0.0)  # grow each crop by this fraction of its box side
    skip_dropped: bool = False  # True: do not score annotations already dropped (saves compute)
    clip_batch_size: int = Field(64, ge=1)  # crops per forward pass

    @field_validator("min_score", "keep_top_fraction", mode="before")
    @classmethod
    def _per_type(cls, value: Any, info) -> dict:
        defaults = DEFAULT_MIN_SCORE if info.field_name == "min_score" else DEFAULT_TOP_FRACTION
        return merge_per_key(value, defaults, ANN_TYPES, info.field_name)

    @field_validator("keep_top_fraction")
    @classmethod
    def _fraction_range(cls, value: dict) -> dict:
        for key, v in value.items():
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"keep_top_fraction.{key} must be in (0, 1], got {v}")
        return value

    @field_validator("region_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if "{}" not in value:
            raise ValueError(f"region_template must contain '{{}}' for the region text, got {value!r}")
        return value


def crop_box(image, box: list[float], padding: float = 0.0):
    """The box's pixels (at least 1x1), grown by `padding` x its side, inside the image."""
    x0, y0, x1, y1 = box
    pw, ph = (x1 - x0) * padding, (y1 - y0) * padding
    left = max(0, min(image.width - 1, math.floor(x0 - pw)))
    top = max(0, min(image.height - 1, math.floor(y0 - ph)))
    right = min(image.width, max(left + 1, math.ceil(x1 + pw)))
    bottom = min(image.height, max(top + 1, math.ceil(y1 + ph)))
    return image.crop((left, top, right, bottom))


class ClipScoreFilter(Stage):
    """Scores text-pixel agreement with open_clip and drops the poorest matches."""

    name: ClassVar[str] = "clip_score"
    Params: ClassVar[type[StageParams]] = ClipScoreParams
    default_resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, batch_size=32)
    needs_images: ClassVar[bool] = True
    uses_model: ClassVar[bool] = True
    model_params: ClassVar[dict[str, str]] = {"model": "open_clip"}

    def setup(self) -> None:
        from annotators.clip_model import ClipModel

        self.clip = ClipModel.load(self.resolve_model(self.params.model))

    # ------------------------------------------------------------------ scoring
    def pair_scores(self, images: list, texts: list[str]) -> list[float]:
        """Cosine similarity of images[i] with texts[i], batched; each distinct text encoded once."""
        if not images:
            return []
        unique = sorted(set(texts))
        text_index = {t: i for i, t in enumerate(unique)}
        text_emb = self.clip.encode_texts(unique)
        image_emb = self.clip.encode_images(images, batch_size=self.params.clip_batch_size)
        idx = [text_index[t] for t in texts]
        return (image_emb * text_emb[idx]).sum(dim=-1).tolist()

    def thresholds(self) -> list[Threshold]:
        """The global cosine thresholds (keep_top_fraction is relative: no fixed cut to mark)."""
        p: ClipScoreParams = self.params  # type: ignore[assignment]
        return [Threshold(LIST_OF_TYPE[t], f"{self.name}.{t}", f"{t} min_score", float(p.min_score[t]),
                          param=("min_score", t))
                for t in p.types if p.min_score.get(t) is not None]

    def region_text(self, ann: dict) -> str:
        p: ClipScoreParams = self.params  # type: ignore[assignment]
        if ann.get("kind") == "text" or p.region_text == "label":
            text = ann.get("label")
        elif p.region_text == "brief":
            text = ann.get("brief")
        else:
            text = ann.get("brief") or ann.get("label")
        text = (text or "").strip()
        return p.region_template.format(text) if text else ""

    def _jobs(self, rec: dict, image) -> list[tuple[str, dict, Any, str]]:
        """(type, annotation, PIL image or crop, text) of every annotation of rec to score."""
        p: ClipScoreParams = self.params  # type: ignore[assignment]
        wanted = []
        for ann_type in p.types:
            for ann in rec.get(LIST_OF_TYPE[ann_type]) or []:
                if p.skip_dropped and not is_kept(ann):
                    continue
                text = {"region": self.region_text, "grounding": lambda a: (a.get("phrase") or "").strip(),
                        "text": lambda a: (a.get("text") or "").strip()}[ann_type](ann)
                if text:
                    wanted.append((ann_type, ann, text))
        if not wanted:
            return []
        jobs = []
        for ann_type, ann, text in wanted:
            pixels = image if ann_type == "text" else crop_box(image, ann["box"], p.crop_padding)
            jobs.append((ann_type, ann, pixels, text))
        return jobs

    def process_batch(self, records: list[dict], images: list | None) -> list[dict]:
        reset_all(records, self.name)
        jobs: list[tuple[str, dict, Any, str]] = []
        for rec, image in zip(records, images):
            found = self.guarded(rec, lambda rec=rec, image=image: self._jobs(rec, image))
            jobs.extend(found or [])
        scores = self.pair_scores([j[2] for j in jobs], [j[3] for j in jobs])
        for (ann_type, ann, _, _), score in zip(jobs, scores):
            set_check(ann, self.name, ann_type, score)
        for rec in records:
            self.guarded(rec, lambda rec=rec: self.decide(rec))
        return records

    # ---------------------------------------------------------------- decisions
    def decide(self, rec: dict) -> None:
        """Apply min_score, then keep_top_fraction per image, to the scores in checks."""
        p: ClipScoreParams = self.params  # type: ignore[assignment]
        for ann_type in p.types:
            key = f"{self.name}.{ann_type}"
            scored = [a for a in rec.get(LIST_OF_TYPE[ann_type]) or [] if key in (a.get("checks") or {})]
            threshold = p.min_score.get(ann_type)
            if threshold is not None:
                for ann in scored:
                    if ann["checks"][key] < threshold:
                        drop(ann, self.name, "low_score")
            fraction = p.keep_top_fraction.get(ann_type)
            if fraction is not None:
                candidates = sorted((a for a in scored if is_kept(a)), key=lambda a: (-a["checks"][key], a["ann_id"]))
                keep = math.ceil(fraction * len(candidates) - 1e-9)  # 0.3 * 10 is 3.0000000000000004
                for ann in candidates[keep:]:
                    drop(ann, self.name, "not_top")
