"""Exports match their pixels (issue 11 item 7): images stored with an EXIF orientation leave the
store turned, so Image.open without exif_transpose sees the frame the annotations use; OCR text
regions are in the COCO export; COCO `area` is the mask's; COCOeval of the export against itself
gives mAP 1.0; whatever a format cannot hold is counted and printed."""
from __future__ import annotations

import io
import json
import tarfile
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import ExifTags, Image, ImageOps
from typer.testing import CliRunner

from engine.cli import app
from schemas.records import new_annotation
from helpers import WORDS, rendered_sign, store_one_image

ORIENTATION = ExifTags.Base.Orientation
# Stored pixels = the upright picture turned the other way; the tag tells viewers to turn it back.
UNDO = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
PIPELINES = """
pipelines:
  ocr_filter:
    ingest: {shard_size: 3}
    steps:
      - name: stage1
        stages:
          - {stage: ocr, params: {batch_size: 2}}
          - {stage: region_filter}
"""


def _with_orientation(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    stored = upright.transpose(UNDO[orientation])
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    stored.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 92} if fmt == "JPEG" else {}))
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:  # the premise: only exif_transpose shows the upright picture
        assert im.getexif().get(ORIENTATION) == orientation
        assert ImageOps.exif_transpose(im).size == upright.size
    return data


def _rgb(data_or_image) -> np.ndarray:
    im = Image.open(io.BytesIO(data_or_image)) if isinstance(data_or_image, bytes) else data_or_image
    return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, photos):
    """Photos saved with EXIF orientation 6, 8 and 3 (JPEG), 8 (PNG), 6 (WebP), a sign (orientation 6)
    and a plain JPEG, listed in a COCO file whose boxes and polygons are in the upright frame."""
    d = tmp_path_factory.mktemp("exif")
    upright = {
        "sign": Image.open(io.BytesIO(rendered_sign())).convert("RGB"),
        "jpeg_o6": Image.open(io.BytesIO(photos["jpeg_0"])).convert("RGB"),
        "jpeg_o8": Image.open(io.BytesIO(photos["jpeg_1"])).convert("RGB"),
        "jpeg_o3": Image.open(io.BytesIO(photos["jpeg_2"])).convert("RGB"),
        "png_o8": Image.open(io.BytesIO(photos["coffee"])).convert("RGB"),
        "webp_o6": Image.open(io.BytesIO(photos["chelsea"])).convert("RGB"),
    }
    files = {
        "sign.jpg": _with_orientation(upright["sign"], 6, "JPEG"),
        "jpeg_o6.jpg": _with_orientation(upright["jpeg_o6"], 6, "JPEG"),
        "jpeg_o8.jpg": _with_orientation(upright["jpeg_o8"], 8, "JPEG"),
        "jpeg_o3.jpg": _with_orientation(upright["jpeg_o3"], 3, "JPEG"),
        "png_o8.png": _with_orientation(upright["png_o8"], 8, "PNG"),
        "webp_o6.webp": _with_orientation(upright["webp_o6"], 6, "WEBP"),
        "plain.jpg": photos["jpeg_0"],  # no orientation tag: its bytes must leave untouched
    }
    upright["plain"] = Image.open(io.BytesIO(photos["jpeg_0"])).convert("RGB")
    images, annotations = [], []
    for i, (name, data) in enumerate(sorted(files.items()), start=1):
        (d / name).write_bytes(data)
        w, h = upright[name.split(".")[0]].size
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        x0, y0, x1, y1 = 0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h
        annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "segmentation": [[x0, y0, x1, y0, x1, y1, 0.5 * (x0 + x1), 0.5 * (y0 + y1), x0, y1]]})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (d / "instances.json").write_text(json.dumps(coco))
    (d / "pipelines.yaml").write_text(textwrap.dedent(PIPELINES))
    return d, files, upright


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def out(dataset, tmp_path_factory):
    d, _, _ = dataset
    out = tmp_path_factory.mktemp("run") / "out"
    res = _run("run", d / "pipelines.yaml", "--pipeline", "ocr_filter", "--input", d / "instances.json", "--out", out)
    assert res.exit_code == 0, res.output
    stats = json.loads(_run("stats", out, "--format", "json").stdout)
    assert stats["ingest"]["rows"][0] == [7, 7, 0, 0]  # inputs = images + quarantined + duplicates
    return out


