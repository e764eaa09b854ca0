"""In-process runner: a step's shards one after the other, each stage's model loaded once; task jobs
(ingest) in a pool of `workers` processes."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from engine.counters import merge
from engine.execute import run_shard
from engine.runners.base import StepJob, TaskJob
from engine.training import TrainJob, train_in_process


class LocalRunner:
    name = "local"

    def __init__(self, **_: object):
        pass

    def run_step(self, store, job: StepJob, progress=None) -> dict:
        stages = job.build_stages()
        total: dict = {}
        on_batch = progress.batch if progress is not None else None
        for shard in job.shards:
            record = run_shard(store, job, stages, shard, self.name, on_batch)
            merge(total, record.get("counters", {}))
            if progress is not None:
                progress.shard(shard, record["rows"])
        return total

    def run_train(self, store, job: TrainJob, progress=None) -> dict:
        return train_in_process(store, job)

    def run_tasks(self, store, job: TaskJob, progress=None) -> dict[str, dict]:
        results: dict[str, dict] = {}

        def done(shard: str, summary: dict) -> None:
            results[shard] = summary
            if progress is not None:
                progress.shard(shard, summary.get("rows", 0))

        workers = job.workers or os.cpu_count() or 1
        if workers <= 1 or len(job.shards) <= 1:
            for shard in job.shards:
                done(shard, job.fn(store, shard, *job.args))
            return results
        # fork: workers inherit the imported modules (no re-import per worker); only shard names and
        # summaries cross the process boundary, never rows.
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            todo = iter(job.shards)
            running = {}
            for shard in todo:  # at most 2 per worker in flight: the driver holds no long queue
                running[pool.submit(job.fn, store, shard, *job.args)] = shard
                if len(running) >= 2 * workers:
                    break
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(running.pop(fut), fut.result())
                    nxt = next(todo, None)
                    if nxt is not None:
                        running[pool.submit(job.fn, store, nxt, *job.args)] = nxt
        return results
