"""WebDataset tar shards: members grouped into samples by key, the image read lazily by offset.

Reading by (offset, size) instead of tarfile.extractfile keeps each image read O(1): a
reader does not rescan a multi-GB shard per image, and it works on fsspec URLs as well.

A shard is untrusted input, listed in the driver: no header or caption is read before its size
is checked (a 10 KB sparse tar can claim a 3 GiB caption or pax header), a caption that cannot
be used quarantines its sample only, and a cut or corrupt tar gives its readable samples plus one
quarantine row for the rest; none of these stops the run.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

from engine.ingest.locations import (MEMBER_SEPARATOR, ListingProblem, Reader, escape_name, input_uri, location_of,
                                     open_regular, too_large)
from engine.ingest.quarantine import Quarantined

# in order of preference within a sample: every format ingest decodes
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTENSIONS = ("txt", "json")
MAX_CAPTION_BYTES = 1 << 20  # a caption member is read in the driver: over this (or max_file_bytes), too_large
_JSON_CAPTION_KEYS = ("caption", "captions", "text", "txt")

Sample = tuple[str, Callable[..., bytes], "dict | None"]  # (uri, reader of the image bytes, human captions)


class _HeaderTooLarge(tarfile.TarError):
    """A tar header (pax / GNU long name) claims more bytes than any header needs."""


def key_and_extension(member_name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first '.' of the basename, extension = the rest."""
    folder, _, name = member_name.rpartition("/")
    stem, dot, ext = name.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, (ext.lower() if dot else "")


MAX_TAR_MEMBERS = 200_000  # members listed per tar; beyond, one too_large row for the tar names the limit


class _Member(NamedTuple):
    """What the listing keeps of an image member (not tarfile's TarInfo: a tar of 1,000,000 members)."""

    name: str
    offset_data: int
    size: int


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The tar's members one at a time, without tarfile keeping every TarInfo it read (its `members`
    list held 1.9 GB for a tar of 1,000,000 empty members)."""
    while (member := tar.next()) is not None:
        tar.members.clear()
        yield member


def member_kind(member_name: str) -> str:
    """"image" when the name's last extension is an image format ("photo.v2.JPG" too), "tar" for a
    nested tar, else "" (captions, metadata: parts of a sample, not inputs)."""
    last = member_name.rpartition("/")[2].rpartition(".")
    ext = last[2].lower() if last[1] else ""
    return "image" if ext in IMAGE_EXTENSIONS else "tar" if ext == "tar" else ""


def _preference(ext: str) -> int:
    """Order of the image members of one sample: the WebDataset extensions first, in IMAGE_EXTENSIONS
    order (exact lower-case names before other spellings), then every other image-named member."""
    return IMAGE_EXTENSIONS.index(ext) if ext in IMAGE_EXTENSIONS else len(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class MemberReader(Reader):
    """Reads one member's data by offset; picklable, so items can travel to other workers."""

    tar_path: str  # a location (engine.ingest.locations.location_of)
    offset: int
    size: int

    def __call__(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and self.size > max_bytes:
            raise too_large(self.size, max_bytes, " (tar header)")
        with open_regular(self.tar_path) as (f, _):
            f.seek(self.offset)
            parts = [f.read(self.size)]
            got = len(parts[0])
            while parts[-1] and got < self.size:  # fsspec streams may return less than asked
                parts.append(f.read(self.size - got))
                got += len(parts[-1])
        if got != self.size:
            raise Quarantined("truncated", f"the tar ends inside this member ({got} of {self.size} bytes)")
        return b"".join(parts)


class _BoundedReads:
    """The tar's file object as tarfile sees it: no single read larger than `limit` (tarfile reads a
    pax or GNU long-name header whole, whatever size it claims)."""

    def __init__(self, f, limit: int):
        self._f, self._limit = f, limit

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._limit:
            raise _HeaderTooLarge(f"a header or member of {n} bytes is read whole; over the {self._limit}-byte limit")
        return self._f.read(n)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _captions(ext: str, data: bytes) -> list[str]:
    """Caption texts of a .txt / .json member; ValueError for JSON that is not valid."""
    text = data.decode("utf-8", errors="replace").strip()
    if ext == "txt":
        return [text] if text else []
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})") from None
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


