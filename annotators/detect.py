"""Stage `detect`: object regions from an object detector (FLD-5B's object specialist).

Three families, because they answer different questions:
- `detr`: closed-vocabulary DETR-family detectors (DETR, Conditional/Deformable DETR, RT-DETR,
  D-FINE, ...) through AutoModelForObjectDetection + AutoImageProcessor; `vocabulary`, when given,
  keeps only those of the model's categories.
- `owlv2`: OWLv2 zero-shot detection; `vocabulary` is the list of category names to look for
  (each wrapped in `prompt_template`), so the label set is the pipeline's choice, not the model's.
- `ssd`: TensorFlow SSD graphs (COCO) through OpenCV DNN (annotators/ssd_model.py): the one real
  detector available without a model hub, hence the offline profile's.

detr and owlv2 use the processors' own `post_process_*` (box decoding and rescaling, OWLv2's square
padding) and write boxes in original-image pixels, clamped to the image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from engine.models import is_ssd_ref, parse_model_ref, resolve_ssd
from engine.random_models import check as check_random
from engine.stage import Resources, Stage, StageParams, pick_device
from schemas.geometry import clamp_box
from schemas.records import make_ann_id, new_annotation

FAMILIES = ("detr", "owlv2", "ssd")
# ssd 0.5: the TF Object Detection API's own visualisation cut-off
DEFAULT_THRESHOLD = {"detr": 0.5, "owlv2": 0.1, "ssd": 0.5}


# --------------------------------------------------------------------------- models
@dataclass
class DetectorModel:
    """A loaded detector: model + processor, with what provenance records."""

    model: Any  # transformers model, or annotators.ssd_model.SsdDetector (ssd)
    processor: Any  # image processor (detr), Owlv2Processor (owlv2), None (ssd)
    family: str
    ref: str
    revision: str
    device: str

    @property
    def labels(self) -> dict[int, str]:
        if self.family == "ssd":
            return dict(self.model.labels)
        return {int(k): v for k, v in (self.model.config.id2label or {}).items()}

    def save(self, directory: str) -> None:
        """save_pretrained of model and processor: a local directory reference loads it back."""
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)


def load_detector(ref: str, family: str, device: str | None = None, threads: int = 1) -> DetectorModel:
    """Hub id or local directory (from_pretrained), or random:<preset|config> of the family;
    ssd: opencv-ssd:<name> or a folder with a .pb + .pbtxt (OpenCV DNN, CPU, `threads`)."""
    if family not in FAMILIES:
        raise ValueError(f"detector family must be one of {FAMILIES}, got {family!r}")
    if family == "ssd":
        from annotators.ssd_model import SsdDetector

        files = resolve_ssd(ref)
        return DetectorModel(SsdDetector(files, threads), None, family, ref, files.revision, "cpu")
    parsed = parse_model_ref(ref)
    if parsed.kind == "random":
        from engine.random_models.detectors import build_detr, build_owlv2

        builder = build_detr if family == "detr" else build_owlv2
        model, processor = builder(parsed.location, parsed.random_config())
    else:
        try:
            model, processor = _pretrained(parsed.location, parsed.revision if parsed.kind == "hub" else None, family)
        except OSError as exc:
            raise OSError(f"detector {ref!r} ({parsed.kind}, family {family}) could not be loaded: {exc}") from exc
    device = device or pick_device()
    model = model.to(device).eval()
    return DetectorModel(model, processor, family, ref, parsed.revision, device)


def _pretrained(location: str, revision: str | None, family: str) -> tuple[Any, Any]:
    kwargs = {"revision": revision} if revision else {}
    if family == "detr":
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        return (
            AutoModelForObjectDetection.from_pretrained(location, **kwargs),
            AutoImageProcessor.from_pretrained(location, **kwargs),
        )
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    model = Owlv2ForObjectDetection.from_pretrained(location, **kwargs)
    return model, Owlv2Processor.from_pretrained(location, **kwargs)


# ---------------------------------------------------------------------------- stage
class ObjectDetectorParams(StageParams):
    model: str = Field("detector", description="model reference or alias of the pipeline's models: section")
    family: Literal["detr", "owlv2", "ssd"] = "detr"
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="minimum score; default 0.5 (detr, ssd) / 0.1 (owlv2)"
    )
    vocabulary: list[str] = Field(
        default_factory=list, description="owlv2: categories to detect (required); detr, ssd: keep only these labels"
    )
    prompt_template: str = Field("a photo of a {}", description="owlv2 text query for a category")
    max_detections: int = Field(100, ge=1, description="per image, highest scores first")
    min_box_size: float = Field(1.0, ge=0.0, description="drop boxes narrower or shorter than this (pixels)")
    nms_iou: float | None = Field(
        0.7, gt=0.0, le=1.0,
        description="ssd: class-agnostic NMS IoU (the graph's own NMS is per class: a cup is also a bowl); null = off",
    )

    @field_validator("vocabulary")
    @classmethod
    def _clean_vocabulary(cls, v: list[str]) -> list[str]:
        cleaned = [c.strip() for c in v]
        if any(not c for c in cleaned):
            raise ValueError("vocabulary entries must be non-empty category names")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("vocabulary has duplicate entries")
        return cleaned

    @field_validator("prompt_template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if "{}" not in v:
            raise ValueError("prompt_template must contain '{}' where the category name goes")
        return v

    @model_validator(mode="after")
    def _owlv2_needs_vocabulary(self) -> "ObjectDetectorParams":
        if self.family == "owlv2" and not self.vocabulary:
            raise ValueError("family owlv2 is zero-shot: give the categories to detect in 'vocabulary'")
        return self


class ObjectDetector(Stage):
    """Object regions (kind object, label = category, score = detector confidence)."""

    name: ClassVar[str] = "detect"
    Params: ClassVar[type[StageParams]] = ObjectDetectorParams
    # gpus 0 by default so CPU-only clusters can schedule it; on GPU clusters set params gpus: 0.5 (two actors a GPU)
    default_resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, batch_size=8, concurrency=1)
    needs_images: ClassVar[bool] = True
    uses_model: ClassVar[bool] = True
    model_params: ClassVar[dict[str, str]] = {"model": "hf"}

    params: ObjectDetectorParams

    def __init__(self, params=None, models=None):
        super().__init__(params, models)
        if self.params.family == "ssd":  # loaded by OpenCV, not transformers: preflight checks its files
            self.model_params = {"model": "opencv_dnn"}

    def model_revision(self, param: str, ref: str) -> str:
        if self.params.family == "ssd":
            return resolve_ssd(ref).revision
        return super().model_revision(param, ref)

    def check_model(self, param: str, ref: str) -> None:
        family = self.params.family
        if family != "ssd":
            if is_ssd_ref(ref):
                raise ValueError(f"{ref!r} is an OpenCV SSD graph: set the detect parameter family: ssd")
            check_random(family, ref)

    def setup(self) -> None:
        p = self.params
        self.detector = load_detector(self.resolve_model(p.model), p.family, threads=self.resources.cpus)
        self.threshold = p.threshold if p.threshold is not None else DEFAULT_THRESHOLD[p.family]
        self._source = self.source(self.detector.ref, self.detector.revision)
        if p.family in ("detr", "ssd"):
            known = set(self.detector.labels.values())
            missing = [c for c in p.vocabulary if c not in known]
            if missing:
                raise ValueError(
                    f"detect: vocabulary entries {missing} are not categories of {self.detector.ref} "
                    f"(it knows {len(known)}, e.g. {sorted(known)[:10]})"
                )
        if p.family == "owlv2":
            queries = [p.prompt_template.format(c) for c in p.vocabulary]
            # tokenized once: every batch reuses the same query ids
            self._queries = self.detector.processor.tokenizer(
                queries, padding="max_length", truncation=True, return_tensors="pt"
            )

    # ------------------------------------------------------------------ batches
    def process_batch(self, records: list[dict], images: list | None) -> list[dict]:
        decoded = []
        for rec, pil in zip(records, images):
            rec["regions"] = [r for r in rec["regions"] if not self._is_own(r)]
            decoded.append((rec, pil))
        step = self.resources.batch_size
        for start in range(0, len(decoded), step):
            chunk = decoded[start:start + step]
            try:
                detections = self.detect([pil for _, pil in chunk])
            except Exception:  # noqa: BLE001 - find which image fails, keep the others
                detections = []
                for rec, pil in chunk:
                    detections.append(self.guarded(rec, lambda pil=pil: self.detect([pil])[0]))
            for (rec, _), dets in zip(chunk, detections):
                if dets is not None:
                    self._add_regions(rec, dets)
        return records

    def _is_own(self, region: dict) -> bool:
        """Made by this very stage configuration: a rerun replaces them. Another detect stage of the
        pipeline (e.g. DETR and OWLv2 side by side) has other params, so its regions stay."""
        source = region.get("source") or {}
        return source.get("annotator") == self.name and source.get("params_hash") == self.params_hash

    @torch.inference_mode()
    def detect(self, pils: list) -> list[list[tuple[float, str, list[float]]]]:
        """One forward pass for the images -> per image [(score, label, [x0, y0, x1, y1])], raw pixels."""
        d = self.detector
        if d.family == "ssd":
            return d.model.detect(pils, self.threshold, self.params.nms_iou)
        sizes = [(im.height, im.width) for im in pils]
        if d.family == "detr":
            inputs = d.processor(images=pils, return_tensors="pt").to(d.device)
            outputs = d.model(**inputs)
            results = d.processor.post_process_object_detection(outputs, threshold=self.threshold, target_sizes=sizes)
            labels = d.labels
            names = [[labels.get(int(i), str(int(i))) for i in r["labels"]] for r in results]
        else:
            pixel_values = d.processor.image_processor(images=pils, return_tensors="pt")["pixel_values"]
            n = len(pils)
            outputs = d.model(
                input_ids=self._queries["input_ids"].repeat(n, 1).to(d.device),
                attention_mask=self._queries["attention_mask"].repeat(n, 1).to(d.device),
                pixel_values=pixel_values.to(d.device),
            )
            vocab = list(self.params.vocabulary)
            results = d.processor.post_process_grounded_object_detection(
                outputs, threshold=self.threshold, target_sizes=sizes, text_labels=[vocab] * n
            )
            names = [r["text_labels"] for r in results]
        out = []
        for r, label_names in zip(results, names):
            scores = r["scores"].float().cpu().tolist()
            boxes = r["boxes"].float().cpu().tolist()
            out.append(list(zip(scores, label_names, boxes)))
        return out

    def _add_regions(self, record: dict, detections: list[tuple[float, str, list[float]]]) -> None:
        p = self.params
        keep = set(p.vocabulary) if p.family != "owlv2" and p.vocabulary else None
        width, height = record["width"], record["height"]
        kept = []
        for score, label, box in sorted(detections, key=lambda d: -d[0]):
            if keep is not None and label not in keep:
                continue
            box = clamp_box(box, width, height)
            if box[2] - box[0] < p.min_box_size or box[3] - box[1] < p.min_box_size:
                continue  # degenerate after clamping (mostly outside the image)
            kept.append((score, label, box))
            if len(kept) == p.max_detections:
                break
        for i, (score, label, box) in enumerate(kept):
            record["regions"].append(
                new_annotation(
                    source=self._source,
                    score=float(score),
                    # the params hash keeps ids unique when several detect stages annotate one image
                    ann_id=make_ann_id(record["image_id"], self.name, "object", i, self.params_hash),
                    kind="object",
                    box=box,
                    quad=None,
                    polygon=None,
                    mask=None,
                    label=label,
                    brief=None,
                )
            )


__all__ = ["ObjectDetector", "ObjectDetectorParams", "DetectorModel", "load_detector"]
