"""The data model: schemas round-trip, the validator names where a record is wrong, geometry."""
import numpy as np
import pyarrow as pa
import pytest

from engine.stage import records_to_table, table_to_records
from schemas import SchemaError, validate_table
from schemas.geometry import (
    box_iou,
    box_iou_matrix,
    clamp_box,
    mask_to_polygon,
    mask_to_rle,
    polygon_to_rle,
    quad_to_box,
    rle_area,
    rle_to_box,
    rle_to_mask,
)
from schemas.records import empty_record, make_ann_id, new_annotation, source_of


def _record():
    rec = empty_record({"image_id": "img1", "uri": "a.jpg", "width": 100, "height": 50, "source": "t"})
    src = source_of("unit", "m", "r", {"p": 1})
    rec["texts"].append(new_annotation(src, ann_id="t1", tier="brief", text="a dog on grass"))
    rec["regions"].append(
        new_annotation(src, score=0.9, ann_id="r1", kind="object", box=[10, 5, 60, 45], quad=None,
                       polygon=None, mask=None, label="dog", brief="a brown dog")
    )
    rec["groundings"].append(
        new_annotation(src, score=0.8, ann_id="g1", text_ann_id="t1", phrase="a dog", char_start=0, char_end=5,
                       box=[10, 5, 60, 45], mask=None)
    )
    return rec


def test_record_round_trips_through_arrow_with_checks_as_dict():
    rec = _record()
    rec["regions"][0]["checks"] = {"region_filter.area": 2000.0}
    table = records_to_table([rec])
    validate_table(table)
    back = table_to_records(table)[0]
    assert back["regions"][0]["checks"] == {"region_filter.area": 2000.0}
    assert back["groundings"][0]["phrase"] == "a dog"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["regions"][0].update(box=[10, 5, 160, 45]), "regions[0]: box"),
        (lambda r: r["regions"][0].update(kind="blob"), "regions[0]: kind"),
        (lambda r: r["texts"][0].update(tier="long"), "texts[0]: tier"),
        (lambda r: r["groundings"][0].update(text_ann_id="nope"), "groundings[0]: text_ann_id"),
        (lambda r: r["regions"][0].update(status="dropped"), "dropped without a reason"),
        (lambda r: r["texts"][0]["source"].update(annotator=""), "provenance"),
        (lambda r: r.update(width=0), "width/height"),
    ],
)
def test_validator_names_row_and_field(mutate, message):
    good, bad = _record(), _record()
    mutate(bad)
    with pytest.raises(SchemaError) as err:
        validate_table(records_to_table([good, bad]), name="shard-7")
    assert "shard-7 row 1" in str(err.value) and message in str(err.value)


def test_validator_rejects_wrong_column_type():
    table = records_to_table([_record()])
    table = table.set_column(2, "width", pa.array(["100"]))
    with pytest.raises(SchemaError, match="column 'width'"):
        validate_table(table)


def test_ann_ids_are_deterministic_and_distinct():
    assert make_ann_id("a", "ocr", "text", 0) == make_ann_id("a", "ocr", "text", 0)
    assert len({make_ann_id("a", "ocr", "text", i) for i in range(100)}) == 100


def test_geometry_rle_polygon_and_iou():
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:30, 20:50] = True
    rle = mask_to_rle(mask)
    assert rle["size"] == [40, 60] and isinstance(rle["counts"], str)
    assert (rle_to_mask(rle) == mask).all()
    assert rle_area(rle) == 600
    assert rle_to_box(rle) == [20.0, 10.0, 50.0, 30.0]
    poly = mask_to_polygon(mask)
    assert len(poly) == 1
    back = rle_to_mask(polygon_to_rle(poly, 60, 40))
    assert abs(int(back.sum()) - 600) < 80  # polygon rasterisation differs at the border only
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    m = box_iou_matrix([[0, 0, 10, 10]], [[5, 0, 15, 10], [0, 0, 10, 10]])
    assert m.shape == (1, 2) and m[0, 0] == pytest.approx(1 / 3) and m[0, 1] == pytest.approx(1.0)
    assert clamp_box([-5, 3, 120, 60], 100, 50) == [0.0, 3.0, 100.0, 50.0]
    assert quad_to_box([1, 2, 9, 2, 9, 8, 1, 8]) == [1.0, 2.0, 9.0, 8.0]
