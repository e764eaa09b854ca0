"""Read, check and decode every input once, so that no later stage meets a bad image.

An input becomes either a row of images/ (original bytes untouched, size after EXIF
orientation) or a row of quarantine/ with a short reason code and a sentence naming the file.
Every check the downstream decoder (engine.images.decode_image) relies on happens here: the
full pixel load (truncation), EXIF transpose and conversion to RGB. Sizes are checked from
the header before any pixel is decoded, so a decompression bomb never allocates its pixels.
Only the formats the engine supports are offered to Pillow (engine.images.IMAGE_FORMATS):
an EPS, PSD, PDF or ICO renamed .jpg never reaches its plugin (nor Ghostscript).
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.ingest.locations import (Reader, RetriesExhausted, escape_name, location_of, network_reason,
                                     read_with_retries, too_large)
from engine.images import IMAGE_FORMATS, to_rgb
from engine.ingest.quarantine import QUARANTINE_REASONS, Quarantined
from engine.ingest.sources import InputItem
from schemas.records import IMAGES_SCHEMA, QUARANTINE_SCHEMA

__all__ = ["QUARANTINE_REASONS", "VERIFY_MODES", "decode_input", "ingest_shard"]

# Messages Pillow / libjpeg / zlib give for data that ends early or is cut inside.
_TRUNCATION_HINTS = ("truncated", "broken data stream", "premature end", "unexpected end", "buffer is not large enough")
# ... and for PNG text / zTXt / iTXt / iCCP chunks over PngImagePlugin.MAX_TEXT_CHUNK / MAX_TEXT_MEMORY
_CHUNK_BOMB_HINTS = ("too large", "too much memory")


def _quarantine_row(item: InputItem, reason: str, detail: str, image_id: str | None = None,
                    duplicate_of: str | None = None) -> dict:
    assert reason in QUARANTINE_REASONS, reason
    uri = location_of(item.uri)
    return {
        "uri": uri,
        "source": escape_name(item.source),
        "reason": reason,
        "detail": escape_name(f"{uri}: {detail}"),
        "image_id": image_id,
        "duplicate_of": duplicate_of,
    }


def _read_bytes(item: InputItem, max_bytes: int | None = None) -> bytes:
    """The input's bytes (transient errors retried), or Quarantined with why not."""
    read = item.read
    try:
        # engine readers check the size before reading and read at most max_bytes + 1
        data = read_with_retries(read, max_bytes) if isinstance(read, Reader) else read_with_retries(read)
    except Quarantined:
        raise
    except RetriesExhausted as exc:  # a network failure that outlived the retries: say which
        raise Quarantined(network_reason(exc), f"cannot read the bytes ({exc})") from None
    except FileNotFoundError as exc:
        raise Quarantined("missing", f"file not found ({exc.strerror or exc})") from None
    except IsADirectoryError:
        raise Quarantined("not_a_file", "a directory, not a file") from None
    except Exception as exc:  # noqa: BLE001 - permissions, network after retries: all "cannot read"
        raise Quarantined("unreadable", f"cannot read the bytes ({type(exc).__name__}: {exc})") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise too_large(len(data), max_bytes)
    if not data:
        raise Quarantined("empty", "file is empty (0 bytes)")
    return data


VERIFY_MODES = ("header", "decode")
MAX_JPEG_SCANS = 100  # default of ingest.max_jpeg_scans: baseline JPEGs have 1 scan, progressive ones ~10


def _count_sos(data: bytes, block: int = 1 << 20) -> int:
    """data.count(b"\\xff\\xda"), 2.5x faster: the 0xFF bytes first (rare in entropy-coded data), then
    the byte after each; a block at a time, so a file of 0xFF bytes costs 8 MiB of indices, not 8x its size."""
    a = np.frombuffer(data, np.uint8)
    n = 0
    for start in range(0, max(len(a) - 1, 0), block):
        x = a[start:start + block + 1]  # pairs starting in [start, start + block)
        ff = np.flatnonzero(x[:-1] == 0xFF)
        n += int(np.count_nonzero(x[ff + 1] == 0xDA))
    return n


def _check_scans(fmt: str, data: bytes, max_scans: int) -> None:
    """A JPEG's decode time grows with its scans (SOS markers; 0xFF inside entropy-coded data is always
    stuffed, so counting them is exact): a file repeating its last scan 20,000 times costs minutes per
    decode, in every step. Quarantined at ingest as slow_decode, before any pixel is decoded."""
    if fmt not in ("JPEG", "MPO"):
        return
    scans = _count_sos(data)
    if scans > max_scans:
        raise Quarantined("slow_decode", f"{fmt} with {scans} scans, over ingest.max_jpeg_scans={max_scans} "
                                         "(decoding it would cost minutes); not decoded")


