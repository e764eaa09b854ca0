"""`fld export`: kept annotations of one step -> training shards (Florence-2), COCO, WebDataset,
Hugging Face `datasets` Parquet (engine/views/hf_export.py).

Only `status = kept` annotations leave the store; dropped ones stay behind for audit. Output
shards follow the input shards (part-k of the step -> part-k of the export), so an export is
reproducible and can be redone shard by shard.

Exported images match their annotations without EXIF handling: the store keeps the original
bytes, whose EXIF orientation tag most loaders (Image.open, cv2.imread, datasets) ignore, while
every box is in the oriented frame; an image with an orientation tag is written with its pixels
turned and the tag removed. Whatever a format cannot carry is counted under `left_out`.

DEST is guarded (a mistake must not damage OUT or mix datasets): DEST inside OUT (or OUT inside
DEST) is refused; a non-empty DEST is refused unless its marker file (MARKER, written before
any data, `complete` set at the end) names the same OUT, step, format and tasks, in which case
the export is redone into it (a killed export leaves the marker with `complete: false`).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.atomic import atomic_write, atomic_write_bytes
from engine.views.hf_export import HF_SCHEMA, IMAGE_TYPE, hf_image, map_values_as_pairs, with_features
from engine.views.query import resolve_step
from engine.stage import table_to_records
from engine.store import ShardStore
from schemas.geometry import box_area, box_to_quad, polygon_area, rle_area
from schemas.records import ANNOTATION_KINDS, IMAGE_RECORD_SCHEMA

FORMATS = ("florence", "coco", "webdataset", "hf")
FLORENCE_SCHEMA = with_features(  # `image` is a Hugging Face datasets Image: load_dataset needs no cast
    pa.schema(
        [
            ("image_id", pa.string()),
            ("task", pa.string()),
            ("text_input", pa.string()),
            ("prompt", pa.string()),
            ("target", pa.string()),
            ("image", IMAGE_TYPE),
        ]
    ),
    image_columns=("image",),
)
EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
# How an image whose pixels had to be turned is written again: lossy formats at high quality,
# the others losslessly; anything else becomes PNG.
RESAVE = {"JPEG": ("JPEG", {"quality": 95}), "MPO": ("JPEG", {"quality": 95}), "WEBP": ("WEBP", {"lossless": True}),
          "TIFF": ("TIFF", {"compression": "tiff_deflate"})}
TEXT_CATEGORY = "text"  # COCO category of OCR text regions (supercategory "text"; objects: "object")
MARKER = ".fld-export.json"


class ExportError(ValueError):
    pass


def _kept(record: dict) -> dict:
    out = dict(record)
    for key in ANNOTATION_KINDS:
        out[key] = [a for a in record[key] if a["status"] == "kept"]
    return out


def _write_parquet(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def oriented_image(data: bytes, fmt: str) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, format, size) of an image whose stored pixels are in the EXIF-oriented frame the
    annotations use. Without an orientation to apply the original bytes are returned untouched."""
    from PIL import ExifTags, Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation not in range(2, 9):
            return data, fmt, im.size
        turned = ImageOps.exif_transpose(im)  # a copy; its EXIF no longer has the tag
        save_as, options = RESAVE.get(fmt, ("PNG", {}))
        extra = {"exif": turned.getexif().tobytes()} if save_as != "TIFF" else {}
        if im.info.get("icc_profile"):
            extra["icc_profile"] = im.info["icc_profile"]
        if save_as == "JPEG" and turned.mode not in ("RGB", "L", "CMYK"):
            turned = turned.convert("RGB")
        buf = io.BytesIO()
        turned.save(buf, format=save_as, **options, **extra)
        return buf.getvalue(), save_as, turned.size


def _shard_inputs(store: ShardStore, folder: str, left_out: dict):
    """(shard, kept records, image_id -> (bytes, format)) per shard; images whose pixels do not have
    the size of their record (they would not match the annotations) are left out and counted."""
    for shard in store.shards(folder):
        records = [_kept(r) for r in table_to_records(store.read_shard(folder, shard))]
        images = store.read_shard("images", shard, columns=["image_id", "bytes", "format"])
        stored = {i: (b, f) for i, b, f in zip(*(images.column(c).to_pylist() for c in ("image_id", "bytes", "format")))}
        by_id, usable = {}, []
        for rec in records:
            data, fmt, size = oriented_image(*stored[rec["image_id"]])
            if size != (rec["width"], rec["height"]):
                _count(left_out, "images whose pixels differ from their record's size")
                continue
            by_id[rec["image_id"]] = (data, fmt)
            usable.append(rec)
        yield shard, usable, by_id


