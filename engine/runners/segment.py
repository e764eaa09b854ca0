"""A run segment: consecutive steps executed as one chain, each shard read and decoded once.

The steps between two barriers (ingest before, a training round or a step marked `barrier: true`
after) form a segment. A runner that can (Ray) runs it as one streaming execution: a shard's input
is read for the first step it still needs, flows through every stage of every later step, and each
step's shard is committed as soon as that step is done with it, with the very commit record a
step-by-step run writes (its input's sha256 is the one just committed). So the resume rule stays
per step and shard: a run killed between two steps of a segment resumes each step where it stood,
and an OUT written step by step resumes as a segment (no migration).

A shard starts at the first step of the segment where it is pending; every later step of the
segment then redoes it too (its input is being rewritten). What the chain does not commit (a shard
an engine cut into pieces, an empty shard) the driver's step-by-step pass does afterwards.
"""
from __future__ import annotations

import dataclasses
import json

import pyarrow as pa

from engine.execute import IMAGES, attach_images, commit_meta, finalize, read_step_input, transient_columns
from engine.runners.base import StepJob
from engine.stage import IMAGE_BYTES_COLUMN, PIXELS_COLUMN, with_pixels
from engine.runners.tagged import (
    COUNTERS_COLUMN,
    NODES,
    ROW_COLUMN,
    SHARD_COLUMN,
    _check_rows,
    _records,
    piece_counters,
    pieces,
    shard_seconds,
    tag,
)


SUMMARY_SCHEMA = pa.schema([("shard", pa.string()), ("rows", pa.int64()), ("committed", pa.bool_()),
                            ("counters", pa.string()), ("nodes", pa.string())])


@dataclasses.dataclass
class Segment:
    """Step jobs of one segment (each planned on its own, as a step-by-step run plans it) and where
    each shard enters the chain: start[shard] = index of the first job that runs it."""

    jobs: list[StepJob]
    start: dict[str, int]
    needs: list[frozenset] = dataclasses.field(default_factory=list)  # per job: image columns its stages read

    @classmethod
    def plan(cls, jobs: list[StepJob]) -> "Segment":
        start: dict[str, int] = {}
        for j, job in enumerate(jobs):
            for shard in job.shards:
                if shard not in start and job.rows(shard) > 0:
                    start[shard] = j
        return cls(jobs, start)

    @property
    def name(self) -> str:
        return "+".join(job.name for job in self.jobs)

    def rows(self, shard: str) -> int:
        return self.jobs[self.start[shard]].rows(shard)

    def input_folder(self, shard: str) -> str:
        return self.jobs[self.start[shard]].input_folder

    def active(self, j: int):
        """Whether job j runs a shard (it entered the chain at job j or before)."""
        start = self.start
        return lambda shard: start.get(shard, len(self.jobs)) <= j


def commit_segment_step(block: pa.Table, store, segment: Segment, j: int, runner: str, last: bool) -> pa.Table:
    """On a worker, after the stages of job j: commit the job's complete shards of the block.

    Not the last job: the block goes on as the next job reads it (the committed records plus the
    image columns already decoded; fresh counters). The last job: one summary row per shard."""
    job = segment.jobs[j]
    active = segment.active(j)
    outs, summaries = [], []
    for shard, piece in pieces(block):
        if not active(shard):
            outs.append(piece)
            continue
        expected, rows = segment.rows(shard), piece.column(ROW_COLUMN).to_pylist()
        counters = piece_counters(piece)
        committed = len(rows) == expected
        if committed:  # a piece of a cut shard is left to the step-by-step pass
            _check_rows(job.output_folder, shard, rows, expected)
            table = finalize(_records(piece), f"{job.output_folder}/{shard}")
            if j == segment.start[shard]:
                source = job.inputs[shard]
            else:  # the shard the previous job of this chain just committed
                source = store.commit_record(segment.jobs[j - 1].output_folder, shard) or {}
            nodes = {stage: c.pop(NODES) for stage, c in counters.items() if NODES in c}
            meta = commit_meta(dataclasses.replace(job, inputs={shard: source}), shard, runner, counters,
                               shard_seconds(counters))
            store.write_shard(job.output_folder, shard, table, {**meta, NODES: nodes})
            if not last:
                piece = _continue(store, shard, table, piece, segment.needs[j + 1])
        summaries.append({"shard": shard, "rows": len(rows), "committed": committed,
                          "counters": json.dumps(counters), NODES: json.dumps({})})
        if not last:
            outs.append(piece)
    if last:
        return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)
    return pa.concat_tables(outs) if outs else block


def _continue(store, shard: str, table: pa.Table, piece: pa.Table, needs: frozenset[str]) -> pa.Table:
    """The next job's input as a step-by-step run would read it: the committed records, plus the
    image columns that job needs. Columns decoded earlier in the chain are carried on, not decoded
    again; one that no earlier job needed is added now (read and decoded once per segment).

    An image that failed to decode: step by step, every step that needs pixels decodes it again and
    records the failure on the image again; the chain does the same for those images (only those)."""
    carried = {c: piece.column(c) for c in transient_columns(frozenset({"bytes", "pixels"})) if c in piece.column_names}
    images: dict = {}

    def encoded() -> dict:  # the shard's encoded images by id, read only when needed
        if not images:
            read = store.read_shard(IMAGES, shard, columns=["image_id", "bytes"])
            images.update(zip(read.column("image_id").to_pylist(), read.column("bytes").to_pylist()))
        return images

    pixels = carried.get(PIXELS_COLUMN)
    failed = [] if pixels is None or "pixels" not in needs else [i for i, ok in enumerate(pixels.is_valid().to_pylist()) if not ok]
    if failed:
        again = table.take(failed)
        again = with_pixels(again, [encoded().get(i) for i in again.column("image_id").to_pylist()])
        again = again.select(table.column_names).cast(table.schema)
        parts, at = [], 0
        for k, i in enumerate(failed):
            parts += [table.slice(at, i - at), again.slice(k, 1)]
            at = i + 1
        table = pa.concat_tables(parts + [table.slice(at)])
    for col, values in carried.items():
        table = table.append_column(col, values)
    missing = frozenset(need for need, col in (("bytes", IMAGE_BYTES_COLUMN), ("pixels", PIXELS_COLUMN))
                        if need in needs and col not in carried)
    if missing:
        by_id = encoded()
        table = attach_images(table, pa.table({"image_id": list(by_id), "bytes": pa.array(list(by_id.values()), pa.binary())}),
                              missing)
    return (table.append_column(SHARD_COLUMN, piece.column(SHARD_COLUMN))
            .append_column(ROW_COLUMN, piece.column(ROW_COLUMN))
            .append_column(COUNTERS_COLUMN, pa.nulls(piece.num_rows, pa.string())))


def segment_input(store, segment: Segment, shard: str) -> pa.Table:
    """A shard as the chain's read task emits it: the input of the first job that runs it, with the
    image columns that job needs (later jobs get theirs in _continue)."""
    return tag(read_step_input(store, segment.input_folder(shard), shard, segment.needs[segment.start[shard]]), shard)
