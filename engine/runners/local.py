"""In-process runner: shards one after the other, each stage's model loaded once."""
from __future__ import annotations

import time

from engine.counters import merge
from engine.execute import initial_records, run_stages_on_shard
from engine.runners.base import StepJob
from engine.store import ShardStore


def load_shard_input(store: ShardStore, job: StepJob, shard: str):
    """(records, images or None) of one shard for a step; images only when a stage needs pixels."""
    stages_need_images = any(getattr(s, "needs_images", False) for s in job.options.get("stages", []))
    images = None
    if job.step_index == 0:
        images = store.read_shard("images", shard)
        records = initial_records(images)
    else:
        records = store.read_shard(job.input_folder, shard)
    if stages_need_images and images is None:
        images = store.read_shard("images", shard, columns=["image_id", "bytes"])
    return records, images


class LocalRunner:
    name = "local"

    def __init__(self, **_: object):
        pass

    def run_step(self, store: ShardStore, job: StepJob, progress=None) -> dict:
        stages = job.pipeline.build_stages(job.step)
        job.options["stages"] = stages
        total: dict = {}
        for shard in job.shards:
            t0 = time.perf_counter()
            records, images = load_shard_input(store, job, shard)
            table, counters = run_stages_on_shard(stages, records, images, f"{job.output_folder}/{shard}")
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
