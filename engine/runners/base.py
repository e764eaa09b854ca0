"""What a runner is: something that executes jobs over shards, where the workers commit the shards.

The driver (engine.run) lists inputs, decides what is pending (resume), locks OUT and keeps the
manifest; a runner turns a job into committed shards. Two kinds of job:

- `StepJob`: stages (annotators, filters, relabel, merge) over each pending shard of an input
  folder, written to an output folder. Every runner executes a shard's stages in the same batches
  (engine.execute.run_stage), so every runner writes the same files.
- `TaskJob`: a plain function per shard (ingest of an input chunk, the duplicate rewrite): no
  model, one call per shard on any worker, the function commits what it writes itself.

Rows never travel back to the driver: a runner reports per-shard summaries (rows, counters) only.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from engine.identity import digest
from engine.stage import Stage


@dataclass(frozen=True)
class StageRecipe:
    """How a worker rebuilds a stage: class, params as written in the pipeline, model aliases.

    The class travels by (cloud)pickle, so a stage needs no registry lookup on workers.
    """

    cls: type
    params: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Which built stage a worker may reuse (engine.identity.digest, like every hash of the engine)."""
        return digest([self.cls.__module__, self.cls.__qualname__, self.params, self.models])

    def build(self) -> Stage:
        return self.cls(dict(self.params), models=dict(self.models))


@dataclass
class StepJob:
    """Stages over the pending shards of `input_folder`, committed to `output_folder`.

    input_folder "images" means: start from the image records of images/part-k (plus the imported
    human annotations). `inputs` holds the commit record of every pending input shard: its row
    count tells a writer that a shard is complete, its sha256 goes into the output's commit record
    so a shard whose input changed is redone.
    """

    name: str
    recipes: list[StageRecipe]
    input_folder: str
    output_folder: str
    shards: list[str]
    config_hash: str
    inputs: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # extra fields for every commit record (e.g. round)

    def build_stages(self) -> list[Stage]:
        return [r.build() for r in self.recipes]

    def rows(self, shard: str) -> int:
        return int(self.inputs[shard]["rows"])


def finished_records(store, job: StepJob, runner: str) -> dict[str, dict]:
    """After a step job: the commit record of each of its shards, read in O(1) store round trips
    (one listing of the output folder and of its _committed/, one batched fetch of the records,
    one batched footer read where no ETag vouches: ShardStore.committed), never a request per
    shard. A shard left uncommitted, or committed with another configuration, is an error."""
    with store.snapshot():  # each listing once
        committed = store.committed(job.output_folder)
    left = [s for s in job.shards if committed.get(s, {}).get("config_hash") != job.config_hash]
    if left:
        raise RuntimeError(f"{runner}: step {job.name!r} finished without committing "
                           f"{job.output_folder}/{left[0]}" + (f" and {len(left) - 1} more shard(s)" if len(left) > 1 else ""))
    return {s: committed[s] for s in job.shards}


@dataclass
class TaskJob:
    """`fn(store, shard, *args) -> summary dict` once per shard; fn commits what it writes.

    `fn` must be a module-level function (it is pickled to workers). `cpus` per call.
    """

    name: str
    fn: Callable[..., dict]
    shards: list[str]
    args: tuple = ()
    workers: int = 1  # local: processes; Ray: tasks in flight at most (0: as many as the cluster runs)
    cpus: float = 1.0


class Runner(Protocol):
    name: str

    def run_step(self, store, job: StepJob, progress=None) -> dict:
        """Commit every pending shard of the job; return per-stage counters summed over shards."""
        ...

    def run_tasks(self, store, job: TaskJob, progress=None) -> dict[str, dict]:
        """Run job.fn on every shard; return {shard: summary}."""
        ...

    def run_train(self, store, job, progress=None) -> dict:
        """Run a training job (engine.training.TrainJob); return the trainer's summary."""
        ...


# name -> module:class, imported only when that runner is asked for (ray / apache_beam are optional extras)
RUNNER_CLASSES = {
    "local": "engine.runners.local:LocalRunner",
    "ray": "engine.runners.ray_runner:RayRunner",
    "beam": "engine.runners.beam_runner:BeamRunner",
}
RUNNERS = tuple(RUNNER_CLASSES)


def get_runner(name: str, **options: Any) -> Runner:
    if name not in RUNNER_CLASSES:
        raise ValueError(f"unknown runner {name!r}: use one of {', '.join(RUNNERS)}")
    module, _, cls = RUNNER_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(**options)
