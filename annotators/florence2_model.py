"""Florence-2 through transformers' native classes, loaded from any model reference.

Why one wrapper: the annotator (stage 1), the region-text captioner and the refinement
trainer (stage 3) all need the same three things: load a hub id / local dir / `random:<cfg>`
the same way on every worker, generate a task batch-wise, and parse the generated text with
the processor's own `post_process_generation` (so our geometry follows transformers' rules).

`random:tiny` (tests, offline profile) and `random:base` (Florence-2-base architecture, random
weights, for throughput benchmarks) are the REAL architecture classes with a tokenizer trained
offline: a byte-level BPE over a built-in English corpus, wrapped as a BartTokenizer plus the
Florence-2 added tokens. Everything is deterministic: same config -> same tokenizer and weights
in every process, so Ray / Beam workers build identical models.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from engine.models import parse_model_ref

TASKS = (
    "<CAPTION>",
    "<DETAILED_CAPTION>",
    "<MORE_DETAILED_CAPTION>",
    "<OD>",
    "<DENSE_REGION_CAPTION>",
    "<REGION_PROPOSAL>",
    "<OCR>",
    "<OCR_WITH_REGION>",
    "<CAPTION_TO_PHRASE_GROUNDING>",
    "<REFERRING_EXPRESSION_SEGMENTATION>",
    "<REGION_TO_SEGMENTATION>",
    "<OPEN_VOCABULARY_DETECTION>",
    "<REGION_TO_CATEGORY>",
    "<REGION_TO_DESCRIPTION>",
    "<REGION_TO_OCR>",
)
# Tasks whose prompt embeds a text input (a caption, a phrase, or a region as <loc_> tokens).
TASKS_WITH_INPUT = (
    "<CAPTION_TO_PHRASE_GROUNDING>",
    "<REFERRING_EXPRESSION_SEGMENTATION>",
    "<REGION_TO_SEGMENTATION>",
    "<OPEN_VOCABULARY_DETECTION>",
    "<REGION_TO_CATEGORY>",
    "<REGION_TO_DESCRIPTION>",
    "<REGION_TO_OCR>",
)

# The encoder prompts of the processor (FLORENCE2.md section 2); the BPE corpus must know them.
TASK_PROMPTS = (
    "What does the image describe?",
    "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "Locate the objects with category name in the image.",
    "Locate the objects in the image, with their descriptions.",
    "Locate the region proposals in the image.",
    "What is the text in the image?",
    "What is the text in the image, with regions?",
    "Locate the phrases in the caption:",
    "Locate in the image with mask",
    "What is the polygon mask of region",
    "Locate in the image.",
    "What is the region?",
    "What does the region describe?",
    "What text is in the region?",
)

# Phrases the hub checkpoints' processor_config.json bans from phrase grounding (pronouns and
# the paper's list of irrelevant phrases); copied so a random model parses like a real one.
BANNED_GROUNDING_TOKENS = (
    "it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers",
    "they", "them", "their", "theirs", "one", "oneself", "we", "us", "our", "ours", "its",
    "myself", "yourself", "himself", "herself", "itself", "ourselves", "yourselves", "themselves",
    "this", "that", "these", "those", "who", "whom", "whose", "which", "what", "all", "another",
    "any", "anybody", "anyone", "anything", "each", "everybody", "everyone", "everything", "few",
    "many", "nobody", "none", "several", "some", "somebody", "someone", "something", "each other",
    "one another", "the image", "image", "images", "the", "a", "an", "a group", "other objects",
    "lots", "a set",
)  # fmt: skip

OCR_PATTERN = r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"

# post_process_generation raises "Unsupported parse task" for any type missing here (STACK.md).
POST_PROCESSOR_CONFIG: dict[str, dict] = {
    "ocr": {"PATTERN": OCR_PATTERN, "AREA_THRESHOLD": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": list(BANNED_GROUNDING_TOKENS)},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Presets of `random:<name>`. A JSON/YAML config may name a preset ("preset": "base") and
# override any field; nested dicts merge key by key.
PRESETS: dict[str, dict[str, Any]] = {
    # 6.8M parameters, 128 px: builds in ~1 s and generates on CPU in tests.
    "tiny": {
        "image_size": 128,
        "vision": {
            "depths": [1, 1, 1, 1],
            "embed_dim": [32, 64, 128, 256],
            "num_heads": [1, 2, 4, 8],
            "num_groups": [1, 2, 4, 8],
            "window_size": 4,
        },
        "text": {
            "d_model": 256,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 1024,
            "decoder_ffn_dim": 1024,
            "max_position_embeddings": 1024,  # as the hub models: max_new_tokens 1024 must fit
        },
        "bpe_vocab_size": 2000,
        "vocab_size": None,  # None: the tokenizer's length
        "seed": 0,
    },
    # Florence-2-base (FLORENCE2.md section 3): DaViT 128..1024 / 1,1,9,1, BART 6+6 x 768,
    # 768 px (577 visual tokens), embedding padded to the hub's 51,289 rows so FLOPs and
    # parameter count (~232M) match the real checkpoint.
    "base": {
        "image_size": 768,
        "vision": {
            "depths": [1, 1, 9, 1],
            "embed_dim": [128, 256, 512, 1024],
            "num_heads": [4, 8, 16, 32],
            "num_groups": [4, 8, 16, 32],
            "window_size": 12,
        },
        "text": {
            "d_model": 768,
            "encoder_layers": 6,
            "decoder_layers": 6,
            "encoder_attention_heads": 12,
            "decoder_attention_heads": 12,
            "encoder_ffn_dim": 3072,
            "decoder_ffn_dim": 3072,
            "max_position_embeddings": 1024,
        },
        "bpe_vocab_size": 4000,
        "vocab_size": 51289,
        "seed": 0,
    },
}


# ------------------------------------------------------------------------------ config
def _deep_merge(base: dict, override: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in out:
            raise ValueError(
                f"random Florence-2 config: unknown key {where + key!r}; known: {sorted(out)}"
            )
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _deep_merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def resolve_random_config(config: dict | None = None) -> dict:
    """Preset + overrides -> the full config (what the seed and the revision hash cover)."""
    config = dict(config or {})
    preset = config.pop("preset", "tiny")
    if preset not in PRESETS:
        raise ValueError(f"unknown Florence-2 preset {preset!r}; known presets: {sorted(PRESETS)}")
    full = _deep_merge(PRESETS[preset], config)
    full["preset"] = preset
    if full["image_size"] % 32:
        raise ValueError(f"random Florence-2 config: image_size {full['image_size']} must be a multiple of 32")
    return full


def check_random_reference(ref: str) -> None:
    """A random: reference's preset / config is valid (ValueError otherwise); nothing is built."""
    mref = parse_model_ref(ref)
    if mref.kind == "random":
        resolve_random_config(mref.random_config())


