"""GrabCut: a real, CPU-only, box-prompted segmenter (OpenCV), the offline stand-in for SAM.

`masks` with `model: grabcut` (or a models: alias that resolves to `grabcut`) runs this instead of
SAM. Per prompt box: a context crop around the box (the box plus `margin` of its size on each side,
inside the image) is scaled so its longer side is at most `max_side`, GrabCut is initialised with
everything outside the box as sure background and the box as probable foreground, runs `iterations`
rounds of its colour-model / graph-cut loop, and the foreground is scaled back and CLIPPED TO THE BOX:
a mask never extends outside its prompt box. When the box leaves almost no background around it (a
box that fills the image), a thin ring just inside the box is the probable background that GrabCut's
background colour model learns from.

Deterministic: cv2.setRNGSeed before every call (GrabCut seeds its colour models with k-means).

Quality (to `checks`, under the stage name):
- `fg_fraction`: mask pixels / box pixels (0 = GrabCut found nothing, 1 = the whole box);
- `edge_agreement`: fraction of the mask's outline (inside the box, not on its border) lying on an
  image edge (Canny, 1 px tolerance): a mask that follows real contours scores high, one cut
  through flat colour scores low;
- `box_mask_iou`: the box vs the mask's tight box (what SAM's masks also record; the filters read it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

GRABCUT = "grabcut"  # the model reference of the masks stage that selects this segmenter
MIN_BACKGROUND_PIXELS = 64  # fewer sure-background pixels than this: use a ring inside the box


@dataclass(frozen=True)
class GrabCutSettings:
    iterations: int = 3
    max_side: int = 192  # pixels: the context crop is scaled down to this for speed
    margin: float = 0.15  # context around the box, as a fraction of its width / height
    seed: int = 0


@dataclass
class Segment:
    mask: np.ndarray  # H x W bool of the whole image, False outside the prompt box
    fg_fraction: float
    edge_agreement: float


def box_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel columns / rows [x0, x1) x [y0, y1) a box covers (pixel j spans [j, j+1))."""
    x0, y0, x1, y1 = box
    return (max(0, int(math.floor(x0))), max(0, int(math.floor(y0))),
            min(width, int(math.ceil(x1))), min(height, int(math.ceil(y1))))


def _edge_agreement(gray: np.ndarray, fg: np.ndarray, inner: np.ndarray) -> float:
    """Share of the mask's outline pixels (inside `inner`, the box less its 1-px border) on a Canny edge."""
    import cv2

    edges = cv2.dilate(cv2.Canny(gray, 50, 150), np.ones((3, 3), np.uint8)) > 0
    fg8 = fg.astype(np.uint8)
    outline = (fg8 - cv2.erode(fg8, np.ones((3, 3), np.uint8))).astype(bool) & inner
    n = int(outline.sum())
    return float(edges[outline].sum() / n) if n else 0.0


def segment_box(rgb: np.ndarray, box: Sequence[float], settings: GrabCutSettings = GrabCutSettings()) -> Segment:
    """GrabCut of one prompt box on an H x W x 3 uint8 RGB image."""
    import cv2

    h, w = rgb.shape[:2]
    bx0, by0, bx1, by1 = box_pixels(box, w, h)
    full = np.zeros((h, w), dtype=bool)
    if bx1 - bx0 < 2 or by1 - by0 < 2:
        return Segment(full, 0.0, 0.0)
    mx, my = settings.margin * (bx1 - bx0), settings.margin * (by1 - by0)
    cx0, cy0 = max(0, int(bx0 - mx)), max(0, int(by0 - my))
    cx1, cy1 = min(w, int(math.ceil(bx1 + mx))), min(h, int(math.ceil(by1 + my)))
    crop = rgb[cy0:cy1, cx0:cx1]
    scale = min(1.0, settings.max_side / max(crop.shape[:2]))
    sw, sh = max(2, round(crop.shape[1] * scale)), max(2, round(crop.shape[0] * scale))
    small = cv2.resize(crop, (sw, sh), interpolation=cv2.INTER_AREA) if scale < 1 else crop.copy()
    # the box in the scaled crop
    rx0, ry0 = int((bx0 - cx0) * scale), int((by0 - cy0) * scale)
    rx1, ry1 = max(rx0 + 2, min(sw, round((bx1 - cx0) * scale))), max(ry0 + 2, min(sh, round((by1 - cy0) * scale)))
    init = np.full((sh, sw), cv2.GC_BGD, np.uint8)
    init[ry0:ry1, rx0:rx1] = cv2.GC_PR_FGD
    if int((init == cv2.GC_BGD).sum()) < MIN_BACKGROUND_PIXELS:
        ring = max(1, round(0.05 * min(rx1 - rx0, ry1 - ry0)))
        init[ry0:ry1, rx0:rx1] = cv2.GC_BGD  # sure background: GrabCut must not take it back
        init[ry0 + ring:ry1 - ring, rx0 + ring:rx1 - ring] = cv2.GC_PR_FGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(small[:, :, ::-1])
    cv2.setRNGSeed(settings.seed)
    try:
        cv2.grabCut(bgr, init, None, bgd, fgd, settings.iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # a colour model with no samples (a flat crop): nothing to separate
        return Segment(full, 0.0, 0.0)
    fg_small = (init == cv2.GC_FGD) | (init == cv2.GC_PR_FGD)
    inner = np.zeros_like(fg_small)
    inner[ry0 + 1:ry1 - 1, rx0 + 1:rx1 - 1] = True
    fg_small &= np.pad(np.ones((ry1 - ry0, rx1 - rx0), bool), ((ry0, sh - ry1), (rx0, sw - rx1)))
    edge = _edge_agreement(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), fg_small, inner)
    fg_crop = cv2.resize(fg_small.astype(np.uint8), (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    full[cy0:cy1, cx0:cx1] = fg_crop
    clip = np.zeros_like(full)
    clip[by0:by1, bx0:bx1] = True
    full &= clip  # never outside the prompt box
    area = (bx1 - bx0) * (by1 - by0)
    return Segment(full, float(full.sum() / area), edge)


__all__ = ["GRABCUT", "GrabCutSettings", "Segment", "segment_box", "box_pixels"]
