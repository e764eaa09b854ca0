"""Rows tagged with where they came from, so distributed engines write the local runner's files.

Ray and Beam reorder rows freely (streaming, bundles, actor pools). Every row therefore
carries its input shard, its row index in that shard and the per-stage counters of the
batches it went through. The shard writer groups rows by shard, restores the input order,
checks that every row arrived exactly once, sums the counters and commits the shard: the same
file, rows and counters the local runner writes, with no coordinator between workers.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from engine.counters import delta, merge, snapshot
from engine.execute import apply_stage, finalize, step_input_table
from engine.stage import TRANSIENT_COLUMNS, Stage
from schemas.records import IMAGE_RECORD_SCHEMA

SHARD_COLUMN = "__fld_shard"
ROW_COLUMN = "__fld_row"
COUNTERS_COLUMN = "__fld_counters"  # JSON {stage: counters} on one row per (batch, shard), else null
TAG_COLUMNS = (SHARD_COLUMN, ROW_COLUMN, COUNTERS_COLUMN)


@dataclass(frozen=True)
class StageRecipe:
    """How a worker rebuilds a stage: class, params as written in pipelines.yaml, model aliases.

    The class travels by pickle (cloudpickle), so a stage needs no registry lookup on workers.
    """

    cls: type
    params: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        payload = json.dumps([self.cls.__module__, self.cls.__qualname__, self.params, self.models], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def build(self) -> Stage:
        return self.cls(dict(self.params), models=dict(self.models))


_WORKER_STAGES: dict[str, Stage] = {}


def limit_torch_threads(cpus: float) -> None:
    """A worker uses the CPUs its stage declared: torch's default (every core) in each of several
    actors oversubscribes the machine, measured 10-35x slower on 2 busy cores."""
    import sys

    if "torch" in sys.modules or _torch_available():
        import torch

        torch.set_num_threads(max(1, int(cpus)))


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def worker_stage(recipe: StageRecipe) -> Stage:
    """One set-up stage per worker process and recipe: models load once, not once per task/bundle."""
    stage = _WORKER_STAGES.get(recipe.key)
    if stage is None:
        stage = recipe.build()
        limit_torch_threads(stage.resources.cpus)
        stage.ensure_setup()
        _WORKER_STAGES[recipe.key] = stage
    return stage


def step_recipes(job) -> tuple[list[Stage], list[StageRecipe]]:
    """Driver-side stages (for resources) and the recipes workers rebuild them from."""
    stages = job.pipeline.build_stages(job.step)
    recipes = [StageRecipe(type(s), dict(spec.params), dict(job.pipeline.models)) for s, spec in zip(stages, job.step.stages)]
    return stages, recipes


def input_row_counts(store, job) -> dict[str, int]:
    """Rows of each pending input shard, from its commit record: how a writer knows a shard is complete."""
    rows = {}
    for shard in job.shards:
        rec = store.commit_record(job.input_folder, shard)
        if rec is None:
            raise RuntimeError(f"{store.out}/{job.input_folder}/{shard} has no commit record: input shard not committed")
        rows[shard] = int(rec["rows"])
    return rows


def tag(table: pa.Table, shard: str, first_row: int) -> pa.Table:
    n = table.num_rows
    return (
        table.append_column(SHARD_COLUMN, pa.array([shard] * n, pa.string()))
        .append_column(ROW_COLUMN, pa.array(range(first_row, first_row + n), pa.int64()))
        .append_column(COUNTERS_COLUMN, pa.nulls(n, pa.string()))
    )


def empty_part(shard: str) -> pa.Table:
    """A tagged table of no rows: what an empty input shard assembles from."""
    return tag(IMAGE_RECORD_SCHEMA.empty_table(), shard, 0)


def read_tagged_chunk(store, step_index: int, input_folder: str, needs: frozenset[str], shard: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of one input shard, tagged; what a distributed read task emits."""
    table = step_input_table(store, step_index, input_folder, needs, shard)
    return tag(table.slice(start, stop - start), shard, start)


def chunk_bounds(rows: int, chunks: int) -> list[tuple[int, int]]:
    chunks = max(1, min(chunks, rows))
    size = -(-rows // chunks) if rows else 0
    return [(s, min(s + size, rows)) for s in range(0, rows, size)] if rows else [(0, 0)]


def run_tagged_batch(stage: Stage, batch: pa.Table) -> pa.Table:
    """Apply a stage to a tagged batch; count what it did per input shard on the batch's rows.

    Counters are the local runner's (engine.counters delta of the batch), split by shard when a
    batch spans shards, with the batch's seconds shared by row count.
    """
    tags = batch.select(list(TAG_COLUMNS))
    data = batch.drop_columns(list(TAG_COLUMNS))
    out, seconds = apply_stage(stage, data)
    shards = tags.column(SHARD_COLUMN).to_pylist()
    cells = tags.column(COUNTERS_COLUMN).to_pylist()
    first_index: dict[str, list[int]] = {}
    for i, s in enumerate(shards):
        first_index.setdefault(s, []).append(i)
    n = max(1, len(shards))
    for s, idx in first_index.items():
        rows = pa.array(idx, pa.int64())
        part = delta(snapshot(data.take(rows)), snapshot(out.take(rows)), seconds * len(idx) / n)
        cell = json.loads(cells[idx[0]]) if cells[idx[0]] else {}
        merge(cell.setdefault(stage.name, {}), part)
        cells[idx[0]] = json.dumps(cell)
    return (
        out.append_column(SHARD_COLUMN, tags.column(SHARD_COLUMN))
        .append_column(ROW_COLUMN, tags.column(ROW_COLUMN))
        .append_column(COUNTERS_COLUMN, pa.array(cells, pa.string()))
    )


def assemble_shard(parts: list[pa.Table], folder: str, shard: str, expected_rows: int) -> tuple[pa.Table, dict[str, Any]]:
    """The parts of one shard -> (the shard table in input order, its counters); checks no loss, no duplicates."""
    table = pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]
    rows = table.column(ROW_COLUMN).to_pylist()
    if sorted(rows) != list(range(expected_rows)):
        seen = set()
        dups = sorted({r for r in rows if r in seen or seen.add(r)})
        missing = sorted(set(range(expected_rows)) - set(rows))
        raise RuntimeError(
            f"{folder}/{shard}: expected rows 0..{expected_rows - 1} once each; "
            f"missing {missing[:5]}, duplicated {dups[:5]} (engine lost or repeated rows)"
        )
    table = table.take(pc.sort_indices(table.column(ROW_COLUMN)))
    counters: dict[str, Any] = {}
    for cell in table.column(COUNTERS_COLUMN).to_pylist():
        if cell:
            merge(counters, json.loads(cell))
    keep = [c for c in table.column_names if c not in TAG_COLUMNS and c not in TRANSIENT_COLUMNS]
    return finalize(table.select(keep), f"{folder}/{shard}"), counters


def shard_seconds(counters: dict[str, Any]) -> float:
    """Compute seconds summed over stages (a distributed shard has no single wall time)."""
    return round(sum(c.get("seconds", 0.0) for c in counters.values()), 3)
