"""The driver of `fld run`: lock OUT, ingest, run each step on a runner, resume, manifest.

Resume rules: a shard whose commit record carries the current config hash is skipped; one
written with another config is an error that names the step (use --force or --from STEP),
never silently mixed with new output.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable

from engine.config import ConfigError, Pipeline
from engine.counters import merge
from engine.execute import step_input_folder
from engine.runners.base import StepJob, get_runner
from engine.store import ShardStore, StoreError, shard_name


class StaleOutputError(StoreError):
    pass


@dataclass
class RunSummary:
    out: str
    ingest: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)  # step -> {"shards_run": n, "shards_skipped": n, "counters": {...}}
    rounds: list = field(default_factory=list)
    seconds: float = 0.0


def _inputs_hash(uris: list[str]) -> str:
    return hashlib.sha256(json.dumps(uris).encode()).hexdigest()[:16]


def ingest(store: ShardStore, pipeline: Pipeline, src: str | None, progress: Callable | None = None) -> dict:
    """images/ + quarantine/ shards from the input; committed shards are reused (resume)."""
    from engine.ingest.decode import ingest_shard
    from engine.ingest.sources import list_inputs

    cfg = pipeline.config.ingest
    if src is None:
        if store.shards("images"):
            return aggregate_counters(store, "images")
        raise ConfigError(f"{store.out} has no ingested images yet: give --input")
    items = list_inputs(src, cfg.source, image_root=cfg.image_root)
    chunks = [items[i : i + cfg.shard_size] for i in range(0, len(items), cfg.shard_size)]
    seen: set[str] = set()
    committed = store.committed("images")
    quarantined = store.committed("quarantine")  # a chunk is done when both of its shards are intact
    for k, chunk in enumerate(chunks):
        shard = shard_name(k)
        ihash = _inputs_hash([it.uri for it in chunk])
        rec = committed.get(shard) if shard in quarantined else None
        if rec is not None:
            if rec.get("config_hash") != pipeline.ingest_hash or rec.get("inputs_hash") != ihash:
                raise StaleOutputError(
                    f"{store.out}/images/{shard} was ingested from other inputs or ingest settings; "
                    "use --force to re-ingest (or a new --out)"
                )
            seen.update(store.read_shard("images", shard, columns=["image_id"]).column("image_id").to_pylist())
            if progress:
                progress(shard, len(chunk), skipped=True)
            continue
        t0 = time.perf_counter()
        images, quarantine, counters = ingest_shard(chunk, cfg.min_side, cfg.max_pixels, seen, workers=cfg.workers)
        meta = {"config_hash": pipeline.ingest_hash, "inputs_hash": ihash, "runner": "driver"}
        store.write_shard("quarantine", shard, quarantine, meta)
        store.write_shard("images", shard, images, {**meta, "counters": counters, "seconds": round(time.perf_counter() - t0, 3)})
        if progress:
            progress(shard, len(chunk), skipped=False)
    return aggregate_counters(store, "images")


def aggregate_counters(store: ShardStore, folder: str) -> dict:
    """Per-stage counters of a folder, summed over all its committed shards (resumed ones too)."""
    total: dict = {}
    for rec in store.committed(folder).values():
        merge(total, rec.get("counters", {}))
    return total


def run_pipeline(
    pipeline: Pipeline,
    src: str | None,
    out: "str | ShardStore",
    runner: str = "local",
    force: bool = False,
    from_step: str | None = None,
    runner_options: dict | None = None,
    progress_factory: Callable[[str, int], Callable] | None = None,
) -> RunSummary:
    """Run ingest + every step (+ refinement rounds) into OUT; safe to rerun after a kill."""
    t0 = time.perf_counter()
    store = ShardStore.of(out)
    step_names = [s.name for s in pipeline.steps]
    if from_step is not None and from_step not in step_names:
        raise ConfigError(f"--from {from_step!r}: pipeline {pipeline.name!r} has steps {step_names}")
    summary = RunSummary(out=str(store.out))
    with store.lock(f"fld run {pipeline.name}"):
        if force:
            for folder in ["images", "quarantine"] + [f"annotations/{s}" for s in step_names]:
                store.uncommit(folder)
        store.update_manifest(
            pipeline={"name": pipeline.name, "file": pipeline.origin, "profile": pipeline.profile,
                      "input": src if src is not None else store.read_manifest().get("pipeline", {}).get("input")},
            folder_order=[f"annotations/{s}" for s in step_names],
        )
        if src is None and (not store.shards("images") or store.damaged("images") or store.damaged("quarantine")):
            src = store.read_manifest()["pipeline"].get("input")  # resume a run that died during ingest / redo damage
        pf = progress_factory("ingest", 0) if progress_factory else None
        summary.ingest = ingest(store, pipeline, src, pf)
        from_index = step_names.index(from_step) if from_step else None
        engine_runner = get_runner(runner, **(runner_options or {}))
        for i, step in enumerate(pipeline.steps):
            folder = f"annotations/{step.name}"
            if from_index is not None and i >= from_index:
                store.uncommit(folder)
            h = pipeline.step_hash(step.name)
            inputs = store.shards(step_input_folder(step_names, i))
            hashes = {s: rec.get("config_hash") for s, rec in store.committed(folder).items()}
            stale = [s for s in inputs if s in hashes and hashes[s] != h]
            if stale:
                raise StaleOutputError(
                    f"step {step.name!r} in {out} was written with a different configuration "
                    f"(shards {stale[:3]}{'...' if len(stale) > 3 else ''}); rerun with --from {step.name} "
                    "to redo it and the steps after it, or --force to redo everything"
                )
            pending = [s for s in inputs if hashes.get(s) != h]
            if pending:
                job = StepJob(pipeline, i, pending, h)
                pf = progress_factory(step.name, len(pending)) if progress_factory else None
                engine_runner.run_step(store, job, pf)
            summary.steps[step.name] = {
                "shards_run": len(pending),
                "shards_skipped": len(inputs) - len(pending),
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
