"""Native Florence-2 training (transformers' Florence2ForConditionalGeneration), resumable.

Recipe (FLORENCE2.md §3, P §6.1): AdamW, cosine decay after a linear warm-up, gradient
accumulation, bf16 autocast on CUDA (fp16 + GradScaler where bf16 is missing), fp32 on CPU.
Batches come from refine.dataset.TaskBalancedSampler, a pure function of (seed, step), so a run
killed at any point and restarted from `out_dir` continues from its last checkpoint with the
same model, optimizer, scheduler, RNG states and step, and sees the batches it would have seen.

Layout of out_dir (OUT/models/round<k>/ in a pipeline):
    checkpoints/step-00000200/   model + processor (save_pretrained) + trainer_state.pt
    train_log.jsonl              one line per logged step: loss, lr, loss per task, samples/s
    config.json, model.safetensors, processor files, train_summary.json   the final model

The single-process trainer is the default. `TrainConfig.num_workers > 1` or `use_ray: true`
runs the same loop on Ray Train's TorchTrainer (DDP, one process per worker, CPU or GPU);
workers share out_dir, which must be on a shared filesystem across nodes.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from refine.dataset import Collator, ExampleSet, TaskBalancedSampler

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
SUMMARY_FILE = "train_summary.json"
LOG_FILE = "train_log.jsonl"


class TrainConfig(BaseModel):
    """Training hyper-parameters; defaults are Florence-2-base fine-tuning scale."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch (per worker)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-5, gt=0, description="peak LR; the paper: 1e-4 from scratch (B), 1e-5 (L); fine-tuning wants the low end")
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(50, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    log_every: int = Field(10, ge=1)
    task_weights: dict[str, float] | None = None
    max_target_tokens: int = Field(1024, ge=8)
    freeze_vision: bool = Field(False, description="train only the language model + projector (less memory)")
    num_workers: int = Field(1, ge=1, description="> 1: Ray Train TorchTrainer with this many workers")
    use_ray: bool = False
    use_gpu: bool | None = Field(None, description="Ray workers on GPUs; None: when CUDA is present")


@dataclass
class TrainResult:
    model_dir: str
    steps: int
    first_loss: float | None
    last_loss: float | None
    loss_by_task: dict[str, float]
    history: list[dict] = field(default_factory=list)
    samples_per_s: float | None = None
    resumed_from: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


# ------------------------------------------------------------------------ checkpoints
def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (their state file exists), oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(out_dir: Path, step: int, model, processor, state: dict, keep: int) -> Path:
    """Written under a temporary name and renamed: a kill mid-save leaves the previous one intact."""
    import torch

    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------- precision
def _autocast_dtype(precision: str, device: str):
    import torch

    if not device.startswith("cuda") or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def token_losses(logits, labels):
    """Per-example (sum of token CE, token count); the step loss is sum/count over the batch,
    which equals transformers' mean-over-tokens loss."""
    import torch.nn.functional as F

    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = labels != -100
    return (ce * mask).sum(dim=1), mask.sum(dim=1)


# ------------------------------------------------------------------------------ loop
def _first_loss(history: list[dict]) -> float | None:
    """The loss of step 1 (kept in the first log entry), else the first logged window's loss."""
    return history[0].get("first_loss", history[0]["loss"]) if history else None


def _result(out_dir: Path, history: list[dict], steps: int, first_loss: float | None,
            resumed_from: int | None) -> TrainResult:
    """The run's result from its log entries: last loss and per-task losses of the last entry,
    mean samples/s over the entries."""
    last = history[-1] if history else None
    rates = [h["samples_per_s"] for h in history if h.get("samples_per_s")]
    return TrainResult(str(out_dir), steps, first_loss, last["loss"] if last else None, last["tasks"] if last else {},
                       history, sum(rates) / len(rates) if rates else None, resumed_from)


@dataclass
class _World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"
    wrap: Callable[[Any], Any] | None = None  # DDP wrapper under Ray Train
    report: Callable[[dict], None] | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def _load(model_ref: str, out_dir: Path, device: str):
    """From the last checkpoint when there is one, else from the reference (hub / dir / random)."""
    import torch

    from annotators.florence2_model import Florence2Model

    ckpt = latest_checkpoint(out_dir)
    ref = str(ckpt) if ckpt else model_ref
    wrapped = Florence2Model.load(ref, device=device, dtype="float32")  # fp32 master weights
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False) if ckpt else None
    return wrapped, state, ckpt


