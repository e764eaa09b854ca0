"""Imported ground truth (COCO boxes / masks / captions, list-file and WebDataset captions)
as annotations of the image record, with source annotator 'human'.

They enter the same record as the specialists' output, so stage-2 filters, merge policies,
exports and quality metrics treat them uniformly, and the provenance (`source.annotator ==
'human'`, `source.model` = the file they came from) keeps them apart. The `human` JSON is
the format engine.ingest.sources writes:

    {"origin": "instances.json", "width": 640, "height": 480,        # size as the file declares it
     "captions": [{"text": "...", "tier": "brief"}],                   # tier optional
     "objects": [{"label": "dog", "box": [x0, y0, x1, y1],             # pixels, xyxy
                  "polygon": [[x, y, ...], ...] | null, "rle": {"size": [h, w], "counts": str} | null}],
     "rejected": ["instances.json annotations[3] (id 17): bbox has a non-finite value ..."]}  # optional

This runs when a pipeline starts (engine.execute.initial_records), so it never raises: one bad
entry becomes an entry of the record's `errors` (stage `human`) naming the file and the
annotation, and the image keeps its other annotations. Entries the importer already rejected
(`rejected`) are reported the same way, so `fld stats` counts them and SQL finds them.
"""
from __future__ import annotations

import json
import math
from typing import Any

from engine.images import record_error
from schemas.geometry import box_to_quad, check_polygon, check_rle, clamp_box, finite_numbers, polygon_to_rle
from schemas.records import TIERS, make_ann_id, new_annotation, source_of

HUMAN = "human"


def check_text(value: Any, what: str) -> str:
    """A string that Arrow can store (UTF-8: no lone surrogates, which JSON escapes allow)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__} {value!r:.40}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {value!r:.60} is not valid Unicode (lone surrogate)") from None
    return value


def check_object(obj: Any, width: int | None, height: int | None) -> dict:
    """An imported object with every field checked, or ValueError saying what is wrong.

    width/height None (the image size is not known yet, e.g. a COCO entry without one) checks
    the numbers only; the size-dependent checks run again when the decoded size is known.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"must be a JSON object, got {type(obj).__name__}")
    box = finite_numbers(obj.get("box"), "box [x0, y0, x1, y1]", length=4)
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"box {box} has x1 < x0 or y1 < y0")
    label = obj.get("label")
    label = "" if label is None else check_text(label, "label")
    polygon = obj.get("polygon") or None
    if polygon is not None:
        polygon = check_polygon(polygon, width or math.inf, height or math.inf)
    rle = obj.get("rle") or None
    if rle is not None:
        rle = check_rle(rle, width, height)
    return {**obj, "label": label, "box": box, "polygon": polygon, "rle": rle}


def limit_annotations(human: dict | None, max_caption_chars: int, max_captions: int, max_objects: int) -> dict | None:
    """The caption / annotation policy of ingest, applied to every source's `human` dict before it is
    stored (list files, COCO, WebDataset): a caption that is not a string or is longer than
    `max_caption_chars`, and captions / objects beyond the per-image caps, are moved to `rejected`
    (each becomes an error on its image naming why), so no later stage meets unbounded text or an
    unbounded number of prompts. Returns `human` unchanged when nothing is over a limit."""
    if not isinstance(human, dict):
        return human
    origin = str(human.get("origin") or "")
    captions, objects = human.get("captions"), human.get("objects")
    rejected: list = []
    kept_caps = captions
    if isinstance(captions, list):
        kept_caps = []
        for i, cap in enumerate(captions):
            text = cap.get("text") if isinstance(cap, dict) else None
            if isinstance(cap, dict) and not isinstance(text, str):
                rejected.append(f"{origin} captions[{i}]{_reference(cap)}: caption must be a string, got "
                                f"{type(text).__name__}; not imported")
            elif isinstance(text, str) and len(text) > max_caption_chars:
                rejected.append(f"{origin} captions[{i}]{_reference(cap)}: caption of {len(text)} characters is over "
                                f"ingest.max_caption_chars={max_caption_chars}; not imported")
            else:
                kept_caps.append(cap)
        if len(kept_caps) > max_captions:
            rejected.append(f"{origin}: {len(kept_caps)} captions, over ingest.max_captions_per_image={max_captions}; "
                            f"the {len(kept_caps) - max_captions} after the first {max_captions} not imported")
            kept_caps = kept_caps[:max_captions]
    kept_objs = objects
    if isinstance(objects, list) and len(objects) > max_objects:
        rejected.append(f"{origin}: {len(objects)} boxes/masks, over ingest.max_objects_per_image={max_objects}; "
                        f"the {len(objects) - max_objects} after the first {max_objects} not imported")
        kept_objs = objects[:max_objects]
    if not rejected:
        return human
    before = human.get("rejected") if isinstance(human.get("rejected"), list) else []
    out = {**human, "rejected": before + rejected}
    if captions is not None:
        out["captions"] = kept_caps
    if objects is not None:
        out["objects"] = kept_objs
    return out


