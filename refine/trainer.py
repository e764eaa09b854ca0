"""Native Florence-2 training (transformers' Florence2ForConditionalGeneration), streamed and resumable.

Recipe (docs/florence2.md §3, P §6.1): AdamW, cosine decay after a linear warm-up, gradient
accumulation, bf16 autocast on CUDA (fp16 + GradScaler where bf16 is missing), fp32 on CPU.
Batches come from refine.dataset.ShardStream, a window of shards at a time, as a pure function
of (seed, step, worker, window position), so a run killed at any point and restarted continues
from its last checkpoint with the same model, optimizer, scheduler, RNG states, step and data
position, and sees the batches it would have seen.

`Florence2Trainer` implements the engine's trainer contract (engine.training): the runner runs it
in-process or as N workers (Ray Train, DDP: each worker reads its own part of the shards); this
module knows nothing of Ray.

Layout of the model folder (OUT/models/round<k>/):
    checkpoints/step-00000200/   model + processor (save_pretrained: safetensors + JSON),
                                 trainer_state.pt (tensors only: optimizer, grad scaler, torch RNG;
                                 loaded with weights_only=True) + trainer_state.json (step, Python
                                 and NumPy RNG, scheduler, data positions, history)
    train_log.jsonl              one line per logged step: loss, lr, loss per task, samples/s
    config.json, model.safetensors, processor files, train_summary.json   the final model
Nothing executable is ever unpickled from OUT.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.atomic import atomic_write, atomic_write_bytes
from engine.training import Trainer, TrainerParams, World
from refine.dataset import Collator, ShardStream
from schemas.florence2_tasks import TRAINED_TOKENS
from schemas.task_codec import TaskCodec

CHECKPOINTS = "checkpoints"
STATE_TENSORS = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
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
    freeze_vision: bool = Field(False, description="train only the language model + projector (less memory)")
    window_shards: int = Field(1, ge=1, description="shards read into memory at a time (the shuffle window)")
    num_workers: int = Field(1, ge=1, description="training workers (Ray Train DDP on --runner ray; 1 elsewhere)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per training worker on Ray (0: CPU workers)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPU threads per training worker (every runner)")


# Settings that change how training runs but not what it learns: left out of the round's identity.
TRAIN_EXECUTION_SETTINGS = ("checkpoint_every", "keep_checkpoints", "log_every", "gpus_per_worker", "cpus_per_worker",
                            "precision")


class CodecSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=lambda: list(TRAINED_TOKENS), min_length=1)
    max_target_tokens: int = Field(1024, ge=8)
    max_region_examples: int = Field(8, ge=1)

    def codec(self) -> TaskCodec:
        return TaskCodec(self.tasks, self.max_target_tokens, self.max_region_examples)


class Florence2TrainerParams(TrainerParams):
    start: str = Field(..., description="model reference training starts from (hub id, folder, random:...)")
    # when set, `start` is an OUT-relative folder (the previous round's model) read from this store
    # (engine.store.StoreSpec): every training worker copies it from there
    start_store: Any = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    codec: CodecSettings = Field(default_factory=CodecSettings)


# ------------------------------------------------------------------------ checkpoints
def checkpoint_dirs(model_dir: str | Path) -> list[Path]:
    """Complete checkpoints (both state files exist), oldest first."""
    root = Path(model_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_JSON).exists() and (p / STATE_TENSORS).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(model_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(model_dir)
    return dirs[-1] if dirs else None


def _rng_state() -> tuple[dict, dict]:
    """(tensors, JSON) of this process's RNG states."""
    import numpy as np
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(tensors: dict, plain: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))


