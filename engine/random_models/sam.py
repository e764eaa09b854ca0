"""Random SAM: `random:tiny` or `random:<file>` naming a `preset` and overriding its `model` sub-configs
(vision_config, prompt_encoder_config, mask_decoder_config); the real SamModel classes."""
from __future__ import annotations

import json
from typing import Any

from engine.random_models.seeding import seeded, text_seed

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {
            "vision_config": {
                "hidden_size": 32,
                "output_channels": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 256,
                "patch_size": 16,
                "window_size": 4,
                "global_attn_indexes": [1],
                "num_pos_feats": 16,  # output_channels / 2: the shared positional embedding
                "mlp_dim": 64,
            },
            "prompt_encoder_config": {"hidden_size": 32, "image_size": 256, "patch_size": 16, "mask_input_channels": 4},
            "mask_decoder_config": {
                "hidden_size": 32,
                "mlp_dim": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "iou_head_hidden_dim": 32,
            },
        },
    }
}


def random_spec(ref) -> dict[str, Any]:
    """The preset (or JSON/YAML file naming a `preset` and overriding its `model` sub-configs)."""
    cfg = ref.random_config()
    preset_name = cfg.get("preset", "tiny")
    if preset_name not in PRESETS:
        raise ValueError(f"{ref.ref}: unknown SAM preset {preset_name!r}; known: {sorted(PRESETS)}")
    unknown = set(cfg) - {"preset", "model"}
    if unknown:
        raise ValueError(f"{ref.ref}: unknown key(s) {sorted(unknown)}; allowed: preset, model")
    spec = json.loads(json.dumps(PRESETS[preset_name]))
    for sub, overrides in (cfg.get("model") or {}).items():
        if sub not in spec["model"]:
            raise ValueError(f"{ref.ref}: model.{sub} is not a SAM sub-config ({sorted(spec['model'])})")
        spec["model"][sub].update(overrides)
    return spec


def check_config(family: str, ref) -> None:
    """engine.random_models.check: the preset / config of a random: reference is valid."""
    random_spec(ref)


def build_sam(ref):
    """(SamModel, SamProcessor) of a random: reference."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    config = SamConfig(**random_spec(ref)["model"])
    with seeded(text_seed(ref.revision, "sha1")):
        model = SamModel(config)
    size = config.vision_config.image_size
    low_res = 4 * (size // config.vision_config.patch_size)  # the mask decoder's output side
    image_processor = SamImageProcessor(
        size={"longest_edge": size},
        pad_size={"height": size, "width": size},
        mask_size={"longest_edge": low_res},
        mask_pad_size={"height": low_res, "width": low_res},
    )
    return model.eval(), SamProcessor(image_processor=image_processor)
