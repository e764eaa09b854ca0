"""The Arrow types of `fld export --format hf` (written by engine/views/export.py): Parquet that Hugging Face
`datasets` loads unchanged.

`datasets.load_dataset("parquet", data_files="DEST/*.parquet")` fails on the annotation shards
themselves: `checks` is an Arrow MAP, which `datasets` has no feature type for, and image bytes
are plain binary. This export writes one row per image (kept annotations only, like every export)
with
- `image`: a `datasets` Image feature (struct {bytes, path}), decoded to PIL on access;
- every `checks` map as a LIST of {name, value} structs. Why a list and not a JSON string: the
  values stay float64 (no parsing, no precision loss), DuckDB / pandas / pyarrow read it natively
  and `datasets` shows it as a list of dicts;
- the features JSON in the Parquet schema metadata (key `huggingface`), so column types need no
  cast. The metadata is written here from the Arrow schema, so exporting does not need `datasets`
  installed; the tests check it against the real library.
"""
from __future__ import annotations

import json

import pyarrow as pa

from schemas.records import IMAGE_RECORD_SCHEMA

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image storage
PAIR_FIELDS = ("name", "value")  # what a MAP entry becomes

_DTYPES = {
    pa.bool_(): "bool", pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
    pa.uint8(): "uint8", pa.uint16(): "uint16", pa.uint32(): "uint32", pa.uint64(): "uint64",
    pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64",
    pa.string(): "string", pa.large_string(): "large_string", pa.binary(): "binary", pa.large_binary(): "large_binary",
}


def without_maps(t: pa.DataType) -> pa.DataType:
    """`t` with every map<k, v> replaced by list<struct<name: k, value: v>>."""
    if pa.types.is_map(t):
        return pa.list_(pa.struct([(PAIR_FIELDS[0], t.key_type), (PAIR_FIELDS[1], without_maps(t.item_type))]))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, without_maps(f.type), f.nullable) for f in t])
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(without_maps(t.value_type))
    return t


def map_values_as_pairs(value, t: pa.DataType):
    """A Python value of Arrow type `t` -> the value of `without_maps(t)`."""
    if value is None:
        return None
    if pa.types.is_map(t):
        items = value.items() if isinstance(value, dict) else value
        return [{PAIR_FIELDS[0]: k, PAIR_FIELDS[1]: map_values_as_pairs(v, t.item_type)} for k, v in items]
    if pa.types.is_struct(t):
        return {f.name: map_values_as_pairs(value.get(f.name), f.type) for f in t}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [map_values_as_pairs(v, t.value_type) for v in value]
    return value


def _feature(t: pa.DataType) -> dict:
    """The `datasets` features JSON of an Arrow type (Value / List / struct dict)."""
    if pa.types.is_struct(t):
        return {f.name: _feature(f.type) for f in t}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return {"feature": _feature(t.value_type), "_type": "List"}
    if t in _DTYPES:
        return {"dtype": _DTYPES[t], "_type": "Value"}
    raise TypeError(f"no Hugging Face datasets feature for Arrow type {t}")


def with_features(schema: pa.Schema, image_columns: tuple[str, ...] = ()) -> pa.Schema:
    """`schema` + the `huggingface` metadata naming its features; `image_columns` (of IMAGE_TYPE)
    become Image features."""
    features = {}
    for field in schema:
        if field.name in image_columns:
            if field.type != IMAGE_TYPE:
                raise TypeError(f"image column {field.name!r} must be {IMAGE_TYPE}, not {field.type}")
            features[field.name] = {"_type": "Image"}
        else:
            features[field.name] = _feature(field.type)
    meta = dict(schema.metadata or {})
    meta[b"huggingface"] = json.dumps({"info": {"features": features}}).encode()
    return schema.with_metadata(meta)


def hf_image(data: bytes, name: str | None = None) -> dict:
    """A cell of an Image column: the original encoded bytes (never re-encoded) and a file name."""
    return {"bytes": data, "path": name}


HF_SCHEMA = with_features(
    pa.schema([pa.field(f.name, without_maps(f.type), f.nullable) for f in IMAGE_RECORD_SCHEMA]
              + [pa.field("image", IMAGE_TYPE)]),
    image_columns=("image",),
)
