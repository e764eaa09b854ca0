"""Turn whatever the user points at into a sorted list of lazily-readable input items.

Listing never reads image bytes (readers run later, chunk by chunk, on the runner's workers), is
streamed (a folder, bucket prefix or list file of millions of entries is never held in memory at
once; the order is deterministic), and a broken file is still listed so that decode quarantines
it with a reason instead of it silently vanishing. Sources: a folder (recursive, image extensions case-insensitive, .tar
shards inside are expanded), a single image, a list file (.csv/.jsonl/.parquet with a column
path|url|uri|image; entries may be fsspec URLs), WebDataset tar shards (a tar, or a glob of
them) and a COCO JSON whose boxes, masks and captions come along as `human` annotations.

Names are kept exactly (engine.ingest.locations.location_of: a name that is not UTF-8 becomes a
percent-escaped file:// URL), list-file and COCO rows that are local files carry a fingerprint
(one stat: a changed file is ingested again), and a URL protocol whose package is missing is one
InputError here, in the driver, not one quarantined input per URL.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator

from engine.ingest import locations as loc
from engine.ingest.coco import NonStandardJson, parse_coco_json, read_coco, read_coco_file
from engine.ingest.human import limit_annotations
from engine.ingest.locations import InputError, ListingProblem, escape_name, location_of
from engine.ingest.quarantine import Quarantined
from engine.ingest.webdataset import list_samples

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LIST_EXTENSIONS = (".csv", ".jsonl", ".parquet")
PATH_COLUMNS = ("path", "url", "uri", "image")  # the first present (case-insensitive) is the location
CAPTION_COLUMNS = ("caption", "text")  # optional column of a list file: enters as a human caption
# Largest cell of a CSV list file (Python's csv module stops at 128 KiB by default): a long caption is
# read and then refused by the caption policy (engine.ingest.human.limit_annotations), not the run.
MAX_CSV_CELL_BYTES = 16 << 20
MAX_LINE_BYTES = 32 << 20  # a JSONL / CSV line longer than this is one error naming the file and line
MAX_PARQUET_COLUMN_BYTES = 256 << 20  # uncompressed bytes of one column chunk of a Parquet list file
MAX_COCO_WHOLE_BYTES = 256 << 20  # a COCO JSON with NaN literals is parsed whole (~8x its size in memory)


@dataclass(frozen=True)
class InputItem:
    """One image to ingest; `read` fetches the bytes only when called."""

    uri: str  # path or URL as the user gave it (or tar path + '::' + member name), as valid UTF-8 (location_of)
    source: str  # dataset / origin name
    read: Callable[..., bytes] = field(repr=False, compare=False)  # read(max_bytes) for engine readers
    human: dict | None = None  # imported annotations (format: engine.ingest.human), JSON-serialisable
    fingerprint: str | None = None  # size + mtime / ETag from the listing: changes when the input changes


def has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def limited(item: InputItem, cfg) -> InputItem:
    """`item` with the ingest caption / annotation policy applied to its imported annotations
    (`cfg`: engine.config.IngestConfig)."""
    if item.human is None:
        return item
    human = limit_annotations(item.human, cfg.max_caption_chars, cfg.max_captions_per_image, cfg.max_objects_per_image)
    return item if human is item.human else dataclasses.replace(item, human=human)


def list_inputs(src: str, source: str | None = None, image_root: str | None = None,
                max_file_bytes: int | None = None, allow_urls: bool = False, limits: Any = None) -> list[InputItem]:
    """Every input image of `src`, in a deterministic order (small sources; see iter_inputs)."""
    return list(iter_inputs(src, source, image_root, max_file_bytes, allow_urls, limits))


def iter_inputs(src: str, source: str | None = None, image_root: str | None = None,
                max_file_bytes: int | None = None, allow_urls: bool = False, limits: Any = None) -> Iterator[InputItem]:
    """Every input image of `src`, streamed in a deterministic order.

    `source` overrides the origin name recorded on each image (default: the folder / file name).
    `image_root` (COCO only) is where `file_name`s are resolved; default the JSON's folder, and a
    relative image_root is taken from the JSON's folder (COCO's `annotations/` + `val2017/` layout:
    image_root="../val2017"). `max_file_bytes` bounds what the listing itself reads (tar captions).
    A COCO `file_name` must stay inside the image root; `allow_urls` also lets it be a URL. `limits`
    (the ingest config) caps the COCO annotations kept per image while the file is read.
    """
    src = str(src)
    loc.require_protocol(src, "input")
    if loc.has_glob(src) and not loc.exists(src):  # "photos [2020]/" is a folder, not a glob
        paths = loc.expand_glob(src)
        if not paths:
            raise FileNotFoundError(f"input {src!r}: the glob matches no file")
        for path in paths:
            name = source or escape_name(loc.folder_name(loc.dirname(path)))
            yield from iter_inputs(path, name, image_root, max_file_bytes, allow_urls, limits)
        return
    if not loc.exists(src):
        raise FileNotFoundError(f"input {src!r} does not exist")
    if loc.is_dir(src):
        yield from _iter_folder(src, source or escape_name(loc.folder_name(src)), max_file_bytes)
        return
    lower = src.lower()
    if lower.endswith(LIST_EXTENSIONS):
        yield from _iter_list_file(src, source or escape_name(loc.stem(src)))
    elif lower.endswith(".tar"):
        yield from _iter_tar(src, source or escape_name(loc.stem(src)), None, max_file_bytes)
    elif lower.endswith(".json"):
        yield from _list_coco(src, source or escape_name(loc.stem(src)), image_root, allow_urls, limits)
    elif has_image_extension(lower):
        yield InputItem(uri=loc.input_uri(src), source=source or escape_name(loc.basename(loc.dirname(src))),
                        read=loc.reader(src), fingerprint=loc.local_fingerprint(src))
    else:
        raise InputError(
            f"input {src!r}: not a folder, an image, a list file ({', '.join(LIST_EXTENSIONS)}), "
            "a WebDataset .tar or a COCO .json"
        )


# ---------------------------------------------------------------------------- folders
def _iter_folder(root: str, source: str, max_file_bytes: int | None) -> Iterator[InputItem]:
    """Image files and .tar shards below `root` (local or URL prefix), streamed; a folder that
    cannot be listed is an input of its own, quarantined with the reason."""
    for path, fingerprint, problem in loc.iter_files(root):
        if problem is not None:
            yield InputItem(uri=location_of(path), source=source, read=ListingProblem(*problem))
        elif has_image_extension(path):
            yield InputItem(uri=loc.input_uri(path), source=source, read=loc.reader(path), fingerprint=fingerprint)
        elif path.lower().endswith(".tar"):
            yield from _iter_tar(path, source, fingerprint, max_file_bytes)


@contextmanager
def _input_file(path: str) -> Iterator[IO[bytes]]:
    """A list / COCO file given as the input: a regular file (a FIFO or /dev/zero named list.csv
    would block or never end), else an InputError naming it."""
    try:
        with loc.open_regular(location_of(path)) as (f, _):
            yield f
    except Quarantined as q:
        raise InputError(f"{escape_name(path)}: {q.detail}") from None


def _text(value: str) -> str:
    """Caption text as valid UTF-8 (the undecodable bytes of a list file become U+FFFD)."""
    if loc.is_text(value):
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        raw = value.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


# ---------------------------------------------------------------------------- list files
def _iter_rows(path: str) -> Iterator[tuple[list[str], dict[str, Any], int]]:
    """(columns, row, row number as a person counts it) of a list file, streamed in file order.
    Bytes that are not UTF-8 are kept (surrogateescape), so a row can name any file exactly."""
    lower = path.lower()
    with _input_file(path) as f:
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            columns = pf.schema_arrow.names
            _check_parquet_sizes(pf, path)
            n = 0
            for batch in pf.iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    n += 1
                    yield columns, row, n
            return
        text = _bounded_lines(f, path)
        if lower.endswith(".csv"):
            if csv.field_size_limit() < MAX_CSV_CELL_BYTES:
                csv.field_size_limit(MAX_CSV_CELL_BYTES)
            reader = csv.DictReader(text)
            i = 1
            try:
                columns = list(reader.fieldnames or [])
                for i, row in enumerate(reader, start=2):  # row 1 is the header
                    yield columns, row, i
            except csv.Error as exc:
                raise InputError(f"{escape_name(path)} row {i + 1}: not a readable CSV row ({exc}; a cell may hold "
                                 f"at most {MAX_CSV_CELL_BYTES} bytes)") from None
            return
        for lineno, line in enumerate(text, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise InputError(f"{escape_name(path)} line {lineno}: not valid JSON "
                                 f"({getattr(exc, 'msg', type(exc).__name__)})") from None
            if not isinstance(row, dict):
                raise InputError(f"{escape_name(path)} line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield list(row), row, lineno


def _bounded_lines(f: IO[bytes], path: str) -> Iterator[str]:
    """The file's lines as text (UTF-8, a BOM dropped, undecodable bytes kept by surrogateescape), each
    read with a cap: a 16 GB file without a newline is one error naming the file, never read whole.
    (Read in blocks: fsspec files have no readline(limit).)"""
    buf = bytearray()
    lineno, eof = 0, False
    while True:
        nl = buf.find(b"\n")
        while nl < 0 and not eof:
            if len(buf) > MAX_LINE_BYTES:
                break
            block = f.read(1 << 20)
            if not block:
                eof = True
                break
            start = len(buf)
            buf += block
            nl = buf.find(b"\n", start)
        lineno += 1
        end = nl + 1 if nl >= 0 else len(buf)
        if end > MAX_LINE_BYTES + 1 or (nl < 0 and len(buf) > MAX_LINE_BYTES):
            raise InputError(f"{escape_name(path)} line {lineno}: longer than {MAX_LINE_BYTES} bytes; not read")
        if end == 0:
            return
        raw = bytes(buf[:end])
        del buf[:end]
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        yield raw.decode("utf-8", "surrogateescape")


def _check_parquet_sizes(pf, path: str) -> None:
    """A Parquet list file whose column chunks decompress to more than MAX_PARQUET_COLUMN_BYTES (a 13 KB
    file can hold a 300 MB cell) is one error naming the file, before anything is decompressed."""
    meta = pf.metadata
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            size = group.column(c).total_uncompressed_size
            if size > MAX_PARQUET_COLUMN_BYTES:
                raise InputError(f"{escape_name(path)}: column {group.column(c).path_in_schema!r} of row group {g} "
                                 f"decompresses to {size} bytes, over {MAX_PARQUET_COLUMN_BYTES}; not read")


def _iter_list_file(path: str, source: str) -> Iterator[InputItem]:
    """One image per row, in the file's order; relative entries are resolved from the list file's folder.
    Local rows are stat'ed (size + mtime): a file that changes under an unchanged row is ingested again."""
    base = loc.dirname(path)
    origin = escape_name(loc.basename(path))
    path_col = caption_col = None
    for columns, row, number in _iter_rows(path):
        by_lower = {c.lower(): c for c in columns if isinstance(c, str)}
        col = next((by_lower[c] for c in PATH_COLUMNS if c in by_lower), None)
        if col is None:
            raise InputError(f"{escape_name(path)}: no image column; expected one of {list(PATH_COLUMNS)}, "
                             f"found columns {columns}")
        path_col = path_col or col
        caption_col = caption_col or next((by_lower[c] for c in CAPTION_COLUMNS if c in by_lower), None)
        value = row.get(path_col)
        if isinstance(value, bytes):  # a binary Parquet column: the name's exact bytes
            value = os.fsdecode(value)
        if value is None or not str(value).strip():
            raise InputError(f"{escape_name(path)} row {number}: column {path_col!r} is empty")
        location = loc.join(base, str(value).strip())
        loc.require_protocol(location, f"{escape_name(path)} row {number}")
        caption = row.get(caption_col) if caption_col else None
        human = None
        if isinstance(caption, str):
            if caption.strip():
                human = {"origin": origin, "captions": [{"text": _text(caption.strip())}]}
        elif caption is not None:  # a dict / list / number cell: refused with its type, never stored as a repr
            human = {"origin": origin, "captions": [], "rejected": [
                f"{origin} row {number}: column {caption_col!r} must hold a string caption, got "
                f"{type(caption).__name__}; not imported"]}
        yield InputItem(uri=loc.input_uri(location) if not loc.is_url(location) else location_of(location), source=source, read=loc.reader(location), human=human,
                        fingerprint=loc.local_fingerprint(location))


