"""A COCO JSON (instances and/or captions) -> per image, its annotations in the `human` format.

bbox xywh becomes xyxy, polygons stay polygons, uncompressed RLE (iscrowd) is compressed so
that every mask is the string-counts RLE the data model stores; category ids become names.

One bad entry never blocks the import: an annotation with a NaN / infinite / negative /
non-numeric / wrong-length bbox, a malformed segmentation, an RLE whose size is not the image's,
or a missing or unknown category_id is left out, and the reason (naming the file, the entry and
its annotation id) goes to that image's `rejected` list, which becomes the record's `errors`
(engine.ingest.human). Entries that belong to no image (an image_id that names no image, an image
entry without id or file_name) are logged as warnings naming the file (the first 20, then one
count). Only a file that is not COCO at all is an error.

A file is streamed (read_coco_file, ijson): never held whole nor parsed whole, its keys in any
order; per image, annotations past the ingest caps are counted, not held. read_coco takes a parsed
dict (tests, and files with NaN literals, which ijson refuses) through the same code.
"""
from __future__ import annotations

import json
import logging
import math
from typing import IO, Any, Callable, ContextManager, Iterator

import ijson

from engine.ingest.human import check_object, check_text
from engine.ingest.locations import basename
from schemas.geometry import check_polygon, check_rle, finite_numbers, polygon_to_box, rle_to_box

log = logging.getLogger(__name__)
MAX_LOGGED = 20  # file-level problems logged one by one; the rest are counted
MAX_REJECTED = 100  # refused annotations of one image given one by one; the rest are counted
MAX_CELL_CHARS = 4 << 20  # a longer string refuses its entry (an RLE of a 10k x 10k mask is ~1 MB)
MAX_RUN_BYTES = 64 << 20  # so many bytes without a string boundary: one absurd value, the file is refused
MAX_DEPTH = 32  # COCO nests 6 levels (an RLE's counts list); deeper is not COCO
KEYS = ("images", "annotations", "categories")


class CocoError(ValueError):
    """A COCO file that cannot be imported; the message names the file and the entry."""


class NonStandardJson(CocoError):
    """NaN / Infinity literals (Python's json writes them) or lone surrogate escapes, which the
    streaming parser refuses: such a file is parsed whole (engine.ingest.sources)."""


