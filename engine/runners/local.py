"""In-process runner: shards one after the other, each stage's model loaded once."""
from __future__ import annotations

import time

from engine.counters import merge
from engine.execute import image_needs, run_stages_on_shard, step_input_table
from engine.runners.base import StepJob
from engine.store import ShardStore


class LocalRunner:
    name = "local"

    def __init__(self, **_: object):
        pass

    def run_step(self, store: ShardStore, job: StepJob, progress=None) -> dict:
        stages = job.pipeline.build_stages(job.step)
        needs = image_needs(stages)
        total: dict = {}
        for shard in job.shards:
            t0 = time.perf_counter()
            table = step_input_table(store, job.step_index, job.input_folder, needs, shard)
            table, counters = run_stages_on_shard(stages, table, f"{job.output_folder}/{shard}")
            store.write_shard(
                job.output_folder,
                shard,
                table,
                {"config_hash": job.config_hash, "runner": self.name, "counters": counters,
                 "seconds": round(time.perf_counter() - t0, 3)},
            )
            merge(total, counters)
            if progress is not None:
                progress(shard, table.num_rows)
        return total
