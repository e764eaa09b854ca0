"""The benchmark's CLIP scorer (bench/quality/clip_train.py) plays a pretrained CLIP: it trains on its
own world (other seed, other split names), with hard negatives from its own corruption model, is
measured on the benchmark's held-out truth per pair type, and is cached by its configuration's hash."""
from __future__ import annotations

import ast
import hashlib
import random
from pathlib import Path

import pytest

import bench.quality.clip_train as clip_train
from bench.quality.clip_train import (
    ClipConfig,
    clip_cache_dir,
    corrupt_caption,
    corrupt_ocr_text,
    corrupt_region_text,
    heldout_auc,
    train_clip,
)
from bench.quality.language import parse_mentions, parse_relations
from bench.quality.world import WorldConfig, image_dir, write_world

TINY = ClipConfig(steps=4, batch_size=8, layers=1, text_layers=1, width=64, text_width=64, embed_dim=32, variants=1,
                  images=6, calib_images=4, warmup=2)


def test_corruptions_change_one_thing():
    rng = random.Random(0)
    truth = ("The image shows three objects on a plain grey background. A large blue box sits on the right. "
             "A red ball lies in the top left. The red ball is to the left of the large blue box.")
    seen = set()
    for _ in range(200):
        bad = corrupt_caption(truth, rng)
        assert bad != truth and len(bad.split()) == len(truth.split())  # a word replaced, none added or lost
        diff = [(a, b) for a, b in zip(truth.split(), bad.split()) if a != b]
        assert 1 <= len(diff) <= 2  # one word, or two colours exchanged
        seen.add("relation" if parse_relations(bad) != parse_relations(truth) else "mention"
                 if [(m.category, m.colour) for m in parse_mentions(bad)] != [(m.category, m.colour) for m in parse_mentions(truth)]
                 else "other")
    assert {"relation", "mention", "other"} <= seen  # relations, objects, counts / sizes / positions
    assert corrupt_region_text("large red ball", rng) != "large red ball"
    assert corrupt_caption("Nothing to edit here.", rng) != "Nothing to edit here."
    for text in ("OPEN 12", "Fresh Bread", "EXIT"):
        assert all(corrupt_ocr_text(text, rng) != text for _ in range(20))


def test_corruption_model_is_not_the_specialists():
    """clip_train.py imports nothing of the specialists' error model or the captioner's wording."""
    tree = ast.parse(Path(clip_train.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not imported & {"bench.quality.specialists", "bench.quality.captioner"}


@pytest.mark.timeout(300)
def test_clip_trains_on_its_own_world_is_measured_on_the_benchmark_and_cached(tmp_path):
    bench_world = tmp_path / "world"
    write_world(bench_world, WorldConfig(seed=TINY.world_seed, n_train=4, n_heldout=3))  # even the same seed
    logs = []
    report = train_clip(bench_world, tmp_path / "models" / "clip", TINY, log=logs.append, cache=tmp_path / "cache")
    home = clip_cache_dir(TINY, tmp_path / "cache")
    assert report["cache_dir"] == str(home) and not report["reused"]
    # its own images: other split names, and no image of the benchmark world among them
    own = {p.name for p in (home / "world" / "images").rglob("*.png")}
    assert len(own) == TINY.images + TINY.calib_images and all(n.startswith(("clip_train_", "clip_calib_")) for n in own)
    digest = lambda folder: {hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).rglob("*.png")}  # noqa: E731
    assert not digest(home / "world" / "images") & (digest(image_dir(bench_world, "train")) | digest(image_dir(bench_world, "heldout")))
    # measured per pair type on the benchmark's held-out truth, thresholds from its own calibration split
    assert set(report["auc"]) == {"clip_calib", "train", "heldout"}
    aucs = heldout_auc(tmp_path / "models" / "clip", bench_world)
    assert set(aucs) == {"region", "caption", "ocr"}
    assert aucs == {k: v["auc"] for k, v in report["auc"]["heldout"].items()}
    assert all(v is None or 0 <= v <= 1 for v in aucs.values())
    assert set(report["thresholds"]) == {"region", "text"}
    # cached: a second world (another seed) reuses the trained model; another configuration does not
    stamp = (home / "trained.json").stat().st_mtime_ns
    other_world = tmp_path / "world2"
    write_world(other_world, WorldConfig(seed=7, n_train=2, n_heldout=2))
    again = train_clip(other_world, tmp_path / "models2" / "clip", TINY, log=logs.append, cache=tmp_path / "cache")
    assert again["reused"] and (home / "trained.json").stat().st_mtime_ns == stamp
    assert (tmp_path / "models2" / "clip" / "clip_report.json").exists()
    assert clip_cache_dir(ClipConfig(**{**TINY.__dict__, "seed": 1}), tmp_path / "cache") != home
