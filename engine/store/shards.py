"""Parquet shard store on a local path or any fsspec URL: commits (commits.py), integrity (integrity.py),
one writer (lease.py), manifest (manifest.py); this module holds the paths and object access.

Commit protocol. A shard counts as done only when its commit record
(`<folder>/_committed/<shard>.json`: rows, bytes, sha256, footer hash, ETag) exists; readers
and resume trust only commit records, so a run killed at any instant leaves either nothing or
a complete shard and a rerun redoes the rest (no loss, no duplicates).
- Local paths: the shard is written under a hidden temporary name, fsynced and renamed, then
  the record the same way; a later run removes temporaries a kill left behind.
- Object stores (s3://, gs://, az://, memory://) have no rename: the shard object is PUT under
  its final name (a whole-object PUT is atomic: readers see the old object or the new one,
  never half of it), then its record is PUT. A shard object without a record does not exist.
Commit records are per shard, so any process (driver, Ray worker, Beam worker) commits
without a coordinator; manifest.json holds only per-folder summaries.

Integrity. A committed shard that was later deleted, truncated or replaced is "damaged":
`damaged(folder)` finds it cheaply (size and ETag from one listing; row count and footer hash
from the Parquet footer), `committed()` leaves it out so a run redoes it, readers refuse it
(`require_intact`), and `verify()` recomputes every sha256.

One writer per OUT: a flock on local paths, a lease object on object stores (engine.store.lease).
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from engine.atomic import atomic_write_bytes
from engine.store.commits import COMMITTED, Commits
from engine.store.errors import StoreUnavailableError, one_line, write_error
from engine.store.integrity import Integrity
from engine.store.lease import Locking
from engine.store.manifest import Manifest

log = logging.getLogger(__name__)

# A probe must fail in about a second on a dead endpoint, not after botocore's minute of retries.
FAST_FAIL_OPTIONS = {"s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 10, "retries": {"max_attempts": 1}}}}
PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


@dataclass(frozen=True)
class StoreSpec:
    """What a worker needs to rebuild the store: picklable; its repr never shows option values."""

    url: str
    storage_options: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"StoreSpec({_redact(self.url)!r}, storage_options={sorted(self.storage_options)})"


def _redact(url: str) -> str:
    """A URL without user:password@ (fsspec accepts them for some protocols): safe to print."""
    return re.sub(r"(^[a-z0-9+.-]+://)[^/@]*@", r"\1", url)


class ShardStore(Commits, Integrity, Locking, Manifest):
    """OUT/ folders: images, quarantine, annotations/<step>, models/<round>, exports.

    `out` is a local path or an fsspec URL; `storage_options` go to the fsspec filesystem
    (credentials, endpoint) and are never printed or written. `self.out` is for messages
    (a Path for local stores, kept for older callers); I/O goes through the methods below.
    """

    def __init__(self, out: str | Path, storage_options: dict | None = None):
        from fsspec.core import url_to_fs
        from fsspec.implementations.local import LocalFileSystem

        self.storage_options = dict(storage_options or {})
        self._given = str(out)
        try:
            self.fs, root = url_to_fs(self._given, **self.storage_options)
        except ImportError as exc:
            proto = self._given.split("://", 1)[0]
            package = PROTOCOL_PACKAGES.get(proto, f"the fsspec driver for {proto}://")
            raise StoreUnavailableError(f"{_redact(self._given)}: needs {package} ({one_line(exc)}); "
                                        "pip install 'fld-engine[s3]' or that package") from None
        except ValueError as exc:
            if "protocol not known" in str(exc).lower():
                raise StoreUnavailableError(f"{_redact(self._given)}: unknown protocol {self._given.split('://', 1)[0]}:// "
                                            "(fsspec knows s3, gs, az, file, memory, ...)") from None
            raise StoreUnavailableError(f"{_redact(self._given)}: bad storage options ({one_line(exc)})") from None
        except TypeError as exc:
            raise StoreUnavailableError(f"{_redact(self._given)}: bad storage options ({one_line(exc)})") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/") if root != "/" else root
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        # absolute: workers in another cwd (Ray, Beam, processes) open the same files
        self.out: Path | str = Path(self.root) if self.local else _redact(self.url())
        self._records: dict[tuple[str, str], tuple[Any, dict]] = {}  # (folder, shard) -> (listing key, record)
        self._checks: dict[str, tuple[Any, str | None]] = {}  # shard path -> (listing key, problem or None)
        self._warned: set[tuple[str, str, str]] = set()
        self._lease = None
        self._snapshot: dict[str, dict] | None = None
        self._probed: bool | None = None  # None: not probed; False: reachable, OUT absent; True: OUT exists

    # ------------------------------------------------------------ identity
    def spec(self) -> StoreSpec:
        return StoreSpec(self._given if "://" in self._given else self.root, dict(self.storage_options))

    @classmethod
    def from_spec(cls, spec: StoreSpec | str) -> "ShardStore":
        if isinstance(spec, StoreSpec):
            return cls(spec.url, spec.storage_options)
        return cls(spec)

    @classmethod
    def of(cls, out: "ShardStore | str | Path", storage_options: dict | None = None) -> "ShardStore":
        """A store from a store (returned as is), a path or a URL: what reader functions accept."""
        return out if isinstance(out, ShardStore) else cls(out, storage_options)

    def __reduce__(self):
        return (ShardStore.from_spec, (self.spec(),))  # workers rebuild it; caches and the lease stay here

    def __repr__(self) -> str:
        return f"ShardStore({str(self.out)!r})"

    def __str__(self) -> str:
        return str(self.out)  # messages and titles may be given a store where they were given OUT

    # --------------------------------------------------------------- paths
    def _p(self, rel: str = "") -> str:
        """Path for this store's filesystem methods."""
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        """What another reader (DuckDB with the filesystem registered, pyarrow, a message) opens."""
        if self.local:
            return self._p(rel)
        return f"{self.protocol}://{self._p(rel).lstrip('/')}"

    def shard_path(self, folder: str, shard: str) -> str:
        return self.url(f"{folder}/{shard}.parquet")

    def _commit_rel(self, folder: str, shard: str) -> str:
        return f"{folder}/{COMMITTED}/{shard}.json"

    # ------------------------------------------------------- object access
    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache(self._p(rel))
        return self.fs.exists(self._p(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._p(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace rel with data atomically: tmp + fsync + rename locally, one PUT on object stores."""
        self._check_lease()
        path = self._p(rel)
        try:
            if self.local:
                os.makedirs(posixpath.dirname(path), exist_ok=True)
                atomic_write_bytes(path, data)
            else:
                self.fs.pipe_file(path, data)
        except OSError as exc:
            raise write_error(self.url(rel), exc) from None
        self.fs.invalidate_cache(path)

    def delete(self, rel: str, recursive: bool = False) -> None:
        path = self._p(rel)
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    def list(self, rel: str = "") -> list[str]:
        """Names directly under rel (files and folders), sorted; [] when it does not exist."""
        return sorted(self._listing(rel))

    def _listing(self, rel: str) -> dict[str, dict]:
        """name -> fsspec info of the entries directly under rel: ONE listing call (once per
        snapshot() block)."""
        if self._snapshot is not None and rel in self._snapshot:
            return self._snapshot[rel]
        path = self._p(rel)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        listing = {posixpath.basename(e["name"].rstrip("/")): e for e in entries if e["name"].rstrip("/") != path.rstrip("/")}
        if self._snapshot is not None:
            self._snapshot[rel] = listing
        return listing

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Readers: inside the block each folder is listed once, however often its shards are asked
        for (at 200k shards a listing is ~200 requests). Writers never use it."""
        outer = self._snapshot
        if outer is None:
            self._snapshot = {}
        try:
            yield
        finally:
            if outer is None:
                self._snapshot = None

    def register_with(self, con) -> None:
        """Make this store's shard URLs readable by a DuckDB connection: through the store's own
        fsspec filesystem on object stores (no httpfs extension download), natively for local paths."""
        if not self.local:
            con.register_filesystem(self.fs)

    def read_json(self, rel: str) -> dict | None:
        try:
            return json.loads(self.read_bytes(rel))
        except FileNotFoundError:
            return None

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, default=str).encode())

    def delete_tree(self, rel: str) -> None:
        self.delete(rel, recursive=True)

    def write_log(self, name: str, text: str) -> None:
        """OUT/logs/<name>: diagnostics kept with the data (e.g. Ray Data's per-operator stats)."""
        self.write_bytes(f"logs/{name}", text.encode())

    def local_dir(self, rel: str) -> str:
        """A local folder holding OUT/<rel>: the folder itself on a local OUT; on an object store a
        copy in the node's cache (engine.local_cache: one download per node and version of the
        folder, under a file lock; a copy in use is never deleted or changed). Treat it as read-only
        (a copy written into is not handed out again); write back with upload_dir."""
        if self.local:
            return self._p(rel)
        from engine.local_cache import cached_copy

        return str(cached_copy(self.fs, self.root, self.url(), rel))

    def upload_dir(self, local_dir: str | Path, rel: str) -> None:
        """Copy a local folder (e.g. a model checkpoint) to rel, replacing what is there."""
        self._check_lease()
        src = str(local_dir)
        if self.local and os.path.realpath(src) == os.path.realpath(self._p(rel)):
            return
        self.delete(rel, recursive=True)
        try:
            if self.local:
                shutil.copytree(src, self._p(rel))
            else:
                self.fs.put(src.rstrip("/") + "/", self._p(rel), recursive=True)
        except OSError as exc:
            raise write_error(self.url(rel), exc) from None

    def download_dir(self, rel: str, local_dir: str | Path) -> Path:
        """Copy rel to a local folder (created); returns it."""
        dest = Path(local_dir)
        if self.local and os.path.realpath(dest) == os.path.realpath(self._p(rel)):
            return dest
        dest.mkdir(parents=True, exist_ok=True)
        if self.local:
            shutil.copytree(self._p(rel), dest, dirs_exist_ok=True)
        else:
            self.fs.get(self._p(rel).rstrip("/") + "/", str(dest), recursive=True)
        return dest

    def probe(self, for_writing: bool = False) -> None:
        """Reach OUT once, fast, before anything is read or written; one clear line if it fails.

        Readers need OUT to exist; a writer needs its bucket (a new prefix is fine). Wrong
        credentials, an unreachable endpoint or a missing bucket raise StoreUnavailableError.
        """
        if self._probed or (self._probed is False and for_writing):
            return  # reached once already: readers after `fld query`'s CLI probe do not pay twice
        fs = self._fast_fail_fs()
        try:
            fs.invalidate_cache(self.root)
            fs.info(self.root)
            self._probed = True
            return
        except FileNotFoundError:
            pass
        except PermissionError as exc:
            raise StoreUnavailableError(f"access to {self.out} denied: {one_line(exc)} (check the credentials: "
                                        "AWS_* environment variables or --storage-option key=/secret=)") from None
        except Exception as exc:  # noqa: BLE001 - any failure to reach the store is one line, not a traceback
            raise StoreUnavailableError(f"cannot reach {self.out}: {one_line(exc)}") from None
        if not for_writing:
            raise StoreUnavailableError(f"{self.out}: no such output folder")
        if not self.local and hasattr(fs, "split_path"):  # object stores with buckets / containers
            bucket = self.root.lstrip("/").split("/", 1)[0]
            try:
                fs.info(bucket)
            except FileNotFoundError:
                raise StoreUnavailableError(f"{self.out}: bucket {bucket!r} does not exist (create it first)") from None
            except Exception as exc:  # noqa: BLE001
                raise StoreUnavailableError(f"cannot reach {self.out}: {one_line(exc)}") from None
        self._probed = False  # reachable; OUT itself does not exist yet

    def _fast_fail_fs(self):
        extra = FAST_FAIL_OPTIONS.get(self.protocol)
        if not extra:
            return self.fs
        options = dict(self.storage_options)
        for key, value in extra.items():
            options[key] = {**value, **options.get(key, {})} if isinstance(value, dict) else options.get(key, value)
        return type(self.fs)(skip_instance_cache=True, **options)
