"""Engine-neutral pieces of running a step on one shard; every runner uses these.

A step's shard k reads images/part-k (the first step) or <input folder>/part-k, so every runner
writes the same files with the same rows in the same order. Stages see a shard in the same
batches on every runner (rows [0, b), [b, 2b), ... of the shard, b = the stage's batch size), and
every worker limits its threads to the stage's CPUs, so the numbers are the same too.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

import pyarrow as pa

from engine.counters import delta, merge, snapshot
from engine.stage import IMAGE_BYTES_COLUMN, PIXELS_COLUMN, Stage, records_to_table, with_pixels
from schemas.records import IMAGE_RECORD_SCHEMA, empty_record
from schemas.validate import validate_table

IMAGES = "images"


def initial_records(images: pa.Table) -> pa.Table:
    """Image records a pipeline starts from: no annotations, or the imported (`human`) ones."""
    from engine.ingest.human import human_annotations

    rows = images.select([c for c in images.column_names if c != "bytes"]).to_pylist()
    return records_to_table(human_annotations(empty_record(r), r.get("human")) for r in rows)


def step_input_folder(step_names: list[str], index: int) -> str:
    return IMAGES if index == 0 else f"annotations/{step_names[index - 1]}"


def image_needs(stages: list[Stage]) -> frozenset[str]:
    """Which transient image columns a step's stages read: "pixels" (decoded once) and/or "bytes"."""
    return frozenset(s.image_input for s in stages if s.needs_images)


def transient_columns(needs: frozenset[str]) -> list[str]:
    """The columns attach_images adds for `needs`."""
    return [col for need, col in (("bytes", IMAGE_BYTES_COLUMN), ("pixels", PIXELS_COLUMN)) if need in needs]


# Raw RGB pixels a step holds for a whole shard (3 bytes each): a shard over this (four 13000 x 13000 PNGs
# of 518 KB each were 7.2 GB) is not decoded whole; its stages decode batch by batch instead, so a step holds
# at most max(this, BATCH_PIXEL_BUDGET, one image) pixels at once.
SHARD_PIXEL_BUDGET = 256_000_000


def shard_pixels(records: pa.Table) -> int:
    import pyarrow.compute as pc

    if records.num_rows == 0:
        return 0
    w = records.column("width").cast(pa.int64())
    h = records.column("height").cast(pa.int64())
    return int(pc.sum(pc.multiply(w, h)).as_py() or 0)


def attach_images(records: pa.Table, images: pa.Table, needs: frozenset[str] = frozenset({"pixels"})) -> pa.Table:
    """Add the transient image columns a step needs, joined by image_id (order of `records` kept):
    the pixels decoded once here for every stage of the step, and/or the encoded bytes. A shard whose
    images hold more than SHARD_PIXEL_BUDGET pixels gets the encoded bytes instead of the pixels: each
    stage then decodes its own batches (engine.stage.batch_images), never the whole shard at once."""
    if not needs:
        return records
    by_id = dict(zip(images.column("image_id").to_pylist(), images.column("bytes").to_pylist()))
    ids = records.column("image_id").to_pylist()
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise KeyError(f"{len(missing)} record(s) have no image in images/ (first: {missing[0]})")
    encoded = [by_id[i] for i in ids]
    over_budget = "pixels" in needs and shard_pixels(records) > SHARD_PIXEL_BUDGET
    if "bytes" in needs or over_budget:
        records = records.append_column(IMAGE_BYTES_COLUMN, pa.array(encoded, pa.binary()))
    if "pixels" in needs and not over_budget:
        records = with_pixels(records, encoded)
    return records


def read_step_input(store, input_folder: str, shard: str, needs: frozenset[str]) -> pa.Table:
    """What a step's first stage sees for one shard: its records, plus the image columns its stages
    need. Distributed runners call this inside their read tasks so they see what the local runner sees."""
    images = None
    if input_folder == IMAGES:
        images = store.read_shard(IMAGES, shard)
        records = initial_records(images)
    else:
        records = store.read_shard(input_folder, shard)
    if needs:
        if images is None:
            images = store.read_shard(IMAGES, shard, columns=["image_id", "bytes"])
        records = attach_images(records, images, needs)
    return records


# ------------------------------------------------------------------------- threads
def limit_threads(cpus: float) -> None:
    """A worker uses the CPUs its stage declared. Library defaults (every core) in several workers
    oversubscribe the machine (measured 10-35x slower on 2 busy cores), and a different thread count
    changes float reductions: limiting it on every runner, local included, makes runners agree."""
    import sys

    n = max(1, int(cpus))
    if "torch" in sys.modules or _importable("torch"):
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(n)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------- batches
# Decoded pixels one batch of a stage holds at once (3 bytes each in RGB): a batch of a stage that reads
# images is cut before it passes this, so batch_size 64 of images near ingest.max_pixels never decodes
# 64 x 179 MP; an image over it alone is a batch of its own (ingest's max_pixels already bounds it).
BATCH_PIXEL_BUDGET = 64_000_000


