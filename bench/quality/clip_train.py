"""The benchmark's CLIP scorer: a small open_clip model trained contrastively on the world's
train split, saved as a local model directory the `clip` alias points at.

Why train one: no CLIP weights can be downloaded here, and a random CLIP scores every pair
alike, so the clip_score filter would be a coin toss. The paper's domain-adapted scorer
(UniCL-style) is trained on the data it filters; ours sees image/caption pairs (brief and
detailed), object-crop/region-text pairs (brief and category, crops jittered like a detector's
boxes) and sign-crop/OCR-string pairs. Each image row of a batch also gets one hard negative
text (the same caption or region text with one colour, category or word swapped, NegCLIP
style), so the model learns the attribute errors the specialists make, not only which image a
text belongs to.

Before the filter uses it, it is measured: ROC AUC of true vs corrupted pairs, per pair type,
on the held-out split (never trained on) and the train split; the filter's thresholds are the
Youden-optimal cut on the TRAIN split's pairs (a held-out number never sets a threshold).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.quality.language import CATEGORIES, COLOURS
from bench.quality.world import SIGN_WORDS, describe, image_dir, load_truth

PAIR_TYPES = ("caption", "region", "ocr")
FILTER_TYPE = {"caption": "text", "region": "region", "ocr": "region"}  # clip_score's per-type thresholds


@dataclass(frozen=True)
class ClipConfig:
    embed_dim: int = 128
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 3
    text_width: int = 128
    text_layers: int = 2
    steps: int = 250
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 40
    crop_jitter: float = 0.08
    variants: int = 4  # jittered copies of each image's pairs (and fresh hard negatives) in the pool
    seed: int = 0

    def model_config(self) -> dict:
        return {
            "model_cfg": {
                "embed_dim": self.embed_dim,
                "vision_cfg": {"image_size": self.image_size, "layers": self.layers, "width": self.width,
                               "head_width": 64, "patch_size": self.patch_size},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": self.text_width,
                             "heads": max(1, self.text_width // 64), "layers": self.text_layers},
            },
            # squash, not centre-crop: a 5:1 sign crop must stay whole
            "preprocess_cfg": {"resize_mode": "squash", "interpolation": "bicubic"},
        }


@dataclass
class Pair:
    kind: str  # caption | region | ocr
    file: str
    box: list[float] | None  # None: the whole image
    text: str
    negative: str  # the same text with one attribute / word swapped


def _swap_word(text: str, rng: random.Random) -> str:
    """One colour or category word of a region text replaced by another."""
    words = text.split()
    slots = [i for i, w in enumerate(words) if w in COLOURS or w in CATEGORIES]
    if not slots:
        return other_word(text, SIGN_WORDS, rng)
    i = rng.choice(slots)
    pool = list(COLOURS) if words[i] in COLOURS else [c for c in CATEGORIES if c != "sign"]
    words[i] = rng.choice([w for w in pool if w != words[i]])
    return " ".join(words)


def other_word(text: str, pool, rng: random.Random) -> str:
    return rng.choice([w for w in pool if w != text])


def _corrupt_caption(truth: dict, tier: str, rng: random.Random) -> str:
    """The true caption of a scene with one group's colour or category swapped, or one object added."""
    objects = [dict(o) for o in truth["objects"]]
    keys = sorted({(o["category"], o["colour"]) for o in objects})
    choice = rng.random()
    if keys and choice < 0.7:
        cat, col = rng.choice(keys)
        swap_colour = choice < 0.35 or cat == "sign"
        new = rng.choice([c for c in COLOURS if c != col]) if swap_colour else rng.choice([c for c in CATEGORIES if c not in (cat, "sign")])
        for o in objects:
            if (o["category"], o["colour"]) == (cat, col):
                o["colour" if swap_colour else "category"] = new
    else:
        w, h = truth["width"], truth["height"]
        box = [0.3 * w, 0.3 * h, 0.6 * w, 0.6 * h]
        objects.append({"id": 999, "category": rng.choice([c for c in CATEGORIES if c != "sign"]),
                        "colour": rng.choice(list(COLOURS)), "size": None, "box": box, "area": 1e9})
    out = describe(objects, tuple(truth["background"]), truth["width"], truth["height"], truth["style"])[tier].text
    return out if out != truth["captions"][tier] else out + " There is also a red star."


