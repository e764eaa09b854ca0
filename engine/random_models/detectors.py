"""Random object detectors of the `detect` stage's transformers families.

- detr: `random:tiny` (Conditional DETR, whose per-query reference points give distinct boxes even
  untrained, with a tiny native ResNet backbone: no timm, no pretrained backbone download) or
  `random:<file>` holding any DETR-family transformers config (`model_type` + kwargs; its image
  processor from `image_processor`, resolved from the model type unless it names
  `image_processor_type`).
- owlv2: `random:tiny` or `random:<file>` holding Owlv2Config kwargs; the tokenizer is the real
  CLIP BPE (engine.random_models.tokenizers.clip_tokenizer).
"""
from __future__ import annotations

import json
from typing import Any

from engine.random_models.seeding import config_seed, seeded
from engine.random_models.tokenizers import clip_tokenizer

# Tiny label set of the random DETR preset: real category names, so downstream stages
# (region_text, filters) see realistic labels.
TINY_LABELS = ["person", "cat", "cup", "rocket", "car", "dog", "bicycle", "chair"]


def tiny_detr() -> tuple[dict, dict]:
    """(model config, image processor kwargs) of the tiny DETR preset."""
    config = {
        "model_type": "conditional_detr",
        "backbone_config": {
            "model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128],
            "depths": [1, 1, 1, 1], "layer_type": "basic", "out_features": ["stage4"],
        },
        "use_timm_backbone": False, "use_pretrained_backbone": False,
        "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
        "encoder_attention_heads": 2, "decoder_attention_heads": 2, "num_queries": 20,
        "id2label": {str(i): name for i, name in enumerate(TINY_LABELS)},
    }
    return config, {"size": {"shortest_edge": 128, "longest_edge": 192}}


def _tiny_owlv2() -> dict:
    return {
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "max_position_embeddings": 16},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 128, "patch_size": 16},
        "projection_dim": 32,
    }


def detr_config(location: str, config: dict) -> tuple[dict, dict]:
    """(model config, image processor kwargs) of a random: DETR reference; no model is built."""
    if config.get("preset") == "tiny":
        model_cfg, proc_kwargs = tiny_detr()
    elif "preset" in config:
        raise ValueError(f"random:{location}: unknown detr preset; use 'tiny' or a .json/.yaml transformers config")
    else:
        model_cfg = dict(config)
        proc_kwargs = model_cfg.pop("image_processor", {}) or {}
        if "model_type" not in model_cfg:
            raise ValueError(f"random:{location}: the config needs a 'model_type' (e.g. conditional_detr, detr)")
    return model_cfg, proc_kwargs


def owlv2_config(location: str, config: dict) -> dict:
    """The Owlv2Config kwargs of a random: OWLv2 reference; no model is built."""
    if config.get("preset") == "tiny":
        return _tiny_owlv2()
    if "preset" in config:
        raise ValueError(f"random:{location}: unknown owlv2 preset; use 'tiny' or a .json/.yaml Owlv2Config")
    return config


def check_config(family: str, ref) -> None:
    """engine.random_models.check: the preset / config of a random: detr or owlv2 reference is valid."""
    (detr_config if family == "detr" else owlv2_config)(ref.location, ref.random_config())


def build_detr(location: str, config: dict) -> tuple[Any, Any]:
    """(model, image processor) of a random: DETR reference."""
    from transformers import AutoConfig, AutoModelForObjectDetection
    from transformers.models.auto.image_processing_auto import (
        IMAGE_PROCESSOR_MAPPING_NAMES,
        get_image_processor_class_from_name,
    )

    model_cfg, proc_kwargs = detr_config(location, config)
    model_cfg = json.loads(json.dumps(model_cfg))  # a private copy
    model_type = model_cfg.pop("model_type")
    proc_kwargs = dict(proc_kwargs)
    class_name = proc_kwargs.pop("image_processor_type", None)  # as preprocessor_config.json names it
    if not class_name:
        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or {}
        class_name = names if isinstance(names, str) else names.get("torchvision") or names.get("pil")
    if not class_name:
        raise ValueError(
            f"random:{location}: no image processor known for model_type {model_type!r}; "
            f"set image_processor.image_processor_type (e.g. RTDetrImageProcessor)"
        )
    hf_config = AutoConfig.for_model(model_type, **model_cfg)
    with seeded(config_seed({"model_type": model_type, **model_cfg})):
        model = AutoModelForObjectDetection.from_config(hf_config)
    processor = get_image_processor_class_from_name(class_name)(**proc_kwargs)
    return model, processor


def build_owlv2(location: str, config: dict) -> tuple[Any, Any]:
    """(model, Owlv2Processor) of a random: OWLv2 reference."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    config = owlv2_config(location, config)
    hf_config = Owlv2Config(**config)
    with seeded(config_seed(config)):
        model = Owlv2ForObjectDetection(hf_config)
    size = hf_config.vision_config.image_size
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": size, "width": size}),
        tokenizer=clip_tokenizer(hf_config.text_config.max_position_embeddings),
    )
    return model, processor