def _query(out, sql):
    res = _run("query", out, sql, "--format", "json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _upright_of(uri: str, upright: dict) -> Image.Image:
    return upright[uri.rsplit("/", 1)[1].split(".")[0]]


def _assert_matches_upright(data: bytes, uri: str, size: tuple[int, int], dataset) -> None:
    _, files, upright = dataset
    with Image.open(io.BytesIO(data)) as im:  # no exif_transpose: what most loaders do
        assert im.size == size, uri
        assert im.getexif().get(ORIENTATION) in (None, 1), uri
    diff = np.abs(_rgb(data) - _rgb(_upright_of(uri, upright))).mean()
    assert diff < 4, f"{uri}: exported pixels are not the upright picture (mean abs diff {diff:.1f})"
    name = uri.rsplit("/", 1)[1]
    if name == "plain.jpg":
        assert data == files[name]  # nothing to turn: original bytes


@pytest.mark.timeout(600)
def test_coco_export_images_annotations_and_self_evaluation(out, dataset, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    res = _run("export", out, "--format", "coco", "--dest", tmp_path / "coco")
    assert res.exit_code == 0, res.output
    coco = COCO(str(tmp_path / "coco/instances.json"))
    for img in coco.loadImgs(coco.getImgIds()):
        data = (tmp_path / "coco" / img["file_name"]).read_bytes()
        _assert_matches_upright(data, img["uri"], (img["width"], img["height"]), dataset)

    (text_cat,) = coco.loadCats(coco.getCatIds(catNms=["text"]))
    assert text_cat["supercategory"] == "text"
    kept_lines = _query(out, "SELECT i.uri, r.label FROM regions r JOIN images i USING (image_id) "
                             "WHERE r.kind = 'text' AND r.status = 'kept' ORDER BY r.ann_id")
    texts = coco.loadAnns(coco.getAnnIds(catIds=[text_cat["id"]]))
    assert sorted(a["text"] for a in texts) == sorted(r["label"] for r in kept_lines)
    sign_no = next(i["id"] for i in coco.loadImgs(coco.getImgIds()) if i["uri"].endswith("sign.jpg"))
    sign_lines = [a["text"] for a in texts if a["image_id"] == sign_no]
    assert all(word in sign_lines for word in WORDS), sign_lines  # OCR read the sign turned upright
    assert all(len(a["segmentation"]) == 1 and len(a["segmentation"][0]) == 8 for a in texts)

    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == len(_query(out, "SELECT ann_id FROM regions WHERE status = 'kept'"))
    for a in anns:
        assert a["area"] == pytest.approx(float(coco.annToMask(a).sum())), a  # the mask's area, not the box's
    things = coco.loadAnns(coco.getAnnIds(catIds=coco.getCatIds(catNms=["thing"])))
    assert len(things) == 7 and all(a["area"] < a["bbox"][2] * a["bbox"][3] * 0.95 for a in things)

    for iou_type in ("bbox", "segm"):
        results = coco.loadRes([{**a, "score": 1.0} for a in anns])
        ev = COCOeval(coco, results, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0), iou_type


@pytest.mark.timeout(300)
def test_florence_and_webdataset_images_match_their_records(out, dataset, tmp_path):
    records = {r["image_id"]: r for r in _query(out, "SELECT image_id, uri, width, height FROM images")}
    res = _run("export", out, "--format", "florence", "--dest", tmp_path / "fl")
    assert res.exit_code == 0, res.output
    rows = pq.read_table(tmp_path / "fl").to_pylist()
    assert {r["image_id"] for r in rows} == set(records)
    for image_id in records:
        data = next(r["image"]["bytes"] for r in rows if r["image_id"] == image_id)  # a datasets Image struct
        rec = records[image_id]
        _assert_matches_upright(data, rec["uri"], (rec["width"], rec["height"]), dataset)

    res = _run("export", out, "--format", "webdataset", "--dest", tmp_path / "wds")
    assert res.exit_code == 0, res.output
    seen = 0
    for tar_path in sorted((tmp_path / "wds").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, blob in members.items():
            if name.endswith(".json"):
                continue
            rec = json.loads(members[name.rsplit(".", 1)[0] + ".json"])
            _assert_matches_upright(blob, rec["uri"], (rec["width"], rec["height"]), dataset)
            seen += 1
    assert seen == 7


def _unlabeled_region_and_grounding(rec: dict, src: dict) -> None:
    rec["texts"] = [new_annotation(src, ann_id="t", tier="brief", text="an astronaut")]
    rec["regions"] = [new_annotation(src, 0.9, ann_id="r", kind="object", box=[10, 10, 60, 60], quad=None,
                                     polygon=None, mask=None, label="", brief=None)]
    rec["groundings"] = [new_annotation(src, 0.8, ann_id="g", text_ann_id="t", phrase="an astronaut", char_start=0,
                                        char_end=12, box=[100, 50, 400, 500], mask=None)]


@pytest.mark.timeout(120)
def test_what_coco_cannot_hold_is_counted_and_printed(tmp_path, photos):
    out = store_one_image(tmp_path / "out", photos["astronaut"], "astronaut.png", 512, 512,
                          _unlabeled_region_and_grounding)
    res = _run("export", out, "--format", "coco", "--dest", tmp_path / "coco")
    assert res.exit_code == 0, res.output
    assert "left out: 1 object regions without a label" in res.output
    assert "left out: 1 groundings" in res.output


# ---- issue 21 item 6: DEST cannot damage OUT or mix two datasets; a killed export is marked ----
import os  # noqa: E402
import shutil  # noqa: E402

from bounded import fld_bounded  # noqa: E402
from engine.views.export import MARKER  # noqa: E402


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def own_out(tmp_path, ocr_run):
    out = tmp_path / "out"
    shutil.copytree(ocr_run, out)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dest,says", [
    ("{out}", "inside OUT"), ("{out}/images", "inside OUT"), ("{out}/annotations/stage1", "inside OUT"),
    ("{out}/new/deeper", "inside OUT"), ("{link}", "inside OUT"), ("{out}/..", "contains OUT"),
    ("{out}/images/part-00000.parquet", "inside OUT"),
])
def test_export_into_out_is_refused(own_out, tmp_path, dest, says):
    os.symlink(own_out / "images", tmp_path / "link")
    before = _snapshot(own_out)
    for fmt in ("florence", "hf", "webdataset", "coco"):
        res = fld_bounded("export", own_out, "--format", fmt, "--dest",
                          dest.format(out=own_out, link=tmp_path / "link")).check(2, seconds=60)
        assert says in res.stderr
    assert _snapshot(own_out) == before
    fld_bounded("verify", own_out).check(0)


@pytest.mark.timeout(300)
def test_a_non_empty_dest_is_refused_unless_it_holds_the_same_export(own_out, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    res = fld_bounded("export", own_out, "--format", "hf", "--dest", dest).check(2)
    assert "not empty" in res.stderr and (dest / "mine.txt").read_text() == "keep me" and len(list(dest.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    assert "not a folder" in fld_bounded("export", own_out, "--dest", tmp_path / "file").check(2).stderr

    fresh = tmp_path / "fresh"
    fld_bounded("export", own_out, "--format", "hf", "--dest", fresh).check(0)
    first = _snapshot(fresh)
    assert json.loads(first[MARKER])["complete"] is True
    fld_bounded("export", own_out, "--format", "hf", "--dest", fresh).check(0)  # the same export: redone
    assert _snapshot(fresh) == first
    for other in (("--format", "webdataset"), ("--format", "florence", "--task", "<OCR>"), ("--step", "stage1", "--format", "coco")):
        res = fld_bounded("export", own_out, *other, "--dest", fresh).check(2)
        assert "not empty" in res.stderr and "an export of" in res.stderr, res.stderr
    other_out = tmp_path / "other_out"
    shutil.copytree(own_out, other_out)
    assert "not empty" in fld_bounded("export", other_out, "--format", "hf", "--dest", fresh).check(2).stderr
    assert _snapshot(fresh) == first


@pytest.mark.timeout(300)
def test_a_killed_export_leaves_its_marker_and_the_rerun_finishes_it(own_out, tmp_path, monkeypatch):
    import engine.views.export as ex

    dest = tmp_path / "dest"
    calls = {"n": 0}
    real = ex._write_parquet

    def dies_on_the_second_shard(table, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as a kill between two shards
        real(table, path)

    monkeypatch.setattr(ex, "_write_parquet", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        ex.export(own_out, dest, "hf")
    marker = json.loads((dest / MARKER).read_text())
    assert marker["complete"] is False and marker["format"] == "hf"
    monkeypatch.setattr(ex, "_write_parquet", real)
    fld_bounded("export", own_out, "--format", "hf", "--dest", dest).check(0)
    reference = tmp_path / "reference"
    fld_bounded("export", own_out, "--format", "hf", "--dest", reference).check(0)
    assert _snapshot(dest) == _snapshot(reference)
