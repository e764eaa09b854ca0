"""OCR text regions with RapidOCR (PP-OCR det + rec, ONNX; the models ship in the wheel).

The FLD-5B role of the "OCR service": line-level quads with their text. Writes regions of
kind `text` with quad (clockwise from top-left, as Florence-2's <OCR_WITH_REGION>), box,
label = the recognised string and score = recognition confidence.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from engine.models import RAPIDOCR_BUNDLED
from engine.stage import Resources, Stage, StageParams, pick_device
from schemas.geometry import clamp_box, clamp_points, quad_to_box
from schemas.records import make_ann_id, new_annotation


class OCRParams(StageParams):
    model: str = Field(RAPIDOCR_BUNDLED, description="'rapidocr' (bundled PP-OCR) or a RapidOCR config YAML with local models")
    min_score: float = Field(0.5, ge=0, le=1, description="RapidOCR text_score: lines below are not returned")
    box_thresh: float = Field(0.5, ge=0, le=1)
    use_cls: bool = Field(True, description="text-direction classifier (upside-down lines)")
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads per worker")


class RapidOCRAnnotator(Stage):
    name = "ocr"
    Params = OCRParams
    default_resources = Resources(cpus=1, gpus=0, batch_size=8, concurrency=1)
    needs_images = True
    uses_model = True
    model_params = {"model": "rapidocr"}

    def setup(self) -> None:
        from rapidocr import RapidOCR

        p: OCRParams = self.params
        params: dict[str, Any] = {
            "Global.log_level": "error",
            "Global.text_score": p.min_score,
            "Global.use_cls": p.use_cls,
            "Det.box_thresh": p.box_thresh,
            "EngineConfig.onnxruntime.intra_op_num_threads": p.threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            "EngineConfig.onnxruntime.use_cuda": pick_device() == "cuda",
        }
        model = self.resolve_model(p.model)
        self._engine = RapidOCR(config_path=None if model == RAPIDOCR_BUNDLED else model, params=params)
        from importlib.metadata import version

        self._source = self.source(model, f"rapidocr-{version('rapidocr')}")

    def process_record(self, record: dict, image) -> None:
        out = self._engine(np.asarray(image))
        if out.boxes is None or out.txts is None:
            return
        w, h = record["width"], record["height"]
        for i, (quad_pts, text, score) in enumerate(zip(out.boxes, out.txts, out.scores)):
            quad = clamp_points(np.asarray(quad_pts).reshape(-1).tolist(), w, h)
            record["regions"].append(
                new_annotation(
                    self._source,
                    score=float(score),
                    ann_id=make_ann_id(record["image_id"], self.name, "text", i),
                    kind="text",
                    box=clamp_box(quad_to_box(quad), w, h),
                    quad=quad,
                    polygon=None,
                    mask=None,
                    label=str(text),
                    brief=None,
                )
            )
