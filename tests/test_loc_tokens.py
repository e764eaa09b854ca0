"""Location-token encoder: quantisation rules, and every encoder read back by transformers' own parser
(Florence2Processor.post_process_generation, what the stages parse generations with)."""
from __future__ import annotations

import random

import pytest

from schemas import loc_tokens as lt


@pytest.fixture(scope="module")
def processor():
    from engine.random_models.florence2 import offline_processor

    return offline_processor("tiny")


def parse(processor, task: str, sequence: str, w: int, h: int):
    return processor.post_process_generation(text="<s>" + sequence + "</s>", task=task, image_size=(w, h))[task]


def bin_centre(v: float, size: int) -> int:
    """What the official decoder gives back for pixel v (docs/florence2.md §2): the centre of v's bin,
    int((floor(v * 1000 / size) + 0.5) * size / 1000), written out here, not taken from the encoder."""
    k = min(max(int(v * 1000 // size), 0), 999)
    return int((k + 0.5) * size / 1000)


def test_quantize_floor_clamp():
    assert lt.quantize(0.0, 640) == 0
    assert lt.quantize(0.639, 640) == 0  # floor inside the first bin
    assert lt.quantize(0.64, 640) == 1
    assert lt.quantize(640, 640) == 999  # the right edge clamps into the last bin
    assert lt.quantize(-5, 640) == 0
    assert lt.quantize(480, 481) == 997
    with pytest.raises(ValueError, match="finite"):
        lt.quantize(float("nan"), 10)
    with pytest.raises(ValueError, match="positive"):
        lt.quantize(3, 0)
    with pytest.raises(ValueError, match="outside"):
        lt.loc_token(1000)
    with pytest.raises(ValueError, match="pairs"):
        lt.quantize_points([1, 2, 3], 10, 10)


def test_known_tokens_on_a_non_square_image(processor):
    """x scales with the width, y with the height: a swap of the two would put every token elsewhere."""
    w, h = 640, 480
    assert lt.box_to_tokens([64, 48, 320, 479.9], w, h) == "<loc_100><loc_100><loc_500><loc_999>"
    assert parse(processor, "<OD>", "cat" + lt.box_to_tokens([64, 48, 320, 479.9], w, h), w, h) == {
        "bboxes": [[64, 48, 320, 479]], "labels": ["cat"]}
    quad = [10, 20, 100, 20, 100, 60, 10, 60]
    assert lt.quad_to_tokens(quad, w, h) == "<loc_15><loc_41><loc_156><loc_41><loc_156><loc_125><loc_15><loc_125>"


def _random_box(rng, w, h):
    x0, x1 = sorted(rng.uniform(0, w) for _ in range(2))
    y0, y1 = sorted(rng.uniform(0, h) for _ in range(2))
    return [x0, y0, x1, y1]


def test_every_encoder_parses_back_through_transformers(processor):
    rng = random.Random(1)
    labels = ["red box", "dog", "a large tree", "person"]
    for _ in range(25):
        w, h = rng.randint(32, 2000), rng.randint(32, 2000)
        boxes = [_random_box(rng, w, h) for _ in range(rng.randint(1, 5))]
        names = [rng.choice(labels) for _ in boxes]
        expected = [[bin_centre(v, w if i % 2 == 0 else h) for i, v in enumerate(b)] for b in boxes]

        got = parse(processor, "<OD>", "".join(n + lt.box_to_tokens(b, w, h) for n, b in zip(names, boxes)), w, h)
        assert got == {"bboxes": expected, "labels": names}
        got = parse(processor, "<REGION_PROPOSAL>", "".join(lt.box_to_tokens(b, w, h) for b in boxes), w, h)
        assert got["bboxes"] == expected

        quads = [[v for _ in range(4) for v in (rng.uniform(0, w), rng.uniform(0, h))] for _ in boxes]
        got = parse(processor, "<OCR_WITH_REGION>",
                    "".join(f"LINE {i}" + lt.quad_to_tokens(q, w, h) for i, q in enumerate(quads)), w, h)
        assert got["labels"] == [f"LINE {i}" for i in range(len(quads))]
        assert got["quad_boxes"] == [[bin_centre(v, w if i % 2 == 0 else h) for i, v in enumerate(q)] for q in quads]

        # grounding: one phrase, two boxes each
        got = parse(processor, "<CAPTION_TO_PHRASE_GROUNDING>",
                    "".join(n + lt.box_to_tokens(b, w, h) * 2 for n, b in zip(names, boxes)), w, h)
        assert got["labels"] == [n for n in names for _ in range(2)]
        assert got["bboxes"] == [b for b in expected for _ in range(2)]

        rings = [[v for _ in range(rng.randint(3, 6)) for v in (rng.uniform(0, w), rng.uniform(0, h))] for _ in range(2)]
        for wrap in (False, True):
            got = parse(processor, "<REFERRING_EXPRESSION_SEGMENTATION>", lt.polygon_to_tokens(rings, w, h, wrap=wrap), w, h)
            assert got["polygons"] == [[[bin_centre(v, w if i % 2 == 0 else h) for i, v in enumerate(r)] for r in rings]]


def test_several_polygon_instances_are_wrapped_and_split(processor):
    w, h = 300, 200
    a = [[10, 10, 50, 10, 50, 40]]
    b = [[100, 100, 150, 100, 150, 150, 100, 150], [200, 20, 220, 20, 220, 60]]
    seq = lt.polygon_to_tokens(a, w, h, wrap=True) + lt.polygon_to_tokens(b, w, h, wrap=True)
    got = parse(processor, "<REFERRING_EXPRESSION_SEGMENTATION>", seq, w, h)["polygons"]
    assert [len(p) for p in got] == [1, 2] and [len(r) for r in got[1]] == [8, 6]
    with pytest.raises(ValueError, match="3 points"):
        lt.polygon_to_tokens([[1, 2, 3, 4]], w, h)


@pytest.mark.parametrize("text, label", [
    ("a <weird>\nlabel", "a weird label"),
    ("<loc_5> in the text", "loc_5 in the text"),
    ("</s>end", "/s end"),
])
def test_clean_phrase_keeps_the_parse_intact(processor, text, label):
    w, h = 100, 100
    cleaned = lt.clean_phrase(text)
    assert cleaned == label
    got = parse(processor, "<OD>", cleaned + lt.box_to_tokens([1, 2, 30, 40], w, h), w, h)
    assert got == {"bboxes": [[1, 2, 30, 40]], "labels": [label]}
