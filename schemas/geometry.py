"""Geometry helpers in original-image pixels; masks are COCO RLE through pycocotools."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Box = list[float]


def clamp_points(points: Sequence[float], width: float, height: float) -> list[float]:
    """Flat [x, y, x, y, ...] (a box, a quad, a polygon ring) with every x in [0, width] and every y in
    [0, height]; the order of the points is kept (a quad stays clockwise, an inverted box inverted)."""
    return [min(max(float(v), 0.0), float(width if i % 2 == 0 else height)) for i, v in enumerate(points)]


def clamp_box(box: Sequence[float], width: int, height: int) -> Box:
    """The box clamped into the image, its corners ordered (x0 <= x1, y0 <= y1)."""
    x0, y0, x1, y1 = clamp_points(box, width, height)
    return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


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


# Polygons are rasterised by pycocotools, whose memory grows with the perimeter and whose C code
# casts coordinates to int: bound both before calling it (hostile or broken annotations).
MAX_POLYGON_PERIMETER = 1_000_000  # pixels (sum of edge lengths in the L-infinity norm)


def check_polygon(polygon: Sequence[Sequence[float]], width: int, height: int) -> list[list[float]]:
    """Rings as float lists, or ValueError saying what is wrong.

    Rings with fewer than 3 points carry no area (COCO has a few) and are left out; every
    coordinate must be a finite number within one image size of the image.
    """
    if not isinstance(polygon, (list, tuple)):
        raise ValueError(f"polygon must be a list of rings [x, y, ...], got {type(polygon).__name__}")
    rings: list[list[float]] = []
    perimeter = 0.0
    for k, ring in enumerate(polygon):
        if not isinstance(ring, (list, tuple)):
            raise ValueError(f"polygon ring {k} must be a list of numbers, got {type(ring).__name__}")
        values = finite_numbers(ring, f"polygon ring {k}")
        if len(values) % 2:
            raise ValueError(f"polygon ring {k} has an odd number of coordinates ({len(values)})")
        if len(values) < 6:
            continue
        xy = np.asarray(values).reshape(-1, 2)
        outside = (xy[:, 0] < -width) | (xy[:, 0] > 2 * width) | (xy[:, 1] < -height) | (xy[:, 1] > 2 * height)
        if outside.any():
            x, y = xy[int(np.argmax(outside))]
            raise ValueError(f"polygon ring {k} has the point ({x:g}, {y:g}), more than one image size outside "
                             f"the {width}x{height} image")
        perimeter += float(np.abs(np.diff(xy, axis=0, append=xy[:1])).max(axis=1).sum())
        rings.append(values)
    if not rings:
        raise ValueError("polygon has no ring with at least 3 points")
    if perimeter > MAX_POLYGON_PERIMETER:
        raise ValueError(f"polygon perimeter {perimeter:.0f} px is over the limit of {MAX_POLYGON_PERIMETER}")
    return rings


def finite_numbers(values: Sequence, what: str, length: int | None = None) -> list[float]:
    """Floats of a JSON list of numbers, or ValueError naming `what` (strings, booleans, null,
    NaN and infinities are refused: each would become a box or mask nobody drew)."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{what} must be a list of numbers, got {values!r:.80}")
    if length is not None and len(values) != length:
        raise ValueError(f"{what} must have {length} numbers, got {len(values)}: {values!r:.80}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        raise ValueError(f"{what} has a non-numeric value {bad[0]!r:.40}")
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} has a non-finite value (NaN or infinity): {values!r:.80}")
    return out


