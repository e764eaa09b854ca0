"""Training data of a refinement round, streamed from the shards: a bounded window of shards at a time.

A worker reads ITS shards of the annotation folder (World.shards: round-robin by rank), in an
order shuffled per epoch with the seed, a window of `window_shards` shards at a time: the window's
records are encoded by the task codec and joined with images/part-k (same shard index, same
rows), so memory holds one window, never the dataset. Within a window each example first draws a
task (uniform, or by `task_weights`), then an example of that task (per-task streams: `<OD>` with
one example per image is not drowned by region tasks with up to eight). A window serves as many
draws as it has examples, then the next one is loaded.

Why draws indexed by (seed, step, micro-batch, rank): the batch of a step is a pure function of
the seed and the window position, so a run resumed from a checkpoint, which stores the position
(epoch, window, draws), sees exactly the batches it would have seen.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

from engine.stage import decode_image, table_to_records
from schemas.task_codec import Example, TaskCodec

IMAGES = "images"


class NoExamplesError(ValueError):
    """The training data holds no example of any task (no kept annotations to learn from)."""


@dataclass
class Window:
    """The examples of a few shards, by task, and the bytes of their images."""

    by_task: dict[str, list[Example]]
    images: dict[str, bytes]

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.by_task.values())


def validation_split(store, folder: str, fraction: float, min_images: int,
                     max_images: int, *, keep: Callable[[str], bool] | None = None) -> tuple[dict[str, list[str]], int]:
    """The round's validation images (shard -> image ids) and the folder's image count: the ceil(fraction x n) images (at least
    `min_images`, at most `max_images`, never more than half) with the lowest sha256 of
    "validation:<image_id>". A function of the image ids alone, so every worker, a resumed run and
    a rerun on another shard layout hold out the same images (read: the image_id column only), except
    that a shard never becomes validation only (its last image stays a training image). `keep`: the
    images that take part (a fold model's: those of the other folds, refine.crossfit); n counts them."""
    ids: dict[str, str] = {}
    for shard in store.shards(folder):
        for image_id in store.read_shard(folder, shard, columns=["image_id"]).column("image_id").to_pylist():
            if keep is None or keep(image_id):
                ids[image_id] = shard
    n = len(ids)
    count = 0 if fraction <= 0 else min(max(math.ceil(round(fraction * n, 6)), min_images), max_images, n // 2)
    rank = {i: hashlib.sha256(f"validation:{i}".encode()).hexdigest() for i in ids}
    chosen = sorted(ids, key=rank.__getitem__)[:count]
    out: dict[str, list[str]] = {}
    for image_id in sorted(chosen):
        out.setdefault(ids[image_id], []).append(image_id)
    sizes = Counter(ids.values())
    for shard, held in out.items():
        if len(held) == sizes[shard]:  # a training worker reads whole shards: none may be validation only
            held.remove(max(held, key=rank.__getitem__))
    return {s: held for s, held in out.items() if held}, n


def read_window(store, folder: str, shards: Sequence[str], codec: TaskCodec,
                keep: Callable[[str], bool] | None = None) -> Window:
    """Annotation shards of `folder` joined with images/ by shard index (row k with row k); `keep`:
    which image ids take part (the training stream leaves the validation images out)."""
    by_task: dict[str, list[Example]] = {}
    images: dict[str, bytes] = {}
    for shard in shards:
        records = table_to_records(store.read_shard(folder, shard))
        if keep is not None:
            records = [r for r in records if keep(r["image_id"])]
        examples = codec.encode_all(records)
        wanted = {ex.image_id for ex in examples}
        if not wanted:
            continue
        pixels = store.read_shard(IMAGES, shard, columns=["image_id", "bytes"])
        for image_id, data in zip(pixels.column("image_id").to_pylist(), pixels.column("bytes").to_pylist()):
            if image_id in wanted:
                images[image_id] = data
        missing = wanted - set(images)
        if missing:
            raise KeyError(f"{folder}/{shard}: {len(missing)} annotated image(s) are not in images/{shard} "
                           f"(first: {sorted(missing)[0]})")
        for ex in examples:
            by_task.setdefault(ex.task, []).append(ex)
    return Window(by_task, images)


class ShardStream:
    """Task-balanced draws from a window over this worker's shards; position is checkpointable."""

    def __init__(self, store, folder: str, shards: Sequence[str], codec: TaskCodec, *, seed: int = 0, rank: int = 0,
                 weights: dict[str, float] | None = None, window_shards: int = 1,
                 exclude: frozenset[str] = frozenset(), keep: Callable[[str], bool] | None = None,
                 on_window: Callable[[Window], None] | None = None):
        if not shards:
            raise NoExamplesError(f"{folder}: no shard to train on for worker {rank}")
        self.store, self.folder, self.shards, self.codec = store, folder, list(shards), codec
        self.seed, self.rank, self.weights = seed, rank, dict(weights or {})
        self.window_shards = max(1, window_shards)
        self.exclude = frozenset(exclude)  # image ids never drawn (the round's validation images)
        self.keep = keep  # which images may be drawn at all (a fold model: the other folds' images)
        self.on_window = on_window  # told of every window loaded (the trainer measures its targets)
        self.position = {"epoch": 0, "window": 0, "draws": 0}
        self.window: Window | None = None
        self.seen: dict[str, int] = {}  # draws per task in this run (the summary's "examples")

    # --------------------------------------------------------------- windows
    def _order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        random.Random(f"{self.seed}:{self.rank}:{epoch}").shuffle(order)
        return order

    def _windows_per_epoch(self) -> int:
        return -(-len(self.shards) // self.window_shards)

    def _load(self) -> None:
        """Load the window at the current position, skipping windows without examples."""
        for _ in range(self._windows_per_epoch() + 1):
            p = self.position
            order = self._order(p["epoch"])
            start = p["window"] * self.window_shards
            self.window = read_window(self.store, self.folder, order[start:start + self.window_shards], self.codec,
                                      self._drawable if self.exclude or self.keep else None)
            if self.window.size:
                if self.on_window is not None:
                    self.on_window(self.window)
                unknown = sorted(set(self.weights) - set(self.codec.tasks))
                if unknown:
                    raise ValueError(f"task_weights name task(s) the codec does not train: {unknown}")
                return
            self._advance()
        raise NoExamplesError(f"{self.folder}: none of worker {self.rank}'s {len(self.shards)} shards holds a "
                              "kept annotation to train on")

    def _drawable(self, image_id: str) -> bool:
        return image_id not in self.exclude and (self.keep is None or self.keep(image_id))

    def _advance(self) -> None:
        p = self.position
        p["draws"] = 0
        p["window"] += 1
        if p["window"] >= self._windows_per_epoch():
            p["window"] = 0
            p["epoch"] += 1

    # ----------------------------------------------------------------- draws
    def batch(self, step: int, micro: int, size: int) -> list[Example]:
        rng = random.Random(f"{self.seed}:{step}:{micro}:{self.rank}")
        out = []
        self._batch_images: dict[str, bytes] = {}  # a batch may span two windows: keep its images
        for _ in range(size):
            if self.window is None:
                self._load()
            elif self.position["draws"] >= self.window.size:
                self._advance()
                self._load()
            tasks = sorted(t for t, v in self.window.by_task.items() if v)
            weights = [float(self.weights.get(t, 1.0)) for t in tasks]
            if not any(w > 0 for w in weights):
                raise ValueError(f"task_weights give no positive weight to the tasks of this window: {tasks}")
            task = rng.choices(tasks, weights=weights)[0]
            example = rng.choice(self.window.by_task[task])
            self._batch_images[example.image_id] = self.window.images[example.image_id]
            out.append(example)
            self.position["draws"] += 1
            self.seen[task] = self.seen.get(task, 0) + 1
        return out

    def image(self, image_id: str) -> bytes:
        """Encoded bytes of an image of the last batch."""
        return self._batch_images[image_id]

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return dict(self.position)

    def restore(self, state: dict) -> None:
        self.position = {k: int(state[k]) for k in ("epoch", "window", "draws")}
        self.window = None
        if self.position["draws"]:  # mid-window: reload it now, then continue where the draws stopped
            self._load()


# tasks whose targets are labels + boxes only: mirroring the image and the boxes keeps them true
# (OCR would mirror the glyphs; captions may say left / right)
FLIPPABLE = ("<OD>", "<DENSE_REGION_CAPTION>", "<REGION_PROPOSAL>")
_BOX_TOKENS = re.compile(r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>")
LOC_BINS = 1000


def flip_target(target: str) -> str:
    """A box target (`label<loc_x0><loc_y0><loc_x1><loc_y1>...`) of the left-right mirrored image: each
    x bin b becomes LOC_BINS - 1 - b, x0 and x1 trade places."""
    def mirror(m: re.Match) -> str:
        x0, y0, x1, y1 = (int(v) for v in m.groups())
        return f"<loc_{LOC_BINS - 1 - x1}><loc_{y0}><loc_{LOC_BINS - 1 - x0}><loc_{y1}>"

    return _BOX_TOKENS.sub(mirror, target)


def flipped(seed: int, key, index: int) -> bool:
    """Whether example `index` of the micro-batch `key` (step, micro) is mirrored: a hash, so a resumed
    run mirrors the same examples."""
    return hashlib.sha256(f"flip:{seed}:{key}:{index}".encode()).digest()[0] & 1 == 1


class Collator:
    """Examples -> processor inputs + labels (pad -> -100), with a small cache of decoded images.
    `flip_tasks`: examples of these tasks (FLIPPABLE) are mirrored left-right, image and boxes, in half
    of the training micro-batches' draws (augmentation against memorising a few hundred images)."""

    def __init__(self, processor, image_bytes, max_target_tokens: int = 1024, cache_size: int = 256,
                 flip_tasks: Sequence[str] = (), seed: int = 0):
        self.processor = processor
        self.image_bytes = image_bytes  # image_id -> encoded bytes (the stream's current window)
        self.max_target_tokens = max_target_tokens
        self._cache: OrderedDict[str, object] = OrderedDict()
        self.cache_size = cache_size
        self.flip_tasks, self.seed = frozenset(flip_tasks), seed

    def image(self, image_id: str):
        img = self._cache.get(image_id)
        if img is None:
            img = decode_image(self.image_bytes(image_id))
            self._cache[image_id] = img
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(image_id)
        return img

    def __call__(self, examples: Sequence[Example], key=None) -> dict:
        """`key` (step, micro) of a training micro-batch: flip_tasks' examples may be mirrored; None: never."""
        tok = self.processor.tokenizer
        images, targets = [], []
        for i, ex in enumerate(examples):
            img, target = self.image(ex.image_id), ex.target
            if key is not None and ex.task in self.flip_tasks and flipped(self.seed, key, i):
                from PIL import ImageOps

                img, target = ImageOps.mirror(img), flip_target(target)
            images.append(img)
            targets.append(target)
        inputs = self.processor(
            text=[ex.prompt for ex in examples],
            images=images,
            return_tensors="pt",
            padding=True,
        )
        labels = tok(
            targets,  # the tokenizer adds <s> ... </s>
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_target_tokens,
        ).input_ids
        labels[labels == tok.pad_token_id] = -100
        return {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "pixel_values": inputs["pixel_values"],
            "labels": labels,
            "tasks": [ex.task for ex in examples],
        }
