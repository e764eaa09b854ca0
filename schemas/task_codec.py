"""Kept annotations of an image record -> Florence-2 training examples (task, text input, target).

Which annotations feed which task (docs/florence2.md §2):
    texts brief / detailed / more_detailed -> <CAPTION> / <DETAILED_CAPTION> / <MORE_DETAILED_CAPTION>
    object regions with a label             -> <OD>                      `label<loc>x4 ...`
    object regions with a brief             -> <DENSE_REGION_CAPTION>    `brief<loc>x4 ...`
    every object region                     -> <REGION_PROPOSAL>         `<loc>x4 ...`
    text regions (OCR lines)                -> <OCR> (lines joined by a space), <OCR_WITH_REGION> `line<loc>x8 ...`
    groundings of one caption               -> <CAPTION_TO_PHRASE_GROUNDING> input: caption, `phrase<loc>x4[<loc>x4] ...`
    object region with a brief              -> <REGION_TO_DESCRIPTION>   input: `<loc>x4`, target: brief
    object region with polygon / mask       -> <REFERRING_EXPRESSION_SEGMENTATION> input: brief or label,
                                               <REGION_TO_SEGMENTATION>  input: `<loc>x4`, target: rings joined by <sep>

Order of instances inside a target: by the quantised (y0, x0, y1, x1) of the box, then the label
(reading order, as the original Florence-2 data); phrases of a grounding by their position in the
caption. A target longer than `max_target_tokens` is cut after the last WHOLE instance that fits
(a label and its location tokens are never separated); a pure-text target that does not fit is
skipped rather than cut mid-sentence. Region-level tasks yield at most `max_region_examples`
examples per image (the first ones in the order above), so one crowded image cannot dominate.
Every text put in a target or text input is cleaned (loc_tokens.clean_phrase: no '<', '>',
newlines), so a caption holding a literal "<loc_5>" never becomes a location token; an instance
whose text cleans to nothing is left out, because bare location tokens would be read by the
official parser as part of the next instance.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from schemas.florence2_tasks import BY_TOKEN, TRAINED_TOKENS
from schemas.geometry import box_to_quad, mask_to_polygon, rle_to_mask
from schemas.loc_tokens import (
    box_to_tokens,
    clean_phrase,
    polygon_to_tokens,
    quad_to_tokens,
    quantize_points,
)

TokenCounter = Callable[[str], int]
_SPECIAL = re.compile(r"<loc_\d+>|<sep>|</?poly>")


@dataclass(frozen=True)
class Example:
    """One training example: the processor gets `prompt` (task token + input), the decoder `target`."""

    image_id: str
    task: str
    text_input: str
    target: str

    @property
    def prompt(self) -> str:
        return self.task + self.text_input


def approx_token_count(text: str) -> int:
    """Upper-bound estimate when no tokenizer is at hand: 1 per location/polygon token, and one
    per 2 characters of the remaining text (byte-level BPE averages about 4 on English)."""
    specials = _SPECIAL.findall(text)
    rest = _SPECIAL.sub("", text)
    return len(specials) + (len(rest.encode()) + 1) // 2


def _kept(anns: Iterable[dict] | None) -> list[dict]:
    return [a for a in anns or [] if a.get("status") == "kept"]


def _order_key(region: dict, w: int, h: int) -> tuple:
    x0, y0, x1, y1 = quantize_points(region["box"], w, h)
    return (y0, x0, y1, x1, region.get("label") or "", region.get("brief") or "")


def _join_whole(pieces: Sequence[str], budget: int, count: TokenCounter) -> str:
    """Concatenate pieces while they fit in budget tokens; never split a piece."""
    out, used = [], 0
    for piece in pieces:
        n = count(piece)
        if used + n > budget:
            break
        out.append(piece)
        used += n
    return "".join(out)


def _polygon_of(region: dict) -> list[list[float]] | None:
    if region.get("polygon"):
        rings = [r for r in region["polygon"] if len(r) >= 6]
        return rings or None
    if region.get("mask"):
        rings = mask_to_polygon(rle_to_mask(region["mask"]), tolerance=1.0)
        return rings or None
    return None


class TaskCodec:
    """Builds examples for the chosen tasks; stateless apart from its limits."""

    def __init__(
        self,
        tasks: Sequence[str] = TRAINED_TOKENS,
        max_target_tokens: int = 1024,
        max_region_examples: int = 8,
        count_tokens: TokenCounter = approx_token_count,
    ):
        unknown = [t for t in tasks if t not in TRAINED_TOKENS]
        if unknown:
            raise ValueError(f"unknown Florence-2 training task(s) {unknown}; known: {list(TRAINED_TOKENS)}")
        if max_target_tokens < 8:
            raise ValueError(f"max_target_tokens must be >= 8, got {max_target_tokens}")
        self.tasks = tuple(tasks)
        self.max_target_tokens = max_target_tokens
        self.max_region_examples = max_region_examples
        self.count = count_tokens
        self.skipped_too_long = 0  # pure-text targets over the limit

    @property
    def budget(self) -> int:
        return self.max_target_tokens - 2  # <s> and </s>

    # ------------------------------------------------------------------ API
    def encode(self, record: dict) -> list[Example]:
        """All examples of one image record, in task order then instance order."""
        w, h = int(record["width"]), int(record["height"])
        iid = record["image_id"]
        texts = _kept(record.get("texts"))
        regions = sorted(_kept(record.get("regions")), key=lambda r: _order_key(r, w, h))
        objects = [r for r in regions if r.get("kind") == "object"]
        # a line whose text cleans to nothing would leave bare location tokens, which the official
        # parser glues onto the next line: such lines are not encoded
        lines = [r for r in regions if r.get("kind") == "text" and clean_phrase(r.get("label") or "")]
        groundings = _kept(record.get("groundings"))
        out: list[Example] = []
        for task in self.tasks:
            out.extend(self._task(task, iid, w, h, texts, objects, lines, groundings))
        return out

    def encode_all(self, records: Iterable[dict]) -> list[Example]:
        return [ex for rec in records for ex in self.encode(rec)]

    # ------------------------------------------------------------- per task
    def _text_example(self, iid: str, task: str, target: str, text_input: str = "") -> list[Example]:
        target = clean_phrase(target)  # a literal "<loc_5>" or "</s>" in a caption must not become a token
        if not target:
            return []
        if self.count(target) > self.budget:
            self.skipped_too_long += 1
            return []
        return [Example(iid, task, text_input, target)]

    def _boxes(self, iid, task, w, h, items: list[tuple[str, Sequence[float]]]) -> list[Example]:
        pieces = [clean_phrase(label) + box_to_tokens(box, w, h) for label, box in items]
        target = _join_whole(pieces, self.budget, self.count)
        return [Example(iid, task, "", target)] if target else []

    def _task(self, task, iid, w, h, texts, objects, lines, groundings) -> list[Example]:
        tier = BY_TOKEN[task].tier
        if tier is not None:
            return [ex for t in texts if t["tier"] == tier for ex in self._text_example(iid, task, t["text"] or "")]
        if task == "<OD>":
            items = [(r["label"], r["box"]) for r in objects if clean_phrase(r.get("label") or "")]
            return self._boxes(iid, task, w, h, items)
        if task == "<DENSE_REGION_CAPTION>":
            items = [(r["brief"], r["box"]) for r in objects if clean_phrase(r.get("brief") or "")]
            return self._boxes(iid, task, w, h, items)
        if task == "<REGION_PROPOSAL>":
            return self._boxes(iid, task, w, h, [("", r["box"]) for r in objects])
        if task == "<OCR>":
            return self._text_example(iid, task, " ".join(clean_phrase(r["label"]) for r in lines))
        if task == "<OCR_WITH_REGION>":
            pieces = []
            for r in lines:
                quad = r.get("quad") or box_to_quad(r["box"])
                pieces.append(clean_phrase(r["label"]) + quad_to_tokens(quad, w, h))
            target = _join_whole(pieces, self.budget, self.count)
            return [Example(iid, task, "", target)] if target else []
        if task == "<CAPTION_TO_PHRASE_GROUNDING>":
            return self._grounding(iid, w, h, texts, groundings)
        if task == "<REGION_TO_DESCRIPTION>":
            out = []
            for r in objects:
                if len(out) >= self.max_region_examples:
                    break
                if clean_phrase(r.get("brief") or ""):
                    out += self._text_example(iid, task, r["brief"], box_to_tokens(r["box"], w, h))
            return out
        if task in ("<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>"):
            return self._segmentation(task, iid, w, h, objects)
        raise ValueError(f"no encoder for task {task}")

    def _grounding(self, iid, w, h, texts, groundings) -> list[Example]:
        by_text: dict[str, list[dict]] = {}
        for g in groundings:
            by_text.setdefault(g["text_ann_id"], []).append(g)
        out = []
        for t in texts:
            gs = by_text.get(t["ann_id"])
            caption = clean_phrase(t["text"] or "")
            if not gs or not caption:
                continue
            spans: dict[tuple, list[dict]] = {}
            for g in sorted(gs, key=lambda g: (g["char_start"], g["char_end"], _order_key(g, w, h))):
                spans.setdefault((g["char_start"], g["char_end"], g["phrase"]), []).append(g)
            pieces = [
                clean_phrase(phrase) + "".join(box_to_tokens(g["box"], w, h) for g in members)
                for (_, _, phrase), members in spans.items()
                if clean_phrase(phrase)
            ]
            target = _join_whole(pieces, self.budget, self.count)
            if target:
                out.append(Example(iid, "<CAPTION_TO_PHRASE_GROUNDING>", caption, target))
        return out

    def _segmentation(self, task, iid, w, h, objects) -> list[Example]:
        out = []
        for r in objects:
            if len(out) >= self.max_region_examples:
                break
            if not (r.get("polygon") or r.get("mask")):
                continue
            rings = _polygon_of(r)
            if not rings:
                continue
            target = polygon_to_tokens(rings, w, h)
            if self.count(target) > self.budget:  # one instance: cut whole rings, keep at least one
                kept = _join_whole([polygon_to_tokens([ring], w, h) + "<sep>" for ring in rings], self.budget, self.count)
                target = kept[: -len("<sep>")] if kept else ""
            if not target:
                continue
            if task == "<REFERRING_EXPRESSION_SEGMENTATION>":
                phrase = clean_phrase(r.get("brief") or r.get("label") or "")
                if phrase:
                    out.append(Example(iid, task, phrase, target))
            else:
                out.append(Example(iid, task, box_to_tokens(r["box"], w, h), target))
        return out
