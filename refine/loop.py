"""Stage 3: `rounds: N` iterations of train -> relabel -> filter -> merge (P §4, phase C).

Round k reads the kept annotations of `annotations/<last step>` (k = 1) or
`annotations/round<k-1>`, trains Florence-2 from the previous round's checkpoint (round 1: the
`refine.model` reference) into `OUT/models/round<k>/`, relabels every image with it, runs the
pipeline's stage-2 filter stages on the new annotations, merges them with round k-1
(refine.merge policy) and commits `annotations/round<k>/part-*.parquet`, one shard per input
shard. Metrics (train loss, agreement with round k-1, mAP against `human` ground truth) go to
manifest.json under `rounds` (`refine.metrics.round_metrics(out)`; `fld stats` prints them).

Resume: training resumes from its last checkpoint; a shard already committed with the same
round hash is skipped; a round whose shards were written with another configuration is an
error that asks for --force (never a silent mix).

pipelines.yaml:
    rounds: 1
    refine:
      model: florence2            # alias of models: or a reference; round 1 starts from it
      train: {steps: 1000, batch_size: 8, lr: 1.0e-5, ...}   # refine.trainer.TrainConfig
      relabel: {tasks: [caption, od, ...], batch_size: 4, max_new_tokens: 1024, num_beams: 3}
      merge: {nms_iou: 0.7, agreement_weight: 0.5}
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from annotators.florence2 import TASK_TOKENS, TaskName
from engine.config import ConfigError, Pipeline, _yaml_path
from engine.registry import stage_class
from engine.stage import PIXELS_COLUMN, Stage, records_to_table, table_to_records
from refine.merge import MergePolicy, merge_records
from refine.metrics import agreement_sums, coco_map, reduce_agreement
from refine.task_codec import ALL_TASKS, TaskCodec
from refine.trainer import TrainConfig, finished, train


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RelabelSettings(_Strict):
    tasks: list[TaskName] = Field(default_factory=lambda: list(TASK_TOKENS), min_length=1,
                                  description="florence2-stage task names the new model annotates")
    batch_size: int = Field(4, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    num_beams: int = Field(3, ge=1)
    no_repeat_ngram_size: int = Field(3, ge=0)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None


class MergeSettings(_Strict):
    nms_iou: float = Field(0.7, gt=0, le=1)
    agreement_weight: float = Field(0.5, ge=0, le=1)


class RefineConfig(_Strict):
    """The `refine:` block of a pipeline."""

    model: str = Field("florence2", description="round 1 starts from this reference or models: alias")
    from_step: str | None = Field(None, description="step whose annotations round 1 trains on (default: the last)")
    train_tasks: list[str] = Field(default_factory=lambda: list(ALL_TASKS), min_length=1)
    max_target_tokens: int = Field(1024, ge=8)
    max_region_examples: int = Field(8, ge=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    relabel: RelabelSettings = Field(default_factory=RelabelSettings)
    merge: MergeSettings = Field(default_factory=MergeSettings)
    filters: list[str] | None = Field(None, description="filter stages to rerun (default: every filters.* stage of the steps)")

    @field_validator("train_tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        TaskCodec(v)  # the codec's own check: a ValueError naming the unknown task(s)
        return v

    @field_validator("train")
    @classmethod
    def _one_target_limit(cls, v: TrainConfig) -> TrainConfig:
        """The target limit sizes the codec's examples and the trainer's labels alike: one setting,
        `refine.max_target_tokens`, rather than a train value the loop would silently overwrite."""
        if "max_target_tokens" in v.model_fields_set:
            raise ValueError("set refine.max_target_tokens (it sizes the training targets), not refine.train.max_target_tokens")
        return v


class StaleRoundError(ConfigError):
    pass


def parse_refine_config(pipeline: Pipeline) -> RefineConfig:
    """Validate `pipelines.<name>.refine`; errors name the file and the YAML path."""
    where = f"{pipeline.origin}: pipelines.{pipeline.name}.refine"
    try:
        cfg = RefineConfig(**pipeline.config.refine)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"{where}.{_yaml_path(err['loc'])}: {err['msg']}") from None
    steps = [s.name for s in pipeline.steps]
    if cfg.from_step is not None and cfg.from_step not in steps:
        raise ConfigError(f"{where}.from_step: {cfg.from_step!r} is not a step of the pipeline; steps: {steps}")
    if cfg.filters is not None:
        names = {s.stage for step in pipeline.steps for s in step.stages}
        missing = [f for f in cfg.filters if f not in names]
        if missing:
            raise ConfigError(f"{where}.filters: {missing} are not stages of the pipeline's steps")
    return cfg


def filter_stages(pipeline: Pipeline, cfg: RefineConfig) -> list[Stage]:
    """The pipeline's stage-2 stages (module filters.*), in step order, each once."""
    out, seen = [], set()
    for step in pipeline.steps:
        for spec in step.stages:
            cls = stage_class(spec.stage)
            chosen = spec.stage in cfg.filters if cfg.filters is not None else cls.__module__.startswith("filters.")
            if chosen and spec.stage not in seen:
                seen.add(spec.stage)
                out.append(cls(spec.params, models=pipeline.models))
    return out


