"""The model's own confidence in what it generated, per parsed instance.

Why: a Florence-2 box or caption is a generated token sequence, and the probability the model gave
those tokens is its confidence in them. Stage 3's merge ranks boxes of different rounds by it (a
model box with no score would otherwise count as certain and replace a specialist's box).

How: `generate(..., output_scores=True, return_dict_in_generate=True)` and
`model.compute_transition_scores` give the log-probability of every generated token (greedy: the
processed logits, normalised here; beam search: the chosen beam's log-probs through `beam_indices`,
so num_beams > 1 is handled, not approximated). The text is parsed by the processor's own
post-processor as before; this module only finds which tokens each parsed instance came from,
walking the text with the same patterns, in the same order, as transformers' parsers
(Florence2PostProcessor: description_with_bboxes / bboxes / phrase_grounding / ocr), and checks
that it found exactly as many instances as the parser returned (if not, every instance gets the
whole sequence's score: never a made-up 1.0).

score = exp(mean log-prob of the instance's tokens) (the geometric mean of their probabilities, in
[0, 1]): an object box's tokens are its category's tokens + its 4 `<loc_*>` tokens (a phrase with
several boxes shares its category tokens); an OCR line's, its text + 8 `<loc_*>`; a caption's, every
generated token up to and including `</s>` (the sequence's mean token log-prob).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

# what the processor strips before parsing (Florence2PostProcessor.parse_*: <s>, </s>, <pad>)
STRIPPED = ("<s>", "</s>", "<pad>")
_PHRASE = r"([^<]+(?:<loc_\d+>){4,})"
_PHRASE_OR_EMPTY = r"(?:(?:<loc_\d+>){4,})"
_TEXT = r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)"
_BOX = r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"
_OCR = r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"


@dataclass
class Generated:
    """One generated sequence: the decoded text (what is parsed) and, per generated token after the
    decoder start, its char span in `clean` (the text without <s> / </s> / <pad>, as parsed) and log-prob."""

    text: str
    clean: str
    spans: list[tuple[int, int]]
    logprobs: list[float]
    ids: list[int]
    ended: bool = False  # the sequence ends with </s> (its last token), not at max_new_tokens

    def score_of(self, token_indices: list[int]) -> float | None:
        # a log-prob of exactly 0 is a forced token (forced <s> / </s> at max length): no choice of the model
        values = [self.logprobs[i] for i in token_indices if math.isfinite(self.logprobs[i]) and self.logprobs[i] != 0.0]
        return math.exp(sum(values) / len(values)) if values else None

    @property
    def sequence_score(self) -> float | None:
        """Geometric-mean probability of the sequence: its text tokens and the closing </s>."""
        last = len(self.logprobs) - 1
        return self.score_of([i for i, (a, b) in enumerate(self.spans) if b > a or (self.ended and i == last)])

    def tokens_in(self, *char_spans: tuple[int, int]) -> list[int]:
        """Indices of the tokens overlapping any of the char spans of `clean`."""
        return [i for i, (a, b) in enumerate(self.spans) if b > a and any(not (b <= s or a >= e) for s, e in char_spans)]


def from_generation(post_processor, sequence: list[int], logprobs: list[float], eos_id: int, pad_id: int | None, text: str) -> Generated:
    """sequence: the generated ids after the decoder start token; logprobs: one per id. Cut after the
    first </s> (what follows is batch padding, whose 'scores' are no choice of the model)."""
    n, ended = len(sequence), False
    for i, tok in enumerate(sequence):
        if tok == eos_id and i > 0:  # a leading </s> is not the end: Florence-2 may begin with <s>
            n, ended = i + 1, True
            break
    sequence, logprobs = sequence[:n], logprobs[:n]
    keep = [i for i, tok in enumerate(sequence) if pad_id is None or tok != pad_id]
    decoded, raw_spans = post_processor.decode_with_spans([sequence[i] for i in keep])
    clean, spans = "", []
    for a, b in raw_spans:
        piece = decoded[a:b]
        piece = "" if piece in STRIPPED else piece
        spans.append((len(clean), len(clean) + len(piece)))
        clean += piece
    return Generated(text, clean, spans, [logprobs[i] for i in keep], [sequence[i] for i in keep], ended and bool(keep) and keep[-1] == n - 1)


def instance_token_sets(gen: Generated, post_type: str, banned: frozenset = frozenset()) -> list[list[int]] | None:
    """Token indices of each instance, in the order the processor's parser lists them (one per box
    for bboxes / grounding, per line for OCR). None for a text answer (pure_text)."""
    text = gen.clean
    out: list[list[int]] = []
    if post_type == "ocr":
        for m in re.finditer(_OCR, text):
            out.append(gen.tokens_in(m.span()))
        return out
    if post_type in ("description_with_bboxes", "bboxes", "phrase_grounding"):
        pattern = _PHRASE_OR_EMPTY if post_type == "bboxes" else _PHRASE
        for m in re.finditer(pattern, text):
            start, phrase_text = m.start(), m.group(0)
            # the parsers drop one "<ground>" / "<obj>" each before reading the phrase
            for tag in ("<ground>", "<obj>"):
                at = phrase_text.find(tag)
                if at >= 0:
                    phrase_text = phrase_text[:at] + " " * len(tag) + phrase_text[at + len(tag):]
            name = re.search(_TEXT, phrase_text)
            if post_type != "bboxes":
                if not phrase_text.strip() or not name:
                    continue
                if post_type == "phrase_grounding" and name.group().strip() in banned:
                    continue
            boxes = list(re.finditer(_BOX, phrase_text))
            if not boxes:
                continue
            label = (start + name.start(1), start + name.end(1)) if name and name.end(1) > name.start(1) else None
            group = []
            for b in boxes:
                spans = [(start + b.start(), start + b.end())] + ([label] if label else [])
                group.append(gen.tokens_in(*spans))
            out.append(group)  # type: ignore[arg-type]
        if post_type == "phrase_grounding":
            return out  # one list per phrase (each holding one token list per box), like the parser's instances
        return [toks for group in out for toks in group]  # type: ignore[misc]
    return None


def instance_scores(gen: Generated, post_type: str, n_instances: int, banned: frozenset = frozenset()) -> list:
    """A score per parsed instance (per phrase: a list per box for grounding); the sequence's score
    for every instance when the alignment does not find the parser's instance count."""
    sets = instance_token_sets(gen, post_type, banned)
    if sets is None or len(sets) != n_instances:
        return [gen.sequence_score] * n_instances
    if post_type == "phrase_grounding":
        return [[gen.score_of(toks) for toks in group] for group in sets]
    return [gen.score_of(toks) for toks in sets]
