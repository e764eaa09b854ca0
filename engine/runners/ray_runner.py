"""Ray Data runner: input shards -> stage actors / tasks -> shard writer, streaming.

One Ray Data dataset per step covers all its pending shards (so actor pools start once and
models load once per actor). A custom datasource emits each input shard as tagged chunks
(engine.runners.tagged): shard name + row index travel with every row, so the driver can
commit shard k as soon as all its rows came back, in input order, while later shards are
still running. That is what makes a killed run resumable shard by shard and makes part-k
identical to the local runner's part-k.

Model stages (`uses_model`) run as `map_batches(StageActor, compute=ActorPoolStrategy)`;
CPU-only stages as tasks. On small machines actor CPU requests are scaled down so the read
and write tasks always get a core (STACK.md: a pool holding every CPU hangs silently).
"""
from __future__ import annotations

import json
import logging
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from engine.counters import merge
from engine.runners.base import StepJob
from engine.runners.tagged import (
    input_row_counts,
    SHARD_COLUMN,
    StageRecipe,
    assemble_shard,
    chunk_bounds,
    empty_part,
    read_tagged_chunk,
    run_tagged_batch,
    shard_seconds,
    step_recipes,
    worker_stage,
)
from engine.stage import IMAGE_BYTES_COLUMN
from engine.store import ShardStore

log = logging.getLogger(__name__)

READ_TASK_CPUS = 0.25  # reading a Parquet shard is I/O: never let it wait behind actors
BLOCKS_PER_ACTOR = 4  # input blocks per actor of the widest pool, at least (shards are split into chunks)
TASKS_IN_FLIGHT_PER_ACTOR = 2  # one running + one queued: the first actor up must not take every block


class StageActor:
    """A model stage on a Ray actor: setup() (model load) once in the constructor."""

    def __init__(self, recipe: StageRecipe):
        self.stage = worker_stage(recipe)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return run_tagged_batch(self.stage, batch)


def run_cpu_stage(batch: pa.Table, recipe: StageRecipe) -> pa.Table:
    """A CPU-only stage as a Ray task (cached per worker process)."""
    return run_tagged_batch(worker_stage(recipe), batch)


def _shard_datasource(store: ShardStore, job: StepJob, needs_images: bool, rows: dict[str, int], chunks_per_shard: int):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ShardChunkDatasource(Datasource):
        """Each pending input shard as `chunks_per_shard` read tasks of tagged rows."""

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            tasks = []
            worker_store = ShardStore.from_spec(store.spec())  # absolute path or URL + storage options
            for shard in [s for s in job.shards if rows[s] > 0]:
                for start, stop in chunk_bounds(rows[shard], chunks_per_shard):
                    def read(shard=shard, start=start, stop=stop):
                        return [read_tagged_chunk(worker_store, job.step_index, job.input_folder, needs_images, shard, start, stop)]

                    meta = BlockMetadata(num_rows=stop - start, size_bytes=None, exec_stats=None,
                                         input_files=[str(store.shard_path(job.input_folder, shard))])
                    tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
            return tasks

    return ShardChunkDatasource()


def fit_actor_cpus(requests: list[tuple[float, int]], cluster_cpus: float) -> tuple[list[float], bool]:
    """Per-actor CPUs for each model stage (cpus, actors) so the pools leave room for read/write tasks."""
    total = sum(c * n for c, n in requests)
    reserve = 0.5 if cluster_cpus <= 4 else 1.0
    budget = max(cluster_cpus - reserve, 0.1)
    if total <= budget or total == 0:
        return [c for c, _ in requests], False
    scale = budget / total
    return [round(c * scale, 3) for c, _ in requests], True


