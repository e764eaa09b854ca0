"""Location-token codec: quantisation rules, round trips, and agreement with transformers' parser."""
from __future__ import annotations

import random

import pytest

from schemas import loc_tokens as lt


@pytest.fixture(scope="module")
def processor():
    from annotators.florence2_model import build_processor, build_tokenizer

    return build_processor(build_tokenizer(2000), 128)


def test_quantize_floor_clamp_and_bin_centre():
    assert lt.quantize(0.0, 640) == 0
    assert lt.quantize(0.639, 640) == 0  # floor inside the first bin
    assert lt.quantize(0.64, 640) == 1
    assert lt.quantize(640, 640) == 999  # the right edge clamps into the last bin
    assert lt.quantize(-5, 640) == 0
    assert lt.dequantize(0, 640) == pytest.approx(0.32)
    assert lt.dequantize(999, 1000) == pytest.approx(999.5)
    with pytest.raises(ValueError, match="finite"):
        lt.quantize(float("nan"), 10)
    with pytest.raises(ValueError, match="outside"):
        lt.loc_token(1000)


def _random_box(rng, w, h):
    x0, x1 = sorted(rng.uniform(0, w) for _ in range(2))
    y0, y1 = sorted(rng.uniform(0, h) for _ in range(2))
    return [x0, y0, x1, y1]


def test_random_geometry_round_trips_within_half_a_bin():
    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(16, 4000), rng.randint(16, 4000)
        box = _random_box(rng, w, h)
        (inst,) = lt.parse_boxes("cat" + lt.box_to_tokens(box, w, h), w, h)
        assert inst.label == "cat"
        for i, (a, b) in enumerate(zip(box, inst.boxes[0])):
            assert abs(a - b) <= 0.5 * (w if i % 2 == 0 else h) / 1000 + 1e-9
        quad = [v for _ in range(4) for v in (rng.uniform(0, w), rng.uniform(0, h))]
        (line,) = lt.parse_ocr("EXIT 12" + lt.quad_to_tokens(quad, w, h), w, h)
        assert line.label == "EXIT 12"
        assert all(abs(a - b) <= 0.5 * (w if i % 2 == 0 else h) / 1000 + 1e-9 for i, (a, b) in enumerate(zip(quad, line.quad)))
        rings = [[v for _ in range(rng.randint(3, 8)) for v in (rng.uniform(0, w), rng.uniform(0, h))] for _ in range(rng.randint(1, 3))]
        (poly,) = lt.parse_polygons(lt.polygon_to_tokens(rings, w, h), w, h)
        assert len(poly.polygons) == len(rings)
        for ring, got in zip(rings, poly.polygons):
            assert len(ring) == len(got)
            assert all(abs(a - b) <= 0.5 * (w if i % 2 == 0 else h) / 1000 + 1e-9 for i, (a, b) in enumerate(zip(ring, got)))


def test_several_polygon_instances_are_wrapped_and_split():
    w, h = 300, 200
    a = [[10, 10, 50, 10, 50, 40]]
    b = [[100, 100, 150, 100, 150, 150, 100, 150], [200, 20, 220, 20, 220, 60]]
    text = "<s>" + lt.polygon_to_tokens(a, w, h, wrap=True) + lt.polygon_to_tokens(b, w, h, wrap=True) + "</s>"
    got = lt.parse_polygons(text, w, h)
    assert [len(i.polygons) for i in got] == [1, 2]
    assert [len(r) for r in got[1].polygons] == [8, 6]


def test_clean_phrase_keeps_the_parse_intact():
    w, h = 100, 100
    text = lt.clean_phrase("a <weird>\nlabel") + lt.box_to_tokens([1, 2, 30, 40], w, h)
    (inst,) = lt.parse_boxes(text, w, h)
    assert inst.label == "a weird label"


def _same_as_transformers(ours, theirs):
    """transformers casts the dequantised floats to int; ours keeps the float."""
    assert [int(v) for v in ours] == theirs