def parse_coco_json(data: bytes | str, path: str) -> Any:
    """The parsed JSON of a COCO file, or CocoError naming the file (binary data and absurd nesting
    included, which json reports as UnicodeDecodeError / RecursionError without the file name)."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise CocoError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise CocoError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise CocoError(f"{path}: not a COCO file (JSON nested too deeply)") from None


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _ann_where(path: str, j: int, ann: Any) -> str:
    ann_id = ann.get("id") if isinstance(ann, dict) else None
    return f"{path} annotations[{j}]" + (f" (id {ann_id!r:.40})" if ann_id is not None else "")


def segmentation(seg: Any, width: int | None, height: int | None) -> tuple[list[list[float]] | None, dict | None]:
    """COCO segmentation -> (polygon rings, compressed RLE {'size': [h, w], 'counts': str}), checked
    against the declared image size when there is one; ValueError says what is wrong."""
    if seg is None or seg == [] or seg == {}:
        return None, None
    if isinstance(seg, list):
        return check_polygon(seg, width or math.inf, height or math.inf), None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        try:
            return None, check_rle(seg, width, height)
        except ValueError as exc:
            raise ValueError(f"RLE segmentation: {exc}") from None
    raise ValueError("segmentation is neither a list of polygons nor an RLE {'size', 'counts'}")


def _categories(cats: list[tuple[int, Any, str | None]], path: str, problems: "_Problems") -> tuple[dict, dict]:
    """(id -> name, id -> why that category entry was refused) of (index, entry, why refused) triples."""
    names: dict[Any, str] = {}
    refused: dict[Any, str] = {}
    for j, cat, too_big in cats:
        where = f"{path} categories[{j}]"
        if too_big:
            problems.add(f"{where}: {too_big}; category not imported")
            continue
        cat_id = cat.get("id") if isinstance(cat, dict) else None
        if not _is_id(cat_id):
            problems.add(f"{where}: no usable 'id' ({cat_id!r:.40}); category not imported")
            continue
        name = cat.get("name")
        try:
            name = check_text(str(name) if isinstance(name, (int, float)) and not isinstance(name, bool) else name,
                              "category name")
        except ValueError as exc:
            refused.setdefault(cat_id, f"{where}: {exc}")
            continue
        if cat_id in names and names[cat_id] != name:
            problems.add(f"{where}: id {cat_id!r} appears twice; keeping the name {names[cat_id]!r}")
            continue
        names[cat_id] = name
    return names, refused


def _size(img: dict, where: str) -> tuple[int | None, int | None, str | None]:
    """(width, height, why the declared size is ignored)."""
    w, h = img.get("width"), img.get("height")
    if w is None and h is None:
        return None, None, None
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        return w, h, None
    return None, None, f"{where}: width/height {w!r:.20} x {h!r:.20} are not positive integers; size not checked"


def _object(ann: dict, entry: dict, categories: dict, refused: dict) -> dict:
    if ann.get("category_id") is None:
        raise ValueError("has no category_id")
    category_id = ann["category_id"]
    if not _is_id(category_id) or category_id not in categories:
        why = refused.get(category_id) if _is_id(category_id) else None
        raise ValueError(f"category_id {category_id!r:.40} is not in 'categories'" + (f" ({why})" if why else ""))
    width, height = entry["width"], entry["height"]
    polygon, rle = segmentation(ann.get("segmentation"), width, height)
    if "bbox" in ann:
        x, y, w, h = finite_numbers(ann["bbox"], "bbox [x, y, width, height]", length=4)
        if w < 0 or h < 0:
            raise ValueError(f"bbox {[x, y, w, h]} has a negative width or height")
        box = [x, y, x + w, y + h]
    elif polygon is not None:
        box = polygon_to_box(polygon)
    else:
        box = rle_to_box(rle)
    obj = {
        "label": categories[category_id],
        "category_id": category_id,
        "box": box,
        "polygon": polygon,
        "rle": rle,
        "iscrowd": 1 if ann.get("iscrowd") in (1, True) else 0,
        "coco_id": ann.get("id"),
    }
    if ann.get("utf8_string") is not None:  # COCO-Text: a transcribed text line (an OCR truth), kind `text`
        obj["text"] = check_text(ann["utf8_string"], "utf8_string")
    return check_object(obj, width, height)


def _add_annotation(entry: dict, ann: dict, where: str, categories: dict, refused: dict, limits: Any) -> None:
    """Adds `ann` to its image's entry, or ValueError saying why not. Over the per-image caps of
    `limits` (ingest.max_*: None, no caps) the annotation is only counted, so that one image's
    20,000 boxes or a million captions are never held (the count becomes one `rejected` sentence)."""
    has_geometry = "bbox" in ann or ann.get("segmentation") not in (None, [], {})
    if "caption" not in ann and not has_geometry:
        raise ValueError("has no bbox, segmentation or caption")
    caption = None
    if "caption" in ann:
        text = check_text(ann["caption"], "caption").strip()
        if limits is not None and len(text) > limits.max_caption_chars:
            raise ValueError(f"caption of {len(text)} characters is over ingest.max_caption_chars="
                             f"{limits.max_caption_chars}")
        caption = {"text": text, "coco_id": ann.get("id")}
    obj = _object(ann, entry, categories, refused) if has_geometry else None
    if caption is not None:
        if limits is not None and len(entry["captions"]) >= limits.max_captions_per_image:
            entry["over"]["captions"] += 1
        else:
            entry["captions"].append(caption)
    if obj is not None:
        if limits is not None and len(entry["objects"]) >= limits.max_objects_per_image:
            entry["over"]["objects"] += 1
        else:
            entry["objects"].append(obj)


def _reject(entry: dict, reason: str) -> None:
    if len(entry["rejected"]) < MAX_REJECTED:
        entry["rejected"].append(reason)
    else:
        entry["over"]["rejected"] += 1


class _Problems:
    """Entries that belong to no image: the first MAX_LOGGED kept to log, the rest counted."""

    def __init__(self, path: str):
        self.path, self.kept, self.orphans, self.other = path, [], 0, 0

    def add(self, problem: str, orphan: bool = False) -> None:
        self.orphans += orphan
        self.other += not orphan
        if len(self.kept) < MAX_LOGGED:
            self.kept.append(problem)

    def log(self) -> None:
        for problem in self.kept:
            log.warning("%s", problem)
        if self.orphans + self.other > len(self.kept):
            log.warning("%s: %d annotations name no image of the file and %d other entries were not imported (%d "
                        "logged above)", self.path, self.orphans, self.other, len(self.kept))


class _Images:
    """The image entries, in file order, with their annotations as they arrive."""

    def __init__(self, path: str, problems: _Problems):
        self.path, self.problems = path, problems
        self.origin = basename(path)
        self.entries: list[dict] = []
        self.by_id: dict[Any, dict] = {}

    def add(self, i: int, img: Any, too_big: str | None = None) -> None:
        where = f"{self.path} images[{i}]"
        if too_big:
            self.problems.add(f"{where}: {too_big}; image not listed")
            return
        image_id = img.get("id") if isinstance(img, dict) else None
        file_name = img.get("file_name") if isinstance(img, dict) else None
        if not _is_id(image_id) or not isinstance(file_name, str) or not file_name.strip():
            self.problems.add(f"{where}: needs an 'id' and a 'file_name' (got {img!r:.80}); image not listed")
            return
        width, height, size_problem = _size(img, where)
        entry = {"origin": self.origin, "coco_id": image_id, "file_name": file_name, "width": width, "height": height,
                 "captions": [], "objects": [], "rejected": [size_problem] if size_problem else [],
                 "over": {"captions": 0, "objects": 0, "rejected": 0}}
        if image_id in self.by_id:
            entry["rejected"].append(f"{where}: image id {image_id!r} appears twice; its annotations go to the "
                                     f"first entry ({self.by_id[image_id]['file_name']})")
        else:
            self.by_id[image_id] = entry
        self.entries.append(entry)

    def annotate(self, j: int, ann: Any, categories: dict, refused: dict, limits: Any, too_big: str | None = None):
        where = _ann_where(self.path, j, ann)
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        entry = self.by_id.get(image_id) if _is_id(image_id) else None
        if entry is None:
            self.problems.add(f"{where}: image_id {image_id!r:.40} names no image of the file; not imported", True)
            return
        try:
            if too_big:
                raise ValueError(too_big)
            _add_annotation(entry, ann, where, categories, refused, limits)
        except ValueError as exc:
            _reject(entry, f"{where}: {exc}; not imported")

    def finish(self, limits: Any) -> list[dict]:
        self.problems.log()
        for entry in self.entries:
            over = entry.pop("over")
            for kind, cap, what in (("objects", "max_objects_per_image", "boxes/masks"),
                                    ("captions", "max_captions_per_image", "captions")):
                if over[kind]:
                    kept = len(entry[kind])
                    entry["rejected"].append(f"{entry['origin']}: {kept + over[kind]} {what}, over ingest.{cap}="
                                             f"{getattr(limits, cap)}; the {over[kind]} after the first {kept} "
                                             "not imported")
            if over["rejected"]:
                entry["rejected"].append(f"{entry['origin']}: {over['rejected']} more annotations of this image "
                                         f"not imported (reasons of the first {MAX_REJECTED} above)")
            if not entry["rejected"]:
                del entry["rejected"]
        return self.entries


def read_coco(coco: Any, path: str, limits: Any = None) -> list[dict]:
    """The `human` dict of every image of a parsed COCO file, in the file's image order.

    Each has origin (file name), coco_id, file_name, width, height, captions, objects and, when
    some of its annotations were refused, `rejected` (one sentence per annotation). `limits` (an
    ingest config: max_caption_chars, max_captions_per_image, max_objects_per_image) caps what is
    kept per image; read_coco_file streams a file through the same code.
    """
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise CocoError(f"{path}: not a COCO file (no 'images' list)")
    for key in ("annotations", "categories"):
        if coco.get(key) is not None and not isinstance(coco[key], list):
            raise CocoError(f"{path}: not a COCO file ('{key}' is a {type(coco[key]).__name__}, not a list)")
    problems = _Problems(path)
    categories, refused = _categories([(j, c, None) for j, c in enumerate(coco.get("categories") or [])], path,
                                      problems)
    images = _Images(path, problems)
    for i, img in enumerate(coco["images"]):
        images.add(i, img)
    for j, ann in enumerate(coco.get("annotations") or []):
        images.annotate(j, ann, categories, refused, limits)
    return images.finish(limits)


# ---------------------------------------------------------------------------- streaming
class _Counted:
    """A binary file that counts what ijson read (the position of a JSON error) and refuses a run of
    MAX_RUN_BYTES without a string boundary (one multi-GB string or number would be buffered whole
    by the parser). A quote counts only when not escaped, so a huge string of \\" does not pass."""

    def __init__(self, f: IO[bytes], path: str):
        self.f, self.path, self.start, self.end, self.run, self.last = f, path, 0, 0, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.last = self.f.read(n)
        if data:
            self.start, self.end = self.end, self.end + len(data)
        if data.count(b'"') > data.count(b'\\"'):
            self.run = len(data) - data.rfind(b'"')
        else:
            self.run += len(data)
        if self.run > MAX_RUN_BYTES:
            raise CocoError(f"{self.path}: a JSON value of more than {MAX_RUN_BYTES >> 20} MiB (before byte "
                            f"{self.end}); a COCO file has no such value")
        return data


