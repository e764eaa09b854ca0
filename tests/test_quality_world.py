"""The benchmark world (bench/quality/world.py, language.py): determinism, truth consistent with
its pixels, captions the engine's own text filter accepts, and text the real RapidOCR reads."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench.quality.language import (
    COLOURS,
    parse_mentions,
    parse_relations,
)
from bench.quality.world import (
    WorldConfig,
    available_fonts,
    image_dir,
    load_truth,
    make_image,
    render_sign,
    truth_of,
    write_world,
)
from schemas.geometry import rle_to_box, rle_to_mask

CFG = WorldConfig(seed=3, n_train=10, n_heldout=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root, CFG)
    return root


def test_same_seed_same_world_other_seed_other_world():
    fonts = available_fonts()
    a_img, a_truth = make_image(CFG, "train", 2, fonts)
    b_img, b_truth = make_image(CFG, "train", 2, fonts)
    assert a_truth == b_truth and np.array_equal(np.asarray(a_img), np.asarray(b_img))
    c_img, c_truth = make_image(WorldConfig(seed=4), "train", 2, fonts)
    assert c_truth["captions"] != a_truth["captions"] or not np.array_equal(np.asarray(c_img), np.asarray(a_img))
    _, h_truth = make_image(CFG, "heldout", 2, fonts)  # splits draw from their own streams
    assert h_truth["captions"] != a_truth["captions"]


def test_world_files_and_truth_by_uri(world):
    truth = load_truth(world)
    assert len(truth) == CFG.n_train + CFG.n_heldout
    assert sorted(p.name for p in image_dir(world, "heldout").glob("*.png")) == sorted(
        k for k, t in truth.items() if t["split"] == "heldout")
    t = truth_of(truth, str(image_dir(world, "train") / "train_00001.png"))
    assert t["file"] == "train_00001.png"
    with pytest.raises(KeyError, match="elsewhere.png"):
        truth_of(truth, "/data/elsewhere.png")
    mtime = (world / "world.json").stat().st_mtime_ns
    write_world(world, CFG)  # same config: reused, not rewritten
    assert (world / "world.json").stat().st_mtime_ns == mtime


def test_truth_matches_pixels(world):
    truth = load_truth(world)
    cats = set()
    for name, t in truth.items():
        with Image.open(image_dir(world, t["split"]) / name) as im:
            assert im.size == (t["width"], t["height"])
            assert 160 <= min(im.size) and max(im.size) <= 352
        for o in t["objects"]:
            cats.add(o["category"])
            mask = rle_to_mask(o["mask"])
            assert mask.sum() == o["area"] > 0
            assert rle_to_box(o["mask"]) == o["box"]  # the box is the visible mask's tight box
            assert o["visible_fraction"] >= CFG.min_visible
            assert o["brief"].split()[-2:] == [o["colour"], o["category"]]
        for line in t["texts"]:
            sign = next(o for o in t["objects"] if o["id"] == line["object_id"])
            assert sign["category"] == "sign" and sign["text"] == line["text"]
            x0, y0, x1, y1 = sign["box"]
            xs, ys = line["quad"][0::2], line["quad"][1::2]
            assert x0 - 1 <= min(xs) and max(xs) <= x1 + 1 and y0 - 1 <= min(ys) and max(ys) <= y1 + 1
    assert len(cats) >= 8  # the world has 8+ categories in use


def test_captions_link_phrases_to_their_objects(world):
    for t in load_truth(world).values():
        ids = {o["id"]: o for o in t["objects"]}
        present = {(o["category"], o["colour"]) for o in t["objects"]}
        for tier, caption in t["captions"].items():
            assert {(m.category, m.colour) for m in parse_mentions(caption)} <= present
            for p in t["phrases"][tier]:
                assert caption[p["char_start"]:p["char_end"]] == p["phrase"]
                (m,) = parse_mentions(p["phrase"])
                for oid in p["object_ids"]:
                    assert (ids[oid]["category"], ids[oid]["colour"]) == (m.category, m.colour)
        assert set(map(tuple, t["relations"])) == parse_relations(t["captions"]["detailed"])
    assert any(t["relations"] for t in load_truth(world).values())
    assert any(m.count > 1 for t in load_truth(world).values() for m in parse_mentions(t["captions"]["detailed"]))


def test_parser_reads_attributes_counts_and_relations():
    text = 'A large red ball and two green stars. A white sign reads "BOX 12". The red ball is to the left of the small blue cone.'
    ms = parse_mentions(text)
    assert [(m.size, m.colour, m.category, m.count) for m in ms] == [
        ("large", "red", "ball", 1), (None, "green", "star", 2), (None, "white", "sign", 1),
        (None, "red", "ball", 1), ("small", "blue", "cone", 1)]  # the quoted sign text is no mention
    assert text[ms[1].start:ms[1].end] == "two green stars"
    assert parse_relations(text) == {("red", "ball", "to the left of", "blue", "cone")}
    assert set(COLOURS) >= {"red", "green", "blue", "white"}


@pytest.mark.timeout(120)
def test_engine_text_filter_keeps_true_captions(world):
    """Stage 2 must drop corrupted captions, not the truth: every true caption passes the
    engine's text_filter at its default thresholds."""
    from engine.stage import records_to_table, table_to_records
    from filters.text import TextFilter
    from schemas.records import empty_record, new_annotation, source_of

    records = []
    for t in load_truth(world).values():
        rec = empty_record({"image_id": t["file"], "uri": t["file"], "width": t["width"], "height": t["height"], "source": "w"})
        rec["texts"] = [new_annotation(source_of("truth"), ann_id=f"{t['file']}-{tier}", tier=tier, text=text)
                        for tier, text in t["captions"].items()]
        records.append(rec)
    out = table_to_records(TextFilter()(records_to_table(records)))
    dropped = [(t["text"], t["reason"]) for r in out for t in r["texts"] if t["status"] != "kept"]
    assert not dropped


@pytest.mark.timeout(120)
def test_rapidocr_reads_a_rendered_sign():
    """The world's rendered text is readable by the real OCR (its own errors allowed: a dropped
    space) and the true quad is where OCR finds the line (polygon IoU > 0.5, rotated or not)."""
    from rapidfuzz.distance import Levenshtein
    from rapidocr import RapidOCR

    from bench.quality.metrics import quad_iou_matrix

    ocr = RapidOCR(params={"Global.log_level": "error"})
    for font, size, angle in [(available_fonts()[-1], 24, 12.0), ("pillow", 16, -20.0), (available_fonts()[1], 13, 0.0)]:
        sign, quad = render_sign("BAKERY 7", font, size, "white", angle)
        canvas = Image.new("RGB", (320, 200), (128, 128, 128))
        canvas.paste(sign, (40, 50), sign)
        quad = [v + (40 if i % 2 == 0 else 50) for i, v in enumerate(v for xy in quad for v in xy)]
        out = ocr(np.asarray(canvas))
        assert len(out.txts) == 1 and Levenshtein.distance(out.txts[0], "BAKERY 7") <= 1, (font, size, angle, out.txts)
        found = np.asarray(out.boxes[0]).reshape(-1).tolist()
        assert quad_iou_matrix([found], [quad], 320, 200)[0, 0] > 0.5, (font, size, angle)
