"""Sample images for the quickstart, made at run time (nothing binary is committed).

Generated scenes carry large, clean words ("STOP", "OPEN 24 HOURS", "EXIT", ...) so OCR and
grounding have something real to find, and simple objects (a car, a tree, a door) for the
detectors; real photos come from scikit-image's bundled data and, where installed, Debian's
darknet package. Everything is deterministic: the same bytes on every call on a machine.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = (640, 480)
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
DARKNET_DIR = Path("/usr/share/darknet/data")
DARKNET_PHOTOS = ("dog.jpg", "horses.jpg", "person.jpg")


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font: no dependency on the fonts a system happens to have."""
    return ImageFont.load_default(size=size)


def _centered_text(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, size: int, fill) -> None:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    draw.text((cx, cy), text, font=_font(size), fill=fill, anchor="mm")


def _sky_and_ground(draw: ImageDraw.ImageDraw, horizon: int, ground) -> None:
    w, h = SIZE
    for y in range(horizon):  # vertical sky gradient
        t = y / max(1, horizon - 1)
        draw.line([(0, y), (w, y)], fill=(int(110 + 80 * t), int(160 + 60 * t), 235))
    draw.rectangle([0, horizon, w, h], fill=ground)


def _stop_sign() -> Image.Image:
    img = Image.new("RGB", SIZE)
    d = ImageDraw.Draw(img)
    _sky_and_ground(d, 330, (90, 90, 95))
    d.rectangle([0, 400, 640, 412], fill=(235, 235, 235))  # kerb line
    d.rectangle([313, 250, 327, 420], fill=(150, 150, 150))  # pole
    d.regular_polygon((320, 170, 110), n_sides=8, rotation=22.5, fill=(200, 20, 30), outline=(255, 255, 255), width=6)
    _centered_text(d, (210, 60, 430, 280), "STOP", 72, (255, 255, 255))
    return img


def _shop_front() -> Image.Image:
    img = Image.new("RGB", SIZE)
    d = ImageDraw.Draw(img)
    _sky_and_ground(d, 60, (120, 115, 110))
    d.rectangle([40, 60, 600, 440], fill=(170, 95, 70))  # brick facade
    d.rectangle([70, 90, 570, 170], fill=(20, 30, 60), outline=(240, 200, 60), width=5)  # sign board
    _centered_text(d, (70, 90, 570, 170), "OPEN 24 HOURS", 52, (255, 230, 90))
    d.rectangle([80, 220, 300, 400], fill=(150, 200, 230), outline=(60, 40, 30), width=6)  # window
    d.rectangle([380, 210, 520, 440], fill=(80, 50, 35), outline=(40, 25, 15), width=5)  # door
    d.ellipse([495, 320, 507, 332], fill=(220, 190, 60))  # door knob
    d.rectangle([100, 360, 180, 398], fill=(240, 240, 240))  # a small label in the window
    _centered_text(d, (100, 360, 180, 398), "CAFE", 28, (20, 20, 20))
    return img


def _exit_sign() -> Image.Image:
    img = Image.new("RGB", SIZE, (222, 218, 205))  # corridor wall
    d = ImageDraw.Draw(img)
    d.rectangle([0, 400, 640, 480], fill=(110, 100, 90))  # floor
    d.rectangle([220, 160, 420, 400], fill=(140, 145, 150), outline=(70, 70, 75), width=6)  # door
    d.rectangle([390, 270, 405, 300], fill=(60, 60, 60))  # handle
    d.rectangle([200, 40, 440, 130], fill=(20, 140, 60), outline=(250, 250, 250), width=5)  # sign
    _centered_text(d, (200, 40, 400, 130), "EXIT", 64, (255, 255, 255))
    d.polygon([(405, 85), (425, 85), (425, 70), (438, 88), (425, 106), (425, 91), (405, 91)], fill=(255, 255, 255))
    return img


