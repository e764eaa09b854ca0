"""The stage contract: what every annotator, filter and refiner implements.

A stage declares the resources it needs and computes on a batch of image records
(a pyarrow Table of schemas.IMAGE_RECORD_SCHEMA). It never imports an engine: the runners
in engine.runners adapt it to in-process, Ray Data and Beam execution. Models load once
per worker in setup(); a failure on one image is recorded in that record's `errors` and
the rest of the batch goes on (Beam RunInference's per-element error contract).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import pyarrow as pa
from pydantic import ConfigDict

from engine.images import decode_image, record_error  # noqa: F401 - part of the stage contract
from engine.values import BoundedModel
from schemas.records import ANNOTATION_KINDS, IMAGE_RECORD_SCHEMA, params_hash, source_of

# Transient columns a runner attaches to a step's batches for stages with needs_images; they are
# dropped before a shard is written (annotation shards never copy image data).
IMAGE_BYTES_COLUMN = "image_bytes"  # the original encoded bytes (stages with image_input = "bytes")
# Raw RGB pixels (height x width x 3 uint8, row-major, EXIF orientation applied), decoded ONCE per
# step when the step's shard is read, so the stages of a step never decode the same image again.
PIXELS_COLUMN = "image_pixels"
TRANSIENT_COLUMNS = (IMAGE_BYTES_COLUMN, PIXELS_COLUMN)
DECODE_STAGE = "decode"
# Record keys (and batch columns) a stage leaves for a later stage of the same step, e.g. the
# previous round's annotations that a relabel stage sets aside for the merge stage: JSON strings,
# carried through every stage of the step, never written to a shard.
STASH_PREFIX = "__stash_"  # the `stage` of an error recorded when an image cannot be decoded for a step


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs (NeMo Curator's Resources)."""

    cpus: float = 1.0
    gpus: float = 0.0  # fractional GPUs let several actors share a device
    batch_size: int = 8
    concurrency: int = 1  # actors (Ray) / parallel workers for model stages


# Parameters that only say HOW a stage runs, never WHAT it produces (engine.identity leaves them out).
EXECUTION_PARAMS = ("batch_size", "cpus", "gpus", "concurrency", "threads", "model_store")


