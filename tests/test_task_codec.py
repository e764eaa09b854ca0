"""Task codec: kept annotations -> Florence-2 examples; targets parse back to the same geometry."""
from __future__ import annotations

import re

import numpy as np
import pytest

from engine.stage import table_to_records
from schemas import loc_tokens as lt
from schemas.florence2_tasks import STAGE_TASKS, TASKS, TRAINED_TOKENS
from schemas.task_codec import TaskCodec, approx_token_count
from schemas.geometry import mask_to_rle
from schemas.records import make_ann_id, new_annotation, source_of

SRC = source_of("test", "none")


def _region(iid, i, kind, box, label=None, brief=None, quad=None, polygon=None, mask=None, status="kept"):
    ann = new_annotation(SRC, 0.9, ann_id=make_ann_id(iid, "test", kind, i), kind=kind, box=box, quad=quad,
                         polygon=polygon, mask=mask, label=label, brief=brief)
    if status == "dropped":
        ann.update(status="dropped", reason="test:dropped")
    return ann


@pytest.fixture(scope="module")
def record(photo_batch):
    rec = table_to_records(photo_batch)[0]  # a real photo's size
    iid, w, h = rec["image_id"], rec["width"], rec["height"]
    cap = new_annotation(SRC, None, ann_id=make_ann_id(iid, "test", "text", 0), tier="brief", text="a man  holding a cup")
    det = new_annotation(SRC, None, ann_id=make_ann_id(iid, "test", "text", 1), tier="detailed",
                         text="A man in a white suit holds a red cup.")
    mask = np.zeros((h, w), bool)
    mask[h // 4: h // 2, w // 4: w // 2] = True
    rec["texts"] = [cap, det]
    rec["regions"] = [
        _region(iid, 0, "object", [w * 0.5, h * 0.5, w * 0.9, h * 0.9], label="cup", brief="a red cup"),
        _region(iid, 1, "object", [w * 0.1, h * 0.1, w * 0.4, h * 0.8], label="man", brief="a man in white",
                polygon=[[w * 0.1, h * 0.1, w * 0.4, h * 0.1, w * 0.4, h * 0.8]]),
        _region(iid, 2, "object", [w * 0.25, h * 0.25, w * 0.5, h * 0.5], label="box", mask=mask_to_rle(mask)),
        _region(iid, 3, "object", [0, 0, 10, 10], label="junk", status="dropped"),
        _region(iid, 4, "text", [w * 0.1, h * 0.85, w * 0.3, h * 0.95], label="EXIT"),
        _region(iid, 5, "text", [w * 0.1, h * 0.05, w * 0.3, h * 0.09], label="NASA",
                quad=[w * 0.1, h * 0.05, w * 0.3, h * 0.05, w * 0.3, h * 0.09, w * 0.1, h * 0.09]),
    ]
    g = lambda i, s, e, box: new_annotation(  # noqa: E731
        SRC, 0.8, ann_id=make_ann_id(iid, "test", "g", i), text_ann_id=cap["ann_id"], phrase=cap["text"][s:e],
        char_start=s, char_end=e, box=box, mask=None)
    rec["groundings"] = [g(0, 17, 20, [w * 0.5, h * 0.5, w * 0.9, h * 0.9]), g(1, 0, 5, [w * 0.1, h * 0.1, w * 0.4, h * 0.8]),
                         g(2, 0, 5, [w * 0.6, h * 0.1, w * 0.7, h * 0.3])]
    return rec


@pytest.fixture(scope="module")
def processor():
    from engine.random_models.florence2 import offline_processor

    return offline_processor("tiny")


def parse(processor, ex, record) -> dict:
    return processor.post_process_generation(text="<s>" + ex.target + "</s>", task=ex.task,
                                             image_size=(record["width"], record["height"]))[ex.task]


LOC = re.compile(r"<loc_\d+>")


def test_every_task_from_kept_annotations(record, processor):
    examples = TaskCodec().encode(record)
    by_task = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    assert set(by_task) == set(TRAINED_TOKENS) - {"<MORE_DETAILED_CAPTION>"}  # no more_detailed text in the record
    assert by_task["<CAPTION>"][0].target == "a man holding a cup"  # whitespace normalised
    od = by_task["<OD>"][0]
    assert "junk" not in od.target  # dropped annotations never train
    # reading order: by quantised y0 then x0 -> man (y 0.1), box (0.25), cup (0.5)
    assert parse(processor, od, record)["labels"] == ["man", "box", "cup"]
    assert by_task["<OCR>"][0].target == "NASA EXIT"
    assert parse(processor, by_task["<OCR_WITH_REGION>"][0], record)["labels"] == ["NASA", "EXIT"]
    (gr,) = by_task["<CAPTION_TO_PHRASE_GROUNDING>"]
    assert gr.text_input == "a man holding a cup"
    assert parse(processor, gr, record)["labels"] == ["a man", "a man", "cup"]  # one label per box
    assert {ex.target for ex in by_task["<REGION_TO_DESCRIPTION>"]} == {"a red cup", "a man in white"}
    assert all(len(LOC.findall(ex.text_input)) == 4 for ex in by_task["<REGION_TO_DESCRIPTION>"])
    res = by_task["<REFERRING_EXPRESSION_SEGMENTATION>"]
    assert {ex.text_input for ex in res} == {"a man in white", "box"}  # polygon and mask (-> polygon)
    assert len(by_task["<REGION_TO_SEGMENTATION>"]) == 2
    (rp,) = by_task["<REGION_PROPOSAL>"]
    assert len(parse(processor, rp, record)["bboxes"]) == 3


def test_targets_parse_back_through_transformers(record, processor):
    w, h = record["width"], record["height"]
    for ex in TaskCodec().encode(record):
        parsed = processor.post_process_generation(text="<s>" + ex.target + "</s>", task=ex.task, image_size=(w, h))[ex.task]
        if ex.task == "<OD>":
            boxes = [r["box"] for r in sorted((r for r in record["regions"] if r["status"] == "kept" and r["kind"] == "object"),
                                               key=lambda r: (lt.quantize(r["box"][1], h), lt.quantize(r["box"][0], w)))]
            assert len(parsed["bboxes"]) == 3
            for got, box in zip(parsed["bboxes"], boxes):
                assert all(abs(g - b) <= max(w, h) / 1000 + 1 for g, b in zip(got, box))
        if ex.task == "<REGION_TO_SEGMENTATION>":
            assert parsed["polygons"] and len(parsed["polygons"][0][0]) >= 6


def test_truncation_keeps_whole_instances(record, processor):
    tok = processor.tokenizer
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
    full = TaskCodec(["<OD>"], count_tokens=count).encode(record)[0].target
    n_full = count(full)
    codec = TaskCodec(["<OD>", "<CAPTION>", "<DETAILED_CAPTION>"], max_target_tokens=n_full - 1, count_tokens=count)
    ex = {e.task: e for e in codec.encode(record)}
    cut = ex["<OD>"].target
    assert count(cut) + 2 <= n_full - 1
    assert len(LOC.findall(cut)) % 4 == 0 and cut.endswith(">")
    assert full.startswith(cut) and len(parse(processor, ex["<OD>"], record)["bboxes"]) == 2
    tiny = TaskCodec(["<DETAILED_CAPTION>"], max_target_tokens=8, count_tokens=count)
    assert tiny.encode(record) == [] and tiny.skipped_too_long == 1  # captions are skipped, never cut


def test_region_examples_are_capped_and_bad_task_named(record):
    assert len(TaskCodec(["<REGION_TO_DESCRIPTION>"], max_region_examples=1).encode(record)) == 1
    with pytest.raises(ValueError, match="<FOO>"):
        TaskCodec(["<FOO>"])
    assert approx_token_count("ab<loc_1><loc_2>") == 3


def test_the_task_table_is_transformers_own(processor):
    """schemas.florence2_tasks copies the processor's task prompts (they are instance attributes of
    Florence2Processor): token, prompt and whether it takes an input must be exactly transformers'."""
    ours = {t.token: t.prompt for t in TASKS}
    theirs = {**processor.task_prompts_without_inputs, **processor.task_prompts_with_input}
    assert ours == theirs
    assert {t.token for t in TASKS if t.takes_input} == set(processor.task_prompts_with_input)
    assert set(ours) == set(processor.tasks_answer_post_processing_type)


def test_task_orders_are_the_configured_defaults():
    """The stage's and the codec's task orders are defaults inside configuration hashes (florence2 params,
    refine.train_tasks): a reordered table would make every existing OUT refuse its steps and rounds."""
    assert list(STAGE_TASKS) == ["caption", "detailed_caption", "more_detailed_caption", "od",
                                 "dense_region_caption", "ocr_with_region", "phrase_grounding"]
    assert TRAINED_TOKENS == ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OD>",
                              "<DENSE_REGION_CAPTION>", "<REGION_PROPOSAL>", "<OCR>", "<OCR_WITH_REGION>",
                              "<CAPTION_TO_PHRASE_GROUNDING>", "<REGION_TO_DESCRIPTION>",
                              "<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>")