# ---------------------------------------------------------------------------- tars, COCO
def _iter_tar(tar_path: str, source: str, fingerprint: str | None, max_file_bytes: int | None) -> Iterator[InputItem]:
    for uri, read, human in list_samples(tar_path, max_file_bytes):
        member = f"{read.offset}:{read.size}" if hasattr(read, "offset") else "problem"
        yield InputItem(uri=uri, source=source, read=read, human=human,
                        fingerprint=f"{fingerprint}:{member}" if fingerprint else None)


def _size_of(f: IO[bytes]) -> int | None:
    try:
        return os.fstat(f.fileno()).st_size
    except (OSError, AttributeError, io.UnsupportedOperation):
        return None


_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def outside_root(file_name: str, allow_urls: bool = False) -> str | None:
    """Why a COCO `file_name` does not name a file inside the image root (None: it does). Refused: an
    absolute path, a path whose `..` leave the root, file:// and every other URL (a GET to any host,
    internal ones included) unless `allow_urls` (ingest.allow_urls) lets non-local URLs through."""
    name = file_name.strip()
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", name)
    if scheme and ("://" in name or scheme.group(1).lower() == "file"):
        kind = scheme.group(1).lower()
        if allow_urls and kind != "file" and loc.is_url(name):
            return None
        why = "a local file:// URL" if kind == "file" else f"a {kind}:// URL; set ingest.allow_urls to read URLs"
        return f"file_name {escape_name(name)!r:.120} is {why}; only paths inside the image root are read"
    if name.startswith(("/", "\\", "~")) or _DRIVE.match(name):
        return f"file_name {escape_name(name)!r:.120} is an absolute path; only paths inside the image root are read"
    depth = 0
    for part in re.split(r"[/\\]", name):
        depth += -1 if part == ".." else (0 if part in ("", ".") else 1)
        if depth < 0:
            return f"file_name {escape_name(name)!r:.120} leaves the image root ('..'); only paths inside it are read"
    return None


