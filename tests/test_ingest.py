"""Ingest on real photos and hand-made broken files: listing, decoding, quarantine, human annotations."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import os
import pickle
import resource
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.ingest import InputError, InputItem, decode_input, human_annotations, ingest_shard, list_inputs
from engine.images import to_rgb
from engine.stage import decode_image, records_to_table
from schemas.geometry import rle_area, rle_to_mask
from schemas.records import IMAGE_RECORD_SCHEMA, IMAGES_SCHEMA, QUARANTINE_SCHEMA, empty_record
from schemas.validate import validate_table

MIN_SIDE = 16
MAX_PIXELS = 50_000_000


# --------------------------------------------------------------------------- file makers
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG signature + IHDR (correct CRC) claiming width x height RGB, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def chelsea_rgb(photos) -> Image.Image:
    return Image.open(io.BytesIO(photos["chelsea"])).convert("RGB")  # 451 x 300


@pytest.fixture()
def messy_folder(tmp_path, photos, chelsea_rgb) -> tuple[Path, dict[str, tuple[int, int]], dict[str, str]]:
    """A folder of real photos and broken files.

    Returns (folder, expected oriented size per good file name, expected reason per bad name).
    """
    root = tmp_path / "messy"
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / ".ipynb_checkpoints").mkdir()
    good: dict[str, tuple[int, int]] = {}
    bad: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        (root / name).write_bytes(data)

    put("astronaut.png", photos["astronaut"])
    good["astronaut.png"] = (512, 512)
    dog = photos["jpeg_0"]
    put("nested/dog.JPG", dog)  # upper-case extension, nested folder
    good["nested/dog.JPG"] = (768, 576)
    put("nested/deeper/person.jpeg", photos["jpeg_1"])
    good["nested/deeper/person.jpeg"] = Image.open(io.BytesIO(photos["jpeg_1"])).size  # no EXIF rotation
    put("cmyk.jpg", _encode(chelsea_rgb.convert("CMYK"), "JPEG", quality=90))
    good["cmyk.jpg"] = (451, 300)
    camera16 = (np.asarray(Image.open(io.BytesIO(photos["camera"])).convert("L"), dtype=np.uint16) * 257)
    put("camera16.png", _encode(Image.fromarray(camera16), "PNG"))
    good["camera16.png"] = (512, 512)
    put("palette.png", _encode(chelsea_rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"))
    good["palette.png"] = (451, 300)
    put("gray_alpha.png", _encode(chelsea_rgb.convert("LA"), "PNG"))
    good["gray_alpha.png"] = (451, 300)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown: width and height swap
    put("rotated.jpg", _encode(chelsea_rgb, "JPEG", quality=90, exif=exif))
    good["rotated.jpg"] = (300, 451)

    put("zero.jpg", b"")
    bad["zero.jpg"] = "empty"
    put("truncated.jpg", dog[: len(dog) // 2])
    bad["truncated.jpg"] = "truncated"
    put("notes.jpg", b"this is a text file, not a photo\n" * 20)
    bad["notes.jpg"] = "not_image"
    put("bomb.png", bomb_png())
    bad["bomb.png"] = "decompression_bomb"
    put("tiny.png", _encode(chelsea_rgb.resize((12, 8)), "PNG"))
    bad["tiny.png"] = "too_small"
    put("nested/astronaut_copy.png", photos["astronaut"])
    bad["nested/astronaut_copy.png"] = "duplicate"

    put("readme.txt", b"not listed: no image extension")
    put(".hidden.jpg", photos["astronaut"])  # hidden: skipped
    (root / ".ipynb_checkpoints" / "astronaut-checkpoint.png").write_bytes(photos["astronaut"])
    return root, good, bad


# --------------------------------------------------------------------------- folders + decode
def test_folder_listing_is_recursive_sorted_and_keeps_broken_files(messy_folder):
    root, good, bad = messy_folder
    items = list_inputs(str(root))
    rel = [os.path.relpath(it.uri, root) for it in items]
    assert sorted(rel) == sorted(set(good) | set(bad))  # no .txt, no hidden, every broken image file
    assert rel == sorted(rel)
    assert {it.source for it in items} == {"messy"}
    assert [it.uri for it in list_inputs(str(root))] == [it.uri for it in items]  # deterministic
    assert pickle.loads(pickle.dumps(items[0])).read() == items[0].read()  # plain pickle, no closures
    assert list_inputs(str(root), source="mine")[0].source == "mine"


def test_ingest_shard_quarantines_each_broken_input_with_its_reason(messy_folder, tmp_path):
    root, good, bad = messy_folder
    missing = tmp_path / "gone.jpg"
    listing = tmp_path / "extra.csv"
    listing.write_text(f"path\n{missing}\n{root / 'astronaut.png'}\n")
    items = list_inputs(str(root)) + list_inputs(str(listing))
    bad["extra:gone.jpg"] = "missing"

    seen: set[str] = set()
    images, quarantine, counters = ingest_shard(items, MIN_SIDE, MAX_PIXELS, seen)
    validate_table(images, IMAGES_SCHEMA, "images")
    validate_table(quarantine, QUARANTINE_SCHEMA, "quarantine")

    assert counters["inputs"] == len(items) == counters["images"] + counters["quarantined"] + counters["duplicates"]
    assert counters["images"] == len(good) and counters["duplicates"] == 2  # the copy + the CSV's astronaut
    assert counters["quarantined"] == len(bad) - 1
    assert counters["quarantine_reasons"]["duplicate"] == 2

    rows = {os.path.relpath(r["uri"], root): r for r in images.to_pylist()}
    assert set(rows) == set(good)
    for name, (w, h) in good.items():
        row = rows[name]
        original = (root / name).read_bytes()
        assert row["bytes"] == original  # untouched
        assert row["image_id"] == hashlib.sha256(original).hexdigest()
        assert (row["width"], row["height"]) == (w, h), name
        rgb = decode_image(row["bytes"])  # what every stage will do: must agree with ingest
        assert rgb.mode == "RGB" and rgb.size == (w, h), name
        assert row["human"] is None
    assert rows["cmyk.jpg"]["mode"] == "CMYK" and rows["cmyk.jpg"]["format"] == "JPEG"
    assert rows["camera16.png"]["mode"].startswith("I;16") or rows["camera16.png"]["mode"] == "I"
    assert rows["palette.png"]["mode"] == "P"
    assert rows["gray_alpha.png"]["mode"] == "LA"
    assert seen == set(images.column("image_id").to_pylist())

    by_name = {}
    for r in quarantine.to_pylist():
        name = "extra:gone.jpg" if r["uri"] == str(missing) else os.path.relpath(r["uri"], root)
        by_name.setdefault(name, []).append(r)
    assert {n: [r["reason"] for r in rs] for n, rs in by_name.items() if n != "astronaut.png"} == {
        n: [reason] for n, reason in bad.items()
    }
    # the CSV's second listing of astronaut.png is the other duplicate
    assert [r["reason"] for r in by_name["astronaut.png"]] == ["duplicate"]
    astronaut_id = rows["astronaut.png"]["image_id"]
    for r in by_name["nested/astronaut_copy.png"] + by_name["astronaut.png"]:
        assert r["duplicate_of"] == astronaut_id and r["image_id"] == astronaut_id
    for name, rs in by_name.items():
        assert rs[0]["detail"] and rs[0]["uri"] in rs[0]["detail"], name  # detail names the file
    assert "2500000000 pixels" in by_name["bomb.png"][0]["detail"]  # 50000 x 50000
    assert by_name["extra:gone.jpg"][0]["image_id"] is None
    assert by_name["truncated.jpg"][0]["image_id"] == hashlib.sha256((root / "truncated.jpg").read_bytes()).hexdigest()

    # Threads give the same tables, in the same order.
    images_t, quarantine_t, counters_t = ingest_shard(items, MIN_SIDE, MAX_PIXELS, set(), workers=2)
    assert images_t.equals(images) and quarantine_t.equals(quarantine) and counters_t == counters

    # A second shard with the same inputs: everything decodable is now a duplicate of shard 1.
    images2, quarantine2, counters2 = ingest_shard(items, MIN_SIDE, MAX_PIXELS, seen)
    assert images2.num_rows == 0
    assert counters2["duplicates"] == len(good) + 2
    assert counters2["inputs"] == counters2["images"] + counters2["quarantined"] + counters2["duplicates"]


def test_sixteen_bit_png_keeps_its_picture_in_rgb(photos):
    camera = np.asarray(Image.open(io.BytesIO(photos["camera"])).convert("L"))
    data = _encode(Image.fromarray(camera.astype(np.uint16) * 257), "PNG")
    row, bad = decode_input(InputItem(uri="camera16.png", source="t", read=lambda: data), MIN_SIDE, MAX_PIXELS)
    assert bad is None and row["mode"].startswith("I")
    rgb = np.asarray(to_rgb(Image.open(io.BytesIO(row["bytes"]))))
    assert rgb.shape == (512, 512, 3) and np.array_equal(rgb[..., 1], camera)  # not clipped to white


def test_bomb_header_is_rejected_without_allocating(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(60_000, 60_000))  # 10.8 GB of RGB if it were decoded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    row, bad = decode_input(InputItem(uri=str(path), source="t", read=path.read_bytes), MIN_SIDE, MAX_PIXELS)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert row is None and bad["reason"] == "decompression_bomb"
    assert grown_mib < 64
    # Below our limit but above Pillow's default (89 Mpx) the header check is ours, not Pillow's.
    row, bad = decode_input(InputItem(uri="b", source="t", read=lambda: bomb_png(10_000, 10_000)), 16, 200_000_000,
                            verify="decode")
    assert bad["reason"] == "truncated"  # got past the size checks; its IDAT holds no 100 Mpx of data


def test_decode_input_reads_lazily_and_reports_read_errors():
    def boom() -> bytes:
        raise PermissionError("permission denied")

    row, bad = decode_input(InputItem(uri="s3://bucket/x.jpg", source="t", read=boom), MIN_SIDE, MAX_PIXELS)
    assert row is None and bad["reason"] == "unreadable" and "permission denied" in bad["detail"]


# --------------------------------------------------------------------------- list files
def test_list_files_csv_jsonl_parquet_and_urls(tmp_path, photos):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    names = ["astronaut", "coffee", "jpeg_2"]
    for n in names:
        (imgs / f"{n}.png").write_bytes(photos[n])
    rel = [f"imgs/{n}.png" for n in names]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Path", "caption"])
        for r in reversed(rel):
            w.writerow([r, f"a photo called {r}"])
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"url": r}) + "\n\n" for r in rel))
    pq.write_table(pa.table({"image": [str(tmp_path / r) for r in rel], "label": [1, 2, 3]}), tmp_path / "list.parquet")

    expected = [str(tmp_path / r) for r in rel]
    for name in ("list.csv", "list.jsonl", "list.parquet"):
        items = list_inputs(str(tmp_path / name))
        # a list file is streamed in its own row order (the CSV lists them in reverse)
        assert [it.uri for it in items] == (expected[::-1] if name == "list.csv" else expected), name
        assert items[-1 if name == "list.csv" else 0].read() == photos["astronaut"]
        assert {it.source for it in items} == {"list"}
    with_caption = list_inputs(str(tmp_path / "list.csv"))
    assert with_caption[-1].human == {"origin": "list.csv", "captions": [{"text": "a photo called imgs/astronaut.png"}]}
    assert list_inputs(str(tmp_path / "list.jsonl"))[0].human is None

    # Non-local URLs go through fsspec (memory:// here: no network needed).
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.pipe("/fld-test/a.jpg", photos["jpeg_0"])
    mem.pipe("/fld-test/urls.csv", b"uri\nmemory://fld-test/a.jpg\nmemory://fld-test/missing.jpg\n")
    items = list_inputs("memory://fld-test/urls.csv")
    assert [it.uri for it in items] == ["memory://fld-test/a.jpg", "memory://fld-test/missing.jpg"]
    images, quarantine, counters = ingest_shard(items, MIN_SIDE, MAX_PIXELS, set())
    assert images.column("width").to_pylist() == [768] and quarantine.column("reason").to_pylist() == ["missing"]


def test_remote_folder_and_glob_through_fsspec(photos):
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.pipe("/fld-remote/data/b.png", photos["coffee"])
    mem.pipe("/fld-remote/data/sub/a.JPG", photos["jpeg_0"])
    mem.pipe("/fld-remote/data/.cache/a.jpg", photos["jpeg_0"])
    mem.pipe("/fld-remote/data/notes.txt", b"x")
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        _add_member(tar, "k1.jpg", photos["jpeg_1"])
        _add_member(tar, "k1.txt", b"a person with a dog and a horse")
    mem.pipe("/fld-remote/data/shard-0.tar", tar_bytes.getvalue())

    items = list_inputs("memory://fld-remote/data")
    assert [it.uri for it in items] == [
        "memory://fld-remote/data/b.png",
        "memory://fld-remote/data/shard-0.tar::k1.jpg",
        "memory://fld-remote/data/sub/a.JPG",
    ]
    assert {it.source for it in items} == {"data"}
    assert items[1].read() == photos["jpeg_1"] and items[1].human["captions"][0]["text"].startswith("a person")
    shards = list_inputs("memory://fld-remote/data/*.tar")
    assert [it.uri for it in shards] == ["memory://fld-remote/data/shard-0.tar::k1.jpg"]
    assert shards[0].source == "data"


def test_list_file_without_a_path_column_names_the_file_and_columns(tmp_path):
    bad = tmp_path / "pictures.csv"
    bad.write_text("file,label\na.jpg,cat\n")
    with pytest.raises(InputError) as err:
        list_inputs(str(bad))
    assert str(bad) in str(err.value) and "'file'" in str(err.value) and "'label'" in str(err.value)
    empty_cell = tmp_path / "holes.csv"
    empty_cell.write_text("path\na.jpg\n\"\"\n")
    with pytest.raises(InputError, match=r"holes.csv row 3"):
        list_inputs(str(empty_cell))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_inputs(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- WebDataset
def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar_groups_members_and_captions(tmp_path, photos):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "shard-000000.tar", "w") as tar:
        _add_member(tar, "000002.png", photos["coffee"])
        _add_member(tar, "000002.json", json.dumps({"caption": "a cup of coffee on a saucer", "w": 600}).encode())
        _add_member(tar, "000001.jpg", photos["jpeg_0"])
        _add_member(tar, "000001.txt", b"a dog next to a bicycle\n")
        _add_member(tar, "000003.cls", b"7")  # no image member: not a sample to ingest
        _add_member(tar, "sub/000004.seg.jpg", photos["jpeg_2"])  # key "sub/000004", ext "seg.jpg": an image too
        _add_member(tar, "sub/000005.jpg", photos["jpeg_1"])
    with tarfile.open(shards / "shard-000001.tar", "w") as tar:
        _add_member(tar, "000009.jpeg", photos["jpeg_2"])

    items = list_inputs(str(shards / "shard-000000.tar"))
    assert [it.uri.split("::")[1] for it in items] == ["000001.jpg", "000002.png", "sub/000004.seg.jpg",
                                                       "sub/000005.jpg"]
    assert items[0].uri == f"{shards / 'shard-000000.tar'}::000001.jpg"
    assert items[0].read() == photos["jpeg_0"] and items[1].read() == photos["coffee"]
    assert items[0].human["captions"] == [{"text": "a dog next to a bicycle"}]
    assert items[1].human["captions"] == [{"text": "a cup of coffee on a saucer"}]
    assert items[2].human is None and items[3].human is None and items[0].source == "shard-000000"
    assert pickle.loads(pickle.dumps(items[1])).read() == photos["coffee"]  # items travel to workers

    both = list_inputs(str(shards / "*.tar"))
    assert len(both) == 5 and both[-1].uri.endswith("::000009.jpeg") and {it.source for it in both} == {"shards"}
    assert [it.uri for it in list_inputs(str(shards))] == [it.uri for it in both]  # a folder of shards

    images, quarantine, counters = ingest_shard(items, MIN_SIDE, MAX_PIXELS, set())
    assert counters["images"] == 4 and quarantine.num_rows == 0
    records = [human_annotations(empty_record(r), r["human"]) for r in images.to_pylist()]
    table = records_to_table(records)
    validate_table(table)
    assert [[t["text"] for t in r["texts"]] for r in records] == [
        ["a dog next to a bicycle"],
        ["a cup of coffee on a saucer"],
        [],
        [],
    ]
    assert records[0]["texts"][0]["tier"] == "brief" and records[0]["texts"][0]["source"]["annotator"] == "human"
    assert records[0]["texts"][0]["source"]["model"] == "shard-000000.tar"


# --------------------------------------------------------------------------- COCO
def _square_mask(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 1
    return m


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's iscrowd format: run lengths in column-major order, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


@pytest.fixture()
def coco_dataset(tmp_path, photos) -> tuple[Path, np.ndarray]:
    (tmp_path / "val").mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val" / "dog.jpg").write_bytes(photos["jpeg_0"])  # 768 x 576
    (tmp_path / "val" / "coffee.png").write_bytes(photos["coffee"])  # 600 x 400
    crowd = _square_mask(400, 600, (100, 50, 300, 150))
    coco = {
        "images": [
            {"id": 7, "file_name": "dog.jpg", "width": 768, "height": 576},
            {"id": 9, "file_name": "coffee.png", "width": 600, "height": 400},
            {"id": 11, "file_name": "not_there.jpg", "width": 10, "height": 10},
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 2, "name": "bicycle"}, {"id": 47, "name": "cup"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 18, "bbox": [120.0, 210.0, 200.0, 330.0], "iscrowd": 0,
             "segmentation": [[120, 210, 320, 210, 320, 540, 120, 540]]},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [100.0, 120.0, 700.0, 500.0], "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 47, "bbox": [100.0, 50.0, 200.0, 100.0], "iscrowd": 1,
             "segmentation": _uncompressed_rle(crowd)},
            {"id": 4, "image_id": 7, "caption": "A dog sits in front of a bicycle. "},
            {"id": 5, "image_id": 7, "caption": "a white dog and a bike"},
            {"id": 6, "image_id": 9, "caption": "A cup of coffee."},
        ],
    }
    path = tmp_path / "annotations" / "instances_val.json"
    path.write_text(json.dumps(coco))
    return path, crowd


def test_coco_import_boxes_masks_captions_validate(coco_dataset):
    path, crowd = coco_dataset
    items = list_inputs(str(path), image_root="../val")
    assert [os.path.basename(it.uri) for it in items] == ["coffee.png", "dog.jpg", "not_there.jpg"]
    assert {it.source for it in items} == {"instances_val"}
    images, quarantine, counters = ingest_shard(items, MIN_SIDE, MAX_PIXELS, set())
    assert counters == {"inputs": 3, "images": 2, "quarantined": 1, "duplicates": 0,
                        "quarantine_reasons": {"missing": 1}}

    records = [human_annotations(empty_record(r), r["human"]) for r in images.to_pylist()]
    table = records_to_table(records)
    validate_table(table)
    coffee, dog = table.to_pylist()
    assert [t["text"] for t in dog["texts"]] == ["A dog sits in front of a bicycle.", "a white dog and a bike"]
    assert all(t["tier"] == "brief" and t["score"] is None and t["status"] == "kept" for t in dog["texts"])
    assert [r["label"] for r in dog["regions"]] == ["dog", "bicycle"]
    dog_region, bike = dog["regions"]
    assert dog_region["box"] == [120.0, 210.0, 320.0, 540.0]  # xywh -> xyxy
    assert bike["box"] == [100.0, 120.0, 768.0, 576.0]  # 800 x 620 clamped to the 768 x 576 image
    assert dog_region["polygon"] == [[120.0, 210.0, 320.0, 210.0, 320.0, 540.0, 120.0, 540.0]]
    assert dog_region["mask"]["size"] == [576, 768]
    assert abs(rle_area(dog_region["mask"]) - 200 * 330) <= 200 + 330 + 1  # pycocotools rasterises edges
    assert bike["mask"] is None and bike["polygon"] is None
    (cup,) = coffee["regions"]
    assert cup["label"] == "cup" and cup["box"] == [100.0, 50.0, 300.0, 150.0]
    assert np.array_equal(rle_to_mask(cup["mask"]), crowd.astype(bool))  # uncompressed RLE -> same mask
    for rec in (coffee, dog):
        for ann in rec["texts"] + rec["regions"]:
            assert ann["source"]["annotator"] == "human" and ann["source"]["model"] == "instances_val.json"
        assert all(r["kind"] == "object" and r["score"] is None and r["quad"] is None for r in rec["regions"])
    ids = [a["ann_id"] for rec in (coffee, dog) for a in rec["texts"] + rec["regions"]]
    assert len(set(ids)) == len(ids)
    again = [human_annotations(empty_record(r), r["human"]) for r in images.to_pylist()]
    assert [a["ann_id"] for rec in again for a in rec["texts"] + rec["regions"]] == ids  # deterministic


def test_coco_declared_size_mismatch_keeps_captions_and_flags_boxes(coco_dataset, photos):
    path, _ = coco_dataset
    coco = json.loads(path.read_text())
    coco["images"][0]["width"], coco["images"][0]["height"] = 576, 768  # e.g. labelled on the rotated frame
    path.write_text(json.dumps(coco))
    item = next(it for it in list_inputs(str(path), image_root="../val") if it.uri.endswith("dog.jpg"))
    row, _ = decode_input(item, MIN_SIDE, MAX_PIXELS)
    rec = human_annotations(empty_record(row), row["human"])
    validate_table(records_to_table([rec]))
    assert len(rec["texts"]) == 2 and rec["regions"] == []
    assert rec["errors"][0]["stage"] == "human" and "576x768" in rec["errors"][0]["error"]


def test_coco_errors_name_the_entry(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [],
                                "annotations": [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}]}))
    (item,) = list_inputs(str(path))  # one bad annotation never blocks the file
    (reason,) = item.human["rejected"]
    assert re.search(r"broken.json annotations\[0\] \(id 5\): category_id 3 is not in 'categories'", reason)
    path.write_text(json.dumps({"info": {}}))
    with pytest.raises(ValueError, match="not a COCO file"):
        list_inputs(str(path))
