"""open_clip image-text model shared by the stages that score text against pixels
(region_text picks a region's text, the clip_score filter scores captions).

One loader for every model reference the project accepts, so the stages never touch open_clip's
naming rules themselves:
- hub: `hf-hub:org/name`, an open_clip `ARCH/pretrained_tag` (e.g. `ViT-L-14/openai`), or a bare
  `org/name` hub id (taken as `hf-hub:org/name`);
- a local directory (optionally written `local-dir:/path`) holding `open_clip_config.json` +
  weights, as `ClipModel.save` writes it;
- `random:tiny`, `random:<open_clip arch, e.g. ViT-B-32>`, `random:<path.json|yaml>` (an open_clip
  `model_cfg`, or `{"model_cfg": ..., "preprocess_cfg": ...}`): the real CLIP classes with random
  weights, seeded from the config hash so every worker and runner builds identical weights.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from engine.models import parse_model_ref

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_pytorch_model.bin"
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"

# Small enough to build and encode in milliseconds on one CPU core; a plain ViT + text
# transformer, i.e. the same CLIP class as ViT-B-32 / ViT-L-14.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@contextlib.contextmanager
def _quiet_logging():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _seed_of(config: Any) -> int:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return int(digest[:8], 16)


def _random_model_cfg(location: str, config: dict) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg overrides) of a random: reference."""
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


@dataclass
class ClipModel:
    """open_clip model + preprocess + tokenizer, loaded once per worker."""

    model: torch.nn.Module
    preprocess: Any  # PIL image -> CHW tensor (open_clip's eval transform)
    tokenizer: Any  # list[str] -> LongTensor [n, context_length]
    ref: str
    revision: str
    device: str
    model_cfg: dict = field(default_factory=dict)  # what save() writes so load(dir) rebuilds it

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, ref: str, device: str | None = None) -> "ClipModel":
        import open_clip

        if device is None:
            from engine.stage import pick_device

            device = pick_device()
        local = ref[len(LOCAL_DIR_PREFIX):] if ref.startswith(LOCAL_DIR_PREFIX) else None
        if local is not None or ref.startswith(HF_HUB_PREFIX):
            parsed = parse_model_ref(local) if local is not None else None
        else:
            parsed = parse_model_ref(ref)

        if parsed is not None and parsed.kind == "random":
            model_cfg, pp_cfg = _random_model_cfg(parsed.location, parsed.random_config())
            with tempfile.TemporaryDirectory(prefix="fld-clip-") as tmp:
                Path(tmp, CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp_cfg}))
                with torch.random.fork_rng(devices=[]), _quiet_logging():
                    torch.manual_seed(_seed_of({"model_cfg": model_cfg, "preprocess_cfg": pp_cfg}))
                    # open_clip warns that no weights were found: random weights are the point here
                    model, _, preprocess = open_clip.create_model_and_transforms(LOCAL_DIR_PREFIX + tmp)
                tokenizer = open_clip.get_tokenizer(LOCAL_DIR_PREFIX + tmp)
            revision = parsed.revision
        elif parsed is not None and parsed.kind == "local":
            directory = Path(parsed.location)
            config_path = directory / CONFIG_FILE
            if not config_path.is_file():
                raise FileNotFoundError(f"{directory}: not an open_clip model directory (no {CONFIG_FILE})")
            model_cfg = json.loads(config_path.read_text()).get("model_cfg")
            if model_cfg is None:
                raise ValueError(f"{config_path}: missing the 'model_cfg' key")
            name = LOCAL_DIR_PREFIX + str(directory)
            model, _, preprocess = open_clip.create_model_and_transforms(name, require_pretrained=True)
            tokenizer = open_clip.get_tokenizer(name)
            revision = parsed.revision
        else:  # hub
            name, pretrained = cls._hub_name(ref)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, require_pretrained=True
            )
            tokenizer = open_clip.get_tokenizer(name)
            model_cfg = open_clip.get_model_config(name) or {}
            revision = pretrained or parse_model_ref(ref).revision
        model = model.to(device).eval()
        return cls(model, preprocess, tokenizer, ref, revision, device, model_cfg)

    @staticmethod
    def _hub_name(ref: str) -> tuple[str, str | None]:
        """(open_clip model name, pretrained tag) of a hub reference."""
        import open_clip

        if ref.startswith(HF_HUB_PREFIX):
            return ref, None
        arch, sep, tag = ref.partition("/")
        if sep and arch in open_clip.list_models():
            return arch, tag
        if sep:
            return HF_HUB_PREFIX + ref, None
        raise ValueError(
            f"CLIP model {ref!r}: give 'hf-hub:org/name', 'ARCH/pretrained_tag' (e.g. ViT-L-14/openai), "
            f"a local directory or random:<preset|config>"
        )

    def save(self, directory: str | Path) -> None:
        """open_clip_config.json + weights: `load(directory)` rebuilds this exact model."""
        from open_clip.model import get_model_preprocess_cfg

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        pp_cfg = {k: v for k, v in get_model_preprocess_cfg(self.model).items()}
        (directory / CONFIG_FILE).write_text(
            json.dumps({"model_cfg": self.model_cfg, "preprocess_cfg": pp_cfg}, indent=2, default=list)
        )
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        torch.save(state, directory / WEIGHTS_FILE)

    # ----------------------------------------------------------------- encoding
    @property
    def image_size(self) -> int | tuple[int, int]:
        return self.model.visual.image_size

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """[n, embed_dim] float32 on CPU, L2-normalised (cosine = dot product)."""
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in chunk]).to(self.device)
            out.append(self.model.encode_image(pixels, normalize=True).float().cpu())
        if not out:
            return torch.zeros((0, self.embed_dim))
        return torch.cat(out)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """[n, embed_dim] float32 on CPU, L2-normalised."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        if not out:
            return torch.zeros((0, self.embed_dim))
        return torch.cat(out)

    def similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity, [len(images), len(texts)]."""
        return self.encode_images(images) @ self.encode_texts(texts).T

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[1])
        return int(self.model_cfg.get("embed_dim", 0))
