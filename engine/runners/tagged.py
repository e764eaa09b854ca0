"""Rows tagged with where they came from, so a distributed engine's workers commit the local runner's files.

A Ray Data block normally holds one whole input shard (one read task per shard, block splitting
off), but an engine may cut or bundle blocks. Every row therefore carries its input shard and its
row index, and the per-stage counters of a shard piece ride on the piece's first row. A stage
runs on each shard piece of a block separately, in the shard's own batches
(engine.execute.batch_bounds), so batch composition (and with it batched model numerics) is the
local runner's. The writer, on a worker, commits every complete shard of its block; the rare piece
of a cut shard is committed as a part and assembled by a worker task once all parts are in.
"""
from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from engine.counters import merge
from engine.execute import commit_meta, finalize, limit_threads, read_step_input, run_stage
from engine.runners.base import StageRecipe, StepJob
from engine.stage import TRANSIENT_COLUMNS, Stage
from schemas.records import IMAGE_RECORD_SCHEMA

SHARD_COLUMN = "__fld_shard"
ROW_COLUMN = "__fld_row"
COUNTERS_COLUMN = "__fld_counters"  # JSON {stage: counters} on the first row of each shard piece, else null
TAG_COLUMNS = (SHARD_COLUMN, ROW_COLUMN, COUNTERS_COLUMN)
NODES = "nodes"  # counters[stage][NODES] = {node id: rows}: where a distributed stage ran (commit record only)
PARTS = "_parts"  # <OUT>/_parts/<output folder>/<shard>/: pieces of a shard an engine cut apart

_WORKER_STAGES: dict[str, Stage] = {}


def worker_stage(recipe: StageRecipe) -> Stage:
    """One set-up stage per worker process and recipe: models load once, not once per task/bundle."""
    stage = _WORKER_STAGES.get(recipe.key)
    if stage is None:
        stage = recipe.build()
        limit_threads(stage.resources.cpus)
        stage.ensure_setup()
        _WORKER_STAGES[recipe.key] = stage
    return stage


_EXECUTION: dict[str, str] = {}  # recipe key -> the execution (segment / step run) that last used it


def keep_stages(keys: set[str], execution: str) -> None:
    """A fused task of `execution` starts on this worker: the stages of earlier executions that it
    does not use are dropped (a task worker lives for the whole run: without this it would hold every
    model of every segment and round)."""
    for key in list(_EXECUTION):
        if key not in keys and _EXECUTION[key] != execution:
            _WORKER_STAGES.pop(key, None)
            _EXECUTION.pop(key)
    _EXECUTION.update(dict.fromkeys(keys, execution))


def tag(table: pa.Table, shard: str, first_row: int = 0) -> pa.Table:
    n = table.num_rows
    return (
        table.append_column(SHARD_COLUMN, pa.array([shard] * n, pa.string()))
        .append_column(ROW_COLUMN, pa.array(range(first_row, first_row + n), pa.int64()))
        .append_column(COUNTERS_COLUMN, pa.nulls(n, pa.string()))
    )


def read_tagged_shard(store, job: StepJob, needs: frozenset[str], shard: str) -> pa.Table:
    """A pending input shard as one tagged table: what a distributed read task emits."""
    return tag(read_step_input(store, job.input_folder, shard, needs), shard)


def pieces(block: pa.Table) -> list[tuple[str, pa.Table]]:
    """(shard, rows of that shard in row order) for every shard a block holds."""
    out = []
    for shard in dict.fromkeys(block.column(SHARD_COLUMN).to_pylist()):
        part = block.filter(pc.equal(block.column(SHARD_COLUMN), shard))
        out.append((shard, part.take(pc.sort_indices(part.column(ROW_COLUMN)))))
    return out


def run_tagged_stage(stage: Stage, block: pa.Table, apply=None, node: str | None = None, active=None) -> pa.Table:
    """Apply a stage to every shard piece of a block in the shard's batches, counting per piece.
    `node`: the cluster node this runs on; its rows are counted under counters[stage]["nodes"].
    `active(shard)`: False passes the shard's rows on untouched (a segment step it already has)."""
    outs = []
    for shard, piece in pieces(block):
        if active is not None and not active(shard):
            outs.append(piece)
            continue
        tags = piece.select(list(TAG_COLUMNS))
        cells = tags.column(COUNTERS_COLUMN).to_pylist()
        counters = json.loads(cells[0]) if cells[0] else {}
        first_row = tags.column(ROW_COLUMN)[0].as_py()
        out = run_stage(stage, piece.drop_columns(list(TAG_COLUMNS)), counters, first_row, apply=apply)
        if node is not None:
            merge(counters.setdefault(stage.name, {}), {NODES: {node: piece.num_rows}})
        cells[0] = json.dumps(counters)
        outs.append(out.append_column(SHARD_COLUMN, tags.column(SHARD_COLUMN))
                    .append_column(ROW_COLUMN, tags.column(ROW_COLUMN))
                    .append_column(COUNTERS_COLUMN, pa.array(cells, pa.string())))
    return pa.concat_tables(outs) if outs else block


