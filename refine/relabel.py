"""Relabel: round k's checkpoint annotates every image for the tasks it was trained on.

The first stage of a round's step (engine StepJob: relabel -> the pipeline's stage-2 filters ->
merge). It sets the record's previous annotations aside under a stash key (engine.stage
STASH_PREFIX, carried to the merge stage of the same step and never written), so the filters
that follow see only this round's annotations, exactly as they saw the specialists' output.

Why a subclass of the `florence2` stage: the mapping from parsed Florence-2 output to records
(clamping, phrase spans of groundings, captions feeding grounding) is that stage's job; the round
only changes who signs the annotations (`source.annotator = "refine"`, `round = k`) and makes the
ids unique across rounds (the round is part of the id, and groundings' `text_ann_id` follow).

A round proves its model first (refine.health): the trainer measured it on held-out images and
wrote the figures to the model's train_summary.json; this stage applies `health` (the thresholds)
to them (refine.health.failures). A model-wide failure (the same answer to different prompts, every
task collapsed) drops every annotation the model makes; a task's failure (its distinct generations,
parse rate or agreement) drops only that task's annotations (and the groundings of a failed brief
caption). Dropped annotations stay in the round's shards, reason `round:unhealthy_model`, so the
merge keeps the previous labels. Every annotation carries its task's health figures as checks
`round.<figure>` (re-threshold in SQL).
It also sizes generation per task from the longest target the round trained on (+25%, +8 tokens;
`max_new_tokens` stays the cap), so long captions are not cut and short outputs stop early.

Cross-fitted (`folds` = k > 0, refine.crossfit): the stage loads the round's k fold models instead of
its model and relabels each image with the model of its fold (which never trained on it); each
annotation names that model in its provenance (`source.model`: models/round<k>-folds/fold<i>) and
carries the check `round.fold`; a fold model that failed its health check drops its fold's relabels.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from annotators.florence2 import Florence2Annotator, Florence2Params
from annotators.florence2_model import Florence2Model
from engine.stage import STASH_PREFIX
from filters.decision import drop, reset_own, set_check
from refine.crossfit import fold_folder, fold_of
from refine.health import MODEL, HealthThresholds, failures, headline
from schemas.florence2_tasks import CAPTION_TOKENS
from schemas.records import ANNOTATION_KINDS, make_ann_id

log = logging.getLogger(__name__)
ANNOTATOR = "refine"
CHECK = "round"  # checks `round.<figure>`, reason `round:unhealthy_model`
UNHEALTHY = "unhealthy_model"
SUMMARY_FILE = "train_summary.json"  # refine.trainer.SUMMARY_FILE (the relabeller imports no trainer)
PREVIOUS = STASH_PREFIX + "previous"  # the record's annotations before this round (JSON)


class RelabelParams(Florence2Params):
    round: int = Field(1, ge=1, description="the refinement round these annotations belong to")
    # where `model` (an OUT-relative folder, models/round<k>) is read from: the store's spec (local path
    # or object-store URL + options); each worker copies the folder from there (an execution setting)
    model_store: Any = None
    no_repeat_ngram_size: int = Field(0, ge=0, description="no n-gram ban by default (refine.rounds.RelabelSettings says why)")
    health: HealthThresholds = Field(default_factory=HealthThresholds,
                                     description="the round's model health thresholds (refine.health)")
    folds: int = Field(0, ge=0, description="cross-fitted relabelling (refine.crossfit): each image relabelled by the "
                       "model of its fold, <model>-folds/fold<i>; 0: every image by `model`")


@dataclass
class RoundModel:
    """One model that relabels (the round's, or a fold model) with what the round knows of it."""

    florence: Any
    source: dict
    health: dict  # the figures of its training summary (refine.health)
    failed: dict  # refine.health.failures: scope (MODEL or a task token) -> failed checks
    fold: int | None = None


def model_summary(folder: str | Path) -> dict:
    """The training summary of a model folder ({} for a model that is not a round's)."""
    path = Path(folder) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


GROUNDING = "<CAPTION_TO_PHRASE_GROUNDING>"


def task_of(key: str, ann: dict) -> str:
    """The task token whose output an annotation of the florence2 stage is (annotators.florence2 maps
    captions by tier, OCR to text regions, dense region captions to objects with a brief)."""
    if key == "texts":
        return CAPTION_TOKENS[ann.get("tier") or "brief"]
    if key == "groundings":
        return GROUNDING
    if ann.get("kind") == "text":
        return "<OCR_WITH_REGION>"
    return "<DENSE_REGION_CAPTION>" if ann.get("brief") is not None else "<OD>"


def mark_health(records: list[dict], health: dict | None, failed: dict[str, list[str]]) -> None:
    """Each annotation carries its task's health figures as checks (`round.<figure>`, refine.health.headline)
    and is dropped when the model failed as a whole or at its task (groundings also when the brief
    caption they ground failed)."""
    for rec in records:
        for key in ANNOTATION_KINDS:
            for ann in rec.get(key) or []:
                task = task_of(key, ann)
                scopes = (MODEL, task, CAPTION_TOKENS["brief"]) if task == GROUNDING else (MODEL, task)
                bad = any(failed.get(s) for s in scopes)
                reset_own(ann, CHECK)
                for name, value in headline(health, task).items():
                    set_check(ann, CHECK, name, value)
                set_check(ann, CHECK, "healthy", not bad)
                if bad:
                    drop(ann, CHECK, UNHEALTHY)


def mark_fold(records: list[dict], fold: int) -> None:
    """checks["round.fold"]: the fold whose model made the annotation (cross-fitted relabelling)."""
    for rec in records:
        for key in ANNOTATION_KINDS:
            for ann in rec.get(key) or []:
                set_check(ann, CHECK, "fold", fold)


def stamp_round(records: list[dict], round_: int) -> list[dict]:
    """round = k on every annotation, ids re-derived with the round (unique across rounds)."""
    for rec in records:
        iid = rec["image_id"]
        new_ids: dict[str, str] = {}
        for key in ANNOTATION_KINDS:
            for i, ann in enumerate(rec.get(key) or []):
                old = ann["ann_id"]
                ann["ann_id"] = make_ann_id(iid, ANNOTATOR, key, i, f"round{round_}", old)
                ann["round"] = round_
                new_ids[old] = ann["ann_id"]
        for g in rec.get("groundings") or []:
            g["text_ann_id"] = new_ids.get(g["text_ann_id"], g["text_ann_id"])
    return records


class RefineRelabeler(Florence2Annotator):
    """The florence2 stage under the name `refine`, with the previous annotations set aside."""

    name = "refine"
    Params = RelabelParams

    params: RelabelParams

    def setup(self) -> None:
        if self.params.folds:
            self.members = [self._load(fold_folder(self.params.model, i), i) for i in range(self.params.folds)]
        else:
            self.members = [self._load(self.params.model, None)]
        self._use(self.members[0])

    def _load(self, folder: str, fold: int | None) -> RoundModel:
        """A model folder of the round (OUT-relative, copied from the store by each worker) with its health."""
        if self.params.model_store is not None:
            from engine.store import ShardStore

            store = ShardStore.from_spec(self.params.model_store)
            self.models = {**self.models, folder: store.local_dir(folder)}
        self.model_ref = self.resolve_model(folder)
        florence = Florence2Model.load(self.model_ref, dtype=self.params.dtype)
        summary = model_summary(self.model_ref)
        failed = failures(summary.get("health"), self.params.health)
        for scope, checks in sorted(failed.items()):
            log.info("round %d: model %s unhealthy%s (%s): %s annotations are dropped as %s:%s", self.params.round, folder,
                     "" if scope == MODEL else f" at {scope}", "; ".join(checks),
                     "its" if scope == MODEL else f"its {scope}", CHECK, UNHEALTHY)
        # generation per task sized from the targets the round trained on (the configured value is the cap)
        florence.token_limits = {task: min(n, self.params.max_new_tokens)
                                 for task, n in (summary.get("generation_tokens") or {}).items()}
        # provenance names the model as the pipeline does (OUT-relative models/round<k>), not where this
        # worker found it, so the same round on two machines writes the same annotations
        return RoundModel(florence, self.source(folder, florence.revision), summary.get("health") or {}, failed, fold)

    def _use(self, member: RoundModel) -> None:
        self.florence, self._source = member.florence, member.source
        self.health, self.failed = member.health, member.failed

    def process_batch(self, records: list[dict], images: list | None) -> list[dict]:
        for rec in records:
            rec[PREVIOUS] = json.dumps({key: rec.get(key) or [] for key in (*ANNOTATION_KINDS, "errors")})
            for key in (*ANNOTATION_KINDS, "errors"):
                rec[key] = []
        if self.params.folds:  # each image by the model of its fold: the one that did not train on it
            groups: dict[int, list[int]] = {}
            for i, rec in enumerate(records):
                groups.setdefault(fold_of(rec["image_id"], self.params.folds), []).append(i)
        else:
            groups = {0: list(range(len(records)))}
        for g, idx in sorted(groups.items()):
            member = self.members[g]
            self._use(member)
            part = super().process_batch([records[i] for i in idx], [images[i] for i in idx] if images is not None else None)
            part = stamp_round(part, self.params.round)
            mark_health(part, self.health, self.failed)
            if member.fold is not None:
                mark_fold(part, member.fold)
            for i, rec in zip(idx, part):
                records[i] = rec
        # counted here: the runners' before/after counts cannot see what this stage made, since it also
        # sets the previous annotations aside
        self.report("images", len(records))
        self.report("images_with_output", sum(1 for r in records if any(r[k] for k in ANNOTATION_KINDS)))
        for key in ANNOTATION_KINDS:
            self.report(f"new_{key}", sum(len(r[key]) for r in records))
        return records
