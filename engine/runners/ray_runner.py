"""Ray runner: steps as Ray Data datasets whose workers commit the shards; task jobs as Ray tasks.

A step is one Ray Data dataset over its pending shards (so actor pools start once and models load
once per actor): a read task per input shard emits the shard as one tagged block (pixels decoded
once, engine.execute.read_step_input), each stage maps whole blocks (`batch_size=None`; the stage
cuts them into the shard's own batches, engine.runners.tagged), and a final writer task commits
every complete shard of its block on the worker. The driver only receives one small summary row
per shard (rows, counters): its memory does not grow with the dataset, and shard k is committed as
soon as its rows are done while later shards still run, so a killed run resumes shard by shard.

Model stages (`uses_model`) run as `map_batches(StageActor, compute=ActorPoolStrategy)`; CPU-only
stages as tasks. On small machines actor CPU requests are scaled down so the read and write tasks
always get a core (docs/running.md, "Ray on a small machine": a pool holding every CPU hangs
silently). Task jobs (ingest) are plain `ray.remote` calls with a bounded number in flight.
"""
from __future__ import annotations

import json
import logging
import os
import time

import pyarrow as pa

from engine.counters import merge
from engine.execute import image_needs
from engine.runners.base import StageRecipe, StepJob, TaskJob, finished_records
from engine.runners.segment import SUMMARY_SCHEMA, Segment, commit_segment_step, segment_input
from engine.runners.tagged import (
    NODES,
    assemble_parts,
    clear_parts,
    commit_piece,
    empty_shard,
    pieces,
    read_tagged_shard,
    run_tagged_stage,
    worker_stage,
)

log = logging.getLogger(__name__)

READ_TASK_CPUS = 0.25  # reading / writing a Parquet shard is I/O: never let it wait behind actors
TASKS_IN_FLIGHT_PER_ACTOR = 2  # one running + one queued: the first actor up must not take every block
WORKER_SETUP_HOOK = "engine.cli.install_logging"  # runs in every Ray worker process (tasks and actors)


def node_id() -> str:
    """The Ray node this worker runs on (commit records and the manifest say where work ran)."""
    import ray

    return ray.get_runtime_context().get_node_id()


class RayUnavailableError(ValueError):
    """The Ray cluster cannot be reached: one line for the CLI (exit 2), no traceback."""


class StageActor:
    """A model stage on a Ray actor: setup() (model load) once in the constructor. `active(shard)`:
    whether this stage runs on a shard (a segment's shard skips the steps it already has)."""

    def __init__(self, recipe: StageRecipe, active=None):
        self.stage = worker_stage(recipe)
        self.node = node_id()
        self.active = active

    def __call__(self, block: pa.Table) -> pa.Table:
        return run_tagged_stage(self.stage, block, node=self.node, active=self.active)


def actor_class(stage_name: str) -> type:
    """StageActor under the stage's name (Ray's stats, logs and dashboard then say which pool is which)."""
    name = "".join(part.capitalize() for part in stage_name.replace("-", "_").split("_")) + "Actor"
    return type(name, (StageActor,), {"__module__": __name__, "__qualname__": name})


def run_cpu_stage(block: pa.Table, recipe: StageRecipe, active=None) -> pa.Table:
    """A CPU-only stage as a Ray task (cached per worker process)."""
    return run_tagged_stage(worker_stage(recipe), block, node=node_id(), active=active)


def commit_block(block: pa.Table, store, job: StepJob, runner: str) -> pa.Table:
    """The last operator of a step, on a worker: commit the block's shards; only summaries go on."""
    rows = [commit_piece(store, job, runner, shard, piece) for shard, piece in pieces(block)]
    return pa.Table.from_pylist([{**r, "counters": json.dumps(r["counters"]), NODES: json.dumps(r.get(NODES, {}))}
                                 for r in rows], schema=SUMMARY_SCHEMA)


def run_task_on_node(fn, store, shard: str, *args) -> dict:
    """A TaskJob call on a Ray worker; the summary says which node ran it."""
    return {**fn(store, shard, *args), "node": node_id()}