def _train_loop(model_ref: str, data: ExampleSet, out_dir: Path, cfg: TrainConfig, world: _World,
                stop_after: int | None = None) -> TrainResult:
    import torch
    from transformers import get_cosine_schedule_with_warmup
    from transformers.models.florence2.modeling_florence2 import shift_tokens_right

    torch.manual_seed(cfg.seed + world.rank)
    random.seed(cfg.seed + world.rank)
    wrapped, state, ckpt = _load(model_ref, out_dir, world.device)
    model, processor = wrapped.model, wrapped.processor
    text_cfg = model.config.text_config
    max_target = min(cfg.max_target_tokens, text_cfg.max_position_embeddings)
    if cfg.freeze_vision:
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and norms: no weight decay
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps)
    amp_dtype = _autocast_dtype(cfg.precision, world.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start, history = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"][min(world.rank, len(state["rng"]) - 1)])
        start, history = state["step"], state["history"]
        if state.get("config", {}).get("steps") not in (None, cfg.steps):
            raise ValueError(f"{ckpt}: checkpoint of a {state['config']['steps']}-step run; this run asks {cfg.steps} steps")
    net = world.wrap(model) if world.wrap else model
    sampler = TaskBalancedSampler(data.by_task, cfg.seed, cfg.task_weights)
    collate = Collator(processor, data.images, max_target)
    pad, dstart = text_cfg.pad_token_id, text_cfg.decoder_start_token_id

    log_path = out_dir / LOG_FILE
    window: dict[str, list[float]] = {}
    window_loss, window_n, window_t, window_samples = 0.0, 0, time.perf_counter(), 0
    first_loss = _first_loss(history)
    step = start
    while step < cfg.steps:
        if stop_after is not None and step >= stop_after:
            break
        batch_sum, batch_tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            idx = sampler.batch(step, micro, cfg.batch_size, world.rank)
            batch = collate([data.examples[i] for i in idx])
            labels = batch["labels"].to(world.device)
            with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
                out = net(
                    input_ids=batch["input_ids"].to(world.device),
                    attention_mask=batch["attention_mask"].to(world.device),
                    pixel_values=batch["pixel_values"].to(world.device),
                    decoder_input_ids=shift_tokens_right(labels, pad, dstart),
                    use_cache=False,
                )
            sums, counts = token_losses(out.logits, labels)
            n_tokens = int(counts.sum())
            loss = sums.sum() / max(n_tokens, 1)
            scaler.scale(loss / cfg.grad_accum).backward()
            batch_sum += float(sums.sum().detach())
            batch_tokens += n_tokens
            for task, s, c in zip(batch["tasks"], sums.detach().tolist(), counts.tolist()):
                acc = window.setdefault(task, [0.0, 0])
                acc[0] += s
                acc[1] += c
            window_samples += len(idx)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        step_loss = batch_sum / max(batch_tokens, 1)
        if first_loss is None:
            first_loss = step_loss
        window_loss += step_loss
        window_n += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_t
            entry = {
                "step": step,
                "loss": window_loss / window_n,
                "lr": scheduler.get_last_lr()[0],
                "tasks": {t: s / max(c, 1) for t, (s, c) in sorted(window.items())},
                "samples_per_s": window_samples * world.size / elapsed if elapsed > 0 else None,
            }
            if not history:
                entry["first_loss"] = first_loss
            history.append(entry)
            if world.main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            if world.report:
                world.report(entry)
            window, window_loss, window_n, window_t, window_samples = {}, 0.0, 0, time.perf_counter(), 0
        if world.main and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            rng = [_rng_state()]
            _save_checkpoint(out_dir, step, model, processor, {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng,
                "history": history,
                "config": cfg.model_dump(),
            }, cfg.keep_checkpoints)
    result = _result(out_dir, history, step, first_loss, int(ckpt.name.split("-")[1]) if ckpt else None)
    if world.main and step >= cfg.steps:
        model.eval()
        wrapped.save(out_dir)  # the final model: a local dir any loader reads
        (out_dir / SUMMARY_FILE).write_text(json.dumps(result.as_dict() | {"examples": data.counts()}, indent=1))
    return result


# ------------------------------------------------------------------------- entry points
def finished(out_dir: str | Path, steps: int | None = None) -> dict | None:
    """The summary of a completed training in out_dir (None when it must run or resume)."""
    p = Path(out_dir) / SUMMARY_FILE
    if not p.exists() or not (Path(out_dir) / "config.json").exists():
        return None
    summary = json.loads(p.read_text())
    return summary if steps is None or summary.get("steps") == steps else None


def train(model_ref: str, data: ExampleSet, out_dir: str | Path, config: TrainConfig | dict | None = None,
          stop_after: int | None = None, device: str | None = None) -> TrainResult:
    """Train (or resume) a Florence-2 on `data`; the final model is saved in out_dir.

    model_ref: hub id | local dir | random:<preset or cfg> (ignored when out_dir has a checkpoint).
    stop_after: stop (without the final save) once this step is reached, as a kill would.
    """
    from engine.stage import pick_device

    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**(config or {}))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = finished(out_dir, cfg.steps)
    if done is not None:
        return TrainResult(str(out_dir), done["steps"], done["first_loss"], done["last_loss"], done["loss_by_task"],
                           samples_per_s=done.get("samples_per_s"), resumed_from=done.get("resumed_from"))
    if cfg.use_ray or cfg.num_workers > 1:
        return train_distributed(model_ref, data, out_dir, cfg, stop_after=stop_after)
    return _train_loop(model_ref, data, out_dir, cfg, _World(device=device or pick_device()), stop_after)


