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
import re
import random
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from engine.atomic import atomic_write, atomic_write_bytes
from engine.training import Trainer, TrainerParams, World
from engine.values import BoundedModel
from refine.crossfit import OutsideFold
from refine.dataset import Collator, ShardStream, read_window, validation_split
from schemas.florence2_tasks import TRAINED_TOKENS
from schemas.task_codec import TaskCodec

CHECKPOINTS = "checkpoints"
STATE_TENSORS = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
SUMMARY_FILE = "train_summary.json"
LOG_FILE = "train_log.jsonl"
BEST = "best"  # the weights of the lowest validation loss so far (+ best.json: step and loss)
VAL_EXAMPLES_PER_TASK = 64  # validation examples per task in a validation loss


LR_FROM_RANDOM = 3e-4  # measured: see TrainConfig.lr
LR_PRETRAINED = 1e-5


class TrainConfig(BoundedModel):  # finite numbers, 64-bit integers ("nan" refused)
    """Training hyper-parameters. The defaults learn both from random weights (smoke tests, the
    benchmark) and when fine-tuning real Florence-2 weights; each field says why (docs/refine.md)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch (per worker)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float | None = Field(
        None, gt=0, description="peak LR; null: 3e-4 when round 1 starts from random weights, 1e-5 when it starts from "
        "pretrained ones (later rounds keep round 1's). Measured with this trainer on the benchmark's 7.4M-parameter "
        "Florence-2 from random weights: 3e-4 x 300 steps fits 8 images (all boxes and captions), 1e-3 collapses to "
        "one output for every image and task prompt, 1e-4 learns nothing in 900 steps. 1e-5 is the paper's value for "
        "Florence-2-L and the usual fine-tuning LR of the hub checkpoints: higher LRs wipe what pre-training learned")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay of weight matrices (biases and norms: none); BART's value")
    warmup_steps: int | None = Field(
        None, ge=0, description="linear warm-up; null: 10% of the steps (30 of the measured 300). Adam's moment "
        "estimates are noise in the first steps: a full LR from step 1 is how a model from random weights collapses")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay after the warm-up: cosine to 0 (the Florence-2 paper's and transformers' "
        "default); the last steps at a low LR settle the weights the round keeps")
    max_grad_norm: float = Field(
        1.0, gt=0, description="gradient clipping by global norm (the transformers / BART default): one batch of long "
        "dense targets cannot throw the weights away")
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    log_every: int = Field(10, ge=1)
    task_weights: dict[str, float] | None = Field(
        None, description="per-task sampling: null draws a task uniformly, then an example of it, so <OD> (one example "
        "per image) is not drowned by region tasks (up to max_region_examples per image); a weight makes a task "
        "more frequent")
    hflip_tasks: list[str] = Field(
        default_factory=list, description="tasks whose training examples are mirrored left-right (image and boxes) "
        "in half the draws: more distinct examples from few images. Only box tasks (<OD>, <DENSE_REGION_CAPTION>, "
        "<REGION_PROPOSAL>): a mirrored sign reads backwards and a caption may say left or right. Off by default")
    freeze_vision: bool = Field(False, description="train only the language model + projector (less memory)")
    window_shards: int = Field(1, ge=1, description="shards read into memory at a time (the shuffle window)")
    num_workers: int = Field(1, ge=1, description="training workers (Ray Train DDP on --runner ray; 1 elsewhere)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per training worker on Ray (0: CPU workers)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPU threads per training worker (every runner)")
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of the round's images held out for validation (chosen by a hash of the "
        "image id, never trained on): validation loss, best checkpoint and the health check (refine.health)")
    val_min_images: int = Field(2, ge=0, description="validation images at least (never more than half the images)")
    val_max_images: int = Field(64, ge=0, description="validation images at most (their loss and health check run "
                                "on the main worker)")
    eval_every: int = Field(50, ge=1, description="steps between validation losses (and at the last step)")
    select_best: bool = Field(
        True, description="the round's model is the weights of the lowest validation loss, not the last step's: "
        "a small model on noisy labels overfits them, and the loss on unseen images says when")

    @field_validator("hflip_tasks")
    @classmethod
    def _flippable(cls, v: list[str]) -> list[str]:
        from refine.dataset import FLIPPABLE

        bad = [t for t in v if t not in FLIPPABLE]
        if bad:
            raise ValueError(f"hflip_tasks: {bad} cannot be mirrored; choose among {list(FLIPPABLE)}")
        return v

    def resolved_lr(self, from_random: bool) -> float:
        return self.lr if self.lr is not None else (LR_FROM_RANDOM if from_random else LR_PRETRAINED)

    def resolved_warmup(self) -> int:
        return min(self.steps, self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10))


# Settings that change how training runs but not what it learns: left out of the round's identity.
TRAIN_EXECUTION_SETTINGS = ("checkpoint_every", "keep_checkpoints", "log_every", "gpus_per_worker", "cpus_per_worker",
                            "precision")


class CodecSettings(BoundedModel):  # finite numbers, 64-bit integers ("nan" refused)
    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=lambda: list(TRAINED_TOKENS), min_length=1)
    max_target_tokens: int = Field(1024, ge=8)
    max_region_examples: int = Field(8, ge=1)

    def codec(self) -> TaskCodec:
        return TaskCodec(self.tasks, self.max_target_tokens, self.max_region_examples)


class FoldSpec(BoundedModel):
    model_config = ConfigDict(extra="forbid")

    fold: int = Field(..., ge=0)
    folds: int = Field(..., ge=2)


class Florence2TrainerParams(TrainerParams):
    start: str = Field(..., description="model reference training starts from (hub id, folder, random:...)")
    # when set, `start` is an OUT-relative folder (the previous round's model) read from this store
    # (engine.store.StoreSpec): every training worker copies it from there
    start_store: Any = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    codec: CodecSettings = Field(default_factory=CodecSettings)
    # whether the weights this run's chain started from are random (the LR default); None: `start` says
    from_random: bool | None = None
    fold: FoldSpec | None = Field(None, description="a fold model of cross-fitted relabelling (refine.crossfit): train "
                                  "(and validate) only on the images outside this fold")




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


def _save_checkpoint(model_dir: Path, step: int, *, model, processor, tensors: dict, plain: dict, keep: int) -> Path:
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
    vals = [h for h in history if h.get("val_loss") is not None]
    return {"steps": steps, "first_loss": history[0].get("first_loss", history[0]["loss"]) if history else None,
            "last_loss": last["loss"] if last else None, "loss_by_task": last["tasks"] if last else {},
            "samples_per_s": sum(rates) / len(rates) if rates else None, "resumed_from": resumed_from,
            "examples": dict(sorted(seen.items())),
            "val_loss": vals[-1]["val_loss"] if vals else None, "val_loss_by_task": vals[-1]["val_tasks"] if vals else {}}


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
        from transformers import get_scheduler
        from transformers.models.florence2.modeling_florence2 import shift_tokens_right

        from annotators.florence2_model import Florence2Model
        from engine.models import parse_model_ref

        cfg = self.params.train
        model_dir = model_dir_of(store, job)
        model_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + world.rank)
        random.seed(cfg.seed + world.rank)
        ckpt = latest_checkpoint(model_dir)
        # always built from the start reference, then given the checkpoint's weights: a resumed run then
        # saves exactly the files an uninterrupted one saves (from_pretrained of a checkpoint adds keys)
        start = self.params.start
        from_random = self.params.from_random
        if from_random is None:
            from_random = self.params.start_store is None and parse_model_ref(start).kind == "random"
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
        lr = cfg.resolved_lr(from_random)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
        )
        schedule = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
        scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=cfg.resolved_warmup(), num_training_steps=cfg.steps)
        amp_dtype = _autocast_dtype(cfg.precision, world.device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        codec = self.params.codec.codec()
        fold = self.params.fold
        keep = OutsideFold(fold.fold, fold.folds) if fold is not None else None  # a fold model never sees its fold
        held_out, n_images = validation_split(store, job.input_folder, cfg.val_fraction, cfg.val_min_images,
                                              cfg.val_max_images, keep=keep)
        val_ids = frozenset(i for ids in held_out.values() for i in ids)
        shards = world.shards(store.shards(job.input_folder))
        # longest target (tokens, <s> and </s> included, truncated as in training) per task among the examples
        # of every window the stream loads: what the round trains on sizes its generation (generation_lengths)
        target_tokens: dict[str, int] = {}
        categories: set[str] = set()  # the <OD> categories the round trains on (refine.merge's caption vocabulary)

        def measure(window) -> None:
            for task, examples in window.by_task.items():
                ids = processor.tokenizer([ex.target for ex in examples], truncation=True, max_length=max_target).input_ids
                target_tokens[task] = max(target_tokens.get(task, 0), *map(len, ids))
            for ex in window.by_task.get("<OD>", []):
                categories.update(target_categories(ex.target))

        stream = ShardStream(store, job.input_folder, shards, codec, seed=cfg.seed, rank=world.rank,
                             weights=cfg.task_weights, window_shards=cfg.window_shards, exclude=val_ids, keep=keep,
                             on_window=measure)
        validation = (Validation.read(store, job.input_folder, held_out, codec=codec, processor=processor,
                                      max_target=max_target) if world.main else None)
        start, history = 0, []
        best = {"step": None, "val_loss": None}
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
            best = plain.get("best") or best
            for task, n in (plain.get("target_tokens") or {}).items():
                target_tokens[task] = max(target_tokens.get(task, 0), n)
            categories.update(plain.get("categories") or [])
        net = world.wrap(model) if world.wrap else model
        collate = Collator(processor, stream.image, max_target, flip_tasks=cfg.hflip_tasks, seed=cfg.seed)
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
                batch = collate(examples, key=(step, micro))
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
            evaluate = validation is not None and validation.size and (step % cfg.eval_every == 0 or step == cfg.steps)
            if step % cfg.log_every == 0 or step == cfg.steps or evaluate:
                elapsed = time.perf_counter() - window_t
                entry = {
                    "step": step,
                    "loss": window_loss / max(window_n, 1),
                    "lr": scheduler.get_last_lr()[0],
                    "tasks": {t: s / max(c, 1) for t, (s, c) in sorted(window.items())},
                    "samples_per_s": window_samples * world.size / elapsed if elapsed > 0 else None,
                }
                if evaluate:
                    entry["val_loss"], entry["val_tasks"] = validation.loss(model, world.device, amp_dtype, pad, dstart)
                    model.train()
                    if cfg.select_best and (best["val_loss"] is None or entry["val_loss"] < best["val_loss"]):
                        best = {"step": step, "val_loss": entry["val_loss"]}
                        atomic_write(model_dir / BEST, lambda tmp: model.save_pretrained(tmp))
                if not history:
                    entry["first_loss"] = first_loss
                history.append(entry)
                if world.main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(entry) + "\n")
                if world.report:
                    world.report({k: v for k, v in entry.items() if k not in ("tasks", "val_tasks")})
                window, window_loss, window_n, window_t, window_samples = {}, 0.0, 0, time.perf_counter(), 0
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                rng_tensors, rng_plain = _rng_state()
                workers = world.all_gather({"rng_tensors": rng_tensors, "rng": rng_plain, "data": stream.state(),
                                            "target_tokens": target_tokens, "categories": sorted(categories)})
                for w in workers:
                    for task, n in w["target_tokens"].items():
                        target_tokens[task] = max(target_tokens.get(task, 0), n)
                    categories.update(w["categories"])
                if world.main:
                    _save_checkpoint(model_dir, step, model=model, processor=processor,
                                     tensors={"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                              "rng": [w["rng_tensors"] for w in workers]},
                                     plain={"step": step, "scheduler": scheduler.state_dict(), "history": history,
                                            "config": cfg.model_dump(), "best": best, "target_tokens": target_tokens,
                                            "categories": sorted(categories),
                                            "workers": [{"rng": w["rng"], "data": w["data"]} for w in workers]},
                                     keep=cfg.keep_checkpoints)
                    _publish(store, job, model_dir)
        summary = summary_of(history, step, int(ckpt.name.split("-")[1]) if ckpt else None, stream.seen)
        summary.update(lr=lr, validation={"images": len(val_ids), "train_images": n_images - len(val_ids),
                                          "fraction": cfg.val_fraction},
                       best_step=best["step"], best_val_loss=best["val_loss"], target_tokens=dict(sorted(target_tokens.items())),
                       generation_tokens=generation_lengths(dict(sorted(target_tokens.items()))),
                       categories=sorted(categories))
        if fold is not None:
            summary["cross_fit"] = fold.model_dump()
        if world.main and step >= cfg.steps:
            if cfg.select_best and best["step"] is not None and best["step"] != step and (model_dir / BEST).is_dir():
                _load_weights(model, model_dir / BEST)  # the round's model: the lowest validation loss
            model.eval()
            from refine.health import check_model, unchecked

            summary["model_step"] = best["step"] if cfg.select_best and best["step"] is not None else step
            summary["health"] = (check_model(wrapped, validation.examples, validation.images(), generation_lengths(target_tokens))
                                 if validation is not None and validation.size else unchecked(len(val_ids)))
            wrapped.save(model_dir)  # the final model: a local dir any loader reads
            atomic_write_bytes(model_dir / SUMMARY_FILE, json.dumps(summary, indent=1).encode())
            _publish(store, job, model_dir)
        return summary


def target_categories(target: str) -> set[str]:
    """The category names of an <OD> target (`label<loc_a><loc_b><loc_c><loc_d>...`, schemas.task_codec)."""
    return {" ".join(p.lower().split()) for p in _LOCS.split(target)} - {""}


_LOCS = re.compile(r"(?:<loc_\d+>)+")


def generation_lengths(target_tokens: dict[str, int], margin: float = 1.25, extra: int = 8) -> dict[str, int]:
    """max_new_tokens per task for generating what a round trained on: its longest target + 25% + 8
    (a fixed cap of 96 cut 45% of the benchmark's detailed captions)."""
    return {task: int(n * margin) + extra for task, n in target_tokens.items()}


class Validation:
    """The held-out images' examples and pixels (main worker; at most val_max_images images)."""

    def __init__(self, examples: list, image_bytes: dict[str, bytes], processor, max_target: int):
        self.examples = examples
        self.image_bytes = image_bytes
        self.collate = Collator(processor, image_bytes.__getitem__, max_target)

    @classmethod
    def read(cls, store, folder: str, held_out: dict[str, list[str]], *, codec, processor, max_target: int) -> "Validation":
        ids = {i for v in held_out.values() for i in v}
        window = read_window(store, folder, sorted(held_out), codec, keep=ids.__contains__)
        examples = [ex for task in sorted(window.by_task) for ex in window.by_task[task][:VAL_EXAMPLES_PER_TASK]]
        return cls(examples, window.images, processor, max_target)

    @property
    def size(self) -> int:
        return len(self.examples)

    def images(self) -> dict:
        from engine.stage import decode_image

        return {i: decode_image(b) for i, b in self.image_bytes.items()}

    def loss(self, model, device: str, amp_dtype, pad: int, dstart: int, batch_size: int = 8) -> tuple[float, dict]:
        """Mean token loss over the validation examples, and per task."""
        import torch
        from transformers.models.florence2.modeling_florence2 import shift_tokens_right

        model.eval()
        per_task: dict[str, list[float]] = {}
        with torch.no_grad():
            for start in range(0, self.size, batch_size):
                batch = self.collate(self.examples[start:start + batch_size])
                labels = batch["labels"].to(device)
                with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                pixel_values=batch["pixel_values"].to(device),
                                decoder_input_ids=shift_tokens_right(labels, pad, dstart), use_cache=False)
                sums, counts = token_losses(out.logits, labels)
                for task, s, c in zip(batch["tasks"], sums.tolist(), counts.tolist()):
                    acc = per_task.setdefault(task, [0.0, 0])
                    acc[0] += s
                    acc[1] += c
        total = sum(s for s, _ in per_task.values()) / max(sum(c for _, c in per_task.values()), 1)
        return total, {t: s / max(c, 1) for t, (s, c) in sorted(per_task.items())}


def read_log(model_dir: str | Path) -> list[dict]:
    """train_log.jsonl, the last entry of each step (a resumed run logs again the steps after its checkpoint)."""
    by_step: dict[int, dict] = {}
    log = Path(model_dir) / LOG_FILE
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)
        by_step[entry["step"]] = entry
    return [by_step[k] for k in sorted(by_step)]