_TYPES = {"start_map": "dict", "string": "str", "integer": "int", "double": "float", "number": "float",
          "boolean": "bool", "start_array": "list", "null": "NoneType"}


_STARTS = frozenset(("start_map", "start_array"))
_ENDS = frozenset(("end_map", "end_array"))


def _skip(events: Iterator, event: str) -> None:
    if event not in _STARTS:
        return
    depth = 1
    for event, _ in events:  # the hot loop of a pass that skips a big array: keep it tight
        if event in _STARTS:
            depth += 1
        elif event in _ENDS:
            depth -= 1
            if not depth:
                return


def _build(events: Iterator, event: str, value: Any, where: str, path: str) -> tuple[Any, str | None]:
    """One array element from its events: (value, why it is refused: a string over MAX_CELL_CHARS,
    kept as None). Nesting deeper than MAX_DEPTH is a CocoError naming the element."""
    if event not in _STARTS:
        if event == "string" and len(value) > MAX_CELL_CHARS:
            return None, f"a string of {len(value)} characters, over {MAX_CELL_CHARS}"
        return value, None
    too_big = None
    root: Any = {} if event == "start_map" else []
    container, is_list, key = root, event == "start_array", None
    parents: list[tuple] = []  # (container, is_list, key) of each open container above `container`
    for event, value in events:  # one event per number of a polygon: keep it tight
        if event == "map_key":
            key = value
            continue
        if event in _ENDS:
            if not parents:
                break
            container, is_list, key = parents.pop()
            continue
        if event in _STARTS:
            if len(parents) + 3 > MAX_DEPTH:  # the root map and the top-level array are above the element
                raise CocoError(f"{path}: not a COCO file (JSON nested deeper than {MAX_DEPTH} levels in {where})")
            child: Any = {} if event == "start_map" else []
            if is_list:
                container.append(child)
            else:
                container[key] = child
            parents.append((container, is_list, key))
            container, is_list = child, event == "start_array"
            continue
        if event == "string" and len(value) > MAX_CELL_CHARS:
            at = "" if is_list else f" at {key!r:.40}"
            too_big, value = too_big or f"a string of {len(value)} characters{at}, over {MAX_CELL_CHARS}", None
        if is_list:
            container.append(value)
        else:
            container[key] = value
    return root, too_big


