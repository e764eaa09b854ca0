"""Imported ground truth (COCO boxes / masks / captions, list-file and WebDataset captions)
as annotations of the image record, with source annotator 'human'.

They enter the same record as the specialists' output, so stage-2 filters, merge policies,
exports and quality metrics treat them uniformly, and the provenance (`source.annotator ==
'human'`, `source.model` = the file they came from) keeps them apart. The `human` JSON is
the format engine.ingest.sources writes:

    {"origin": "instances.json", "width": 640, "height": 480,        # size as the file declares it
     "captions": [{"text": "...", "tier": "brief"}],                   # tier optional
     "objects": [{"label": "dog", "box": [x0, y0, x1, y1],             # pixels, xyxy
                  "polygon": [[x, y, ...], ...] | null, "rle": {"size": [h, w], "counts": str} | null}]}
"""
from __future__ import annotations

import json

from engine.stage import record_error
from schemas.geometry import clamp_box, polygon_to_rle
from schemas.records import TIERS, make_ann_id, new_annotation, source_of

HUMAN = "human"


def _declared_size_matches(human: dict, width: int, height: int) -> bool:
    w, h = human.get("width"), human.get("height")
    return w is None or h is None or (int(w), int(h)) == (width, height)


def human_annotations(record: dict, human_json: str | None) -> dict:
    """Append the imported annotations to `record` (a fresh schemas.records.empty_record) and return it.

    Geometry is only imported when the file's declared size equals the decoded (EXIF-oriented)
    size: otherwise the boxes are in another frame (rotated or resized copy) and would be
    wrong; that is recorded in the record's `errors` and the captions still come in.
    """
    if human_json is None:
        return record
    where = f"image {record['image_id']} ({record['uri']})"
    try:
        human = json.loads(human_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: human annotations are not valid JSON ({exc.msg})") from None
    if not isinstance(human, dict):
        raise ValueError(f"{where}: human annotations must be a JSON object, got {type(human).__name__}")
    width, height = int(record["width"]), int(record["height"])
    source = source_of(HUMAN, model=str(human.get("origin", "")))
    image_id = record["image_id"]

    texts = record.setdefault("texts", [])
    for i, cap in enumerate(human.get("captions") or []):
        text = str(cap.get("text", "")).strip()
        if not text:
            continue
        tier = cap.get("tier") or "brief"
        if tier not in TIERS:
            raise ValueError(f"{where}: captions[{i}] has tier {tier!r}, expected one of {TIERS}")
        texts.append(
            new_annotation(source, score=None, ann_id=make_ann_id(image_id, HUMAN, "text", i), tier=tier, text=text)
        )

    objects = human.get("objects") or []
    if objects and not _declared_size_matches(human, width, height):
        record_error(
            record,
            HUMAN,
            f"{human.get('origin')}: declared size {human.get('width')}x{human.get('height')} differs from the "
            f"decoded {width}x{height}; {len(objects)} boxes/masks not imported",
        )
        return record
    regions = record.setdefault("regions", [])
    for i, obj in enumerate(objects):
        box = obj.get("box")
        if box is None or len(box) != 4:
            raise ValueError(f"{where}: objects[{i}] needs a box [x0, y0, x1, y1], got {box!r}")
        polygon = obj.get("polygon") or None
        mask = obj.get("rle") or None
        if mask is not None and [int(v) for v in mask["size"]] != [height, width]:
            raise ValueError(f"{where}: objects[{i}] mask size {mask['size']} is not [{height}, {width}]")
        if mask is None and polygon is not None:
            mask = polygon_to_rle(polygon, width, height)
        regions.append(
            new_annotation(
                source,
                score=None,
                ann_id=make_ann_id(image_id, HUMAN, "region", i),
                kind="object",
                box=clamp_box(box, width, height),
                quad=None,
                polygon=polygon,
                mask={"size": [int(v) for v in mask["size"]], "counts": str(mask["counts"])} if mask else None,
                label=str(obj.get("label") or ""),
                brief=None,
            )
        )
    return record
