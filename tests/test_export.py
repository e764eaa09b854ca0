"""fld export: only kept annotations leave; COCO loads in pycocotools; Florence targets parse back."""
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.cli import app
from helpers import export_cli as _export
from helpers import store_one_image
from schemas.geometry import mask_to_rle
from schemas.records import new_annotation


def _coffee_annotations(rec: dict, src: dict) -> None:
    mask = np.zeros((400, 600), bool)
    mask[100:300, 150:450] = True
    rec["texts"] = [new_annotation(src, ann_id="t1", tier="brief", text="a cup of coffee"),
                    new_annotation(src, ann_id="t2", tier="brief", text="junk caption")]
    rec["texts"][1].update(status="dropped", reason="text_filter:too_few_objects")
    rec["regions"] = [
        new_annotation(src, 0.9, ann_id="r1", kind="object", box=[150, 100, 450, 300], quad=None, polygon=None,
                       mask=mask_to_rle(mask), label="cup", brief="a white cup"),
        new_annotation(src, 0.2, ann_id="r2", kind="object", box=[0, 0, 50, 50], quad=None, polygon=None,
                       mask=None, label="spoon", brief=None),
    ]
    rec["regions"][1].update(status="dropped", reason="region_filter:low_score")


@pytest.fixture()
def out(tmp_path, photos):
    return store_one_image(tmp_path / "out", photos["coffee"], "coffee.png", 600, 400, _coffee_annotations)


def test_coco_export_loads_in_pycocotools_with_kept_only(out, tmp_path):
    from pycocotools.coco import COCO

    _export(out, "coco", tmp_path / "coco")
    coco = COCO(str(tmp_path / "coco/instances.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    assert [coco.loadCats(a["category_id"])[0]["name"] for a in anns] == ["cup"]
    assert int(coco.annToMask(anns[0]).sum()) == 200 * 300
    caps = json.loads((tmp_path / "coco/captions.json").read_text())["annotations"]
    assert [c["caption"] for c in caps] == ["a cup of coffee"]
    assert (tmp_path / "coco" / coco.loadImgs(1)[0]["file_name"]).stat().st_size > 0


def test_florence_export_targets(out, tmp_path):
    _export(out, "florence", tmp_path / "fl")
    rows = pq.read_table(tmp_path / "fl/part-00000.parquet").to_pylist()
    by_task = {r["task"]: r for r in rows}
    assert by_task["<CAPTION>"]["target"] == "a cup of coffee"
    # cup box 150,100,450,300 in 600x400 -> bins floor(x*1000/W)
    assert by_task["<OD>"]["target"] == "cup<loc_250><loc_250><loc_750><loc_750>"
    assert "spoon" not in json.dumps([r["target"] for r in rows])
    assert all(r["image"] for r in rows)


def test_webdataset_export(out, tmp_path):
    _export(out, "webdataset", tmp_path / "wds")
    with tarfile.open(tmp_path / "wds/part-00000.tar") as tar:
        names = tar.getnames()
        rec = json.loads(tar.extractfile([n for n in names if n.endswith(".json")][0]).read())
    assert sorted(n.rsplit(".", 1)[1] for n in names) == ["json", "png"]
    assert [r["label"] for r in rec["regions"]] == ["cup"]


def test_unknown_format(out, tmp_path):
    res = CliRunner().invoke(app, ["export", str(out), "--format", "tfrecord", "--dest", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--format must be one of" in res.output
