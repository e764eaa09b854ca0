"""Stage `grounding` with a tiny random Grounding DINO (real architecture) on real photos."""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from annotators.grounding import GroundingAnnotator
from engine.models import parse_model_ref
from engine.stage import IMAGE_BYTES_COLUMN, records_to_table, table_to_records
from helpers import count_forwards, make_batch
from schemas.records import make_ann_id, new_annotation, source_of
from schemas.validate import validate_table


TWO_PHRASES = {"brief": "A cat sits on a table."}
TWELVE_PHRASES = {
    "brief": "A man rides a bicycle past a bus.",
    "detailed": "A woman holds an umbrella near a dog, a bench and a lamp post.",
    "more_detailed": "Behind them a red car, a tree, a building and a traffic light stand under the sky.",
}
TWELVE = [
    "a man", "a bicycle", "a bus", "a woman", "an umbrella", "a dog", "a bench", "a lamp post",
    "a red car", "a tree", "a building", "a traffic light", "the sky",
]  # 13 chunks; "them" (pronoun) is not grounded


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(1)


def with_captions(table: pa.Table, captions: dict[str, str] | list[dict[str, str]]) -> pa.Table:
    """The batch with human captions per tier (same for every image, or one dict per image)."""
    records = table_to_records(table.drop([IMAGE_BYTES_COLUMN]))
    for i, rec in enumerate(records):
        caps = captions[i] if isinstance(captions, list) else captions
        rec["texts"] = [
            new_annotation(source_of("human"), ann_id=make_ann_id(rec["image_id"], "human", "text", j), tier=tier, text=text)
            for j, (tier, text) in enumerate(caps.items())
        ]
    return records_to_table(records).append_column(IMAGE_BYTES_COLUMN, table.column(IMAGE_BYTES_COLUMN))


@pytest.fixture(scope="module")
def stage() -> GroundingAnnotator:
    s = GroundingAnnotator({"model": "dino", "box_threshold": 0.0, "text_threshold": 0.0, "batch_size": 1},
                           models={"dino": "random:tiny"})
    s.ensure_setup()
    return s


def test_groundings_valid_linked_and_spans_right(stage, photo_batch):
    captions = [
        {"brief": "A woman in a white suit holds a helmet.", "detailed": "It is a woman next to a flag."},
        {"brief": "A cup of coffee on a saucer."},
        {"brief": "They look at it."},  # pronouns only: nothing to ground
        {"brief": "A cat lies on a wooden floor."},
    ]
    table = with_captions(photo_batch, captions)
    out = stage(table)
    validate_table(out.drop([IMAGE_BYTES_COLUMN]), name="grounding output")
    records = table_to_records(out)
    revision = parse_model_ref("random:tiny").revision
    for rec, caps in zip(records, captions):
        assert rec["errors"] == []
        texts = {t["ann_id"]: t["text"] for t in rec["texts"]}
        for g in rec["groundings"]:
            caption = texts[g["text_ann_id"]]
            assert caption[g["char_start"] : g["char_end"]] == g["phrase"]
            x0, y0, x1, y1 = g["box"]
            assert 0 <= x0 < x1 <= rec["width"] and 0 <= y0 < y1 <= rec["height"]
            assert 0.0 <= g["score"] <= 1.0 and 0.0 <= g["checks"]["grounding.text_score"] <= 1.0
            assert g["source"]["annotator"] == "grounding" and g["source"]["model"] == "random:tiny"
            assert g["source"]["revision"] == revision and g["status"] == "kept"
        phrases = {g["phrase"] for g in rec["groundings"]}
        assert "It" not in phrases and "it" not in phrases and "They" not in phrases
    # thresholds 0: every phrase of every caption gets boxes, both occurrences of "a woman"
    woman = records[0]
    spans = {(g["text_ann_id"], g["phrase"], g["char_start"]) for g in woman["groundings"]}
    brief_id, detailed_id = (t["ann_id"] for t in woman["texts"])
    assert {(brief_id, "A woman", 0), (brief_id, "a white suit", 11), (brief_id, "a helmet", 30),
            (detailed_id, "a woman", 6), (detailed_id, "a flag", 22)} == spans
    assert records[2]["groundings"] == []
    # the deduplicated phrase "a woman" shares its boxes between the two captions
    boxes = lambda tid: sorted(tuple(g["box"]) for g in woman["groundings"] if g["text_ann_id"] == tid and g["phrase"].lower() == "a woman")  # noqa: E731
    assert boxes(brief_id) == boxes(detailed_id) and len(boxes(brief_id)) > 0
    ids = [g["ann_id"] for r in records for g in r["groundings"]]
    assert len(ids) == len(set(ids))
    # idempotent: a second run replaces its own groundings instead of adding more
    again = table_to_records(stage(out))
    assert [len(r["groundings"]) for r in again] == [len(r["groundings"]) for r in records]


