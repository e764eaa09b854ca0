"""Stage 3 as the engine runs it: `rounds: N` iterations of train -> relabel -> filter -> merge (P §4, phase C).

This module is what the engine's driver asks about a pipeline's refinement rounds (it finds it
through engine.registry, like a stage); the driver does the running, the resuming and the
committing, with the same code as for every step:
- round k trains a Florence-2 (refine.trainer.Florence2Trainer, an engine trainer) on the kept
  annotations of `annotations/<last step>` (k = 1) or `annotations/round<k-1>` (round k-1's merged
  labels), starting from `refine.model` (k = 1) or round k-1's model (`round_start: previous`, the
  default; `init`: refine.model again), into `OUT/models/round<k>/`;
- then a step over every shard: relabel with that model (refine.relabel) -> the pipeline's
  stage-2 filters on the new annotations -> merge with the record as it was (refine.merge), into
  `annotations/round<k>/`.

pipelines.yaml:
    rounds: 1
    refine:
      model: florence2            # alias of models: or a reference; round 1 starts from it
      train: {steps: 1000, batch_size: 8, lr: 1.0e-5, num_workers: 1, ...}   # refine.trainer.TrainConfig
      relabel: {tasks: [caption, od, ...], batch_size: 4, max_new_tokens: 1024, num_beams: 3}
      merge: {nms_iou: 0.7}
      health: {min_distinct: 0.3, min_parse_rate: 0.5, ...}   # refine.health.HealthThresholds
      cross_fit: {folds: auto, min_images: 32}   # refine.crossfit (shorthand: cross_fit: auto | 0 | k)

A round proves its model before its labels enter the dataset (docs/refine.md): the trainer holds
out validation images and measures the model on them (refine.health); the relabel stage drops the
round's annotations (`round:unhealthy_model`) when a threshold is missed.

Cross-fitted relabelling (refine.crossfit): with k folds the round also trains k fold models
(models/round<k>-folds/fold<i>, each on the other folds' images) and image x is relabelled by the
model of its fold, which never saw it; each fold model's health decides over its own fold's relabels.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator

from annotators.florence2 import TaskName
from engine.registry import stage_class
from engine.values import BoundedModel
from engine.stage import EXECUTION_PARAMS
from engine.training import TrainJob
from refine.crossfit import CrossFitSettings, fold_folder, fold_of
from refine.health import MODEL, HealthThresholds, failures, verdict
from refine.merge import MergeStage
from refine.relabel import RefineRelabeler
from refine.trainer import TRAIN_EXECUTION_SETTINGS, Florence2Trainer, TrainConfig
from schemas.records import ANNOTATION_KINDS
from schemas.florence2_tasks import STAGE_TASKS, TRAINED_TOKENS
from schemas.task_codec import TaskCodec

log = logging.getLogger(__name__)

GROUND_TRUTH_SAMPLE = 2000  # images of a round read for the mAP against imported ground truth


class _Strict(BoundedModel):  # finite numbers, 64-bit integers ("nan", "inf" refused)
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RelabelSettings(_Strict):
    tasks: list[TaskName] = Field(default_factory=lambda: list(STAGE_TASKS), min_length=1,
                                  description="florence2-stage task names the new model annotates")
    batch_size: int = Field(4, ge=1)
    max_new_tokens: int = Field(1024, ge=1, description="cap; each task generates at most its longest training target "
                                "of the round + 25% + 8 tokens")
    num_beams: int = Field(3, ge=1)
    no_repeat_ngram_size: int = Field(
        0, ge=0, description="0: no n-gram ban. The hub's 3 corrupts region outputs that repeat a label (two "
        "crosses: the label's sub-tokens may not repeat); measured on a model that fits 8 images: 36/36 boxes at 0 "
        "or 8, 27/36 at 3. Loops are bounded by the per-task generation length instead")
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    cpus: float | None = None
    gpus: float | None = None
    concurrency: int | None = Field(None, ge=1, description="relabel actors on Ray")


class MergeSettings(_Strict):
    nms_iou: float = Field(0.7, gt=0, le=1, description="IoU above which two boxes of a kind are one object (refine.merge)")


class RefineConfig(_Strict):
    """The `refine:` block of a pipeline."""

    model: str = Field("florence2", description="round 1 starts from this reference or models: alias: a hub id "
                       "(microsoft/Florence-2-base: real weights), a local folder, or random:<preset|config> (from scratch)")
    round_start: Literal["previous", "init"] = Field(
        "previous", description="weights round k > 1 starts from: round k-1's model (rounds build on each other), "
        "or refine.model again (each round from the same start: from scratch with a random: model)")
    from_step: str | None = Field(None, description="step whose annotations round 1 trains on (default: the last)")
    train_tasks: list[str] = Field(default_factory=lambda: list(TRAINED_TOKENS), min_length=1)
    max_target_tokens: int = Field(1024, ge=8)
    max_region_examples: int = Field(8, ge=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    relabel: RelabelSettings = Field(default_factory=RelabelSettings)
    merge: MergeSettings = Field(default_factory=MergeSettings)
    health: HealthThresholds = Field(default_factory=HealthThresholds)
    filters: list[str] | None = Field(None, description="filter stages to rerun (default: every filters.* stage of the steps)")
    cross_fit: CrossFitSettings = Field(default_factory=CrossFitSettings, description=CrossFitSettings.model_fields["folds"].description)

    @field_validator("cross_fit", mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"folds": v} if isinstance(v, (int, str)) else v

    @field_validator("train_tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        TaskCodec(v)  # the codec's own check: a ValueError naming the unknown task(s)
        return v


class FlorenceRounds:
    """What the engine needs to know of a pipeline's refinement rounds."""

    Config = RefineConfig

    def __init__(self, pipeline):
        from engine.config_files import ConfigError, config_error

        self.pipeline = pipeline
        where = f"{pipeline.origin}: pipelines.{pipeline.name}.refine"
        raw = dict(pipeline.config.refine)
        if "max_target_tokens" in (raw.get("train") or {}):
            raise ConfigError(f"{where}.train: set refine.max_target_tokens (it sizes the training targets), "
                              "not refine.train.max_target_tokens")
        try:
            self.cfg = RefineConfig(**raw)
        except ValidationError as exc:
            raise config_error(where, exc, nested=True) from None
        steps = [s.name for s in pipeline.steps]
        if not steps:
            raise ConfigError(f"{where}: refinement rounds need at least one step to start from")
        if self.cfg.from_step is not None and self.cfg.from_step not in steps:
            raise ConfigError(f"{where}.from_step: {self.cfg.from_step!r} is not a step of the pipeline; steps: {steps}")
        if self.cfg.filters is not None:
            names = {s.stage for step in pipeline.steps for s in step.stages}
            missing = [f for f in self.cfg.filters if f not in names]
            if missing:
                raise ConfigError(f"{where}.filters: {missing} are not stages of the pipeline's steps")
        self.source_step = self.cfg.from_step or steps[-1]

    # ----------------------------------------------------------------- identity
    def identity(self) -> dict:
        """The settings that decide what a round produces (execution settings left out)."""
        # round_start is in each round's start model (engine.run: identity of the weights it starts from)
        d = self.cfg.model_dump(mode="json", exclude={"model", "round_start"})
        for key in TRAIN_EXECUTION_SETTINGS:
            d["train"].pop(key, None)
        for key in EXECUTION_PARAMS:
            d["relabel"].pop(key, None)
        d["filters"] = [(spec.stage, spec.params) for spec in self._filter_specs()]
        return d

    def start_model(self) -> str:
        return self.pipeline.models.get(self.cfg.model, self.cfg.model)

    def from_random(self) -> bool:
        """Whether the rounds' weights descend from random ones (refine.model is random:): every round's, since
        a later round starts from the previous one or from refine.model again (the trainer's lr says the same)."""
        from engine.models import parse_model_ref

        return parse_model_ref(self.start_model()).kind == "random"

    def health(self) -> HealthThresholds:
        """refine.health with the agreement checks on when the rounds start from trained weights."""
        return self.cfg.health.for_start(self.from_random())

    def next_start(self, previous_folder: str, previous_hash: str, start_ref: str, start: dict) -> tuple[str, dict, bool]:
        """(reference, identity, read from the store?) of the weights round k + 1 starts from, given
        round k's model folder and hash and what round k started from (refine.round_start)."""
        if self.cfg.round_start == "previous":
            return previous_folder, {"round": previous_hash}, True
        return start_ref, start, False

    # ---------------------------------------------------------------- the jobs
    def folds(self, store, input_folder: str) -> int:
        """The folds of round k's cross-fitting over `input_folder` (0: none), from refine.cross_fit and
        the folder's image count (its commit records' rows). Folds are drawn by image-id hash, so on a
        small input one can come out empty; its fold model would have nothing to train on, so the round
        then relabels without cross-fitting and says so (read: the image_id column only)."""
        k = self.cfg.cross_fit.resolve(sum(int(r.get("rows", 0)) for r in store.committed(input_folder).values()))
        if k:
            sizes = Counter(fold_of(i, k) for shard in store.shards(input_folder)
                            for i in store.read_shard(input_folder, shard, columns=["image_id"]).column("image_id").to_pylist())
            empty = [f for f in range(k) if not sizes.get(f)]
            if empty:
                log.warning("refine.cross_fit: fold %s of %d holds none of the %d images of %s (folds are drawn by "
                            "image-id hash); this round relabels without cross-fitting", empty[0], k,
                            sum(sizes.values()), input_folder)
                return 0
        return k

    def train_jobs(self, round_: int, *, start_ref: str, start_store=None, input_folder: str, model_folder: str,
                   config_hash: str, data_hash: str, folds: int = 0) -> list[TrainJob]:
        """Round k's trainings: one per fold (cross-fitting, refine.crossfit), then the round's published
        model on every image (the last job). Round 1 starts from a model reference; a later round from
        the previous round's folder in `start_store` (start_ref is then OUT-relative)."""
        c = self.cfg
        params = {"start": start_ref, "start_store": start_store.spec() if start_store is not None else None,
                  "train": c.train.model_dump(), "from_random": self.from_random(),
                  "codec": {"tasks": c.train_tasks, "max_target_tokens": c.max_target_tokens,
                            "max_region_examples": c.max_region_examples}}
        runs = [(f"round{round_}-fold{i}-train", fold_folder(model_folder, i), {"fold": i, "folds": folds})
                for i in range(folds)] + [(f"round{round_}-train", model_folder, None)]
        return [TrainJob(name=name, trainer_cls=Florence2Trainer, params={**params, "fold": fold},
                         models=dict(self.pipeline.models), input_folder=input_folder, model_folder=folder,
                         config_hash=config_hash, num_workers=c.train.num_workers,
                         gpus_per_worker=c.train.gpus_per_worker, cpus_per_worker=c.train.cpus_per_worker,
                         meta={"data_hash": data_hash})
                for name, folder, fold in runs]

    def _filter_specs(self) -> list:
        """The pipeline's stage-2 stages (module filters.*, or refine.filters), in step order, each once."""
        out, seen = [], set()
        for step in self.pipeline.steps:
            for spec in step.stages:
                cls = stage_class(spec.stage)
                wanted = self.cfg.filters
                chosen = spec.stage in wanted if wanted is not None else cls.__module__.startswith("filters.")
                if chosen and spec.stage not in seen:
                    seen.add(spec.stage)
                    out.append(spec)
        return out

    def stages(self, round_: int, model_folder: str, store, folds: int = 0) -> list[tuple[type, dict]]:
        """Round k's step: relabel with its model (OUT/<model_folder>, read from `store` by each worker;
        with `folds`, each image with its fold's model) -> the filters -> merge."""
        r = self.cfg.relabel
        relabel = {"model": model_folder, "model_store": store.spec(), "round": round_, "folds": folds,
                   "tasks": r.tasks, "batch_size": r.batch_size,
                   "max_new_tokens": r.max_new_tokens, "num_beams": r.num_beams,
                   "no_repeat_ngram_size": r.no_repeat_ngram_size, "dtype": r.dtype,
                   "health": self.health().model_dump()}
        relabel.update({k: v for k, v in (("cpus", r.cpus), ("gpus", r.gpus), ("concurrency", r.concurrency)) if v is not None})
        filters = [(stage_class(spec.stage), dict(spec.params)) for spec in self._filter_specs()]
        # the categories the round trained on: a caption naming one its image lacks loses agreement (refine.merge)
        vocabulary = (store.read_json(f"{model_folder}/train_summary.json") or {}).get("categories") or []
        return [(RefineRelabeler, relabel), *filters, (MergeStage, {**self.cfg.merge.model_dump(), "vocabulary": vocabulary})]

    # ------------------------------------------------------------------ metrics
    def metrics(self, store, folder: str, round_: int, counters: dict, folds: int = 0) -> dict:
        """Agreement with round k-1 (summed by the merge stage on every shard) and COCO mAP against
        imported `human` boxes on the first GROUND_TRUTH_SAMPLE images of the round. With cross-fitting
        the fold models made the labels: their health checks decide (`health.folds`), the round's
        published model's figures are reported as they are."""
        from refine.metrics import coco_map, reduce_agreement
        from engine.stage import table_to_records

        sums = (counters.get(MergeStage.name) or {}).get("metrics") or {}
        records = []
        for shard in store.shards(folder):
            records += table_to_records(store.read_shard(folder, shard))
            if len(records) >= GROUND_TRUTH_SAMPLE:
                break
        made = (counters.get(RefineRelabeler.name) or {}).get("metrics") or {}
        summary = store.read_json(f"models/round{round_}/train_summary.json") or {}
        health = dict(summary.get("health") or {})
        health.pop("generations", None)
        thresholds = self.health()
        # scope (MODEL or a task) -> [(fold or None, failed check)]
        scopes: dict[str, list] = {}
        if folds:
            health["folds"] = []
            for i in range(folds):
                fold_health = (store.read_json(f"{fold_folder(f'models/round{round_}', i)}/train_summary.json") or {}).get("health")
                fold_failed = failures(fold_health, thresholds)
                health["folds"].append({"fold": i, "checked": bool((fold_health or {}).get("checked")),
                                        "images": (fold_health or {}).get("images", 0), "ok": not fold_failed,
                                        "failed": verdict(fold_health, thresholds),
                                        "dropped_tasks": sorted(s for s in fold_failed if s != MODEL),
                                        "model_failed": MODEL in fold_failed})
                for scope, checks in fold_failed.items():
                    scopes.setdefault(scope, []).extend((i, c) for c in checks)
        else:
            for scope, checks in failures(health, thresholds).items():
                scopes[scope] = [(None, c) for c in checks]
        failed = [f"fold {i}: {c}" if i is not None else c
                  for scope in sorted(scopes, key=lambda s: s == MODEL) for i, c in scopes[scope]]
        # fewer validation images than `min_images`: figures reported, no verdict
        health["checked"] = (all(f["checked"] and f["images"] >= thresholds.min_images for f in health["folds"])
                             if folds else bool(health.get("checked")) and health.get("images", 0) >= thresholds.min_images)
        health.update(ok=not failed, failed=failed, model_failed=MODEL in scopes,
                      dropped_tasks=sorted(s for s in scopes if s != MODEL), thresholds=thresholds.model_dump(),
                      validation=summary.get("validation"), best_step=summary.get("best_step"),
                      val_loss=summary.get("best_val_loss") or summary.get("val_loss"))
        messages = []
        for scope in sorted(scopes, key=lambda s: s != MODEL):  # the model-wide line first
            found = scopes[scope]
            models = sorted({i for i, _ in found if i is not None})
            whose = (f"fold model{'s' if len(models) > 1 else ''} {', '.join(map(str, models))}" if folds else "model")
            first = found[0][1]
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            whose_relabels = (("their folds'" if len(models) > 1 else "its fold's") if folds else "its")
            if scope == MODEL:
                messages.append(f"round {round_}: {whose} failed its health check ({first}{more}): {whose_relabels} "
                                "relabels are kept as dropped, reason round:unhealthy_model"
                                + ("" if folds else "; the round keeps the previous labels"))
            elif folds or MODEL not in scopes:
                messages.append(f"round {round_}: {whose} failed the {scope} health check ({first}{more}): "
                                f"{whose_relabels} {scope} relabels are kept as dropped, reason round:unhealthy_model; "
                                "the other tasks merge")
        if not health.get("checked") and not failed:
            images = (f"validation images per fold: {', '.join(str(f['images']) for f in health['folds'])}" if folds
                      else f"{health.get('images', 0)} validation images")
            messages.append(f"round {round_}: {'a fold ' if folds else ''}model not health-checked ({images}, "
                            f"health.min_images {thresholds.min_images}): its relabels were merged unchecked")
        health["messages"] = messages
        return {"health": health, "agreement": reduce_agreement([sums]),
                "ground_truth": coco_map(records[:GROUND_TRUTH_SAMPLE], round_),
                "relabel": {"images": int(made.get("images", 0)),
                            "images_with_output": int(made.get("images_with_output", 0)),
                            "added": {k: int(made.get(f"new_{k}", 0)) for k in ANNOTATION_KINDS}}}
