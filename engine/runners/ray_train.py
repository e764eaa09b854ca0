"""Ray adapter of a training job (engine.training.TrainJob): one worker as a plain Ray task, N as a
TorchTrainer of N DDP workers.

One worker needs no process group, no Ray Train controller and no run records (Ray Train's own
start-up is ~30 s on a small machine): it is one `ray.remote` task asking for the worker's CPUs /
GPU, so Ray places it on a node that has them, and it trains as the local runner does. For 2+
workers, each worker builds the job's trainer and calls `fit(store, job, world)` with its rank, its device,
a DistributedDataParallel wrapper, Ray Train's metric report and an all-gather over the process
group (the trainer gathers every worker's RNG and data position into its checkpoints). Each
worker reads its own part of the shards (World.shards). The trainer itself never imports Ray.
"""
from __future__ import annotations

import logging
import shutil
import tempfile

from engine.execute import limit_threads
from engine.training import TrainJob, World

log = logging.getLogger(__name__)


def _worker_loop(ctx: dict) -> None:
    import ray.train
    import ray.train.torch as rtt
    import torch.distributed as dist

    context = ray.train.get_context()
    size = context.get_world_size()

    def gather(obj):
        if size == 1:
            return [obj]
        out = [None] * size
        dist.all_gather_object(out, obj)
        return out

    world = World(
        rank=context.get_world_rank(),
        size=size,
        device=str(rtt.get_device()) if ctx["use_gpu"] else "cpu",
        # find_unused_parameters: frozen towers / tied rows must not stall DDP's reduction
        wrap=(lambda m: rtt.prepare_model(m, parallel_strategy_kwargs={"find_unused_parameters": True})) if size > 1 else None,
        report=lambda entry: ray.train.report(entry),
        gather=gather,
    )
    job: TrainJob = ctx["job"]
    limit_threads(job.cpus_per_worker)
    job.build().fit(ctx["store"], job, world)


def _train_one(store, job: TrainJob, use_gpu: bool) -> dict:
    """The one worker of a one-worker job, as a Ray task (rank 0 of 1, no process group)."""
    from engine.stage import pick_device

    limit_threads(job.cpus_per_worker)
    return job.build().fit(store, job, World(device=pick_device() if use_gpu else "cpu"))


def run_train(store, job: TrainJob) -> dict:
    """Train on the connected Ray cluster; returns the trainer's summary (from the model folder)."""
    import ray

    use_gpu = job.gpus_per_worker > 0 and float(ray.cluster_resources().get("GPU", 0)) > 0
    if job.gpus_per_worker > 0 and not use_gpu:
        log.warning("ray: %s asks for %s GPU(s) per worker but the cluster has none; training on CPU",
                    job.name, job.gpus_per_worker)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    if job.num_workers <= 1:
        # the GPU share the job asks for, else its CPUs (capped to the cluster's, so the task can be placed)
        resources = {"num_gpus": job.gpus_per_worker} if use_gpu else {"num_cpus": min(job.cpus_per_worker, cpus)}
        ray.get(ray.remote(max_retries=0, **resources)(_train_one).remote(store, job, use_gpu))
    else:
        _fit_torch_trainer(store, job, use_gpu, cpus)
    summary = job.build().finished(store, job)
    if summary is None:
        raise RuntimeError(f"Ray training job {job.name} ended without a finished model in {job.model_folder}")
    return summary


def _fit_torch_trainer(store, job: TrainJob, use_gpu: bool, cpus: float) -> None:
    """2+ workers: Ray Train's TorchTrainer (DDP over a process group)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # fractional CPUs on small clusters, so a Ray Train controller and N workers fit (docs/running.md, Ray notes)
    per_worker = {"GPU": job.gpus_per_worker} if use_gpu else {"CPU": min(1.0, max(0.25, (cpus - 0.5) / job.num_workers))}
    results = tempfile.mkdtemp(prefix="fld-train-")  # Ray Train's own run records; our checkpoints are in OUT
    try:
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"job": job, "store": store, "use_gpu": use_gpu},
            scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
            run_config=RunConfig(name=job.name, storage_path=results),
        )
        result = trainer.fit()
    finally:
        shutil.rmtree(results, ignore_errors=True)
    if result.error is not None:
        raise RuntimeError(f"Ray Train job {job.name} failed: {result.error}") from result.error
