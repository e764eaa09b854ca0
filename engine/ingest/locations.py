"""Local paths and fsspec URLs behind one small API, so every source type reads both."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import IO, Callable, Iterator


def is_url(s: str) -> bool:
    """True for non-local URLs (s3://, gs://, http://, memory://, ...); file:// counts as local."""
    return "://" in s and not s.startswith("file://")


def local_path(s: str) -> str:
    return s[len("file://") :] if s.startswith("file://") else s


@dataclass(frozen=True)
class LocationReader:
    """Reads a whole local file or fsspec URL when called. A plain picklable object (not a
    closure), so input items can be shipped to multiprocessing / Ray / Beam workers."""

    location: str

    def __call__(self) -> bytes:
        if is_url(self.location):
            import fsspec

            with fsspec.open(self.location, "rb") as f:
                return f.read()
        with open(local_path(self.location), "rb") as f:
            return f.read()


def reader(location: str) -> Callable[[], bytes]:
    """A function that reads the whole object when called (lazily: listing never reads bytes)."""
    return LocationReader(location)


def open_binary(location: str) -> IO[bytes]:
    """A seekable binary file object for a local path or an fsspec URL."""
    if is_url(location):
        import fsspec

        return fsspec.open(location, "rb").open()
    return open(local_path(location), "rb")


def exists(location: str) -> bool:
    if is_url(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return fs.exists(path)
    return os.path.exists(local_path(location))


def has_glob(location: str) -> bool:
    return any(ch in location for ch in "*?[")


def expand_glob(pattern: str) -> list[str]:
    """Sorted matches of a local or fsspec glob (URLs keep their protocol)."""
    if is_url(pattern):
        import fsspec

        fs, path = fsspec.core.url_to_fs(pattern)
        # Keep the user's spelling of the URL: prefix before the first glob character + the rest.
        cut = pattern[: min(pattern.find(c) for c in "*?[" if c in pattern)].rsplit("/", 1)[0]
        stripped = fs._strip_protocol(cut).rstrip("/")
        return sorted(
            cut + m[len(stripped) :] if m.startswith(stripped + "/") else fs.unstrip_protocol(m) for m in fs.glob(path)
        )
    return sorted(glob.glob(local_path(pattern)))


def is_dir(location: str) -> bool:
    if is_url(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return fs.isdir(path)
    return os.path.isdir(local_path(location))


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def iter_files(root: str) -> Iterator[tuple[str, str | None]]:
    """(path or URL, fingerprint) of every file below a local folder or a URL prefix, streamed in a
    deterministic order (a directory's entries by name, depth first; a bucket's keys in key order),
    so a listing of millions of files is never held in memory at once. The fingerprint (size and
    mtime / ETag, from the listing itself: no extra request) changes when the file changes.

    Hidden files and folders (".git", ".ipynb_checkpoints", "._x.jpg") are left out: tool
    artefacts, not data, and a source of duplicates.
    """
    if is_url(root):
        yield from _iter_url_files(root)
        return
    yield from _iter_local_files(local_path(root))


def _iter_local_files(folder: str) -> Iterator[tuple[str, str | None]]:
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir():
            yield from _iter_local_files(entry.path)
        else:
            try:
                st = entry.stat()
                fingerprint = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                fingerprint = None  # a dangling link: listed anyway, decode quarantines it
            yield entry.path, fingerprint


def _url_fingerprint(info: dict) -> str:
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or info.get("updated") or ""
    return f"{info.get('size')}:{tag}"


def _iter_url_files(root: str) -> Iterator[tuple[str, str | None]]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    base = path.rstrip("/") + "/"
    stem = root.rstrip("/") + "/"
    if hasattr(fs, "_iterdir") and hasattr(fs, "split_path"):  # s3fs: pages of keys, in key order
        infos = _iter_s3(fs, base)
    else:  # other backends list everything below the prefix in one call
        infos = (info for _, info in sorted(fs.find(path, detail=True).items()))
    for info in infos:
        name = info["name"]
        if info.get("type") == "directory" or not name.startswith(base):
            continue
        rel = name[len(base):]
        if not _hidden(rel):
            yield stem + rel, _url_fingerprint(info)


def _iter_s3(fs, prefix_path: str) -> Iterator[dict]:
    """Every object under a bucket prefix, one ListObjectsV2 page at a time (s3fs's async pager)."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(prefix_path)
    pages = fs._iterdir(bucket, delimiter="", prefix=key.rstrip("/") + "/" if key else "")
    while True:
        try:
            info = sync(fs.loop, pages.__anext__())
        except StopAsyncIteration:
            return
        yield info


def files_under(root: str) -> list[str]:
    """Every file below a folder or URL prefix (small listings; see iter_files for large ones)."""
    return [path for path, _ in iter_files(root)]


def join(base_dir: str, location: str) -> str:
    """Resolve a relative entry of a list / COCO file against that file's folder."""
    if is_url(location) or os.path.isabs(local_path(location)):
        return location
    if is_url(base_dir):
        return base_dir.rstrip("/") + "/" + location
    return os.path.normpath(os.path.join(base_dir, location))


def dirname(location: str) -> str:
    if is_url(location):
        return location.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(local_path(location)))


def basename(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def folder_name(location: str) -> str:
    """Name of a folder given as a path or URL ("data/coco/" -> "coco", "." -> the cwd's name)."""
    if is_url(location):
        return basename(location)
    return os.path.basename(os.path.abspath(local_path(location)))


def stem(location: str) -> str:
    """File name up to its first dot ("shard-0001.tar" -> "shard-0001")."""
    name = basename(location)
    return name if name.startswith(".") else name.split(".", 1)[0]