def check_rle(rle: dict, width: int | None, height: int | None) -> dict:
    """{'size': [h, w], 'counts': str} of a compressed RLE that decodes to exactly height x width
    pixels (the RLE's own size when they are None), or ValueError. Uncompressed counts (COCO
    iscrowd) are compressed; pycocotools itself refuses counts that do not add up on decode."""
    from pycocotools import mask as mask_utils

    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("mask must be an RLE {'size': [h, w], 'counts': ...}")
    size = finite_numbers(rle["size"], "mask size [height, width]", length=2)
    if size != [int(v) for v in size] or min(size) < 1:
        raise ValueError(f"mask size must be [height, width] positive integers, got {rle['size']!r:.80}")
    if width is None or height is None:
        height, width = (int(v) for v in size)
    elif size != [height, width]:
        raise ValueError(f"mask size {[int(v) for v in size]} differs from the image's [{height}, {width}] (height, width)")
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed (COCO iscrowd): runs must add up to the image
        runs = finite_numbers(counts, "mask counts")
        if any(v < 0 or v != int(v) for v in runs) or sum(runs) != height * width:
            raise ValueError(f"uncompressed mask counts must be non-negative integers adding up to {height * width}")
        counts = mask_utils.frPyObjects({"size": [height, width], "counts": [int(v) for v in runs]}, height, width)["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", "replace")
    if not isinstance(counts, str) or not counts.isascii():
        raise ValueError("mask counts must be a compressed RLE string (ASCII) or a list of run lengths")
    runs = _rle_runs(counts)
    if min(runs, default=0) < 0 or sum(runs) != height * width:
        raise ValueError(f"mask counts do not describe a {height}x{width} mask (runs add up to {sum(runs)})")
    return {"size": [height, width], "counts": counts}


def _rle_runs(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string, read the way pycocotools' rleFrString reads
    them, without allocating the mask (a hostile size would allocate gigabytes)."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("mask counts end inside a number")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"mask counts hold {counts[p]!r}, not a COCO RLE character")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def polygon_to_rle(polygon: Sequence[Sequence[float]], width: int, height: int) -> dict:
    from pycocotools import mask as mask_utils

    rings = check_polygon(polygon, width, height)
    rle = mask_utils.merge(mask_utils.frPyObjects(rings, height, width))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def polygon_area(polygon: Sequence[Sequence[float]], width: int, height: int) -> float:
    """Pixels inside the polygon as pycocotools rasterises it (what COCO's `area` means)."""
    return rle_area(polygon_to_rle(polygon, width, height))


# ------------------------------------------------------------------ mask -> polygon
# Direction codes of unit edges on the pixel-corner lattice: east, south, west, north (y down).
_STEP = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])


