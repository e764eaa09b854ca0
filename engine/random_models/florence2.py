"""Random Florence-2: `random:tiny` (tests, offline profile), `random:base` (the Florence-2-base
architecture, for throughput benchmarks) or `random:<config.json|yaml>` naming a preset and overriding
any of its fields (nested dicts merge key by key).

The model is transformers' native Florence2ForConditionalGeneration with the offline BPE tokenizer
(engine.random_models.tokenizers) and a Florence2Processor configured like the hub checkpoints', so a
random model generates, parses and trains through exactly the code paths of a real one.
"""
from __future__ import annotations

import copy
from typing import Any

from engine.random_models.seeding import config_seed, seeded
from engine.random_models.tokenizers import florence2_tokenizer

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

# post_process_generation raises "Unsupported parse task" for any type missing here (docs/florence2.md section 4).
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
    # Florence-2-base (docs/florence2.md section 3): DaViT 128..1024 / 1,1,9,1, BART 6+6 x 768,
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


def _deep_merge(base: dict, override: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in out:
            raise ValueError(f"random Florence-2 config: unknown key {where + key!r}; known: {sorted(out)}")
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


def check_config(family: str, ref) -> None:
    """engine.random_models.check: the preset / config of a random: reference is valid."""
    resolve_random_config(ref.random_config())


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


def offline_processor(preset: str = "tiny"):
    """The processor of a preset alone (tokenizer + image processor + parser), without building weights."""
    full = resolve_random_config({"preset": preset})
    return build_processor(florence2_tokenizer(full["bpe_vocab_size"]), full["image_size"])


def build_random_florence2(config: dict | None = None):
    """(Florence2ForConditionalGeneration, Florence2Processor) of a preset/config, random weights,
    seeded from a hash of the full config."""
    from transformers import BartConfig, Florence2Config, Florence2ForConditionalGeneration, Florence2VisionConfig

    full = resolve_random_config(config)
    tokenizer = florence2_tokenizer(full["bpe_vocab_size"])
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
    with seeded(full["seed"] * 1_000_003 + config_seed(full)):
        model = Florence2ForConditionalGeneration(model_config)
    # The hub checkpoints' decoding: </s><s> start, beam 3, no repeated trigrams (docs/florence2.md).
    gen = model.generation_config
    gen.forced_bos_token_id = tokenizer.bos_token_id
    gen.forced_eos_token_id = tokenizer.eos_token_id
    gen.num_beams = 3
    gen.no_repeat_ngram_size = 3
    model.eval()
    return model, processor
