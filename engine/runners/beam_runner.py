"""Apache Beam runner: read shards -> (BatchElements -> stage DoFn) per stage -> write per shard.

Elements are image records tagged with their input shard and row (engine.runners.tagged), so
the final GroupByKey(shard) writes exactly the local runner's part-k. A stage DoFn loads its
model once per worker in `setup()`; a batch that raises is retried element by element and an
element that still fails goes to the stage's dead-letter output with the error recorded on the
image's `errors` (and counted), then rejoins the stream: the bundle never fails for one bad
image and no record is lost. Beam Metrics count per stage; they are queried after the run and
kept in manifest.json under `engine_metrics`.

Default runner: Beam's in-process FnApiRunner, passed explicitly (the DirectRunner first tries
to download Prism). Any runner by name (FlinkRunner, SparkRunner, DataflowRunner, ...) with its
pipeline options; OUT must then be a path every worker can write (shared filesystem).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterable

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from engine.counters import merge
from engine.runners.base import StepJob
from engine.runners.tagged import (
    input_row_counts,
    COUNTERS_COLUMN,
    ROW_COLUMN,
    SHARD_COLUMN,
    StageRecipe,
    assemble_shard,
    empty_part,
    read_tagged_chunk,
    run_tagged_batch,
    shard_seconds,
    step_recipes,
    worker_stage,
)
from engine.stage import IMAGE_BYTES_COLUMN, record_error, records_to_table, table_to_records
from engine.store import ShardStore

log = logging.getLogger(__name__)

DEAD_LETTER = "dead_letter"
IN_PROCESS_RUNNERS = ("FnApiRunner", "fnapi", "in-process")

# An element: (shard, row, record dict, image bytes or None, counters {stage: counters} or None)
Element = tuple


class FldOptions(PipelineOptions):
    """fld-engine's own pipeline options, given like any other with --beam-option."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--shards_per_pipeline", type=int, default=0,
                            help="run the step as several Beam pipelines of this many shards each (0: one pipeline); "
                                 "smaller waves commit earlier, so a killed run loses less")


def elements_to_table(elements: list[Element]) -> pa.Table:
    table = records_to_table([e[2] for e in elements])
    if any(e[3] is not None for e in elements):
        table = table.append_column(IMAGE_BYTES_COLUMN, pa.array([e[3] for e in elements], pa.binary()))
    return (
        table.append_column(SHARD_COLUMN, pa.array([e[0] for e in elements], pa.string()))
        .append_column(ROW_COLUMN, pa.array([e[1] for e in elements], pa.int64()))
        .append_column(COUNTERS_COLUMN, pa.array([json.dumps(e[4]) if e[4] else None for e in elements], pa.string()))
    )


def table_to_elements(table: pa.Table) -> list[Element]:
    images = table.column(IMAGE_BYTES_COLUMN).to_pylist() if IMAGE_BYTES_COLUMN in table.column_names else [None] * table.num_rows
    records = table_to_records(table.drop_columns([SHARD_COLUMN, ROW_COLUMN, COUNTERS_COLUMN]))
    shards = table.column(SHARD_COLUMN).to_pylist()
    rows = table.column(ROW_COLUMN).to_pylist()
    counters = [json.loads(c) if c else None for c in table.column(COUNTERS_COLUMN).to_pylist()]
    return list(zip(shards, rows, records, images, counters))


class ReadShardFn(beam.DoFn):
    """Shard name -> its tagged elements (the read runs on a worker, like Ray's read tasks)."""

    def __init__(self, out: str, step_index: int, input_folder: str, needs_images: bool, rows: dict[str, int]):
        self.out, self.step_index, self.input_folder, self.needs_images, self.rows = out, step_index, input_folder, needs_images, rows

    def process(self, shard: str) -> Iterable[Element]:
        table = read_tagged_chunk(ShardStore.from_spec(self.out), self.step_index, self.input_folder, self.needs_images, shard, 0, self.rows[shard])
        yield from table_to_elements(table)


