"""What a run shows while it runs: images done per stage, images/s and ETA.

Runners report two events: `batch(stage, rows)` when a stage finished a batch (in-process runners:
progress inside a shard), and `shard(shard, rows)` when a shard was committed (every runner). On a
terminal this is a rich progress bar per step; when stdout is not a terminal (CI logs, files,
`nohup`), a plain line per stage every few seconds, so a long run is never silent.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


class Progress:
    """No output; the interface runners call."""

    def batch(self, stage: str, rows: int) -> None:
        pass

    def shard(self, shard: str, rows: int, resumed: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


MIN_RATE_SECONDS = 1.0


@dataclass
class _Counter:
    done: int = 0
    started: float = field(default_factory=lambda: time.perf_counter())

    def line(self, name: str, total: int) -> str:
        elapsed = time.perf_counter() - self.started
        # a rate over less than MIN_RATE_SECONDS is noise (the first batch ends microseconds after the
        # counter of a stage that starts with it): no rate, no ETA until there is time to measure
        rate = self.done / elapsed if elapsed >= MIN_RATE_SECONDS else 0.0
        if rate <= 0:
            of = f"/{total}" if total else ""
            return f"{name}: {self.done}{of} images"
        eta = f", ETA {max(total - self.done, 0) / rate:.0f}s" if rate > 0 and total else ""
        of = f"/{total}" if total else ""
        return f"{name}: {self.done}{of} images, {rate:.2f} images/s{eta}"


class PlainProgress(Progress):
    """A line per stage (and per step's committed shards) at most every `every` seconds."""

    def __init__(self, step: str, total_images: int, total_shards: int, out: TextIO | None = None, every: float = 5.0):
        self.step, self.total, self.total_shards = step, total_images, total_shards
        self.out = out or sys.stdout
        self.every = every
        self.stages: dict[str, _Counter] = {}
        self.committed = _Counter()
        self.started = self.committed.started  # every stage's rate counts from the step's start
        self.shards = 0
        self.last = 0.0

    def _maybe_print(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        for name, c in self.stages.items():
            self.out.write(f"[{self.step}] {c.line(name, self.total)}\n")
        self.out.write(f"[{self.step}] committed {self.shards}/{self.total_shards} shards, "
                       f"{self.committed.line('images', self.total).split(': ', 1)[1]}\n")
        self.out.flush()

    def batch(self, stage: str, rows: int) -> None:
        self.stages.setdefault(stage, _Counter(started=self.started)).done += rows
        self._maybe_print()

    def shard(self, shard: str, rows: int, resumed: bool = False) -> None:
        self.shards += 1
        self.committed.done += rows
        self._maybe_print(force=self.shards == self.total_shards)


class RichProgress(Progress):
    """rich bars: one for the step's committed images, one per stage inside shards."""

    def __init__(self, progress, step: str, total_images: int):
        self.progress, self.step, self.total = progress, step, total_images
        self.main = progress.add_task(step, total=total_images or None, info="")
        self.stages: dict[str, int] = {}

    def batch(self, stage: str, rows: int) -> None:
        if stage not in self.stages:
            self.stages[stage] = self.progress.add_task(f"  {stage}", total=self.total or None, info="")
        self.progress.update(self.stages[stage], advance=rows)

    def shard(self, shard: str, rows: int, resumed: bool = False) -> None:
        self.progress.update(self.main, advance=rows, info=f"{shard}{' (resumed)' if resumed else ''}")
