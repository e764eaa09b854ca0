"""Engine-neutral pieces of running a step on one shard; every runner uses these.

A step's shard k reads images/part-k (step 0) or annotations/<previous step>/part-k, so
every runner writes the same files with the same rows in the same order.
"""
from __future__ import annotations

import time
from typing import Iterable

import pyarrow as pa

from engine.counters import delta, merge, snapshot
from engine.stage import IMAGE_BYTES_COLUMN, PIXELS_COLUMN, Stage, records_to_table, with_pixels
from schemas.records import IMAGE_RECORD_SCHEMA, empty_record
from schemas.validate import validate_table


def initial_records(images: pa.Table) -> pa.Table:
    """Image records a pipeline starts from: no annotations, or the imported (`human`) ones."""
    from engine.ingest.human import human_annotations

    rows = images.select([c for c in images.column_names if c != "bytes"]).to_pylist()
    return records_to_table(human_annotations(empty_record(r), r.get("human")) for r in rows)


def step_input_folder(step_names: list[str], index: int) -> str:
    return "images" if index == 0 else f"annotations/{step_names[index - 1]}"


def image_needs(stages: list[Stage]) -> frozenset[str]:
    """Which transient image columns a step's stages read: "pixels" (decoded once) and/or "bytes"."""
    return frozenset(s.image_input for s in stages if s.needs_images)


def transient_columns(needs: frozenset[str]) -> list[str]:
    """The columns attach_images adds for `needs`."""
    return [col for need, col in (("bytes", IMAGE_BYTES_COLUMN), ("pixels", PIXELS_COLUMN)) if need in needs]


def attach_images(records: pa.Table, images: pa.Table, needs: frozenset[str] = frozenset({"pixels"})) -> pa.Table:
    """Add the transient image columns a step needs, joined by image_id (order of `records` kept):
    the pixels decoded once here for every stage of the step, and/or the encoded bytes."""
    if not needs:
        return records
    by_id = dict(zip(images.column("image_id").to_pylist(), images.column("bytes").to_pylist()))
    ids = records.column("image_id").to_pylist()
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise KeyError(f"{len(missing)} record(s) have no image in images/ (first: {missing[0]})")
    encoded = [by_id[i] for i in ids]
    if "bytes" in needs:
        records = records.append_column(IMAGE_BYTES_COLUMN, pa.array(encoded, pa.binary()))
    if "pixels" in needs:
        records = with_pixels(records, encoded)
    return records


def step_input_table(store, step_index: int, input_folder: str, needs: frozenset[str], shard: str) -> pa.Table:
    """What a step's first stage sees for one shard: its records, plus the image columns its stages
    need. Distributed runners call this inside their read tasks so they see what the local runner sees."""
    images = None
    if step_index == 0:
        images = store.read_shard("images", shard)
        records = initial_records(images)
    else:
        records = store.read_shard(input_folder, shard)
    if needs:
        if images is None:
            images = store.read_shard("images", shard, columns=["image_id", "bytes"])
        records = attach_images(records, images, needs)
    return records


def batches(table: pa.Table, size: int) -> Iterable[pa.Table]:
    for start in range(0, table.num_rows, max(1, size)):
        yield table.slice(start, size)


def apply_stage(stage: Stage, batch: pa.Table) -> tuple[pa.Table, float]:
    """(the stage's output for one batch, seconds it took); a stage never drops records."""
    t0 = time.perf_counter()
    out = stage(batch)
    seconds = time.perf_counter() - t0
    if out.num_rows != batch.num_rows:
        raise RuntimeError(f"stage {stage.name!r} returned {out.num_rows} records for {batch.num_rows}: stages never drop records")
    return out, seconds


def run_stage(stage: Stage, table: pa.Table, counters: dict | None = None) -> pa.Table:
    """Apply one stage over a table in batches of its declared size, counting what it did."""
    stage.ensure_setup()
    outs = []
    for batch in batches(table, stage.resources.batch_size):
        out, seconds = apply_stage(stage, batch)
        if counters is not None:
            merge(counters.setdefault(stage.name, {}), delta(snapshot(batch), snapshot(out), seconds))
        outs.append(out)
    if not outs:
        return table
    return pa.concat_tables(outs)


def finalize(table: pa.Table, name: str) -> pa.Table:
    """Drop the image column, order columns as the schema, and validate before writing."""
    table = table.select([f.name for f in IMAGE_RECORD_SCHEMA]).cast(IMAGE_RECORD_SCHEMA)
    validate_table(table, name=name)
    return table


def run_stages_on_shard(stages: list[Stage], table: pa.Table, name: str) -> tuple[pa.Table, dict]:
    """The whole step on one shard (its step_input_table), in-process: what the local runner calls."""
    counters: dict = {}
    for stage in stages:
        table = run_stage(stage, table, counters)
    return finalize(table, name), counters
