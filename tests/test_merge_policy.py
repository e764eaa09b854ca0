"""refine.merge on hand-made rounds (records built by hand, no model): each case is one rule of the
policy in docs/refine-merge.md."""
from __future__ import annotations

import pytest

from refine.merge import AGREEMENT, CONFIRMED, OWN_SCORE, MergePolicy, merge_record
from schemas.records import ANNOTATION_KINDS, new_annotation, source_of

SPECIALIST = source_of("detect", "opencv-ssd:mobilenet_v2_coco")
CAPTIONER = source_of("florence2", "random:tiny")
ROUND1 = source_of("refine", "models/round1")
ROUND2 = source_of("refine", "models/round2")
HUMAN = source_of("human")
POLICY = MergePolicy(nms_iou=0.7)


def region(src, name, box, label="dog", score=0.9, round_=0, kind="object"):
    ann = new_annotation(src, score, ann_id=name, kind=kind, box=box, quad=None, polygon=None, mask=None,
                         label=label, brief=None)
    ann["round"] = round_
    return ann


def text(src, name, words, tier="brief", score=None, round_=0, status="kept"):
    ann = new_annotation(src, score, ann_id=name, tier=tier, text=words)
    ann["round"] = round_
    if status != "kept":
        ann.update(status=status, reason="text_filter:too_few_objects")
    return ann


def grounding(src, name, caption, phrase, box, round_=0):
    start = caption["text"].index(phrase)
    ann = new_annotation(src, 0.5, ann_id=name, text_ann_id=caption["ann_id"], phrase=phrase, char_start=start,
                         char_end=start + len(phrase), box=box, mask=None)
    ann["round"] = round_
    return ann


def record(regions=(), texts=(), groundings=()):
    return {"image_id": "img", "width": 200, "height": 200, "regions": list(regions), "texts": list(texts),
            "groundings": list(groundings), "errors": []}


def merged(old, new):
    out = merge_record(old, new, POLICY)
    for ann in (a for kind in ANNOTATION_KINDS for a in out[kind]):
        flags = [k for k in ("merge.new", "merge.kept", "merge.replaced") if ann["checks"].get(k) == 1.0]
        assert len(flags) == 1, ann  # exactly one of new / kept / replaced
    return {a["ann_id"]: a for kind in ANNOTATION_KINDS for a in out[kind]}


def test_newer_round_wins_a_tie_only_when_at_least_as_confident():
    """Round 2 against round 1's model box on the same object: the old box stays when the new one is
    less sure; the newer round takes it on an equal or higher confidence (the bug of issue 17: the
    old one won every tie)."""
    old = record([region(ROUND1, "r1", [10, 10, 60, 60], score=0.6, round_=1)])
    less = merged(old, record([region(ROUND2, "r2", [11, 10, 60, 61], score=0.5, round_=2)]))
    assert less["r1"]["status"] == "kept" and less["r2"]["reason"] == "merge:outscored"
    for score in (0.6, 0.8):
        old = record([region(ROUND1, "r1", [10, 10, 60, 60], score=0.6, round_=1)])
        out = merged(old, record([region(ROUND2, "r2", [11, 10, 60, 61], score=score, round_=2)]))
        assert out["r2"]["status"] == "kept" and out["r1"]["reason"] == "merge:replaced"
        assert out["r1"]["checks"]["merge.replaced"] == 1.0
        # two rounds of one model are no independent evidence: nobody's score is raised
        assert out["r2"]["score"] == score and CONFIRMED not in out["r2"]["checks"]


def test_model_box_agreeing_with_a_specialist_raises_the_kept_score():
    old = record([region(SPECIALIST, "s", [10, 10, 60, 60], score=0.8)])
    out = merged(old, record([region(ROUND1, "m", [12, 10, 60, 62], score=0.5, round_=1)]))
    s, m = out["s"], out["m"]
    assert s["status"] == "kept" and m["reason"] == "merge:outscored"  # the more confident box is kept
    assert s["score"] == pytest.approx(1 - 0.2 * 0.5)  # noisy-OR of the two producers' own scores
    assert s["checks"][OWN_SCORE] == 0.8 and s["checks"][CONFIRMED] == 1.0
    assert s["checks"][AGREEMENT] == m["checks"][AGREEMENT] > 0.9
    # a second round confirming again recomputes from own scores: the score never compounds
    again = merged(record([s]), record([region(ROUND2, "m2", [12, 10, 60, 62], score=0.5, round_=2)]))
    assert again["s"]["score"] == pytest.approx(0.9)
    # another label at the same place is a conflict, not an agreement: no raise
    other = merged(record([region(SPECIALIST, "s", [10, 10, 60, 60], score=0.8)]),
                   record([region(ROUND1, "m", [12, 10, 60, 62], label="cat", score=0.5, round_=1)]))
    assert other["s"]["score"] == 0.8 and CONFIRMED not in other["s"]["checks"]


