"""spaCy noun chunks with exact character spans, and the groundability helpers."""
from __future__ import annotations

import pytest

from annotators.phrases import GROUNDING_BLACKLIST, groundable_chunks, is_blacklisted, noun_chunks
from engine.models import load_spacy

SENTENCES = [
    "A woman in a red dress is holding an umbrella next to the image of her dog.",
    "It is a cat sitting on a wooden table.",
    "They look at it.",
    "",
]


def test_load_spacy_is_cached_real_pipeline():
    nlp = load_spacy()
    assert nlp is load_spacy()
    assert "parser" in nlp.pipe_names  # noun chunks need the dependency parse


def test_load_spacy_unknown_name_names_the_packages():
    with pytest.raises(OSError, match="no_such_spacy_model"):
        load_spacy("no_such_spacy_model")


def test_noun_chunks_hand_checked_spans():
    got = noun_chunks(SENTENCES)
    assert got[0] == [
        ("A woman", 0, 7),
        ("a red dress", 11, 22),
        ("an umbrella", 34, 45),
        ("the image", 54, 63),
        ("her dog", 67, 74),
    ]
    assert got[1] == [("It", 0, 2), ("a cat", 6, 11), ("a wooden table", 23, 37)]
    assert got[2] == [("They", 0, 4), ("it", 13, 15)]
    assert got[3] == []
    for text, per_text in zip(SENTENCES, got):
        for chunk, start, end in per_text:
            assert text[start:end] == chunk


def test_noun_chunks_rejects_non_text():
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        noun_chunks(["a dog", None])  # type: ignore[list-item]


def test_groundable_chunks_skip_pronouns_configurably():
    kept = groundable_chunks(SENTENCES[:3])
    assert [c.text for c in kept[1]] == ["a cat", "a wooden table"]
    assert kept[2] == []
    # "her dog" has a noun: groundable even though it starts with a pronoun
    assert "her dog" in [c.text for c in kept[0]]
    with_pronouns = groundable_chunks(SENTENCES[:3], skip_pronouns=False)
    assert [c.text for c in with_pronouns[2]] == ["They", "it"]
    no_blacklisted = groundable_chunks(SENTENCES[:1], blacklist=GROUNDING_BLACKLIST)
    assert "the image" not in [c.text for c in no_blacklisted[0]]


def test_is_blacklisted_text_only():
    assert is_blacklisted("The  Image")
    assert is_blacklisted("a group")
    assert is_blacklisted("They")
    assert is_blacklisted("  ")
    assert not is_blacklisted("a red dress")
    assert not is_blacklisted("her dog")
