"""Florence-2 family (annotators/florence2_model.py) and the `florence2` stage, on real photos.

The random tiny model generates garbage, but real garbage: boxes, quads and phrases come out of
its decoder and go through the same parse + mapping path as a hub checkpoint's. The mapping
itself is checked against transformers' post_process_generation on hand-written sequences.
"""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest
import torch
from PIL import Image

from annotators.florence2 import Florence2Annotator, find_phrase
from annotators.florence2_model import Florence2Model
from engine.random_models.florence2 import build_random_florence2, resolve_random_config
from schemas.florence2_tasks import STAGE_TASKS, TOKENS
from engine.models import parse_model_ref
from engine.stage import IMAGE_BYTES_COLUMN, records_to_table, table_to_records
from schemas.records import ANNOTATION_KINDS, empty_record, new_annotation, source_of
from schemas.validate import validate_table

# 64 new tokens: enough for random:tiny's garbage to contain "text<loc>x4" objects and OCR quads
FAST = {"model": "random:tiny", "max_new_tokens": 64, "num_beams": 1, "batch_size": 4}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on 2 shared cores, 2 threads spin against other engineers' jobs
    and a 2 s stage call becomes 50 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stage() -> Florence2Annotator:
    st = Florence2Annotator(FAST)
    st.ensure_setup()
    return st


@pytest.fixture(scope="module")
def annotated(stage, photo_batch) -> pa.Table:
    return stage(photo_batch)