class StageDoFn(beam.DoFn):
    """One stage on a batch of elements; per-element retry and dead-letter output on failure."""

    def __init__(self, recipe: StageRecipe, stage_name: str):
        self.recipe = recipe
        self.stage_name = stage_name
        self.records = Metrics.counter(stage_name, "records")
        self.batches = Metrics.counter(stage_name, "batches")
        self.errors = Metrics.counter(stage_name, "errors")
        self.dead = Metrics.counter(stage_name, "dead_letter")
        self.retried = Metrics.counter(stage_name, "batches_retried_per_element")
        self.added = {k: Metrics.counter(stage_name, f"added_{k}") for k in ("texts", "regions", "groundings")}
        self.batch_ms = Metrics.distribution(stage_name, "batch_ms")

    def setup(self) -> None:
        self.stage = worker_stage(self.recipe)  # the model loads here, once per worker

    def _run(self, elements: list[Element]) -> list[Element]:
        out = table_to_elements(run_tagged_batch(self.stage, elements_to_table(elements)))
        self._count(elements, out)
        return out

    def _count(self, before: list[Element], after: list[Element]) -> None:
        self.records.inc(len(before))
        self.batches.inc()
        errors = 0
        added: dict[str, int] = {}
        for e_in, e_out in zip(before, after):
            errors += len(e_out[2].get("errors") or []) - len(e_in[2].get("errors") or [])
            for k in self.added:
                added[k] = added.get(k, 0) + len(e_out[2].get(k) or []) - len(e_in[2].get(k) or [])
        if errors:
            self.errors.inc(errors)
        for k, n in added.items():
            if n:
                self.added[k].inc(n)

    def process(self, batch: list[Element]) -> Iterable[Any]:
        import time

        t0 = time.perf_counter()
        try:
            yield from self._run(batch)
            self.batch_ms.update(int((time.perf_counter() - t0) * 1000))
            return
        except Exception as exc:  # noqa: BLE001 - the batch is retried element by element below
            log.warning("beam: stage %s failed on a batch of %d (%s); retrying element by element", self.stage_name, len(batch), exc)
            self.retried.inc()
        for element in batch:
            try:
                yield from self._run([element])
            except Exception as exc:  # noqa: BLE001 - dead-letter: record the error, keep the record
                shard, row, record, image, counters = element
                record = dict(record)
                record["errors"] = list(record.get("errors") or [])
                record_error(record, self.stage_name, exc)
                counters = dict(counters or {})
                merge(counters.setdefault(self.stage_name, {}),
                      {"records_in": 1, "records_out": 1, "errors": 1, "dead_letter": 1})
                self.dead.inc()
                self.errors.inc()
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, (shard, row, record, image, counters))


class WriteShardFn(beam.DoFn):
    """(shard, its elements) -> the shard file + commit record, as the local runner writes them."""

    def __init__(self, out: str, folder: str, config_hash: str, rows: dict[str, int]):
        self.out, self.folder, self.config_hash, self.rows = out, folder, config_hash, rows
        self.shards = Metrics.counter("write", "shards")
        self.written = Metrics.counter("write", "records")

    def process(self, item: tuple[str, Iterable[Element]]) -> Iterable[str]:
        shard, elements = item
        elements = [e for e in elements]
        parts = [elements_to_table(elements)] if elements else [empty_part(shard)]
        table, counters = assemble_shard(parts, self.folder, shard, self.rows[shard])
        ShardStore.from_spec(self.out).write_shard(self.folder, shard, table, {
            "config_hash": self.config_hash, "runner": "beam", "counters": counters, "seconds": shard_seconds(counters)})
        self.shards.inc()
        self.written.inc(table.num_rows)
        yield shard


def make_runner(name: str | None):
    if name is None or name in IN_PROCESS_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return name  # Beam resolves names: DirectRunner, BundleBasedDirectRunner, FlinkRunner, SparkRunner, DataflowRunner...


