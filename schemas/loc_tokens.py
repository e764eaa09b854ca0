"""Florence-2 location tokens: pixels <-> `<loc_k>` and generated sequences -> geometry.

Quantization is the one of the original and the native transformers code (FLORENCE2.md §2):
`k = clamp(floor(x * 1000 / W), 0, 999)`, dequantized at the bin centre `(k + 0.5) * W / 1000`
(y with H). The parsers follow `Florence2PostProcessor` (transformers/models/florence2/
processing_florence2.py) rule for rule (same regular expressions, ASCII-only phrases, groups
of 4 / 8 / 2 location tokens), so a sequence means the same thing to us and to transformers;
the only difference is that we keep float coordinates where transformers casts them to int.
This module imports nothing but the standard library (schemas imports nothing of ours).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

BINS = 1000
SEP = "<sep>"
POLY_START = "<poly>"
POLY_END = "</poly>"
LOC_PATTERN = re.compile(r"<loc_(\d+)>")
_STRIP_SPECIAL = ("<s>", "</s>", "<pad>")

# Regular expressions of Florence2PostProcessor, verbatim.
_PHRASE_WITH_BOXES = re.compile(r"([^<]+(?:<loc_\d+>){4,})")
_BOXES_ONLY = re.compile(r"(?:(?:<loc_\d+>){4,})")
_PHRASE_TEXT = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)")
_BOX = re.compile(r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>")
_OCR = re.compile(r"(.+?)" + r"<loc_(\d+)>" * 8)
_POLY_ANY = rf"(?:<loc_\d+>|{re.escape(SEP)}|{re.escape(POLY_START)}|{re.escape(POLY_END)}){{4,}}"
_PHRASE_WITH_POLYS = re.compile(rf"([^<]+{_POLY_ANY})")
_POLYS_ONLY = re.compile(_POLY_ANY)
_POLY_PHRASE_TEXT = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_|<poly>)")
_POLY_INSTANCE = re.compile(rf"{re.escape(POLY_START)}(.*?){re.escape(POLY_END)}")
_POLY_RING = re.compile(rf"((?:<loc_\d+>)+)(?:{re.escape(SEP)}|$)")


# ------------------------------------------------------------------ quantization
def quantize(value: float, size: float) -> int:
    """Pixel coordinate -> bin in [0, 999] (floor, clamp)."""
    if not size or size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    if value is None or not math.isfinite(value):
        raise ValueError(f"coordinate must be a finite number, got {value!r}")
    return int(min(max(math.floor(value / (size / BINS)), 0), BINS - 1))


def dequantize(k: int, size: float) -> float:
    """Bin -> pixel coordinate at the bin centre (same operation order as transformers)."""
    return (k + 0.5) * (size / BINS)


def quantize_points(coords: Sequence[float], width: float, height: float) -> list[int]:
    """Flat [x, y, x, y, ...] (a box, a quad or a polygon ring) -> bins."""
    if len(coords) % 2:
        raise ValueError(f"coordinates must come in x, y pairs, got {len(coords)} numbers")
    return [quantize(v, width if i % 2 == 0 else height) for i, v in enumerate(coords)]


def dequantize_points(bins: Sequence[int], width: float, height: float) -> list[float]:
    return [dequantize(k, width if i % 2 == 0 else height) for i, k in enumerate(bins)]


# ---------------------------------------------------------------------- encoding
def loc_token(k: int) -> str:
    if not 0 <= int(k) < BINS:
        raise ValueError(f"location bin {k} outside [0, {BINS})")
    return f"<loc_{int(k)}>"


def all_loc_tokens() -> list[str]:
    """Every location token, in id order (what a tokenizer adds)."""
    return [f"<loc_{k}>" for k in range(BINS)]


def points_to_tokens(coords: Sequence[float], width: float, height: float) -> str:
    return "".join(loc_token(k) for k in quantize_points(coords, width, height))


def box_to_tokens(box: Sequence[float], width: float, height: float) -> str:
    """[x0, y0, x1, y1] -> 4 location tokens."""
    if len(box) != 4:
        raise ValueError(f"a box has 4 numbers, got {len(box)}")
    return points_to_tokens(box, width, height)


def quad_to_tokens(quad: Sequence[float], width: float, height: float) -> str:
    """8 numbers, clockwise from top-left -> 8 location tokens (<OCR_WITH_REGION>)."""
    if len(quad) != 8:
        raise ValueError(f"a quad has 8 numbers, got {len(quad)}")
    return points_to_tokens(quad, width, height)


def polygon_to_tokens(polygon: Sequence[Sequence[float]], width: float, height: float, wrap: bool = False) -> str:
    """Rings of one instance joined by <sep>; `wrap` puts them in <poly>...</poly> (several instances)."""
    rings = [r for r in polygon if len(r) >= 6]
    if not rings:
        raise ValueError("a polygon needs at least one ring of 3 points")
    body = SEP.join(points_to_tokens(r, width, height) for r in rings)
    return f"{POLY_START}{body}{POLY_END}" if wrap else body


def clean_phrase(text: str) -> str:
    """Text that can precede location tokens without changing the parse: no '<', '>', newlines."""
    return " ".join(text.replace("<", " ").replace(">", " ").split())


# ----------------------------------------------------------------------- parsing
@dataclass
class Instance:
    """One parsed object: a phrase and its geometry, in float pixels."""

    label: str
    boxes: list[list[float]] = field(default_factory=list)
    quad: list[float] | None = None
    polygons: list[list[float]] = field(default_factory=list)  # rings [x, y, ...]


def _strip_special(text: str) -> str:
    for tok in _STRIP_SPECIAL:
        text = text.replace(tok, "")
    return text


def _ascii(text: str) -> str:
    return text.encode("ascii", "ignore").decode("ascii")


def _boxes(phrase_text: str, width: float, height: float) -> list[list[float]]:
    return [dequantize_points([int(m.group(j)) for j in range(1, 5)], width, height) for m in _BOX.finditer(phrase_text)]


def parse_boxes(text: str, width: float, height: float, allow_empty_phrase: bool = False) -> list[Instance]:
    """<OD>, <DENSE_REGION_CAPTION> (phrase + boxes), <REGION_PROPOSAL> (allow_empty_phrase).

    One Instance per box, as transformers' description_with_bboxes / bboxes parse.
    """
    text = _strip_special(text)
    pattern = _BOXES_ONLY if allow_empty_phrase else _PHRASE_WITH_BOXES
    out = []
    for phrase_text in pattern.findall(text):
        phrase_text = phrase_text.replace("<ground>", "", 1).replace("<obj>", "", 1)
        if not phrase_text and not allow_empty_phrase:
            continue
        match = _PHRASE_TEXT.search(phrase_text)
        if not match:
            continue
        phrase = _ascii(match.group().strip())
        for box in _boxes(phrase_text, width, height):
            out.append(Instance(phrase, boxes=[box]))
    return out


def parse_grounding(text: str, width: float, height: float, banned: Sequence[str] = ()) -> list[Instance]:
    """<CAPTION_TO_PHRASE_GROUNDING>: one Instance per phrase with all its boxes."""
    text = _strip_special(text)
    out = []
    for phrase_text in _PHRASE_WITH_BOXES.findall(text):
        phrase_text = phrase_text.replace("<ground>", "", 1).replace("<obj>", "", 1)
        match = _PHRASE_TEXT.search(phrase_text)
        if not phrase_text or not match:
            continue
        phrase = match.group().strip()
        if phrase in banned:
            continue
        boxes = _boxes(phrase_text, width, height)
        if boxes:
            out.append(Instance(_ascii(phrase), boxes=boxes))
    return out


def parse_ocr(text: str, width: float, height: float, area_threshold: float = 0.0) -> list[Instance]:
    """<OCR_WITH_REGION>: text + 8 location tokens per line."""
    text = _strip_special(text)
    out = []
    for content, *quad_str in _OCR.findall(text):
        quad = dequantize_points([int(v) for v in quad_str], width, height)
        if area_threshold > 0:
            xs, ys = quad[0::2], quad[1::2]
            area = 0.5 * abs(sum(xs[i] * ys[i + 1] - xs[i + 1] * ys[i] for i in range(3)))
            if area < width * height * area_threshold:
                continue
        out.append(Instance(content.strip(), quad=quad))
    return out


def parse_polygons(text: str, width: float, height: float, allow_empty_phrase: bool = True) -> list[Instance]:
    """<REFERRING_EXPRESSION_SEGMENTATION>, <REGION_TO_SEGMENTATION> (allow_empty_phrase=True):
    rings separated by <sep>, instances wrapped in <poly>...</poly>."""
    text = _strip_special(text)
    pattern = _POLYS_ONLY if allow_empty_phrase else _PHRASE_WITH_POLYS
    out = []
    for phrase_text in pattern.findall(text):
        stripped = re.sub(r"^<loc_\d+>", "", phrase_text, count=1)
        if not stripped and not allow_empty_phrase:
            continue
        match = _POLY_PHRASE_TEXT.search(stripped)
        if not match:
            continue
        phrase = match.group().strip()
        if POLY_START in phrase_text and POLY_END in phrase_text:
            chunks = [m.group(1) for m in _POLY_INSTANCE.finditer(phrase_text)]
        else:
            chunks = [phrase_text]
        for chunk in chunks:
            rings = []
            for ring_match in _POLY_RING.finditer(chunk):
                bins = [int(v) for v in LOC_PATTERN.findall(ring_match.group(1))]
                if len(bins) % 2:
                    bins = bins[:-1]
                rings.append(dequantize_points(bins, width, height))
            if rings:
                out.append(Instance(phrase, polygons=rings))
    return out


def parse_text(text: str) -> str:
    """Pure-text tasks (captions, <OCR>, region-to-text)."""
    return _strip_special(text).strip()
