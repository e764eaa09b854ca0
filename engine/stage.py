"""The stage contract: what every annotator, filter and refiner implements.

A stage declares the resources it needs and computes on a batch of image records
(a pyarrow Table of schemas.IMAGE_RECORD_SCHEMA). It never imports an engine: the runners
in engine.runners adapt it to in-process, Ray Data and Beam execution. Models load once
per worker in setup(); a failure on one image is recorded in that record's `errors` and
the rest of the batch goes on (Beam RunInference's per-element error contract).
"""
from __future__ import annotations

import io
import traceback
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from schemas.records import IMAGE_RECORD_SCHEMA, params_hash, source_of

# Runners attach the image bytes to a batch under this column for stages with
# needs_images; it is dropped before a shard is written (annotation shards never copy bytes).
IMAGE_BYTES_COLUMN = "image_bytes"


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs (NeMo Curator's Resources)."""

    cpus: float = 1.0
    gpus: float = 0.0  # fractional GPUs let several actors share a device
    batch_size: int = 8
    concurrency: int = 1  # actors (Ray) / parallel workers for model stages


class StageParams(BaseModel):
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
    needs_images: ClassVar[bool] = False  # the runner attaches image bytes when True
    uses_model: ClassVar[bool] = False  # CPU-only stages run as Ray tasks, model stages as actors

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

    # ----------------------------------------------------------------- provenance
    @property
    def params_hash(self) -> str:
        return params_hash(self.params.model_dump(exclude={"batch_size", "cpus", "gpus", "concurrency"}))

    def source(self, model: str = "", revision: str = "") -> dict:
        return source_of(
            self.name, model, revision, self.params.model_dump(exclude={"batch_size", "cpus", "gpus", "concurrency"})
        )

    def resolve_model(self, ref: str) -> str:
        """A model parameter may name an alias of the pipeline's `models:` section."""
        return self.models.get(ref, ref)

    # -------------------------------------------------------------------- contract
    def setup(self) -> None:
        """Load models once per worker. Called by every runner before the first batch."""

    def ensure_setup(self) -> None:
        if not self._is_setup:
            self.setup()
            self._is_setup = True

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.ensure_setup()
        has_images = IMAGE_BYTES_COLUMN in batch.column_names
        if self.needs_images and not has_images:
            raise ValueError(f"stage {self.name!r} needs images but the batch has no {IMAGE_BYTES_COLUMN!r} column")
        images = batch.column(IMAGE_BYTES_COLUMN).to_pylist() if self.needs_images else None
        out = self.process_batch(table_to_records(batch), images)
        table = records_to_table(out)
        if has_images:  # carried through for the next stage of the step, whether this one used it or not
            table = table.append_column(IMAGE_BYTES_COLUMN, batch.column(IMAGE_BYTES_COLUMN))
        return table

    def process_batch(self, records: list[dict], images: list[bytes] | None) -> list[dict]:
        """Default: one record at a time, each failure recorded on its record."""
        for i, rec in enumerate(records):
            self.guarded(rec, lambda rec=rec, i=i: self.process_record(rec, images[i] if images else None))
        return records

    def process_record(self, record: dict, image: bytes | None) -> None:
        raise NotImplementedError(f"{type(self).__name__} implements neither process_record nor process_batch")

    def guarded(self, record: dict, fn) -> Any:
        """Run fn; on an exception record it on the image instead of failing the batch."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - per-element error contract
            record_error(record, self.name, exc)
            return None


def record_error(record: dict, stage: str, exc: BaseException | str) -> None:
    if isinstance(exc, BaseException):
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
        msg = f"{type(exc).__name__}: {exc}{where}"
    else:
        msg = str(exc)
    record.setdefault("errors", []).append({"stage": stage, "error": msg})


def _checks_to_dict(value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    return {k: v for k, v in value}  # pyarrow returns maps as lists of (key, value)


def table_to_records(table: pa.Table) -> list[dict]:
    """Image records as plain dicts (maps as dicts); drops the transient image column."""
    cols = [c for c in table.column_names if c != IMAGE_BYTES_COLUMN]
    records = table.select(cols).to_pylist()
    for rec in records:
        for key in ("texts", "regions", "groundings"):
            anns = rec.get(key) or []
            for ann in anns:
                ann["checks"] = _checks_to_dict(ann.get("checks"))
            rec[key] = anns
        rec["errors"] = rec.get("errors") or []
    return records


def records_to_table(records: Iterable[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(records), schema=IMAGE_RECORD_SCHEMA)


def decode_image(data: bytes):
    """Bytes from images/ -> RGB PIL image with EXIF orientation applied (as ingest measured)."""
    from PIL import Image, ImageOps

    from engine.ingest.pixels import to_rgb  # 16-bit scaled, not clipped to white

    img = Image.open(io.BytesIO(data))
    return to_rgb(ImageOps.exif_transpose(img))


def pick_device() -> str:
    """CUDA when this worker sees a GPU, else CPU (Ray sets CUDA_VISIBLE_DEVICES per actor)."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
