"""Stage name -> class. Entries are import paths so that listing stages imports no model code."""
from __future__ import annotations

import importlib

from engine.stage import Stage

STAGES: dict[str, str] = {
    # stage 1: specialists (annotators/)
    "ocr": "annotators.ocr:RapidOCRAnnotator",
    "florence2": "annotators.florence2:Florence2Annotator",
    "detect": "annotators.detect:ObjectDetector",
    "region_text": "annotators.region_text:RegionTextAnnotator",
    "grounding": "annotators.grounding:GroundingAnnotator",
    "masks": "annotators.masks:SamMaskAnnotator",
    # stage 2: filters (filters/)
    "text_filter": "filters.text:TextFilter",
    "region_filter": "filters.region:RegionFilter",
    "clip_score": "filters.clip_score:ClipScoreFilter",
    "grounding_filter": "filters.grounding:GroundingFilter",
}


class UnknownStageError(KeyError):
    pass


def stage_class(name: str) -> type[Stage]:
    try:
        target = STAGES[name]
    except KeyError:
        raise UnknownStageError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}") from None
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if cls.name != name:
        raise RuntimeError(f"registry entry {name!r} points to {target} whose name is {cls.name!r}")
    return cls
