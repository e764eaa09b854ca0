"""Arrow schemas of the image record (one row per image, annotations nested).

Every step reads and writes tables of IMAGE_RECORD_SCHEMA; images/ shards hold the bytes
(IMAGES_SCHEMA) and quarantine/ the inputs that could not be used (QUARANTINE_SCHEMA).
Geometry is in original-image pixels (after EXIF orientation).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

TIERS = ("brief", "detailed", "more_detailed")
ANNOTATION_KINDS = ("texts", "regions", "groundings")  # the annotation lists of an image record
REGION_KINDS = ("object", "text")
STATUSES = ("kept", "dropped")

SOURCE_TYPE = pa.struct(
    [
        ("annotator", pa.string()),  # stage name, or "human" for imported ground truth
        ("model", pa.string()),  # model reference (hub id, local dir, random:<config>)
        ("revision", pa.string()),  # hub revision / checkpoint hash / random seed+config hash
        ("params_hash", pa.string()),  # hash of the stage parameters that produced it
    ]
)
# COCO RLE with the counts as the compressed string pycocotools produces.
MASK_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
BOX_TYPE = pa.list_(pa.float64())  # [x0, y0, x1, y1]
POLYGON_TYPE = pa.list_(pa.list_(pa.float64()))  # several rings [x, y, x, y, ...]

# Fields every annotation carries, after its own fields.
ANNOTATION_FIELDS: list[tuple[str, pa.DataType]] = [
    ("source", SOURCE_TYPE),
    ("round", pa.int32()),  # 0 = specialists / import, k = refinement round k
    ("score", pa.float64()),  # confidence of the producer, null when it has none
    ("checks", pa.map_(pa.string(), pa.float64())),  # every filter score computed
    ("status", pa.string()),  # kept | dropped
    ("reason", pa.string()),  # why dropped (first filter that dropped it), else null
]

TEXT_TYPE = pa.struct(
    [("ann_id", pa.string()), ("tier", pa.string()), ("text", pa.string())] + ANNOTATION_FIELDS
)
REGION_TYPE = pa.struct(
    [
        ("ann_id", pa.string()),
        ("kind", pa.string()),  # object | text
        ("box", BOX_TYPE),
        ("quad", pa.list_(pa.float64())),  # 8 floats, clockwise from top-left (OCR) or null
        ("polygon", POLYGON_TYPE),
        ("mask", MASK_TYPE),
        ("label", pa.string()),  # category, or the OCR string
        ("brief", pa.string()),  # short description of the region, or null
    ]
    + ANNOTATION_FIELDS
)
GROUNDING_TYPE = pa.struct(
    [
        ("ann_id", pa.string()),
        ("text_ann_id", pa.string()),  # the caption the phrase comes from
        ("phrase", pa.string()),
        ("char_start", pa.int32()),
        ("char_end", pa.int32()),
        ("box", BOX_TYPE),
        ("mask", MASK_TYPE),
    ]
    + ANNOTATION_FIELDS
)
ERROR_TYPE = pa.struct([("stage", pa.string()), ("error", pa.string())])

IMAGE_RECORD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source", pa.string()),
        ("texts", pa.list_(TEXT_TYPE)),
        ("regions", pa.list_(REGION_TYPE)),
        ("groundings", pa.list_(GROUNDING_TYPE)),
        ("errors", pa.list_(ERROR_TYPE)),  # per-image failures of a stage; the batch goes on
    ]
)

IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # sha256 of the original bytes
        ("uri", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),  # after EXIF orientation
        ("height", pa.int32()),
        ("format", pa.string()),  # JPEG, PNG, ...
        ("mode", pa.string()),  # mode of the original file (RGB, L, P, CMYK, I;16 ...)
        ("bytes", pa.binary()),  # original file bytes, untouched
        ("human", pa.string()),  # JSON of imported annotations (COCO), or null
    ]
)

# inputs/part-k: the listing of input chunk k, written by the driver, read by the ingest worker of
# chunk k. Enough to open each input again on any machine (a file / URL, or a byte range of a tar).
INPUTS_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),  # as recorded on the image (tar members: <tar>::<member>)
        ("source", pa.string()),
        ("location", pa.string()),  # the file or URL to open
        ("offset", pa.int64()),  # a tar member: where its data starts in `location` (else null)
        ("length", pa.int64()),  # ... and how many bytes it has
        ("human", pa.string()),  # JSON of imported annotations, or null
        ("fingerprint", pa.string()),  # size + mtime / ETag from the listing (change detection), or null
        ("reason", pa.string()),  # set when the listing found the input unusable (a folder that cannot be
        ("detail", pa.string()),  # listed, a cut tar, a bad caption): quarantined with these, not read
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),  # short code: missing, empty, not_image, truncated, ...
        ("detail", pa.string()),  # the message that explains it
        ("image_id", pa.string()),  # content hash when the bytes could be read
        ("duplicate_of", pa.string()),  # image_id of the first copy for reason=duplicate
    ]
)


def _hash(*parts: Any) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def make_ann_id(image_id: str, annotator: str, kind: str, index: int, *extra: Any) -> str:
    """Deterministic id: the same image, stage and position give the same id on every runner."""
    return _hash(image_id, annotator, kind, index, *extra)


def params_hash(params: Any) -> str:
    return _hash(params)


def source_of(annotator: str, model: str = "", revision: str = "", params: Any = None) -> dict:
    return {
        "annotator": annotator,
        "model": model,
        "revision": revision,
        "params_hash": params_hash(params if params is not None else {}),
    }


def new_annotation(
    source: dict, score: float | None = None, round_: int = 0, **fields: Any
) -> dict:
    """An annotation dict with the common fields filled: kept, no checks yet."""
    ann = dict(fields)
    ann.update(source=source, round=round_, score=score, checks={}, status="kept", reason=None)
    return ann


def empty_record(image: dict) -> dict:
    """The image record a pipeline starts from, built from a row of images/."""
    return {
        "image_id": image["image_id"],
        "uri": image["uri"],
        "width": image["width"],
        "height": image["height"],
        "source": image["source"],
        "texts": [],
        "regions": [],
        "groundings": [],
        "errors": [],
    }