def _pixel_edge_rings(mask: np.ndarray) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Per 8-connected component: (outer ring, hole rings) as integer corner points (x, y).

    Pixel (x, y) covers [x, x+1] x [y, y+1]. Every edge between a mask pixel and a non-mask
    pixel is a unit edge directed with the mask on its right; at a corner where two pixels touch
    diagonally the walk turns left, which joins them (8-connectivity, as cv2.findContours counts
    foreground). Outer rings come out with positive shoelace area, holes with negative.
    """
    import cv2

    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1]
    starts, dirs, pixels = [], [], []
    # (neighbour outside, start corner offset, direction) for the top, right, bottom, left sides
    for outside, (ox, oy), d in (
        (~m[:-2, 1:-1], (0, 0), 0),
        (~m[1:-1, 2:], (1, 0), 1),
        (~m[2:, 1:-1], (1, 1), 2),
        (~m[1:-1, :-2], (0, 1), 3),
    ):
        ys, xs = np.nonzero(inner & outside)
        starts.append(np.stack([xs + ox, ys + oy], axis=1))
        dirs.append(np.full(len(xs), d))
        pixels.append(np.stack([ys, xs], axis=1))
    start = np.concatenate(starts)
    direction = np.concatenate(dirs)
    pixel = np.concatenate(pixels)
    n = len(start)
    if n == 0:
        return []
    width1 = mask.shape[1] + 1
    end = start + _STEP[direction]
    start_key = start[:, 1] * width1 + start[:, 0]
    end_key = end[:, 1] * width1 + end[:, 0]
    # A corner has one or two outgoing edges; the successor of an edge is the one leaving its end
    # corner, the left turn where there are two.
    order = np.argsort(start_key, kind="stable")
    sorted_keys = start_key[order]
    first = np.searchsorted(sorted_keys, end_key, side="left")
    count = np.searchsorted(sorted_keys, end_key, side="right") - first
    a = order[first]
    b = order[np.minimum(first + 1, n - 1)]
    left_turn = (direction - 1) % 4
    succ = np.where((count == 2) & (direction[a] != left_turn), b, a)

    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    succ_list = succ.tolist()
    seen = np.zeros(n, dtype=bool)
    outers: dict[int, np.ndarray] = {}
    holes: dict[int, list[np.ndarray]] = {}
    for i in range(n):
        if seen[i]:
            continue
        cycle = [i]
        j = succ_list[i]
        while j != i:
            cycle.append(j)
            j = succ_list[j]
        idx = np.asarray(cycle)
        seen[idx] = True
        turns = direction[idx] != np.roll(direction[idx], 1)  # keep corners, drop straight-through points
        ring = start[idx[turns]]
        label = int(labels[pixel[i, 0], pixel[i, 1]])
        if _shoelace(ring) > 0:
            outers[label] = ring
        else:
            holes.setdefault(label, []).append(ring)
    return [(outers[k], holes.get(k, [])) for k in sorted(outers)]


def _shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0].astype(float), ring[:, 1].astype(float)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
    import cv2

    if tolerance <= 0:
        return ring
    return cv2.approxPolyDP(ring.astype(np.int32).reshape(-1, 1, 2), tolerance, True).reshape(-1, 2)


def _with_holes(outer: np.ndarray, holes: list[np.ndarray]) -> list[float]:
    """One ring: the outer ring, then each hole reached and left by the same zero-width cut from the
    outer ring's first point. COCO and Florence-2 polygons have no hole notation (a list of rings
    is a union); the cut is traversed both ways, so it covers no pixel and the hole stays empty."""
    points = [outer]
    for hole in holes:
        points += [outer[:1], hole, hole[:1]]
    return np.concatenate(points).astype(float).ravel().tolist()


def mask_to_polygon(mask: np.ndarray, tolerance: float = 1.0, min_points: int = 3,
                    min_iou: float = 0.95) -> list[list[float]]:
    """Rings [x, y, ...] along pixel EDGES of a binary mask, one per 8-connected part, holes cut in.

    With tolerance 0 pycocotools rasterises them back to exactly the mask. A tolerance > 0
    simplifies each ring (cv2.approxPolyDP) and is halved until the rasterised polygons have IoU
    >= min_iou with the mask, so thin and small shapes keep their pixels (1 px lines still get a
    polygon).
    """
    from pycocotools import mask as mask_utils

    parts = _pixel_edge_rings(np.asarray(mask))
    if not parts:
        return []
    height, width = mask.shape[:2]
    target = None
    tol = float(tolerance)
    while True:
        exact = tol < 0.25  # below a quarter pixel approxPolyDP keeps every corner anyway
        rings = []
        for outer, holes in parts:
            outer_s = outer if exact else _simplify(outer, tol)
            if len(outer_s) < min_points or (not exact and _shoelace(outer_s) <= 0):
                continue
            kept_holes = [h for h in ([_simplify(h, tol) for h in holes] if not exact else holes)
                          if len(h) >= 3 and _shoelace(h) < 0]
            rings.append(_with_holes(outer_s, kept_holes))
        if exact:
            return rings
        if rings:
            try:
                rle = polygon_to_rle(rings, width, height)
            except ValueError:  # perimeter over the rasteriser's limit: keep the exact rings
                rle = None
            if rle is not None:
                target = target or mask_to_rle(np.asarray(mask, dtype=bool))
                iou = float(mask_utils.iou([_coco_rle(rle)], [_coco_rle(target)], [0])[0][0])
                if iou >= min_iou:
                    return rings
        tol /= 2


def box_iou_matrix(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of every pair of [x0, y0, x1, y1] boxes, [len(a), len(b)] float64: THE box IoU of the project
    (torchvision.ops.box_iou). An inverted box counts as empty, and two empty boxes overlap 0 (not 0/0)."""
    import torch
    from torchvision.ops import box_iou as torchvision_box_iou

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))

    def tensor(boxes):
        t = torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
        return torch.cat([t[:, :2], torch.maximum(t[:, 2:], t[:, :2])], dim=1)  # inverted -> zero width / height

    return torch.nan_to_num(torchvision_box_iou(tensor(a), tensor(b)), nan=0.0).numpy()


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes (box_iou_matrix of one pair)."""
    return float(box_iou_matrix([a], [b])[0, 0])


def mask_box_iou(box: Sequence[float] | None, mask: dict | None) -> float | None:
    """IoU of a box with the tight box of its mask (0 for an empty mask; None when there is no mask).

    A box-prompted SAM mask fills its prompt box, so the mask's tight box overlaps it by ~0.8-0.95; a much
    lower IoU means the mask shows something else (a part, the background): the masks stage records it,
    the region and grounding filters threshold it.
    """
    if box is None or not mask or mask.get("counts") is None:
        return None
    if rle_area(mask) <= 0:
        return 0.0
    return box_iou(box, rle_to_box(mask))