def test_model_box_nobody_else_has_is_added_with_its_own_score():
    old = record([region(SPECIALIST, "s", [10, 10, 60, 60], score=0.8)])
    out = merged(old, record([region(ROUND1, "ball", [120, 120, 180, 180], label="ball", score=0.35, round_=1)]))
    ball = out["ball"]
    assert ball["status"] == "kept" and ball["score"] == 0.35 and ball["checks"][AGREEMENT] == 0.0
    assert ball["checks"]["merge.new"] == 1.0 and out["s"]["status"] == "kept"


def test_unscored_model_box_never_counts_as_certain():
    """Issue 17: a model box without a score counted 1.0 and replaced perfect specialist boxes."""
    old = record([region(SPECIALIST, "s", [10, 10, 60, 60], score=0.3)])
    out = merged(old, record([region(ROUND1, "m", [10, 10, 60, 61], score=None, round_=1)]))
    assert out["s"]["status"] == "kept" and out["m"]["reason"] == "merge:outscored"


def test_duplicates_among_old_annotations_have_their_own_reason():
    old = record([region(SPECIALIST, "a", [10, 10, 60, 60], score=0.9), region(CAPTIONER, "b", [11, 11, 60, 60], label="puppy", score=0.7)])
    out = merged(old, record())
    assert out["a"]["status"] == "kept"
    assert out["b"]["reason"] == "merge:duplicate"  # not merge:replaced: refinement did not replace it
    assert out["b"]["checks"]["merge.kept"] == 1.0


def test_human_annotations_are_never_dropped():
    old = record([region(HUMAN, "h", [10, 10, 60, 60], score=None), region(HUMAN, "h2", [11, 10, 60, 60], score=None)],
                 [text(HUMAN, "ht", "a dog")])
    new = record([region(ROUND1, "m", [10, 10, 61, 60], score=0.99, round_=1)],
                 [text(ROUND1, "mt", "a dog on grass", score=0.9, round_=1)])
    out = merged(old, new)
    assert out["h"]["status"] == out["h2"]["status"] == out["ht"]["status"] == "kept"
    assert out["m"]["reason"] == "merge:human_kept" and out["mt"]["status"] == "kept"


def test_captions_are_compared_by_agreement_with_the_kept_regions():
    regions = [region(SPECIALIST, "dog", [10, 10, 60, 60]), region(SPECIALIST, "ball", [120, 120, 180, 180], label="ball")]
    # the old caption names a category nobody kept (a cat box was dropped by a filter)
    cat = region(SPECIALIST, "cat", [70, 10, 110, 60], label="cat")
    cat.update(status="dropped", reason="region_filter:low_score")
    old_caption = text(CAPTIONER, "old", "a cat next to a dog")
    new_caption = text(ROUND1, "new", "a dog with a ball", score=0.2, round_=1)
    out = merged(record(regions + [cat], [old_caption]), record([], [new_caption]))
    assert out["new"]["status"] == "kept" and out["old"]["reason"] == "merge:replaced"
    assert out["new"]["checks"]["merge.caption_agreement"] == 1.0 and out["old"]["checks"]["merge.caption_agreement"] == 0.5

    # the other way round: a new caption that names what is not there loses, even though confident
    old_caption = text(CAPTIONER, "old", "a dog with a ball")
    new_caption = text(ROUND1, "new", "a cat", score=0.99, round_=1)
    out = merged(record(regions + [cat], [old_caption]), record([], [new_caption]))
    assert out["old"]["status"] == "kept" and out["new"]["reason"] == "merge:outscored"


def test_equal_caption_agreement_goes_to_the_more_confident_and_groundings_follow():
    box = [10, 10, 60, 60]
    old_caption = text(ROUND1, "old", "a dog", score=0.7, round_=1)
    old_g = grounding(ROUND1, "old-g", old_caption, "a dog", box, round_=1)
    new_caption = text(ROUND2, "new", "a dog", score=0.4, round_=2)
    new_g = grounding(ROUND2, "new-g", new_caption, "a dog", box, round_=2)
    out = merged(record([region(SPECIALIST, "dog", box)], [old_caption], [old_g]), record([], [new_caption], [new_g]))
    # equal agreement (grounded box matches, "dog" named and kept), the old caption is surer: it stays
    # with its grounding, the new one and its grounding go
    assert out["old"]["status"] == "kept" and out["old-g"]["status"] == "kept"
    assert out["new"]["reason"] == "merge:outscored" and out["new-g"]["reason"] == "merge:caption_dropped"
    # at least as confident: the newer round's caption takes over, groundings follow their captions
    new_caption["score"], new_caption["status"], new_caption["reason"] = 0.7, "kept", None
    new_g.update(status="kept", reason=None)
    old_caption.update(status="kept", reason=None)
    old_g.update(status="kept", reason=None)
    out = merged(record([region(SPECIALIST, "dog", box)], [old_caption], [old_g]), record([], [new_caption], [new_g]))
    assert out["new"]["status"] == "kept" and out["new-g"]["status"] == "kept"
    assert out["old"]["reason"] == "merge:replaced" and out["old-g"]["reason"] == "merge:replaced"