@pytest.mark.parametrize("captions, phrases", [(TWO_PHRASES, ["a cat", "a table"]), (TWELVE_PHRASES, TWELVE)])
def test_one_forward_per_image_whatever_the_number_of_phrases(stage, photo_batch, captions, phrases):
    table = with_captions(photo_batch, captions)
    out, calls = count_forwards(stage, table)  # batch_size=1: one image per forward
    assert calls == photo_batch.num_rows
    for rec in table_to_records(out):
        assert {g["phrase"].lower() for g in rec["groundings"]} == set(phrases)
    batched = GroundingAnnotator(stage.params.model_copy(update={"batch_size": 4}), models=stage.models)
    batched.model, batched.processor, batched.nlp = stage.model, stage.processor, stage.nlp
    batched.model_ref, batched.revision, batched.device, batched.max_text_len = (
        stage.model_ref, stage.revision, stage.device, stage.max_text_len)
    batched._is_setup = True
    out4, calls4 = count_forwards(batched, table)
    assert calls4 == 1  # four images, one forward
    validate_table(out4.drop([IMAGE_BYTES_COLUMN]), name="batched grounding output")
    for rec in table_to_records(out4):  # (padded pixels shift a random model's boxes: no equality)
        assert {g["phrase"].lower() for g in rec["groundings"]} == set(phrases)


def test_long_prompts_split_only_when_needed(tmp_path, photo_batch):
    cfg = tmp_path / "gd_short_text.json"
    cfg.write_text(json.dumps({"preset": "tiny", "model": {"max_text_len": 16}}))
    stage = GroundingAnnotator({"model": f"random:{cfg}", "box_threshold": 0.0, "text_threshold": 0.0})
    stage.ensure_setup()
    table = with_captions(photo_batch.slice(0, 2), TWELVE_PHRASES)
    record = table_to_records(table)[0]
    keys, _ = stage._phrases([record])[0]
    prompts = stage._prompts(0, keys)
    assert len(prompts) > 1 and [k for p in prompts for k in p.keys] == keys
    for p in prompts:
        assert len(stage.processor.tokenizer(p.text)["input_ids"]) <= 16
    out, calls = count_forwards(stage, table)
    assert calls == 1  # all prompt rows of both images in one batch
    for rec in table_to_records(out):
        assert {g["phrase"].lower() for g in rec["groundings"]} == set(TWELVE)


def test_random_weights_are_deterministic(stage, photo_batch):
    again = GroundingAnnotator({"model": "random:tiny"})
    again.ensure_setup()
    a = dict(stage.model.state_dict())
    b = again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_image_is_recorded_and_batch_goes_on(stage, photo_batch):
    table = with_captions(photo_batch.slice(0, 2), TWO_PHRASES)
    images = table.column(IMAGE_BYTES_COLUMN).to_pylist()
    images[0] = b"not an image"
    table = table.set_column(table.schema.get_field_index(IMAGE_BYTES_COLUMN), IMAGE_BYTES_COLUMN, pa.array(images, pa.binary()))
    records = table_to_records(stage(table))
    assert records[0]["errors"] and records[0]["errors"][0]["stage"] == "decode"
    assert "UnidentifiedImageError" in records[0]["errors"][0]["error"]
    assert records[1]["errors"] == [] and records[1]["groundings"]


def test_params_are_checked():
    with pytest.raises(ValidationError, match="unknown tier"):
        GroundingAnnotator({"tiers": ["short"]})
    with pytest.raises(ValidationError, match="box_treshold"):
        GroundingAnnotator({"box_treshold": 0.3})


def test_local_directory_gives_the_same_groundings(stage, photo_batch, tmp_path):
    """A saved checkpoint folder (the offline alternative to the hub) loads through from_pretrained."""
    stage.model.save_pretrained(tmp_path)
    stage.processor.save_pretrained(tmp_path)
    local = GroundingAnnotator(stage.params.model_copy(update={"model": str(tmp_path)}))
    table = with_captions(photo_batch.slice(0, 1), TWO_PHRASES)
    got = table_to_records(local(table))[0]["groundings"]
    want = table_to_records(stage(table))[0]["groundings"]
    assert got and [(g["phrase"], g["box"], g["score"]) for g in got] == [(g["phrase"], g["box"], g["score"]) for g in want]
    assert got[0]["source"]["revision"].startswith("local-") and got[0]["source"]["model"] == str(tmp_path)


# Queries of a model whose output the test chooses: (normalised cx, cy, w, h), {token: logit}; tokens of
# the prompt "a cat. a table." are [CLS] a cat . a table . [SEP] (positions 0..7); other logits -20.
CHOSEN_QUERIES = [
    ((0.25, 0.50, 0.30, 0.40), {1: 3.0, 2: 3.0}),  # both tokens of "a cat": a cat box
    ((0.75, 0.50, 0.20, 0.60), {4: 3.0, 5: 3.0}),  # both tokens of "a table": a table box
    ((0.50, 0.20, 0.10, 0.10), {2: -1.0}),  # best token 0.27 < box_threshold 0.35: no box at all
    ((0.40, 0.80, 0.20, 0.20), {2: 1.0}),  # "cat" 0.73: box kept; mean over "a cat" 0.37 > 0.25 -> a cat
    ((0.60, 0.80, 0.20, 0.20), {5: 0.0}),  # "table" 0.5: box kept; mean over "a table" 0.25, not > 0.25 -> none
]