def _reference(entry: Any) -> str:
    """' (annotation id 17)' when the entry came with the id its file gave it."""
    coco_id = entry.get("coco_id") if isinstance(entry, dict) else None
    return f" (annotation id {coco_id!r:.40})" if coco_id is not None else ""


def _declared_size(human: dict) -> tuple[int, int] | None:
    w, h = human.get("width"), human.get("height")
    if w is None or h is None:
        return None
    try:
        return int(w), int(h)
    except (TypeError, ValueError, OverflowError):
        return -1, -1  # unreadable: never equal to a decoded size


def _as_list(value: Any, what: str, record: dict, origin: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        record_error(record, HUMAN, f"{origin}: {what} must be a list, got {type(value).__name__}; none imported")
        return []
    return value


def human_annotations(record: dict, human_json: str | None) -> dict:
    """Append the imported annotations to `record` (a fresh schemas.records.empty_record) and return it.

    Geometry is only imported when the file's declared size equals the decoded (EXIF-oriented)
    size: otherwise the boxes are in another frame (rotated or resized copy) and would be
    wrong; that is recorded in the record's `errors` and the captions still come in.
    """
    if human_json is None:
        return record
    try:
        human = json.loads(human_json)
    except (ValueError, RecursionError) as exc:
        record_error(record, HUMAN, f"image {record['uri']}: human annotations are not valid JSON ({exc}); none imported")
        return record
    if not isinstance(human, dict):
        record_error(record, HUMAN, f"image {record['uri']}: human annotations must be a JSON object, got "
                                    f"{type(human).__name__}; none imported")
        return record
    origin = str(human.get("origin") or record["uri"])
    width, height = int(record["width"]), int(record["height"])
    source = source_of(HUMAN, model=origin)
    image_id = record["image_id"]
    for reason in _as_list(human.get("rejected"), "rejected", record, origin):
        record_error(record, HUMAN, str(reason))

    texts = record.setdefault("texts", [])
    for i, cap in enumerate(_as_list(human.get("captions"), "captions", record, origin)):
        try:
            if not isinstance(cap, dict):
                raise ValueError(f"must be a JSON object, got {type(cap).__name__}")
            text = check_text(cap.get("text", ""), "caption text").strip()
            tier = cap.get("tier") or "brief"
            if tier not in TIERS:
                raise ValueError(f"tier {tier!r:.40} is not one of {TIERS}")
        except ValueError as exc:
            record_error(record, HUMAN, f"{origin} captions[{i}]{_reference(cap)}: {exc}; not imported")
            continue
        if text:
            texts.append(new_annotation(source, score=None, ann_id=make_ann_id(image_id, HUMAN, "text", i),
                                        tier=tier, text=text))

    objects = _as_list(human.get("objects"), "objects", record, origin)
    declared = _declared_size(human)
    if objects and declared is not None and declared != (width, height):
        record_error(
            record,
            HUMAN,
            f"{origin}: declared size {human.get('width')}x{human.get('height')} differs from the "
            f"decoded {width}x{height}; {len(objects)} boxes/masks not imported",
        )
        return record
    regions = record.setdefault("regions", [])
    for i, obj in enumerate(objects):
        try:
            regions.append(_region(obj, i, width, height, image_id, source))
        except Exception as exc:  # noqa: BLE001 - one bad entry never blocks the image or the run
            record_error(record, HUMAN, f"{origin} objects[{i}]{_reference(obj)}: {exc}; not imported")
    return record


def _region(obj: Any, i: int, width: int, height: int, image_id: str, source: dict) -> dict:
    obj = check_object(obj, width, height)
    mask = obj["rle"]
    if mask is None and obj["polygon"] is not None:
        mask = polygon_to_rle(obj["polygon"], width, height)
    box = clamp_box(obj["box"], width, height)
    text = obj.get("text")  # a COCO-Text line (`utf8_string`): an OCR truth, its string is the label
    if text is not None:
        text = check_text(text, "text")
    return new_annotation(
        source,
        score=None,
        ann_id=make_ann_id(image_id, HUMAN, "region", i),
        kind="object" if text is None else "text",
        box=box,
        quad=None if text is None else box_to_quad(box),
        polygon=obj["polygon"],
        mask={"size": [int(v) for v in mask["size"]], "counts": str(mask["counts"])} if mask else None,
        label=obj["label"] if text is None else text,
        brief=None,
    )