def batch_bounds(rows: int, size: int, first_row: int = 0, pixels: list[int] | None = None,
                 budget: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) slices of a piece of a shard that starts at shard row `first_row`, cut where the
    whole shard is cut (multiples of `size`), so a piece anywhere gets the same batches as the shard.
    With `pixels` (each row's width x height), a batch is also cut before its pixels would pass `budget`
    (BATCH_PIXEL_BUDGET); a row over the budget is a batch alone."""
    size = max(1, size)
    budget = BATCH_PIXEL_BUDGET if budget is None else budget
    bounds, start = [], 0
    while start < rows:
        stop = min(rows, start + size - (first_row + start) % size)
        if pixels is not None:
            held, cut = pixels[start], start + 1
            while cut < stop and held + pixels[cut] <= budget:
                held += pixels[cut]
                cut += 1
            stop = cut
        bounds.append((start, stop))
        start = stop
    return bounds


def row_pixels(table: pa.Table) -> list[int]:
    """width x height of each row of a table of image records (0 where unknown)."""
    return [int(w or 0) * int(h or 0) for w, h in zip(table.column("width").to_pylist(), table.column("height").to_pylist())]


def batches(table: pa.Table, size: int) -> Iterable[pa.Table]:
    for start, stop in batch_bounds(table.num_rows, size):
        yield table.slice(start, stop - start)


def apply_stage(stage: Stage, batch: pa.Table) -> tuple[pa.Table, float]:
    """(the stage's output for one batch, seconds it took); a stage never drops records."""
    t0 = time.perf_counter()
    out = stage(batch)
    seconds = time.perf_counter() - t0
    if out.num_rows != batch.num_rows:
        raise RuntimeError(f"stage {stage.name!r} returned {out.num_rows} records for {batch.num_rows}: stages never drop records")
    return out, seconds


BatchRunner = Callable[[Stage, pa.Table], pa.Table]


def run_stage(stage: Stage, table: pa.Table, counters: dict | None = None, first_row: int = 0,
              on_batch: Callable[[str, int], None] | None = None, apply: BatchRunner | None = None) -> pa.Table:
    """Apply one stage over (a piece of) a shard in its batches, counting what it did.

    `apply(stage, batch) -> out` replaces the plain call (Beam retries a failing batch per element);
    `on_batch(stage name, rows)` reports progress inside a shard."""
    limit_threads(stage.resources.cpus)  # before setup: a model is built with the threads it will run with
    stage.ensure_setup()
    outs = []
    pixels = row_pixels(table) if stage.needs_images and table.num_rows else None  # a batch decodes its images
    for start, stop in batch_bounds(table.num_rows, stage.resources.batch_size, first_row, pixels):
        batch = table.slice(start, stop - start)
        t0 = time.perf_counter()
        out = apply(stage, batch) if apply else apply_stage(stage, batch)[0]
        seconds = time.perf_counter() - t0
        metrics = stage.take_metrics()
        if counters is not None:
            c = merge(counters.setdefault(stage.name, {}), delta(snapshot(batch), snapshot(out), seconds))
            if metrics:
                merge(c.setdefault("metrics", {}), metrics)
        if on_batch is not None:
            on_batch(stage.name, out.num_rows)
        outs.append(out)
    if not outs:
        return table
    return pa.concat_tables(outs)


def finalize(table: pa.Table, name: str) -> pa.Table:
    """Drop the transient columns, order columns as the schema, and validate before writing."""
    table = table.select([f.name for f in IMAGE_RECORD_SCHEMA]).cast(IMAGE_RECORD_SCHEMA)
    validate_table(table, name=name)
    return table


def run_stages(stages: list[Stage], table: pa.Table, counters: dict, first_row: int = 0,
               on_batch: Callable[[str, int], None] | None = None, apply: BatchRunner | None = None) -> pa.Table:
    for stage in stages:
        table = run_stage(stage, table, counters, first_row, on_batch, apply)
    return table


# ------------------------------------------------------------------------- commits
def commit_meta(job, shard: str, runner: str, counters: dict, seconds: float) -> dict:
    """The fields every runner writes into a step shard's commit record (one recipe)."""
    return {"config_hash": job.config_hash, "input_sha256": job.inputs[shard].get("sha256"), "runner": runner,
            "counters": counters, "seconds": round(seconds, 3), **job.meta}


def is_current(output_record: dict | None, config_hash: str, input_record: dict | None, meta: dict | None = None) -> bool:
    """A committed output shard is reused only when it was made with this configuration from the
    input shard as it is now (an input re-ingested or rewritten since makes it pending again), and
    carries the job's meta (e.g. the data hash a round's model was trained on)."""
    if output_record is None or output_record.get("config_hash") != config_hash:
        return False
    if any(output_record.get(k) != v for k, v in (meta or {}).items()):
        return False
    made_from = output_record.get("input_sha256")
    return made_from is None or input_record is None or made_from == input_record.get("sha256")


def run_shard(store, job, stages: list[Stage], shard: str, runner: str,
              on_batch: Callable[[str, int], None] | None = None, apply: BatchRunner | None = None) -> dict:
    """The whole step on one shard, in this process: read, every stage, validate, commit. Returns
    the commit record. What the local runner does per shard, and Beam per element."""
    t0 = time.perf_counter()
    needs = image_needs(stages)
    table = read_step_input(store, job.input_folder, shard, needs)
    counters: dict = {}
    table = run_stages(stages, table, counters, 0, on_batch, apply)
    table = finalize(table, f"{job.output_folder}/{shard}")
    return store.write_shard(job.output_folder, shard, table,
                             commit_meta(job, shard, runner, counters, time.perf_counter() - t0))
