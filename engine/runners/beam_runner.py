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
from engine.runners.segment import Segment, commit_segment_step
from engine.runners.tagged import COUNTERS_COLUMN, TAG_COLUMNS, empty_shard, tag, worker_stage
from schemas.records import IMAGE_RECORD_SCHEMA
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

    def __init__(self, recipe: StageRecipe, stage_name: str, active=None, step: str | None = None):
        self.recipe = recipe
        self.stage_name = stage_name
        self.active = active  # a segment's: False for a shard that already has this step (passed on as is)
        ns = f"{step}/{stage_name}" if step else stage_name  # a segment's metrics say their step
        self.records = Metrics.counter(ns, "records")
        self.batches = Metrics.counter(ns, "batches")
        self.errors = Metrics.counter(ns, "errors")
        self.dead = Metrics.counter(ns, "dead_letter")
        self.retried = Metrics.counter(ns, "batches_retried_per_element")
        self.added = {k: Metrics.counter(ns, f"added_{k}") for k in ANNOTATION_COLUMNS}
        self.batch_ms = Metrics.distribution(ns, "batch_ms")

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
        if self.active is not None and not self.active(shard):
            yield element
            return
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


class CommitSegmentStepFn(beam.DoFn):
    """In a segment, after job j's stages: commit the shard as the Ray chain does
    (engine.runners.segment.commit_segment_step, same records); the next job's input goes on, or
    after the last job the shard's name."""

    def __init__(self, store, segment: Segment, j: int, runner: str):
        self.store, self.segment, self.j, self.runner = store, segment, j, runner
        self.last = j == len(segment.jobs) - 1
        self.shards = Metrics.counter(f"{segment.jobs[j].name}/write", "shards")
        self.written = Metrics.counter(f"{segment.jobs[j].name}/write", "records")

    def process(self, element: Element) -> Iterable:
        shard, table, counters = element
        job = self.segment.jobs[self.j]
        if not self.segment.active(self.j)(shard):
            if shard in job.shards and job.rows(shard) == 0:  # an empty input shard still gets its output shard
                empty_shard(self.store, job, self.runner, shard)
                self.shards.inc()
            yield shard if self.last else element
            return
        block = tag(table, shard)
        cells = [json.dumps(counters)] + [None] * (table.num_rows - 1)
        block = block.set_column(block.column_names.index(COUNTERS_COLUMN), COUNTERS_COLUMN, pa.array(cells, pa.string()))
        out = commit_segment_step(block, self.store, self.segment, self.j, self.runner, self.last)
        if table.num_rows == self.segment.rows(shard):  # committed (else left to the step-by-step pass)
            self.shards.inc()
            self.written.inc(table.num_rows)
        if self.last:
            yield shard
        else:  # the committed records + image columns carried on, fresh counters
            yield shard, out.drop_columns(list(TAG_COLUMNS)), {}


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

    def build_segment(self, p: beam.Pipeline, store, segment: Segment):
        """The segment as one pipeline: read once (the input of the shard's first pending job), then
        every job's stage DoFns followed by its commit; a shard skips the jobs it already has."""
        job_stages = [job.build_stages() for job in segment.jobs]
        segment.needs = [image_needs(st) for st in job_stages]

        empty = {s for job in segment.jobs for s in job.shards if job.rows(s) == 0}

        def read(shard: str) -> Element:
            if shard not in segment.start:  # empty: each pending job writes its empty shard
                return shard, IMAGE_RECORD_SCHEMA.empty_table(), {}
            return shard, read_step_input(store, segment.input_folder(shard), shard, segment.needs[segment.start[shard]]), {}

        elements = (p | "shards" >> beam.Create(sorted(set(segment.start) | empty)) | "spread" >> beam.Reshuffle()
                    | "read" >> beam.Map(read))
        for j, (job, stages) in enumerate(zip(segment.jobs, job_stages)):
            for i, (stage, recipe) in enumerate(zip(stages, job.recipes)):
                elements = elements | f"{job.name}-{i}-{stage.name}" >> beam.ParDo(StageDoFn(recipe, stage.name, segment.active(j), job.name))
            elements = elements | f"{job.name}-commit" >> beam.ParDo(CommitSegmentStepFn(store, segment, j, self.name))
        return elements

    def run_segment(self, store, segment: Segment, progress=None) -> None:
        """Every job of the segment in ONE pipeline (one job on a remote runner); what it leaves
        uncommitted the driver's step-by-step pass does after it."""
        if not segment.start:  # (nothing but empty shards: the step-by-step pass writes them)
            return
        with self._pipeline() as p:
            self.build_segment(p, store, segment)
        metrics = query_metrics(p.result) if getattr(p, "result", None) is not None else {}
        if progress is not None:
            for shard in segment.start:
                progress.shard(shard, segment.rows(shard))
        log.info("beam: segment %s metrics %s", segment.name, json.dumps(metrics, default=str))
        store.update_manifest(engine_metrics={job.name: {  # namespaces "<step>/<stage>": the step's own metrics
            "runner": "beam", "segment": segment.name,
            **{ns.split("/", 1)[1]: v for ns, v in metrics.items() if ns.startswith(f"{job.name}/")}} for job in segment.jobs})

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