def test_parsers_agree_with_florence2_post_process_generation(processor):
    rng = random.Random(1)
    labels = ["red box", "dog", "a large tree", "person"]
    for trial in range(25):
        w, h = rng.randint(32, 2000), rng.randint(32, 2000)
        boxes = [_random_box(rng, w, h) for _ in range(rng.randint(1, 5))]
        names = [rng.choice(labels) for _ in boxes]
        seq = "<s>" + "".join(n + lt.box_to_tokens(b, w, h) for n, b in zip(names, boxes)) + "</s>"
        ours = lt.parse_boxes(seq, w, h)
        theirs = processor.post_process_generation(text=seq, task="<OD>", image_size=(w, h))["<OD>"]
        assert [i.label for i in ours] == theirs["labels"] == names
        for inst, tb in zip(ours, theirs["bboxes"]):
            _same_as_transformers(inst.boxes[0], tb)

        seq = "<s>" + "".join(lt.box_to_tokens(b, w, h) for b in boxes) + "</s>"
        theirs = processor.post_process_generation(text=seq, task="<REGION_PROPOSAL>", image_size=(w, h))["<REGION_PROPOSAL>"]
        ours = lt.parse_boxes(seq, w, h, allow_empty_phrase=True)
        assert len(ours) == len(theirs["bboxes"]) == len(boxes)
        for inst, tb in zip(ours, theirs["bboxes"]):
            _same_as_transformers(inst.boxes[0], tb)

        quads = [[v for _ in range(4) for v in (rng.uniform(0, w), rng.uniform(0, h))] for _ in boxes]
        seq = "<s>" + "".join(f"LINE {i}" + lt.quad_to_tokens(q, w, h) for i, q in enumerate(quads)) + "</s>"
        theirs = processor.post_process_generation(text=seq, task="<OCR_WITH_REGION>", image_size=(w, h))["<OCR_WITH_REGION>"]
        ours = lt.parse_ocr(seq, w, h)
        assert [i.label for i in ours] == theirs["labels"]
        for inst, tq in zip(ours, theirs["quad_boxes"]):
            _same_as_transformers(inst.quad, tq)

        seq = "<s>" + "".join(n + lt.box_to_tokens(b, w, h) + lt.box_to_tokens(b, w, h) for n, b in zip(names, boxes)) + "</s>"
        theirs = processor.post_process_generation(text=seq, task="<CAPTION_TO_PHRASE_GROUNDING>", image_size=(w, h))
        theirs = theirs["<CAPTION_TO_PHRASE_GROUNDING>"]
        ours = lt.parse_grounding(seq, w, h)
        flat = [(i.label, b) for i in ours for b in i.boxes]
        assert [f[0] for f in flat] == theirs["labels"]
        for (_, b), tb in zip(flat, theirs["bboxes"]):
            _same_as_transformers(b, tb)

        rings = [[v for _ in range(rng.randint(3, 6)) for v in (rng.uniform(0, w), rng.uniform(0, h))] for _ in range(2)]
        for wrap in (False, True):
            seq = "<s>" + lt.polygon_to_tokens(rings, w, h, wrap=wrap) + "</s>"
            theirs = processor.post_process_generation(
                text=seq, task="<REFERRING_EXPRESSION_SEGMENTATION>", image_size=(w, h)
            )["<REFERRING_EXPRESSION_SEGMENTATION>"]
            ours = lt.parse_polygons(seq, w, h)
            assert len(ours) == len(theirs["polygons"]) == 1
            assert len(ours[0].polygons) == len(theirs["polygons"][0]) == 2
            for ring, tring in zip(ours[0].polygons, theirs["polygons"][0]):
                _same_as_transformers(ring, tring)


def test_malformed_sequences_parse_like_transformers(processor):
    w, h = 500, 400
    seqs = [
        "cat<loc_1><loc_2><loc_3>",  # three locations: no box
        "cat<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6>dog",  # a dangling group of two
        "<loc_1><loc_2><loc_3><loc_4>",  # no phrase
        "  spaced  label <loc_10><loc_20><loc_300><loc_400>",
        "caf\u00e9<loc_10><loc_20><loc_300><loc_400>",  # non-ASCII is dropped as transformers does
    ]
    for seq in seqs:
        theirs = processor.post_process_generation(text=seq, task="<OD>", image_size=(w, h))["<OD>"]
        ours = lt.parse_boxes(seq, w, h)
        assert [i.label for i in ours] == theirs["labels"], seq
        assert [[int(v) for v in i.boxes[0]] for i in ours] == theirs["bboxes"], seq