def _complete(fmt: str, data: bytes) -> bool | None:
    """Does the file end where its format says it ends? (None: no cheap check for this format.)

    What a cut download or copy looks like, found without decoding a pixel: a JPEG whose last scan
    (the last SOS marker; 0xFF inside entropy-coded data is always stuffed, so SOS cannot appear
    there) has no EOI after it, a PNG without IEND after its last IDAT, a GIF without its trailer,
    a WebP / BMP shorter than the size in its own header."""
    if fmt in ("JPEG", "MPO"):
        # the same test as "an EOI after the last SOS", searched from the end: the last EOI is near
        # the end of a complete file (a baseline JPEG's one SOS is near its start: rfind(SOS) and a
        # find(EOI) after it would each read the whole file)
        eoi = data.rfind(b"\xff\xd9")
        return eoi != -1 and data.find(b"\xff\xda", 0, eoi) != -1 and data.find(b"\xff\xda", eoi) == -1
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


def _is_chunk_bomb(exc: Exception) -> bool:
    return isinstance(exc, ValueError) and any(hint in str(exc).lower() for hint in _CHUNK_BOMB_HINTS)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _png_without_pixels(data: bytes) -> bytes | None:
    """The PNG's chunks with the pixel data left out and the ones after it moved before an empty
    IDAT, or None when nothing follows the pixels. Pillow reads chunks after IDAT (text, ICC, ...)
    only when it loads the pixels; opening this checks them with Pillow's own parser and limits."""
    pos, seen_idat = 8, False
    before, after = [data[:8]], []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if kind == b"IEND":
            break
        if kind in (b"IDAT", b"fdAT", b"fcTL"):
            seen_idat = seen_idat or kind == b"IDAT"
        else:
            (after if seen_idat else before).append(data[pos:end])
        pos = end
    if not after:
        return None
    return b"".join(before + after) + _png_chunk(b"IDAT", b"") + _png_chunk(b"IEND", b"")


def _check_png_chunks_after_pixels(data: bytes) -> None:
    """verify "header": PNG text / zTXt / iTXt / iCCP chunks after the pixels over Pillow's limits are
    a decompression_bomb here, as in "decode" mode (they would fail the first step that decodes)."""
    pixelless = _png_without_pixels(data)
    if pixelless is None:
        return
    try:
        with Image.open(io.BytesIO(pixelless), formats=("PNG",)):
            pass
    except ValueError as exc:
        if _is_chunk_bomb(exc):
            raise Quarantined("decompression_bomb", f"PNG text or ICC chunks after the pixels are over Pillow's "
                                                    f"limits ({exc})") from None
    except Exception:  # noqa: BLE001,S110 - other oddities of these chunks: Pillow skips them at load too
        pass


