"""Noun phrases of captions (spaCy) and which of them can be grounded to a box.

Florence-2's text-phrase-region triplets ground the noun phrases of every caption; spaCy's
dependency-based noun chunks give those phrases with exact character offsets, so a grounding
can point back into its caption (char_start/char_end). The paper's blacklist (pronouns,
"the image", "a group", ...) lists phrases that name no region; the grounding stage skips
pronoun-only chunks, the grounding filter applies the whole blacklist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from engine.models import load_spacy

if TYPE_CHECKING:
    import spacy

# Florence-2 paper (docs/florence2.md, phase B filters): phrases that are not groundable.
GROUNDING_BLACKLIST: frozenset[str] = frozenset(
    {"the image", "image", "images", "the", "a", "an", "a group", "other objects", "lots", "a set"}
)
# Personal, possessive, demonstrative, indefinite and reflexive pronouns: used when only the
# phrase text is known (no spaCy tags), e.g. by the grounding filter on stored groundings.
PRONOUNS: frozenset[str] = frozenset(
    """i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself
    she her hers herself it its itself they them their theirs themselves this that these those who whom
    whose which what someone somebody something anyone anybody anything everyone everybody everything
    no one nobody nothing one ones another each either neither both all some any none few many several
    other others""".split()
)


# Stripped from both ends of a stored phrase before it is compared with the blacklist.
PHRASE_PUNCTUATION = " .,;:!?\"'()[]"


@dataclass(frozen=True)
class Chunk:
    """A noun chunk of a text: text[start:end] == text of the chunk."""

    text: str
    start: int
    end: int
    pronoun_only: bool  # every token is a pronoun (spaCy PRON), e.g. "it", "they"


def _check_texts(texts: Iterable[str]) -> list[str]:
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return texts


def chunks(texts: list[str], nlp: "spacy.Language | None" = None, batch_size: int = 64) -> list[list[Chunk]]:
    """Noun chunks of every text (with pronoun flags), parsed in one nlp.pipe pass."""
    texts = _check_texts(texts)
    nlp = nlp or load_spacy()
    out: list[list[Chunk]] = []
    for doc in nlp.pipe(texts, batch_size=batch_size):
        out.append(
            [
                Chunk(c.text, c.start_char, c.end_char, all(t.pos_ == "PRON" for t in c))
                for c in doc.noun_chunks
            ]
        )
    return out


def noun_chunks(texts: list[str], nlp: "spacy.Language | None" = None) -> list[list[tuple[str, int, int]]]:
    """Per text: (chunk text, char_start, char_end) of spaCy noun chunks; text[start:end] == chunk."""
    return [[(c.text, c.start, c.end) for c in per_text] for per_text in chunks(texts, nlp)]


def normalize_phrase(phrase: str) -> str:
    """Lower case, single spaces: the key phrases are compared and deduplicated on."""
    return " ".join(phrase.lower().split())


def is_pronoun_phrase(phrase: str) -> bool:
    """Every word of the phrase is a pronoun (text-only check, no parse needed)."""
    words = normalize_phrase(phrase).split()
    return bool(words) and all(w in PRONOUNS for w in words)


def is_blacklisted(phrase: str, blacklist: Iterable[str] = GROUNDING_BLACKLIST, pronouns: bool = True) -> bool:
    """The phrase names no groundable region: empty, in the blacklist, or (with `pronouns`)
    pronouns only; compared lower-cased, punctuation at either end ignored."""
    key = normalize_phrase(phrase or "").strip(PHRASE_PUNCTUATION)
    return not key or key in {normalize_phrase(b) for b in blacklist} or (pronouns and is_pronoun_phrase(key))


def groundable_chunks(
    texts: list[str],
    nlp: "spacy.Language | None" = None,
    skip_pronouns: bool = True,
    blacklist: Iterable[str] = (),
) -> list[list[Chunk]]:
    """Noun chunks worth grounding: pronoun-only chunks dropped (if skip_pronouns), and any
    chunk whose normalized text is in `blacklist` (empty by default: the filter decides)."""
    banned = {normalize_phrase(b) for b in blacklist}
    out = []
    for per_text in chunks(texts, nlp):
        keep = []
        for c in per_text:
            if skip_pronouns and (c.pronoun_only or is_pronoun_phrase(c.text)):
                continue
            if normalize_phrase(c.text) in banned:
                continue
            keep.append(c)
        out.append(keep)
    return out
