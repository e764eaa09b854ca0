"""Stage `masks`: SAM masks for boxes (groundings, object regions) from box prompts.

Florence-2's segmentation targets are polygons of objects, and SAM turns a box into a mask
without any class vocabulary. All target boxes of an image go into ONE SamModel call
(input_boxes holds them all: the image encoder, by far the costliest part, runs once).
SAM proposes 3 masks per box (multimask) and predicts each one's IoU; the best one is kept,
upscaled to the original image by SamProcessor.post_process_masks and stored as COCO RLE
(regions also get polygons). Checks: `masks.pred_iou` (SAM's own IoU estimate) and
`masks.box_mask_iou` (how well the mask's tight box matches the prompt box) for the filters.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import field_validator

from engine.models import ModelRef, parse_model_ref
from engine.stage import Resources, Stage, StageParams, pick_device, record_error
from schemas.geometry import box_area, box_iou, clamp_box, mask_to_polygon, mask_to_rle, rle_to_box

Target = Literal["groundings", "regions"]

# random:<preset> configurations: the real SamModel classes, small enough for CPU tests.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {
            "vision_config": {
                "hidden_size": 32,
                "output_channels": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 256,
                "patch_size": 16,
                "window_size": 4,
                "global_attn_indexes": [1],
                "num_pos_feats": 16,  # output_channels / 2: the shared positional embedding
                "mlp_dim": 64,
            },
            "prompt_encoder_config": {"hidden_size": 32, "image_size": 256, "patch_size": 16, "mask_input_channels": 4},
            "mask_decoder_config": {
                "hidden_size": 32,
                "mlp_dim": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "iou_head_hidden_dim": 32,
            },
        },
    }
}

# Masks are upscaled to the original image this many boxes at a time: N x H x W floats for a
# 12-megapixel photo and a hundred boxes would be gigabytes.
UPSCALE_CHUNK = 16


class MaskParams(StageParams):
    model: str = "sam"  # alias of the pipeline's models: section, hub id, dir, random:
    targets: list[Target] = ["groundings", "regions"]  # which kept annotations get masks
    multimask: bool = True  # 3 candidates per box, keep the best predicted IoU (SAM's ambiguity handling)
    mask_threshold: float = 0.0  # logit threshold of SamProcessor.post_process_masks (SAM's own)
    polygon_tolerance: float = 1.0  # pixels, cv2.approxPolyDP for region polygons
    overwrite: bool = False  # recompute masks that are already there (e.g. imported human masks)

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("targets must name groundings and/or regions")
        return list(dict.fromkeys(v))


def _seed_of(ref: ModelRef) -> int:
    """Every worker derives the same seed from the config, hence identical random weights."""
    return int(hashlib.sha1(ref.revision.encode()).hexdigest()[:8], 16)


def random_spec(ref: ModelRef) -> dict[str, Any]:
    """The preset (or JSON/YAML file naming a `preset` and overriding its `model` sub-configs)."""
    cfg = ref.random_config()
    preset_name = cfg.get("preset", "tiny")
    if preset_name not in RANDOM_PRESETS:
        raise ValueError(f"{ref.ref}: unknown SAM preset {preset_name!r}; known: {sorted(RANDOM_PRESETS)}")
    unknown = set(cfg) - {"preset", "model"}
    if unknown:
        raise ValueError(f"{ref.ref}: unknown key(s) {sorted(unknown)}; allowed: preset, model")
    spec = json.loads(json.dumps(RANDOM_PRESETS[preset_name]))
    for sub, overrides in (cfg.get("model") or {}).items():
        if sub not in spec["model"]:
            raise ValueError(f"{ref.ref}: model.{sub} is not a SAM sub-config ({sorted(spec['model'])})")
        spec["model"][sub].update(overrides)
    return spec


def load_sam(ref_str: str):
    """(model, processor) for a hub id, a local directory or a random: reference."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    ref = parse_model_ref(ref_str)
    if ref.kind in ("hub", "local"):
        return SamModel.from_pretrained(ref.location).eval(), SamProcessor.from_pretrained(ref.location)
    config = SamConfig(**random_spec(ref)["model"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_of(ref))
        model = SamModel(config)
    size = config.vision_config.image_size
    low_res = 4 * (size // config.vision_config.patch_size)  # the mask decoder's output side
    image_processor = SamImageProcessor(
        size={"longest_edge": size},
        pad_size={"height": size, "width": size},
        mask_size={"longest_edge": low_res},
        mask_pad_size={"height": low_res, "width": low_res},
    )
    return model.eval(), SamProcessor(image_processor=image_processor)


class SamMaskAnnotator(Stage):
    """Box-prompted SAM masks for kept groundings and object regions, one model call per image."""

    name: ClassVar[str] = "masks"
    Params: ClassVar[type[StageParams]] = MaskParams
    default_resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, batch_size=8, concurrency=1)
    needs_images: ClassVar[bool] = True
    uses_model: ClassVar[bool] = True
    model_params: ClassVar[dict[str, str]] = {"model": "hf"}

    params: MaskParams

    def check_model(self, param: str, ref: str) -> None:
        parsed = parse_model_ref(ref) if param == "model" else None
        if parsed is not None and parsed.kind == "random":
            random_spec(parsed)

    def setup(self) -> None:
        self.model_ref = self.resolve_model(self.params.model)
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
                self._segment(rec, image, targets)
            except Exception as exc:  # noqa: BLE001 - per-image error contract
                record_error(rec, self.name, exc)
        return records

    def _segment(self, record: dict, image, targets: list[tuple[str, dict]]) -> None:
        import torch

        if (image.width, image.height) != (record["width"], record["height"]):
            raise ValueError(
                f"image {record['image_id']}: decoded size {image.width}x{image.height} differs from the record's "
                f"{record['width']}x{record['height']}"
            )
        boxes = [clamp_box(ann["box"], image.width, image.height) for _, ann in targets]
        inputs = self.processor(images=image, input_boxes=[boxes], return_tensors="pt").to(self.device)
        inputs["input_boxes"] = inputs["input_boxes"].float()
        with torch.inference_mode():
            outputs = self.model(**inputs, multimask_output=self.params.multimask)
        iou = outputs.iou_scores[0].float()  # (boxes, candidates)
        best = iou.argmax(dim=-1)
        rows = torch.arange(len(boxes), device=best.device)
        pred_iou = iou[rows, best].cpu().tolist()
        low_res = outputs.pred_masks[0][rows, best].unsqueeze(1)  # (boxes, 1, h, w)
        for lo in range(0, len(boxes), UPSCALE_CHUNK):
            masks = self.processor.post_process_masks(
                [low_res[lo : lo + UPSCALE_CHUNK]],
                inputs["original_sizes"].cpu(),
                inputs["reshaped_input_sizes"].cpu(),
                mask_threshold=self.params.mask_threshold,
            )[0][:, 0].cpu().numpy()
            for k, mask in enumerate(masks):
                collection, ann = targets[lo + k]
                rle = mask_to_rle(mask)
                ann["mask"] = rle
                checks = ann.setdefault("checks", {})
                checks["masks.pred_iou"] = float(pred_iou[lo + k])
                tight = rle_to_box(rle)
                checks["masks.box_mask_iou"] = box_iou(boxes[lo + k], tight) if box_area(tight) > 0 else 0.0
                if collection == "regions":
                    ann["polygon"] = mask_to_polygon(mask, tolerance=self.params.polygon_tolerance) or None
