"""The simulated captioner's own grammar: how `sim_captioner` words the scene it believes it sees.

Not the truth's sentence template (language.brief_caption / detailed_caption): its own opening
sentences, its own words for the background (synonyms, sometimes the wrong colour), its own verbs
and position phrases (sometimes the wrong place, the wrong relation, a verb that does not agree
with its subject). Only the noun phrase of an object ("a large red ball", "two green stars") and
the relation clause ("the red ball is to the left of the blue box") are the world's language
(language.mention_text, language.RELATIONS), so the metrics' parser reads the mentions back: a
caption that names the right objects differs from the truth in its wording, one that names the
wrong ones differs in its content, and token F1 no longer mixes the two (metrics.py reports the
floor: the F1 of a caption whose every object is wrong).

Every choice is drawn from the `rng` the stage passes (seed, stage, file name): deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.quality.language import NUMBERS, RELATIONS, Group, mention_text, relation

# The captioner's words for the world's backgrounds: no word of the object vocabulary (COLOURS,
# CATEGORIES), so a background is never read as an object mention.
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "grey": ("gray", "silver"), "beige": ("cream", "sand"), "teal": ("turquoise", "petrol"), "brown": ("tan", "chocolate"),
}
PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "flat"), "striped": ("stripy", "lined"), "checked": ("checkered", "tiled"),
    "speckled": ("dotted", "grainy"),
}
BRIEF_TEMPLATES = (
    "A picture of {objects}.",
    "{Objects} against a {background} backdrop.",
    "This photo contains {objects}.",
    "{Objects}, seen on a {background} surface.",
)
OPENINGS = (
    "In this picture we can see {number} item{s} over a {background} backdrop.",
    "This photo contains {number} shape{s} on a {background} surface.",
    "A {background} backdrop with {number} thing{s} on it.",
)
VERBS = (("is placed", "are placed"), ("can be seen", "can be seen"), ("appears", "appear"), ("is located", "are located"))
POSITIONS = {  # (column, row) in thirds -> the captioner's phrase
    (0, 0): "near the top left corner", (1, 0): "along the top", (2, 0): "near the top right corner",
    (0, 1): "towards the left", (1, 1): "around the middle", (2, 1): "towards the right",
    (0, 2): "near the bottom left corner", (1, 2): "along the bottom", (2, 2): "near the bottom right corner",
}
FLIPPED = dict(zip(RELATIONS, ("to the right of", "to the left of", "below", "above")))


@dataclass(frozen=True)
class Slips:
    """Rates of the captioner's wording errors (each per chance to make it)."""

    background: float = 0.1  # names another background colour
    position: float = 0.1  # a group's position phrase is another third of the image
    relation: float = 0.1  # a stated relation is the opposite one
    verb: float = 0.1  # the verb does not agree with its subject ("two balls is placed")


def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def background_words(background: tuple[str, str], slips: Slips, rng: np.random.Generator) -> str:
    pattern, colour = background
    if rng.random() < slips.background:
        colour = _pick([c for c in BACKGROUND_WORDS if c != colour], rng)
    pattern_word = _pick(PATTERN_WORDS.get(pattern, (pattern,)), rng)
    return f"{pattern_word} {_pick(BACKGROUND_WORDS.get(colour, (colour,)), rng)}"


def _list(groups: list[Group]) -> str:
    names = [mention_text(g) for g in groups]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def position_phrase(centre: tuple[float, float], width: int, height: int, slips: Slips, rng: np.random.Generator) -> str:
    cell = (min(2, int(3 * centre[0] / width)), min(2, int(3 * centre[1] / height)))
    if rng.random() < slips.position:
        cell = _pick([c for c in POSITIONS if c != cell], rng)
    return POSITIONS[cell]


def brief(groups: list[Group], background: tuple[str, str], slips: Slips, rng: np.random.Generator, max_groups: int = 3) -> str:
    words = background_words(background, slips, rng)
    if not groups:
        return f"An empty {words} backdrop."
    template = _pick(BRIEF_TEMPLATES, rng)
    objects = _list(groups[:max_groups])
    return template.format(objects=objects, Objects=_cap(objects), background=words)


def detailed(groups: list[Group], background: tuple[str, str], width: int, height: int, slips: Slips,
             rng: np.random.Generator, max_relations: int = 2) -> str:
    n = sum(g.count for g in groups)
    parts = [_pick(OPENINGS, rng).format(number=NUMBERS[n] if n < len(NUMBERS) else "many", s="s" if n != 1 else "",
                                         background=background_words(background, slips, rng))]
    for g in groups:
        if g.category == "sign":
            for oid, text in zip(g.object_ids, g.texts):
                sign = mention_text(Group(g.category, g.colour, (oid,), g.size))
                parts.append(_pick((f'There is {sign} with the text "{text}".', f'{_cap(sign)} says "{text}".'), rng))
            continue
        singular, plural = _pick(VERBS, rng)
        agrees = rng.random() >= slips.verb
        verb = (singular if g.count == 1 else plural) if agrees else (plural if g.count == 1 else singular)
        parts.append(f"{_cap(mention_text(g))} {verb} {position_phrase(g.centre, width, height, slips, rng)}.")
    singles = [g for g in groups if g.count == 1 and g.category != "sign"]
    said = 0
    for i in range(len(singles)):
        for j in range(i + 1, len(singles)):
            rel = relation(singles[i], singles[j], width, height)
            if said >= max_relations or rel is None:
                continue
            if rng.random() < slips.relation:
                rel = FLIPPED[rel]
            a, b = mention_text(singles[i], definite=True), mention_text(singles[j], definite=True)
            parts.append(f"We can see that {a} is {rel} {b}.")
            said += 1
    return " ".join(parts)


def render_caption(tier: str, groups: list[Group], background: tuple[str, str], width: int, height: int, slips: Slips,
                   rng: np.random.Generator) -> str:
    """The `tier` caption ('brief' / 'detailed') of the groups the captioner believes it sees."""
    if tier == "brief":
        return brief(groups, background, slips, rng)
    return detailed(groups, background, width, height, slips, rng)
