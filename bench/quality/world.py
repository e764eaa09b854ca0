"""A generated world with exact ground truth for every FLD-5B annotation type.

Each image is a textured background with 2-6 objects of 10 categories (colour, size, free
placement, partial occlusion) and 0-2 signs carrying a rendered text line (several fonts and
sizes, rotated). Its truth: brief and detailed captions (objects, attributes, counts, positions,
spatial relations, sign texts), object boxes + category + brief region text, visible instance
masks (COCO RLE), OCR quads + strings, and caption phrases linked to their object ids.

Everything is a function of (seed, split, index): `write_world` makes the same images and truth
on every call (fonts come from matplotlib's bundled DejaVu set when installed, so the pixels do
not depend on the fonts a machine happens to have). Truth is read back by file name
(`load_truth`), which is how the simulated specialists and the metrics find it from a record's uri.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from bench.quality.language import (
    BACKGROUND_COLOURS,
    CATEGORIES,
    COLOURS,
    PATTERNS,
    Group,
    brief_caption,
    detailed_caption,
    parse_relations,
)
from schemas.geometry import mask_to_rle

SPLITS = ("train", "heldout")  # the benchmark's splits
# Every split name a world can hold; its position keys the split's random stream, so a split's
# images differ from every other split's at any seed. clip_train / clip_calib are the CLIP
# scorer's own world (clip_train.py): neither the specialists' nor the held-out images.
ALL_SPLITS = SPLITS + ("clip_train", "clip_calib")
SHAPES = tuple(c for c in CATEGORIES if c != "sign")
SIGN_COLOURS = ("white", "yellow", "blue", "red", "black", "green")
SIGN_WORDS = (
    "OPEN", "EXIT", "SALE", "CAFE", "PARKING", "HOTEL", "TAXI", "BAKERY", "PHARMACY", "MARKET",
    "LIBRARY", "TICKETS", "GARDEN", "MUSEUM", "Welcome", "Bakery", "Open", "Station", "Fresh Bread",
)
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    n_train: int = 64
    n_heldout: int = 32
    min_side: int = 160  # image sides are drawn in [min_side, max_side], multiples of 8
    max_side: int = 352
    objects: tuple[int, int] = (2, 6)  # non-sign objects per image, inclusive
    sign_prob: float = 0.6  # an image has a sign
    second_sign_prob: float = 0.25  # ... and a second one
    repeat_prob: float = 0.25  # an object copies an earlier object's colour and category (counts)
    max_repeat: int = 3  # objects of one colour and category at most
    min_visible: float = 0.5  # occlusion never hides more than half of an object
    object_size: tuple[float, float] = (0.14, 0.42)  # object side / image min side
    font_size: tuple[int, int] = (12, 26)  # text height in pixels
    max_angle: float = 25.0  # sign rotation, degrees either way
    text_margin: float = 0.3  # a text line's quad: its ink box grown by this x the ink height


# --------------------------------------------------------------------------- fonts
def available_fonts() -> list[str]:
    """'pillow' (Pillow's bundled scalable font) + DejaVu fonts: matplotlib's bundled copies when
    matplotlib is installed (the same files everywhere), else the system's, if any."""
    names = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
    dirs = []
    try:
        import matplotlib

        dirs.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf")
    except ImportError:
        pass
    dirs.append(Path("/usr/share/fonts/truetype/dejavu"))
    for d in dirs:
        found = [str(d / n) for n in names if (d / n).is_file()]
        if found:
            return ["pillow"] + found
    return ["pillow"]


def load_font(name: str, size: int):
    return ImageFont.load_default(size=size) if name == "pillow" else ImageFont.truetype(name, size)


# -------------------------------------------------------------------------- shapes
def _poly(draw, pts, fill=255):
    draw.polygon([(float(x), float(y)) for x, y in pts], fill=fill)


def _rotated(pts, cx, cy, degrees):
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in pts]