def _street() -> Image.Image:
    img = Image.new("RGB", SIZE)
    d = ImageDraw.Draw(img)
    _sky_and_ground(d, 300, (70, 70, 75))
    d.ellipse([520, 30, 600, 110], fill=(255, 220, 80))  # sun
    d.rectangle([75, 190, 95, 310], fill=(100, 65, 35))  # tree trunk
    d.ellipse([25, 90, 145, 220], fill=(40, 130, 50))  # tree crown
    for x in range(0, 640, 80):  # lane marks
        d.rectangle([x + 10, 395, x + 50, 403], fill=(240, 240, 240))
    d.rounded_rectangle([200, 290, 470, 370], radius=18, fill=(30, 80, 190))  # car body
    d.polygon([(250, 290), (285, 240), (400, 240), (430, 290)], fill=(30, 80, 190))  # cabin
    d.polygon([(262, 288), (290, 250), (340, 250), (340, 288)], fill=(190, 220, 240))  # windows
    d.polygon([(350, 288), (350, 250), (395, 250), (418, 288)], fill=(190, 220, 240))
    for cx in (260, 410):  # wheels
        d.ellipse([cx - 30, 340, cx + 30, 400], fill=(20, 20, 20))
        d.ellipse([cx - 12, 358, cx + 12, 382], fill=(160, 160, 160))
    d.rectangle([470, 140, 630, 200], fill=(250, 250, 250), outline=(30, 30, 30), width=4)  # sign
    _centered_text(d, (470, 140, 630, 200), "BUS STOP", 30, (20, 20, 20))
    d.rectangle([545, 200, 555, 300], fill=(120, 120, 120))
    return img


SCENES = {
    "scene_stop_sign.png": _stop_sign,
    "scene_shop_front.png": _shop_front,
    "scene_exit_sign.png": _exit_sign,
    "scene_street.png": _street,
}


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _jpeg_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


# The human sample (`fld samples DIR --human`): a COCO JSON of hand-made truth for the sample images, what
# `fld calibrate` measures the filters against (docs/calibrate.md). Scene objects come from the drawing code
# above; the photos' boxes were drawn by eye on a 50-pixel grid; text lines (COCO-Text `utf8_string`) are
# where Pillow draws the words; captions were written by hand.
HUMAN_SAMPLE = "instances.json"
_TEXT_LINES = {  # file -> (box the text is centred in, text, font size), as drawn by _centered_text
    "scene_stop_sign.png": [((210, 60, 430, 280), "STOP", 72)],
    "scene_shop_front.png": [((70, 90, 570, 170), "OPEN 24 HOURS", 52), ((100, 360, 180, 398), "CAFE", 28)],
    "scene_exit_sign.png": [((200, 40, 400, 130), "EXIT", 64)],
    "scene_street.png": [((470, 140, 630, 200), "BUS STOP", 30)],
}
_OBJECTS = {  # file -> [(category, [x0, y0, x1, y1])]
    "scene_stop_sign.png": [("stop sign", [218, 68, 422, 272])],
    "scene_street.png": [("car", [200, 240, 470, 400])],
    "photo_astronaut.jpg": [("person", [20, 15, 365, 512])],
    "photo_coffee.jpg": [("cup", [175, 18, 410, 305]), ("spoon", [325, 65, 425, 325]), ("dining table", [0, 0, 600, 400])],
    "photo_chelsea.jpg": [("cat", [0, 0, 451, 300])],
    "photo_darknet_dog.jpg": [("bicycle", [125, 140, 568, 420]), ("dog", [132, 222, 310, 540]),
                              ("truck", [465, 75, 695, 170]), ("motorcycle", [55, 70, 110, 125])],
    "photo_darknet_horses.jpg": [("horse", [0, 195, 315, 410]), ("horse", [235, 195, 420, 362]),
                                 ("horse", [435, 210, 597, 350]), ("horse", [0, 185, 152, 290]),
                                 ("horse", [370, 205, 455, 322])],
    "photo_darknet_person.jpg": [("person", [190, 98, 275, 375]), ("dog", [65, 262, 205, 345]),
                                 ("horse", [405, 140, 600, 345])],
}
_CAPTIONS = {
    "scene_stop_sign.png": "A red stop sign on a grey pole by a street.",
    "scene_shop_front.png": "A brick shop front with a sign saying open 24 hours, a window and a door.",
    "scene_exit_sign.png": "A green exit sign above a grey door in a corridor.",
    "scene_street.png": "A blue car on a street next to a tree and a bus stop sign.",
    "photo_astronaut.jpg": "An astronaut in an orange suit smiling next to a helmet and a flag.",
    "photo_coffee.jpg": "A cup of coffee with a spoon on a saucer on a wooden table.",
    "photo_chelsea.jpg": "A close-up of a tabby cat's face with green eyes.",
    "photo_rocket.jpg": "A rocket on a launch pad between towers at dusk.",
    "photo_darknet_dog.jpg": "A dog sitting on a porch in front of a red bicycle, a white truck parked on the street.",
    "photo_darknet_horses.jpg": "Horses running across a dry grassy field below snowy mountains.",
    "photo_darknet_person.jpg": "A person in a blue jacket standing in a field between a dog and a white horse.",
}