def _shard_datasource(read_one, shards: list[str], rows, input_of):
    """`read_one(shard)` -> the shard's tagged table; rows(shard) / input_of(shard): its size and folder."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ShardDatasource(Datasource):
        """Each pending input shard as one read task emitting the shard as one tagged block."""

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            tasks = []
            for shard in shards:
                def read(shard=shard):
                    return [read_one(shard)]

                meta = BlockMetadata(num_rows=rows(shard), size_bytes=None, exec_stats=None,
                                     input_files=[f"{input_of(shard)}/{shard}"])
                tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
            return tasks

    return ShardDatasource()


def task_cpus_left(actor_cpus: list[float], model_stages: list, cluster_cpus: float, nodes: int = 1) -> float:
    """CPUs a task operator may ask for beside the actor pools (so it can always be scheduled). On several
    nodes the CPUs left beside the pools are spread over them (two 1-CPU nodes with a 0.75-CPU actor each
    leave 0.25 per node): a task asking for the cluster-wide leftover would never be placed."""
    held = sum(c * s.resources.concurrency for c, s in zip(actor_cpus, model_stages))
    if held and nodes > 1:
        return READ_TASK_CPUS
    return min(1.0, max(cluster_cpus - held, 0.25))


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_pools_fit(pools: list[tuple[str, float, int, float]], cluster_gpus: float) -> None:
    """(stage, CPUs per actor, actors, GPUs per actor) of every pool that lives at once (a segment's):
    refuse to start, with what to change, when their GPUs cannot all be placed (Ray would wait
    forever; their CPUs are scaled to fit by fit_actor_cpus)."""
    gpus = sum(g * n for _, _, n, g in pools)
    if gpus > cluster_gpus + 1e-9:
        asks = ", ".join(f"{name} {n}x{g:g}" for name, _, n, g in pools if g)
        raise ValueError(f"ray: the actor pools running at once need {gpus:g} GPUs ({asks}) and the cluster has "
                         f"{cluster_gpus:g}: lower their `concurrency`, or set `barrier: true` on a step so its "
                         "pools run apart")


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
                 include_dashboard: bool | None = None, runtime_env: dict | None = None, verbose: bool = False,
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
        self.verbose = verbose

    # ------------------------------------------------------------------ cluster
    def connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        # Ray's INFO lines and its workers' output stay in Ray's session logs unless asked for (-v);
        # fld's own progress lines say what runs
        kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": self.verbose,
                        "logging_level": logging.INFO if self.verbose else logging.WARNING}
        # every worker's log lines through fld's one formatter (control characters escaped: they reach the
        # driver's terminal with -v), unless the runtime_env brings its own setup hook
        kwargs["runtime_env"] = {"worker_process_setup_hook": WORKER_SETUP_HOOK, **(self.runtime_env or {})}
        # without --address: RAY_ADDRESS if set, else always a new local instance ("local"). Ray's own
        # default (None) would join whatever Ray it finds running on this machine (another user's
        # `ray start`, a second fld run): a silent change of cluster and resources.
        address = self.address or os.environ.get("RAY_ADDRESS") or "local"
        kwargs["address"] = address
        if address == "local":
            kwargs["include_dashboard"] = bool(self.include_dashboard)
            if self.num_cpus is not None:
                kwargs["num_cpus"] = self.num_cpus
            if self.temp_dir:
                kwargs["_temp_dir"] = str(self.temp_dir)
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = "a new local cluster" if address == "local" else address
            raise RayUnavailableError(f"cannot start or reach Ray at {where}: {str(exc).splitlines()[0]} "
                                      "(start a cluster with `ray start --head`, or run without --address)") from None
        if not self.verbose:
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
        log.info("ray: connected to %s (%s CPUs)", self.address or "a local cluster", ray.cluster_resources().get("CPU"))

    # --------------------------------------------------------------------- step
    def _map_stages(self, ds, stages: list, recipes: list[StageRecipe], actives: list | None = None,
                    after: dict | None = None, fused_cpus: float | None = None):
        """Each stage as one operator: model stages as actor pools named after the stage (they live as
        long as the execution), CPU-only stages as tasks (Ray fuses consecutive ones). Segments:
        `actives[k]`, which shards stage k runs on; `after[k](ds)`, the operator after stage k (a commit);
        `fused_cpus`: the CPUs of every task operator (Ray fuses consecutive tasks with equal resources)."""
        import ray
        from ray.data import ActorPoolStrategy

        cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))  # an actor asking for none never starts
        model_stages = [s for s in stages if s.uses_model]
        actor_cpus, scaled = fit_actor_cpus([(s.resources.cpus, s.resources.concurrency) for s in model_stages], cluster_cpus)
        if scaled:
            log.warning("ray: actor pools ask for more than the %s cluster CPUs; scaled to %s CPUs per actor "
                        "so read/write tasks can run", cluster_cpus, actor_cpus)
        check_pools_fit([(s.name, c, s.resources.concurrency, s.resources.gpus if cluster_gpus else 0.0)
                         for s, c in zip(model_stages, actor_cpus)], cluster_gpus)
        cpus_of = dict(zip([id(s) for s in model_stages], actor_cpus))
        task_cpus = task_cpus_left(actor_cpus, model_stages, cluster_cpus, alive_nodes())
        for k, (stage, recipe) in enumerate(zip(stages, recipes)):
            active = actives[k] if actives else None
            res = stage.resources
            common = dict(batch_size=None, batch_format="pyarrow", udf_modifying_row_count=False)
            if res.gpus and cluster_gpus:
                common["num_gpus"] = res.gpus
            elif res.gpus:
                log.warning("ray: stage %s asks for %s GPU(s) but the cluster has none; running it on CPU",
                            stage.name, res.gpus)
            if stage.uses_model:
                ds = ds.map_batches(actor_class(stage.name), fn_constructor_args=(recipe, active),
                                    compute=ActorPoolStrategy(size=res.concurrency,
                                                              max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR),
                                    num_cpus=cpus_of[id(stage)], **common)
            else:
                ds = ds.map_batches(run_cpu_stage, fn_args=(recipe, active),
                                    num_cpus=fused_cpus or min(res.cpus, task_cpus), **common)
            if after and k in after:
                ds = after[k](ds)
        return ds

    def _read(self, read_one, shards: list[str], rows, input_of, cpus: float = READ_TASK_CPUS):
        """One read task per shard emitting the shard as one tagged block. Ray Data would otherwise split
        read outputs to reach its minimum block count, and a stage would see the shard in other batches
        than locally."""
        import ray
        from ray.data import DataContext

        DataContext.get_current().target_max_block_size = None  # a shard stays one block: no cut pieces
        return ray.data.read_datasource(_shard_datasource(read_one, shards, rows, input_of), num_cpus=cpus,
                                        override_num_blocks=len(shards))

    def build_dataset(self, store, job: StepJob, shards: list[str]):
        """The step as a lazy Ray Data dataset ending in the commit writer (summary rows only)."""
        stages = job.build_stages()
        needs = image_needs(stages)
        ds = self._read(lambda shard: read_tagged_shard(store, job, needs, shard), shards, job.rows,
                        lambda shard: job.input_folder)
        ds = self._map_stages(ds, stages, job.recipes)
        return ds.map_batches(commit_block, fn_args=(store, job, self.name), batch_size=None, batch_format="pyarrow",
                              num_cpus=READ_TASK_CPUS)

    def build_segment(self, store, segment: Segment):
        """The segment as ONE lazy dataset: read (decoded once), then every job's stages followed by its
        commit, the last commit emitting summary rows only. Every pool of the segment lives for the
        whole execution, so they are fitted to the cluster together."""
        import ray

        job_stages = [job.build_stages() for job in segment.jobs]
        segment.needs = [image_needs(st) for st in job_stages]
        shards = sorted(segment.start, key=lambda s: (segment.start[s], s))
        # read, CPU-only stages and commits: one CPU figure, so Ray fuses each run of them into one task
        cpu_stages = [s.resources.cpus for st in job_stages for s in st if not s.uses_model]
        model_stages = [s for st in job_stages for s in st if s.uses_model]
        cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        actor_cpus, _ = fit_actor_cpus([(s.resources.cpus, s.resources.concurrency) for s in model_stages], cluster_cpus)
        fused = min(max(cpu_stages, default=READ_TASK_CPUS),
                    task_cpus_left(actor_cpus, model_stages, cluster_cpus, alive_nodes()))
        ds = self._read(lambda shard: segment_input(store, segment, shard), shards, segment.rows,
                        segment.input_folder, fused)
        stages, recipes, actives, commits = [], [], [], {}
        for j, (job, st) in enumerate(zip(segment.jobs, job_stages)):
            stages += st
            recipes += job.recipes
            actives += [segment.active(j)] * len(st)
            commits[len(stages) - 1] = (lambda d, j=j: d.map_batches(
                commit_segment_step, fn_args=(store, segment, j, self.name, j == len(job_stages) - 1),
                batch_size=None, batch_format="pyarrow", num_cpus=fused))
        return self._map_stages(ds, stages, recipes, actives, commits, fused)

    def run_step(self, store, job: StepJob, progress=None) -> dict:
        import ray

        self.connect()
        t0 = time.perf_counter()
        clear_parts(store, job)
        total: dict = {}
        nodes: dict = {}
        arrived: dict[str, int] = {}
        assembling = []

        def done(summary: dict) -> None:
            merge(total, summary["counters"])
            merge(nodes, summary.get(NODES) or {})
            if progress is not None:
                progress.shard(summary["shard"], summary["rows"])

        for shard in [s for s in job.shards if job.rows(s) == 0]:
            done(empty_shard(store, job, self.name, shard))
        shards = [s for s in job.shards if job.rows(s) > 0]
        if not shards:
            return total
        ds = self.build_dataset(store, job, shards)
        assemble = ray.remote(num_cpus=READ_TASK_CPUS)(assemble_parts)
        for row in ds.iter_rows():
            summary = {**row, "counters": json.loads(row["counters"]), NODES: json.loads(row[NODES])}
            if summary["committed"]:
                done(summary)
                continue
            arrived[row["shard"]] = arrived.get(row["shard"], 0) + row["rows"]
            if arrived[row["shard"]] == job.rows(row["shard"]):  # every part is in: assemble on a worker
                assembling.append(assemble.remote(store, job, self.name, row["shard"]))
        for summary in ray.get(assembling):
            done(summary)
        finished_records(store, job, self.name)
        self._log_stats(store, job.name, ds, time.perf_counter() - t0)
        store.update_manifest(engine_metrics={job.name: {"runner": self.name, NODES: nodes}})
        return total

    def run_segment(self, store, segment: Segment, progress=None) -> None:
        """Every job of the segment in one streaming execution (engine.runners.segment); what it leaves
        uncommitted (cut or empty shards) the driver's step-by-step pass does after it."""
        self.connect()
        if not segment.start:
            return
        t0 = time.perf_counter()
        for job in segment.jobs:
            clear_parts(store, job)
        ds = self.build_segment(store, segment)
        for row in ds.iter_rows():
            if progress is not None and row["committed"]:
                progress.shard(row["shard"], row["rows"])
        self._log_stats(store, segment.name, ds, time.perf_counter() - t0)
        metrics = {}
        for j, job in enumerate(segment.jobs):  # where each step's stages ran, from its commit records
            nodes: dict = {}
            ran = {s for s, k in segment.start.items() if k <= j}
            for shard, rec in store.committed(job.output_folder).items():
                if shard in ran:
                    merge(nodes, rec.get(NODES) or {})
            metrics[job.name] = {"runner": self.name, NODES: nodes, "segment": segment.name}
        store.update_manifest(engine_metrics=metrics)

    def _log_stats(self, store, name: str, ds, seconds: float) -> None:
        """Ray Data's per-operator stats: logged and kept under OUT/logs/ for later reading."""
        try:
            stats = ds.stats()
        except Exception as exc:  # noqa: BLE001 - stats are diagnostics, never fail a finished step
            stats = f"(no stats: {exc})"
        log.info("ray: %s took %.1fs\n%s", name, seconds, stats)
        store.write_log(f"{name}.ray-stats.txt", stats)

    # -------------------------------------------------------------------- train
    def run_train(self, store, job, progress=None) -> dict:
        """A training job as Ray Train workers on the cluster (a GPU node gets it when it asks for GPUs)."""
        from engine.runners.ray_train import run_train

        self.connect()
        return run_train(store, job)

    # -------------------------------------------------------------------- tasks
    def run_tasks(self, store, job: TaskJob, progress=None) -> dict[str, dict]:
        import ray

        self.connect()
        # SPREAD: I/O-heavy chunks go to every node, not to the driver's node first
        remote = ray.remote(num_cpus=job.cpus, max_retries=2, scheduling_strategy="SPREAD")(run_task_on_node)
        limit = job.workers if job.workers > 0 else max(1, int(ray.cluster_resources().get("CPU", 1) / job.cpus))
        results: dict[str, dict] = {}
        running: dict = {}
        todo = iter(job.shards)

        def submit(shard: str) -> None:
            running[remote.remote(job.fn, store, shard, *job.args)] = shard

        for shard in todo:
            submit(shard)
            if len(running) >= limit:  # `workers` caps how many run at once
                break
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            shard = running.pop(ready[0])
            results[shard] = ray.get(ready[0])
            if progress is not None:
                progress.shard(shard, results[shard].get("rows", 0))
            nxt = next(todo, None)
            if nxt is not None:
                submit(nxt)
        nodes: dict[str, int] = {}
        for summary in results.values():
            nodes[summary["node"]] = nodes.get(summary["node"], 0) + 1
        store.update_manifest(engine_metrics={job.name: {"runner": self.name, NODES: nodes}})
        return results
