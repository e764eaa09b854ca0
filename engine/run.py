"""The driver of `fld run`: lock OUT, plan the input chunks, run ingest and each step as jobs on a
runner, resume, manifest. The driver never holds rows: it lists inputs (streamed) and reads commit
records; workers read, compute and commit shards.

Resume rules: a shard whose commit record carries the current configuration hash (engine.identity)
and names the current sha256 of its input shard is skipped; one written with another configuration
is an error that names the step (use --force or --from STEP), never silently mixed with new output;
one whose input shard changed since (inputs re-ingested, duplicates moved) is redone.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.config import ConfigError, Pipeline
from engine.counters import merge
from engine.execute import IMAGES, is_current, step_input_folder
from engine.progress import Progress
from engine.registry import stage_class
from engine.runners.base import StageRecipe, StepJob, TaskJob, get_runner
from engine.store import ShardStore, StoreError

log = logging.getLogger(__name__)


def health_messages(health: dict | None) -> list[str]:
    """A round's health warnings (refine.rounds: one line for a failed model, one per failed task; manifests
    written before per-task gating hold one `message`)."""
    health = health or {}
    return list(health.get("messages") or ([health["message"]] if health.get("message") else []))

INPUTS, QUARANTINE = "inputs", "quarantine"

ProgressFactory = Callable[[str, int, int], Progress]  # (job name, images, shards) -> Progress


class StaleOutputError(StoreError):
    pass


@dataclass
class RunSummary:
    out: str
    ingest: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)  # step -> {"shards_run": n, "shards_skipped": n, "counters": {...}}
    rounds: list = field(default_factory=list)
    seconds: float = 0.0


def aggregate_counters(store: ShardStore, folder: str) -> dict:
    """Counters of a folder, summed over all its committed shards (resumed ones too)."""
    total: dict = {}
    for rec in store.committed(folder).values():
        merge(total, rec.get("counters", {}))
    return total


def _index(shard: str) -> int:
    return int(shard.rsplit("-", 1)[1])


def _progress(factory: ProgressFactory | None, name: str, images: int, shards: int) -> Progress:
    return factory(name, images, shards) if factory else Progress()


def ingest(store: ShardStore, pipeline: Pipeline, src: str | None, runner, progress: ProgressFactory | None = None) -> dict:
    """inputs/ (the plan) -> images/ + quarantine/ on the runner's workers, then the cross-chunk
    duplicate pass. Chunks already ingested from the same inputs with the same settings are reused."""
    from engine.ingest.chunks import ingest_chunk, plan_chunks
    from engine.ingest.dedup import drop_cross_duplicates, find_cross_duplicates
    from engine.ingest.sources import iter_inputs, limited

    cfg = pipeline.config.ingest
    ihash = pipeline.ingest_hash
    if src is not None:
        items = (limited(item, cfg) for item in iter_inputs(src, cfg.source, image_root=cfg.image_root,
                                                              max_file_bytes=cfg.max_file_bytes,
                                                              allow_urls=cfg.allow_urls, limits=cfg))
        shards, _ = plan_chunks(store, items, cfg.shard_size, ihash)
    else:
        shards = store.shards(INPUTS)
        if not shards:
            if store.shards(IMAGES):
                return aggregate_counters(store, IMAGES)  # an OUT ingested before inputs/ existed
            raise ConfigError(f"{store.out} has no ingested images yet: give --input")
    inputs, images = store.committed(INPUTS), store.committed(IMAGES)
    other = [s for s in shards if s in images and images[s].get("config_hash") != ihash]
    if other:
        raise StaleOutputError(f"{store.out}/images ({other[0]}, ...) was ingested with other ingest settings; "
                               "use --force to re-ingest (or a new --out)")
    quarantine = store.committed(QUARANTINE)
    pending = [s for s in shards if not is_current(images.get(s), ihash, inputs[s]) or s not in quarantine]
    if pending:
        # a chunk ingested again can change which copy of an image comes first: redo the later chunks
        # whose copies the duplicate pass had moved to quarantine
        first = min(_index(s) for s in pending)
        pending += [s for s in shards if _index(s) > first and s not in pending and images[s].get("cross_duplicates")]
        pending.sort(key=_index)
        for s in pending:
            if s in images:
                log.warning("ingest: %s/images/%s was made from other inputs; ingesting it again", store.out, s)
    _remove_orphans(store, set(shards))
    if pending:
        rows = sum(int(inputs[s]["rows"]) for s in pending)
        runner.run_tasks(store, TaskJob("ingest", ingest_chunk, pending,
                                        (cfg.model_dump(), ihash, runner.name),
                                        workers=cfg.workers), _progress(progress, "ingest", rows, len(pending)))
        duplicates = find_cross_duplicates(store)
        if duplicates:
            runner.run_tasks(store, TaskJob("duplicates", drop_cross_duplicates, sorted(duplicates, key=_index),
                                            (duplicates,), workers=cfg.workers))
    return aggregate_counters(store, IMAGES)


def _remove_orphans(store: ShardStore, shards: set[str]) -> None:
    """Shards of chunks the input no longer has (it shrank) leave every folder."""
    for folder in [IMAGES, QUARANTINE] + store.annotation_folders():
        gone = [s for s in store.shards(folder) if s not in shards]
        if gone:
            store.uncommit(folder, gone)


def plan_step(store: ShardStore, name: str, recipes: list[StageRecipe], input_folder: str, output_folder: str,
              config_hash: str, hint: str, meta: dict | None = None) -> tuple[StepJob, list[str]]:
    """A step (or a round's step) as a job over its pending shards, and every input shard (for the summary).

    The one resume rule of the engine: a committed output shard is reused when its commit record
    has this configuration hash, the current sha256 of its input shard and the job's meta (e.g.
    the round's data hash); a shard of another configuration is an error (`hint` says what to do).
    """
    meta = dict(meta or {})
    inputs = store.committed(input_folder)
    outputs = store.committed(output_folder)
    stale = [s for s in inputs if s in outputs and outputs[s].get("config_hash") != config_hash]
    if stale:
        raise StaleOutputError(
            f"{name!r} in {store.out} was written with a different configuration "
            f"(shards {stale[:3]}{'...' if len(stale) > 3 else ''}); {hint}"
        )
    pending = [s for s in inputs if not is_current(outputs.get(s), config_hash, inputs[s], meta)]
    redo = [s for s in pending if s in outputs]
    if redo:
        log.warning("%s: %d shard(s) whose input changed since they were made are redone (%s...)", name, len(redo), redo[0])
    job = StepJob(name, recipes, input_folder, output_folder, pending, config_hash, {s: inputs[s] for s in pending}, meta)
    return job, list(inputs)


def step_job(store: ShardStore, pipeline: Pipeline, index: int) -> tuple[StepJob, list[str]]:
    step = pipeline.steps[index]
    recipes = [StageRecipe(stage_class(spec.stage), dict(spec.params), dict(pipeline.models)) for spec in step.stages]
    return plan_step(store, step.name, recipes, step_input_folder([s.name for s in pipeline.steps], index),
                     f"annotations/{step.name}", pipeline.step_hash(step.name),
                     f"rerun with --from {step.name} to redo it and the steps after it, or --force to redo everything")


def segments(pipeline: Pipeline, runner) -> list[list[int]]:
    """The steps as run segments (indices): consecutive steps chained into one execution on a runner
    that can (`run_segment`); a step marked `barrier: true` runs on its own. Other runners: one each."""
    if not hasattr(runner, "run_segment"):
        return [[i] for i in range(len(pipeline.steps))]
    out: list[list[int]] = []
    for i, step in enumerate(pipeline.steps):
        if step.barrier or not out or pipeline.steps[out[-1][-1]].barrier:
            out.append([i])
        else:
            out[-1].append(i)
    return out


def run_segment(store: ShardStore, pipeline: Pipeline, indices: list[int], runner,
                progress: ProgressFactory | None = None) -> dict[str, set[str]]:
    """Chain the steps of one segment on the runner; returns {step: shards it ran}. Each step is
    planned as a step-by-step run plans it (a stale step is refused the same way); a shard enters
    the chain at its first pending step (engine.runners.segment)."""
    from engine.runners.segment import Segment

    jobs = []
    for i in indices:
        job, inputs = step_job(store, pipeline, i)
        if jobs:  # a shard redone by an earlier step of the chain is redone here too: its input changes
            job.shards = sorted(set(job.shards) | {s for s in jobs[-1].shards}, key=_index)
            job.inputs = {s: job.inputs.get(s) or jobs[-1].inputs[s] for s in job.shards}
        jobs.append(job)
    segment = Segment.plan(jobs)
    if segment.start:
        name = segment.name
        runner.run_segment(store, segment, _progress(progress, name, sum(segment.rows(s) for s in segment.start),
                                                     len(segment.start)))
    return {job.name: {s for s, k in segment.start.items() if k <= j} for j, job in enumerate(segment.jobs)}


def run_rounds(store: ShardStore, pipeline: Pipeline, runner, progress: ProgressFactory | None = None) -> list[dict]:
    """Stage 3: each round is a training job, then a step (relabel -> filters -> merge) over every
    shard, on the runner, resumed and committed like any step. What a round does is stage 3's
    business (engine.registry.rounds_plan); the driver only runs it."""
    from engine import identity
    from engine.registry import rounds_plan

    plan = rounds_plan(pipeline)
    input_folder = f"annotations/{plan.source_step}"
    input_hash = pipeline.step_hash(plan.source_step)
    start_ref = plan.start_model()
    start = identity.model_identity(start_ref)
    start_in_store = False  # round 1 starts from a reference; later rounds as plan.next_start says
    results = []
    for k in range(1, pipeline.config.rounds + 1):
        folder, model_folder = f"annotations/round{k}", f"models/round{k}"
        h = identity.round_hash(input_hash, plan.identity(), start, k)
        data_hash = identity.digest({s: r["sha256"] for s, r in store.committed(input_folder).items()})
        trainings = plan.train_jobs(k, start_ref=start_ref, start_store=store if start_in_store else None,
                                    input_folder=input_folder, model_folder=model_folder, config_hash=h,
                                    data_hash=data_hash, folds=plan.folds(store, input_folder))
        marker = store.read_json(f"{model_folder}/round.json")
        if marker and (marker.get("config_hash"), marker.get("data_hash")) != (h, data_hash):
            if marker.get("config_hash") != h and store.shards(folder):
                raise StaleOutputError(f"round {k} in {store.out} was made with another configuration; "
                                       "rerun with --force to redo the rounds")
            log.warning("round %d: its training data changed since the model was trained; training again", k)
            for train in trainings:
                store.delete_tree(train.model_folder)
            marker = None
        t0 = time.perf_counter()
        done = {train.model_folder: train.build().finished(store, train) for train in trainings}
        if marker is None and done[model_folder] is not None:
            # a finished model this OUT did not train (seeded from another OUT, e.g. the benchmark's held-out
            # images): its images were not in its training, so it relabels every one of them, no folds
            trainings = trainings[-1:]
        if any(done[train.model_folder] is None for train in trainings):
            store.write_json(f"{model_folder}/round.json", {"round": k, "config_hash": h, "data_hash": data_hash})
        for train in trainings:  # fold models first, the round's model last; a finished one is not trained again
            if done[train.model_folder] is None:
                done[train.model_folder] = runner.run_train(store, train, _progress(progress, train.name, 0, 0))
        summary, folds = done[model_folder], len(trainings) - 1
        model_ref = store.url(model_folder)
        # the stages name the model by its OUT-relative folder (portable provenance); workers copy it from the store
        recipes = [StageRecipe(c, p, dict(pipeline.models)) for c, p in plan.stages(k, model_folder, store, folds)]
        job, _ = plan_step(store, f"round{k}", recipes, input_folder, folder, h,
                           "rerun with --force to redo the rounds", {"round": k, "data_hash": data_hash})
        if job.shards:
            runner.run_step(store, job, _progress(progress, f"round{k}", sum(job.rows(s) for s in job.shards), len(job.shards)))
        counters = aggregate_counters(store, folder)
        metrics = {"round": k, "round_hash": h, "model_dir": model_ref,
                   "train": {key: summary.get(key) for key in ("steps", "first_loss", "last_loss", "loss_by_task",
                                                               "samples_per_s", "examples")},
                   "cross_fit": {"folds": folds, "fold_models": [t.model_folder for t in trainings[:-1]]},
                   **plan.metrics(store, folder, k, counters, folds), "seconds": round(time.perf_counter() - t0, 2)}
        for line in health_messages(metrics.get("health")):  # stage 3: a line per task (or model) that did not prove itself
            log.warning("%s", line)
        if not any((metrics.get("relabel") or {}).get("added", {}).values()):
            log.warning("round %d: the model of this round produced no parseable annotation on any of the %s images "
                        "(undertrained?): round %d holds only round %d's annotations", k,
                        (metrics.get("relabel") or {}).get("images", "?"), k, k - 1)
            metrics["empty"] = True
        store.update_manifest(rounds={str(k): metrics}, folder_order=[folder], counters={f"round{k}": counters})
        results.append(metrics)
        input_folder, input_hash = folder, h
        start_ref, start, start_in_store = plan.next_start(model_folder, h, start_ref, start)
    return results


def check_out_outside_input(store: ShardStore, src: str | None) -> None:
    """A local OUT inside a local input folder is refused: ingest would list OUT's own files (its
    shards, an export written next to them) as inputs of the next run."""
    from engine.ingest.locations import InputError, is_url

    if not store.local or not isinstance(src, str) or is_url(src) or not os.path.isdir(src):
        return
    root, folder = Path(store.root).resolve(), Path(src).resolve()
    if root == folder or folder in root.parents:
        raise InputError(f"OUT {store.out} is inside the input folder {src}: its own files would become inputs; "
                         "put OUT outside the input folder")


def run_pipeline(
    pipeline: Pipeline,
    src: str | None,
    out: "str | ShardStore",
    runner: str = "local",
    force: bool = False,
    from_step: str | None = None,
    runner_options: dict | None = None,
    progress: ProgressFactory | None = None,
) -> RunSummary:
    """Run ingest + every step (+ refinement rounds) into OUT; safe to rerun after a kill."""
    t0 = time.perf_counter()
    store = ShardStore.of(out)
    step_names = [s.name for s in pipeline.steps]
    if from_step is not None and from_step not in step_names:
        raise ConfigError(f"--from {from_step!r}: pipeline {pipeline.name!r} has steps {step_names}")
    check_out_outside_input(store, src if src is not None else store.read_manifest().get("pipeline", {}).get("input"))
    engine_runner = get_runner(runner, **(runner_options or {}))
    summary = RunSummary(out=str(store.out))
    with store.lock(f"fld run {pipeline.name}"):
        if force:
            for folder in [INPUTS, IMAGES, QUARANTINE] + store.annotation_folders():
                store.uncommit(folder)
            store.delete_tree("models")
        recorded = store.read_manifest().get("pipeline", {}).get("input")
        store.update_manifest(
            pipeline={"name": pipeline.name, "file": pipeline.origin, "profile": pipeline.profile,
                      "input": src if src is not None else recorded,
                      # what `fld show` names in its header (models) and marks on its plots (filter thresholds)
                      "models": pipeline.models, "config": pipeline.config.model_dump(mode="json")},
            folder_order=[f"annotations/{s}" for s in step_names],
        )
        summary.ingest = ingest(store, pipeline, src, engine_runner, progress)
        store.update_manifest(ingest=summary.ingest)
        from_index = step_names.index(from_step) if from_step else None
        if from_index is not None:
            for step in pipeline.steps[from_index:]:
                store.uncommit(f"annotations/{step.name}")
            # the rounds come after every step: redoing a step redoes them (they trained on its output)
            for folder in store.annotation_folders():
                if folder.startswith("annotations/round") and folder[len("annotations/round"):].isdigit():
                    store.uncommit(folder)
            store.delete_tree("models")
        for segment in segments(pipeline, engine_runner):
            ran = run_segment(store, pipeline, segment, engine_runner, progress) if len(segment) > 1 else {}
            for i in segment:  # step by step: all of a step when not chained, else what the chain left
                step = pipeline.steps[i]
                folder = f"annotations/{step.name}"
                job, all_inputs = step_job(store, pipeline, i)
                if job.shards:
                    if step.name in ran and any(job.rows(s) for s in job.shards):
                        log.warning("%s: %d shard(s) the chained segment did not commit run step by step",
                                    step.name, len(job.shards))
                    images = sum(job.rows(s) for s in job.shards)
                    engine_runner.run_step(store, job, _progress(progress, step.name, images, len(job.shards)))
                shards_run = len(set(job.shards) | ran.get(step.name, set()))
                summary.steps[step.name] = {
                    "shards_run": shards_run,
                    "shards_skipped": len(all_inputs) - shards_run,
                    "counters": aggregate_counters(store, folder),
                }
                store.update_manifest(counters={step.name: summary.steps[step.name]["counters"]})
        if pipeline.config.rounds:
            summary.rounds = run_rounds(store, pipeline, engine_runner, progress)
        summary.seconds = round(time.perf_counter() - t0, 2)
        store.update_manifest(ingest=summary.ingest, last_run={"runner": runner, "seconds": summary.seconds,
                                                               "inputs": summary.ingest.get("inputs")})
    return summary
