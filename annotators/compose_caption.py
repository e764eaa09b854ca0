"""Stage `compose_caption`: captions of three tiers composed from what the real specialists found,
with their groundings by construction (the offline profile's captioner).

Nothing here looks at pixels it did not get a box for and nothing is guessed: every noun phrase
names a kept object region of the detector (its category, its count, its dominant colour measured
in its mask, else its box - annotators/colors.py; none from a mask that
missed its object), every position / relation comes from the boxes,
every quoted string is an OCR line. Each such noun phrase is written together with the regions it
came from, so its groundings are exact: `caption[char_start:char_end] == phrase`, the box is the
region's box, the mask the region's mask (the segmenter's, when the masks stage ran before).

- brief: the objects, e.g. "A photo of a white cup and two people."
- detailed: an opening sentence, where each kind of object is (thirds of the image: "on the left",
  "in the top right"), a left-of / above relation between the two largest single objects, and the
  most confident OCR line in quotes.
- more_detailed: the detailed caption, then how much of the frame each object covers, its colour,
  and every OCR line (up to `max_ocr_lines`).

Templates vary per image (chosen by a hash of image_id and tier) so that the text filter's
statistics are statistics of many sentence shapes, not of one. An image on which no specialist
found anything gets NO caption: any sentence about it would be a guess (and FLD-5B's text filter
would drop "A photo." for naming no object anyway). An image with text but no objects gets captions
about its text only. The stage also gives every kept object region without a brief the brief
"<colour> <category>" (or the category alone when no colour dominates).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from pydantic import Field

from annotators.colors import dominant_color
from engine.stage import Resources, Stage, StageParams
from schemas.geometry import rle_to_mask
from schemas.records import make_ann_id, new_annotation

MODEL = "compose:v1"  # the captioner's model reference in provenance (templates version)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# categories that get no colour word: a person's pixels are clothes / skin, saying "a blue person" is wrong
NO_COLOR = frozenset({"person"})
IRREGULAR = {"person": "people", "mouse": "mice", "sheep": "sheep", "skis": "skis", "scissors": "scissors",
             "knife": "knives", "skateboard": "skateboards", "wine glass": "wine glasses"}


def plural(label: str) -> str:
    if label in IRREGULAR:
        return IRREGULAR[label]
    head, _, last = label.rpartition(" ")
    if re.search(r"(s|sh|ch|x|z)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}".strip()


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def clean_ocr(text: str | None, max_chars: int = 40) -> str:
    """An OCR line fit to quote: printable characters only, no quotes, single spaces, at least two
    letters or digits; else ""."""
    text = "".join(ch for ch in (text or "") if unicodedata.category(ch)[0] in "LNPSZ" and ch not in "\"\ufffd")
    text = " ".join(text.split())
    if sum(ch.isalnum() for ch in text) < 2 or len(text) > max_chars:
        return ""
    return text


def where(box, width: int, height: int) -> str:
    """Coarse position of a box's centre in thirds of the image."""
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    col = 0 if cx < 1 / 3 else (2 if cx > 2 / 3 else 1)
    row = 0 if cy < 1 / 3 else (2 if cy > 2 / 3 else 1)
    return [["in the top left", "at the top", "in the top right"],
            ["on the left", "in the center", "on the right"],
            ["in the bottom left", "at the bottom", "in the bottom right"]][row][col]


def share_words(frac: float) -> str:
    if frac > 0.6:
        return "most"
    if frac > 0.4:
        return "about half"
    if frac > 0.2:
        return "about a quarter"
    if frac > 0.05:
        return "a small part"
    return "a tiny part"


@dataclass
class Group:
    """The kept object regions of one category on one image, largest first."""

    label: str
    regions: list[dict]
    areas: list[float]
    color: str | None = None

    @property
    def n(self) -> int:
        return len(self.regions)

    def phrase(self, definite: bool = False, with_color: bool = True) -> str:
        color = f"{self.color} " if with_color and self.color else ""
        if self.n == 1:
            det = "the" if definite else article(color + self.label)
            return f"{det} {color}{self.label}"
        count = NUMBERS[self.n] if self.n < len(NUMBERS) else str(self.n)
        return f"{'the ' if definite else ''}{count} {color}{plural(self.label)}"


@dataclass
class Writer:
    """Builds a caption and remembers which regions each written noun phrase came from."""

    text: str = ""
    spans: list[tuple[int, int, list[dict]]] = field(default_factory=list)

    def add(self, s: str) -> "Writer":
        self.text += s
        return self

    def phrase(self, s: str, regions: list[dict], capital: bool = False) -> "Writer":
        if capital:
            s = s[:1].upper() + s[1:]
        start = len(self.text)
        self.text += s
        self.spans.append((start, len(self.text), regions))
        return self

    def listing(self, groups: list[Group], capital: bool = False) -> "Writer":
        for i, g in enumerate(groups):
            if i:
                self.add(" and " if i == len(groups) - 1 else ", ")
            self.phrase(g.phrase(), g.regions, capital=capital and i == 0)
        return self

    def sentence_break(self) -> "Writer":
        return self.add(" ") if self.text else self


