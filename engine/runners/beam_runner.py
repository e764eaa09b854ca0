"""Apache Beam runner: shards as Arrow tables through one DoFn per stage, committed by the workers.

An element is (shard, its table of image records, its per-stage counters): a whole shard stays
one Arrow table from read to write (no per-record dicts between stages, no shuffle of rows), and
each stage DoFn runs the stage over it in the shard's own batches (engine.execute.run_stage), so
the files, rows and counters are the local runner's. A stage DoFn loads its model once per worker
in `setup()`; a batch that raises is retried element by element and an element that still fails
is a dead letter: its error is recorded on the image's `errors` (and counted), and the record is
still written. The last DoFn commits the shard on the worker as soon as it is done, so a killed
pipeline resumes shard by shard. Beam Metrics count per stage; they are queried after the run and
kept in manifest.json under `engine_metrics`.

Default runner: Beam's in-process FnApiRunner, passed explicitly (the DirectRunner first tries
to download Prism). Any runner by name (FlinkRunner, SparkRunner, DataflowRunner, ...) with its
pipeline options.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterable

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from engine.counters import ANNOTATION_COLUMNS, merge
from engine.execute import apply_stage, commit_meta, finalize, image_needs, read_step_input, run_stage
from engine.runners.base import StageRecipe, StepJob, TaskJob, finished_records
from engine.training import TrainJob, train_in_process
from engine.runners.tagged import worker_stage
from engine.stage import TRANSIENT_COLUMNS, record_error, records_to_table, table_to_records

log = logging.getLogger(__name__)

IN_PROCESS_RUNNERS = ("FnApiRunner", "fnapi", "in-process")

# An element: (shard, table of image records + transient image columns, {stage: counters})
Element = tuple


class ReadShardFn(beam.DoFn):
    """Shard name -> (shard, its input table, {}) on a worker."""

    def __init__(self, store, job: StepJob, needs: frozenset[str]):
        self.store, self.job, self.needs = store, job, needs

    def process(self, shard: str) -> Iterable[Element]:
        yield shard, read_step_input(self.store, self.job.input_folder, shard, self.needs), {}


class StageDoFn(beam.DoFn):
    """One stage over a shard's table, in its batches; per-element retry and dead letters on failure."""

    def __init__(self, recipe: StageRecipe, stage_name: str):
        self.recipe = recipe
        self.stage_name = stage_name
        self.records = Metrics.counter(stage_name, "records")
        self.batches = Metrics.counter(stage_name, "batches")
        self.errors = Metrics.counter(stage_name, "errors")
        self.dead = Metrics.counter(stage_name, "dead_letter")
        self.retried = Metrics.counter(stage_name, "batches_retried_per_element")
        self.added = {k: Metrics.counter(stage_name, f"added_{k}") for k in ANNOTATION_COLUMNS}
        self.batch_ms = Metrics.distribution(stage_name, "batch_ms")

    def setup(self) -> None:
        from engine.cli import install_logging

        install_logging()  # a worker process's log lines through fld's one formatter (control characters escaped)
        self.stage = worker_stage(self.recipe)  # the model loads here, once per worker

    def _apply(self, stage, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        self.batches.inc()
        try:
            out = apply_stage(stage, batch)[0]
            self.batch_ms.update(int((time.perf_counter() - t0) * 1000))
            return out
        except Exception as exc:  # noqa: BLE001 - the batch is retried element by element below
            log.warning("beam: stage %s failed on a batch of %d (%s); retrying element by element",
                        self.stage_name, batch.num_rows, exc)
            self.retried.inc()
        rows = []
        for i in range(batch.num_rows):
            one = batch.slice(i, 1)
            try:
                rows.append(apply_stage(stage, one)[0])
            except Exception as exc:  # noqa: BLE001 - dead letter: record the error, keep the record
                record = table_to_records(one)[0]
                record_error(record, self.stage_name, exc)
                dead = records_to_table([record])
                for col in TRANSIENT_COLUMNS:
                    if col in one.column_names:
                        dead = dead.append_column(col, one.column(col))
                rows.append(dead)
                self.dead.inc()
                self._dead_letters += 1
        return pa.concat_tables(rows)

    def process(self, element: Element) -> Iterable[Element]:
        shard, table, counters = element
        counters = json.loads(json.dumps(counters))  # elements are immutable in Beam: work on a copy
        self._dead_letters = 0
        out = run_stage(self.stage, table, counters, apply=self._apply)
        if self._dead_letters:
            c = counters.setdefault(self.stage_name, {})
            c["dead_letter"] = c.get("dead_letter", 0) + self._dead_letters
        c = counters.get(self.stage_name, {})
        self.records.inc(table.num_rows)
        if c.get("errors"):
            self.errors.inc(c["errors"])
        for k, n in c.get("annotations_added", {}).items():
            if n:
                self.added[k].inc(n)
        yield shard, out, counters


class WriteShardFn(beam.DoFn):
    """(shard, table, counters) -> the shard file + commit record, as the local runner writes them."""

    def __init__(self, store, job: StepJob, runner: str):
        self.store, self.job, self.runner = store, job, runner
        self.shards = Metrics.counter("write", "shards")
        self.written = Metrics.counter("write", "records")

    def process(self, element: Element) -> Iterable[str]:
        shard, table, counters = element
        expected = self.job.rows(shard)
        if table.num_rows != expected:
            raise RuntimeError(f"beam: {self.job.output_folder}/{shard} has {table.num_rows} rows, expected {expected}")
        table = finalize(table.drop_columns([c for c in TRANSIENT_COLUMNS if c in table.column_names]),
                         f"{self.job.output_folder}/{shard}")
        seconds = sum(c.get("seconds", 0.0) for c in counters.values())
        self.store.write_shard(self.job.output_folder, shard, table, commit_meta(self.job, shard, self.runner, counters, seconds))
        self.shards.inc()
        self.written.inc(table.num_rows)
        yield shard


class TaskFn(beam.DoFn):
    def __init__(self, store, job: TaskJob):
        self.store, self.job = store, job

    def process(self, shard: str) -> Iterable[str]:
        self.job.fn(self.store, shard, *self.job.args)
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
        ns = out.setdefault(m.key.metric.namespace, {})
        ns[m.key.metric.name] = ns.get(m.key.metric.name, 0) + (value or 0)
    for m in metrics.get("distributions", []):
        d = m.committed if m.committed is not None else m.attempted
        if d is not None and d.count:
            out.setdefault(m.key.metric.namespace, {})[m.key.metric.name] = {"count": d.count, "sum": d.sum, "min": d.min, "max": d.max}
    return out


class BeamRunner:
    name = "beam"

    def __init__(self, beam_runner: str | None = None, beam_options: list[str] | None = None, **_: object):
        self.beam_runner = beam_runner
        self.beam_options = list(beam_options or [])

    def _pipeline(self) -> beam.Pipeline:
        return beam.Pipeline(runner=make_runner(self.beam_runner), options=PipelineOptions(self.beam_options))

    def build(self, p: beam.Pipeline, store, job: StepJob):
        stages = job.build_stages()
        elements = (p | "shards" >> beam.Create(job.shards)
                    | "spread" >> beam.Reshuffle()  # shards go to workers independently
                    | "read" >> beam.ParDo(ReadShardFn(store, job, image_needs(stages))))
        for i, (stage, recipe) in enumerate(zip(stages, job.recipes)):
            elements = elements | f"{i}-{stage.name}" >> beam.ParDo(StageDoFn(recipe, stage.name))
        return elements | "write" >> beam.ParDo(WriteShardFn(store, job, self.name))

    def run_step(self, store, job: StepJob, progress=None) -> dict:
        with self._pipeline() as p:
            self.build(p, store, job)
        metrics = query_metrics(p.result) if getattr(p, "result", None) is not None else {}
        total: dict = {}
        for shard, rec in finished_records(store, job, self.name).items():
            merge(total, rec.get("counters", {}))
            if progress is not None:
                progress.shard(shard, rec["rows"])
        log.info("beam: step %s metrics %s", job.name, json.dumps(metrics, default=str))
        store.update_manifest(engine_metrics={job.name: {"runner": "beam", **metrics}})
        return total

    def run_train(self, store, job: TrainJob, progress=None) -> dict:
        """Beam has no training primitive: the driver trains (one worker), as the local runner does."""
        return train_in_process(store, job)

    def run_tasks(self, store, job: TaskJob, progress=None) -> dict[str, dict]:
        with self._pipeline() as p:
            _ = (p | "shards" >> beam.Create(job.shards) | "spread" >> beam.Reshuffle()
                 | job.name >> beam.ParDo(TaskFn(store, job)))
        if progress is not None:
            for shard in job.shards:
                progress.shard(shard, 0)
        return {}
