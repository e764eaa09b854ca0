"""Stage `masks`: SAM masks for boxes (groundings, object regions) from box prompts.

Florence-2's segmentation targets are polygons of objects, and SAM turns a box into a mask
without any class vocabulary. The image encoder, by far the costliest part, runs once per image;
the box prompts go to the mask decoder PROMPT_CHUNK at a time, so memory is bounded per image.
SAM proposes 3 masks per box (multimask) and predicts each one's IoU; the best one is kept,
upscaled to the original image by SamProcessor.post_process_masks and stored as COCO RLE
(regions also get polygons). Checks: `masks.pred_iou` (SAM's own IoU estimate) and
`masks.box_mask_iou` (how well the mask's tight box matches the prompt box) for the filters.

`model: grabcut` (directly or through an alias, as the offline profile's `sam: grabcut` does) runs
OpenCV GrabCut from each box instead (annotators/grabcut.py): real, CPU-only, no weights; its
checks are `masks.fg_fraction`, `masks.edge_agreement` and `masks.box_mask_iou`.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from annotators.grabcut import GRABCUT, GrabCutSettings, segment_box
from engine.models import parse_model_ref
from engine.random_models import check as check_random
from engine.stage import Resources, Stage, StageParams, pick_device, record_error
from schemas.geometry import clamp_box, mask_box_iou, mask_to_polygon, mask_to_rle

Target = Literal["groundings", "regions"]

# Masks are upscaled to the original image this many boxes at a time: N x H x W floats for a
# 12-megapixel photo and a hundred boxes would be gigabytes.
UPSCALE_CHUNK = 16
# Box prompts per mask-decoder call (the image encoder runs once per image): bounds the decoder's
# memory whatever the number of boxes of an image (ingest.max_objects_per_image caps imported ones).
PROMPT_CHUNK = 64


class MaskParams(StageParams):
    model: str = "sam"  # alias of the pipeline's models: section, hub id, dir, random:
    targets: list[Target] = ["groundings", "regions"]  # which kept annotations get masks
    multimask: bool = True  # 3 candidates per box, keep the best predicted IoU (SAM's ambiguity handling)
    mask_threshold: float = 0.0  # logit threshold of SamProcessor.post_process_masks (SAM's own)
    polygon_tolerance: float = 1.0  # pixels, cv2.approxPolyDP for region polygons
    overwrite: bool = False  # recompute masks that are already there (e.g. imported human masks)
    grabcut_iterations: int = Field(3, ge=1, le=20)  # model: grabcut only
    grabcut_max_side: int = Field(192, ge=16)  # model: grabcut only: the context crop's longer side (pixels)

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("targets must name groundings and/or regions")
        return list(dict.fromkeys(v))


def load_sam(ref_str: str):
    """(model, processor) for a hub id, a local directory or a random: reference."""
    from transformers import SamModel, SamProcessor

    ref = parse_model_ref(ref_str)
    if ref.kind in ("hub", "local"):
        return SamModel.from_pretrained(ref.location).eval(), SamProcessor.from_pretrained(ref.location)
    from engine.random_models.sam import build_sam

    return build_sam(ref)


class SamMaskAnnotator(Stage):
    """Box-prompted SAM masks for kept groundings and object regions, one model call per image."""

    name: ClassVar[str] = "masks"
    Params: ClassVar[type[StageParams]] = MaskParams
    default_resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, batch_size=8, concurrency=1)
    needs_images: ClassVar[bool] = True
    uses_model: ClassVar[bool] = True
    model_params: ClassVar[dict[str, str]] = {"model": "hf"}

    params: MaskParams

    def __init__(self, params=None, models=None):
        super().__init__(params, models)
        if self.grabcut:  # OpenCV, no weights: preflight checks the package
            self.model_params = {"model": "opencv"}

    @property
    def grabcut(self) -> bool:
        return self.resolve_model(self.params.model) == GRABCUT

    def model_revision(self, param: str, ref: str) -> str:
        if self.grabcut:
            import cv2

            return f"opencv-{cv2.__version__}"
        return super().model_revision(param, ref)

    def check_model(self, param: str, ref: str) -> None:
        if param == "model" and ref != GRABCUT:
            check_random("sam", ref)

    def setup(self) -> None:
        self.model_ref = self.resolve_model(self.params.model)
        if self.grabcut:
            return
        self.revision = parse_model_ref(self.model_ref).revision
        self.model, self.processor = load_sam(self.model_ref)
        self.device = pick_device()
        self.model.to(self.device)

    def _targets(self, record: dict) -> list[tuple[str, dict]]:
        """(collection, annotation) of every kept box that needs a mask, in record order."""
        out = []
        for collection in self.params.targets:
            for ann in record[collection] or []:
                if ann["status"] != "kept" or ann.get("box") is None:
                    continue
                if collection == "regions" and ann["kind"] != "object":
                    continue  # text regions (OCR) have quads; SAM masks of glyphs are not targets
                if ann.get("mask") is not None and not self.params.overwrite:
                    continue
                out.append((collection, ann))
        return out

    def process_batch(self, records: list[dict], images: list | None) -> list[dict]:
        for rec, image in zip(records, images):
            targets = self._targets(rec)
            if not targets:
                continue
            try:
                (self._grabcut if self.grabcut else self._segment)(image, targets)
            except Exception as exc:  # noqa: BLE001 - per-image error contract
                record_error(rec, self.name, exc)
        return records

    def _segment(self, image, targets: list[tuple[str, dict]]) -> None:
        import torch

        boxes = [clamp_box(ann["box"], image.width, image.height) for _, ann in targets]
        inputs = self.processor(images=image, input_boxes=[boxes], return_tensors="pt").to(self.device)
        inputs["input_boxes"] = inputs["input_boxes"].float()  # (1, boxes, 4): small whatever the count
        image = {"pixel_values": inputs["pixel_values"]}
        if len(boxes) > PROMPT_CHUNK:
            with torch.inference_mode():  # the encoder runs once; each chunk of prompts reuses its output
                image = {"image_embeddings": self.model.get_image_embeddings(inputs["pixel_values"])}
        # The mask decoder gets PROMPT_CHUNK boxes at a time: its outputs are boxes x 3 x 256 x 256 floats
        # (20,000 boxes would be ~16 GB at once); each chunk is upscaled UPSCALE_CHUNK boxes at a time.
        for start in range(0, len(boxes), PROMPT_CHUNK):
            with torch.inference_mode():
                outputs = self.model(**image, input_boxes=inputs["input_boxes"][:, start:start + PROMPT_CHUNK],
                                     multimask_output=self.params.multimask)
            iou = outputs.iou_scores[0].float()  # (boxes, candidates)
            best = iou.argmax(dim=-1)
            rows = torch.arange(iou.shape[0], device=best.device)
            pred_iou = iou[rows, best].cpu().tolist()
            low_res = outputs.pred_masks[0][rows, best].unsqueeze(1)  # (boxes, 1, h, w)
            del outputs
            for lo in range(0, len(rows), UPSCALE_CHUNK):
                masks = self.processor.post_process_masks(
                    [low_res[lo : lo + UPSCALE_CHUNK]],
                    inputs["original_sizes"].cpu(),
                    inputs["reshaped_input_sizes"].cpu(),
                    mask_threshold=self.params.mask_threshold,
                )[0][:, 0].cpu().numpy()
                for k, mask in enumerate(masks):
                    j = start + lo + k
                    collection, ann = targets[j]
                    rle = mask_to_rle(mask)
                    ann["mask"] = rle
                    checks = ann.setdefault("checks", {})
                    checks["masks.pred_iou"] = float(pred_iou[lo + k])
                    checks["masks.box_mask_iou"] = mask_box_iou(boxes[j], rle)
                    if collection == "regions":
                        ann["polygon"] = mask_to_polygon(mask, tolerance=self.params.polygon_tolerance) or None

    def _grabcut(self, image, targets: list[tuple[str, dict]]) -> None:
        import numpy as np

        rgb = np.asarray(image, dtype=np.uint8)
        settings = GrabCutSettings(iterations=self.params.grabcut_iterations, max_side=self.params.grabcut_max_side)
        for collection, ann in targets:
            box = clamp_box(ann["box"], image.width, image.height)
            seg = segment_box(rgb, box, settings)
            rle = mask_to_rle(seg.mask)
            ann["mask"] = rle
            checks = ann.setdefault("checks", {})
            checks["masks.fg_fraction"] = seg.fg_fraction
            checks["masks.edge_agreement"] = seg.edge_agreement
            checks["masks.box_mask_iou"] = mask_box_iou(box, rle)
            if collection == "regions":
                ann["polygon"] = mask_to_polygon(seg.mask, tolerance=self.params.polygon_tolerance) or None