def _tar_problem(exc: Exception, members: int, last: str | None) -> tuple[str, str]:
    """(reason, detail) for a tar whose listing stopped: what was read and why the rest cannot be."""
    where = f"after {members} members" + (f" (the last: {escape_name(last)!r})" if last else "")
    msg = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, _HeaderTooLarge):
        return "too_large", f"the tar stops being readable {where}: {exc}; members after it are not ingested"
    if isinstance(exc, OSError):  # permissions, network: the bytes, not the format
        return "unreadable", f"the tar cannot be read {where} ({msg})"
    if "unexpected end" in msg or "truncated" in msg.lower():
        return "truncated", f"the tar is cut {where} ({msg}); members after it are lost"
    return "unreadable", f"the tar is corrupt {where} ({msg}); members after it cannot be read"


def _end_problem(f, tar: tarfile.TarFile, members: int, last: str | None) -> tuple[str, str] | None:
    """A tar whose listing ended quietly is complete only if its end-of-archive block follows
    (tarfile stops without a word at a cut or corrupt header past the first member)."""
    f.seek(tar.offset)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return None
    where = f"after {members} members" + (f" (the last: {escape_name(last)!r})" if last else "")
    if len(block) < tarfile.BLOCKSIZE:
        return "truncated", f"the tar ends without its end-of-archive block {where}: it was cut; members after it are lost"
    return "unreadable", f"the tar has a corrupt header at byte {tar.offset} {where}; members after it cannot be read"