def jitter_box(box: list[float], jitter: float, width: int, height: int, rng: random.Random) -> list[float]:
    """Each side moved by N(0, jitter x the box side): crops like a detector's boxes."""
    if not jitter:
        return list(box)
    bw, bh = box[2] - box[0], box[3] - box[1]
    b = [box[0] + rng.gauss(0, jitter * bw), box[1] + rng.gauss(0, jitter * bh),
         box[2] + rng.gauss(0, jitter * bw), box[3] + rng.gauss(0, jitter * bh)]
    return [max(0.0, min(b[0], b[2] - 2)), max(0.0, min(b[1], b[3] - 2)), min(float(width), max(b[2], b[0] + 2)),
            min(float(height), max(b[3], b[1] + 2))]


def pairs_of(truth: dict, rng: random.Random, jitter: float = 0.0) -> list[Pair]:
    """Every true pair of one image, each with its hard negative; boxes jittered by `jitter`."""
    out = []
    for tier in ("brief", "detailed"):
        out.append(Pair("caption", truth["file"], None, truth["captions"][tier], _corrupt_caption(truth, tier, rng)))
    w, h = truth["width"], truth["height"]
    for o in truth["objects"]:
        out.append(Pair("region", truth["file"], jitter_box(o["box"], jitter, w, h, rng), o["brief"], _swap_word(o["brief"], rng)))
        out.append(Pair("region", truth["file"], jitter_box(o["box"], jitter, w, h, rng), o["category"], _swap_word(o["category"], rng)))
    for t in truth["texts"]:
        out.append(Pair("ocr", truth["file"], jitter_box(t["box"], jitter, w, h, rng), t["text"], other_word(t["text"], SIGN_WORDS, rng)))
    return out


class PairImages:
    """The pixels of a pair (whole image or crop), preprocessed by the model's own transform."""

    def __init__(self, world: Path, files: dict[str, str], preprocess):
        from PIL import Image

        self.images = {f: Image.open(image_dir(world, split) / f).convert("RGB") for f, split in files.items()}
        self.preprocess = preprocess

    def tensor(self, pair: Pair, augment: tuple[float, random.Random] | None = None):
        """The pair's pixels; with `augment` = (jitter, rng) (training): the crop box jittered
        afresh, object crops mirrored at random, brightness within +-15 % (no colour name changes)."""
        from PIL import ImageEnhance, ImageOps

        from filters.clip_score import crop_box

        img = self.images[pair.file]
        box = pair.box
        if augment is not None and box is not None:
            jitter, rng = augment
            box = jitter_box(box, jitter, img.width, img.height, rng)
        pixels = img if box is None else crop_box(img, box)
        if augment is not None:
            rng = augment[1]
            if pair.kind == "region" and rng.random() < 0.5:
                pixels = ImageOps.mirror(pixels)
            pixels = ImageEnhance.Brightness(pixels).enhance(rng.uniform(0.85, 1.15))
        return self.preprocess(pixels)


def _auc(pos: list[float], neg: list[float]) -> float | None:
    from scipy.stats import mannwhitneyu

    if not pos or not neg:
        return None
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def _youden(pos: list[float], neg: list[float]) -> float | None:
    """The cut maximising TPR - FPR (kept = score >= cut)."""
    if not pos or not neg:
        return None
    best, cut = -1.0, None
    for c in sorted(set(pos) | set(neg)):
        j = np.mean(np.asarray(pos) >= c) - np.mean(np.asarray(neg) >= c)
        if j > best:
            best, cut = j, c
    return float(cut)


def score_pairs(clip, pairs: list[Pair], images: PairImages, batch_size: int = 128) -> tuple[list[float], list[float]]:
    """Cosine of each pair's pixels with its true text and with its corrupted text."""
    import torch

    pos, neg = [], []
    with torch.inference_mode():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            im = clip.model.encode_image(torch.stack([images.tensor(p) for p in chunk]).to(clip.device), normalize=True)
            tp = clip.model.encode_text(clip.tokenizer([p.text for p in chunk]).to(clip.device), normalize=True)
            tn = clip.model.encode_text(clip.tokenizer([p.negative for p in chunk]).to(clip.device), normalize=True)
            pos += (im * tp).sum(-1).tolist()
            neg += (im * tn).sum(-1).tolist()
    return pos, neg


