"""The data model shared by every stage: Arrow schemas, geometry, validation.

Nothing in this package imports another fld-engine package; every stage, runner and
exporter imports it, so it is the contract between them.
"""
from schemas.records import (
    ANNOTATION_FIELDS,
    ANNOTATION_KINDS,
    GROUNDING_TYPE,
    IMAGE_RECORD_SCHEMA,
    IMAGES_SCHEMA,
    QUARANTINE_SCHEMA,
    REGION_TYPE,
    SOURCE_TYPE,
    TEXT_TYPE,
    TIERS,
    empty_record,
    make_ann_id,
    new_annotation,
    source_of,
)
from schemas.validate import SchemaError, validate_table

__all__ = [
    "ANNOTATION_FIELDS",
    "ANNOTATION_KINDS",
    "GROUNDING_TYPE",
    "IMAGE_RECORD_SCHEMA",
    "IMAGES_SCHEMA",
    "QUARANTINE_SCHEMA",
    "REGION_TYPE",
    "SOURCE_TYPE",
    "TEXT_TYPE",
    "TIERS",
    "SchemaError",
    "empty_record",
    "make_ann_id",
    "new_annotation",
    "source_of",
    "validate_table",
]
