"""The trainer contract: what a refinement round's training implements (stage 3 plugs in here).

A trainer is built like a stage, from its class, params and the pipeline's model aliases, and
never imports an engine. `fit(store, job, world)` trains on the annotation shards of
`job.input_folder` (joined with images/ by shard index), reading only the shards `world`
assigns to this worker, and writes the model folder `job.model_folder` in OUT; a runner decides
where it runs: in the driver's process (local, Beam), or as N workers of a distributed job
(Ray Train, engine.runners.ray_train), each one a `World` with its rank. A trainer resumes from
its own checkpoints and must be exactly resumable.
"""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Callable, ClassVar

from pydantic import ConfigDict

from engine.values import BoundedModel


@dataclass
class World:
    """Where one training worker stands: its rank among `size` workers and how to reach the others."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"
    wrap: Callable[[Any], Any] | None = None  # e.g. DistributedDataParallel around the model
    report: Callable[[dict], None] | None = None  # progress entries to the engine (Ray Train's report)
    gather: Callable[[Any], list] | None = None  # every worker's object, on every worker (None: one worker)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list:
        return self.gather(obj) if self.gather is not None else [obj]

    def shards(self, shards: list[str]) -> list[str]:
        """This worker's part of a list of shards (round-robin, so every worker gets a fair share)."""
        return shards[self.rank :: self.size]


class TrainerParams(BoundedModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Trainer:
    """Base class of trainers (refine.trainer.Florence2Trainer is the one stage 3 uses)."""

    name: ClassVar[str] = "trainer"
    Params: ClassVar[type[TrainerParams]] = TrainerParams

    def __init__(self, params: TrainerParams | dict | None = None, models: dict[str, str] | None = None):
        self.params = params if isinstance(params, TrainerParams) else self.Params(**(params or {}))
        self.models = dict(models or {})

    def finished(self, store, job) -> dict | None:
        """The summary of a completed training of this job (None: it must run or resume)."""
        raise NotImplementedError

    def fit(self, store, job, world: World) -> dict:
        """Train (or resume) on job.input_folder; the main worker writes job.model_folder."""
        raise NotImplementedError


@dataclass
class TrainJob:
    """One training: a trainer over the annotation shards of `input_folder`, into `model_folder`."""

    name: str
    trainer_cls: type
    params: dict
    models: dict
    input_folder: str
    model_folder: str  # OUT-relative, e.g. models/round1
    config_hash: str
    num_workers: int = 1
    _: KW_ONLY  # the rest by name (refine.rounds.FlorenceRounds.train_jobs builds every job by name)
    gpus_per_worker: float = 0.0
    meta: dict = field(default_factory=dict)
    cpus_per_worker: float = 1.0  # torch threads of each worker: the same on every runner, so the same weights

    def build(self) -> Trainer:
        return self.trainer_cls(dict(self.params), models=dict(self.models))


def train_in_process(store, job: TrainJob) -> dict:
    """One training worker in this process (local and Beam runners)."""
    import logging

    from engine.execute import limit_threads
    from engine.stage import pick_device

    limit_threads(job.cpus_per_worker)
    if job.num_workers > 1:
        logging.getLogger(__name__).warning(
            "%s: num_workers=%d needs --runner ray (Ray Train); this runner trains with one worker", job.name, job.num_workers)
    return job.build().fit(store, job, World(device=pick_device()))
