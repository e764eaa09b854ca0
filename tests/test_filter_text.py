"""Text filter: real spaCy parses, hand-checked counts and degrees, per-tier drops, re-runs."""
from __future__ import annotations

import pytest

from engine.registry import stage_class
from engine.stage import records_to_table, table_to_records
from filters.text import TextFilter, TextFilterParams, degree, text_stats
from schemas.records import make_ann_id, new_annotation, source_of
from schemas.validate import validate_table


@pytest.fixture(scope="module")
def nlp():
    from engine.models import load_spacy

    return load_spacy()


def test_several_verbs(nlp):
    # runs -> boy, jumps (2); jumps -> runs, and, catches (3); catches -> jumps, ball (2)
    stats = text_stats(nlp("A boy runs, jumps and catches a red ball."))
    assert (stats.objects, stats.actions, stats.attributes) == (2, 3, 1)
    assert stats.action_complexity == pytest.approx(7 / 3)
    assert stats.object_complexity == pytest.approx(2.5)  # boy: det + head (2); ball: det, amod + head (3)
    assert text_stats(nlp("A boy runs, jumps and catches a red ball."), "max").action_complexity == 3.0

    stats = text_stats(nlp("Two children are playing in the park while their mother reads a book."))
    assert stats.actions == 2  # playing, reads ("are" is an auxiliary, not an action)
    assert stats.action_complexity == pytest.approx(4.0)  # playing: children, are, in, reads; reads: playing, while, mother, book


def test_long_list_of_objects(nlp):
    doc = nlp("A table with apples, oranges, bananas, grapes, a knife, a cup and a plate.")
    stats = text_stats(doc)
    assert stats.objects == 8
    assert stats.actions == 0 and stats.action_complexity == 0.0
    # table 2, apples 2, oranges 2, bananas 2, grapes 2, knife 3, cup 4 (head, det, conj, cc), plate 2
    assert stats.object_complexity == pytest.approx(19 / 8)
    by_text = {t.text: degree(t) for t in doc}
    assert by_text["cup"] == 4 and by_text["table"] == 2


def test_compound_is_an_attribute_not_an_object(nlp):
    stats = text_stats(nlp("A black and white photo of a tennis racket."))
    assert stats.objects == 2  # photo, racket; "tennis" modifies racket
    assert stats.attributes == 3  # black, white, tennis


def _texts_record(record: dict, captions: list[tuple[str, str]]) -> dict:
    src = source_of("florence2", "random:tiny")
    record["texts"] = [
        new_annotation(src, ann_id=make_ann_id(record["image_id"], "florence2", "text", i), tier=tier, text=text)
        for i, (tier, text) in enumerate(captions)
    ]
    return record


CAPTIONS = [
    ("brief", "A man riding a horse on a beach."),  # kept
    ("brief", "A dog."),  # object complexity 1.0 < 1.5
    ("brief", "Apples, pears, plums, figs, limes, kiwis, lemons, melons, grapes, dates and nuts on a plate."),  # 12 objects > 10
    ("brief", "."),  # nothing left
    ("detailed", "A wooden table with a white cup, a red apple and a silver spoon on a striped cloth."),  # no action
    ("detailed", "A woman in a red coat walks her small dog along a busy street while a man on a bicycle rides past her."),
]


def test_stage_drops_per_tier_and_keeps_every_annotation(photo_batch):
    records = table_to_records(photo_batch.drop_columns(["image_bytes"]))
    _texts_record(records[0], CAPTIONS)
    _texts_record(records[1], [("more_detailed", "Birds.")])
    stage = stage_class("text_filter")({})
    out = stage(records_to_table(records))
    validate_table(out, name="text_filter output")
    texts = table_to_records(out)[0]["texts"]
    reasons = [t["reason"] for t in texts]
    assert reasons == [
        None,
        "text_filter:low_object_complexity",
        "text_filter:too_many_objects",
        "text_filter:empty",
        "text_filter:low_action_complexity",
        None,
    ]
    assert texts[2]["checks"]["text_filter.objects"] == 12
    assert texts[4]["checks"]["text_filter.actions"] == 0
    for t in texts:  # every computed value is in checks, dropped or not
        assert {"text_filter.objects", "text_filter.attributes", "text_filter.actions",
                "text_filter.object_complexity", "text_filter.action_complexity"} <= set(t["checks"])
    other = table_to_records(out)[1]["texts"][0]
    assert other["reason"] == "text_filter:low_object_complexity"
    total = sum(len(r["texts"]) for r in records)
    rows = table_to_records(out)
    kept = sum(t["status"] == "kept" for r in rows for t in r["texts"])
    dropped = sum(t["status"] == "dropped" for r in rows for t in r["texts"])
    assert total == kept + dropped == 7


def test_rerun_is_idempotent_and_can_undrop(photo_batch):
    records = table_to_records(photo_batch.drop_columns(["image_bytes"]))[:1]
    _texts_record(records[0], CAPTIONS)
    records[0]["texts"][0]["status"] = "dropped"  # an earlier, other filter's drop keeps its reason
    records[0]["texts"][0]["reason"] = "clip_score:low_score"
    strict = TextFilter({})
    once = strict(records_to_table(records))
    twice = strict(once)
    assert once.equals(twice)
    loose = TextFilter({"tiers": {"brief": {"min_object_complexity": 1.0, "max_objects": None}}})
    relaxed = table_to_records(loose(twice))[0]["texts"]
    assert [t["reason"] for t in relaxed][:4] == ["clip_score:low_score", None, None, "text_filter:empty"]
    assert relaxed[0]["checks"]["text_filter.objects"] == 3  # checks still filled on a dropped caption


def test_params_merge_per_tier_and_reject_unknown_keys():
    p = TextFilterParams(tiers={"detailed": {"max_objects": 50}})
    assert p.tiers["detailed"].max_objects == 50
    assert p.tiers["detailed"].min_action_complexity == 1.5  # the rest of the tier's defaults stay
    assert p.tiers["brief"].max_objects == 10
    with pytest.raises(ValueError, match="unknown key"):
        TextFilterParams(tiers={"breif": {}})
    with pytest.raises(ValueError, match="max_object"):
        TextFilterParams(tiers={"brief": {"max_object": 3}})


def test_malformed_texts_are_dropped(photo_batch):
    from filters.text import malformed

    bad = ["\ufffd\ufffd looking looking lookingnop", "<loc_200><loc_832> a cat", "a dog dog dog on a sofa",
           "A cat\x07 on a mat."]
    good = ["A man riding a horse on a beach.", "The text \"STOP STOP\" is written at the top.", "A bus, a bus stop."]
    assert all(malformed(t) for t in bad) and not any(malformed(t) for t in good)
    records = table_to_records(photo_batch.drop_columns(["image_bytes"]))[:1]
    _texts_record(records[0], [("brief", "A man riding a horse on a beach."),
                               ("brief", "A man riding riding riding a horse on a beach.")])
    texts = table_to_records(TextFilter({})(records_to_table(records)))[0]["texts"]
    assert [t["reason"] for t in texts] == [None, "text_filter:malformed"]
    assert [t["checks"]["text_filter.malformed"] for t in texts] == [0.0, 1.0]
    off = table_to_records(TextFilter({"drop_malformed": False})(records_to_table(records)))[0]["texts"]
    assert [t["reason"] for t in off] == [None, None]