def _config_seed(full: dict) -> int:
    digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()
    return int(digest[:8], 16)


# --------------------------------------------------------------------------- tokenizer
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


def _tokenizer_corpus() -> list[str]:
    """A fixed English corpus: task prompts, COCO categories, caption-like sentences, digits."""
    lines = list(TASK_PROMPTS) + list(_DETAIL_SENTENCES) + [" ".join(_COCO_CATEGORIES)]
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
    """Byte-level BPE trained on the built-in corpus; (vocab json, merges json), cached per process."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],  # BART's ids 0..4
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus() * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    return json.dumps(model["vocab"], sort_keys=True), json.dumps(model["merges"])


def build_tokenizer(vocab_size: int = 2000):
    """BartTokenizer over the offline BPE + <image>, <loc_0..999>, <poly>, </poly>, <sep>."""
    from transformers import BartTokenizer

    vocab_json, merges_json = _trained_bpe(vocab_size)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(merges_json)]
    tokenizer = BartTokenizer(
        vocab=json.loads(vocab_json),
        merges=merges,
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_tokens([f"<loc_{i}>" for i in range(1000)] + ["<poly>", "</poly>", "<sep>"])
    return tokenizer


def build_processor(tokenizer, image_size: int):
    """Native Florence2Processor: CLIP-style resize to image_size^2 (aspect not kept, bicubic)."""
    from transformers import CLIPImageProcessor, Florence2Processor

    image_processor = CLIPImageProcessor(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=False,
        resample=3,  # bicubic, as the hub checkpoints
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        image_seq_length=(image_size // 32) ** 2 + 1,  # DaViT strides 4*2*2*2 + the pooled token
    )
    return Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config=copy.deepcopy(POST_PROCESSOR_CONFIG),
    )


def build_random_florence2(config: dict | None = None):
    """(Florence2ForConditionalGeneration, Florence2Processor) of a preset/config, random weights.

    The weights are seeded from a hash of the full config, inside a forked RNG so the caller's
    torch random state is untouched.
    """
    import torch
    from transformers import BartConfig, Florence2Config, Florence2ForConditionalGeneration, Florence2VisionConfig

    full = resolve_random_config(config)
    tokenizer = build_tokenizer(full["bpe_vocab_size"])
    processor = build_processor(tokenizer, full["image_size"])
    d_model = full["text"]["d_model"]
    vision_config = Florence2VisionConfig(**full["vision"], drop_path_rate=0.0, projection_dim=d_model)
    vocab_size = max(len(tokenizer), full["vocab_size"] or 0)
    text_config = BartConfig(
        vocab_size=vocab_size,
        **full["text"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,  # BART: decoding starts with </s>
        forced_bos_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    model_config = Florence2Config(
        vision_config=vision_config, text_config=text_config, image_token_id=tokenizer.image_token_id
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(full["seed"] * 1_000_003 + _config_seed(full))
        model = Florence2ForConditionalGeneration(model_config)
    # The hub checkpoints' decoding: </s><s> start, beam 3, no repeated trigrams (FLORENCE2.md).
    gen = model.generation_config
    gen.forced_bos_token_id = tokenizer.bos_token_id
    gen.forced_eos_token_id = tokenizer.eos_token_id
    gen.num_beams = 3
    gen.no_repeat_ngram_size = 3
    model.eval()
    return model, processor


# ----------------------------------------------------------------------------- wrapper
class Florence2Model:
    """transformers' native Florence2ForConditionalGeneration + Florence2Processor, loaded once per worker."""

    def __init__(self, model, processor, ref: str, revision: str, device: str):
        self.model = model
        self.processor = processor
        self.ref = ref
        self.revision = revision
        self.device = device

    @classmethod
    def load(cls, ref: str, device: str | None = None, dtype: str | None = None) -> "Florence2Model":
        """hub id | local dir | random:tiny | random:base | random:<cfg.json/yaml>.

        dtype: None -> float32 on CPU, bfloat16 on CUDA (the hub's recommended inference dtype).
        """
        import torch
        from transformers import Florence2ForConditionalGeneration, Florence2Processor

        from engine.stage import pick_device

        mref = parse_model_ref(ref)
        device = device or pick_device()
        if mref.kind == "random":
            model, processor = build_random_florence2(mref.random_config())
        else:
            kwargs = {"revision": mref.revision} if mref.kind == "hub" else {}
            model = Florence2ForConditionalGeneration.from_pretrained(mref.location, **kwargs)
            processor = Florence2Processor.from_pretrained(mref.location, **kwargs)
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model = model.to(device=device, dtype=torch_dtype).eval()
        return cls(model, processor, ref, mref.revision, device)

    # ----------------------------------------------------------------- generation
    @staticmethod
    def prompts(task: str, count: int, text_inputs: list[str | None] | None = None) -> list[str]:
        """The task token (+ its input) per image, as the processor expects them."""
        if task not in TASKS:
            raise ValueError(f"unknown Florence-2 task {task!r}; known: {', '.join(TASKS)}")
        if text_inputs is None:
            text_inputs = [None] * count
        if len(text_inputs) != count:
            raise ValueError(f"{task}: {len(text_inputs)} text inputs for {count} images")
        out = []
        for i, text in enumerate(text_inputs):
            if task in TASKS_WITH_INPUT:
                if not text:
                    raise ValueError(f"{task} needs a text input; image {i} has none")
                out.append(task + text)
            else:
                if text:
                    raise ValueError(f"{task} takes no text input; image {i} has {text!r}")
                out.append(task)
        return out

    def generate(
        self,
        images: list,
        task: str,
        text_inputs: list[str | None] | None = None,
        max_new_tokens: int = 1024,
        num_beams: int = 3,
        **gen_kwargs: Any,
    ) -> list[str]:
        """Raw decoded texts, special and location tokens kept (what post_process_generation parses)."""
        import torch

        if not images:
            return []
        prompts = self.prompts(task, len(images), text_inputs)
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True)
        positions = self.model.config.text_config.max_position_embeddings
        if inputs["input_ids"].shape[1] > positions:
            raise ValueError(
                f"{task}: prompt of {inputs['input_ids'].shape[1]} tokens (image tokens included) exceeds the "
                f"model's {positions} positions; shorten the text input"
            )
        max_new_tokens = min(max_new_tokens, positions)  # BART's learned positions end there
        dtype = next(self.model.parameters()).dtype
        tokenizer = self.processor.tokenizer
        n_tokens = len(tokenizer)
        vocab = self.model.config.text_config.vocab_size
        if vocab > n_tokens:  # padded embedding rows have no token: never generate them (caller's list kept)
            gen_kwargs["suppress_tokens"] = sorted(set(gen_kwargs.get("suppress_tokens") or ()) | set(range(n_tokens, vocab)))
        with torch.inference_mode():
            ids = self.model.generate(
                input_ids=inputs["input_ids"].to(self.device),
                pixel_values=inputs["pixel_values"].to(self.device, dtype),
                attention_mask=inputs["attention_mask"].to(self.device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                **gen_kwargs,
            )
        texts = self.processor.batch_decode(ids, skip_special_tokens=False)
        # <pad> after </s> is batch padding, not generation: post_process_generation keeps it in
        # pure-text answers (captions would end in "<pad><pad>"), so drop it here.
        pad = tokenizer.pad_token
        return [t.replace(pad, "") for t in texts] if pad else texts

    def parse(self, text: str, task: str, image_size: tuple[int, int]) -> dict:
        """processor.post_process_generation: {task: answer} with coordinates in pixels of image_size (w, h)."""
        return self.processor.post_process_generation(text=text, task=task, image_size=tuple(image_size))

    def run(self, images: list, task: str, text_inputs: list[str | None] | None = None, **gen_kwargs: Any) -> list[dict]:
        """generate + parse, one {task: answer} per image, in that image's pixel coordinates."""
        texts = self.generate(images, task, text_inputs, **gen_kwargs)
        return [self.parse(t, task, im.size) for t, im in zip(texts, images)]

    def save(self, directory: str | Path) -> None:
        """save_pretrained of model and processor: a local dir `load()` reads back exactly."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