def test_each_phrase_gets_the_boxes_its_tokens_score(stage, photos, monkeypatch):
    """A Grounding DINO whose logits and boxes are chosen (forward replaced): which phrase gets which box,
    in pixels of a non-square photo, at the official thresholds. Thresholds 0 would give every phrase
    every box, so a wrong token-to-phrase mapping, threshold or (w, h) order would go unseen there."""
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoObjectDetectionOutput

    from helpers import make_batch

    st = GroundingAnnotator({"model": "random:tiny", "box_threshold": 0.35, "text_threshold": 0.25})
    st.model, st.processor, st.nlp = stage.model, stage.processor, stage.nlp
    st.model_ref, st.revision, st.device, st.max_text_len = stage.model_ref, stage.revision, stage.device, stage.max_text_len
    st._is_setup = True
    seen_prompts = []

    def chosen_forward(input_ids, pixel_values, **_):
        seen_prompts.extend(st.processor.tokenizer.convert_ids_to_tokens(row) for row in input_ids.tolist())
        rows = input_ids.shape[0]
        logits = torch.full((rows, len(CHOSEN_QUERIES), st.max_text_len), -20.0)
        boxes = torch.zeros((rows, len(CHOSEN_QUERIES), 4))
        for q, (box, tokens) in enumerate(CHOSEN_QUERIES):
            boxes[:, q] = torch.tensor(box)
            for position, logit in tokens.items():
                logits[:, q, position] = logit
        return GroundingDinoObjectDetectionOutput(logits=logits, pred_boxes=boxes)

    monkeypatch.setattr(st.model, "forward", chosen_forward)
    table = with_captions(make_batch({"chelsea": photos["chelsea"]}), TWO_PHRASES)
    rec = table_to_records(st(table))[0]
    assert seen_prompts == [["[CLS]", "a", "cat", ".", "a", "table", ".", "[SEP]"]]
    w, h = rec["width"], rec["height"]
    assert (w, h) == (451, 300)

    def pixels(cx, cy, bw, bh):  # centre format -> corners in the photo's pixels
        return [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]

    got = sorted(((g["phrase"], g["char_start"]), g["box"], g["score"], g["checks"]["grounding.text_score"])
                 for g in rec["groundings"])
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = sorted([
        (("A cat", 0), pixels(*CHOSEN_QUERIES[0][0]), sigmoid(3), sigmoid(3)),
        (("A cat", 0), pixels(*CHOSEN_QUERIES[3][0]), sigmoid(1), (sigmoid(-20) + sigmoid(1)) / 2),
        (("a table", 14), pixels(*CHOSEN_QUERIES[1][0]), sigmoid(3), sigmoid(3)),
    ])
    assert [g[0] for g in got] == [g[0] for g in want]
    for (_, box, score, text_score), (_, want_box, want_score, want_text) in zip(got, want):
        assert box == pytest.approx(want_box, abs=1e-3)
        assert (score, text_score) == pytest.approx((want_score, want_text), abs=1e-5)
    assert all(g["text_ann_id"] == rec["texts"][0]["ann_id"] for g in rec["groundings"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad", ["long", "two_long"])
def test_a_caption_spacy_refuses_is_that_records_error_not_the_runs(photo_batch, bad):
    """Issue 21: a 1.1 MB caption made spaCy raise E088 inside the batched stage and the whole run
    exit 2. The batch is redone record by record: the caption's image gets the error, the others of
    its batch their groundings, identical to a batch without it."""
    s = GroundingAnnotator({"model": "dino", "box_threshold": 0.0, "text_threshold": 0.0, "batch_size": 4},
                           models={"dino": "random:tiny"})
    s.ensure_setup()
    table = photo_batch.slice(0, 3)
    huge = "a dog on a bike. " * 66_000  # 1.1 MB, over spaCy's max_length of 1,000,000 characters
    good = {"brief": "A cup of coffee on a saucer."}
    caps = [good, {"brief": huge}, good] if bad == "long" else [{"brief": huge}, good, {"detailed": huge + "x"}]
    out = table_to_records(s(with_captions(table, caps)))
    # each image alone (what the record-by-record retry does): a padded batch gives other float noise
    reference = [table_to_records(s(with_captions(table.slice(i, 1), [good])))[0] for i in range(3)]
    for i, (rec, ref) in enumerate(zip(out, reference)):
        if "brief" in caps[i] and caps[i]["brief"] == good["brief"]:
            assert rec["errors"] == [] and rec["groundings"]
            # redone alone, not in a padded batch: the same phrases and boxes up to float noise
            assert [g["phrase"] for g in rec["groundings"]] == [g["phrase"] for g in ref["groundings"]]
            for g, r in zip(rec["groundings"], ref["groundings"]):
                assert g["box"] == pytest.approx(r["box"], abs=1e-3)
        else:
            assert len(rec["errors"]) == 1 and rec["errors"][0]["stage"] == "grounding"
            assert "E088" in rec["errors"][0]["error"] and rec["groundings"] == []
    assert s.take_metrics().get("records_isolated") == 3