def piece_counters(piece: pa.Table) -> dict[str, Any]:
    counters: dict[str, Any] = {}
    for cell in piece.column(COUNTERS_COLUMN).to_pylist():
        if cell:
            merge(counters, json.loads(cell))
    return counters


def shard_seconds(counters: dict[str, Any]) -> float:
    """Compute seconds summed over stages (a distributed shard has no single wall time)."""
    return round(sum(c.get("seconds", 0.0) for c in counters.values()), 3)


def _records(piece: pa.Table) -> pa.Table:
    keep = [c for c in piece.column_names if c not in TAG_COLUMNS and c not in TRANSIENT_COLUMNS]
    return piece.select(keep)


def _check_rows(folder: str, shard: str, rows: list[int], expected: int) -> None:
    if sorted(rows) != list(range(expected)):
        seen: set[int] = set()
        dups = sorted({r for r in rows if r in seen or seen.add(r)})
        missing = sorted(set(range(expected)) - set(rows))
        raise RuntimeError(f"{folder}/{shard}: expected rows 0..{expected - 1} once each; missing {missing[:5]}, "
                           f"duplicated {dups[:5]} (the engine lost or repeated rows)")


def commit_piece(store, job: StepJob, runner: str, shard: str, piece: pa.Table) -> dict:
    """On a worker: commit a complete shard, or keep a piece of a cut one as a part.
    Returns the summary the driver gets: {shard, rows, committed, counters} (never the rows)."""
    expected = job.rows(shard)
    rows = piece.column(ROW_COLUMN).to_pylist()
    counters = piece_counters(piece)
    if len(rows) == expected:
        _check_rows(job.output_folder, shard, rows, expected)
        table = finalize(_records(piece), f"{job.output_folder}/{shard}")
        nodes = {stage: c.pop(NODES) for stage, c in counters.items() if NODES in c}  # not a counter of the data
        store.write_shard(job.output_folder, shard, table,
                          {**commit_meta(job, shard, runner, counters, shard_seconds(counters)), NODES: nodes})
        return {"shard": shard, "rows": expected, "committed": True, "counters": counters, NODES: nodes}
    store.write_shard(f"{PARTS}/{job.output_folder}/{shard}", f"rows-{rows[0]:09d}", piece.drop_columns(
        [c for c in TRANSIENT_COLUMNS if c in piece.column_names]), {"config_hash": job.config_hash})
    return {"shard": shard, "rows": len(rows), "committed": False, "counters": counters}


def assemble_parts(store, job: StepJob, runner: str, shard: str) -> dict:
    """On a worker: all parts of a cut shard are committed -> the shard, then the parts go."""
    folder = f"{PARTS}/{job.output_folder}/{shard}"
    parts = [store.read_shard(folder, p) for p in store.shards(folder)]
    piece = pa.concat_tables(parts, promote_options="default")
    piece = piece.take(pc.sort_indices(piece.column(ROW_COLUMN)))
    _check_rows(job.output_folder, shard, piece.column(ROW_COLUMN).to_pylist(), job.rows(shard))
    summary = commit_piece(store, job, runner, shard, piece)
    store.uncommit(folder)
    return summary


def empty_shard(store, job: StepJob, runner: str, shard: str) -> dict:
    """An input shard of no rows still gets its (empty) output shard."""
    t0 = time.perf_counter()
    table = finalize(IMAGE_RECORD_SCHEMA.empty_table(), f"{job.output_folder}/{shard}")
    store.write_shard(job.output_folder, shard, table, commit_meta(job, shard, runner, {}, time.perf_counter() - t0))
    return {"shard": shard, "rows": 0, "committed": True, "counters": {}}


def clear_parts(store, job: StepJob) -> None:
    """Parts left by a killed run belong to no commit: forget them before the job starts (one listing
    of the step's parts folder, then only the shards that have parts: no request per shard)."""
    pending = set(job.shards)
    for shard in store.list(f"{PARTS}/{job.output_folder}"):
        if shard in pending:
            store.uncommit(f"{PARTS}/{job.output_folder}/{shard}")
