"""Stage name -> class. Entries are import paths so that listing stages imports no model code.

A pipeline may also name a stage defined outside the package by its import path,
`stage: mypackage.module:MyStage` (the class must subclass engine.stage.Stage).
"""
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


# Stage 3: what a pipeline's `rounds:` / `refine:` blocks mean (train -> relabel -> filter -> merge),
# found by import path like the stages, so the engine never imports refine/.
ROUNDS = "refine.rounds:FlorenceRounds"


def rounds_plan(pipeline):
    """The pipeline's refinement rounds as the engine runs them (validates the `refine:` block)."""
    module, _, attr = ROUNDS.partition(":")
    return getattr(importlib.import_module(module), attr)(pipeline)


class UnknownStageError(KeyError):
    pass


def _import(target: str, name: str) -> type[Stage]:
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownStageError(f"stage {name!r}: cannot import {target} ({type(exc).__name__}: {exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise UnknownStageError(f"stage {name!r}: {target} is not a subclass of engine.stage.Stage")
    return cls


def stage_class(name: str) -> type[Stage]:
    if ":" in name:  # an import path: module.path:ClassName
        return _import(name, name)
    try:
        target = STAGES[name]
    except KeyError:
        raise UnknownStageError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))} "
                                "(or give an import path module:Class)") from None
    cls = _import(target, name)
    if cls.name != name:
        raise RuntimeError(f"registry entry {name!r} points to {target} whose name is {cls.name!r}")
    return cls
