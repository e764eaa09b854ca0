"""Why an input is quarantined: the reason codes, and the exception that carries one.

Readers (engine.ingest.locations, engine.ingest.webdataset), the listing and the decoder all raise
`Quarantined(reason, detail)`; engine.ingest.decode turns it into a quarantine/ row. One home for
the codes, so the README, `fld stats` and the tests name the same set.
"""
from __future__ import annotations

QUARANTINE_REASONS = (
    "missing",  # no such file (removed since it was listed, or a list / COCO row naming nothing)
    "empty",  # 0 bytes
    "not_a_file",  # a FIFO, socket, device, directory, dangling symlink or symlink loop: never opened
    "too_large",  # over ingest.max_file_bytes (by its stat / listing / tar header size, or while reading)
    "not_image",  # not an image in a supported format (JPEG and MPO, PNG, WebP, BMP, GIF, TIFF)
    "truncated",  # the file (or the tar holding it) ends early
    "decompression_bomb",  # pixels, or PNG text / ICC chunks, over the limits
    "too_small",
    "unsupported_mode",
    "bad_caption",  # a WebDataset caption member that is not valid JSON
    "duplicate",
    "outside_root",  # a COCO file_name outside the image root (absolute, '..', file:// or a URL not allowed)
    "slow_decode",  # a JPEG with more scans than ingest.max_jpeg_scans: minutes per decode, in every step
    "duplicate_name",  # a tar member whose name an earlier member of the same tar already has
    "nested_archive",  # a tar inside a tar: its members are not expanded
    "timeout",  # a URL whose server did not connect / answer within the timeouts, after retries
    "connection_refused",  # a URL whose server refused the connection, after retries
    "unreadable",  # cannot be read (permissions, network after retries, a folder that cannot be listed, ...)
)


class Quarantined(Exception):
    """An input that is not used: `reason` (one of QUARANTINE_REASONS) and a sentence naming the file."""

    def __init__(self, reason: str, detail: str):
        if reason not in QUARANTINE_REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