class RayRunner:
    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: float | None = None, temp_dir: str | None = None,
                 include_dashboard: bool | None = None, runtime_env: dict | None = None, chunks_per_shard: int | None = None,
                 **_: object):
        """address None: a local cluster in this process; "auto" / "ray://host:port": an existing cluster.

        `runtime_env` (or the JSON in FLD_RAY_RUNTIME_ENV) is passed to ray.init, e.g. to install
        fld-engine on a remote cluster's workers.
        """
        self.address = address
        self.num_cpus = num_cpus
        self.temp_dir = temp_dir or os.environ.get("FLD_RAY_TEMP_DIR")
        self.include_dashboard = include_dashboard
        env = os.environ.get("FLD_RAY_RUNTIME_ENV")
        self.runtime_env = runtime_env if runtime_env is not None else (json.loads(env) if env else None)
        self.chunks_per_shard = chunks_per_shard

    # ------------------------------------------------------------------ cluster
    def connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": True}
        if self.runtime_env:
            kwargs["runtime_env"] = self.runtime_env
        if self.address:
            kwargs["address"] = self.address
        else:
            kwargs["include_dashboard"] = bool(self.include_dashboard)
            if self.num_cpus is not None:
                kwargs["num_cpus"] = self.num_cpus
            if self.temp_dir:
                kwargs["_temp_dir"] = str(self.temp_dir)
        ray.init(**kwargs)
        log.info("ray: connected to %s (%s CPUs)", self.address or "a local cluster", ray.cluster_resources().get("CPU"))

    # --------------------------------------------------------------------- step
    def build_dataset(self, store: ShardStore, job: StepJob, rows: dict[str, int]):
        """The step as a lazy Ray Data dataset of tagged rows (image bytes dropped at the end)."""
        import ray

        stages, recipes = step_recipes(job)
        needs_images = any(s.needs_images for s in stages)
        cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))  # an actor asking for none never starts
        model_stages = [s for s in stages if s.uses_model]
        actor_cpus, scaled = fit_actor_cpus([(s.resources.cpus, s.resources.concurrency) for s in model_stages], cluster_cpus)
        if scaled:
            log.warning("ray: actor pools ask for more than the %s cluster CPUs; scaled to %s CPUs per actor "
                        "so read/write tasks can run", cluster_cpus, actor_cpus)
        cpus_of = dict(zip([id(s) for s in model_stages], actor_cpus))
        widest = max([s.resources.concurrency for s in model_stages] or [1])
        # enough blocks to keep every actor busy and balanced even when the step has few shards
        chunks = self.chunks_per_shard or max(1, -(-BLOCKS_PER_ACTOR * widest // max(1, len(job.shards))))
        ds = ray.data.read_datasource(_shard_datasource(store, job, needs_images, rows, chunks),
                                      num_cpus=READ_TASK_CPUS)
        task_cpus = min(1.0, max(cluster_cpus - sum(c * s.resources.concurrency for c, s in zip(actor_cpus, model_stages)), 0.25))
        for stage, recipe in zip(stages, recipes):
            res = stage.resources
            common = dict(batch_size=res.batch_size, batch_format="pyarrow", udf_modifying_row_count=False)
            if res.gpus and cluster_gpus:
                common["num_gpus"] = res.gpus
            elif res.gpus:
                log.warning("ray: stage %s asks for %s GPU(s) but the cluster has none; running it on CPU",
                            stage.name, res.gpus)
            if stage.uses_model:
                from ray.data import ActorPoolStrategy

                ds = ds.map_batches(StageActor, fn_constructor_args=(recipe,), compute=ActorPoolStrategy(size=res.concurrency, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR),
                                    num_cpus=cpus_of[id(stage)], **common)
            else:
                ds = ds.map_batches(run_cpu_stage, fn_args=(recipe,), num_cpus=min(res.cpus, task_cpus), **common)
        if needs_images:
            ds = ds.drop_columns([IMAGE_BYTES_COLUMN], num_cpus=READ_TASK_CPUS)  # 1 CPU by default: would wait for the actors
        return ds

    def run_step(self, store: ShardStore, job: StepJob, progress=None) -> dict:
        self.connect()
        rows = input_row_counts(store, job)
        t0 = time.perf_counter()
        pending: dict[str, list[pa.Table]] = {}
        arrived: dict[str, int] = {}
        total: dict = {}

        def commit(shard: str) -> None:
            table, counters = assemble_shard(pending.pop(shard, []) or [empty_part(shard)], job.output_folder, shard, rows[shard])
            store.write_shard(job.output_folder, shard, table,
                              {"config_hash": job.config_hash, "runner": self.name, "counters": counters,
                               "seconds": shard_seconds(counters)})
            merge(total, counters)
            if progress is not None:
                progress(shard, table.num_rows)

        for shard in [s for s in job.shards if rows[s] == 0]:
            commit(shard)  # an empty input shard still gets its (empty) output shard
        if not any(rows.values()):
            return total
        ds = self.build_dataset(store, job, rows)
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if block.num_rows == 0:
                continue
            for shard in sorted(set(block.column(SHARD_COLUMN).to_pylist())):
                part = block.filter(pc.equal(block.column(SHARD_COLUMN), shard))
                pending.setdefault(shard, []).append(part)
                arrived[shard] = arrived.get(shard, 0) + part.num_rows
                if arrived[shard] >= rows[shard]:
                    commit(shard)
        left = [s for s in job.shards if not store.is_committed(job.output_folder, s, job.config_hash)]
        if left:
            raise RuntimeError(f"ray: step {job.step.name!r} finished without rows for shards {left[:5]}")
        self._log_stats(store, job, ds, time.perf_counter() - t0)
        return total

    def _log_stats(self, store: ShardStore, job: StepJob, ds, seconds: float) -> None:
        """Ray Data's per-operator stats: logged and kept under OUT/logs/ for later reading."""
        try:
            stats = ds.stats()
        except Exception as exc:  # noqa: BLE001 - stats are diagnostics, never fail a finished step
            stats = f"(no stats: {exc})"
        log.info("ray: step %s took %.1fs\n%s", job.step.name, seconds, stats)
        store.write_log(f"{job.step.name}.ray-stats.txt", stats)
