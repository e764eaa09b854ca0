"""Box-mask agreement: how well an annotation's box matches the tight box of its mask.

A box-prompted SAM mask fills its prompt box, so the mask's tight box overlaps it by ~0.8-0.95;
a much lower IoU means SAM segmented something else (a part, the background) and the pair
would teach the model a wrong shape. Used by the grounding and region filters.
"""
from __future__ import annotations

from schemas.geometry import box_iou, rle_area, rle_to_box


def mask_box_iou(box: list[float] | None, mask: dict | None) -> float | None:
    """IoU of box with the mask's tight box (0 for an empty mask); None when there is no mask."""
    if box is None or not mask or mask.get("counts") is None:
        return None
    if rle_area(mask) <= 0:
        return 0.0
    return box_iou(box, rle_to_box(mask))
