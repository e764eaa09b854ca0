"""GrabCut, the offline profile's real box-prompted segmenter (annotators/grabcut.py, masks model: grabcut)."""
from __future__ import annotations

import numpy as np
import pytest

from annotators.grabcut import GrabCutSettings, box_pixels, segment_box
from annotators.masks import SamMaskAnnotator
from engine.stage import IMAGE_BYTES_COLUMN, table_to_records
from schemas.geometry import rle_to_mask
from tests.test_masks import annotated


def disk_scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy gray-green background with a red disk: the disk is the truth."""
    rng = np.random.default_rng(seed)
    h, w = 240, 320
    img = np.clip(rng.normal([90, 120, 90], 12, (h, w, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    disk = (xx - 170) ** 2 + (yy - 110) ** 2 < 60 ** 2
    img[disk] = np.clip(rng.normal([200, 30, 30], 10, (int(disk.sum()), 3)), 0, 255).astype(np.uint8)
    return img, disk


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_grabcut_finds_the_object_inside_its_box_deterministically():
    img, disk = disk_scene()
    box = [95.5, 35.2, 245.7, 185.9]  # the disk (110..230 x 50..170) with loose margins
    seg = segment_box(img, box)
    assert iou(seg.mask, disk) > 0.85
    x0, y0, x1, y1 = box_pixels(box, img.shape[1], img.shape[0])
    outside = seg.mask.copy()
    outside[y0:y1, x0:x1] = False
    assert not outside.any()  # never outside its prompt box
    assert 0.4 < seg.fg_fraction < 0.8 and seg.edge_agreement > 0.8
    again = segment_box(img, box)
    assert (again.mask == seg.mask).all() and again.fg_fraction == seg.fg_fraction


def test_grabcut_box_filling_the_image_and_degenerate_box():
    img, disk = disk_scene(1)
    whole = segment_box(img, [0, 0, img.shape[1], img.shape[0]], GrabCutSettings(max_side=96))
    assert iou(whole.mask, disk) > 0.6  # a ring inside the box is the background model
    assert segment_box(img, [5, 5, 6, 6]).fg_fraction == 0.0  # a degenerate box: an empty mask


def test_masks_stage_grabcut_through_an_alias(photo_batch):
    stage = SamMaskAnnotator({"model": "sam", "targets": ["regions", "groundings"]}, models={"sam": "grabcut"})
    assert stage.model_params == {"model": "opencv"}
    stage.ensure_setup()
    assert not hasattr(stage, "model")  # no SAM was loaded
    rec = table_to_records(stage(annotated(photo_batch.slice(0, 2), [3, 1])))[0]
    assert rec["errors"] == []
    targets = rec["groundings"] + [r for r in rec["regions"] if r["kind"] == "object" and r["status"] == "kept"]
    for ann in targets:
        if "masks.fg_fraction" not in ann["checks"]:
            continue  # the imported human mask is left alone
        mask = rle_to_mask(ann["mask"]).astype(bool)
        x0, y0, x1, y1 = box_pixels(ann["box"], rec["width"], rec["height"])
        assert mask[y0:y1, x0:x1].sum() == mask.sum()
        assert 0 <= ann["checks"]["masks.fg_fraction"] <= 1 and 0 <= ann["checks"]["masks.edge_agreement"] <= 1
        assert "masks.pred_iou" not in ann["checks"]
    assert any(r["polygon"] for r in rec["regions"] if r["kind"] == "object" and r["status"] == "kept")


def test_preflight_resolves_grabcut():
    from engine.config import load_pipeline
    from engine.preflight import resolve

    pipeline = load_pipeline(None, "quickstart", "offline")
    masks = [m for m in resolve(pipeline) if m.stage == "masks"]
    assert masks and masks[0].ref == "grabcut" and masks[0].problem is None and masks[0].revision.startswith("opencv-")
