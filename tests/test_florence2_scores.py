"""The model's own confidence per parsed Florence-2 instance (annotators/florence2_scores.py).

Hand-made sequences with known per-token log-probs check which tokens each instance is scored on;
the tiny random model checks that generate's log-probs are the model's (teacher-forced forward,
greedy and beam search) and that the stage writes them as scores (never a default 1.0).
"""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from annotators.florence2 import Florence2Annotator
from annotators.florence2_model import Florence2Model
from annotators.florence2_scores import from_generation, instance_scores
from engine.stage import table_to_records


@pytest.fixture(scope="module")
def florence():
    torch.set_num_threads(1)
    return Florence2Model.load("random:tiny", device="cpu")


def _generated(florence, text: str, logprob_of):
    """Token ids of `</s><s>` + text + `</s>` (as generate makes them, after the decoder start) with
    the log-prob logprob_of(token string) for each token."""
    tok = florence.processor.tokenizer
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    tokens = tok.convert_ids_to_tokens(ids)
    pad = [tok.pad_token_id] * 3  # batch padding after </s> is cut off
    lps = [logprob_of(t) for t in tokens] + [-50.0] * 3
    return from_generation(florence.processor.post_processor, ids + pad, lps, tok.eos_token_id, tok.pad_token_id,
                           florence.processor.decode(ids, skip_special_tokens=False)), tokens


def test_od_box_score_is_its_category_and_loc_tokens(florence):
    # "dog" tokens certain-ish, the dog's 4 locs at log 0.5; the cat's tokens at log 0.1
    text = "dog<loc_1><loc_2><loc_3><loc_4>cat<loc_5><loc_6><loc_7><loc_8><loc_9><loc_10><loc_11><loc_12>"
    # (this tokenizer splits "dog" into d + og and "cat" into c + at)
    lp = {"d": math.log(0.9), "og": math.log(0.9), "c": math.log(0.1), "at": math.log(0.1), "<loc_1>": math.log(0.5), "<loc_2>": math.log(0.5),
          "<loc_3>": math.log(0.5), "<loc_4>": math.log(0.5)}
    gen, tokens = _generated(florence, text, lambda t: lp.get(t, math.log(0.8)))
    answer = florence.parse(gen.text, "<OD>", (100, 100))["<OD>"]
    assert answer["labels"] == ["dog", "cat", "cat"]  # transformers parses; we only score
    scores = instance_scores(gen, "description_with_bboxes", 3)
    assert scores[0] == pytest.approx((0.9**2 * 0.5**4) ** (1 / 6))
    assert scores[1] == pytest.approx((0.1**2 * 0.8**4) ** (1 / 6))  # the cat's first box: its own 4 locs
    assert scores[2] == pytest.approx((0.1**2 * 0.8**4) ** (1 / 6))  # second box shares the category tokens
    # the caption-style whole-sequence score: text tokens + </s>, not the forced <s> nor the padding
    assert gen.ended and len(gen.logprobs) == len(tokens)
    # a mismatch with the parser's count falls back to the sequence's score, never 1.0
    assert instance_scores(gen, "description_with_bboxes", 4) == [gen.sequence_score] * 4
    assert 0 < gen.sequence_score < 1


def test_ocr_and_grounding_alignment(florence):
    quad = "".join(f"<loc_{i}>" for i in range(1, 9))
    gen, _ = _generated(florence, f"STOP{quad}EXIT{quad}", lambda t: math.log(0.2) if t in "EXIT" else math.log(0.6))
    assert len(florence.parse(gen.text, "<OCR_WITH_REGION>", (100, 100))["<OCR_WITH_REGION>"]["labels"]) == 2
    stop, exit_ = instance_scores(gen, "ocr", 2)
    assert stop == pytest.approx(0.6) and exit_ < 0.6

    text = "a dog<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8> a ball<loc_9><loc_10><loc_11><loc_12>"
    gen, _ = _generated(florence, text, lambda t: math.log(0.3) if t in ("<loc_5>", "<loc_6>") else math.log(0.9))
    inst = florence.processor.post_processor(text=gen.text, image_size=(100, 100), parse_tasks=["phrase_grounding"])
    assert [len(i["bbox"]) for i in inst["phrase_grounding"]] == [2, 1]
    (dog1, dog2), (ball,) = instance_scores(gen, "phrase_grounding", 2)
    assert dog1 == pytest.approx(0.9) and ball == pytest.approx(0.9) and dog2 < 0.9


@pytest.mark.parametrize("beams", [1, 2])
def test_generated_logprobs_are_the_models(florence, beams):
    """Teacher-force the generated sequence: the model's log-softmax of each chosen token (under the
    same token suppression) is the log-prob generate reported, greedy and beam search alike."""
    im = Image.new("RGB", (80, 64), (120, 30, 200))
    (gen,) = florence.generate_scored([im], "<OD>", max_new_tokens=12, num_beams=beams,
                                         no_repeat_ngram_size=0)  # its bans renormalise the rest: compared without
    tok = florence.processor.tokenizer
    seq = [florence.model.config.text_config.decoder_start_token_id] + gen.ids
    inputs = florence.processor(text=["<OD>"], images=[im], return_tensors="pt")
    with torch.no_grad():
        logits = florence.model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                decoder_input_ids=torch.tensor([seq[:-1]])).logits[0]
    n_tokens, vocab = len(tok), logits.shape[-1]
    logits[:, n_tokens:vocab] = -math.inf  # what generate suppresses
    expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0].tolist()
    assert len(gen.logprobs) == len(expected)
    chosen = [i for i, lp in enumerate(gen.logprobs) if lp != 0.0]  # forced <s> (and </s> at max length): log-prob 0
    assert len(chosen) >= len(expected) - 2
    assert [gen.logprobs[i] for i in chosen] == pytest.approx([expected[i] for i in chosen], abs=2e-3)


def test_the_stage_writes_the_models_confidence(photo_batch):
    torch.set_num_threads(1)
    st = Florence2Annotator({"model": "random:tiny", "tasks": ["caption", "od"], "max_new_tokens": 64, "num_beams": 1})
    recs = table_to_records(st(photo_batch))
    texts = [t for r in recs for t in r["texts"]]
    regions = [a for r in recs for a in r["regions"]]
    assert texts and regions
    for ann in texts + regions:
        assert ann["score"] is not None and 0 < ann["score"] < 1, ann  # the random model is unsure; never 1.0
    assert len({round(a["score"], 6) for a in regions}) > 1  # per box, not one value per sequence
