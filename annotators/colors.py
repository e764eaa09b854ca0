"""Named colours measured on pixels: what the compositional captioner may say about a region's colour.

Each pixel gets one of eleven basic colour names (Berlin & Kay's basic terms) from its HSV value:
low saturation -> black / gray / white by brightness; otherwise the hue decides (red, orange, yellow,
green, blue, purple, pink), with dark oranges named brown. A region's dominant colour is the most
frequent name among its mask's pixels (its box's when it has no mask), and only when that name covers
at least `min_share` of them: a patchwork of colours gets no colour word rather than a wrong one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NAMES = ("black", "gray", "white", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
MIN_SHARE = 0.45  # the dominant name must cover this share of the pixels to be said
MAX_PIXELS = 20000  # pixels sampled per region (regular stride): the share does not need more


@dataclass(frozen=True)
class Dominant:
    name: str
    share: float


def name_pixels(rgb: np.ndarray) -> np.ndarray:
    """N x 3 uint8 RGB -> N indices into NAMES."""
    import cv2

    hsv = cv2.cvtColor(rgb.reshape(-1, 1, 3).astype(np.uint8), cv2.COLOR_RGB2HSV_FULL).reshape(-1, 3).astype(np.int32)
    h, s, v = hsv[:, 0] * 360 // 256, hsv[:, 1], hsv[:, 2]
    out = np.empty(len(hsv), dtype=np.int8)
    grey = (s < 50) | (v < 45)
    out[grey & (v < 60)] = NAMES.index("black")
    out[grey & (v >= 60) & (v < 190)] = NAMES.index("gray")
    out[grey & (v >= 190)] = NAMES.index("white")
    c = ~grey
    bins = [(15, "red"), (40, "orange"), (70, "yellow"), (165, "green"), (255, "blue"), (290, "purple"),
            (335, "pink"), (361, "red")]
    lo = 0
    for hi, name in bins:
        sel = c & (h >= lo) & (h < hi)
        out[sel] = NAMES.index(name)
        lo = hi
    out[c & (h >= 15) & (h < 40) & (v < 150)] = NAMES.index("brown")  # dark orange
    return out


def dominant_color(rgb: np.ndarray, mask: np.ndarray | None = None, box=None,
                   min_share: float = MIN_SHARE) -> Dominant | None:
    """Dominant named colour of the pixels under `mask` (H x W bool), else inside `box`; None when
    there are no pixels or no name covers min_share of them."""
    if mask is not None and mask.any():
        pixels = rgb[mask]
    elif box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        pixels = rgb[max(0, y0):max(0, y1), max(0, x0):max(0, x1)].reshape(-1, 3)
    else:
        return None
    if len(pixels) == 0:
        return None
    if len(pixels) > MAX_PIXELS:
        pixels = pixels[:: len(pixels) // MAX_PIXELS + 1]
    counts = np.bincount(name_pixels(pixels), minlength=len(NAMES))
    best = int(counts.argmax())
    share = float(counts[best] / counts.sum())
    return Dominant(NAMES[best], share) if share >= min_share else None


__all__ = ["NAMES", "Dominant", "dominant_color", "name_pixels"]
