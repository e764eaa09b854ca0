"""Random Grounding DINO: `random:tiny` or `random:<file>` naming a `preset` and overriding its
`model` (GroundingDinoConfig kwargs) and `image_size` keys. The text encoder's tokenizer is the
offline BERT WordPiece over the installed spaCy model's words (engine.random_models.tokenizers).
"""
from __future__ import annotations

import json
from typing import Any

from engine.random_models.seeding import seeded, text_seed
from engine.random_models.tokenizers import bert_tokenizer, spacy_words

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {
            "backbone_config": {
                "model_type": "resnet",
                "embedding_size": 16,
                "hidden_sizes": [16, 32, 64, 128],
                "depths": [1, 1, 1, 1],
                "layer_type": "basic",
                "out_features": ["stage2", "stage3", "stage4"],
            },
            "text_config": {
                "model_type": "bert",
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 256,
            },
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 2,  # the decoder box heads are tied across layers: at least 2
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_n_points": 2,
            "decoder_n_points": 2,
            "num_queries": 50,
            "max_text_len": 256,
        },
        "image_size": {"shortest_edge": 160, "longest_edge": 224},
    }
}


def random_spec(ref) -> dict[str, Any]:
    """The preset (or JSON/YAML file) behind a random: reference (an engine.models.ModelRef)."""
    cfg = ref.random_config()
    preset_name = cfg.get("preset", "tiny")
    if preset_name not in PRESETS:
        raise ValueError(f"{ref.ref}: unknown Grounding DINO preset {preset_name!r}; known: {sorted(PRESETS)}")
    spec = json.loads(json.dumps(PRESETS[preset_name]))
    unknown = set(cfg) - {"preset", "model", "image_size"}
    if unknown:
        raise ValueError(f"{ref.ref}: unknown key(s) {sorted(unknown)}; allowed: preset, model, image_size")
    spec["model"].update(cfg.get("model") or {})
    spec["image_size"].update(cfg.get("image_size") or {})
    return spec


def check_config(family: str, ref) -> None:
    """engine.random_models.check: the preset / config of a random: reference is valid."""
    random_spec(ref)


def build_grounding_dino(ref, nlp):
    """(model, processor) of a random: reference; `nlp` is the spaCy pipeline whose words the tokenizer knows."""
    from transformers import AutoConfig, GroundingDinoConfig, GroundingDinoForObjectDetection
    from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

    spec = random_spec(ref)
    kwargs = dict(spec["model"])
    for key in ("backbone_config", "text_config"):
        sub = dict(kwargs[key])
        kwargs[key] = AutoConfig.for_model(sub.pop("model_type"), **sub)
    tokenizer = bert_tokenizer(spacy_words(nlp))
    kwargs["text_config"].vocab_size = tokenizer.vocab_size
    config = GroundingDinoConfig(use_timm_backbone=False, use_pretrained_backbone=False, **kwargs)
    with seeded(text_seed(ref.revision, "sha1")):
        model = GroundingDinoForObjectDetection(config)
    image_processor = GroundingDinoImageProcessor(size=dict(spec["image_size"]))
    return model.eval(), GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
