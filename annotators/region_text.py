"""Stage `region_text`: a short text (`brief`) for every kept object region, the FLD-5B way.

Florence-2 (P §4.3, docs/florence2.md section 1) gives each object region three candidate texts:
(0) its category phrase (the detector's label), (1) a caption of the region's crop by a
Florence-2 captioner, (2) the noun chunks of that caption; an image-text model scores every
candidate against the crop and the most similar one becomes the region's text. Category
names are precise but generic, crop captions are rich but may describe the background, noun
chunks sit in between: letting the crop itself choose is what keeps the text on the region.

Everything is batched over the whole input batch: one Florence-2 generate per
`caption_batch_size` crops, one spaCy pass, one CLIP image-encode call (all crops of all images)
and one text-encode call (all unique candidates). The detector's score is left alone; the
similarities go to `checks` so filters and audits can use them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import torch
from pydantic import Field

from engine.stage import Resources, Stage, StageParams, record_error

CATEGORY, CAPTION, CHUNK = 0, 1, 2
CHECK_KEYS = {CATEGORY: "sim_category", CAPTION: "sim_caption", CHUNK: "sim_chunk_best"}
CAPTION_TASK = "<CAPTION>"
# A <CAPTION> answer is plain text; any markup left by the parser (location / special tokens,
# which an untrained or drifting model can emit) is not part of a description.
_MARKUP = re.compile(r"<[^<>]*>")


def clean_caption(text: str | None) -> str:
    return " ".join(_MARKUP.sub(" ", text or "").split())


@dataclass(frozen=True)
class Choice:
    """The candidate kind that won, its text, and the checks to record (name -> value)."""

    kind: int
    text: str
    checks: dict[str, float]


def choose_brief(
    label: str | None, caption: str | None, chunks: Sequence[str], similarity: dict[str, float], prefix: str
) -> Choice | None:
    """Pick the candidate text most similar to the crop.

    similarity: candidate text -> cosine similarity with the crop. The chunk candidate is the
    best-scoring noun chunk. Ties go to the earlier kind (category, then caption, then chunk):
    the shorter, more conservative text. None when there is no candidate at all.
    """
    best_per_kind: dict[int, tuple[float, str]] = {}
    if label:
        best_per_kind[CATEGORY] = (similarity[label], label)
    if caption:
        best_per_kind[CAPTION] = (similarity[caption], caption)
    for chunk in chunks:
        score = similarity[chunk]
        if CHUNK not in best_per_kind or score > best_per_kind[CHUNK][0]:
            best_per_kind[CHUNK] = (score, chunk)
    if not best_per_kind:
        return None
    checks = {f"{prefix}.{CHECK_KEYS[k]}": float(s) for k, (s, _) in best_per_kind.items()}
    kind = max(best_per_kind, key=lambda k: (best_per_kind[k][0], -k))
    checks[f"{prefix}.choice"] = float(kind)
    return Choice(kind, best_per_kind[kind][1], checks)


class RegionTextParams(StageParams):
    clip_model: str = Field("clip", description="image-text model that picks the text (ClipModel reference/alias)")
    captioner: str = Field("florence2", description="Florence-2 that captions the crops (reference/alias)")
    min_crop_size: int = Field(
        8, ge=1, description="regions whose box is narrower or shorter (pixels) get no text: too small to describe"
    )
    caption_batch_size: int = Field(16, ge=1, description="crops per Florence-2 generate call")
    max_new_tokens: int = Field(
        20, ge=1, description="crop caption length cap (FLD-5B brief region texts average 2.55 tokens)"
    )
    num_beams: int = Field(3, ge=1, description="beam search width of the crop captioner (Florence-2's recommended 3)")
    overwrite: bool = Field(False, description="also re-describe regions that already have a brief (e.g. human ones)")
    candidates: list[Literal["category", "caption", "chunk"]] = Field(
        default_factory=lambda: ["category", "caption", "chunk"], min_length=1,
        description="candidate texts CLIP chooses from; [category] alone skips the crop captioner "
                    "(offline profile: a random captioner and CLIP would pick noise over a real detector's category)",
    )


@dataclass
class _Region:
    record: dict
    region: dict
    crop: object  # PIL image
    caption: str = ""
    chunks: tuple[str, ...] = ()


class RegionTextAnnotator(Stage):
    """Fills `brief` of kept object regions with the best of category / crop caption / noun chunk."""

    name: ClassVar[str] = "region_text"
    Params: ClassVar[type[StageParams]] = RegionTextParams
    # gpus 0 by default so CPU-only clusters can schedule it; on GPU clusters set params gpus: 0.5 (two actors a GPU)
    default_resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, batch_size=8, concurrency=1)
    needs_images: ClassVar[bool] = True
    uses_model: ClassVar[bool] = True
    model_params: ClassVar[dict[str, str]] = {"clip_model": "open_clip", "captioner": "hf"}

    params: RegionTextParams

    @property
    def captions_crops(self) -> bool:
        """The crop captioner runs only when a caption or its noun chunks are candidates."""
        return bool({"caption", "chunk"} & set(self.params.candidates))

    def check_model(self, param: str, ref: str) -> None:
        if param == "captioner":  # the CLIP model is checked by preflight's open_clip resolver
            from engine.random_models import check as check_random

            check_random("florence2", ref)

    def setup(self) -> None:
        from annotators.clip_model import ClipModel
        from annotators.florence2_model import Florence2Model
        from engine.models import load_spacy

        self.clip = ClipModel.load(self.resolve_model(self.params.clip_model))
        if self.captions_crops:
            self.captioner = Florence2Model.load(self.resolve_model(self.params.captioner))
            self.nlp = load_spacy()
            self._suppress = self._non_text_tokens()

    def _non_text_tokens(self) -> list[int]:
        """Token ids a <CAPTION> answer never contains: location / polygon tokens (an undertrained
        captioner emits them and they would eat the token budget). Suppressed during generation so
        the whole budget goes to words (Florence2Model.generate adds the token-less embedding rows)."""
        tokenizer = self.captioner.processor.tokenizer
        markup = [f"<loc_{i}>" for i in range(1000)] + ["<poly>", "</poly>", "<sep>"]
        ids = [i for i in tokenizer.convert_tokens_to_ids(markup) if i is not None and i != tokenizer.unk_token_id]
        return sorted(set(ids))

    # ------------------------------------------------------------------ batches
    def process_batch(self, records: list[dict], images: list | None) -> list[dict]:
        regions: list[_Region] = []
        for rec, image in zip(records, images):
            found = self.guarded(rec, lambda rec=rec, image=image: self._crops(rec, image))
            regions.extend(found or [])
        if not regions:
            return records
        if self.captions_crops:
            self._caption(regions)
            self._chunk(regions)
        self._choose(regions)
        return records

    def _eligible(self, region: dict) -> bool:
        return (
            region.get("kind") == "object"
            and region.get("status") == "kept"
            and (self.params.overwrite or not region.get("brief"))
        )

    def _crops(self, record: dict, image) -> list[_Region]:
        todo = [r for r in record["regions"] if self._eligible(r)]
        if not todo:
            return []
        out = []
        for region in todo:
            x0, y0, x1, y1 = region["box"]
            left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
            right, bottom = min(image.width, math.ceil(x1)), min(image.height, math.ceil(y1))
            if min(right - left, bottom - top) < self.params.min_crop_size:
                continue
            out.append(_Region(record, region, image.crop((left, top, right, bottom))))
        return out

    def _caption(self, regions: list[_Region]) -> None:
        step = self.params.caption_batch_size
        for start in range(0, len(regions), step):
            chunk = regions[start:start + step]
            try:
                answers = self._run_captioner([r.crop for r in chunk])
            except Exception:  # noqa: BLE001 - caption one by one to find the failing crop
                answers = [self.guarded(r.record, lambda r=r: self._run_captioner([r.crop])[0]) for r in chunk]
            for r, answer in zip(chunk, answers):
                r.caption = clean_caption((answer or {}).get(CAPTION_TASK))

    def _run_captioner(self, crops: list) -> list[dict]:
        return self.captioner.run(
            crops,
            CAPTION_TASK,
            max_new_tokens=self.params.max_new_tokens,
            num_beams=self.params.num_beams,
            suppress_tokens=self._suppress,
        )

    def _chunk(self, regions: list[_Region]) -> None:
        from annotators.phrases import GROUNDING_BLACKLIST, groundable_chunks

        # noun chunks that can name a region: pronoun-only and paper-blacklisted ones ("the image") are no text
        per_caption = groundable_chunks([r.caption for r in regions], self.nlp, blacklist=GROUNDING_BLACKLIST)
        for r, found in zip(regions, per_caption):
            r.chunks = tuple(dict.fromkeys(c.text for c in found))

    def _choose(self, regions: list[_Region]) -> None:
        allowed = set(self.params.candidates)
        labels = [r.region.get("label") if "category" in allowed else None for r in regions]
        for r in regions:  # candidates left out of `candidates` take no part
            r.caption = r.caption if "caption" in allowed else ""
            r.chunks = r.chunks if "chunk" in allowed else ()
        texts = list(dict.fromkeys(t for r, label in zip(regions, labels) for t in (label, r.caption, *r.chunks) if t))
        try:
            image_emb = self.clip.encode_images([r.crop for r in regions])  # one call for the whole batch
            text_emb = self.clip.encode_texts(texts)
        except Exception as exc:  # noqa: BLE001 - the model failed for the batch: say so on every image
            for rec in {id(r.record): r.record for r in regions}.values():
                record_error(rec, self.name, exc)
            return
        sims = (image_emb @ text_emb.T) if texts else torch.zeros((len(regions), 0))
        index = {t: j for j, t in enumerate(texts)}
        for i, (r, label) in enumerate(zip(regions, labels)):
            candidates = [t for t in (label, r.caption, *r.chunks) if t]
            similarity = {t: float(sims[i, index[t]]) for t in candidates}
            choice = choose_brief(label, r.caption, r.chunks, similarity, self.name)
            if choice is None:
                continue
            r.region["brief"] = choice.text
            r.region["checks"] = {**(r.region.get("checks") or {}), **choice.checks}


__all__ = ["RegionTextAnnotator", "RegionTextParams", "choose_brief", "clean_caption", "Choice"]