def train_distributed(model_ref: str, data: ExampleSet, out_dir: Path, cfg: TrainConfig,
                      stop_after: int | None = None, ray_init: dict | None = None) -> TrainResult:
    """The same loop on Ray Train (TorchTrainer, DDP). Uses a running Ray cluster when there is
    one (`ray.init(address="auto")` done by the caller), else starts a local one."""
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
    if not ray.is_initialized():
        ray.init(**({"include_dashboard": False, "log_to_driver": False} | (ray_init or {})))

    def loop(ctx: dict) -> None:
        import ray.train
        import ray.train.torch as rtt

        world = _World(
            rank=ray.train.get_context().get_world_rank(),
            size=ray.train.get_context().get_world_size(),
            device=str(rtt.get_device()) if use_gpu else "cpu",
            # find_unused_parameters: frozen towers / tied rows must not stall DDP's reduction
            wrap=lambda m: rtt.prepare_model(m, parallel_strategy_kwargs={"find_unused_parameters": True}),
            report=lambda entry: ray.train.report({k: v for k, v in entry.items() if k != "tasks"}),
        )
        _train_loop(ctx["model_ref"], ctx["data"], Path(ctx["out_dir"]), ctx["cfg"], world, ctx["stop_after"])

    trainer = TorchTrainer(
        loop,
        train_loop_config={"model_ref": model_ref, "data": data, "out_dir": str(out_dir), "cfg": cfg, "stop_after": stop_after},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": 0.5},  # fractional: 2-core hosts (STACK.md)
        ),
        run_config=RunConfig(name=f"florence2-{out_dir.name}", storage_path=str(out_dir.resolve() / "ray_results")),
    )
    resumed = latest_checkpoint(out_dir)
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"Ray Train run in {out_dir} failed: {result.error}") from result.error
    return result_from_dir(out_dir, resumed_from=int(resumed.name.split("-")[1]) if resumed else None)


def result_from_dir(out_dir: str | Path, resumed_from: int | None = None) -> TrainResult:
    """What a run left in out_dir (train_log.jsonl, train_summary.json): the distributed path's result."""
    out_dir = Path(out_dir)
    by_step: dict[int, dict] = {}
    log = out_dir / LOG_FILE
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)
        by_step[entry["step"]] = entry  # a resumed run logs again the steps after its checkpoint: last wins
    history = [by_step[k] for k in sorted(by_step)]
    return _result(out_dir, history, history[-1]["step"] if history else 0, _first_loss(history), resumed_from)
