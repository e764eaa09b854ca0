"""The benchmark world's language: its vocabulary, the truth's caption grammar, and the parser
that reads object mentions and spatial relations back out of any caption.

Why one module for both directions: the ground-truth captions, the simulated captioner's
captions and the metrics must agree on what "a large red ball" means. The truth's captions are
rendered here from a list of object groups with one template choice per image (`style`); the
simulated captioner words its captions with its own templates (captioner.py) and shares only the
object noun phrase (`mention_text`) and the relation clause with this grammar, so the parser
reads its mentions back while its sentences differ from the truth's (metrics.py reports the
token-F1 floor that wording alone scores).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

CATEGORIES = ("ball", "box", "cone", "star", "ring", "cross", "heart", "moon", "house", "sign")
PLURALS = {c: c + ("es" if c.endswith(("x", "ss")) else "s") for c in CATEGORIES}
SINGULAR = {p: c for c, p in PLURALS.items()}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 40),
    "green": (40, 150, 55),
    "blue": (35, 75, 205),
    "yellow": (240, 210, 35),
    "orange": (245, 130, 25),
    "purple": (130, 50, 170),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SIZES = ("small", "large")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
NUMBER_VALUE = {w: i for i, w in enumerate(NUMBERS)}
RELATIONS = ("to the left of", "to the right of", "above", "below")
# Background colours and patterns share no word with the object vocabulary (no false mentions).
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "beige": (200, 185, 150),
    "teal": (60, 130, 130),
    "brown": (120, 85, 60),
}
PATTERNS = ("plain", "striped", "checked", "speckled")
VERBS_ONE = ("sits", "lies", "rests", "stands")
VERBS_MANY = ("sit", "lie", "rest", "stand")

_WORD = re.compile(r"[A-Za-z]+")
_QUOTED = re.compile(r'"[^"]*"')


@dataclass(frozen=True)
class Group:
    """Objects of one colour and category, mentioned together ("two green stars")."""

    category: str
    colour: str
    object_ids: tuple[int, ...]
    size: str | None = None  # "small" / "large" when every member has that size, else None
    centre: tuple[float, float] = (0.0, 0.0)  # mean centre of the members, pixels
    area: float = 0.0  # total visible area (salience order)
    texts: tuple[str, ...] = ()  # signs: the text each member shows, in object_ids order

    @property
    def count(self) -> int:
        return len(self.object_ids)


@dataclass(frozen=True)
class Mention:
    """An object mention parsed from a caption, with its character span."""

    category: str
    colour: str | None
    size: str | None
    count: int
    start: int
    end: int
    definite: bool = False  # "the red ball" (a reference back) vs "a red ball"


@dataclass
class Caption:
    """A rendered caption and the spans of its object mentions (-> object ids)."""

    text: str = ""
    phrases: list[dict] = field(default_factory=list)  # {phrase, char_start, char_end, object_ids}

    def add(self, piece: str) -> None:
        self.text += piece

    def mention(self, piece: str, object_ids) -> None:
        start = len(self.text)
        self.text += piece
        self.phrases.append({"phrase": piece, "char_start": start, "char_end": len(self.text),
                             "object_ids": [int(i) for i in object_ids]})


# ---------------------------------------------------------------------- rendering
def mention_text(group: Group, definite: bool = False) -> str:
    """'a large red ball', 'two green stars', 'the blue box'."""
    words = [group.colour, group.category if group.count == 1 else PLURALS[group.category]]
    if group.size and group.count == 1:
        words.insert(0, group.size)
    if group.count == 1:
        det = "the" if definite else ("an" if words[0][0] in "aeiou" else "a")
    else:
        det = NUMBERS[group.count] if group.count < len(NUMBERS) else "many"
    return " ".join([det] + words)


def _capital(caption: Caption) -> None:
    if caption.text:
        caption.text = caption.text[0].upper() + caption.text[1:]


def _join_mentions(caption: Caption, groups: list[Group], capitalise: bool) -> None:
    for i, g in enumerate(groups):
        if i:
            caption.add(" and " if i == len(groups) - 1 else ", ")
        start = len(caption.text)
        caption.mention(mention_text(g), g.object_ids)
        if capitalise and i == 0:
            caption.text = caption.text[:start] + caption.text[start].upper() + caption.text[start + 1:]
            caption.phrases[-1]["phrase"] = caption.text[start:]


def position_words(x: float, y: float, width: int, height: int) -> str:
    """Where a point is, in thirds of the image: 'in the top left', 'in the centre', ..."""
    col = ("left", "", "right")[min(2, int(3 * x / width))]
    row = ("top", "", "bottom")[min(2, int(3 * y / height))]
    if not col and not row:
        return "in the centre"
    if not col:
        return f"at the {row}"
    if not row:
        return f"on the {col}"
    return f"in the {row} {col}"


def relation(a: Group, b: Group, width: int, height: int, margin: float = 0.12) -> str | None:
    """The spatial relation of a to b, or None when their centres are too close to say."""
    dx, dy = (b.centre[0] - a.centre[0]) / width, (b.centre[1] - a.centre[1]) / height
    if max(abs(dx), abs(dy)) < margin:
        return None
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def brief_caption(groups: list[Group], background: tuple[str, str], max_groups: int = 3) -> Caption:
    """One sentence, the most salient groups: 'A large red ball and two green stars on a striped grey background.'"""
    c = Caption()
    if not groups:
        c.add(f"An empty {background[0]} {background[1]} background.")
        return c
    _join_mentions(c, groups[:max_groups], capitalise=True)
    c.add(f" on a {background[0]} {background[1]} background.")
    return c


def detailed_caption(groups: list[Group], background: tuple[str, str], width: int, height: int,
                     style: int = 0, max_relations: int = 2) -> Caption:
    """Counts, every group with its attributes and position, signs with their text, and up to
    `max_relations` spatial relations between single objects."""
    c = Caption()
    n = sum(g.count for g in groups)
    number = NUMBERS[n] if n < len(NUMBERS) else "many"
    c.add(f"The image shows {number} object{'s' if n != 1 else ''} on a {background[0]} {background[1]} background.")
    for k, g in enumerate(groups):
        if g.category == "sign":
            for oid, text in zip(g.object_ids, g.texts):
                c.add(" ")
                c.mention(mention_text(Group(g.category, g.colour, (oid,), g.size)), [oid])
                _capital_at(c, c.phrases[-1])
                c.add(f' reads "{text}".')
            continue
        c.add(" ")
        c.mention(mention_text(g), g.object_ids)
        _capital_at(c, c.phrases[-1])
        verbs = VERBS_ONE if g.count == 1 else VERBS_MANY
        c.add(f" {verbs[(style + k) % len(verbs)]} {position_words(*g.centre, width, height)}.")
    singles = [g for g in groups if g.count == 1 and g.category != "sign"]
    said = 0
    for i in range(len(singles)):
        for j in range(i + 1, len(singles)):
            if said >= max_relations:
                break
            a, b = singles[i], singles[j]
            rel = relation(a, b, width, height)
            if rel is None:
                continue
            c.add(" ")
            c.mention(mention_text(a, definite=True), a.object_ids)
            _capital_at(c, c.phrases[-1])
            c.add(f" is {rel} ")
            c.mention(mention_text(b, definite=True), b.object_ids)
            c.add(".")
            said += 1
    return c


def _capital_at(c: Caption, phrase: dict) -> None:
    s = phrase["char_start"]
    c.text = c.text[:s] + c.text[s].upper() + c.text[s + 1:]
    phrase["phrase"] = c.text[s:phrase["char_end"]]


# ------------------------------------------------------------------------ parsing
def _words(text: str) -> list[tuple[str, int, int]]:
    """Lower-cased words with spans; quoted strings (sign texts) are blanked out first."""
    blanked = _QUOTED.sub(lambda m: " " * len(m.group()), text)
    return [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(blanked)]


def parse_mentions(text: str) -> list[Mention]:
    """Every object mention of a caption: a category word (singular or plural) with the colour,
    size and count/article words right before it."""
    words = _words(text)
    out = []
    for i, (w, _, end) in enumerate(words):
        if w in CATEGORIES:
            category, plural = w, False
        elif w in SINGULAR:
            category, plural = SINGULAR[w], True
        else:
            continue
        colour = size = None
        count = 2 if plural else 1
        start = words[i][1]
        definite = False
        j = i - 1
        while j >= 0 and i - j <= 3:
            word = words[j][0]
            if word in COLOURS and colour is None and size is None:
                colour = word
            elif word in SIZES and size is None:
                size = word
            elif word in NUMBER_VALUE or word in ("a", "an", "the"):
                if word in NUMBER_VALUE:
                    count = NUMBER_VALUE[word]
                definite = word == "the"
                start = words[j][1]
                break
            else:
                break
            start = words[j][1]
            j -= 1
        out.append(Mention(category, colour, size, count, start, end, definite))
    return out


def parse_relations(text: str) -> set[tuple[str, str, str, str, str]]:
    """(colour_a, category_a, relation, colour_b, category_b) of 'the red ball is to the left of the blue box'."""
    colours = "|".join(COLOURS)
    cats = "|".join(CATEGORIES)
    rels = "|".join(RELATIONS)
    sizes = "|".join(SIZES)
    pattern = re.compile(
        rf"the (?:(?:{sizes}) )?({colours}) ({cats}) is ({rels}) the (?:(?:{sizes}) )?({colours}) ({cats})\b"
    )
    return {m.groups() for m in pattern.finditer(" ".join(w for w, _, _ in _words(text)))}

