"""WebDataset tar shards: members grouped into samples by key, the image read lazily by offset.

Reading by (offset, size) instead of tarfile.extractfile keeps each image read O(1): a
reader does not rescan a multi-GB shard per image, and it works on fsspec URLs as well.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from typing import Callable

from engine.ingest.locations import basename, open_binary

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference within a sample
CAPTION_EXTENSIONS = ("txt", "json")
MEMBER_SEPARATOR = "::"  # uri of a member: <tar path>::<member name>
_JSON_CAPTION_KEYS = ("caption", "captions", "text", "txt")


class TarError(ValueError):
    """A shard or one of its members cannot be used; the message names the tar and the member."""


def key_and_extension(member_name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first '.' of the basename, extension = the rest."""
    folder, _, name = member_name.rpartition("/")
    stem, dot, ext = name.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, (ext.lower() if dot else "")


@dataclass(frozen=True)
class MemberReader:
    """Reads one member's data by offset; picklable, so items can travel to other workers."""

    tar_path: str
    offset: int
    size: int

    def __call__(self) -> bytes:
        with open_binary(self.tar_path) as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(
                f"{self.tar_path}: member data at offset {self.offset} is cut short ({len(data)} of {self.size} bytes)"
            )
        return data


def _captions(tar_path: str, member: str, ext: str, data: bytes) -> list[str]:
    text = data.decode("utf-8", errors="replace").strip()
    if ext == "txt":
        return [text] if text else []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TarError(f"{tar_path}{MEMBER_SEPARATOR}{member}: not valid JSON ({exc.msg})") from None
    if isinstance(obj, str):
        return [obj.strip()] if obj.strip() else []
    if isinstance(obj, dict):
        for key in _JSON_CAPTION_KEYS:
            value = obj.get(key)
            if isinstance(value, str) and value.strip():
                return [value.strip()]
            if isinstance(value, list):
                return [v.strip() for v in value if isinstance(v, str) and v.strip()]
    return []  # metadata JSON without a caption


def list_samples(tar_path: str) -> list[tuple[str, Callable[[], bytes], dict | None]]:
    """(uri, reader of the image bytes, human captions or None) per sample with an image, by key.

    A sample without an image member (e.g. only .cls) is skipped: there is nothing to ingest.
    Caption members (.txt, or .json with a caption/captions/text key) are read now: they are small.
    """
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    captions: dict[str, list[str]] = {}
    try:
        with open_binary(tar_path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = key_and_extension(member.name)
                members.setdefault(key, {})[ext] = member
                if ext in CAPTION_EXTENSIONS:
                    extracted = tar.extractfile(member)
                    data = extracted.read() if extracted else b""
                    captions.setdefault(key, []).extend(_captions(tar_path, member.name, ext, data))
    except tarfile.TarError as exc:
        raise TarError(f"{tar_path}: not a readable tar archive ({exc})") from None
    out = []
    origin = basename(tar_path)
    for key in sorted(members):
        ext = next((e for e in IMAGE_EXTENSIONS if e in members[key]), None)
        if ext is None:
            continue
        member = members[key][ext]
        caps = captions.get(key) or []
        human = {"origin": origin, "captions": [{"text": c} for c in caps]} if caps else None
        out.append(
            (
                f"{tar_path}{MEMBER_SEPARATOR}{member.name}",
                MemberReader(tar_path, member.offset_data, member.size),
                human,
            )
        )
    return out
