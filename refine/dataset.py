"""Training data of a refinement round: annotation shards joined with image bytes by image_id,
encoded by the task codec, sampled task-balanced, collated for Florence-2.

Why a deterministic sampler indexed by (step, micro-batch, rank) instead of a DataLoader
iterator: the batch of any step is a pure function of the seed, so a run resumed from a
checkpoint sees exactly the batches it would have seen (no iterator state to save), and Ray
Train workers draw disjoint streams by rank without a distributed sampler.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from engine.stage import decode_image, table_to_records
from refine.task_codec import Example, TaskCodec


@dataclass
class ExampleSet:
    """Examples plus the bytes of the images they reference (held once per image)."""

    examples: list[Example]
    images: dict[str, bytes]
    by_task: dict[str, list[int]] = field(init=False)  # task -> indices of its examples

    def __post_init__(self) -> None:
        missing = sorted({ex.image_id for ex in self.examples} - set(self.images))
        if missing:
            raise KeyError(f"{len(missing)} example image(s) have no bytes in images/ (first: {missing[0]})")
        self.by_task = {}
        for i, ex in enumerate(self.examples):
            self.by_task.setdefault(ex.task, []).append(i)

    def __len__(self) -> int:
        return len(self.examples)

    def counts(self) -> dict[str, int]:
        return {t: len(v) for t, v in sorted(self.by_task.items())}


def examples_from_tables(records: pa.Table | Iterable[dict], images: pa.Table, codec: TaskCodec) -> ExampleSet:
    """records: IMAGE_RECORD_SCHEMA rows (a table or dicts); images: IMAGES_SCHEMA (image_id, bytes)."""
    rows = table_to_records(records) if isinstance(records, pa.Table) else list(records)
    examples = codec.encode_all(rows)
    wanted = {ex.image_id for ex in examples}
    ids = images.column("image_id").to_pylist()
    data = images.column("bytes").to_pylist()
    return ExampleSet(examples, {i: b for i, b in zip(ids, data) if i in wanted})


def read_folder(files: Sequence[str | Path], columns: list[str] | None = None) -> pa.Table:
    if not files:
        raise FileNotFoundError("no Parquet shards to read")
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def examples_from_store(out: str | Path, folder: str, codec: TaskCodec) -> ExampleSet:
    """Committed shards of OUT/<folder> (annotations) joined with OUT/images/ by image_id."""
    from engine.store import ShardStore

    store = ShardStore(out)
    ann_files = store.shard_files(folder)
    if not ann_files:
        raise FileNotFoundError(f"{Path(out) / folder}: no committed annotation shards to train on")
    records = read_folder(ann_files)
    images = read_folder(store.shard_files("images"), columns=["image_id", "bytes"])
    return examples_from_tables(records, images, codec)


class TaskBalancedSampler:
    """Each example of a batch first draws a task (uniform, or by `weights`), then an example of it.

    Uniform over tasks because per-image tasks (one <OD> per image) are orders of magnitude
    rarer than per-region ones (<REGION_TO_DESCRIPTION>): sampling by count would starve them.
    """

    def __init__(self, by_task: dict[str, list[int]], seed: int = 0, weights: dict[str, float] | None = None):
        self.tasks = sorted(t for t, idx in by_task.items() if idx)
        if not self.tasks:
            raise ValueError("no training examples: every task is empty (are there kept annotations?)")
        weights = weights or {}
        unknown = sorted(set(weights) - set(by_task))
        if unknown:
            raise ValueError(f"task_weights name task(s) without examples: {unknown}; have {self.tasks}")
        self.weights = [float(weights.get(t, 1.0)) for t in self.tasks]
        if not any(w > 0 for w in self.weights):
            raise ValueError("task_weights: at least one task needs a positive weight")
        self.by_task = by_task
        self.seed = seed

    def batch(self, step: int, micro: int, size: int, rank: int = 0) -> list[int]:
        rng = random.Random(f"{self.seed}:{step}:{micro}:{rank}")
        out = []
        for _ in range(size):
            task = rng.choices(self.tasks, weights=self.weights)[0]
            out.append(rng.choice(self.by_task[task]))
        return out


class Collator:
    """Examples -> processor inputs + labels (pad -> -100), with a small cache of decoded images."""

    def __init__(self, processor, images: dict[str, bytes], max_target_tokens: int = 1024, cache_size: int = 512):
        self.processor = processor
        self.images = images
        self.max_target_tokens = max_target_tokens
        self._cache: OrderedDict[str, object] = OrderedDict()
        self.cache_size = cache_size

    def image(self, image_id: str):
        img = self._cache.get(image_id)
        if img is None:
            img = decode_image(self.images[image_id])
            self._cache[image_id] = img
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(image_id)
        return img

    def __call__(self, examples: Sequence[Example]) -> dict:
        tok = self.processor.tokenizer
        inputs = self.processor(
            text=[ex.prompt for ex in examples],
            images=[self.image(ex.image_id) for ex in examples],
            return_tensors="pt",
            padding=True,
        )
        labels = tok(
            [ex.target for ex in examples],  # the tokenizer adds <s> ... </s>
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
