"""What a caption's dependency parse counts: objects, attributes, actions and their complexity.

One home for these definitions (filters/text.py documents them): the text filter (stage 2) decides on
them and `fld stats` (engine/views/fld5b.py) reports FLD-5B Table 3 with them, so neither imports the other.
Works on any spaCy Doc; imports nothing of ours.
"""
from __future__ import annotations

from dataclasses import dataclass

ATTRIBUTE_DEPS = frozenset({"amod", "acomp", "compound"})
OBJECT_POS = frozenset({"NOUN", "PROPN"})
NON_ACTION_LEMMAS = frozenset({"be"})


@dataclass(frozen=True)
class TextStats:
    """What the parse says about one caption."""

    tokens: int
    objects: int
    attributes: int
    actions: int
    proper_nouns: int
    object_complexity: float
    action_complexity: float


def degree(token) -> int:
    """Undirected degree in the dependency tree, punctuation edges left out."""
    children = sum(1 for c in token.children if not c.is_punct and not c.is_space)
    return children + (0 if token.head.i == token.i else 1)


def _aggregate(values: list[int], how: str) -> float:
    if not values:
        return 0.0
    return float(max(values)) if how == "max" else sum(values) / len(values)


def text_stats(doc, aggregate: str = "mean") -> TextStats:
    """Objects, attributes, actions and complexity of one parsed caption (a spaCy Doc)."""
    objects = [t for t in doc if t.pos_ in OBJECT_POS and t.dep_ != "compound"]
    attributes = [t for t in doc if t.pos_ == "ADJ" or t.dep_ in ATTRIBUTE_DEPS]
    actions = [t for t in doc if t.pos_ == "VERB" and t.lemma_.lower() not in NON_ACTION_LEMMAS]
    return TextStats(
        tokens=sum(1 for t in doc if not t.is_punct and not t.is_space),
        objects=len(objects),
        attributes=len(attributes),
        actions=len(actions),
        proper_nouns=sum(1 for t in doc if t.pos_ == "PROPN"),
        object_complexity=_aggregate([degree(t) for t in objects], aggregate),
        action_complexity=_aggregate([degree(t) for t in actions], aggregate),
    )
