"""Node-local copies of object-store folders (models, checkpoints), shared by every process of a node.

Relabel actors and training workers of one node all need OUT/models/round<k> as local files. Each
copy lives in the cache (FLD_CACHE_DIR, default ~/.cache/fld-engine) under a slot named after the
folder's *version*: a hash of its object listing (names, sizes, ETags). So:

- one download per node and version: the first process takes the slot's file lock (flock, released
  by the kernel even after a kill), downloads into a temporary folder, records what it fetched and
  renames it into place; the others wait on the lock and then reuse the copy;
- no delete while reading: a slot is never deleted or refreshed in place. A folder changed in the
  store has another version, hence another slot; a slot that a process wrote into (a trainer's
  working folder) no longer matches its record and is left to that process: the next caller gets a
  fresh slot beside it.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import posixpath
import shutil
from pathlib import Path

RECORD = ".json"  # beside a slot (<slot>.json, never inside: a trainer uploads its folder): {path: size} fetched


def cache_root() -> Path:
    return Path(os.environ.get("FLD_CACHE_DIR") or Path.home() / ".cache" / "fld-engine")


def _local_files(folder: Path) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, folder)] = os.path.getsize(path)
    return out


def _intact(slot: Path) -> bool:
    """The slot holds exactly what was downloaded into it (nobody wrote into it since)."""
    try:
        recorded = json.loads(Path(f"{slot}{RECORD}").read_text())
    except (OSError, ValueError):
        return False
    return recorded == _local_files(slot)


def cached_copy(fs, root: str, store_url: str, rel: str) -> Path:
    """A local folder holding the object-store folder `root`/`rel` (fs: its fsspec filesystem)."""
    remote = posixpath.join(root, rel)
    fs.invalidate_cache(remote)
    try:
        entries = fs.find(remote, detail=True)  # one recursive listing: the folder's version
    except FileNotFoundError:
        entries = {}
    files = {posixpath.relpath(name, remote): e for name, e in entries.items() if e.get("type") != "directory"}
    listing = sorted((name, e.get("size"), e.get("ETag") or e.get("etag") or e.get("created")) for name, e in files.items())
    version = hashlib.sha256(json.dumps(listing, default=str).encode()).hexdigest()[:16]
    base = cache_root() / hashlib.sha256(store_url.encode()).hexdigest()[:16] / rel
    base.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{base}@{version}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        index = 0
        while True:  # the first intact slot of this version, else the first free one
            slot = Path(f"{base}@{version}" + (f".{index}" if index else ""))
            if not slot.exists():
                break
            if _intact(slot):
                return slot
            index += 1
        for dead in base.parent.glob(f"{glob.escape(base.name)}@{version}*.tmp-*"):  # killed downloads' leftovers:
            shutil.rmtree(dead, ignore_errors=True)  # every download of this version runs under the lock we hold
        tmp = Path(f"{slot}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True)
        if files:
            names = sorted(files)
            for name in names:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            # one call: fsspec's async stores (s3fs, gcsfs) fetch the files concurrently
            fs.get([posixpath.join(remote, n) for n in names], [str(tmp / n) for n in names])
        Path(f"{slot}{RECORD}").write_text(json.dumps(_local_files(tmp), sort_keys=True))
        os.rename(tmp, slot)
        return slot
    finally:
        os.close(fd)
