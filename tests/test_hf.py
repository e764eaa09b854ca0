"""Hugging Face `datasets` reads `fld export --format hf` and the Florence export unchanged (real library)."""
import hashlib
import io

import pyarrow as pa
import pytest
from PIL import Image
from engine.views.query import run_query
from engine.stage import records_to_table
from engine.store import ShardStore
from schemas.records import IMAGES_SCHEMA, empty_record, new_annotation, source_of
from helpers import export_cli as _export

datasets = pytest.importorskip("datasets")


def _record(data: bytes, uri: str) -> dict:
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    iid = hashlib.sha256(data).hexdigest()
    return empty_record({"image_id": iid, "uri": uri, "width": w, "height": h, "source": "t"}), {
        "image_id": iid, "uri": uri, "source": "t", "width": w, "height": h, "format": "PNG", "mode": "RGB",
        "bytes": data, "human": None}


@pytest.fixture()
def out(tmp_path, photos):
    """Two real photos over two shards; kept and dropped annotations with checks of several filters."""
    store = ShardStore(tmp_path / "out")
    src = source_of("unit")
    for k, name in enumerate(("coffee", "chelsea")):
        rec, image_row = _record(photos[name], f"{name}.png")
        rec["texts"] = [new_annotation(src, ann_id=f"{name}-t1", tier="brief", text=f"a photo of a {name}"),
                        new_annotation(src, ann_id=f"{name}-t2", tier="detailed", text="junk")]
        rec["texts"][0]["checks"] = {"text_filter.objects": 2.0, "clip_score.text": 0.31 + k}
        rec["texts"][1].update(status="dropped", reason="text_filter:too_few_objects", checks={"text_filter.objects": 0.0})
        rec["regions"] = [
            new_annotation(src, 0.9, ann_id=f"{name}-r1", kind="object", box=[10.0, 20.0, 110.5, 220.25], quad=None,
                           polygon=[[10.0, 20.0, 110.5, 20.0, 110.5, 220.25]], mask=None, label="cup", brief="a cup"),
            new_annotation(src, 0.2, ann_id=f"{name}-r2", kind="object", box=[0.0, 0.0, 5.0, 5.0], quad=None,
                           polygon=None, mask=None, label="spoon", brief=None),
        ]
        rec["regions"][0]["checks"] = {"region_filter.nms_iou": 0.0, "clip_score.region": 0.27}
        rec["regions"][1].update(status="dropped", reason="region_filter:low_score")
        shard = f"part-0000{k}"
        store.write_shard("images", shard, pa.Table.from_pylist([image_row], schema=IMAGES_SCHEMA))
        store.write_shard("annotations/stage2", shard, records_to_table([rec]))
    store.update_manifest(folder_order=["annotations/stage2"])
    return tmp_path / "out"


def _load(files, tmp_path):
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf-cache"))


def test_annotation_shards_alone_do_not_load(out, tmp_path):
    """Why the hf export exists: the store's MAP column has no datasets type (the schema stays as it is)."""
    with pytest.raises(ValueError, match="map"):
        _load(str(out / "annotations/stage2/*.parquet"), tmp_path)


@pytest.mark.timeout(300)
def test_hf_export_loads_unchanged_and_equals_duckdb(out, tmp_path, photos):
    _export(out, "hf", tmp_path / "hf")
    ds = _load(str(tmp_path / "hf/*.parquet"), tmp_path)
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["regions"].feature["checks"].feature == {"name": datasets.Value("string"),
                                                                 "value": datasets.Value("float64")}
    assert len(ds) == 2
    rows = {r["image_id"]: r for r in ds}
    # the image is the original photo, decoded by datasets itself
    for name in ("coffee", "chelsea"):
        iid = hashlib.sha256(photos[name]).hexdigest()
        decoded = rows[iid]["image"]
        assert decoded.size == (rows[iid]["width"], rows[iid]["height"]) == Image.open(io.BytesIO(photos[name])).size
    # every kept annotation, and only those, equal to what DuckDB reads from the store
    cols, db = run_query(out, "SELECT image_id, ann_id, label, box, score, checks FROM regions WHERE status = 'kept'")
    from_db = sorted((r[0], r[1], r[2], [float(x) for x in r[3]], r[4], {k: float(v) for k, v in r[5].items()}) for r in db)
    from_hf = sorted((iid, a["ann_id"], a["label"], a["box"], a["score"], {c["name"]: c["value"] for c in a["checks"]})
                     for iid, r in rows.items() for a in r["regions"])
    assert from_hf == from_db and len(from_hf) == 2
    _, db_texts = run_query(out, "SELECT image_id, ann_id, text, checks FROM texts WHERE status = 'kept'")
    hf_texts = sorted((iid, t["ann_id"], t["text"], {c["name"]: c["value"] for c in t["checks"]})
                      for iid, r in rows.items() for t in r["texts"])
    assert hf_texts == sorted((r[0], r[1], r[2], {k: float(v) for k, v in r[3].items()}) for r in db_texts)
    assert rows[hashlib.sha256(photos["coffee"]).hexdigest()]["regions"][0]["polygon"] == [[10.0, 20.0, 110.5, 20.0, 110.5, 220.25]]


@pytest.mark.timeout(300)
def test_florence_export_image_is_an_image_feature(out, tmp_path, photos):
    _export(out, "florence", tmp_path / "fl")
    ds = _load(str(tmp_path / "fl/*.parquet"), tmp_path)
    assert isinstance(ds.features["image"], datasets.Image)
    sizes = {hashlib.sha256(photos[n]).hexdigest(): Image.open(io.BytesIO(photos[n])).size for n in ("coffee", "chelsea")}
    tasks = set()
    for row in ds:
        assert row["image"].size == sizes[row["image_id"]]
        tasks.add(row["task"])
    assert {"<CAPTION>", "<OD>"} <= tasks