def test_a_new_caption_dropped_by_a_filter_never_competes():
    old_caption = text(CAPTIONER, "old", "a dog")
    new_caption = text(ROUND1, "new", "garbage", score=0.99, round_=1, status="dropped")
    out = merged(record([], [old_caption]), record([], [new_caption]))
    assert out["old"]["status"] == "kept" and out["new"]["status"] == "dropped"


def test_a_caption_naming_an_object_the_image_lacks_is_penalised_by_the_rounds_vocabulary():
    """Mention precision counts every category the round trained on, not only the image's own: a confident
    new caption that hallucinates a tree (a training category, no region of it here) loses to the old caption;
    without the vocabulary the tree went unnoticed and the hallucination won."""
    from refine.merge import MergeStage, caption_agreement

    dog = region(SPECIALIST, "dog", [10, 10, 60, 60])
    hallucinating = text(ROUND1, "new", "a dog under two Trees", score=0.95, round_=1)
    assert caption_agreement(hallucinating, [], [dog]) == 1.0  # the image's categories only: the tree is invisible
    assert caption_agreement(hallucinating, [], [dog], frozenset({"dog", "tree", "traffic light"})) == pytest.approx(2 / 3)
    assert caption_agreement(text(ROUND1, "x", "a Traffic Lights pole"), [], [dog], frozenset({"traffic light"})) == 0.0

    def run(vocabulary):
        old = record([region(SPECIALIST, "dog", [10, 10, 60, 60])], [text(CAPTIONER, "old", "a dog", score=0.3)])
        new = record([], [text(ROUND1, "new", "a dog under two Trees", score=0.95, round_=1)])
        stage = MergeStage({"vocabulary": vocabulary})
        import json as _json
        from refine.relabel import PREVIOUS
        rec = {**new, PREVIOUS: _json.dumps({k: old.get(k) or [] for k in (*ANNOTATION_KINDS, "errors")})}
        (out,) = stage.process_batch([rec])
        return {t["ann_id"]: (t["status"], t["reason"]) for t in out["texts"]}

    assert run([]) == {"old": ("dropped", "merge:replaced"), "new": ("kept", None)}
    assert run(["Dog", "tree"]) == {"old": ("kept", None), "new": ("dropped", "merge:outscored")}


def test_the_round_records_the_categories_it_trained_on():
    from refine.trainer import target_categories

    assert target_categories("cross<loc_1><loc_2><loc_3><loc_4>Traffic  light<loc_5><loc_6><loc_7><loc_8>cross"
                             "<loc_9><loc_9><loc_20><loc_20>") == {"cross", "traffic light"}


def test_a_short_caption_does_not_outscore_a_complete_one():
    """Mention F1, not precision alone: "a dog" names one of three kept objects (precision 1, coverage 1/3);
    the complete old caption keeps its place although the new one is surer (measured in the stage-3
    benchmark: precision alone let short model captions replace complete stage-2 ones)."""
    from refine.merge import caption_agreement

    regions = [region(SPECIALIST, "dog", [10, 10, 60, 60]), region(SPECIALIST, "ball", [120, 120, 180, 180], label="ball"),
               region(SPECIALIST, "bench", [0, 100, 200, 200], label="bench")]
    complete = text(CAPTIONER, "old", "a dog with a ball on a bench", score=0.3)
    short = text(ROUND1, "new", "a dog", score=0.99, round_=1)
    assert caption_agreement(complete, [], regions) == 1.0 and caption_agreement(short, [], regions) == 0.5
    out = merged(record(regions, [complete]), record([], [short]))
    assert out["old"]["status"] == "kept" and out["new"]["reason"] == "merge:outscored"
    # a caption that names nothing although objects were kept has no coverage: 0, not undefined
    assert caption_agreement(text(ROUND1, "x", "a photo"), [], regions) == 0.0
    assert caption_agreement(text(ROUND1, "x", "a photo"), [], []) is None