class ComposeCaptionParams(StageParams):
    max_groups: int = Field(4, ge=1, description="object categories named per caption (largest first)")
    max_ocr_lines: int = Field(3, ge=0, description="OCR lines quoted in the more detailed caption")
    min_ocr_score: float = Field(0.8, ge=0, le=1, description="OCR lines less confident than this are not quoted")
    min_color_share: float = Field(0.45, gt=0, le=1, description="share of pixels the dominant colour must cover")
    color_min_mask_iou: float = Field(0.5, ge=0, le=1, description="no colour word from a mask whose tight box "
                                      "overlaps its region's box less than this (the segmenter missed the object)")
    briefs: bool = Field(True, description="fill `brief` of kept object regions that have none: '<colour> <category>'")


def _variant(image_id: str, tier: str, n: int) -> int:
    return int(hashlib.sha1(f"{image_id}:{tier}".encode()).hexdigest()[:8], 16) % n


class ComposeCaptioner(Stage):
    """brief / detailed / more_detailed captions + groundings from the kept regions of an image."""

    name: ClassVar[str] = "compose_caption"
    Params: ClassVar[type[StageParams]] = ComposeCaptionParams
    default_resources: ClassVar[Resources] = Resources(cpus=1.0, batch_size=16)
    needs_images: ClassVar[bool] = True  # colours are measured on the pixels

    params: ComposeCaptionParams

    def process_batch(self, records: list[dict], images: list | None) -> list[dict]:
        for rec, image in zip(records, images):
            self.guarded(rec, lambda rec=rec, image=image: self.compose(rec, np.asarray(image, dtype=np.uint8)))
        return records

    # ----------------------------------------------------------------- gathering
    def _groups(self, rec: dict, rgb: np.ndarray) -> list[Group]:
        objects = [r for r in rec["regions"] if r["kind"] == "object" and r["status"] == "kept"
                   and r.get("label") and r.get("box")]
        by_label: dict[str, list[dict]] = {}
        for r in objects:
            by_label.setdefault(r["label"].strip().lower(), []).append(r)
        groups = []
        for label, regions in by_label.items():
            areas = [max(0.0, (r["box"][2] - r["box"][0]) * (r["box"][3] - r["box"][1])) for r in regions]
            order = sorted(range(len(regions)), key=lambda i: (-areas[i], regions[i]["ann_id"] or ""))
            g = Group(label, [regions[i] for i in order], [areas[i] for i in order])
            colors = {self._color(r, rgb) for r in g.regions} if label not in NO_COLOR else {None}
            g.color = colors.pop() if len(colors) == 1 else None  # say a colour only when all instances share it
            groups.append(g)
        groups.sort(key=lambda g: (-sum(g.areas), g.label))
        return groups

    def _color(self, region: dict, rgb: np.ndarray) -> str | None:
        iou = (region.get("checks") or {}).get("masks.box_mask_iou")
        if region.get("mask") and iou is not None and iou < self.params.color_min_mask_iou:
            return None  # the segmenter missed the object: its mask's colour would be something else's
        mask = rle_to_mask(region["mask"]).astype(bool) if region.get("mask") else None
        found = dominant_color(rgb, mask, region["box"], self.params.min_color_share)
        if found is not None:
            region.setdefault("checks", {})[f"{self.name}.color_share"] = found.share
        return found.name if found else None

    def _ocr(self, rec: dict) -> list[tuple[str, dict]]:
        lines = []
        for r in rec["regions"]:
            if r["kind"] != "text" or r["status"] != "kept" or not r.get("box"):
                continue
            if r.get("score") is not None and r["score"] < self.params.min_ocr_score:
                continue
            text = clean_ocr(r.get("label"))
            if text:
                lines.append((text, r))
        lines.sort(key=lambda t: (-(t[1].get("score") or 0), t[1]["box"][1], t[1]["box"][0]))
        return list({t.lower(): (t, r) for t, r in reversed(lines)}.values())[::-1]  # first of equal texts

    # ----------------------------------------------------------------- captions
    def compose(self, rec: dict, rgb: np.ndarray) -> None:
        rec["texts"] = [t for t in rec["texts"] if (t.get("source") or {}).get("annotator") != self.name]
        rec["groundings"] = [g for g in rec["groundings"] if (g.get("source") or {}).get("annotator") != self.name]
        all_groups = self._groups(rec, rgb)
        groups = all_groups[: self.params.max_groups]
        ocr = self._ocr(rec)
        if self.params.briefs:
            for g in all_groups:
                for r in g.regions:
                    if not r.get("brief"):
                        r["brief"] = f"{g.color} {g.label}" if g.color else g.label
        if not groups and not ocr:
            return  # nothing found: no caption (see the module docstring)
        w, h = rec["width"], rec["height"]
        captions = {
            "brief": self._brief(rec["image_id"], groups, ocr),
            "detailed": self._detailed(rec["image_id"], groups, ocr, w, h),
            "more_detailed": self._more_detailed(rec["image_id"], groups, ocr, w, h),
        }
        source = self.source(MODEL, MODEL)
        n = 0
        for k, (tier, writer) in enumerate(captions.items()):
            text_id = make_ann_id(rec["image_id"], self.name, "text", k, tier)
            rec["texts"].append(new_annotation(source, None, ann_id=text_id, tier=tier, text=writer.text))
            for start, end, regions in writer.spans:
                for region in regions:
                    rec["groundings"].append(new_annotation(
                        source, region.get("score"),
                        ann_id=make_ann_id(rec["image_id"], self.name, "grounding", n, text_id, start),
                        text_ann_id=text_id, phrase=writer.text[start:end], char_start=start, char_end=end,
                        box=list(region["box"]), mask=region.get("mask")))
                    n += 1

    def _brief(self, image_id: str, groups: list[Group], ocr) -> Writer:
        w = Writer()
        if not groups:
            text, region = ocr[0]
            return w.add("An image with the text \"").phrase(text, [region]).add("\".")
        v = _variant(image_id, "brief", 4)
        if v == 0:
            return w.add("A photo of ").listing(groups).add(".")
        if v == 1:
            return w.listing(groups, capital=True).add(" in a photo.")
        if v == 2:
            return w.add("The picture shows ").listing(groups).add(".")
        return w.add("An image with ").listing(groups).add(".")

    def _opening(self, w: Writer, image_id: str, tier: str, groups: list[Group]) -> None:
        v = _variant(image_id, tier, 3)
        if v == 0:
            w.add("The photo shows ").listing(groups).add(".")
        elif v == 1:
            w.add("This image contains ").listing(groups).add(".")
        else:
            w.add("In this picture we can see ").listing(groups).add(".")

    def _positions(self, w: Writer, image_id: str, tier: str, groups: list[Group], width: int, height: int) -> None:
        for i, g in enumerate(groups):
            places = list(dict.fromkeys(where(r["box"], width, height) for r in g.regions))
            place = places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]
            v = (_variant(image_id, tier, 3) + i) % 3
            w.sentence_break()
            if v == 0:
                w.phrase(g.phrase(definite=True, with_color=False), g.regions, capital=True)
                w.add(f" {'is' if g.n == 1 else 'are'} {place}.")
            elif v == 1:
                w.phrase(g.phrase(definite=True, with_color=False), g.regions, capital=True)
                w.add(f" can be seen {place}.")
            else:
                w.add(f"{place[:1].upper()}{place[1:]} {'is' if g.n == 1 else 'are'} ")
                w.phrase(g.phrase(definite=True, with_color=False), g.regions).add(".")

    def _relation(self, w: Writer, groups: list[Group]) -> None:
        singles = [g for g in groups if g.n == 1][:2]
        if len(singles) < 2:
            return
        a, b = singles
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.regions[0]["box"], b.regions[0]["box"]
        dx, dy = (ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2
        if abs(dx) >= abs(dy):
            first, second, rel = (a, b, "to the left of") if dx < 0 else (b, a, "to the left of")
        else:
            first, second, rel = (a, b, "above") if dy < 0 else (b, a, "above")
        w.sentence_break().phrase(first.phrase(definite=True, with_color=False), first.regions, capital=True)
        w.add(f" is {rel} ").phrase(second.phrase(definite=True, with_color=False), second.regions).add(".")

    def _quote(self, w: Writer, image_id: str, tier: str, text: str, region: dict, width: int, height: int) -> None:
        v = _variant(image_id, tier + text, 2)
        w.sentence_break()
        if v == 0:
            w.add("The text \"").phrase(text, [region]).add(f"\" is written {where(region['box'], width, height)}.")
        else:
            w.add(f"{where(region['box'], width, height).capitalize()} the words \"").phrase(text, [region])
            w.add("\" appear.")

    def _detailed(self, image_id, groups, ocr, width, height, tier: str = "detailed") -> Writer:
        w = Writer()
        if groups:
            self._opening(w, image_id, tier, groups)
            self._positions(w, image_id, tier, groups, width, height)
            self._relation(w, groups)
        for text, region in ocr[: 1 if tier == "detailed" else self.params.max_ocr_lines]:
            self._quote(w, image_id, tier, text, region, width, height)
        return w

    def _more_detailed(self, image_id, groups, ocr, width, height) -> Writer:
        w = self._detailed(image_id, groups, ocr[:0], width, height, tier="more_detailed")
        area = float(width * height)
        for g in groups:
            frac = min(1.0, sum(g.areas) / area)
            w.sentence_break().phrase(g.phrase(definite=True, with_color=False), g.regions, capital=True)
            w.add(f" {'covers' if g.n == 1 else 'cover'} {share_words(frac)} of the frame")
            if g.color:
                w.add(f" and {'is' if g.n == 1 else 'are'} mostly {g.color}")
            w.add(".")
        for text, region in ocr[: self.params.max_ocr_lines]:
            self._quote(w, image_id, "more_detailed", text, region, width, height)
        return w


__all__ = ["ComposeCaptioner", "ComposeCaptionParams", "plural", "clean_ocr", "where"]