def _text_box(box: tuple[int, int, int, int], text: str, size: int) -> list[float]:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    draw = ImageDraw.Draw(Image.new("RGB", SIZE))
    return [float(v) for v in draw.textbbox((cx, cy), text, font=_font(size), anchor="mm")]


def write_human_sample(dest: str | Path, images: list[Path]) -> Path:
    """dest/instances.json: a COCO file listing `images` with the hand-made truth of those that have some."""
    import json

    dest = Path(dest)
    categories = sorted({c for objs in _OBJECTS.values() for c, _ in objs} | {"text"})
    cat_id = {c: i for i, c in enumerate(categories, start=1)}
    coco: dict = {"images": [], "annotations": [], "categories": [{"id": i, "name": c} for c, i in cat_id.items()]}
    for image_id, path in enumerate(images, start=1):
        with Image.open(path) as im:
            coco["images"].append({"id": image_id, "file_name": path.name, "width": im.width, "height": im.height})
        anns = [(c, box, None) for c, box in _OBJECTS.get(path.name, [])]
        anns += [("text", _text_box(*line), line[1]) for line in _TEXT_LINES.get(path.name, [])]
        for category, (x0, y0, x1, y1), text in anns:
            ann = {"id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": cat_id[category],
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
            if text is not None:
                ann["utf8_string"] = text
            coco["annotations"].append(ann)
        if path.name in _CAPTIONS:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                        "caption": _CAPTIONS[path.name]})
    out = dest / HUMAN_SAMPLE
    out.write_text(json.dumps(coco, indent=1))
    return out


def write_samples(dest: str | Path) -> list[Path]:
    """Write the sample images into `dest` (created if needed); return their paths, sorted.

    Real photos need scikit-image (installed with the `test` extra); without it only the
    generated scenes and the darknet photos (if that Debian package is present) are written.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, make in SCENES.items():
        path = dest / name
        path.write_bytes(_png_bytes(make()))
        written.append(path)
    try:
        from skimage import data as skdata
    except ImportError:
        skdata = None
    if skdata is not None:
        for name in SKIMAGE_PHOTOS:
            path = dest / f"photo_{name}.jpg"
            path.write_bytes(_jpeg_bytes(getattr(skdata, name)()))
            written.append(path)
    for name in DARKNET_PHOTOS:
        src = DARKNET_DIR / name
        if src.is_file() and os.access(src, os.R_OK):
            path = dest / f"photo_darknet_{name}"
            shutil.copyfile(src, path)
            written.append(path)
    return sorted(written)
