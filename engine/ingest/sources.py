"""Turn whatever the user points at into a sorted list of lazily-readable input items.

Listing never reads image bytes (readers run later, shard by shard, in parallel), and a
broken file is still listed so that decode quarantines it with a reason instead of it
silently vanishing. Sources: a folder (recursive, image extensions case-insensitive, .tar
shards inside are expanded), a single image, a list file (.csv/.jsonl/.parquet with a column
path|url|uri|image; entries may be fsspec URLs), WebDataset tar shards (a tar, or a glob of
them) and a COCO JSON whose boxes, masks and captions come along as `human` annotations.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.ingest import locations as loc
from engine.ingest.coco import read_coco
from engine.ingest.webdataset import list_samples

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LIST_EXTENSIONS = (".csv", ".jsonl", ".parquet")
PATH_COLUMNS = ("path", "url", "uri", "image")  # the first present (case-insensitive) is the location
CAPTION_COLUMNS = ("caption", "text")  # optional column of a list file: enters as a human caption


@dataclass(frozen=True)
class InputItem:
    """One image to ingest; `read` fetches the bytes only when called."""

    uri: str  # path or URL as the user gave it (or tar path + '::' + member name)
    source: str  # dataset / origin name
    read: Callable[[], bytes] = field(repr=False, compare=False)
    human: dict | None = None  # imported annotations (format: engine.ingest.human), JSON-serialisable


class InputError(ValueError):
    """A source that cannot be listed; the message names the file and the row / key."""


def has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_inputs(src: str, source: str | None = None, image_root: str | None = None) -> list[InputItem]:
    """Every input image of `src`, in a deterministic sorted order.

    `source` overrides the origin name recorded on each image (default: the folder / file name).
    `image_root` (COCO only) is where `file_name`s are resolved; default the JSON's folder, and a
    relative image_root is taken from the JSON's folder (COCO's `annotations/` + `val2017/` layout:
    image_root="../val2017").
    """
    src = str(src)
    if loc.has_glob(src) and not loc.exists(src):  # "photos [2020]/" is a folder, not a glob
        paths = loc.expand_glob(src)
        if not paths:
            raise FileNotFoundError(f"input {src!r}: the glob matches no file")
        items: list[InputItem] = []
        for path in paths:
            name = source or loc.folder_name(loc.dirname(path))
            items.extend(list_inputs(path, source=name, image_root=image_root))
        return items
    if not loc.exists(src):
        raise FileNotFoundError(f"input {src!r} does not exist")
    if loc.is_dir(src):
        return _list_folder(src, source or loc.folder_name(src))
    lower = src.lower()
    if lower.endswith(LIST_EXTENSIONS):
        return _list_file(src, source or loc.stem(src))
    if lower.endswith(".tar"):
        return _list_tar(src, source or loc.stem(src))
    if lower.endswith(".json"):
        return _list_coco(src, source or loc.stem(src), image_root)
    if has_image_extension(lower):
        return [InputItem(uri=src, source=source or loc.basename(loc.dirname(src)), read=loc.reader(src))]
    raise InputError(
        f"input {src!r}: not a folder, an image, a list file ({', '.join(LIST_EXTENSIONS)}), "
        "a WebDataset .tar or a COCO .json"
    )


# ---------------------------------------------------------------------------- folders
def _list_folder(root: str, source: str) -> list[InputItem]:
    """Image files and .tar shards below `root` (local or URL prefix), sorted by relative path."""
    items: list[InputItem] = []
    for path in loc.files_under(root):
        if has_image_extension(path):
            items.append(InputItem(uri=path, source=source, read=loc.reader(path)))
        elif path.lower().endswith(".tar"):
            items.extend(_list_tar(path, source))
    return items


# ---------------------------------------------------------------------------- list files
def _rows(path: str) -> tuple[list[str], list[dict[str, Any]], int]:
    """(columns, rows, number of the first data row as a person counts it) of a list file."""
    lower = path.lower()
    with loc.open_binary(path) as f:
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(f)
            return table.column_names, table.to_pylist(), 1
        text = f.read().decode("utf-8-sig")
    if lower.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        return list(reader.fieldnames or []), list(reader), 2  # row 1 is the header
    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        columns.update(dict.fromkeys(row))
    return list(columns), rows, 1


def _list_file(path: str, source: str) -> list[InputItem]:
    """One image per row; relative entries are resolved from the list file's folder."""
    columns, rows, first_row = _rows(path)
    by_lower = {c.lower(): c for c in columns if isinstance(c, str)}
    path_col = next((by_lower[c] for c in PATH_COLUMNS if c in by_lower), None)
    if path_col is None:
        raise InputError(f"{path}: no image column; expected one of {list(PATH_COLUMNS)}, found columns {columns}")
    caption_col = next((by_lower[c] for c in CAPTION_COLUMNS if c in by_lower), None)
    base = loc.dirname(path)
    items: list[InputItem] = []
    for i, row in enumerate(rows):
        value = row.get(path_col)
        if value is None or not str(value).strip():
            raise InputError(f"{path} row {i + first_row}: column {path_col!r} is empty")
        location = loc.join(base, str(value).strip())
        caption = row.get(caption_col) if caption_col else None
        human = None
        if caption is not None and str(caption).strip():
            human = {"origin": loc.basename(path), "captions": [{"text": str(caption).strip()}]}
        items.append(InputItem(uri=location, source=source, read=loc.reader(location), human=human))
    return sorted(items, key=lambda it: it.uri)


# ---------------------------------------------------------------------------- tars, COCO
def _list_tar(tar_path: str, source: str) -> list[InputItem]:
    return [InputItem(uri=uri, source=source, read=read, human=human) for uri, read, human in list_samples(tar_path)]


def _list_coco(json_path: str, source: str, image_root: str | None) -> list[InputItem]:
    with loc.open_binary(json_path) as f:
        try:
            coco = json.load(f)
        except json.JSONDecodeError as exc:
            raise InputError(f"{json_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    json_dir = loc.dirname(json_path)
    root = loc.join(json_dir, image_root) if image_root else json_dir
    items = []
    for human in read_coco(coco, json_path):
        location = loc.join(root, human["file_name"])
        items.append(InputItem(uri=location, source=source, read=loc.reader(location), human=human))
    return sorted(items, key=lambda it: it.uri)
