"""Stage `masks` with a tiny random SAM (real SamModel classes) on real photos."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from pycocotools import mask as mask_utils
from pydantic import ValidationError

from annotators.masks import SamMaskAnnotator
from engine.stage import IMAGE_BYTES_COLUMN, records_to_table, table_to_records
from helpers import count_forwards as run_counting
from schemas.geometry import box_iou, mask_to_rle, polygon_to_rle, rle_area, rle_to_mask
from schemas.records import make_ann_id, new_annotation, source_of
from schemas.validate import validate_table

HUMAN_MASK_BOX = [0.0, 0.0, 8.0, 8.0]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stage() -> SamMaskAnnotator:
    s = SamMaskAnnotator({"model": "sam_tiny"}, models={"sam_tiny": "random:tiny"})
    s.ensure_setup()
    return s


def boxes_for(width: int, height: int, n: int) -> list[list[float]]:
    """n distinct boxes spread over the image (different sizes and places)."""
    out = []
    for k in range(n):
        fx, fy = (k % 3) / 4, (k // 3 % 3) / 4
        out.append([fx * width, fy * height, min(width, (fx + 0.25 + 0.1 * (k % 2)) * width),
                    min(height, (fy + 0.3) * height)])
    return out


def annotated(table: pa.Table, counts: list[int]) -> pa.Table:
    """Per image: a caption, `counts[i]` groundings and object regions, one OCR text region,
    one dropped object region, and one object region carrying a human mask."""
    records = table_to_records(table.drop([IMAGE_BYTES_COLUMN]))
    src = source_of("test")
    for rec, n in zip(records, counts):
        w, h = rec["width"], rec["height"]
        text_id = make_ann_id(rec["image_id"], "test", "text", 0)
        rec["texts"] = [new_annotation(src, ann_id=text_id, tier="brief", text="A thing next to a thing.")]
        boxes = boxes_for(w, h, n)
        rec["groundings"] = [
            new_annotation(src, 0.9, ann_id=make_ann_id(rec["image_id"], "test", "g", k), text_ann_id=text_id,
                           phrase="A thing", char_start=0, char_end=7, box=b, mask=None)
            for k, b in enumerate(boxes)
        ]
        region = lambda k, box, kind="object", **kw: new_annotation(  # noqa: E731
            src, 0.8, ann_id=make_ann_id(rec["image_id"], "test", "r", k), kind=kind, box=box, quad=None,
            polygon=None, mask=kw.get("mask"), label="thing", brief=None)
        rec["regions"] = [region(k, b) for k, b in enumerate(boxes)]
        rec["regions"].append(region(100, [1.0, 1.0, w / 2, h / 4], kind="text"))
        dropped = region(101, [2.0, 2.0, w / 3, h / 3])
        dropped.update(status="dropped", reason="region_filter:low_score")
        rec["regions"].append(dropped)
        human = np.zeros((h, w), bool)
        human[:8, :8] = True
        rec["regions"].append(region(102, HUMAN_MASK_BOX, mask=mask_to_rle(human)))
    return records_to_table(records).append_column(IMAGE_BYTES_COLUMN, table.column(IMAGE_BYTES_COLUMN))


def test_masks_decode_to_image_size_one_call_per_image(stage, photo_batch):
    counts = [1, 3, 7, 2]
    out, calls = run_counting(stage, annotated(photo_batch, counts))
    assert calls == photo_batch.num_rows  # all boxes of an image in one call, whatever their number
    validate_table(out.drop([IMAGE_BYTES_COLUMN]), name="masks output")
    for rec, n in zip(table_to_records(out), counts):
        assert rec["errors"] == []
        h, w = rec["height"], rec["width"]
        targets = rec["groundings"] + [r for r in rec["regions"] if r["kind"] == "object" and r["status"] == "kept"]
        assert len(targets) == 2 * n + 1
        for ann in targets:
            rle = ann["mask"]
            assert rle is not None and rle["size"] == [h, w]
            decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert decoded.shape == (h, w) and decoded.dtype == np.uint8
            if ann["box"] == HUMAN_MASK_BOX:
                assert decoded[:8, :8].all() and decoded.sum() == 64  # the human mask is kept
                assert "masks.pred_iou" not in ann["checks"]
                continue
            assert 0.0 <= ann["checks"]["masks.box_mask_iou"] <= 1.0
            assert np.isfinite(ann["checks"]["masks.pred_iou"])
            x, y, bw, bh = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})
            expected = box_iou(ann["box"], [x, y, x + bw, y + bh]) if bw * bh > 0 else 0.0
            assert ann["checks"]["masks.box_mask_iou"] == pytest.approx(expected)
        for r in rec["regions"]:
            if r["kind"] == "text" or r["status"] == "dropped":
                assert r["mask"] is None and r["polygon"] is None and "masks.pred_iou" not in r["checks"]
            elif r["box"] != HUMAN_MASK_BOX and rle_area(r["mask"]) >= 16:
                assert r["polygon"], "an object region with a mask needs its polygon"
                # the polygon traces the mask's outer contours: it covers most of the mask
                filled = rle_to_mask(polygon_to_rle(r["polygon"], w, h))
                mask = rle_to_mask(r["mask"])
                assert (filled & mask).sum() / mask.sum() > 0.75
        assert all(g["mask"] is not None for g in rec["groundings"])
        assert all(g["polygon"] is None for g in rec["regions"] if g["kind"] == "text")
    with_polygons = [r for rec in table_to_records(out) for r in rec["regions"] if r["polygon"]]
    assert len(with_polygons) >= sum(counts) // 2  # most random masks are non-trivial


def test_targets_and_overwrite(photo_batch):
    only_regions = SamMaskAnnotator({"model": "random:tiny", "targets": ["regions"], "overwrite": True})
    only_regions.ensure_setup()
    table = annotated(photo_batch.slice(0, 1), [2])
    rec = table_to_records(only_regions(table))[0]
    assert all(g["mask"] is None for g in rec["groundings"])
    human = [r for r in rec["regions"] if r["box"] == HUMAN_MASK_BOX][0]
    assert "masks.pred_iou" in human["checks"]  # overwrite: the imported mask was recomputed


def test_bad_image_recorded_batch_goes_on(stage, photo_batch):
    table = annotated(photo_batch.slice(0, 2), [2, 2])
    images = table.column(IMAGE_BYTES_COLUMN).to_pylist()
    images[1] = images[1][:200]  # truncated file
    table = table.set_column(table.schema.get_field_index(IMAGE_BYTES_COLUMN), IMAGE_BYTES_COLUMN,
                             pa.array(images, pa.binary()))
    first, second = table_to_records(stage(table))
    assert first["errors"] == [] and all(g["mask"] is not None for g in first["groundings"])
    assert second["errors"][0]["stage"] == "decode" and all(g["mask"] is None for g in second["groundings"])


def test_params_are_checked():
    with pytest.raises(ValidationError):
        SamMaskAnnotator({"targets": ["captions"]})
    with pytest.raises(ValidationError):
        SamMaskAnnotator({"targets": []})


def test_local_directory_gives_the_same_masks(stage, photo_batch, tmp_path):
    """A saved checkpoint folder (the offline alternative to the hub) loads through from_pretrained."""
    stage.model.save_pretrained(tmp_path)
    stage.processor.save_pretrained(tmp_path)
    local = SamMaskAnnotator({"model": str(tmp_path)})
    table = annotated(photo_batch.slice(0, 1), [3])
    got = table_to_records(local(table))[0]["groundings"]
    want = table_to_records(stage(table))[0]["groundings"]
    assert [g["mask"] for g in got] == [g["mask"] for g in want] and all(g["mask"] for g in got)
    assert [g["checks"] for g in got] == [g["checks"] for g in want]


def test_each_mask_lies_under_its_own_prompt_box(stage, photos, monkeypatch):
    """A SAM whose output the test chooses (forward replaced): for every prompt box it returns, in its own
    input frame, an empty candidate, the box filled (best predicted IoU) and the whole image. After the
    stage's upscaling each mask must lie under ITS annotation's box in the photo's pixels: a wrong candidate,
    a mixed-up order of boxes, a box in the wrong frame or a (w, h) swap all move or lose it."""
    from transformers.models.sam.modeling_sam import SamImageSegmentationOutput

    from helpers import make_batch

    seen = []

    def chosen_forward(pixel_values=None, input_boxes=None, multimask_output=True, **_):
        side = pixel_values.shape[-1]  # the padded square the boxes are given in
        low = side // 4  # SAM's low-resolution mask side
        centres = (torch.arange(low, dtype=torch.float32) + 0.5) * (side / low)
        boxes = input_boxes[0]
        seen.append(boxes.tolist())
        masks = torch.full((1, len(boxes), 3, low, low), -10.0)
        for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            inside = ((centres[None, :] >= x0) & (centres[None, :] <= x1)) & ((centres[:, None] >= y0) & (centres[:, None] <= y1))
            masks[0, k, 1][inside] = 10.0
            masks[0, k, 2] = 10.0
        iou = torch.tensor([0.5, 0.9, 0.7]).repeat(1, len(boxes), 1)
        return SamImageSegmentationOutput(iou_scores=iou, pred_masks=masks)

    monkeypatch.setattr(stage.model, "forward", chosen_forward)
    batch = make_batch({"chelsea": photos["chelsea"]})
    records = table_to_records(batch.drop([IMAGE_BYTES_COLUMN]))
    w, h = records[0]["width"], records[0]["height"]
    assert (w, h) == (451, 300)
    prompt_boxes = [[20.0, 30.0, 140.0, 120.0], [300.0, 40.0, 440.0, 280.0], [150.0, 180.0, 290.0, 290.0]]
    src = source_of("test")
    records[0]["regions"] = [
        new_annotation(src, 0.9, ann_id=f"r{k}", kind="object", box=b, quad=None, polygon=None, mask=None,
                       label="thing", brief=None)
        for k, b in enumerate(prompt_boxes)
    ]
    table = records_to_table(records).append_column(IMAGE_BYTES_COLUMN, batch.column(IMAGE_BYTES_COLUMN))
    rec = table_to_records(stage(table))[0]
    assert rec["errors"] == [] and len(seen) == 1 and len(seen[0]) == 3
    # SAM's input frame: the longest side resized to the tiny preset's 256, the other rounded
    sx, sy = 256 / w, int(h * 256 / w + 0.5) / h
    for got, box in zip(seen[0], prompt_boxes):  # in the annotations' order
        assert got == pytest.approx([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], abs=1e-3)
    tolerance = 2 * max(w, h) / 64  # two low-resolution mask pixels, in the photo's pixels
    for region, box in zip(rec["regions"], prompt_boxes):
        mask = rle_to_mask(region["mask"])
        ys, xs = np.nonzero(mask)
        assert len(xs), f"{region['ann_id']}: empty mask (the best candidate is the filled box)"
        tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert tight == pytest.approx(box, abs=tolerance), region["ann_id"]
        assert region["checks"]["masks.box_mask_iou"] > 0.85 and region["checks"]["masks.pred_iou"] == pytest.approx(0.9)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [40, 100])  # 80 and 200 target boxes: 2 and 4 decoder calls
def test_many_boxes_are_prompted_in_bounded_chunks_with_the_same_masks(stage, photo_batch, monkeypatch, n):
    """Issue 21: 20,000 boxes on one image made SAM's decoder ask for 657 MB at once. The encoder runs
    once, the prompts go PROMPT_CHUNK at a time, and the masks equal those of one unchunked call."""
    import annotators.masks as masks_mod

    table = annotated(photo_batch.slice(0, 1), [n])
    shapes = []
    handle = stage.model.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append(tuple(kw["input_boxes"].shape)), with_kwargs=True)
    try:
        chunked = table_to_records(stage(table))[0]
        monkeypatch.setattr(masks_mod, "PROMPT_CHUNK", 10_000)
        shapes_chunked, shapes[:] = list(shapes), []
        whole = table_to_records(stage(table))[0]
    finally:
        handle.remove()
    targets = 2 * n  # groundings + object regions (the human-masked region keeps its mask)
    assert [s[1] for s in shapes_chunked] == [min(64, targets - lo)
                                               for lo in range(0, targets, 64)]
    assert shapes == [(1, targets, 4)]  # the unchunked reference: one call with every box
    assert chunked["errors"] == [] == whole["errors"]
    for a, b in zip(chunked["groundings"] + chunked["regions"], whole["groundings"] + whole["regions"]):
        assert a["mask"] == b["mask"]
        if "masks.pred_iou" in b["checks"]:
            assert a["checks"]["masks.pred_iou"] == pytest.approx(b["checks"]["masks.pred_iou"], abs=1e-5)