def shape_mask(category: str, cx: float, cy: float, side: float, rotation: float, width: int, height: int) -> np.ndarray:
    """Full (unoccluded) mask of one object drawn in a side x side square centred at (cx, cy)."""
    img = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(img)
    r = side / 2
    if category == "ball":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif category == "box":
        q = 0.85 * r
        _poly(d, _rotated([(cx - q, cy - q), (cx + q, cy - q), (cx + q, cy + q), (cx - q, cy + q)], cx, cy, rotation))
    elif category == "cone":
        _poly(d, _rotated([(cx, cy - r), (cx + 0.8 * r, cy + r), (cx - 0.8 * r, cy + r)], cx, cy, rotation / 3))
    elif category == "star":
        pts = [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(math.pi * k / 5 - math.pi / 2),
                cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(math.pi * k / 5 - math.pi / 2)) for k in range(10)]
        _poly(d, _rotated(pts, cx, cy, rotation))
    elif category == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        q = 0.55 * r
        d.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
    elif category == "cross":
        t = 0.34 * r
        _poly(d, _rotated([(cx - r, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx - r, cy + t)], cx, cy, rotation))
        _poly(d, _rotated([(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy + r), (cx - t, cy + r)], cx, cy, rotation))
    elif category == "heart":
        d.ellipse([cx - r, cy - 0.75 * r, cx, cy + 0.25 * r], fill=255)
        d.ellipse([cx, cy - 0.75 * r, cx + r, cy + 0.25 * r], fill=255)
        _poly(d, [(cx - 0.97 * r, cy - 0.1 * r), (cx + 0.97 * r, cy - 0.1 * r), (cx, cy + r)])
    elif category == "moon":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy, q = cx + 0.45 * r, cy - 0.2 * r, 0.85 * r
        d.ellipse([ox - q, oy - q, ox + q, oy + q], fill=0)
    elif category == "house":
        _poly(d, [(cx - 0.75 * r, cy), (cx + 0.75 * r, cy), (cx + 0.75 * r, cy + r), (cx - 0.75 * r, cy + r)])
        _poly(d, [(cx - r, cy + 0.02 * r), (cx + r, cy + 0.02 * r), (cx, cy - r)])
    else:
        raise ValueError(f"no shape for category {category!r}")
    return np.asarray(img) > 127


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, tuple[str, str]]:
    colour = list(BACKGROUND_COLOURS)[rng.integers(len(BACKGROUND_COLOURS))]
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    base = np.array(BACKGROUND_COLOURS[colour], float) + rng.uniform(-10, 10, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    if pattern == "striped":
        angle, period = rng.uniform(0, math.pi), rng.uniform(10, 24)
        t = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
        shade = 24 * (t > 0) - 12
    elif pattern == "checked":
        period = rng.uniform(12, 28)
        shade = 22 * (((xx // period) + (yy // period)) % 2) - 11
    elif pattern == "speckled":
        noise = Image.fromarray((rng.uniform(0, 255, (height, width))).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
        shade = (np.asarray(noise, float) - 127.5) * 0.9
    else:
        shade = np.zeros((height, width))
    pixels = base[None, None, :] + shade[:, :, None] + rng.normal(0, 4, (height, width, 1))
    return pixels, (pattern, colour)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: str, rng: np.random.Generator) -> None:
    """Fill the mask with the colour, a light-from-top-left shading and a little pixel noise."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return
    rgb = np.array(COLOURS[colour], float) + rng.uniform(-12, 12, 3)
    span = max(1.0, float(xs.max() - xs.min() + ys.max() - ys.min()))
    shade = 28 * (0.5 - ((xs - xs.min()) + (ys - ys.min())) / span)
    canvas[ys, xs] = rgb[None, :] + shade[:, None] + rng.normal(0, 5, (len(xs), 1))


# ---------------------------------------------------------------------------- signs
def _rotate_points(points, w, h, degrees, new_w, new_h):
    """Where points of a w x h image land after PIL's rotate(degrees, expand=True) (counter-clockwise)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    out = []
    for x, y in points:
        dx, dy = x - w / 2, y - h / 2
        out.append((new_w / 2 + dx * c + dy * s, new_h / 2 - dx * s + dy * c))
    return out


def render_sign(text: str, font_name: str, size: int, plate: str, angle: float, margin: float = 0.3):
    """(RGBA sign image, text-line quad in its pixels: clockwise from the text's top-left).

    The quad is the text's ink box grown by `margin` x its height on every side, the margin a
    text-line annotation (and an OCR detector's box) has around the glyphs."""
    font = load_font(font_name, size)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
    pad = max(3, int(0.4 * size))
    w, h = (x1 - x0) + 2 * pad, (y1 - y0) + 2 * pad
    ink = (20, 20, 20) if plate in ("white", "yellow") else (245, 245, 245)
    img = Image.new("RGBA", (w, h), COLOURS[plate] + (255,))
    ImageDraw.Draw(img).text((pad - x0, pad - y0), text, font=font, fill=ink + (255,))
    m = margin * (y1 - y0)
    corners = [(pad - m, pad - m), (w - pad + m, pad - m), (w - pad + m, h - pad + m), (pad - m, h - pad + m)]
    rotated = img.rotate(angle, resample=Image.BICUBIC, expand=True)
    quad = _rotate_points(corners, w, h, angle, rotated.width, rotated.height)
    return rotated, quad


# ---------------------------------------------------------------------------- scenes
@dataclass
class Obj:
    id: int
    category: str
    colour: str
    size: str | None
    full: np.ndarray = field(repr=False)
    text: str | None = None
    quad: list[float] | None = None
    font: str | None = None
    font_size: int | None = None
    angle: float | None = None


def _size_class(side: float, min_side: int) -> str | None:
    rel = side / min_side
    return "small" if rel < 0.2 else ("large" if rel > 0.32 else None)


def _visible_ok(objs: list[Obj], new: np.ndarray, min_visible: float) -> bool:
    """Every earlier object keeps at least min_visible of its pixels once `new` covers it."""
    cover = new.copy()
    for o in reversed(objs):
        area = o.full.sum()
        if area == 0 or (o.full & ~cover).sum() < min_visible * area:
            return False
        cover |= o.full
    return True


def _place_objects(rng, cfg: WorldConfig, width: int, height: int) -> list[Obj]:
    m = min(width, height)
    objs: list[Obj] = []
    n = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
    for _ in range(n):
        group_sizes = Counter((o.category, o.colour) for o in objs)
        repeatable = [key for key, k in group_sizes.items() if k < cfg.max_repeat]
        if repeatable and rng.random() < cfg.repeat_prob:
            category, colour = repeatable[int(rng.integers(len(repeatable)))]
        else:
            category = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        for _try in range(30):
            side = rng.uniform(*cfg.object_size) * m
            cx, cy = rng.uniform(side / 2, width - side / 2), rng.uniform(side / 2, height - side / 2)
            full = shape_mask(category, cx, cy, side, rng.uniform(-30, 30), width, height)
            if full.sum() > 30 and _visible_ok(objs, full, cfg.min_visible):
                objs.append(Obj(len(objs), category, colour, _size_class(side, m), full))
                break
    return objs


def _place_signs(rng, cfg: WorldConfig, width: int, height: int, objs: list[Obj], fonts: list[str]) -> list[tuple[Obj, Image.Image, tuple[int, int]]]:
    signs = []
    wanted = int(rng.random() < cfg.sign_prob) + int(rng.random() < cfg.second_sign_prob)
    taken = np.zeros((height, width), bool)
    for _ in range(wanted):
        text = SIGN_WORDS[int(rng.integers(len(SIGN_WORDS)))]
        if rng.random() < 0.3:
            text = f"{text} {int(rng.integers(1, 99))}"
        font = fonts[int(rng.integers(len(fonts)))]
        size = int(rng.integers(cfg.font_size[0], cfg.font_size[1] + 1))
        plate = SIGN_COLOURS[int(rng.integers(len(SIGN_COLOURS)))]
        angle = float(rng.uniform(-cfg.max_angle, cfg.max_angle))
        img, quad = render_sign(text, font, size, plate, angle, cfg.text_margin)
        if img.width >= width - 4 or img.height >= height - 4:
            continue
        for _try in range(30):
            px, py = int(rng.integers(2, width - img.width - 1)), int(rng.integers(2, height - img.height - 1))
            full = np.zeros((height, width), bool)
            full[py:py + img.height, px:px + img.width] = np.asarray(img.getchannel("A")) > 127
            if not (full & taken).any() and _visible_ok(objs, full, cfg.min_visible):
                o = Obj(len(objs), "sign", plate, None, full, text=text,
                        quad=[float(v) for x, y in quad for v in (x + px, y + py)],
                        font=os.path.basename(font), font_size=size, angle=round(angle, 2))
                objs.append(o)
                signs.append((o, img, (px, py)))
                taken |= full
                break
    return signs


def _box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def groups_of(objects: list[dict]) -> list[Group]:
    """Truth objects -> caption groups (colour + category), most salient (largest area) first."""
    by_key: dict[tuple[str, str], list[dict]] = {}
    for o in objects:
        by_key.setdefault((o["category"], o["colour"]), []).append(o)
    groups = []
    for (category, colour), members in by_key.items():
        sizes = {m["size"] for m in members}
        centres = [((m["box"][0] + m["box"][2]) / 2, (m["box"][1] + m["box"][3]) / 2) for m in members]
        groups.append(Group(
            category, colour, tuple(m["id"] for m in members),
            size=sizes.pop() if len(sizes) == 1 else None,
            centre=(float(np.mean([c[0] for c in centres])), float(np.mean([c[1] for c in centres]))),
            area=float(sum(m["area"] for m in members)),
            texts=tuple(m.get("text") or "" for m in members),
        ))
    return sorted(groups, key=lambda g: (-g.area, g.object_ids[0]))


def describe(objects: list[dict], background: tuple[str, str], width: int, height: int, style: int) -> dict:
    """Brief + detailed captions (text and phrase links) of a list of objects in the truth's wording
    (the simulated captioner has its own: captioner.py)."""
    groups = groups_of(objects)
    brief = brief_caption(groups, background)
    detailed = detailed_caption(groups, background, width, height, style=style)
    return {"brief": brief, "detailed": detailed}


def make_image(cfg: WorldConfig, split: str, index: int, fonts: list[str]) -> tuple[Image.Image, dict]:
    """One image and its truth, a pure function of (cfg.seed, split, index)."""
    if split not in ALL_SPLITS:
        raise ValueError(f"unknown split {split!r}: one of {ALL_SPLITS}")
    rng = np.random.default_rng([cfg.seed, ALL_SPLITS.index(split), index])
    width = int(rng.integers(cfg.min_side // 8, cfg.max_side // 8 + 1)) * 8
    height = int(rng.integers(cfg.min_side // 8, cfg.max_side // 8 + 1)) * 8
    canvas, background = _background(rng, width, height)
    objs = _place_objects(rng, cfg, width, height)
    for o in objs:
        _paint(canvas, o.full, o.colour, rng)
    signs = _place_signs(rng, cfg, width, height, objs, fonts)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    for _, img, pos in signs:
        image.paste(img, pos, img)
    covered = np.zeros((height, width), bool)
    truth_objects = []
    for o in reversed(objs):  # later objects are on top
        visible = o.full & ~covered
        covered |= o.full
        item = {"id": o.id, "category": o.category, "colour": o.colour, "size": o.size, "box": _box_of(visible),
                "area": int(visible.sum()), "visible_fraction": round(float(visible.sum() / o.full.sum()), 3),
                "mask": mask_to_rle(visible),
                "brief": " ".join(w for w in (o.size, o.colour, o.category) if w)}
        if o.text is not None:
            item.update(text=o.text)
        truth_objects.append(item)
    truth_objects.sort(key=lambda t: t["id"])
    style = int(rng.integers(1000))
    captions = describe(truth_objects, background, width, height, style)
    texts = [{"text": o.text, "quad": o.quad, "box": [min(o.quad[0::2]), min(o.quad[1::2]), max(o.quad[0::2]), max(o.quad[1::2])],
              "object_id": o.id, "font": o.font, "font_size": o.font_size, "angle": o.angle}
             for o in objs if o.text is not None]
    name = f"{split}_{index:05d}.png"
    truth = {
        "file": name, "split": split, "width": width, "height": height,
        "background": list(background), "style": style,
        "objects": truth_objects,
        "texts": texts,
        "captions": {tier: c.text for tier, c in captions.items()},
        "phrases": {tier: c.phrases for tier, c in captions.items()},
        "relations": sorted(parse_relations(captions["detailed"].text)),
    }
    return image, truth


# ------------------------------------------------------------------------ on disk
def image_dir(root: str | Path, split: str) -> Path:
    return Path(root) / "images" / split


def truth_path(root: str | Path, split: str) -> Path:
    return Path(root) / "truth" / f"{split}.jsonl"


def write_world(root: str | Path, cfg: WorldConfig = WorldConfig(), splits: dict[str, int] | None = None) -> dict:
    """images/<split>/<split>_NNNNN.png + truth/<split>.jsonl + world.json; reused when world.json
    says the same config and generator version were used. `splits`: split name -> images
    (default: the benchmark's train and held-out splits, cfg.n_train and cfg.n_heldout)."""
    root = Path(root)
    fonts = available_fonts()
    splits = splits if splits is not None else {"train": cfg.n_train, "heldout": cfg.n_heldout}
    meta = {"config": asdict(cfg), "generator_version": GENERATOR_VERSION, "fonts": [os.path.basename(f) for f in fonts]}
    if set(splits) != set(SPLITS):
        meta["splits"] = splits
    meta = json.loads(json.dumps(meta))  # tuples as JSON reads them back
    meta_path = root / "world.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return meta
    for split, n in splits.items():
        folder = image_dir(root, split)
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        truth_path(root, split).parent.mkdir(parents=True, exist_ok=True)
        with open(truth_path(root, split), "w") as f:
            for i in range(n):
                image, truth = make_image(cfg, split, i, fonts)
                image.save(folder / truth["file"])
                f.write(json.dumps(truth) + "\n")
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def load_truth(root: str | Path, splits=SPLITS) -> dict[str, dict]:
    """file name -> truth of every image of the given splits."""
    out = {}
    for split in splits:
        path = truth_path(root, split)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no ground truth for split {split!r} (run write_world first)")
        for line in path.read_text().splitlines():
            t = json.loads(line)
            out[t["file"]] = t
    return out


def truth_of(truth: dict[str, dict], uri: str) -> dict:
    """The truth of a record by its uri (the file name is the key); a KeyError names the uri."""
    name = os.path.basename(uri)
    if name not in truth:
        raise KeyError(f"{uri}: not an image of the benchmark world (no truth for {name!r})")
    return truth[name]


def world_records(root: str | Path, split: str) -> list[dict]:
    """Image records of a split as ingest makes them (image_id = sha256 of the file, no
    annotations): what a stage sees, for calling a specialist or a metric by hand."""
    import hashlib

    from schemas.records import empty_record

    out = []
    for name, t in load_truth(root, [split]).items():
        path = image_dir(root, split) / name
        out.append(empty_record({"image_id": hashlib.sha256(path.read_bytes()).hexdigest(), "uri": str(path),
                                 "width": t["width"], "height": t["height"], "source": split}))
    return out