def round_hash(pipeline: Pipeline, cfg: RefineConfig, source_step: str, k: int) -> str:
    payload = {"source": pipeline.step_hash(source_step), "refine": cfg.model_dump(mode="json"), "round": k,
               "models": pipeline.models}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _relabeler(cfg: RefineConfig, model_dir: Path):
    from refine.relabel import RefineRelabeler

    r = cfg.relabel
    return RefineRelabeler({"model": str(model_dir), "tasks": r.tasks, "batch_size": r.batch_size,
                            "max_new_tokens": r.max_new_tokens, "num_beams": r.num_beams,
                            "no_repeat_ngram_size": r.no_repeat_ngram_size, "dtype": r.dtype})


def refine_shard(records, images, relabeler, filters: list[Stage], policy: MergePolicy, k: int, name: str):
    """One shard of round k: (merged table ready to commit, agreement sums, stage counters)."""
    from engine.execute import attach_images, finalize, run_stage
    from refine.relabel import relabel_table

    counters: dict = {}
    new = relabel_table(relabeler, attach_images(records, images), k)
    for f in filters:
        if f.needs_images and PIXELS_COLUMN not in new.column_names:
            new = attach_images(new, images)
        new = run_stage(f, new, counters)
    old_recs, new_recs = table_to_records(records), table_to_records(new)
    sums = agreement_sums(old_recs, new_recs)
    merged = merge_records(old_recs, new_recs, policy)
    return finalize(records_to_table(merged), name), sums, counters


def _round_records(store, folder: str) -> list[dict]:
    return [r for shard in store.shards(folder) for r in table_to_records(store.read_shard(folder, shard))]


def run_rounds(store, pipeline: Pipeline, runner: Any = None, force: bool = False, rounds: int | None = None,
               progress: Callable[[str], None] | None = None) -> list[dict]:
    """Run (or resume) the pipeline's refinement rounds; returns each round's metrics.

    `runner` is accepted for the driver's signature: relabelling runs in this process, shard by
    shard; training is distributed by Ray Train when `refine.train.num_workers > 1`.
    """
    from engine.store import ShardStore

    store = store if isinstance(store, ShardStore) else ShardStore(store)
    cfg = parse_refine_config(pipeline)
    n_rounds = pipeline.config.rounds if rounds is None else rounds
    steps = [s.name for s in pipeline.steps]
    source_step = cfg.from_step or steps[-1]
    prev_folder = f"annotations/{source_step}"
    policy = MergePolicy(cfg.merge.nms_iou, cfg.merge.agreement_weight)
    say = progress or (lambda msg: None)
    results = []
    for k in range(1, n_rounds + 1):
        folder, model_dir = f"annotations/round{k}", store.out / "models" / f"round{k}"
        h = round_hash(pipeline, cfg, source_step, k)
        if force:
            store.uncommit(folder)
            shutil.rmtree(model_dir, ignore_errors=True)
        inputs = store.shards(prev_folder)
        if not inputs:
            raise ConfigError(f"round {k}: {store.out / prev_folder} has no committed shards to refine")
        stale = [s for s in inputs if store.is_committed(folder, s) and not store.is_committed(folder, s, h)]
        marker = model_dir / "round.json"
        if stale or (marker.exists() and json.loads(marker.read_text()).get("round_hash") != h):
            raise StaleRoundError(
                f"round {k} in {store.out} was made with another configuration (shards {stale[:3]} / {marker}); "
                "rerun with --force to redo the rounds"
            )
        pending = [s for s in inputs if not store.is_committed(folder, s, h)]
        done_metrics = (store.read_manifest().get("rounds") or {}).get(str(k))
        if not pending and done_metrics and done_metrics.get("round_hash") == h:
            results.append(done_metrics)
            prev_folder = folder
            continue
        t0 = time.perf_counter()
        model_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"round": k, "round_hash": h}))
        summary = finished(model_dir, cfg.train.steps)
        if summary is None:
            from refine.dataset import examples_from_store

            codec = TaskCodec(cfg.train_tasks, cfg.max_target_tokens, cfg.max_region_examples)
            data = examples_from_store(store.out, prev_folder, codec)
            start = pipeline.models.get(cfg.model, cfg.model) if k == 1 else str(store.out / "models" / f"round{k - 1}")
            say(f"round {k}: training on {len(data)} examples {data.counts()} from {start}")
            train(start, data, model_dir, cfg.train.model_copy(update={"max_target_tokens": cfg.max_target_tokens}))
            summary = finished(model_dir, cfg.train.steps)
        relabeler = _relabeler(cfg, model_dir) if pending else None
        filters = filter_stages(pipeline, cfg) if pending else []
        for shard in pending:
            say(f"round {k}: relabel + filter + merge {shard}")
            records = store.read_shard(prev_folder, shard)
            images = store.read_shard("images", shard, columns=["image_id", "bytes"])
            t1 = time.perf_counter()
            table, sums, counters = refine_shard(records, images, relabeler, filters, policy, k, f"{folder}/{shard}")
            store.write_shard(folder, shard, table, {"config_hash": h, "round": k, "agreement": sums,
                                                      "counters": counters, "seconds": round(time.perf_counter() - t1, 3)})
        commits = store.committed(folder)
        metrics = {
            "round": k,
            "round_hash": h,
            "model_dir": str(model_dir),
            "train": {key: summary.get(key) for key in ("steps", "first_loss", "last_loss", "loss_by_task",
                                                        "samples_per_s", "examples")},
            "agreement": reduce_agreement(c.get("agreement", {}) for c in commits.values()),
            "ground_truth": coco_map(_round_records(store, folder), k),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        store.update_manifest(rounds={str(k): metrics}, folder_order=[folder])
        results.append(metrics)
        prev_folder = folder
    return results