def _elements(f: IO[bytes], path: str, wanted: set[str]) -> Iterator[tuple[str, int, Any, str | None]]:
    """(key, index, element, why refused) for each element of the top-level arrays `wanted` of the
    COCO file `f` (images / annotations / categories), in file order, holding one element at a time."""
    counted = _Counted(f, path)
    where = "the top level"
    events = ijson.basic_parse(counted, use_float=True)
    seen: set[str] = set()
    try:
        event, _ = next(events)
        if event != "start_map":
            raise CocoError(f"{path}: not a COCO file (no 'images' list)")
        for event, key in events:
            if event == "end_map":
                break
            event, value = next(events)
            where = f"{key!r:.40}"
            if key not in KEYS:
                _skip(events, event)
                continue
            if key in seen:
                raise CocoError(f"{path}: not a COCO file ('{key}' appears twice)")
            seen.add(key)
            if event == "null" and key != "images":
                continue
            if event != "start_array":
                if key == "images":
                    raise CocoError(f"{path}: not a COCO file (no 'images' list)")
                raise CocoError(f"{path}: not a COCO file ('{key}' is a {_TYPES.get(event, event)}, not a list)")
            if key not in wanted:
                _skip(events, event)
                continue
            i = 0
            for event, value in events:
                if event == "end_array":
                    break
                where = f"{key}[{i}]"
                element, too_big = _build(events, event, value, where, path)
                yield key, i, element, too_big
                i += 1
            where = f"the top level after '{key}'"
        if "images" not in seen:
            raise CocoError(f"{path}: not a COCO file (no 'images' list)")
    except ijson.JSONError as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        why = why[2:] if why.startswith(("b'", 'b"')) else why
        if "lexical error" in why and (b"NaN" in counted.last or b"Infinity" in counted.last):
            raise NonStandardJson(f"{path}: NaN / Infinity literals in {where}") from None
        raise CocoError(f"{path}: not valid JSON ({why.strip().rstrip('.')}) within bytes {counted.start}-"
                        f"{counted.end}, at or after {where}") from None
    except StopIteration:
        raise CocoError(f"{path}: not valid JSON (premature end) at or after {where}") from None
    except UnicodeDecodeError:  # a lone surrogate escape ("\\udc80"): yajl writes it as bytes ijson cannot decode
        raise NonStandardJson(f"{path}: a lone surrogate escape in {where}") from None


def read_coco_file(open_file: Callable[[], ContextManager[IO[bytes]]], path: str, limits: Any = None) -> list[dict]:
    """read_coco of a COCO file streamed with ijson in two passes (images and categories, then
    annotations: the order of the keys in the file does not matter), so that only the image
    entries with their capped annotations are held, never the file or its parsed whole."""
    problems = _Problems(path)
    images = _Images(path, problems)
    raw_categories: list = []
    with open_file() as f:
        for key, i, element, too_big in _elements(f, path, {"images", "categories"}):
            if key == "images":
                images.add(i, element, too_big)
            else:
                raw_categories.append((i, element, too_big))
    categories, refused = _categories(raw_categories, path, problems)
    with open_file() as f:
        for _, j, element, too_big in _elements(f, path, {"annotations"}):
            images.annotate(j, element, categories, refused, limits, too_big)
    return images.finish(limits)
