"""Read, check and decode every input once, so that no later stage meets a bad image.

An input becomes either a row of images/ (original bytes untouched, size after EXIF
orientation) or a row of quarantine/ with a short reason code and a sentence naming the file.
Every check the downstream decoder (engine.stage.decode_image) relies on happens here: the
full pixel load (truncation), EXIF transpose and conversion to RGB. Sizes are checked from
the header before any pixel is decoded, so a decompression bomb never allocates its pixels.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.ingest.pixels import to_rgb
from engine.ingest.sources import InputItem
from schemas.records import IMAGES_SCHEMA, QUARANTINE_SCHEMA

QUARANTINE_REASONS = (
    "missing",
    "empty",
    "not_image",
    "truncated",
    "decompression_bomb",
    "too_small",
    "unsupported_mode",
    "duplicate",
    "unreadable",
)
# Messages Pillow / libjpeg / zlib give for data that ends early or is cut inside.
_TRUNCATION_HINTS = ("truncated", "broken data stream", "premature end", "unexpected end", "buffer is not large enough")


class _Quarantined(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in QUARANTINE_REASONS, reason
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _quarantine_row(item: InputItem, reason: str, detail: str, image_id: str | None = None,
                    duplicate_of: str | None = None) -> dict:
    return {
        "uri": item.uri,
        "source": item.source,
        "reason": reason,
        "detail": detail,
        "image_id": image_id,
        "duplicate_of": duplicate_of,
    }


def _read_bytes(item: InputItem) -> bytes:
    try:
        data = item.read()
    except FileNotFoundError as exc:
        raise _Quarantined("missing", f"{item.uri}: file not found ({exc.strerror or exc})") from None
    except IsADirectoryError:
        raise _Quarantined("unreadable", f"{item.uri}: is a directory, not a file") from None
    except Exception as exc:  # noqa: BLE001 - permissions, network, cut-off tar: all "cannot read"
        raise _Quarantined("unreadable", f"{item.uri}: cannot read the bytes ({type(exc).__name__}: {exc})") from None
    if not data:
        raise _Quarantined("empty", f"{item.uri}: file is empty (0 bytes)")
    return data


VERIFY_MODES = ("header", "decode")


def _complete(fmt: str, data: bytes) -> bool | None:
    """Does the file end where its format says it ends? (None: no cheap check for this format.)

    What a cut download or copy looks like, found without decoding a pixel: a JPEG whose last scan
    (the last SOS marker; 0xFF inside entropy-coded data is always stuffed, so SOS cannot appear
    there) has no EOI after it, a PNG without IEND after its last IDAT, a GIF without its trailer,
    a WebP / BMP shorter than the size in its own header."""
    if fmt in ("JPEG", "MPO"):
        sos = data.rfind(b"\xff\xda")
        return sos != -1 and data.find(b"\xff\xd9", sos) != -1
    if fmt == "PNG":
        return data.rfind(b"IEND") > data.rfind(b"IDAT") > 0
    if fmt == "GIF":
        return data.rstrip(b"\x00")[-1:] == b";"
    if fmt == "WEBP":
        return len(data) >= 8 and int.from_bytes(data[4:8], "little") + 8 <= len(data)
    if fmt == "BMP":
        size = int.from_bytes(data[2:6], "little") if len(data) >= 6 else 0
        return size == 0 or size <= len(data)
    return None


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    """Width and height after EXIF orientation (what decode_image will produce), from the header.
    (PNG's getexif() decodes the whole image to look for an eXIf chunk after the pixels: read only
    the one before them, which is where the PNG extension puts it.)"""
    if im.format in ("JPEG", "MPO", "WEBP", "TIFF"):
        orientation = im.getexif().get(0x0112, 1)
    else:
        exif = Image.Exif()
        if im.info.get("exif"):
            exif.load(im.info["exif"])
        orientation = exif.get(0x0112, 1)
    return (im.height, im.width) if orientation in (5, 6, 7, 8) else (im.width, im.height)


def _decode_checked(uri: str, data: bytes, min_side: int, max_pixels: int,
                    verify: str = "header") -> tuple[int, int, str, str]:
    """(width, height after EXIF orientation, format, original mode), or _Quarantined.

    verify "header": every check from the header and the file's structure (cheap: ingest runs at
    the speed of reading and hashing); a pixel-level corruption inside a complete file is then found
    by the first step that decodes it and recorded on that image's `errors`. verify "decode": the
    pixels are decoded too, so such files are quarantined at ingest (several times slower)."""
    # Pillow refuses images over 2 * MAX_IMAGE_PIXELS in open() and warns above it; keep its
    # limit at ours so the header check below (ours) is the one that decides.
    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    # No warnings.catch_warnings here (not thread-safe): Pillow's DecompressionBombWarning fires
    # only above MAX_IMAGE_PIXELS >= max_pixels, which the header check below quarantines anyway.
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Quarantined("decompression_bomb", f"{uri}: header size over the limit, not decoded ({exc})") from None
    except UnidentifiedImageError:
        raise _Quarantined("not_image", f"{uri}: not an image Pillow can identify ({len(data)} bytes)") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt header of a known format
        msg = f"{type(exc).__name__}: {exc}"
        cut_riff = data[:4] == b"RIFF" and data[8:12] == b"WEBP" and _complete("WEBP", data) is False
        if cut_riff or any(hint in msg.lower() for hint in _TRUNCATION_HINTS):
            raise _Quarantined("truncated", f"{uri}: the file ends inside its header ({msg})") from None
        raise _Quarantined("not_image", f"{uri}: unreadable image header ({msg})") from None
    with im:
        fmt, mode = im.format or "", im.mode
        w, h = im.size
        if w * h > max_pixels:
            raise _Quarantined(
                "decompression_bomb",
                f"{uri}: header says {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (not decoded)",
            )
        if min(w, h) < min_side:
            raise _Quarantined("too_small", f"{uri}: {w}x{h} is smaller than min_side={min_side}")
        if verify == "header":
            return _header_checked(uri, data, im, fmt, mode, min_side, max_pixels)
        try:
            im.load()  # full decode: a truncated file fails here, not in a later stage
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _Quarantined("decompression_bomb", f"{uri}: {exc}") from None
        except Exception as exc:  # noqa: BLE001
            msg = f"{type(exc).__name__}: {exc}"
            if any(hint in msg.lower() for hint in _TRUNCATION_HINTS):
                raise _Quarantined("truncated", f"{uri}: {fmt} data ends early or is cut ({msg})") from None
            if isinstance(exc, ValueError) and "too large" in msg.lower():  # PNG text/ICC chunk bombs
                raise _Quarantined("decompression_bomb", f"{uri}: {msg}") from None
            raise _Quarantined("unreadable", f"{uri}: {fmt} pixels cannot be decoded ({msg})") from None
        try:
            ImageOps.exif_transpose(im, in_place=True)  # exactly what decode_image does later
        except Exception as exc:  # noqa: BLE001 - malformed EXIF block
            raise _Quarantined("unreadable", f"{uri}: EXIF orientation cannot be applied ({exc})") from None
        try:
            # Conversion support depends on the mode only: a 1x1 crop proves it without
            # copying a large image.
            to_rgb(im.crop((0, 0, 1, 1)))
        except ValueError as exc:
            raise _Quarantined("unsupported_mode", f"{uri}: mode {mode!r} cannot be converted to RGB ({exc})") from None
        return im.width, im.height, fmt, mode


def _header_checked(uri: str, data: bytes, im: Image.Image, fmt: str, mode: str, min_side: int,
                    max_pixels: int) -> tuple[int, int, str, str]:
    complete = _complete(fmt, data)
    if complete is None:  # no cheap structural check for this format (TIFF, ...): decode it
        return _decode_checked(uri, data, min_side, max_pixels, verify="decode")
    if not complete:
        raise _Quarantined("truncated", f"{uri}: {fmt} data ends early or is cut (no end marker after the image data)")
    try:
        width, height = _oriented_size(im)
    except Exception as exc:  # noqa: BLE001 - malformed EXIF block
        raise _Quarantined("unreadable", f"{uri}: EXIF orientation cannot be read ({exc})") from None
    try:
        to_rgb(Image.new(mode, (1, 1)))  # conversion support depends on the mode only
    except ValueError as exc:
        raise _Quarantined("unsupported_mode", f"{uri}: mode {mode!r} cannot be converted to RGB ({exc})") from None
    return width, height, fmt, mode


def decode_input(item: InputItem, min_side: int, max_pixels: int, verify: str = "header") -> tuple[dict | None, dict | None]:
    """(images row, None) for a usable image, else (None, quarantine row)."""
    try:
        data = _read_bytes(item)
    except _Quarantined as q:
        return None, _quarantine_row(item, q.reason, q.detail)
    return _decode_bytes(item, data, hashlib.sha256(data).hexdigest(), min_side, max_pixels, verify)


def _decode_bytes(item: InputItem, data: bytes, image_id: str, min_side: int,
                  max_pixels: int, verify: str = "header") -> tuple[dict | None, dict | None]:
    try:
        width, height, fmt, mode = _decode_checked(item.uri, data, min_side, max_pixels, verify)
    except _Quarantined as q:
        return None, _quarantine_row(item, q.reason, q.detail, image_id=image_id)
    row = {
        "image_id": image_id,
        "uri": item.uri,
        "source": item.source,
        "width": width,
        "height": height,
        "format": fmt,
        "mode": mode,
        "bytes": data,
        "human": json.dumps(item.human, sort_keys=True) if item.human is not None else None,
    }
    return row, None


def ingest_shard(items: list[InputItem], min_side: int, max_pixels: int, seen_ids: set[str],
                 workers: int = 1, verify: str = "header") -> tuple[pa.Table, pa.Table, dict]:
    """Decode a shard's inputs; exact duplicates (same sha256 as an image already ingested,
    in this shard or in `seen_ids`) are quarantined as 'duplicate' without being decoded again.
    Adds the ids of the ingested images to `seen_ids`. `workers` > 1 reads and decodes in threads
    (Pillow releases the GIL while decoding); the output is the same, in input order.
    """
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    run = pool.map if pool else map
    try:
        reads = list(run(_read_and_hash, items))
        # Decode only the first copy of each id that is not already ingested.
        first_copy: dict[str, int] = {}
        for i, (_, image_id, _) in enumerate(reads):
            if image_id is not None and image_id not in seen_ids and image_id not in first_copy:
                first_copy[image_id] = i
        todo = sorted(first_copy.values())
        verdicts = run(lambda i: _decode_bytes(items[i], reads[i][0], reads[i][1], min_side, max_pixels, verify), todo)
        decoded = dict(zip(todo, verdicts))
    finally:
        if pool:
            pool.shutdown()

    images: list[dict] = []
    quarantine: list[dict] = []
    reasons: Counter[str] = Counter()
    first_uri: dict[str, str] = {}  # image_id -> uri of the copy ingested in this shard
    for i, (item, (data, image_id, failure)) in enumerate(zip(items, reads)):
        if failure is not None:
            quarantine.append(failure)
        elif image_id in seen_ids:
            quarantine.append(
                _quarantine_row(
                    item,
                    "duplicate",
                    f"{item.uri}: exact copy of {first_uri.get(image_id, 'an image ingested earlier')} "
                    f"(image_id {image_id[:12]}...)",
                    image_id=image_id,
                    duplicate_of=image_id,
                )
            )
        else:
            # A later copy of bytes whose first copy was quarantined gets its own (same) verdict.
            row, bad = decoded.pop(i) if i in decoded else _decode_bytes(item, data, image_id, min_side, max_pixels, verify)
            if row is not None:
                images.append(row)
                seen_ids.add(image_id)
                first_uri[image_id] = item.uri
                continue
            quarantine.append(bad)
        reasons[quarantine[-1]["reason"]] += 1
    duplicates = reasons.get("duplicate", 0)
    counters = {
        "inputs": len(items),
        "images": len(images),
        "quarantined": len(quarantine) - duplicates,
        "duplicates": duplicates,
        "quarantine_reasons": dict(sorted(reasons.items())),
    }
    assert counters["inputs"] == counters["images"] + counters["quarantined"] + counters["duplicates"]
    return (
        pa.Table.from_pylist(images, schema=IMAGES_SCHEMA),
        pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA),
        counters,
    )


def _read_and_hash(item: InputItem) -> tuple[bytes | None, str | None, dict | None]:
    """(bytes, sha256, None), or (None, None, quarantine row) when the bytes cannot be had."""
    try:
        data = _read_bytes(item)
    except _Quarantined as q:
        return None, None, _quarantine_row(item, q.reason, q.detail)
    return data, hashlib.sha256(data).hexdigest(), None
