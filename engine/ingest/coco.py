"""A COCO JSON (instances and/or captions) -> per image, its annotations in the `human` format.

bbox xywh becomes xyxy, polygons stay polygons, uncompressed RLE (iscrowd) is compressed so
that every mask is the string-counts RLE the data model stores; category ids become names.
Errors name the file, the list and the index of the offending entry.
"""
from __future__ import annotations

from typing import Any

from engine.ingest.locations import basename


class CocoError(ValueError):
    """A COCO file that cannot be imported; the message names the file and the entry."""


def _require(obj: dict, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise CocoError(f"{where}: missing key {key!r}")
    return obj[key]


def segmentation(seg: Any, where: str) -> tuple[list[list[float]] | None, dict | None]:
    """COCO segmentation -> (polygon rings, compressed RLE {'size': [h, w], 'counts': str})."""
    if seg is None or seg == []:
        return None, None
    if isinstance(seg, list):
        # COCO has a few degenerate rings (fewer than 3 points): pycocotools cannot rasterise them.
        valid = [ring for ring in seg if isinstance(ring, list) and len(ring) >= 6 and len(ring) % 2 == 0]
        rings = [[float(v) for v in ring] for ring in valid]
        if not rings:
            raise CocoError(f"{where}: segmentation has no polygon ring with at least 3 points")
        return rings, None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = [int(v) for v in seg["size"]]
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed RLE (iscrowd=1 in instances files)
            from pycocotools import mask as mask_utils

            counts = mask_utils.frPyObjects(seg, size[0], size[1])["counts"].decode("ascii")
        elif isinstance(counts, bytes):
            counts = counts.decode("ascii")
        return None, {"size": size, "counts": str(counts)}
    raise CocoError(f"{where}: segmentation is neither a list of polygons nor an RLE dict")


def read_coco(coco: Any, path: str) -> list[dict]:
    """The `human` dict of every image of a parsed COCO file, in the file's image order.

    Each has origin (file name), coco_id, file_name, width, height, captions and objects.
    """
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise CocoError(f"{path}: not a COCO file (no 'images' list)")
    origin = basename(path)
    categories: dict[Any, str] = {}
    for j, cat in enumerate(coco.get("categories") or []):
        where = f"{path} categories[{j}]"
        categories[_require(cat, "id", where)] = str(_require(cat, "name", where))

    images: dict[Any, dict] = {}
    for i, img in enumerate(coco["images"]):
        where = f"{path} images[{i}]"
        image_id = _require(img, "id", where)
        if image_id in images:
            raise CocoError(f"{where}: image id {image_id!r} appears twice")
        images[image_id] = {
            "origin": origin,
            "coco_id": image_id,
            "file_name": str(_require(img, "file_name", where)),
            "width": img.get("width"),
            "height": img.get("height"),
            "captions": [],
            "objects": [],
        }
    for j, ann in enumerate(coco.get("annotations") or []):
        where = f"{path} annotations[{j}]"
        entry = images.get(_require(ann, "image_id", where))
        if entry is None:
            raise CocoError(f"{where}: image_id {ann['image_id']!r} names no image of the file")
        if "caption" in ann:
            entry["captions"].append({"text": str(ann["caption"]).strip(), "coco_id": ann.get("id")})
        if "bbox" in ann:
            bbox = ann["bbox"]
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise CocoError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
            x, y, w, h = (float(v) for v in bbox)
            if w < 0 or h < 0:
                raise CocoError(f"{where}: bbox {bbox} has a negative width or height")
            category_id = ann.get("category_id")
            if category_id is not None and category_id not in categories:
                raise CocoError(f"{where}: category_id {category_id!r} is not in 'categories'")
            polygon, rle = segmentation(ann.get("segmentation"), where)
            entry["objects"].append(
                {
                    "label": categories.get(category_id, ""),
                    "category_id": category_id,
                    "box": [x, y, x + w, y + h],
                    "polygon": polygon,
                    "rle": rle,
                    "iscrowd": int(ann.get("iscrowd", 0) or 0),
                    "coco_id": ann.get("id"),
                }
            )
    return list(images.values())