def _count(left_out: dict, what: str, n: int = 1) -> None:
    if n:
        left_out[what] = left_out.get(what, 0) + n


def export(out: str | Path, dest: str | Path, fmt: str, step: str | None = None, tasks: list[str] | None = None,
           max_target_tokens: int = 1024) -> dict:
    """Write the export; returns counts (images, examples or annotations, files)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}, not {fmt!r}")
    store = ShardStore.of(out)
    folder = resolve_step(store, step)
    if folder is None:
        raise ExportError(f"{out} has no committed annotations to export")
    marker = {"out": store.url(), "step": folder, "format": fmt, "tasks": sorted(tasks or [])}
    dest = prepare_dest(store, Path(dest), marker)
    if fmt == "florence":
        counts = _florence(store, folder, dest, tasks, max_target_tokens)
    elif fmt == "coco":
        counts = _coco(store, folder, dest)
    elif fmt == "hf":
        counts = _hf(store, folder, dest)
    else:
        counts = _webdataset(store, folder, dest)
    atomic_write_bytes(dest / MARKER, json.dumps({**marker, "complete": True}).encode())
    return counts


def prepare_dest(store: ShardStore, dest: Path, marker: dict) -> Path:
    """DEST checked (see the module doc), created, and marked as this export in progress."""
    if store.local:
        root, there = Path(store.root).resolve(), dest.resolve()
        if there == root or root in there.parents:
            raise ExportError(f"--dest {dest} is inside OUT {store.out}: an export would overwrite the dataset; "
                              "choose a folder outside it")
        if there in root.parents:
            raise ExportError(f"--dest {dest} contains OUT {store.out}; choose a folder outside it")
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"--dest {dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        try:
            found = json.loads((dest / MARKER).read_text())
        except (OSError, ValueError):
            found = None
        if not isinstance(found, dict) or {k: found.get(k) for k in marker} != marker:
            what = (f"an export of {found.get('out')} (step {found.get('step')}, format {found.get('format')})"
                    if isinstance(found, dict) else "files that are not an fld export")
            raise ExportError(f"--dest {dest} is not empty: it holds {what}; export into an empty or new folder "
                              "(the same export into its own folder is redone)")
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest / MARKER, json.dumps({**marker, "complete": False}).encode())
    return dest


def _florence(store, folder, dest: Path, tasks, max_target_tokens) -> dict:
    from schemas.florence2_tasks import TRAINED_TOKENS
    from schemas.task_codec import TaskCodec

    codec = TaskCodec(tasks=tuple(tasks) if tasks else TRAINED_TOKENS, max_target_tokens=max_target_tokens)
    counts = {"images": 0, "examples": 0, "files": 0, "per_task": {}, "left_out": {}}
    for shard, records, by_id in _shard_inputs(store, folder, counts["left_out"]):
        rows = []
        for rec in records:
            counts["images"] += 1
            for ex in codec.encode(rec):
                data, fmt = by_id[rec["image_id"]]
                rows.append({"image_id": ex.image_id, "task": ex.task, "text_input": ex.text_input, "prompt": ex.prompt,
                             "target": ex.target, "image": hf_image(data, f"{ex.image_id}.{EXT.get(fmt, 'img')}")})
                counts["per_task"][ex.task] = counts["per_task"].get(ex.task, 0) + 1
        _write_parquet(pa.Table.from_pylist(rows, schema=FLORENCE_SCHEMA), dest / f"{shard}.parquet")
        counts["examples"] += len(rows)
        counts["files"] += 1
    _count(counts["left_out"], "pure-text targets over max_target_tokens", codec.skipped_too_long)
    return counts


def _coco(store, folder, dest: Path) -> dict:
    """instances.json (kept object regions and OCR text regions: bbox, segmentation, area, score;
    text regions in category "text" with their string in `text` and the quad as polygon) +
    captions.json + images/. Groundings have no place in COCO instances: they are counted."""
    (dest / "images").mkdir(exist_ok=True)
    images, annotations, captions, categories = [], [], [], {}
    left_out: dict = {}
    for _, records, by_id in _shard_inputs(store, folder, left_out):
        for rec in records:
            data, fmt = by_id[rec["image_id"]]
            image_no = len(images) + 1
            name = f"{rec['image_id']}.{EXT.get(fmt, 'img')}"
            (dest / "images" / name).write_bytes(data)
            w, h = rec["width"], rec["height"]
            images.append({"id": image_no, "file_name": f"images/{name}", "width": w, "height": h,
                           "fld_image_id": rec["image_id"], "uri": rec["uri"]})
            for r in rec["regions"]:
                if r["kind"] == "object" and not r["label"]:
                    _count(left_out, "object regions without a label")
                    continue
                key = ("text", TEXT_CATEGORY) if r["kind"] == "text" else ("object", r["label"])
                cat = categories.setdefault(key, len(categories) + 1)
                x0, y0, x1, y1 = r["box"]
                ann = {"id": len(annotations) + 1, "image_id": image_no, "category_id": cat,
                       "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0, "score": r["score"], "fld_ann_id": r["ann_id"]}
                if r["mask"]:
                    ann["segmentation"] = {"size": r["mask"]["size"], "counts": r["mask"]["counts"]}
                elif r["polygon"]:
                    ann["segmentation"] = r["polygon"]
                elif r["kind"] == "text":
                    ann["segmentation"] = [list(r["quad"] or box_to_quad(r["box"]))]
                if r["kind"] == "text":
                    ann["text"] = r["label"] or ""
                ann["area"] = _area(ann.get("segmentation"), r["box"], w, h)
                annotations.append(ann)
            _count(left_out, "groundings (COCO instances have no phrase grounding)", len(rec["groundings"]))
            for t in rec["texts"]:
                captions.append({"id": len(captions) + 1, "image_id": image_no, "caption": t["text"], "tier": t["tier"]})
    cats = [{"id": i, "name": name, "supercategory": kind} for (kind, name), i in categories.items()]
    atomic_write_bytes(dest / "instances.json", json.dumps({"images": images, "annotations": annotations, "categories": cats}).encode())
    atomic_write_bytes(dest / "captions.json", json.dumps({"images": images, "annotations": captions}).encode())
    return {"images": len(images), "annotations": len(annotations), "captions": len(captions), "categories": len(cats),
            "left_out": left_out}


def _area(segmentation, box, width: int, height: int) -> float:
    """COCO's `area`: pixels of the mask or polygon as pycocotools rasterises it, else the box's."""
    try:
        if isinstance(segmentation, dict):
            return rle_area(segmentation)
        if segmentation:
            return polygon_area(segmentation, width, height)
    except ValueError:  # a polygon far outside the image: the box is the honest fallback
        pass
    return box_area(box)


def _webdataset(store, folder, dest: Path) -> dict:
    """One tar per shard: <image_id>.<ext> + <image_id>.json (the kept annotations of the record)."""
    counts = {"images": 0, "files": 0, "left_out": {}}
    for shard, records, by_id in _shard_inputs(store, folder, counts["left_out"]):
        atomic_write(dest / f"{shard}.tar", lambda tmp, r=records, b=by_id: _write_tar(tmp, r, b))
        counts["images"] += len(records)
        counts["files"] += 1
    return counts


def _write_tar(path: str, records: list[dict], by_id: dict) -> None:
    with tarfile.open(path, "w") as tar:
        for rec in records:
            data, fmt = by_id[rec["image_id"]]
            for name, blob in ((f"{rec['image_id']}.{EXT.get(fmt, 'img')}", data),
                               (f"{rec['image_id']}.json", json.dumps(rec, default=str).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def _hf(store, folder, dest: Path) -> dict:
    """One Parquet per store shard (part-k of the step -> DEST/part-k.parquet) of HF_SCHEMA."""
    counts = {"images": 0, "files": 0, "left_out": {}}
    for shard, records, by_id in _shard_inputs(store, folder, counts["left_out"]):
        rows = []
        for rec in records:
            row = {f.name: map_values_as_pairs(rec.get(f.name), f.type) for f in IMAGE_RECORD_SCHEMA}
            data, fmt = by_id[rec["image_id"]]
            row["image"] = hf_image(data, f"{rec['image_id']}.{EXT.get(fmt, 'img')}")
            rows.append(row)
        _write_parquet(pa.Table.from_pylist(rows, schema=HF_SCHEMA), dest / f"{shard}.parquet")
        counts["images"] += len(rows)
        counts["files"] += 1
    return counts