def query_metrics(result) -> dict[str, dict[str, Any]]:
    """{namespace: {name: value}} of a finished pipeline's counters and distributions."""
    out: dict[str, dict[str, Any]] = {}
    try:
        metrics = result.metrics().query(MetricsFilter())
    except Exception as exc:  # noqa: BLE001 - some runners do not report metrics
        log.warning("beam: metrics unavailable from this runner: %s", exc)
        return out
    for m in metrics.get("counters", []):
        value = m.committed if m.committed is not None else m.attempted
        out.setdefault(m.key.metric.namespace, {})[m.key.metric.name] = out.get(m.key.metric.namespace, {}).get(m.key.metric.name, 0) + (value or 0)
    for m in metrics.get("distributions", []):
        d = m.committed if m.committed is not None else m.attempted
        if d is not None and d.count:
            out.setdefault(m.key.metric.namespace, {})[m.key.metric.name] = {"count": d.count, "sum": d.sum, "min": d.min, "max": d.max}
    return out


def merge_metrics(total: dict, part: dict) -> dict:
    """Metrics of several pipelines (waves): counters and distribution count/sum add, min/max stay min/max."""
    for namespace, values in part.items():
        into = total.setdefault(namespace, {})
        for name, v in values.items():
            if isinstance(v, dict):
                cur = into.get(name)
                into[name] = dict(v) if cur is None else {
                    "count": cur["count"] + v["count"], "sum": cur["sum"] + v["sum"],
                    "min": min(cur["min"], v["min"]), "max": max(cur["max"], v["max"])}
            else:
                into[name] = into.get(name, 0) + v
    return total


class BeamRunner:
    name = "beam"

    def __init__(self, beam_runner: str | None = None, beam_options: list[str] | None = None, **_: object):
        self.beam_runner = beam_runner
        self.beam_options = list(beam_options or [])

    def build(self, p: beam.Pipeline, store: ShardStore, job: StepJob, shards: list[str], rows: dict[str, int]):
        stages, recipes = step_recipes(job)
        needs_images = any(s.needs_images for s in stages)
        out = store.spec()  # absolute path or URL + storage options: what workers rebuild the store from
        elements = (p | "shards" >> beam.Create(shards)
                    | "read" >> beam.ParDo(ReadShardFn(out, job.step_index, job.input_folder, needs_images, rows)))
        for i, (stage, recipe) in enumerate(zip(stages, recipes)):
            label = f"{i}-{stage.name}"
            bs = stage.resources.batch_size
            batched = elements | f"{label}/batch" >> beam.BatchElements(min_batch_size=bs, max_batch_size=bs)
            results = batched | f"{label}/run" >> beam.ParDo(StageDoFn(recipe, stage.name)).with_outputs(DEAD_LETTER, main="ok")
            elements = (results.ok, results[DEAD_LETTER]) | f"{label}/rejoin" >> beam.Flatten()
        return (elements
                | "by-shard" >> beam.Map(lambda e: (e[0], (e[0], e[1], e[2], None, e[4])))  # bytes stay out of the shuffle
                | "group" >> beam.GroupByKey()
                | "write" >> beam.ParDo(WriteShardFn(out, job.output_folder, job.config_hash, rows)))

    def run_step(self, store: ShardStore, job: StepJob, progress=None) -> dict:
        rows = input_row_counts(store, job)
        options = PipelineOptions(self.beam_options)
        wave = options.view_as(FldOptions).shards_per_pipeline or len(job.shards)
        metrics: dict = {}
        total: dict = {}
        for start in range(0, len(job.shards), wave):
            shards = job.shards[start : start + wave]
            with beam.Pipeline(runner=make_runner(self.beam_runner), options=PipelineOptions(self.beam_options)) as p:
                self.build(p, store, job, shards, rows)
            merge_metrics(metrics, query_metrics(p.result) if getattr(p, "result", None) is not None else {})
            for shard in shards:
                rec = store.commit_record(job.output_folder, shard)
                if rec is None or rec.get("config_hash") != job.config_hash:
                    raise RuntimeError(f"beam: step {job.step.name!r} finished without committing {job.output_folder}/{shard}")
                merge(total, rec.get("counters", {}))
                if progress is not None:
                    progress(shard, rec["rows"])
        log.info("beam: step %s metrics %s", job.step.name, json.dumps(metrics, default=str))
        store.update_manifest(engine_metrics={job.step.name: {"runner": "beam", **metrics}})
        return total
