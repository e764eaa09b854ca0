"""RapidOCR (real PP-OCR models from the wheel) on rendered text and on real photos."""

import pytest

from annotators.ocr import RapidOCRAnnotator
from engine.stage import table_to_records
from helpers import WORDS, make_batch, rendered_sign
from schemas import validate_table


@pytest.fixture(scope="module")
def ocr():
    stage = RapidOCRAnnotator({"batch_size": 2})
    stage.setup()
    return stage


def test_ocr_reads_rendered_text_with_quads_inside_the_image(ocr, photos):
    batch = make_batch({"sign": rendered_sign(), "astronaut": photos["astronaut"]})
    out = ocr(batch)
    validate_table(out.drop_columns(["image_bytes"]))
    sign, photo = table_to_records(out)
    texts = [r["label"] for r in sign["regions"]]
    assert texts == WORDS  # top-to-bottom reading order, exact strings
    for r in sign["regions"]:
        assert r["kind"] == "text" and len(r["quad"]) == 8 and r["score"] > 0.8
        xs, ys = r["quad"][0::2], r["quad"][1::2]
        assert 0 <= min(xs) and max(xs) <= sign["width"] and 0 <= min(ys) and max(ys) <= sign["height"]
        assert r["source"]["annotator"] == "ocr" and r["source"]["revision"].startswith("rapidocr-")
    assert photo["errors"] == []


def test_a_corrupt_image_is_recorded_and_the_batch_goes_on(ocr):
    batch = make_batch({"sign": rendered_sign(), "sign2": rendered_sign()})
    idx = batch.column_names.index("image_bytes")
    import pyarrow as pa

    batch = batch.set_column(idx, "image_bytes", pa.array([rendered_sign(), b"\xff\xd8\xff broken"], pa.binary()))
    good, bad = table_to_records(ocr(batch))
    assert [r["label"] for r in good["regions"]] == WORDS
    assert bad["regions"] == [] and bad["errors"][0]["stage"] == "decode"