def evaluate_clip(clip, world: Path, split: str, seed: int = 1) -> dict[str, dict]:
    """Per pair type: ROC AUC of true vs corrupted pairs and the scores (for thresholds)."""
    truth = load_truth(world, [split])
    rng = random.Random(f"{seed}:{split}:eval")
    pairs = [p for t in truth.values() for p in pairs_of(t, rng, jitter=0.05)]
    images = PairImages(world, {f: split for f in truth}, clip.preprocess)
    clip.model.eval()
    pos, neg = score_pairs(clip, pairs, images)
    out = {}
    for kind in PAIR_TYPES:
        idx = [i for i, p in enumerate(pairs) if p.kind == kind]
        p_s, n_s = [pos[i] for i in idx], [neg[i] for i in idx]
        out[kind] = {"pairs": len(idx), "auc": None if _auc(p_s, n_s) is None else round(_auc(p_s, n_s), 4),
                     "mean_true": round(float(np.mean(p_s)), 4) if p_s else None,
                     "mean_corrupted": round(float(np.mean(n_s)), 4) if n_s else None, "_pos": p_s, "_neg": n_s}
    return out


def train_clip(world: str | Path, out_dir: str | Path, cfg: ClipConfig = ClipConfig(), log=print) -> dict:
    """Train, measure, save; returns the report (also written to out_dir/clip_report.json).
    A finished model with the same config in out_dir is reused."""
    import torch
    import torch.nn.functional as F

    from annotators.clip_model import ClipModel

    world, out_dir = Path(world), Path(out_dir)
    report_path = out_dir / "clip_report.json"
    if report_path.exists():
        done = json.loads(report_path.read_text())
        if done.get("config") == asdict(cfg) and done.get("world") == json.loads((world / "world.json").read_text()):
            return done
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "random_config.json"
    cfg_path.write_text(json.dumps(cfg.model_config()))
    torch.manual_seed(cfg.seed)
    clip = ClipModel.load(f"random:{cfg_path}")  # CUDA when there is one (the --gpu size)
    device = clip.device
    truth = load_truth(world, ["train"])
    rng = random.Random(cfg.seed)
    images = PairImages(world, {f: "train" for f in truth}, clip.preprocess)
    model = clip.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    losses = []
    # true boxes here; every draw jitters its crop afresh (PairImages.tensor), the variants vary the hard negatives
    pool = [p for name in sorted(truth) for _ in range(cfg.variants) for p in pairs_of(truth[name], rng)]
    for step in range(cfg.steps):
        pairs, seen = [], set()
        while len(pairs) < min(cfg.batch_size, len({p.text for p in pool})):  # distinct texts: no false negatives
            cand = rng.choice(pool)
            if cand.text not in seen:
                seen.add(cand.text)
                pairs.append(cand)
        pixels = torch.stack([images.tensor(p, (cfg.crop_jitter, rng)) for p in pairs]).to(device)
        texts = clip.tokenizer([p.text for p in pairs] + [p.negative for p in pairs]).to(device)
        im = model.encode_image(pixels, normalize=True)
        tx = model.encode_text(texts, normalize=True)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * im @ tx.T  # [B, 2B]: columns B.. are the hard negatives
        target = torch.arange(len(pairs), device=device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : len(pairs)].T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            log(f"clip step {step + 1}/{cfg.steps}: loss {np.mean(losses[-50:]):.3f}")
    model.eval()
    clip.save(out_dir)
    train_seconds = time.perf_counter() - t0
    measured = {split: evaluate_clip(clip, world, split) for split in ("train", "heldout")}
    thresholds: dict[str, float | None] = {}
    for ftype in ("region", "text"):
        kinds = [k for k, v in FILTER_TYPE.items() if v == ftype]
        pos = [s for k in kinds for s in measured["train"][k]["_pos"]]
        neg = [s for k in kinds for s in measured["train"][k]["_neg"]]
        cut = _youden(pos, neg)
        thresholds[ftype] = None if cut is None else round(cut, 4)
    for split in measured.values():
        for v in split.values():
            v.pop("_pos"), v.pop("_neg")
    report = {
        "config": asdict(cfg), "world": json.loads((world / "world.json").read_text()),
        "model_dir": str(out_dir), "first_loss": round(losses[0], 4), "last_loss": round(float(np.mean(losses[-20:])), 4),
        "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
        "auc": measured, "thresholds": thresholds,
    }
    report_path.write_text(json.dumps(report, indent=1))
    return report