def list_samples(tar_path: str, max_bytes: int | None = None) -> list[Sample]:
    """(uri, reader of the image bytes, human captions or None) per sample with an image, by key.

    A sample without an image member (e.g. only .cls) is skipped: there is nothing to ingest.
    Caption members (.txt, or .json with a caption/captions/text key) are read now, if they are at
    most MAX_CAPTION_BYTES (and max_bytes); a caption over that, not valid JSON, or cut, makes its
    sample a quarantined input (too_large / bad_caption / truncated). A tar that cannot be opened,
    or whose listing stops early, adds one quarantined input for the tar itself.
    """
    location = location_of(tar_path)
    caption_limit = min(MAX_CAPTION_BYTES, max_bytes) if max_bytes is not None else MAX_CAPTION_BYTES
    images: dict[str, list[_Member]] = {}  # key -> its image members, in tar order
    captions: dict[str, list[str]] = {}
    problems: dict[str, tuple[str, str]] = {}  # key -> (reason, detail) of a sample whose caption cannot be used
    # (member name, byte offset of a repeated name, (reason, detail)): members that are not ingested
    others: list[tuple[str, int | None, tuple[str, str]]] = []
    seen: dict[str, int] = {}  # member name -> offset of its first occurrence
    tar_problem = None
    n, last = 0, None
    try:
        with open_regular(location) as (f, _):
            tar = tarfile.open(fileobj=_BoundedReads(f, tarfile.BLOCKSIZE + caption_limit), mode="r:")
            try:
                for member in _members(tar):
                    if n >= MAX_TAR_MEMBERS:
                        tar_problem = ("too_large", f"the tar has more than {MAX_TAR_MEMBERS} members; the members "
                                                    f"after the first {MAX_TAR_MEMBERS} are not ingested")
                        break
                    n, last = n + 1, member.name
                    kind = member_kind(member.name)
                    again = member.offset if member.name in seen else None  # a repeated name: its uri says where
                    if not member.isfile():
                        if kind in ("image", "tar") and not member.isdir():
                            others.append((member.name, again, ("not_a_file", f"tar member {escape_name(member.name)!r} is a "
                                                                       "link or special file, not data; not read")))
                        continue
                    if kind in ("image", "tar") and member.name in seen:
                        others.append((member.name, again, ("duplicate_name", f"tar member {escape_name(member.name)!r} at "
                                                     f"byte {member.offset} has the name of an earlier member (byte "
                                                     f"{seen[member.name]}); only the first is ingested")))
                        continue
                    seen.setdefault(member.name, member.offset)
                    if kind == "tar":
                        others.append((member.name, None, ("nested_archive", f"tar member {escape_name(member.name)!r} is "
                                                     "a tar inside the tar; its members are not ingested (give it as "
                                                     "an input of its own)")))
                        continue
                    key, ext = key_and_extension(member.name)
                    if kind == "image":
                        images.setdefault(key, []).append(_Member(member.name, member.offset_data, member.size))
                        if member.issparse():
                            others.append((member.name, None, ("unreadable", f"its image member {escape_name(member.name)!r} "
                                                         "is a sparse tar member, which ingest does not read")))
                            images[key].pop()
                    if ext not in CAPTION_EXTENSIONS or key in problems:
                        continue
                    what = f"its caption member {escape_name(member.name)!r}"
                    if member.size > caption_limit:
                        problems[key] = ("too_large", f"{what} has {member.size} bytes, over the {caption_limit}-byte "
                                                      "caption limit; not read")
                        continue
                    try:
                        extracted = tar.extractfile(member)
                        captions.setdefault(key, []).extend(_captions(ext, extracted.read() if extracted else b""))
                    except ValueError as exc:
                        problems[key] = ("bad_caption", f"{what} is {exc}")
                    except tarfile.TarError as exc:
                        problems[key] = ("truncated", f"{what} cannot be read ({exc})")
                tar_problem = tar_problem or _end_problem(f, tar, n, last)
            except (tarfile.TarError, ValueError, OSError, EOFError) as exc:
                tar_problem = _tar_problem(exc, n, last)
    except Quarantined as q:  # not a regular file
        tar_problem = (q.reason, q.detail)
    except FileNotFoundError as exc:
        tar_problem = ("missing", f"file not found ({exc.strerror or exc})")
    except tarfile.ReadError as exc:  # not a tar from its first block on
        tar_problem = ("empty", "an empty file") if "empty file" in str(exc) else \
            ("unreadable", f"not a readable tar archive ({exc})")
    except (tarfile.TarError, ValueError, OSError, EOFError) as exc:  # the first header already unusable
        tar_problem = _tar_problem(exc, n, last)

    out: list[Sample] = []
    origin = escape_name(tar_path.rstrip("/").rsplit("/", 1)[-1])
    prefix = input_uri(tar_path)  # a tar whose own name holds '::' is escaped: member uris stay unambiguous
    for key in sorted(images):
        # the sample's image (the preferred extension) carries its captions; every other image member of
        # the key (b.jpg + b.png, c.JPG + c.jpg, photo.v2.jpg) is an input of its own, never dropped
        members = sorted(images[key], key=lambda m: (_preference(key_and_extension(m.name)[1]),
                                                     not m.name.endswith("." + key_and_extension(m.name)[1]), m.name))
        for i, member in enumerate(members):
            uri = f"{prefix}{MEMBER_SEPARATOR}{escape_name(member.name)}"
            if i == 0 and key in problems:
                out.append((uri, ListingProblem(*problems[key]), None))
                continue
            caps = (captions.get(key) or []) if i == 0 else []
            human = {"origin": origin, "captions": [{"text": c} for c in caps]} if caps else None
            out.append((uri, MemberReader(location, member.offset_data, member.size), human))
    for name, again, problem in others:
        where = "" if again is None else f"#byte={again}"
        out.append((f"{prefix}{MEMBER_SEPARATOR}{escape_name(name)}{where}", ListingProblem(*problem), None))
    if tar_problem is not None:
        out.append((location, ListingProblem(*tar_problem), None))
    return out
