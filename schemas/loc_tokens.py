"""Florence-2 location tokens: geometry in pixels -> `<loc_k>` sequences (training targets, prompts).

Quantization is the one of the original and the native transformers code (docs/florence2.md §2):
`k = clamp(floor(x * 1000 / W), 0, 999)` (y with H). Only the encoder lives here: sequences are
read back by transformers' own `Florence2Processor.post_process_generation` (the stages parse
generations with it, and the tests check every encoder against it), never by a copy of it.
This module imports nothing but the standard library (schemas imports nothing of ours).
"""
from __future__ import annotations

import math
from typing import Sequence

BINS = 1000
SEP = "<sep>"
POLY_START = "<poly>"
POLY_END = "</poly>"


# ------------------------------------------------------------------ quantization
def quantize(value: float, size: float) -> int:
    """Pixel coordinate -> bin in [0, 999] (floor, clamp)."""
    if not size or size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    if value is None or not math.isfinite(value):
        raise ValueError(f"coordinate must be a finite number, got {value!r}")
    return int(min(max(math.floor(value / (size / BINS)), 0), BINS - 1))


def quantize_points(coords: Sequence[float], width: float, height: float) -> list[int]:
    """Flat [x, y, x, y, ...] (a box, a quad or a polygon ring) -> bins."""
    if len(coords) % 2:
        raise ValueError(f"coordinates must come in x, y pairs, got {len(coords)} numbers")
    return [quantize(v, width if i % 2 == 0 else height) for i, v in enumerate(coords)]


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
