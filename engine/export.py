"""`fld export`: kept annotations of one step -> training shards (Florence-2), COCO, WebDataset.

Only `status = kept` annotations leave the store; dropped ones stay behind for audit. Output
shards follow the input shards (part-k of the step -> part-k of the export), so an export is
reproducible and can be redone shard by shard.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.query import resolve_step
from engine.stage import table_to_records
from engine.store import ShardStore
from schemas.geometry import box_area

FORMATS = ("florence", "coco", "webdataset")
FLORENCE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("task", pa.string()),
        ("text_input", pa.string()),
        ("prompt", pa.string()),
        ("target", pa.string()),
        ("image", pa.binary()),
    ]
)
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


class ExportError(ValueError):
    pass


def _kept(record: dict) -> dict:
    out = dict(record)
    for key in ("texts", "regions", "groundings"):
        out[key] = [a for a in record[key] if a["status"] == "kept"]
    return out


def _atomic_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def _shard_inputs(store: ShardStore, folder: str):
    for shard in store.shards(folder):
        records = [_kept(r) for r in table_to_records(store.read_shard(folder, shard))]
        images = store.read_shard("images", shard, columns=["image_id", "bytes", "format"])
        by_id = {i: (b, f) for i, b, f in zip(*(images.column(c).to_pylist() for c in ("image_id", "bytes", "format")))}
        yield shard, records, by_id


def export(out: str | Path, dest: str | Path, fmt: str, step: str | None = None, tasks: list[str] | None = None,
           max_target_tokens: int = 1024) -> dict:
    """Write the export; returns counts (images, examples or annotations, files)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}, not {fmt!r}")
    store = ShardStore.of(out)
    folder = resolve_step(store, step)
    if folder is None:
        raise ExportError(f"{out} has no committed annotations to export")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if fmt == "florence":
        return _florence(store, folder, dest, tasks, max_target_tokens)
    if fmt == "coco":
        return _coco(store, folder, dest)
    return _webdataset(store, folder, dest)


def _florence(store, folder, dest: Path, tasks, max_target_tokens) -> dict:
    from refine.task_codec import ALL_TASKS, TaskCodec

    codec = TaskCodec(tasks=tuple(tasks) if tasks else ALL_TASKS, max_target_tokens=max_target_tokens)
    counts = {"images": 0, "examples": 0, "files": 0, "per_task": {}}
    for shard, records, by_id in _shard_inputs(store, folder):
        rows = []
        for rec in records:
            counts["images"] += 1
            for ex in codec.encode(rec):
                rows.append({"image_id": ex.image_id, "task": ex.task, "text_input": ex.text_input,
                             "prompt": ex.prompt, "target": ex.target, "image": by_id[rec["image_id"]][0]})
                counts["per_task"][ex.task] = counts["per_task"].get(ex.task, 0) + 1
        _atomic_parquet(pa.Table.from_pylist(rows, schema=FLORENCE_SCHEMA), dest / f"{shard}.parquet")
        counts["examples"] += len(rows)
        counts["files"] += 1
    return counts


def _coco(store, folder, dest: Path) -> dict:
    """instances.json (kept object regions: bbox, segmentation RLE, score) + captions.json + images/."""
    (dest / "images").mkdir(exist_ok=True)
    images, annotations, captions, categories = [], [], [], {}
    for _, records, by_id in _shard_inputs(store, folder):
        for rec in records:
            data, fmt = by_id[rec["image_id"]]
            image_no = len(images) + 1
            name = f"{rec['image_id']}.{EXT.get(fmt, 'img')}"
            (dest / "images" / name).write_bytes(data)
            images.append({"id": image_no, "file_name": f"images/{name}", "width": rec["width"],
                           "height": rec["height"], "fld_image_id": rec["image_id"], "uri": rec["uri"]})
            for r in rec["regions"]:
                if r["kind"] != "object" or not r["label"]:
                    continue
                cat = categories.setdefault(r["label"], len(categories) + 1)
                x0, y0, x1, y1 = r["box"]
                ann = {"id": len(annotations) + 1, "image_id": image_no, "category_id": cat,
                       "bbox": [x0, y0, x1 - x0, y1 - y0], "area": box_area(r["box"]), "iscrowd": 0,
                       "score": r["score"], "fld_ann_id": r["ann_id"]}
                if r["mask"]:
                    ann["segmentation"] = {"size": r["mask"]["size"], "counts": r["mask"]["counts"]}
                elif r["polygon"]:
                    ann["segmentation"] = r["polygon"]
                annotations.append(ann)
            for t in rec["texts"]:
                captions.append({"id": len(captions) + 1, "image_id": image_no, "caption": t["text"], "tier": t["tier"]})
    cats = [{"id": i, "name": n} for n, i in categories.items()]
    (dest / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    (dest / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}))
    return {"images": len(images), "annotations": len(annotations), "captions": len(captions), "categories": len(cats)}


def _webdataset(store, folder, dest: Path) -> dict:
    """One tar per shard: <image_id>.<ext> + <image_id>.json (the kept annotations of the record)."""
    counts = {"images": 0, "files": 0}
    for shard, records, by_id in _shard_inputs(store, folder):
        path = dest / f"{shard}.tar"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with tarfile.open(tmp, "w") as tar:
            for rec in records:
                data, fmt = by_id[rec["image_id"]]
                for name, blob in ((f"{rec['image_id']}.{EXT.get(fmt, 'img')}", data),
                                   (f"{rec['image_id']}.json", json.dumps(rec, default=str).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
                counts["images"] += 1
        os.replace(tmp, path)
        counts["files"] += 1
    return counts
