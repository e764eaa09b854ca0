"""ClipModel: every reference form builds the real open_clip classes, seeded, and round-trips."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from annotators.clip_model import WEIGHTS_FILE, ClipModel
from engine.models import OPEN_CLIP_CONFIG_FILE as CONFIG_FILE

torch.set_num_threads(1)  # 2 threads on 2 shared cores spin against the other jobs


@pytest.fixture(scope="module")
def pil_photos(photos) -> list[Image.Image]:
    return [Image.open(io.BytesIO(photos[n])).convert("RGB") for n in ("astronaut", "coffee", "chelsea")]


@pytest.fixture(scope="module")
def tiny() -> ClipModel:
    return ClipModel.load("random:tiny", device="cpu")


def test_tiny_is_real_clip_and_normalised(tiny, pil_photos):
    import open_clip

    assert isinstance(tiny.model, open_clip.CLIP)
    assert tiny.revision.startswith("random-")
    img = tiny.encode_images(pil_photos, batch_size=2)  # two chunks
    txt = tiny.encode_texts(["an astronaut", "a cup of coffee", "a cat", "a rocket"], batch_size=3)
    assert img.shape == (3, 32) and txt.shape == (4, 32)
    assert torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(4), atol=1e-5)
    # different photos give different embeddings (the model looks at pixels)
    assert (img[0] - img[1]).abs().max() > 1e-4


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


def _square(colour: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A noisy square of one colour (another sample each call)."""
    noise = rng.normal(0, 25, (size, size, 3))
    return Image.fromarray(np.clip(np.array(COLOURS[colour])[None, None] + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def colour_clip() -> ClipModel:
    """random:tiny taught four known image-text pairs ("a red square" <-> red squares, ...) with CLIP's own
    contrastive loss through ClipModel's preprocess and tokenizer: a model whose right answers are known."""
    clip = ClipModel.load("random:tiny", device="cpu")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    tokens = clip.tokenizer([f"a {n} square" for n in names])
    optimizer = torch.optim.Adam(clip.model.parameters(), lr=3e-3)
    clip.model.train()
    for _ in range(60):
        pixels = torch.stack([clip.preprocess(_square(n, rng)) for n in names])
        logits = 20 * clip.model.encode_image(pixels, normalize=True) @ clip.model.encode_text(tokens, normalize=True).T
        target = torch.arange(len(names))
        loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    clip.model.eval()
    return clip


@pytest.mark.timeout(300)
def test_similarity_ranks_known_pairs(colour_clip):
    """Rows are images, columns texts, in the order given: unseen squares find their own colour's text
    (whatever the text order and batch chunking), and each text its own colour's square."""
    rng = np.random.default_rng(1)  # other samples than the training ones
    images = [_square(c, rng) for c in ("blue", "red", "yellow")]
    texts = ["a yellow square", "a green square", "a blue square", "a red square"]
    sim = colour_clip.similarity(images, texts)
    assert sim.shape == (3, 4)
    assert sim.argmax(dim=1).tolist() == [2, 3, 0]
    assert sim.argmax(dim=0)[[0, 2, 3]].tolist() == [2, 0, 1]
    chunked = colour_clip.encode_images(images, batch_size=2) @ colour_clip.encode_texts(texts, batch_size=3).T
    assert chunked.argmax(dim=1).tolist() == [2, 3, 0]


def test_random_is_deterministic(tiny, pil_photos):
    again = ClipModel.load("random:tiny", device="cpu")
    assert again.revision == tiny.revision
    assert torch.equal(again.encode_images(pil_photos), tiny.encode_images(pil_photos))


def test_save_load_round_trip(tiny, pil_photos, tmp_path):
    tiny.save(tmp_path / "clip")
    assert (tmp_path / "clip" / CONFIG_FILE).is_file() and (tmp_path / "clip" / WEIGHTS_FILE).is_file()
    texts = ["an astronaut in a suit", "a cup"]
    for ref in (str(tmp_path / "clip"), "local-dir:" + str(tmp_path / "clip")):
        loaded = ClipModel.load(ref, device="cpu")
        assert loaded.revision.startswith("local-")
        assert torch.equal(loaded.encode_images(pil_photos), tiny.encode_images(pil_photos))
        assert torch.equal(loaded.encode_texts(texts), tiny.encode_texts(texts))


def test_random_from_config_file_and_arch(tmp_path, pil_photos):
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path / "clip.json"
    path.write_text(json.dumps(cfg))
    model = ClipModel.load(f"random:{path}", device="cpu")
    assert model.encode_images(pil_photos[:1]).shape == (1, 16)
    assert model.tokenizer(["a"]).shape == (1, 16)
    # a real open_clip architecture by name, random weights
    b32 = ClipModel.load("random:ViT-B-32", device="cpu")
    assert b32.model.visual.image_size == (224, 224)
    assert b32.encode_texts(["a cat"]).shape == (1, 512)


def test_bad_references_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        ClipModel.load("random:no-such-arch", device="cpu")
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        ClipModel.load(str(tmp_path), device="cpu")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="vision_cfg"):
        ClipModel.load(f"random:{bad}", device="cpu")
    with pytest.raises(ValueError, match="ARCH/pretrained_tag"):
        ClipModel.load("ViT-L-14", device="cpu")