def _save_checkpoint(model_dir: Path, step: int, model, processor, tensors: dict, plain: dict, keep: int) -> Path:
    """Written atomically (engine.atomic): a kill mid-save leaves the previous checkpoints intact."""
    import torch

    root = model_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)  # safetensors
        processor.save_pretrained(tmp)
        torch.save(tensors, Path(tmp) / STATE_TENSORS)
        (Path(tmp) / STATE_JSON).write_text(json.dumps(plain))

    atomic_write(final, write)
    for old in checkpoint_dirs(model_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_weights(model, ckpt: Path) -> None:
    """The checkpoint's safetensors into `model`; keys it leaves out must be ties of loaded ones."""
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {model.get_parameter(k).data_ptr() for k in state if k in dict(model.named_parameters())}
    untied = [k for k in missing if model.get_parameter(k).data_ptr() not in loaded]
    if unexpected or untied:
        raise ValueError(f"{ckpt}: checkpoint does not fit the model (unexpected {unexpected[:3]}, missing {untied[:3]})")


def _load_state(ckpt: Path) -> tuple[dict, dict]:
    import torch

    return torch.load(ckpt / STATE_TENSORS, map_location="cpu", weights_only=True), json.loads((ckpt / STATE_JSON).read_text())


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


def summary_of(history: list[dict], steps: int, resumed_from: int | None, seen: dict[str, int]) -> dict:
    """The run's summary from its log entries: first / last loss, per-task losses, mean samples/s."""
    last = history[-1] if history else None
    rates = [h["samples_per_s"] for h in history if h.get("samples_per_s")]
    return {"steps": steps, "first_loss": history[0].get("first_loss", history[0]["loss"]) if history else None,
            "last_loss": last["loss"] if last else None, "loss_by_task": last["tasks"] if last else {},
            "samples_per_s": sum(rates) / len(rates) if rates else None, "resumed_from": resumed_from,
            "examples": dict(sorted(seen.items()))}


def model_dir_of(store, job) -> Path:
    """A local folder for job.model_folder: the folder itself on a local OUT; on an object store a
    local copy (its checkpoints come along, so a resumed run continues), published with `_publish`."""
    return Path(store.local_dir(job.model_folder))


def _publish(store, job, model_dir: Path) -> None:
    """An object-store OUT gets the local model folder (checkpoints, log, final model) copied up."""
    if not store.local:
        store.upload_dir(model_dir, job.model_folder)


# ------------------------------------------------------------------------------ trainer
class Florence2Trainer(Trainer):
    """Trains Florence-2 on a folder's kept annotations (stage 3), the engine's trainer contract."""

    name = "florence2_trainer"
    Params = Florence2TrainerParams

    params: Florence2TrainerParams

    def finished(self, store, job) -> dict | None:
        summary = store.read_json(f"{job.model_folder}/{SUMMARY_FILE}")
        if summary is None or not store.exists(f"{job.model_folder}/config.json"):
            return None
        return summary if summary.get("steps") == self.params.train.steps else None

    def fit(self, store, job, world: World, stop_after: int | None = None) -> dict:
        """Train (or resume) on job.input_folder into job.model_folder. `stop_after`: stop at that
        step without the final save, as a kill would (tests of resumption)."""
        import torch
        from transformers import get_cosine_schedule_with_warmup
        from transformers.models.florence2.modeling_florence2 import shift_tokens_right

        from annotators.florence2_model import Florence2Model

        cfg = self.params.train
        model_dir = model_dir_of(store, job)
        model_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + world.rank)
        random.seed(cfg.seed + world.rank)
        ckpt = latest_checkpoint(model_dir)
        # always built from the start reference, then given the checkpoint's weights: a resumed run then
        # saves exactly the files an uninterrupted one saves (from_pretrained of a checkpoint adds keys)
        start = self.params.start
        if self.params.start_store is not None:
            from engine.store import ShardStore

            start = ShardStore.from_spec(self.params.start_store).local_dir(start)
        wrapped = Florence2Model.load(start, device=world.device, dtype="float32")
        model, processor = wrapped.model, wrapped.processor
        if ckpt is not None:
            _load_weights(model, ckpt)
        text_cfg = model.config.text_config
        max_target = min(self.params.codec.max_target_tokens, text_cfg.max_position_embeddings)
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
        shards = world.shards(store.shards(job.input_folder))
        stream = ShardStream(store, job.input_folder, shards, self.params.codec.codec(), cfg.seed, world.rank,
                             cfg.task_weights, cfg.window_shards)
        start, history = 0, []
        if ckpt is not None:
            tensors, plain = _load_state(ckpt)
            if plain["config"].get("steps") != cfg.steps:
                raise ValueError(f"{ckpt}: checkpoint of a {plain['config']['steps']}-step run; this run asks {cfg.steps} steps")
            optimizer.load_state_dict(tensors["optimizer"])
            scaler.load_state_dict(tensors["scaler"])
            scheduler.load_state_dict(plain["scheduler"])
            rank = min(world.rank, len(plain["workers"]) - 1)
            _set_rng_state(tensors["rng"][rank], plain["workers"][rank]["rng"])
            stream.restore(plain["workers"][rank]["data"])
            start, history = plain["step"], plain["history"]
        net = world.wrap(model) if world.wrap else model
        collate = Collator(processor, stream.image, max_target)
        pad, dstart = text_cfg.pad_token_id, text_cfg.decoder_start_token_id

        log_path = model_dir / LOG_FILE
        window: dict[str, list[float]] = {}
        window_loss, window_n, window_t, window_samples = 0.0, 0, time.perf_counter(), 0
        first_loss = history[0].get("first_loss", history[0]["loss"]) if history else None
        step = start
        while step < cfg.steps:
            if stop_after is not None and step >= stop_after:
                break
            batch_sum, batch_tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                examples = stream.batch(step, micro, cfg.batch_size)
                batch = collate(examples)
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
                window_samples += len(examples)
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
                    world.report({k: v for k, v in entry.items() if k != "tasks"})
                window, window_loss, window_n, window_t, window_samples = {}, 0.0, 0, time.perf_counter(), 0
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                rng_tensors, rng_plain = _rng_state()
                workers = world.all_gather({"rng_tensors": rng_tensors, "rng": rng_plain, "data": stream.state()})
                if world.main:
                    _save_checkpoint(model_dir, step, model, processor,
                                     {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                      "rng": [w["rng_tensors"] for w in workers]},
                                     {"step": step, "scheduler": scheduler.state_dict(), "history": history,
                                      "config": cfg.model_dump(), "workers": [{"rng": w["rng"], "data": w["data"]}
                                                                              for w in workers]},
                                     cfg.keep_checkpoints)
                    _publish(store, job, model_dir)
        summary = summary_of(history, step, int(ckpt.name.split("-")[1]) if ckpt else None, stream.seen)
        if world.main and step >= cfg.steps:
            model.eval()
            wrapped.save(model_dir)  # the final model: a local dir any loader reads
            atomic_write_bytes(model_dir / SUMMARY_FILE, json.dumps(summary, indent=1).encode())
            _publish(store, job, model_dir)
        return summary


def read_log(model_dir: str | Path) -> list[dict]:
    """train_log.jsonl, the last entry of each step (a resumed run logs again the steps after its checkpoint)."""
    by_step: dict[int, dict] = {}
    log = Path(model_dir) / LOG_FILE
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)
        by_step[entry["step"]] = entry
    return [by_step[k] for k in sorted(by_step)]
