"""Quickstart samples: deterministic, all ingestible, real photos included, words readable by OCR."""
from __future__ import annotations

import os

import pytest

from engine.ingest import ingest_shard, list_inputs
from engine.samples import SCENES, write_samples

# The words each generated scene shows; OCR (RapidOCR, weights shipped in the wheel) must read them.
SCENE_WORDS = {
    "scene_stop_sign.png": "STOP",
    "scene_shop_front.png": "OPEN 24 HOURS",
    "scene_exit_sign.png": "EXIT",
    "scene_street.png": "BUS STOP",
}


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory):
    dest = tmp_path_factory.mktemp("samples")
    write_samples(dest)
    return dest


def test_samples_are_deterministic_and_ingest_cleanly(samples_dir, tmp_path):
    again = write_samples(tmp_path / "again")
    names = [p.name for p in again]
    assert names == sorted(os.listdir(samples_dir))
    for p in again:
        assert p.read_bytes() == (samples_dir / p.name).read_bytes(), p.name
    assert set(SCENES) <= set(names) and set(SCENE_WORDS) == set(SCENES)
    photos = [n for n in names if n.startswith("photo_")]
    assert len([n for n in photos if "darknet" not in n]) >= 3  # scikit-image photos
    if os.path.isdir("/usr/share/darknet/data"):
        assert any("darknet" in n for n in photos)

    items = list_inputs(str(samples_dir))
    images, quarantine, counters = ingest_shard(items, 16, 50_000_000, set())
    assert quarantine.num_rows == 0 and counters["images"] == len(names)
    assert len(set(images.column("image_id").to_pylist())) == len(names)  # no two samples alike


def test_scene_words_are_readable_by_ocr(samples_dir):
    from rapidocr import RapidOCR

    engine = RapidOCR(params={"Global.log_level": "warning"})
    for name, words in SCENE_WORDS.items():
        out = engine(str(samples_dir / name))
        read = " ".join(out.txts or ())
        assert words in read, f"{name}: OCR read {read!r}, expected {words!r}"
