"""The benchmark's CLIP scorer: a small open_clip model that plays the role of a PRETRAINED CLIP.

Why train one: no CLIP weights can be downloaded here, and a random CLIP scores every pair alike,
so the clip_score filter would be a coin toss. A pretrained CLIP has never seen the images it
filters, nor the errors of the specialists that labelled them. So ours:

- trains on its OWN generated world (world seed `ClipConfig.world_seed`, split `clip_train`,
  `images` images, more than the benchmark's splits): neither the specialists' images nor the
  held-out images (other seed AND other split name: world.make_image keys its random stream on
  both); the benchmark world is only read to MEASURE the model;
- sees image/caption pairs (brief and detailed), object-crop/region-text pairs (brief and
  category, crops jittered like a detector's boxes) and sign-crop/OCR-string pairs, each image
  row with one hard negative text from THIS module's corruption model (`corrupt_caption`,
  `corrupt_region_text`, `corrupt_ocr_text`: string edits of the true text, NegCLIP style),
  which is not the specialists' error model (specialists.py corrupts the scene and re-words it);
- is measured before use: ROC AUC of true vs corrupted pairs per pair type on its own
  calibration split (`clip_calib`), and on the benchmark's train and held-out truth
  (`heldout_auc`); the filter's thresholds are the Youden-optimal cut on the CALIBRATION split
  (a benchmark number never sets a threshold);
- is cached by its configuration's hash (`cache/clip-<hash>/`): several benchmark world seeds
  reuse one trained CLIP, as they would one pretrained checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.quality.language import CATEGORIES, COLOURS, NUMBERS, PLURALS, SIZES
from bench.quality.world import GENERATOR_VERSION, SIGN_WORDS, WorldConfig, image_dir, load_truth, write_world

PAIR_TYPES = ("caption", "region", "ocr")
FILTER_TYPE = {"caption": "text", "region": "region", "ocr": "region"}  # clip_score's per-type thresholds
CLIP_SPLITS = ("clip_train", "clip_calib")  # the CLIP's own world's splits (world.ALL_SPLITS)


@dataclass(frozen=True)
class ClipConfig:
    embed_dim: int = 128
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 3
    text_width: int = 128
    text_layers: int = 2
    steps: int = 1000  # cached by configuration: trained once for every benchmark world seed
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 100
    crop_jitter: float = 0.08
    variants: int = 4  # jittered copies of each image's pairs (and fresh hard negatives) in the pool
    seed: int = 0
    world_seed: int = 1000  # the CLIP's own world (never a benchmark world: other split names too)
    images: int = 384  # clip_train images (the default benchmark world has 64 + 32)
    calib_images: int = 96  # clip_calib images: the thresholds' Youden cut

    def key(self) -> str:
        """Hash of everything that makes this CLIP: the cache folder's name."""
        blob = json.dumps({"config": asdict(self), "generator_version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

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


# ------------------------------------------------------------- the CLIP's corruption model
# String edits of a true text (NegCLIP-style hard negatives). Deliberately NOT the specialists'
# error model (specialists.py corrupts the scene - omits, adds, swaps objects - and re-words it in
# the captioner's templates): a pretrained CLIP never saw the errors of the models it filters.
_SWAPS = {"left": "right", "right": "left", "above": "below", "below": "above", "top": "bottom", "bottom": "top"}
_CATEGORY_WORDS = {**{c: c for c in CATEGORIES if c != "sign"}, **{PLURALS[c]: c for c in CATEGORIES if c != "sign"}}


def _replace_token(words: list[str], i: int, new: str) -> str:
    old = words[i]
    core = old.strip('.,"')
    new_word = new[:1].upper() + new[1:] if core[:1].isupper() else new
    words[i] = old.replace(core, new_word, 1)
    return " ".join(words)


def corrupt_caption(text: str, rng: random.Random) -> str:
    """One edit of a caption's words: a colour, a category (number kept), a count, a size, a
    spatial word (left/right, above/below, top/bottom) replaced, or two colour words exchanged
    (attribute binding); a text with none of those gets a clause added."""
    words = text.split()
    core = [w.strip('.,"').lower() for w in words]
    edits = []
    edits += [("colour", i) for i, w in enumerate(core) if w in COLOURS]
    edits += [("category", i) for i, w in enumerate(core) if w in _CATEGORY_WORDS]
    edits += [("number", i) for i, w in enumerate(core) if w in NUMBERS[2:]]
    edits += [("size", i) for i, w in enumerate(core) if w in SIZES]
    edits += [("spatial", i) for i, w in enumerate(core) if w in _SWAPS]
    colour_slots = [i for i, w in enumerate(core) if w in COLOURS]
    if len({core[i] for i in colour_slots}) > 1:
        edits.append(("bind", -1))
    if not edits:
        return text + " There is also a red star."
    kind, i = rng.choice(edits)
    if kind == "colour":
        return _replace_token(words, i, rng.choice([c for c in COLOURS if c != core[i]]))
    if kind == "category":
        singular = _CATEGORY_WORDS[core[i]]
        new = rng.choice([c for c in _CATEGORY_WORDS.values() if c != singular])
        return _replace_token(words, i, PLURALS[new] if core[i] != singular else new)
    if kind == "number":
        return _replace_token(words, i, rng.choice([n for n in NUMBERS[2:7] if n != core[i]]))
    if kind == "size":
        return _replace_token(words, i, "large" if core[i] == "small" else "small")
    if kind == "spatial":
        return _replace_token(words, i, _SWAPS[core[i]])
    a, b = rng.choice([(a, b) for a in colour_slots for b in colour_slots if a < b and core[a] != core[b]])
    ca, cb = core[a], core[b]
    _replace_token(words, a, cb)
    return _replace_token(words, b, ca)


def corrupt_region_text(text: str, rng: random.Random) -> str:
    """A region text ('large red ball', 'ball') with its colour, category or size word replaced."""
    return corrupt_caption(text, rng)


def corrupt_ocr_text(text: str, rng: random.Random) -> str:
    """An OCR string with one or two characters substituted, or another sign word (half each)."""
    if rng.random() < 0.5 or not re.search(r"[A-Za-z0-9]", text):
        return rng.choice([w for w in SIGN_WORDS if w != text])
    chars = list(text)
    slots = [i for i, ch in enumerate(chars) if ch.isalnum()]
    for i in rng.sample(slots, min(len(slots), rng.choice((1, 2)))):
        pool = "0123456789" if chars[i].isdigit() else ("ABCDEFGHIJKLMNOPQRSTUVWXYZ" if chars[i].isupper() else "abcdefghijklmnopqrstuvwxyz")
        chars[i] = rng.choice([c for c in pool if c != chars[i]])
    out = "".join(chars)
    return out if out != text else text + "S"


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
        out.append(Pair("caption", truth["file"], None, truth["captions"][tier], corrupt_caption(truth["captions"][tier], rng)))
    w, h = truth["width"], truth["height"]
    for o in truth["objects"]:
        out.append(Pair("region", truth["file"], jitter_box(o["box"], jitter, w, h, rng), o["brief"], corrupt_region_text(o["brief"], rng)))
        if o["category"] != "sign":
            out.append(Pair("region", truth["file"], jitter_box(o["box"], jitter, w, h, rng), o["category"],
                            corrupt_region_text(o["category"], rng)))
    for t in truth["texts"]:
        out.append(Pair("ocr", truth["file"], jitter_box(t["box"], jitter, w, h, rng), t["text"], corrupt_ocr_text(t["text"], rng)))
    return out


class PairImages:
    """The pixels of a pair (whole image or crop), preprocessed by the model's own transform."""

    def __init__(self, world: Path, files: dict[str, str], preprocess):
        from PIL import Image

        self.images = {}
        for f, split in files.items():
            with Image.open(image_dir(world, split) / f) as im:
                self.images[f] = im.convert("RGB")
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
    """Per pair type: ROC AUC of true vs corrupted pairs of one split's truth, and the scores."""
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
        auc = _auc(p_s, n_s)
        out[kind] = {"pairs": len(idx), "auc": None if auc is None else round(auc, 4),
                     "mean_true": round(float(np.mean(p_s)), 4) if p_s else None,
                     "mean_corrupted": round(float(np.mean(n_s)), 4) if n_s else None, "_pos": p_s, "_neg": n_s}
    return out


def heldout_auc(model_dir: str | Path, world: str | Path, split: str = "heldout") -> dict[str, float | None]:
    """ROC AUC of the CLIP at `model_dir` on `split` of the benchmark world: true pairs of that
    split's truth against this module's hard negatives, per pair type {'region', 'caption', 'ocr'}
    (None: no pair of that type). clip_score's rule for a pair type is FILTER_TYPE[type]:
    caption -> 'text', region and ocr -> 'region' (OCR lines are regions to clip_score)."""
    from annotators.clip_model import ClipModel

    clip = ClipModel.load(str(model_dir))
    return {kind: v["auc"] for kind, v in evaluate_clip(clip, Path(world), split).items()}


def clip_cache_dir(cfg: ClipConfig, cache: str | Path) -> Path:
    """Where the CLIP of this configuration lives: cache/clip-<hash>/ (model/, world/, trained.json)."""
    return Path(cache) / f"clip-{cfg.key()}"


def _strip(measured: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in measured.items()}


def _train(cfg: ClipConfig, home: Path, log=print) -> dict:
    """Generate the CLIP's own world, train, calibrate; home/model + home/trained.json."""
    import torch
    import torch.nn.functional as F

    from annotators.clip_model import ClipModel

    t0 = time.perf_counter()
    world = home / "world"
    write_world(world, WorldConfig(seed=cfg.world_seed), splits={"clip_train": cfg.images, "clip_calib": cfg.calib_images})
    home.mkdir(parents=True, exist_ok=True)
    cfg_path = home / "random_config.json"
    cfg_path.write_text(json.dumps(cfg.model_config()))
    torch.manual_seed(cfg.seed)
    clip = ClipModel.load(f"random:{cfg_path}")  # CUDA when there is one (the --gpu size)
    device = clip.device
    truth = load_truth(world, ["clip_train"])
    rng = random.Random(cfg.seed)
    images = PairImages(world, {f: "clip_train" for f in truth}, clip.preprocess)
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
    clip.save(home / "model")
    train_seconds = time.perf_counter() - t0
    calib = evaluate_clip(clip, world, "clip_calib")
    thresholds: dict[str, float | None] = {}
    for ftype in ("region", "text"):
        kinds = [k for k, v in FILTER_TYPE.items() if v == ftype]
        cut = _youden([s for k in kinds for s in calib[k]["_pos"]], [s for k in kinds for s in calib[k]["_neg"]])
        thresholds[ftype] = None if cut is None else round(cut, 4)
    trained = {"config": asdict(cfg), "key": cfg.key(), "first_loss": round(losses[0], 4),
               "last_loss": round(float(np.mean(losses[-20:])), 4), "train_seconds": round(train_seconds, 1),
               "images": {"clip_train": cfg.images, "clip_calib": cfg.calib_images},
               "auc_clip_calib": _strip(calib), "thresholds": thresholds}
    (home / "trained.json").write_text(json.dumps(trained, indent=1))
    return trained


def train_clip(world: str | Path, out_dir: str | Path, cfg: ClipConfig = ClipConfig(), log=print,
               cache: str | Path | None = None) -> dict:
    """The CLIP of `cfg` (trained once per configuration in `cache`, default out_dir/../clip_cache),
    copied to out_dir (the `clip` alias points there), measured on the benchmark `world`'s train
    and held-out truth (never trained on); returns the report (also out_dir/clip_report.json):
    config, losses, seconds, `auc` {clip_calib, train, heldout} x pair type, `thresholds`
    {region, text} (Youden cut on clip_calib), `reused` (the cache had it)."""
    from annotators.clip_model import ClipModel

    world, out_dir = Path(world), Path(out_dir)
    home = clip_cache_dir(cfg, cache if cache is not None else out_dir.parent / "clip_cache")
    t0 = time.perf_counter()
    reused = (home / "trained.json").exists()
    trained = json.loads((home / "trained.json").read_text()) if reused else _train(cfg, home, log)
    if reused:
        log(f"clip: reusing {home} (same configuration)")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(home / "model", out_dir)
    clip = ClipModel.load(str(out_dir))
    measured = {split: _strip(evaluate_clip(clip, world, split)) for split in ("train", "heldout")}
    report = {
        **{k: trained[k] for k in ("config", "key", "first_loss", "last_loss", "train_seconds", "images", "thresholds")},
        "world": json.loads((world / "world.json").read_text()), "model_dir": str(out_dir), "cache_dir": str(home),
        "reused": reused, "seconds": round(time.perf_counter() - t0, 1),
        "auc": {"clip_calib": trained["auc_clip_calib"], **measured},
    }
    (out_dir / "clip_report.json").write_text(json.dumps(report, indent=1))
    return report
