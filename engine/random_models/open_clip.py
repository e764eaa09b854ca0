"""Random open_clip models: `random:tiny`, `random:<open_clip architecture, e.g. ViT-B-32>`, or
`random:<file>` holding an open_clip `model_cfg` (or `{"model_cfg": ..., "preprocess_cfg": ...}`).
The real CLIP classes and open_clip's own tokenizer, built through open_clip's `local-dir:` loader."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from engine.models import OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_LOCAL_PREFIX
from engine.random_models.seeding import config_seed, seeded

# Small enough to build and encode in milliseconds on one CPU core; a plain ViT + text
# transformer, i.e. the same CLIP class as ViT-B-32 / ViT-L-14.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def model_config(location: str, config: dict) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg overrides) of a random: reference; no model is built."""
    import open_clip

    if "preset" in config:
        name = config["preset"]
        if name == "tiny":
            return copy.deepcopy(TINY_CONFIG), {}
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise ValueError(
                f"random:{name}: unknown preset; use 'tiny', an open_clip architecture "
                f"(e.g. ViT-B-32; see open_clip.list_models()) or a .json/.yaml model config"
            )
        return cfg, {}
    if "model_cfg" in config:
        return copy.deepcopy(config["model_cfg"]), dict(config.get("preprocess_cfg") or {})
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise ValueError(f"random:{location}: an open_clip model config needs the key(s) {missing}")
    return copy.deepcopy(config), {}


def check_config(family: str, ref) -> None:
    """engine.random_models.check: the preset / config of a random: reference is valid."""
    model_config(ref.location, ref.random_config())


@contextlib.contextmanager
def _quiet_logging():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def build_open_clip(ref) -> tuple[Any, Any, Any, dict]:
    """(model, preprocess, tokenizer, model_cfg) of a random: reference (an engine.models.ModelRef)."""
    import open_clip

    model_cfg, pp_cfg = model_config(ref.location, ref.random_config())
    folder_config = {"model_cfg": model_cfg, "preprocess_cfg": pp_cfg}
    with tempfile.TemporaryDirectory(prefix="fld-clip-") as tmp:
        Path(tmp, OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(folder_config))
        # open_clip warns that no weights were found: random weights are the point here
        with seeded(config_seed(folder_config)), _quiet_logging():
            model, _, preprocess = open_clip.create_model_and_transforms(OPEN_CLIP_LOCAL_PREFIX + tmp)
        tokenizer = open_clip.get_tokenizer(OPEN_CLIP_LOCAL_PREFIX + tmp)
    return model, preprocess, tokenizer, model_cfg
