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
import time
from dataclasses import dataclass, field
from typing import Callable

from engine.config import ConfigError, Pipeline
from engine.counters import merge
from engine.execute import IMAGES, is_current, step_input_folder
from engine.progress import Progress
from engine.registry import stage_class
from engine.runners.base import StageRecipe, StepJob, TaskJob, get_runner
from engine.store import ShardStore, StoreError

log = logging.getLogger(__name__)

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
    from engine.ingest.sources import iter_inputs

    cfg = pipeline.config.ingest
    ihash = pipeline.ingest_hash
    if src is not None:
        shards, _ = plan_chunks(store, iter_inputs(src, cfg.source, image_root=cfg.image_root), cfg.shard_size, ihash)
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


def step_job(store: ShardStore, pipeline: Pipeline, index: int) -> tuple[StepJob, list[str]]:
    """Step `index` as a job over its pending shards (and every input shard, for the summary)."""
    step = pipeline.steps[index]
    folder = f"annotations/{step.name}"
    h = pipeline.step_hash(step.name)
    input_folder = step_input_folder([s.name for s in pipeline.steps], index)
    inputs = store.committed(input_folder)
    outputs = store.committed(folder)
    stale = [s for s in inputs if s in outputs and outputs[s].get("config_hash") != h]
    if stale:
        raise StaleOutputError(
            f"step {step.name!r} in {store.out} was written with a different configuration "
            f"(shards {stale[:3]}{'...' if len(stale) > 3 else ''}); rerun with --from {step.name} "
            "to redo it and the steps after it, or --force to redo everything"
        )
    pending = [s for s in inputs if not is_current(outputs.get(s), h, inputs[s])]
    redo = [s for s in pending if s in outputs]
    if redo:
        log.warning("step %s: %d shard(s) whose input changed since they were made are redone (%s...)",
                    step.name, len(redo), redo[0])
    recipes = [StageRecipe(stage_class(spec.stage), dict(spec.params), dict(pipeline.models)) for spec in step.stages]
    job = StepJob(step.name, recipes, input_folder, folder, pending, h, {s: inputs[s] for s in pending})
    return job, list(inputs)


def run_pipeline(
    pipeline: Pipeline,
    src: str | None,
    out: str,
    runner: str = "local",
    force: bool = False,
    from_step: str | None = None,
    runner_options: dict | None = None,
    progress: ProgressFactory | None = None,
) -> RunSummary:
    """Run ingest + every step (+ refinement rounds) into OUT; safe to rerun after a kill."""
    t0 = time.perf_counter()
    store = ShardStore(out)
    step_names = [s.name for s in pipeline.steps]
    if from_step is not None and from_step not in step_names:
        raise ConfigError(f"--from {from_step!r}: pipeline {pipeline.name!r} has steps {step_names}")
    engine_runner = get_runner(runner, **(runner_options or {}))
    summary = RunSummary(out=str(out))
    with store.lock(f"fld run {pipeline.name}"):
        if force:
            for folder in [INPUTS, IMAGES, QUARANTINE] + [f"annotations/{s}" for s in step_names]:
                store.uncommit(folder)
        recorded = store.read_manifest().get("pipeline", {}).get("input")
        store.update_manifest(
            pipeline={"name": pipeline.name, "file": pipeline.origin, "profile": pipeline.profile,
                      "input": src if src is not None else recorded},
            folder_order=[f"annotations/{s}" for s in step_names],
        )
        summary.ingest = ingest(store, pipeline, src, engine_runner, progress)
        store.update_manifest(ingest=summary.ingest)
        from_index = step_names.index(from_step) if from_step else None
        for i, step in enumerate(pipeline.steps):
            folder = f"annotations/{step.name}"
            if from_index is not None and i >= from_index:
                store.uncommit(folder)
            job, all_inputs = step_job(store, pipeline, i)
            if job.shards:
                images = sum(job.rows(s) for s in job.shards)
                engine_runner.run_step(store, job, _progress(progress, step.name, images, len(job.shards)))
            summary.steps[step.name] = {
                "shards_run": len(job.shards),
                "shards_skipped": len(all_inputs) - len(job.shards),
                "counters": aggregate_counters(store, folder),
            }
            store.update_manifest(counters={step.name: summary.steps[step.name]["counters"]})
        if pipeline.config.rounds:
            from refine.loop import run_rounds

            summary.rounds = run_rounds(store, pipeline, runner=engine_runner, force=force)
        summary.seconds = round(time.perf_counter() - t0, 2)
        store.update_manifest(ingest=summary.ingest, last_run={"runner": runner, "seconds": summary.seconds,
                                                               "inputs": summary.ingest.get("inputs")})
    return summary