def _list_coco(json_path: str, source: str, image_root: str | None, allow_urls: bool = False,
               limits: Any = None) -> list[InputItem]:
    try:
        humans = read_coco_file(lambda: _input_file(json_path), escape_name(json_path), limits)
    except NonStandardJson:
        humans = _read_coco_whole(json_path, limits)
    json_dir = loc.dirname(json_path)
    root = loc.join(json_dir, image_root) if image_root else json_dir
    items = []
    for human in humans:
        refused = outside_root(human["file_name"], allow_urls)
        if refused is not None:
            items.append(InputItem(uri=escape_name(human["file_name"].strip()), source=source,
                                   read=ListingProblem("outside_root", f"{escape_name(json_path)}: {refused}")))
            continue
        location = loc.join(root, human["file_name"])
        loc.require_protocol(location, f"{escape_name(json_path)} image {human['file_name']!r}")
        uri = location_of(location) if loc.is_url(location) else loc.input_uri(location)
        items.append(InputItem(uri=uri, source=source, read=loc.reader(location), human=human,
                               fingerprint=loc.local_fingerprint(location)))
    return sorted(items, key=lambda it: it.uri)


def _read_coco_whole(json_path: str, limits: Any) -> list[dict]:
    """A COCO file that is not standard JSON (NaN / Infinity literals, as Python's json writes, or
    lone surrogate escapes) is parsed whole, up to MAX_COCO_WHOLE_BYTES (the streaming parser refuses them)."""
    with _input_file(json_path) as f:
        try:
            data = loc.read_capped(f, MAX_COCO_WHOLE_BYTES, _size_of(f))
        except Quarantined:
            raise InputError(f"{escape_name(json_path)}: has NaN / Infinity literals or lone surrogates (not "
                             f"standard JSON) and is over {MAX_COCO_WHOLE_BYTES >> 20} MiB; such a file is parsed "
                             "whole: write null for missing numbers, or split it") from None
        coco = parse_coco_json(data, escape_name(json_path))
    return read_coco(coco, escape_name(json_path), limits)
