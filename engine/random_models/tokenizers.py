"""Tokenizers built without a model hub, for random models of the real architectures.

- Florence-2: a byte-level BPE trained on a fixed built-in English corpus (task prompts, COCO
  categories, caption-like sentences, digits), wrapped as transformers' BartTokenizer plus the
  Florence-2 added tokens (<image>, <loc_0>..<loc_999>, <poly>, </poly>, <sep>), as docs/florence2.md section 4 says.
- CLIP: the real CLIP BPE (same vocabulary and ids as openai/clip-*) from the merges file that ships
  inside open_clip, as transformers' CLIPTokenizer (what Owlv2Processor expects).
- BERT: a WordPiece vocabulary with bert-base-uncased's special ids (Grounding DINO's text encoder
  hard-codes them), every lowercase letter and digit, and the words of the installed spaCy model.

Every builder is deterministic: the same arguments give the same vocabulary in every process.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import re
import string
from pathlib import Path

from schemas.florence2_tasks import TASKS

# ------------------------------------------------------------------------------ Florence-2 BPE
_COCO_CATEGORIES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign "
    "parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
    "handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard "
    "surfboard tennis racket bottle wine glass cup fork knife spoon bowl banana apple sandwich orange "
    "broccoli carrot hot dog pizza donut cake chair couch potted plant bed dining table toilet tv "
    "laptop mouse remote keyboard cell phone microwave oven toaster sink refrigerator book clock vase "
    "scissors teddy bear hair drier toothbrush"
).split()
_NOUNS = (
    "man woman child boy girl people dog cat bird horse car truck bus bicycle building house tree "
    "grass sky road street table chair window door wall floor water beach mountain field flower "
    "plate food cup bottle phone computer sign shirt jacket hat glasses hand face head hair rocket "
    "astronaut helmet flag coffee mug saucer spoon camera tripod photographer kitten ball shadow "
    "light cloud snow river boat train tower bridge fence pole grass leaf rock sand wave text word "
    "letter number logo label board screen picture painting frame bag box"
).split()
_ADJECTIVES = (
    "red green blue yellow white black gray brown orange pink purple large small big little old "
    "young tall short wooden metal glass bright dark open closed empty full striped round square"
).split()
_VERBS = (
    "sitting standing walking running holding looking wearing lying riding eating drinking playing "
    "parked flying floating hanging smiling posing"
).split()
_PLACES = (
    "on the table", "in the street", "next to the window", "in front of a building", "on the grass",
    "near the water", "under the sky", "in a room", "on a plate", "at the beach", "in the field",
)
_DETAIL_SENTENCES = (
    "The image shows a scene with several objects.",
    "In the background there is a wall and a window.",
    "The photo is taken from a low angle.",
    "There are two people and a dog in the picture.",
    "The text on the sign reads STOP.",
    "A white cup of coffee sits on a saucer next to a spoon.",
    "An astronaut in a white suit is holding a helmet with a flag behind him.",
    "A gray and brown cat is lying on a red blanket.",
    "A man is standing behind a camera on a tripod.",
    "The rocket is standing on the launch pad under a blue sky.",
)


def _prompt_words(prompt: str) -> str:
    """A task prompt without its input slot ("Locate {input} in the image." -> "Locate in the image.")."""
    return re.sub(r"\s*\{input\}", "", prompt)


def florence2_corpus() -> list[str]:
    """The fixed English corpus the Florence-2 BPE is trained on."""
    lines = [_prompt_words(t.prompt) for t in TASKS] + list(_DETAIL_SENTENCES) + [" ".join(_COCO_CATEGORIES)]
    for i, noun in enumerate(_NOUNS):
        adj = _ADJECTIVES[i % len(_ADJECTIVES)]
        verb = _VERBS[i % len(_VERBS)]
        place = _PLACES[i % len(_PLACES)]
        lines.append(f"A {adj} {noun} {verb} {place}.")
        lines.append(f"a {noun} and a {_NOUNS[(i * 7 + 3) % len(_NOUNS)]}")
        lines.append(f"The {noun} is {adj}.")
    for adj in _ADJECTIVES:
        lines.append(" ".join(f"{adj} {n}" for n in _COCO_CATEGORIES[::5]))
    lines.append(" ".join(str(n) for n in range(0, 200)))
    lines.append("0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz .,;:!?'\"()-")
    return lines


@functools.lru_cache(maxsize=4)
def _trained_bpe(vocab_size: int) -> tuple[str, str]:
    """Byte-level BPE trained on the corpus; (vocab json, merges json), cached per process."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],  # BART's ids 0..4
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(florence2_corpus() * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    return json.dumps(model["vocab"], sort_keys=True), json.dumps(model["merges"])


def florence2_tokenizer(vocab_size: int = 2000):
    """BartTokenizer over the offline BPE + <image>, <loc_0..999>, <poly>, </poly>, <sep>."""
    from transformers import BartTokenizer

    from schemas.loc_tokens import POLY_END, POLY_START, SEP, all_loc_tokens

    vocab_json, merges_json = _trained_bpe(vocab_size)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(merges_json)]
    tokenizer = BartTokenizer(
        vocab=json.loads(vocab_json),
        merges=merges,
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_tokens(all_loc_tokens() + [POLY_START, POLY_END, SEP])
    return tokenizer


# ------------------------------------------------------------------------------------ CLIP BPE
@functools.lru_cache(maxsize=4)
def clip_tokenizer(max_length: int):
    """The CLIP BPE tokenizer (same vocabulary and ids as openai/clip-*), built offline from the BPE
    merges bundled with open_clip, as CLIPTokenizer (what Owlv2Processor expects)."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # open_clip's slice
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


# ------------------------------------------------------------------------------ BERT WordPiece
# Token ids the Grounding DINO text encoder treats as phrase delimiters ([CLS], [SEP], ".", "?"):
# transformers hard-codes bert-base-uncased's ids (modeling_grounding_dino.SPECIAL_TOKENS), so
# the offline tokenizer places these tokens at the same ids.
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}


def bert_tokenizer(words: list[str]):
    """A BERT WordPiece tokenizer built without downloads: bert-base-uncased's special ids,
    every lowercase letter/digit as a word and as a ##piece (no [UNK] on ASCII), plus `words`."""
    from transformers import BertTokenizer

    size = max(BERT_SPECIAL_IDS.values()) + 1
    fill = list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
    fill += ["##" + c for c in string.digits + string.ascii_lowercase]
    fill += [w for w in sorted(set(words)) if w not in fill]
    fill = [t for t in fill if t not in BERT_SPECIAL_IDS]
    tokens: list[str | None] = [None] * max(size, len(fill) + len(BERT_SPECIAL_IDS))
    for tok, idx in BERT_SPECIAL_IDS.items():
        tokens[idx] = tok
    it = iter(fill)
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = next(it, f"[unused{i}]")
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})


def spacy_words(nlp) -> list[str]:
    """Lowercase words of the spaCy model's own string table file (fixed on disk, so the
    vocabulary is the same on every worker, unlike nlp.vocab.strings that grows at run time)."""
    path = Path(nlp.path) / "vocab" / "strings.json"
    if not path.exists():
        return []
    return [w for w in json.loads(path.read_text()) if w.isascii() and w.isalpha() and w.islower() and len(w) <= 15]
