"""Funnel: counts per type and filter (sequential, first reason), check quantiles, over the real
DuckDB views of a shard store, and the whole stage-2 chain on real photos losing nothing."""
from __future__ import annotations

import numpy as np
import pytest

from engine.views.funnel import check_quantiles, funnel, funnel_tables
from engine.views.query import open_views
from engine.stage import records_to_table, table_to_records
from engine.store import ShardStore, shard_name
from filters.grounding import GroundingFilter
from filters.region import RegionFilter
from filters.text import TextFilter
from schemas.records import ANNOTATION_KINDS, new_annotation, source_of

SRC = source_of("detect", "random:tiny")


def _region(i: int, status: str = "kept", reason: str | None = None, checks: dict | None = None) -> dict:
    ann = new_annotation(SRC, score=0.5, ann_id=f"r{i}", kind="object", box=[0.0, 0.0, 10.0, 10.0], label="cat")
    ann.update(status=status, reason=reason, checks=checks or {})
    return ann


def _store(tmp_path, records: list[dict]):
    ShardStore(tmp_path).write_shard("annotations/stage2", shard_name(0), records_to_table(records))
    return open_views(tmp_path)


@pytest.fixture()
def known(photo_batch, tmp_path):
    rec = table_to_records(photo_batch.drop_columns(["image_bytes"]))[0]
    regions = []
    for i in range(10):
        checks = {"region_filter.nms_iou": float(i) / 10, "clip_score.region": 0.1 * i}
        if i < 2:
            regions.append(_region(i, "dropped", "region_filter:nms", checks))
        elif i == 2:
            regions.append(_region(i, "dropped", "region_filter:low_score", checks))
        elif i < 5:
            regions.append(_region(i, "dropped", "clip_score:low_score", checks))
        else:
            regions.append(_region(i, checks=checks))
    rec["regions"] = regions
    rec["texts"] = [new_annotation(SRC, ann_id="t0", tier="brief", text="A cat.")]
    rec["texts"][0]["checks"] = {"text_filter.objects": 1.0}
    return _store(tmp_path, [rec])


def test_sequential_counts_and_reasons(known):
    rows = funnel(known)
    regions = [r for r in rows if r["type"] == "regions"]
    assert [(r["filter"], r["in"], r["dropped"], r["out"]) for r in regions] == [
        ("region_filter", 10, 3, 7),
        ("clip_score", 7, 2, 5),
        ("total", 10, 5, 5),
    ]
    assert regions[0]["reasons"] == {"region_filter:nms": 2, "region_filter:low_score": 1}
    texts = [r for r in rows if r["type"] == "texts"]
    assert [(r["filter"], r["in"], r["dropped"]) for r in texts] == [("text_filter", 1, 0), ("total", 1, 0)]
    assert [r for r in rows if r["type"] == "groundings"] == [
        {"type": "groundings", "filter": "total", "in": 0, "dropped": 0, "out": 0, "reasons": {}}
    ]
    # a pipeline that runs clip_score first gives its order to the funnel
    first = [r for r in funnel(known, order=["clip_score", "region_filter"]) if r["type"] == "regions"][0]
    assert (first["filter"], first["in"], first["dropped"]) == ("clip_score", 10, 2)


def test_check_quantiles(known):
    rows = {(r["type"], r["check"]): r for r in check_quantiles(known)}
    nms = rows[("regions", "region_filter.nms_iou")]
    values = np.arange(10) / 10
    assert nms["n"] == 10 and nms["mean"] == pytest.approx(values.mean())
    for name, q in (("p5", 5), ("p25", 25), ("p50", 50), ("p75", 75), ("p95", 95)):
        assert nms[name] == pytest.approx(np.percentile(values, q))
    kept_only = {(r["type"], r["check"]): r for r in check_quantiles(known, only_kept=True)}
    assert kept_only[("regions", "region_filter.nms_iou")]["n"] == 5
    assert rows[("texts", "text_filter.objects")]["p50"] == 1.0
    drops, checks = funnel_tables(known)
    region_rows = [r for r in drops["rows"] if r[0] == "regions" and r[1] == "region_filter"]
    assert region_rows and "nms 2" in region_rows[0][-1]
    assert "p95" in checks["columns"] and len(checks["rows"]) == len(rows)


def test_stage2_chain_on_real_photos_loses_nothing(photo_batch, tmp_path):
    records = table_to_records(photo_batch.drop_columns(["image_bytes"]))
    det = source_of("detect", "random:tiny")
    cap = source_of("florence2", "random:tiny")
    for rec in records:
        w, h = rec["width"], rec["height"]
        rec["texts"] = [
            new_annotation(cap, ann_id=rec["image_id"][:8] + "t0", tier="brief", text="A dog."),
            new_annotation(cap, ann_id=rec["image_id"][:8] + "t1", tier="brief", text="A man riding a horse on a beach."),
        ]
        rec["regions"] = [
            new_annotation(det, score=s, ann_id=f"{rec['image_id'][:8]}r{i}", kind="object", box=b, label="thing")
            for i, (s, b) in enumerate([(0.9, [0, 0, w / 2, h / 2]), (0.8, [1, 1, w / 2, h / 2]),
                                        (0.1, [w / 2, h / 2, w, h]), (0.9, [-5, -5, w / 3, h / 3])])
        ]
        rec["groundings"] = [
            new_annotation(det, score=0.9, ann_id=f"{rec['image_id'][:8]}g{i}", text_ann_id=rec["image_id"][:8] + t,
                           phrase=p, char_start=s, char_end=e, box=[0.0, 0.0, 10.0, 10.0])
            for i, (t, p, s, e) in enumerate([("t1", "A man", 0, 5), ("t1", "a horse", 13, 20), ("t0", "A dog", 0, 5)])
        ]
    table = records_to_table(records)
    for stage in (TextFilter({}), RegionFilter({}), GroundingFilter({})):
        table = stage(table)
    con = _store(tmp_path, table_to_records(table))
    rows = {(r["type"], r["filter"]): r for r in funnel(con)}
    n = len(records)
    assert rows[("texts", "total")]["in"] == 2 * n and rows[("texts", "text_filter")]["dropped"] == n
    assert rows[("regions", "region_filter")]["reasons"] == {"region_filter:nms": n, "region_filter:low_score": n}
    assert rows[("groundings", "grounding_filter")]["reasons"] == {"grounding_filter:text_dropped": n}
    for kind in ANNOTATION_KINDS:
        total = rows[(kind, "total")]
        kept, dropped = con.execute(
            f"SELECT count(*) FILTER (WHERE status = 'kept'), count(*) FILTER (WHERE status = 'dropped') FROM {kind}"
        ).fetchall()[0]
        assert total["in"] == kept + dropped and total["out"] == kept
        assert sum(r["dropped"] for (k, f), r in rows.items() if k == kind and f != "total") == dropped
    clamped = con.execute("SELECT count(*) FROM regions WHERE checks['region_filter.clamped'] = 1").fetchall()[0][0]
    assert clamped == n
