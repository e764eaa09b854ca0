"""Ray runner: steps as Ray Data datasets whose workers commit the shards; task jobs as Ray tasks.

A step is one Ray Data dataset over its pending shards (so actor pools start once and models load
once per actor): a read task per input shard emits the shard as one tagged block (pixels decoded
once, engine.execute.read_step_input), each stage maps whole blocks (`batch_size=None`; the stage
cuts them into the shard's own batches, engine.runners.tagged), and a final writer task commits
every complete shard of its block on the worker. The driver only receives one small summary row
per shard (rows, counters): its memory does not grow with the dataset, and shard k is committed as
soon as its rows are done while later shards still run, so a killed run resumes shard by shard.

Model stages (`uses_model`) run as `map_batches(StageActor, compute=ActorPoolStrategy)`; CPU-only
stages as tasks. Where 2+ model pools do not fit the cluster side by side, the stages (and commits) of
an execution run fused, as one task per shard that holds every model (fuse_plan, run_fused). On small machines actor CPU requests are scaled down so the read and write tasks
always get a core (docs/running.md, "Ray on a small machine": a pool holding every CPU hangs
silently). Task jobs (ingest) are plain `ray.remote` calls with a bounded number in flight.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid

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
    keep_stages,
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


def run_fused(block: pa.Table, ops: list[tuple], execution: str) -> pa.Table:
    """Several stages of one execution, and the commits between them, as ONE Ray task: a block handed
    from stage to stage in memory. Each model loads once per worker process (worker_stage); Ray keeps
    its task workers for the whole run, so a later execution (the next segment, a round's relabel
    step, the training task before it) finds its imports, and a stage it shares, already loaded,
    where an actor pool's processes end with their execution. `ops`: ("stage", recipe, active) or
    ("call", fn, args) for `fn(block, *args)`, in order; `execution`: which run segment / step this is
    (the worker then forgets the stages of earlier ones it does not use again)."""
    keep_stages({op[1].key for op in ops if op[0] == "stage"}, execution)
    node = node_id()
    for op in ops:
        if op[0] == "stage":
            block = run_tagged_stage(worker_stage(op[1]), block, node=node, active=op[2])
        else:
            block = op[1](block, *op[2])
    return block


def fused_task(stage_names: list[str]):
    """run_fused under its stages' names (FusedOcrFlorence2TextContrast in Ray's stats and dashboard)."""
    def fused(block: pa.Table, ops: list[tuple], execution: str) -> pa.Table:
        return run_fused(block, ops, execution)

    fused.__name__ = fused.__qualname__ = "Fused" + _camel(stage_names)
    return fused


def _camel(stage_names: list[str]) -> str:
    return "".join(part.capitalize() for stage in stage_names for part in stage.replace("-", "_").split("_"))


def actor_class(stage_name: str) -> type:
    """StageActor under the stage's name (Ray's stats, logs and dashboard then say which pool is which)."""
    name = _camel([stage_name]) + "Actor"
    return type(name, (StageActor,), {"__module__": __name__, "__qualname__": name})


FUSE_MODES = ("auto", "always", "never")


def fuse_plan(stages: list, mode: str, cluster_cpus: float, cluster_gpus: float = 0.0) -> list[tuple[list[int], bool]]:
    """Which stages of an execution share a process: (stage indices, fused) groups, in order.

    never: every stage on its own (an actor pool per model stage, CPU-only stages as tasks). always:
    each run of consecutive stages that ask for no GPU (on a cluster with GPUs) is one fused group,
    run as one task (run_fused) that holds every model of it; a GPU stage keeps its own actor pool.
    auto: `always` when 2+ model stages' pools do not fit the cluster side by side at the CPUs they
    ask for (fit_actor_cpus would scale them down: on a 2-CPU machine any 2 model stages at 1 CPU),
    else `never`: with room, a pool per stage overlaps the stages; without, their processes only
    start and load their models at the same time on the same cores."""
    if mode not in FUSE_MODES:
        raise ValueError(f"ray fuse: {mode!r} is not one of {', '.join(FUSE_MODES)}")
    model = [s for s in stages if s.uses_model]
    if mode == "auto":
        crowded = fit_actor_cpus([(s.resources.cpus, s.resources.concurrency) for s in model], cluster_cpus)[1]
        mode = "always" if crowded and len(model) > 1 else "never"
    if mode == "never" or not model:
        return [([k], False) for k in range(len(stages))]

    def apart(stage) -> bool:  # a GPU model stage keeps its own pool
        return bool(stage.uses_model and stage.resources.gpus and cluster_gpus)

    groups: list[tuple[list[int], bool]] = []
    for k, stage in enumerate(stages):
        if apart(stage):
            groups.append(([k], False))
        elif groups and groups[-1][1]:
            groups[-1][0].append(k)
        else:
            groups.append(([k], True))
    return groups


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


IDLE_WORKERS_PER_CPU = 4  # read / commit tasks ask READ_TASK_CPUS (0.25): up to 4 per CPU run beside the actors


def local_system_config(num_cpus: float | None) -> dict:
    """ray.init kwargs for a local instance: keep idle task workers. Ray kills idle workers beyond
    `num_workers_soft_limit` (default: the CPU count) after a second; with actors holding the CPU slots,
    every read and commit task then starts a fresh worker process (1-2 CPU s each). Measured: a 2-actor
    RapidOCR step on 32 images, 2 cores: 15 worker processes, 21.0 s / 41 CPU s -> 10, 16.4 s / 32 CPU s.
    A RAY_num_workers_soft_limit in the environment wins (as on a `ray start` cluster)."""
    if os.environ.get("RAY_num_workers_soft_limit"):
        return {}
    cpus = num_cpus if num_cpus is not None else (os.cpu_count() or 1)
    return {"_system_config": {"num_workers_soft_limit": max(1, int(cpus * IDLE_WORKERS_PER_CPU))}}


def task_cpus_left(held: float, cluster_cpus: float, nodes: int = 1) -> float:
    """CPUs a task operator may ask for beside actor pools holding `held` CPUs (so it can always be
    scheduled). On several nodes the CPUs left beside the pools are spread over them (two 1-CPU nodes
    with a 0.75-CPU actor each leave 0.25 per node): a task asking for the cluster-wide leftover would
    never be placed."""
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
                 fuse: str | None = None, **_: object):
        """address None: a local cluster in this process; "auto" / "ray://host:port": an existing cluster.

        `runtime_env` (or the JSON in FLD_RAY_RUNTIME_ENV) is passed to ray.init, e.g. to install
        fld-engine on a remote cluster's workers. `fuse` (or FLD_RAY_FUSE): auto | always | never, whether
        the stages of an execution run in one process (fuse_plan).
        """
        self.address = address
        self.num_cpus = num_cpus
        self.temp_dir = temp_dir or os.environ.get("FLD_RAY_TEMP_DIR")
        self.include_dashboard = include_dashboard
        env = os.environ.get("FLD_RAY_RUNTIME_ENV")
        self.runtime_env = runtime_env if runtime_env is not None else (json.loads(env) if env else None)
        self.verbose = verbose
        self.fuse = fuse or os.environ.get("FLD_RAY_FUSE") or "auto"
        if self.fuse not in FUSE_MODES:
            raise ValueError(f"ray fuse: {self.fuse!r} is not one of {', '.join(FUSE_MODES)} (--ray-fuse / FLD_RAY_FUSE)")

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
            kwargs |= local_system_config(self.num_cpus)
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
        `actives[k]`, which shards stage k runs on; `after[k] = (fn, args)`, the operator after stage k (a
        commit, `fn(block, *args)`); `fused_cpus`: the CPUs of every task operator (Ray fuses consecutive
        tasks with equal resources). Where the pools do not fit side by side (`fuse`), consecutive stages
        run as one fused task instead (fuse_plan, run_fused)."""
        import ray

        from ray.data import ActorPoolStrategy, TaskPoolStrategy

        after = after or {}
        plan, pools, actor_cpus, task_cpus = self._layout(stages)
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        for stage in stages:
            if stage.resources.gpus and not cluster_gpus:
                log.warning("ray: stage %s asks for %s GPU(s) but the cluster has none; running it on CPU",
                            stage.name, stage.resources.gpus)
        if actor_cpus != [c for _, c, _, _ in pools]:
            log.warning("ray: actor pools ask for more than the %s cluster CPUs; scaled to %s CPUs per actor "
                        "so read/write tasks can run", ray.cluster_resources().get("CPU"), actor_cpus)
        check_pools_fit([(name, c, n, g) for (name, _, n, g), c in zip(pools, actor_cpus)], cluster_gpus)
        if any(fused for _, fused in plan):
            log.info("ray: stages fused into %s (fuse=%s)", [p for p, _, _, _ in pools], self.fuse)
        pool = iter(zip(pools, actor_cpus))
        common = dict(batch_size=None, batch_format="pyarrow", udf_modifying_row_count=False)
        active = (lambda k: actives[k]) if actives else (lambda k: None)
        execution = uuid.uuid4().hex

        def then(ds, k):  # the operator after stage k, if any (a commit)
            if k not in after:
                return ds
            return ds.map_batches(after[k][0], fn_args=after[k][1], batch_size=None, batch_format="pyarrow",
                                  num_cpus=fused_cpus or READ_TASK_CPUS)

        for group, fused in plan:
            if not any(stages[k].uses_model for k in group):  # CPU-only stages: tasks
                for k in group:
                    ds = then(ds.map_batches(run_cpu_stage, fn_args=(recipes[k], active(k)),
                                             num_cpus=fused_cpus or min(stages[k].resources.cpus, task_cpus), **common), k)
                continue
            (_, _, size, gpus), cpus = next(pool)
            strategy = ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR)
            resources = {"num_cpus": cpus, **({"num_gpus": gpus} if gpus else {})}
            if not fused:  # one model stage: its own pool, named after it
                k = group[0]
                ds = then(ds.map_batches(actor_class(stages[k].name), fn_constructor_args=(recipes[k], active(k)),
                                         compute=strategy, **resources, **common), k)
                continue
            # a fused group: its stages and the commits between them in one task, in order
            ops = []
            for k in group:
                ops.append(("stage", recipes[k], active(k)))
                if k in after:
                    ops.append(("call", *after[k]))
            ds = ds.map_batches(fused_task([stages[k].name for k in group]), fn_args=(ops, execution),
                                compute=TaskPoolStrategy(size=size), **resources, batch_size=None, batch_format="pyarrow",
                                udf_modifying_row_count=not any(op[0] == "call" for op in ops))
        return ds

    def _layout(self, stages: list):
        """How an execution's stages run: the fuse plan (groups of stage indices), one pool per model stage
        or fused group (name, CPUs asked per actor, actors, GPUs per actor), the CPUs each pool's actors
        get (scaled so read / write tasks always get some), and the CPUs left for a task operator."""
        import ray

        cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))  # an actor asking for none never starts
        plan = fuse_plan(stages, self.fuse, cluster_cpus, cluster_gpus)
        pools = []
        for group, _ in plan:
            model = [stages[k] for k in group if stages[k].uses_model]
            if model:
                pools.append(("+".join(s.name for s in model), max(s.resources.cpus for s in model),
                              max(s.resources.concurrency for s in model),
                              max(s.resources.gpus for s in model) if cluster_gpus else 0.0))
        actor_cpus, _ = fit_actor_cpus([(c, n) for _, c, n, _ in pools], cluster_cpus)
        held = sum(c * n for (_, _, n, _), c in zip(pools, actor_cpus))
        return plan, pools, actor_cpus, task_cpus_left(held, cluster_cpus, alive_nodes() if held else 1)

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
        return self._map_stages(ds, stages, job.recipes, after={len(stages) - 1: (commit_block, (store, job, self.name))})

    def build_segment(self, store, segment: Segment):
        """The segment as ONE lazy dataset: read (decoded once), then every job's stages followed by its
        commit, the last commit emitting summary rows only. Every pool of the segment lives for the
        whole execution, so they are fitted to the cluster together. Jobs before the first one any
        shard enters at start no pool (nothing of theirs is pending)."""
        job_stages = [job.build_stages() for job in segment.jobs]
        segment.needs = [image_needs(st) for st in job_stages]
        shards = sorted(segment.start, key=lambda s: (segment.start[s], s))
        first = min(segment.start.values())
        stages, recipes, actives, commits = [], [], [], {}
        for j in range(first, len(segment.jobs)):
            stages += job_stages[j]
            recipes += segment.jobs[j].recipes
            actives += [segment.active(j)] * len(job_stages[j])
            commits[len(stages) - 1] = (commit_segment_step, (store, segment, j, self.name, j == len(job_stages) - 1))
        # read, CPU-only stages and commits: one CPU figure, so Ray fuses each run of them into one task
        _, _, _, task_cpus = self._layout(stages)
        fused = min(max((s.resources.cpus for s in stages if not s.uses_model), default=READ_TASK_CPUS), task_cpus)
        ds = self._read(lambda shard: segment_input(store, segment, shard), shards, segment.rows,
                        segment.input_folder, fused)
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
