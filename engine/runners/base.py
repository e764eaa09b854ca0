"""What a runner is: something that executes one pipeline step over a list of shards.

The driver (engine.run) does ingest, resume decisions, locking and the manifest; a runner
only turns (step, pending shards) into committed shards under annotations/<step>/.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from engine.config import Pipeline
from engine.store import ShardStore


@dataclass
class StepJob:
    """One step to run: where it reads, where it writes, which shards are pending."""

    pipeline: Pipeline
    step_index: int
    shards: list[str]
    config_hash: str
    options: dict = field(default_factory=dict)

    @property
    def step(self):
        return self.pipeline.steps[self.step_index]

    @property
    def input_folder(self) -> str:
        from engine.execute import step_input_folder

        return step_input_folder([s.name for s in self.pipeline.steps], self.step_index)

    @property
    def output_folder(self) -> str:
        return f"annotations/{self.step.name}"


class Runner(Protocol):
    name: str

    def run_step(self, store: ShardStore, job: StepJob, progress=None) -> dict:
        """Commit every pending shard of the job; return per-stage counters summed over shards."""
        ...


RUNNERS = ("local", "ray", "beam")


def get_runner(name: str, **options) -> Runner:
    if name == "local":
        from engine.runners.local import LocalRunner

        return LocalRunner(**options)
    if name == "ray":
        from engine.runners.ray_runner import RayRunner

        return RayRunner(**options)
    if name == "beam":
        from engine.runners.beam_runner import BeamRunner

        return BeamRunner(**options)
    raise ValueError(f"unknown runner {name!r}: use {', '.join(RUNNERS)}")
