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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from engine.models import OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_HUB_PREFIX, OPEN_CLIP_LOCAL_PREFIX, parse_model_ref

WEIGHTS_FILE = "open_clip_pytorch_model.bin"


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
        local = ref[len(OPEN_CLIP_LOCAL_PREFIX):] if ref.startswith(OPEN_CLIP_LOCAL_PREFIX) else None
        if local is not None or ref.startswith(OPEN_CLIP_HUB_PREFIX):
            parsed = parse_model_ref(local) if local is not None else None
        else:
            parsed = parse_model_ref(ref)

        if parsed is not None and parsed.kind == "random":
            from engine.random_models.open_clip import build_open_clip

            model, preprocess, tokenizer, model_cfg = build_open_clip(parsed)
            revision = parsed.revision
        elif parsed is not None and parsed.kind == "local":
            directory = Path(parsed.location)
            config_path = directory / OPEN_CLIP_CONFIG_FILE
            if not config_path.is_file():
                raise FileNotFoundError(f"{directory}: not an open_clip model directory (no {OPEN_CLIP_CONFIG_FILE})")
            model_cfg = json.loads(config_path.read_text()).get("model_cfg")
            if model_cfg is None:
                raise ValueError(f"{config_path}: missing the 'model_cfg' key")
            name = OPEN_CLIP_LOCAL_PREFIX + str(directory)
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

        if ref.startswith(OPEN_CLIP_HUB_PREFIX):
            return ref, None
        arch, sep, tag = ref.partition("/")
        if sep and arch in open_clip.list_models():
            return arch, tag
        if sep:
            return OPEN_CLIP_HUB_PREFIX + ref, None
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
        (directory / OPEN_CLIP_CONFIG_FILE).write_text(
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
