"""Geometry helpers in original-image pixels; masks are COCO RLE through pycocotools."""
from __future__ import annotations

from typing import Sequence

import numpy as np

Box = list[float]


def clamp_box(box: Sequence[float], width: int, height: int) -> Box:
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
    y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
    return [x0, y0, x1, y1]


def box_area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def quad_to_box(quad: Sequence[float]) -> Box:
    xs, ys = quad[0::2], quad[1::2]
    return [float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))]


def box_to_quad(box: Sequence[float]) -> list[float]:
    """Clockwise from top-left, as Florence-2's <OCR_WITH_REGION> orders quads."""
    x0, y0, x1, y1 = box
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def polygon_to_box(polygon: Sequence[Sequence[float]]) -> Box:
    xs = [v for ring in polygon for v in ring[0::2]]
    ys = [v for ring in polygon for v in ring[1::2]]
    return [float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))]


def mask_to_rle(mask: np.ndarray) -> dict:
    """Binary HxW mask -> {'size': [h, w], 'counts': str} (compressed COCO RLE)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _coco_rle(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def rle_to_mask(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(_coco_rle(rle)).astype(bool)


def rle_area(rle: dict) -> float:
    from pycocotools import mask as mask_utils

    return float(mask_utils.area(_coco_rle(rle)))


def rle_to_box(rle: dict) -> Box:
    """Tight [x0, y0, x1, y1] of a mask (pycocotools gives x, y, w, h)."""
    from pycocotools import mask as mask_utils

    x, y, w, h = (float(v) for v in mask_utils.toBbox(_coco_rle(rle)))
    return [x, y, x + w, y + h]


def polygon_to_rle(polygon: Sequence[Sequence[float]], width: int, height: int) -> dict:
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects([list(map(float, ring)) for ring in polygon], height, width)
    rle = mask_utils.merge(rles)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def mask_to_polygon(mask: np.ndarray, tolerance: float = 1.0, min_points: int = 3) -> list[list[float]]:
    """Outer contours of a binary mask as rings [x, y, ...], for Florence-2 polygon targets."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    rings = []
    for c in contours:
        if tolerance > 0:
            c = cv2.approxPolyDP(c, tolerance, True)
        pts = c.reshape(-1, 2).astype(float)
        if len(pts) >= min_points:
            rings.append(pts.flatten().tolist())
    return rings


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = box_area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def box_iou_matrix(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of every pair through pycocotools (boxes converted to x, y, w, h)."""
    from pycocotools import mask as mask_utils

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    xywh = lambda bs: [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in bs]  # noqa: E731
    return np.asarray(mask_utils.iou(xywh(a), xywh(b), [0] * len(b)), dtype=float).reshape(len(a), len(b))
