"""Stage name -> class. Entries are import paths so that listing stages imports no model code.

Three origins, looked up in this order:
- built-in: the table below;
- entry point: an installed package declares `[project.entry-points."fld_engine.stages"]
  my_filter = "my_package.filters:MyFilter"`; `stage: my_filter` then works in pipelines.yaml;
- import path: `stage: mypackage.module:MyStage` (anything importable from sys.path).
The class must subclass engine.stage.Stage.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from engine.stage import Stage

ENTRY_POINT_GROUP = "fld_engine.stages"

STAGES: dict[str, str] = {
    # stage 1: specialists (annotators/)
    "ocr": "annotators.ocr:RapidOCRAnnotator",
    "florence2": "annotators.florence2:Florence2Annotator",
    "detect": "annotators.detect:ObjectDetector",
    "region_text": "annotators.region_text:RegionTextAnnotator",
    "grounding": "annotators.grounding:GroundingAnnotator",
    "masks": "annotators.masks:SamMaskAnnotator",
    "compose_caption": "annotators.compose_caption:ComposeCaptioner",
    # stage 2: filters (filters/)
    "text_filter": "filters.text:TextFilter",
    "region_filter": "filters.region:RegionFilter",
    "clip_score": "filters.clip_score:ClipScoreFilter",
    "grounding_filter": "filters.grounding:GroundingFilter",
}


# Stage 3: what a pipeline's `rounds:` / `refine:` blocks mean (train -> relabel -> filter -> merge),
# found by import path like the stages, so the engine never imports refine/.
ROUNDS = "refine.rounds:FlorenceRounds"


def rounds_class():
    """The class that reads a pipeline's `refine:` block (its pydantic schema is `.Config`)."""
    module, _, attr = ROUNDS.partition(":")
    return getattr(importlib.import_module(module), attr)


def rounds_plan(pipeline):
    """The pipeline's refinement rounds as the engine runs them (validates the `refine:` block)."""
    return rounds_class()(pipeline)


class UnknownStageError(KeyError):
    pass


@dataclass(frozen=True)
class StageEntry:
    """Where a stage name comes from (what `fld stages` lists)."""

    name: str
    target: str  # module:Class
    origin: str  # "built-in" | "entry point (package X)" | "import path"


def plugin_entries() -> dict[str, StageEntry]:
    """Stages of installed packages (entry-point group fld_engine.stages); built-in names win."""
    out: dict[str, StageEntry] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in STAGES or ep.name in out:
            continue
        package = ep.dist.name if ep.dist is not None else "?"
        out[ep.name] = StageEntry(ep.name, ep.value, f"entry point (package {package})")
    return out


def all_entries() -> list[StageEntry]:
    """Every stage a pipeline can name without an import path: built-in first, then plug-ins."""
    builtin = [StageEntry(name, target, "built-in") for name, target in STAGES.items()]
    return builtin + sorted(plugin_entries().values(), key=lambda e: e.name)


def find_entry(name: str) -> StageEntry:
    if name in STAGES:
        return StageEntry(name, STAGES[name], "built-in")
    if ":" in name:  # an import path: module.path:ClassName
        return StageEntry(name, name, "import path")
    plugins = plugin_entries()
    if name in plugins:
        return plugins[name]
    known = sorted([*STAGES, *plugins])
    raise UnknownStageError(f"unknown stage {name!r}; known stages: {', '.join(known)} "
                            "(or give an import path module:Class)")


def _import(target: str, name: str) -> type[Stage]:
    module, _, attr = target.partition(":")
    if not module or not attr or module.startswith("."):
        raise UnknownStageError(f"stage {name[:80]!r}: an import path is module.path:ClassName (absolute, "
                                "both parts given)")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except Exception as exc:  # noqa: BLE001 - any failure of a named module's import is this stage's error
        first = (str(exc).splitlines() or [""])[0][:200]
        raise UnknownStageError(f"stage {name[:80]!r}: cannot import {target[:80]} ({type(exc).__name__}: {first})") from None
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise UnknownStageError(f"stage {name!r}: {target} is not a subclass of engine.stage.Stage")
    return cls


def stage_class(name: str) -> type[Stage]:
    entry = find_entry(name)
    cls = _import(entry.target, name)
    if entry.origin == "built-in" and cls.name != name:
        raise RuntimeError(f"registry entry {name!r} points to {entry.target} whose name is {cls.name!r}")
    return cls