def _state_digest(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ model family
def test_random_tiny_is_the_real_architecture_with_florence_tokens():
    model, processor = build_random_florence2({"preset": "tiny"})
    tok = processor.tokenizer
    assert type(model).__name__ == "Florence2ForConditionalGeneration"
    assert type(processor).__name__ == "Florence2Processor"
    assert 2000 < len(tok) < 6000
    ids = tok("dog<loc_10><loc_999><poly></poly><sep>", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids)[-5:] == ["<loc_10>", "<loc_999>", "<poly>", "</poly>", "<sep>"]
    assert tok.image_token == "<image>" and model.config.image_token_id == tok.image_token_id
    assert processor.num_image_tokens == (128 // 32) ** 2 + 1
    # every task's parse type is configured (else post_process_generation raises)
    for task in TOKENS:
        processor.post_process_generation(text="</s><s>a</s>", task=task, image_size=(64, 48))


def test_random_config_overrides_and_rejects_unknown_keys():
    cfg = resolve_random_config({"preset": "tiny", "text": {"decoder_layers": 1}})
    assert cfg["text"]["decoder_layers"] == 1 and cfg["text"]["encoder_layers"] == 2
    with pytest.raises(ValueError, match="unknown key 'text.decoder_layerz'"):
        resolve_random_config({"text": {"decoder_layerz": 1}})
    with pytest.raises(ValueError, match="unknown Florence-2 preset"):
        resolve_random_config({"preset": "huge"})


def test_random_build_is_identical_in_another_process():
    model, processor = build_random_florence2({"preset": "tiny"})
    here = (_state_digest(model), hashlib.sha256(processor.tokenizer.backend_tokenizer.to_str().encode()).hexdigest())
    code = textwrap.dedent(
        f"""
        import hashlib, torch
        torch.manual_seed(1234)  # the build must not depend on the caller's RNG state
        from engine.random_models.florence2 import build_random_florence2
        m, p = build_random_florence2({{"preset": "tiny"}})
        h = hashlib.sha256()
        for name, t in sorted(m.state_dict().items()):
            h.update(name.encode()); h.update(t.detach().cpu().contiguous().numpy().tobytes())
        print(h.hexdigest(), hashlib.sha256(p.tokenizer.backend_tokenizer.to_str().encode()).hexdigest())
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, env=env)
    assert tuple(out.stdout.split()[-2:]) == here


def test_save_then_load_local_dir_generates_identically(tmp_path, photos):
    florence = Florence2Model.load("random:tiny", device="cpu")
    images = [Image.open(io.BytesIO(photos[n])).convert("RGB") for n in ("chelsea", "coffee")]
    before = florence.generate(images, "<OD>", max_new_tokens=16, num_beams=2)
    florence.save(tmp_path / "ckpt")
    again = Florence2Model.load(str(tmp_path / "ckpt"), device="cpu")
    assert parse_model_ref(again.ref).kind == "local" and again.revision.startswith("local-")
    assert _state_digest(again.model) == _state_digest(florence.model)
    assert again.generate(images, "<OD>", max_new_tokens=16, num_beams=2) == before
    assert all(t.startswith("</s><s>") for t in before)  # raw texts keep the special tokens


def test_random_json_config_and_prompt_longer_than_positions(tmp_path, photos):
    cfg = tmp_path / "florence_short.json"
    cfg.write_text('{"preset": "tiny", "text": {"max_position_embeddings": 32}}')
    florence = Florence2Model.load(f"random:{cfg}", device="cpu")
    assert florence.revision == parse_model_ref(f"random:{cfg}").revision != parse_model_ref("random:tiny").revision
    assert florence.model.config.text_config.max_position_embeddings == 32
    image = Image.open(io.BytesIO(photos["coffee"])).convert("RGB")
    assert len(florence.generate([image], "<CAPTION>", max_new_tokens=4, num_beams=1)) == 1  # 17 image + 8 prompt tokens fit
    with pytest.raises(ValueError, match="exceeds the model's 32 positions"):
        florence.generate([image], "<CAPTION_TO_PHRASE_GROUNDING>", ["a white cup of coffee on a saucer"], max_new_tokens=4)


def test_generate_checks_task_inputs():
    with pytest.raises(ValueError, match="unknown Florence-2 task"):
        Florence2Model.prompts("<CAPTIONS>", 1)
    with pytest.raises(ValueError, match="needs a text input"):
        Florence2Model.prompts("<CAPTION_TO_PHRASE_GROUNDING>", 2, ["a dog", None])
    assert Florence2Model.prompts("<REGION_TO_CATEGORY>", 1, ["<loc_1><loc_2><loc_3><loc_4>"]) == [
        "<REGION_TO_CATEGORY><loc_1><loc_2><loc_3><loc_4>"
    ]


# ------------------------------------------------------------------------- stage
def test_every_task_on_real_photos(annotated, photo_batch):
    validate_table(annotated)
    assert annotated.column(IMAGE_BYTES_COLUMN).to_pylist() == photo_batch.column(IMAGE_BYTES_COLUMN).to_pylist()
    revision = parse_model_ref("random:tiny").revision
    records = table_to_records(annotated)
    counts = dict.fromkeys(ANNOTATION_KINDS, 0)
    for rec in records:
        assert rec["errors"] == [], rec["errors"]
        assert not any("<pad>" in t["text"] for t in rec["texts"])  # batch padding is not text
        w, h = rec["width"], rec["height"]
        assert sorted(t["tier"] for t in rec["texts"]) == ["brief", "detailed", "more_detailed"]
        anns = [a for kind in ANNOTATION_KINDS for a in rec[kind]]
        assert len({a["ann_id"] for a in anns}) == len(anns)
        for a in anns:
            assert a["source"]["annotator"] == "florence2"
            assert a["source"]["model"] == "random:tiny" and a["source"]["revision"] == revision
            assert a["status"] == "kept" and a["round"] == 0
            assert 0 < a["score"] < 1  # the model's own confidence (annotators.florence2_scores), never 1.0
        for r in rec["regions"]:
            x0, y0, x1, y1 = r["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and r["label"]
            if r["kind"] == "text":
                assert len(r["quad"]) == 8
                assert all(0 <= v <= (w if i % 2 == 0 else h) for i, v in enumerate(r["quad"]))
                assert r["box"] == [min(r["quad"][0::2]), min(r["quad"][1::2]), max(r["quad"][0::2]), max(r["quad"][1::2])]
        brief = {t["ann_id"]: t["text"] for t in rec["texts"] if t["tier"] == "brief"}
        for g in rec["groundings"]:
            assert brief[g["text_ann_id"]][g["char_start"] : g["char_end"]] == g["phrase"]
            x0, y0, x1, y1 = g["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        for key in counts:
            counts[key] += len(rec[key])
    # the tiny model's decoder does emit location tokens: the region paths really ran
    assert counts["texts"] == 12
    # (its OCR lines are location-token debris, which the stage rejects: the OCR mapping is covered by the
    # hand-written sequences of the mapping tests)
    kinds = [r["kind"] for rec in records for r in rec["regions"]]
    assert "object" in kinds, f"random:tiny generated no regions ({kinds}): preset changed?"


def test_same_input_gives_same_annotations(photo_batch, annotated):
    """A fresh worker (new stage, same config) reproduces the OD regions, ids included."""
    again = table_to_records(Florence2Annotator({**FAST, "tasks": ["od"]})(photo_batch))
    first = table_to_records(annotated)
    for a, b in zip(again, first):
        od = [r for r in b["regions"] if r["kind"] == "object" and r["brief"] is None]
        strip = lambda rs: [{**r, "source": {**r["source"], "params_hash": None}} for r in rs]  # noqa: E731
        assert strip(a["regions"]) == strip(od)  # params differ (tasks), the annotations do not


def test_bad_image_is_recorded_and_batch_goes_on(stage, photo_batch):
    images = photo_batch.column(IMAGE_BYTES_COLUMN).to_pylist()
    images[1] = b"not an image"
    batch = photo_batch.set_column(
        photo_batch.column_names.index(IMAGE_BYTES_COLUMN), IMAGE_BYTES_COLUMN, pa.array(images, pa.binary())
    )
    st = Florence2Annotator({**FAST, "tasks": ["caption"], "max_new_tokens": 8})
    records = table_to_records(st(batch))
    assert [len(r["errors"]) for r in records] == [0, 1, 0, 0]
    assert records[1]["errors"][0]["stage"] == "decode" and "UnidentifiedImageError" in records[1]["errors"][0]["error"]
    assert [len(r["texts"]) for r in records] == [1, 0, 1, 1]


def test_grounding_uses_an_existing_kept_brief_caption(stage, photos, monkeypatch):
    data = photos["chelsea"]
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    rec = empty_record({"image_id": "chelsea-id", "uri": "chelsea", "width": w, "height": h, "source": "test"})
    human = source_of("human")
    rec["texts"] = [
        new_annotation(human, ann_id="t-dropped", tier="brief", text="a dropped caption") | {"status": "dropped", "reason": "x:y"},
        new_annotation(human, ann_id="t-kept", tier="brief", text="A cat lying on a red blanket"),
    ]
    table = records_to_table([rec]).append_column(IMAGE_BYTES_COLUMN, pa.array([data], pa.binary()))
    st = Florence2Annotator({**FAST, "tasks": ["phrase_grounding"], "max_new_tokens": 16})
    st.ensure_setup()
    seen = []
    real_generate = st.florence.generate_scored

    def spy(images, task, text_inputs=None, **kw):
        seen.append((task, text_inputs))
        return real_generate(images, task, text_inputs, **kw)

    monkeypatch.setattr(st.florence, "generate_scored", spy)
    out = table_to_records(st(table))[0]
    assert seen == [("<CAPTION_TO_PHRASE_GROUNDING>", ["A cat lying on a red blanket"])]
    assert out["errors"] == [] and all(g["text_ann_id"] == "t-kept" for g in out["groundings"])
    validate_table(records_to_table([out]))


def test_failing_image_in_a_generate_chunk_is_isolated(tmp_path, photos):
    """A prompt too long for the model fails the batched generate; the retry image by image
    records the error on that record only and still annotates the other."""
    cfg = tmp_path / "florence_short.json"
    cfg.write_text('{"preset": "tiny", "text": {"max_position_embeddings": 32}}')
    records, blobs = [], []
    for name, caption in (("coffee", "a cup"), ("chelsea", "a gray cat lying on a red blanket next to a toy")):
        with Image.open(io.BytesIO(photos[name])) as im:
            w, h = im.size
        rec = empty_record({"image_id": name + "-id", "uri": name, "width": w, "height": h, "source": "test"})
        rec["texts"] = [new_annotation(source_of("human"), ann_id=name + "-t", tier="brief", text=caption)]
        records.append(rec)
        blobs.append(photos[name])
    table = records_to_table(records).append_column(IMAGE_BYTES_COLUMN, pa.array(blobs, pa.binary()))
    st = Florence2Annotator({**FAST, "model": f"random:{cfg}", "tasks": ["phrase_grounding"], "max_new_tokens": 8})
    short, long = table_to_records(st(table))
    assert short["errors"] == []
    assert len(long["errors"]) == 1 and "exceeds the model's 32 positions" in long["errors"][0]["error"]


def test_params_are_validated():
    with pytest.raises(ValueError, match="tasks"):
        Florence2Annotator({"tasks": ["region_proposal"]})
    with pytest.raises(ValueError, match="Extra inputs"):
        Florence2Annotator({"beams": 3})
    assert Florence2Annotator().params.tasks == list(STAGE_TASKS)
    assert Florence2Annotator().resources.batch_size == 4


# ---------------------------------------------------------------------- mapping
W, H = 451, 300  # chelsea's size: non-square, so x and y scale differently
LOC = lambda *ks: "".join(f"<loc_{k}>" for k in ks)  # noqa: E731


def px(k: int, size: int) -> int:
    """Where the official decoder puts location bin k (docs/florence2.md §2): the bin centre, cast to int."""
    return int((k + 0.5) * size / 1000)


def box_px(x0, y0, x1, y1) -> list[float]:
    return [float(px(x0, W)), float(px(y0, H)), float(px(x1, W)), float(px(y1, H))]


# generated text -> the annotations the stage must write, worked out by hand from the sequence
MAPPING_CASES = {
    "<CAPTION>": ("</s><s>A cat lying on a red blanket.</s>", [("brief", "A cat lying on a red blanket.")]),
    "<DETAILED_CAPTION>": ("</s><s>The image shows a gray cat. It lies on a blanket.</s>",
                           [("detailed", "The image shows a gray cat. It lies on a blanket.")]),
    "<MORE_DETAILED_CAPTION>": ("</s><s>A tabby cat with green eyes lies on a red blanket, looking left.</s>",
                                [("more_detailed", "A tabby cat with green eyes lies on a red blanket, looking left.")]),
    # cat has two boxes; "dog" has an inverted box (x1 < x0): Florence-2 garbage, skipped
    "<OD>": ("</s><s>cat" + LOC(10, 20, 300, 400) + LOC(500, 100, 999, 999) + "blanket" + LOC(0, 600, 999, 999)
             + "dog" + LOC(700, 10, 600, 50) + "</s>",
             [("object", "cat", None, box_px(10, 20, 300, 400), None),
              ("object", "cat", None, box_px(500, 100, 999, 999), None),
              ("object", "blanket", None, box_px(0, 600, 999, 999), None)]),
    "<DENSE_REGION_CAPTION>": ("</s><s>a gray tabby cat" + LOC(120, 50, 880, 990) + "a red blanket" + LOC(0, 700, 999, 999) + "</s>",
                               [("object", "a gray tabby cat", "a gray tabby cat", box_px(120, 50, 880, 990), None),
                                ("object", "a red blanket", "a red blanket", box_px(0, 700, 999, 999), None)]),
    "<OCR_WITH_REGION>": ("</s><s>STOP" + LOC(100, 100, 400, 110, 398, 200, 101, 190)
                          + "EXIT 12" + LOC(500, 500, 900, 500, 900, 700, 500, 700) + "</s>",
                          [("text", "STOP", None, [45.0, 30.0, 180.0, 60.0],  # the quad's extent
                            box_px(100, 100, 400, 110) + box_px(398, 200, 101, 190)),
                           ("text", "EXIT 12", None, [225.0, 150.0, 406.0, 210.0],
                            box_px(500, 500, 900, 500) + box_px(900, 700, 500, 700))]),
}


def _record(image_id: str = "img-1") -> dict:
    return empty_record({"image_id": image_id, "uri": "x", "width": W, "height": H, "source": "test"})


@pytest.mark.parametrize("task", list(MAPPING_CASES))
def test_mapping_of_hand_written_generations(stage, task):
    """What the stage writes for a generated sequence, in pixels of a non-square image; expected values
    are worked out from the sequence (bin centres), not taken from the parser the stage calls."""
    text, want = MAPPING_CASES[task]
    rec = _record()
    added = stage.annotate_from_text(rec, task, text)
    validate_table(records_to_table([rec]))
    if task.endswith("CAPTION>") and "REGION" not in task:
        assert [(t["tier"], t["text"]) for t in rec["texts"]] == want and added == rec["texts"]
        return
    assert [(r["kind"], r["label"], r["brief"], r["box"], r["quad"]) for r in rec["regions"]] == want
    assert added == rec["regions"] and len({r["ann_id"] for r in added}) == len(added)


def test_grounding_mapping_of_a_hand_written_generation(stage):
    task = "<CAPTION_TO_PHRASE_GROUNDING>"
    caption_text = "A cat lies on a red blanket next to a cat toy"
    text = (
        "</s><s>A cat" + LOC(10, 20, 300, 400) + "a red blanket" + LOC(0, 600, 999, 999) + LOC(0, 500, 400, 999)
        + "a dog" + LOC(1, 1, 50, 50) + "A CAT" + LOC(600, 600, 700, 700) + "</s>"
    )
    rec = _record()
    caption = stage.annotate_from_text(rec, "<CAPTION>", "</s><s>" + caption_text + "</s>")[0]
    added = stage.annotate_from_text(rec, task, text, caption)
    validate_table(records_to_table([rec]))
    # "a dog" is not in the caption: skipped; "A CAT" matches the second "cat" case-insensitively
    assert [(g["phrase"], g["char_start"], g["char_end"], g["box"]) for g in added] == [
        ("A cat", 0, 5, box_px(10, 20, 300, 400)),
        ("a red blanket", 14, 27, box_px(0, 600, 999, 999)),
        ("a red blanket", 14, 27, box_px(0, 500, 400, 999)),
        ("a cat", 36, 41, box_px(600, 600, 700, 700)),
    ]
    assert all(g["text_ann_id"] == caption["ann_id"] for g in added)
    assert len({g["ann_id"] for g in added}) == 4


def test_find_phrase_goes_forward():
    assert find_phrase("a dog and a dog", "a dog", 0) == (0, 5)
    assert find_phrase("a dog and a dog", "a dog", 5) == (10, 15)
    assert find_phrase("a dog and a dog", "a dog", 11) is None


def test_location_token_debris_is_not_a_label():
    """A barely-trained model emits `loc_200>` fragments; they must not become categories."""
    from annotators.florence2 import Florence2Annotator
    from schemas.records import source_of

    stage = Florence2Annotator({"model": "random:tiny"})
    stage._source = source_of("florence2")
    rec = {"image_id": "x", "width": 100, "height": 100}
    answer = {"bboxes": [[1, 1, 50, 50], [2, 2, 60, 60]], "labels": ["loc_200>", "dog"]}
    assert [r["label"] for r in stage.regions_from_answer(rec, "od", answer)] == ["dog"]
