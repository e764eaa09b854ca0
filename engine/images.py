"""Image helpers that the stage contract (engine/stage.py) and ingest (engine/ingest/) share, so neither
imports the other: the formats the engine opens, decoding to 8-bit RGB, a failure recorded on an image record.

Decoded image -> 8-bit RGB, keeping the picture for high-bit-depth files.

Pillow's plain convert("RGB") clips 16-bit samples ("I;16", "I") at 255, so a 16-bit PNG
becomes an almost white image; every model would then see garbage. Scaling the 16-bit range
to 8 bits first keeps the content. No fld-engine imports; Pillow and numpy are imported on first use.
"""
from __future__ import annotations

import io
import traceback

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# The only Pillow formats the engine opens (Image.open(..., formats=IMAGE_FORMATS)): every other
# plugin (EPS -> Ghostscript, PSD, PDF, ICO, ...) is never offered an input, whatever its name.
# MPO (multi-picture JPEG) has no opener of its own: the JPEG one returns it.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


def to_rgb(img):
    """RGB copy of `img`; 16-bit and 32-bit integer grey are scaled from 0..65535 to 0..255, float grey
    ("F") from 0..1 (values above 1: taken as 0..255 and clipped).

    Raises ValueError for a mode Pillow cannot convert to RGB (ingest's 'unsupported_mode').
    """
    if img.mode == "RGB":
        return img
    import numpy as np
    from PIL import Image

    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        arr = np.asarray(img).astype(np.int64)
        # "I" holds 16-bit PNG data on some Pillow versions and plain 8-bit values on others.
        shift = 8 if img.mode != "I" or arr.max(initial=0) > 255 else 0
        grey = np.clip(arr >> shift, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "F":  # 32-bit float grey (TIFF): 0..1 data scaled to 0..255, else clipped; NaN is black
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0 and arr.min() >= 0.0:
            arr = arr * 255.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes):
    """Bytes from images/ -> RGB PIL image with EXIF orientation applied (as ingest measured)."""
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # never another Pillow plugin
    ImageOps.exif_transpose(img, in_place=True)  # no copy of an image that needs no turn
    return to_rgb(img)  # 16-bit scaled, not clipped to white


def record_error(record: dict, stage: str, exc: BaseException | str) -> None:
    """Append {stage, error} to the record's `errors`: an exception's type, message and where it was raised."""
    if isinstance(exc, BaseException):
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
        msg = f"{type(exc).__name__}: {exc}{where}"
    else:
        msg = str(exc)
    record.setdefault("errors", []).append({"stage": stage, "error": msg})