class StageParams(BoundedModel):
    """Base of every stage's parameters: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    batch_size: int | None = None  # override of the stage's default Resources.batch_size
    cpus: float | None = None
    gpus: float | None = None
    concurrency: int | None = None


class Stage:
    """Base class. Subclasses set `name`, `Params`, `default_resources` and implement
    `process_record` (one image at a time) or override `process_batch` (batched models).
    """

    name: ClassVar[str] = "stage"
    Params: ClassVar[type[StageParams]] = StageParams
    default_resources: ClassVar[Resources] = Resources()
    needs_images: ClassVar[bool] = False  # the runner attaches the images of the batch when True
    # "pixels": process_batch gets decoded RGB PIL images (decoded once per step by the runner);
    # "bytes": it gets the original encoded bytes (e.g. a stage that forwards files untouched).
    image_input: ClassVar[str] = "pixels"
    uses_model: ClassVar[bool] = False  # CPU-only stages run as Ray tasks, model stages as actors
    # Params that hold a model reference (or an alias of the pipeline's models:), and how that model
    # loads: "hf" (transformers from_pretrained), "open_clip", "rapidocr", "spacy". Preflight resolves
    # them before anything runs and a step's configuration identity includes their revisions.
    model_params: ClassVar[dict[str, str]] = {}

    def __init__(self, params: StageParams | dict | None = None, models: dict[str, str] | None = None):
        if params is None:
            params = {}
        self.params = params if isinstance(params, StageParams) else self.Params(**params)
        self.models = dict(models or {})  # alias -> model reference, from pipelines.yaml/profile
        r = self.default_resources
        p = self.params
        self.resources = Resources(
            cpus=p.cpus if p.cpus is not None else r.cpus,
            gpus=p.gpus if p.gpus is not None else r.gpus,
            batch_size=p.batch_size or r.batch_size,
            concurrency=p.concurrency or r.concurrency,
        )
        self._is_setup = False
        self._metrics: dict[str, float] = {}

    # ----------------------------------------------------------------- provenance
    def semantic_params(self) -> dict:
        """The parameters that decide the output: execution settings (batch size, CPUs, GPUs, actors)
        left out, so changing them neither changes provenance nor refuses a rerun."""
        return self.params.model_dump(mode="json", exclude=set(EXECUTION_PARAMS))

    @property
    def params_hash(self) -> str:
        return params_hash(self.semantic_params())

    def source(self, model: str = "", revision: str = "") -> dict:
        return source_of(self.name, model, revision, self.semantic_params())

    def resolve_model(self, ref: str) -> str:
        """A model parameter may name an alias of the pipeline's `models:` section."""
        return self.models.get(ref, ref)

    def model_refs(self) -> dict[str, str]:
        """{param: resolved model reference} of the models this stage actually uses ("" = the
        stage's built-in default, e.g. the installed spaCy model)."""
        return {name: self.resolve_model(getattr(self.params, name) or "") for name in self.model_params}

    def model_revision(self, param: str, ref: str) -> str:
        """What identifies the weights behind model param `param` (resolved reference `ref`): the
        configuration identity of a step includes it, so other weights redo the step. A stage whose
        models load some other way overrides it."""
        from engine.models import model_revision

        return model_revision(ref, self.model_params[param])

    def check_model(self, param: str, ref: str) -> None:
        """Cheap check of the resolved reference `ref` of model param `param` WITHOUT loading it
        (e.g. a random: preset name or config keys): preflight calls it before anything is written,
        so a typo fails in a second instead of after ingest. Raise ValueError naming the problem."""

    # -------------------------------------------------------------------- contract
    def setup(self) -> None:
        """Load models once per worker. Called by every runner before the first batch."""

    def ensure_setup(self) -> None:
        if not self._is_setup:
            self.setup()
            self._is_setup = True

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.ensure_setup()
        records = table_to_records(batch)  # stash columns come along as record keys
        if self.needs_images:
            images = batch_images(batch, records, self.image_input, self.name)
            todo = [i for i, im in enumerate(images) if im is not None]  # undecodable ones carry their error
        else:
            images, todo = None, list(range(len(records)))
        if todo:
            done = self._isolated(batch, records, images, todo)
            for i, rec in zip(todo, done):
                records[i] = rec
        table = records_to_table(records)
        for col in TRANSIENT_COLUMNS:  # carried through for the next stage of the step
            if col in batch.column_names:
                table = table.append_column(col, batch.column(col))
        for key in sorted({k for rec in records for k in rec if k.startswith(STASH_PREFIX)}):
            table = table.append_column(key, pa.array([rec.get(key) for rec in records], pa.string()))
        return table

    def _isolated(self, batch: pa.Table, records: list[dict], images: list | None, todo: list[int]) -> list[dict]:
        """process_batch on records[todo]; when it raises (one record a batched model cannot take: a
        caption spaCy refuses, an input that exhausts memory), the batch is redone one record at a time
        from fresh copies, and each record that still fails gets that failure as its own error: one
        record never stops the run, and the others of its batch keep their results."""
        errors_before = {i: list(records[i].get("errors") or []) for i in todo}  # e.g. this batch's decode errors
        metrics_before = dict(self._metrics)
        try:
            return self.process_batch([records[i] for i in todo], [images[i] for i in todo] if images is not None else None)
        except Exception as exc:  # noqa: BLE001 - the batch failed: find the record(s) that make it fail
            self._metrics = metrics_before  # what the failed attempt reported is not counted
            failure = exc
        fresh_all = table_to_records(batch)
        done = []
        for i in todo:
            fresh = fresh_all[i]
            fresh["errors"] = list(errors_before[i])
            if len(todo) == 1:
                record_error(fresh, self.name, failure)
            else:
                saved = dict(self._metrics)
                try:
                    fresh = self.process_batch([fresh], [images[i]] if images is not None else None)[0]
                except Exception as exc:  # noqa: BLE001 - per-element error contract
                    self._metrics = saved
                    fresh = table_to_records(batch.slice(i, 1))[0]  # not what the failed attempt left
                    fresh["errors"] = list(errors_before[i])
                    record_error(fresh, self.name, exc)
            done.append(fresh)
        self.report("records_isolated", len(todo))  # the batch was redone one record at a time
        return done

    # ------------------------------------------------------------------- metrics
    def report(self, name: str, value: float) -> None:
        """Add `value` to one of this batch's metrics: additive numbers (sums a stage computes, e.g.
        the merge's agreement counts) that every runner sums per shard into the stage's counters
        under "metrics", so they reach the commit records and the manifest like any counter."""
        self._metrics[name] = self._metrics.get(name, 0) + value

    def take_metrics(self) -> dict:
        metrics, self._metrics = self._metrics, {}
        return metrics

    def process_batch(self, records: list[dict], images: list | None) -> list[dict]:
        """Default: one record at a time, each failure recorded on its record. `images[i]` is the
        decoded RGB PIL image of records[i] (or its bytes with image_input = "bytes")."""
        for i, rec in enumerate(records):
            self.guarded(rec, lambda rec=rec, i=i: self.process_record(rec, images[i] if images else None))
        return records

    def process_record(self, record: dict, image) -> None:
        raise NotImplementedError(f"{type(self).__name__} implements neither process_record nor process_batch")

    def guarded(self, record: dict, fn) -> Any:
        """Run fn; on an exception record it on the image instead of failing the batch."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - per-element error contract
            record_error(record, self.name, exc)
            return None


def _checks_to_dict(value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    return {k: v for k, v in value}  # pyarrow returns maps as lists of (key, value)


def table_to_records(table: pa.Table) -> list[dict]:
    """Image records as plain dicts (maps as dicts); drops the transient image columns."""
    cols = [c for c in table.column_names if c not in TRANSIENT_COLUMNS]
    records = table.select(cols).to_pylist()
    for rec in records:
        for key in ANNOTATION_KINDS:
            anns = rec.get(key) or []
            for ann in anns:
                ann["checks"] = _checks_to_dict(ann.get("checks"))
            rec[key] = anns
        rec["errors"] = rec.get("errors") or []
    return records


def records_to_table(records: Iterable[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(records), schema=IMAGE_RECORD_SCHEMA)


def decode_pixels(data: bytes | None, width: int, height: int) -> bytearray:
    """Encoded bytes -> the raw RGB buffer of PIXELS_COLUMN; the decoded size must be the record's
    (all geometry is in those pixels), else a ValueError that names both sizes."""
    if data is None:
        raise ValueError("no image bytes for this record")
    img = decode_image(data)
    if img.size != (width, height):
        raise ValueError(f"decoded size {img.width}x{img.height} differs from the record's {width}x{height}; "
                         "geometry would be in the wrong frame")
    return rgb_bytes(img)


# Rows of pixels copied at once by rgb_bytes (about this many bytes).
STRIP_BYTES = 16 << 20


def rgb_bytes(img) -> bytearray:
    """The raw RGB buffer of an RGB image (row-major), copied strip by strip: the image plus one buffer
    in memory, where Pillow's tobytes holds three copies at its peak (chunks, the joined bytes, the image)."""
    width, height = img.size
    row = width * 3
    out = bytearray(row * height)
    step = max(1, STRIP_BYTES // max(1, row))
    for y in range(0, height, step):
        strip = img.crop((0, y, width, min(height, y + step))).tobytes()
        out[y * row:y * row + len(strip)] = strip
    return out


def pixels_image(buffer: bytes, width: int, height: int):
    """A PIXELS_COLUMN cell -> RGB PIL image (no decode, no copy of the pixel data)."""
    from PIL import Image

    if len(buffer) != width * height * 3:
        raise ValueError(f"pixel buffer of {len(buffer)} bytes is not {width}x{height}x3")
    return Image.frombuffer("RGB", (width, height), buffer, "raw", "RGB", 0, 1)


def with_pixels(table: pa.Table, encoded: list[bytes | None]) -> pa.Table:
    """`table` (image records) + PIXELS_COLUMN: each image decoded once for a step. Where decoding
    fails the cell is null and the failure is recorded on that record's `errors` (stage "decode")."""
    widths, heights = table.column("width").to_pylist(), table.column("height").to_pylist()
    cells, failures = [], {}
    for i, (data, w, h) in enumerate(zip(encoded, widths, heights)):
        try:
            cells.append(decode_pixels(data, int(w), int(h)))
        except Exception as exc:  # noqa: BLE001 - one image's problem, the step goes on
            failures[i] = exc
            cells.append(None)
    if failures:
        transient = {c: table.column(c) for c in table.column_names if c in TRANSIENT_COLUMNS}
        records = table_to_records(table)
        for i, exc in failures.items():
            record_error(records[i], DECODE_STAGE, exc)
        table = records_to_table(records)
        for c, col in transient.items():
            table = table.append_column(c, col)
    return table.append_column(PIXELS_COLUMN, pa.array(cells, pa.binary()))


def batch_images(batch: pa.Table, records: list[dict], image_input: str, stage: str) -> list:
    """The images a stage gets for `records` (rows of `batch`): PIL images from the step's pixel
    column, or encoded bytes. A batch that only carries bytes (a stage called directly, outside a
    runner) is decoded here. None marks an image that could not be decoded (error on its record)."""
    cols = batch.column_names
    if image_input == "bytes":
        if IMAGE_BYTES_COLUMN not in cols:
            raise ValueError(f"stage {stage!r} needs image bytes but the batch has no {IMAGE_BYTES_COLUMN!r} column")
        return batch.column(IMAGE_BYTES_COLUMN).to_pylist()
    if PIXELS_COLUMN in cols:
        buffers = batch.column(PIXELS_COLUMN).to_pylist()
    elif IMAGE_BYTES_COLUMN in cols:
        buffers = []
        for rec, data in zip(records, batch.column(IMAGE_BYTES_COLUMN).to_pylist()):
            if any(e.get("stage") == DECODE_STAGE for e in rec.get("errors") or []):
                buffers.append(None)  # an earlier stage of the step found it undecodable: recorded once
                continue
            try:
                buffers.append(decode_pixels(data, int(rec["width"]), int(rec["height"])))
            except Exception as exc:  # noqa: BLE001 - recorded on the image, the batch goes on
                record_error(rec, DECODE_STAGE, exc)
                buffers.append(None)
    else:
        raise ValueError(f"stage {stage!r} needs images but the batch has neither {PIXELS_COLUMN!r} nor {IMAGE_BYTES_COLUMN!r}")
    return [None if b is None else pixels_image(b, int(r["width"]), int(r["height"]))
            for b, r in zip(buffers, records)]


def pick_device() -> str:
    """CUDA when this worker sees a GPU, else CPU (Ray sets CUDA_VISIBLE_DEVICES per actor)."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
