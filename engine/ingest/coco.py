"""A COCO JSON (instances and/or captions) -> per image, its annotations in the `human` format.

bbox xywh becomes xyxy, polygons stay polygons, uncompressed RLE (iscrowd) is compressed so
that every mask is the string-counts RLE the data model stores; category ids become names.

One bad entry never blocks the import: an annotation with a NaN / infinite / negative /
non-numeric / wrong-length bbox, a malformed segmentation, an RLE whose size is not the image's,
or a missing or unknown category_id is left out, and the reason (naming the file, the entry and
its annotation id) goes to that image's `rejected` list, which becomes the record's `errors`
(engine.ingest.human). Entries that belong to no image (an image_id that names no image, an image
entry without id or file_name) are logged as warnings naming the file. Only a file that is not
COCO at all is an error.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any

from engine.ingest.human import check_object, check_text
from engine.ingest.locations import basename
from schemas.geometry import check_polygon, check_rle, finite_numbers, polygon_to_box, rle_to_box

log = logging.getLogger(__name__)
MAX_LOGGED = 20  # file-level problems logged one by one; the rest are counted


class CocoError(ValueError):
    """A COCO file that cannot be imported; the message names the file and the entry."""


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


def _categories(cats: list, path: str, problems: list[str]) -> tuple[dict, dict]:
    """(id -> name, id -> why that category entry was refused)."""
    names: dict[Any, str] = {}
    refused: dict[Any, str] = {}
    for j, cat in enumerate(cats):
        where = f"{path} categories[{j}]"
        cat_id = cat.get("id") if isinstance(cat, dict) else None
        if not _is_id(cat_id):
            problems.append(f"{where}: no usable 'id' ({cat_id!r:.40}); category not imported")
            continue
        name = cat.get("name")
        try:
            name = check_text(str(name) if isinstance(name, (int, float)) and not isinstance(name, bool) else name,
                              "category name")
        except ValueError as exc:
            refused.setdefault(cat_id, f"{where}: {exc}")
            continue
        if cat_id in names and names[cat_id] != name:
            problems.append(f"{where}: id {cat_id!r} appears twice; keeping the name {names[cat_id]!r}")
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


def _add_annotation(entry: dict, ann: dict, categories: dict, refused: dict) -> None:
    has_geometry = "bbox" in ann or ann.get("segmentation") not in (None, [], {})
    if "caption" not in ann and not has_geometry:
        raise ValueError("has no bbox, segmentation or caption")
    caption = None
    if "caption" in ann:
        caption = {"text": check_text(ann["caption"], "caption").strip(), "coco_id": ann.get("id")}
    obj = _object(ann, entry, categories, refused) if has_geometry else None
    if caption is not None:
        entry["captions"].append(caption)
    if obj is not None:
        entry["objects"].append(obj)


def read_coco(coco: Any, path: str) -> list[dict]:
    """The `human` dict of every image of a parsed COCO file, in the file's image order.

    Each has origin (file name), coco_id, file_name, width, height, captions, objects and, when
    some of its annotations were refused, `rejected` (one sentence per annotation).
    """
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise CocoError(f"{path}: not a COCO file (no 'images' list)")
    for key in ("annotations", "categories"):
        if coco.get(key) is not None and not isinstance(coco[key], list):
            raise CocoError(f"{path}: not a COCO file ('{key}' is a {type(coco[key]).__name__}, not a list)")
    origin = basename(path)
    problems: list[str] = []  # entries that belong to no image
    categories, refused = _categories(coco.get("categories") or [], path, problems)

    entries: list[dict] = []
    by_id: dict[Any, dict] = {}
    for i, img in enumerate(coco["images"]):
        where = f"{path} images[{i}]"
        image_id = img.get("id") if isinstance(img, dict) else None
        file_name = img.get("file_name") if isinstance(img, dict) else None
        if not _is_id(image_id) or not isinstance(file_name, str) or not file_name.strip():
            problems.append(f"{where}: needs an 'id' and a 'file_name' (got {img!r:.80}); image not listed")
            continue
        width, height, size_problem = _size(img, where)
        entry = {"origin": origin, "coco_id": image_id, "file_name": file_name, "width": width, "height": height,
                 "captions": [], "objects": [], "rejected": [size_problem] if size_problem else []}
        if image_id in by_id:
            entry["rejected"].append(f"{where}: image id {image_id!r} appears twice; its annotations go to the "
                                     f"first entry ({by_id[image_id]['file_name']})")
        else:
            by_id[image_id] = entry
        entries.append(entry)

    for j, ann in enumerate(coco.get("annotations") or []):
        where = _ann_where(path, j, ann)
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        entry = by_id.get(image_id) if _is_id(image_id) else None
        if entry is None:
            problems.append(f"{where}: image_id {image_id!r:.40} names no image of the file; not imported")
            continue
        try:
            _add_annotation(entry, ann, categories, refused)
        except ValueError as exc:
            entry["rejected"].append(f"{where}: {exc}; not imported")

    for problem in problems[:MAX_LOGGED]:
        log.warning("%s", problem)
    if len(problems) > MAX_LOGGED:
        log.warning("%s: %d more entries not imported", path, len(problems) - MAX_LOGGED)
    for entry in entries:
        if not entry["rejected"]:
            del entry["rejected"]
    return entries