def _decode_checked(data: bytes, min_side: int, max_pixels: int, verify: str = "header",
                    max_scans: int = MAX_JPEG_SCANS) -> tuple[int, int, str, str]:
    """(width, height after EXIF orientation, format, original mode), or Quarantined.

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
        im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Quarantined("decompression_bomb", f"header size over the limit, not decoded ({exc})") from None
    except UnidentifiedImageError:
        raise Quarantined("not_image", f"not an image in a supported format ({', '.join(IMAGE_FORMATS)}; "
                                       f"{len(data)} bytes)") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt header of a known format
        msg = f"{type(exc).__name__}: {exc}"
        if _is_chunk_bomb(exc):  # PNG text / ICC chunks before the pixels
            raise Quarantined("decompression_bomb", f"PNG text or ICC chunks over Pillow's limits ({exc})") from None
        cut_riff = data[:4] == b"RIFF" and data[8:12] == b"WEBP" and _complete("WEBP", data) is False
        if cut_riff or any(hint in msg.lower() for hint in _TRUNCATION_HINTS):
            raise Quarantined("truncated", f"the file ends inside its header ({msg})") from None
        raise Quarantined("not_image", f"unreadable image header ({msg})") from None
    with im:
        fmt, mode = im.format or "", im.mode
        w, h = im.size
        if w * h > max_pixels:
            raise Quarantined(
                "decompression_bomb",
                f"header says {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (not decoded)",
            )
        if min(w, h) < min_side:
            raise Quarantined("too_small", f"{w}x{h} is smaller than min_side={min_side}")
        _check_scans(fmt, data, max_scans)
        if verify == "header":
            return _header_checked(data, im, fmt, mode, min_side, max_pixels, max_scans)
        try:
            im.load()  # full decode: a truncated file fails here, not in a later stage
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise Quarantined("decompression_bomb", f"{exc}") from None
        except Exception as exc:  # noqa: BLE001
            msg = f"{type(exc).__name__}: {exc}"
            if any(hint in msg.lower() for hint in _TRUNCATION_HINTS):
                raise Quarantined("truncated", f"{fmt} data ends early or is cut ({msg})") from None
            if _is_chunk_bomb(exc):  # PNG text / ICC chunks after the pixels
                raise Quarantined("decompression_bomb", f"PNG text or ICC chunks over Pillow's limits ({msg})") from None
            raise Quarantined("unreadable", f"{fmt} pixels cannot be decoded ({msg})") from None
        try:
            ImageOps.exif_transpose(im, in_place=True)  # exactly what decode_image does later
        except Exception as exc:  # noqa: BLE001 - malformed EXIF block
            raise Quarantined("unreadable", f"EXIF orientation cannot be applied ({exc})") from None
        try:
            # Conversion support depends on the mode only: a 1x1 crop proves it without
            # copying a large image.
            to_rgb(im.crop((0, 0, 1, 1)))
        except ValueError as exc:
            raise Quarantined("unsupported_mode", f"mode {mode!r} cannot be converted to RGB ({exc})") from None
        return im.width, im.height, fmt, mode


def _header_checked(data: bytes, im: Image.Image, fmt: str, mode: str, min_side: int,
                    max_pixels: int, max_scans: int = MAX_JPEG_SCANS) -> tuple[int, int, str, str]:
    complete = _complete(fmt, data)
    if complete is None:  # no cheap structural check for this format (TIFF, ...): decode it
        return _decode_checked(data, min_side, max_pixels, verify="decode", max_scans=max_scans)
    if not complete:
        raise Quarantined("truncated", f"{fmt} data ends early or is cut (no end marker after the image data)")
    if fmt == "PNG":
        _check_png_chunks_after_pixels(data)
    try:
        width, height = _oriented_size(im)
    except Exception as exc:  # noqa: BLE001 - malformed EXIF block
        raise Quarantined("unreadable", f"EXIF orientation cannot be read ({exc})") from None
    try:
        to_rgb(Image.new(mode, (1, 1)))  # conversion support depends on the mode only
    except ValueError as exc:
        raise Quarantined("unsupported_mode", f"mode {mode!r} cannot be converted to RGB ({exc})") from None
    return width, height, fmt, mode


def decode_input(item: InputItem, min_side: int, max_pixels: int, verify: str = "header",
                 max_bytes: int | None = None, max_scans: int = MAX_JPEG_SCANS) -> tuple[dict | None, dict | None]:
    """(images row, None) for a usable image, else (None, quarantine row)."""
    try:
        data = _read_bytes(item, max_bytes)
    except Quarantined as q:
        return None, _quarantine_row(item, q.reason, q.detail)
    return _decode_bytes(item, data, hashlib.sha256(data).hexdigest(), min_side, max_pixels, verify, max_scans)


def _decode_bytes(item: InputItem, data: bytes, image_id: str, min_side: int,
                  max_pixels: int, verify: str = "header", max_scans: int = MAX_JPEG_SCANS) -> tuple[dict | None, dict | None]:
    try:
        width, height, fmt, mode = _decode_checked(data, min_side, max_pixels, verify, max_scans)
    except Quarantined as q:
        return None, _quarantine_row(item, q.reason, q.detail, image_id=image_id)
    row = {
        "image_id": image_id,
        "uri": location_of(item.uri),
        "source": escape_name(item.source),
        "width": width,
        "height": height,
        "format": fmt,
        "mode": mode,
        "bytes": data,
        "human": json.dumps(item.human, sort_keys=True) if item.human is not None else None,
    }
    return row, None


def ingest_shard(items: list[InputItem], min_side: int, max_pixels: int, seen_ids: set[str],
                 workers: int = 1, verify: str = "header", max_bytes: int | None = None,
                 max_scans: int = MAX_JPEG_SCANS) -> tuple[pa.Table, pa.Table, dict]:
    """Decode a shard's inputs; exact duplicates (same sha256 as an image already ingested,
    in this shard or in `seen_ids`) are quarantined as 'duplicate' without being decoded again.
    Adds the ids of the ingested images to `seen_ids`. `workers` > 1 reads and decodes in threads
    (Pillow releases the GIL while decoding); the output is the same, in input order.
    `max_bytes` (ingest.max_file_bytes): larger inputs are too_large, and never read whole.
    """
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    run = pool.map if pool else map
    try:
        reads = list(run(lambda item: _read_and_hash(item, max_bytes), items))
        # Decode only the first copy of each id that is not already ingested.
        first_copy: dict[str, int] = {}
        for i, (_, image_id, _) in enumerate(reads):
            if image_id is not None and image_id not in seen_ids and image_id not in first_copy:
                first_copy[image_id] = i
        todo = sorted(first_copy.values())
        verdicts = run(lambda i: _decode_bytes(items[i], reads[i][0], reads[i][1], min_side, max_pixels, verify,
                                               max_scans), todo)
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
                    f"exact copy of {first_uri.get(image_id, 'an image ingested earlier')} "
                    f"(image_id {image_id[:12]}...)",
                    image_id=image_id,
                    duplicate_of=image_id,
                )
            )
        else:
            # A later copy of bytes whose first copy was quarantined gets its own (same) verdict.
            row, bad = decoded.pop(i) if i in decoded else _decode_bytes(item, data, image_id, min_side, max_pixels,
                                                                         verify, max_scans)
            if row is not None:
                images.append(row)
                seen_ids.add(image_id)
                first_uri[image_id] = row["uri"]
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


def _read_and_hash(item: InputItem, max_bytes: int | None) -> tuple[bytes | None, str | None, dict | None]:
    """(bytes, sha256, None), or (None, None, quarantine row) when the bytes cannot be had."""
    try:
        data = _read_bytes(item, max_bytes)
    except Quarantined as q:
        return None, None, _quarantine_row(item, q.reason, q.detail)
    return data, hashlib.sha256(data).hexdigest(), None
