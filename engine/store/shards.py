"""Parquet shard store on a local path or any fsspec URL: commits, integrity, one writer, manifest.

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

One writer per OUT: a flock on local paths, a lease object on object stores (engine.lease).
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from engine.atomic import TEMPORARY, atomic_write, atomic_write_bytes
from engine.store.errors import (  # noqa: F401 - the store's errors, raised and caught as engine.store.*
    DamagedShardError,
    RunLockedError,
    StoreError,
    StoreUnavailableError,
    one_line,
    write_error,
)

log = logging.getLogger(__name__)

COMMITTED = "_committed"
MANIFEST = "manifest.json"
TAIL_BYTES = 64 * 1024  # one ranged read gets the footer of any shard the engine writes
TRACKED_PACKAGES = (
    "fld-engine", "torch", "transformers", "open_clip_torch", "pyarrow", "duckdb", "pillow",
    "pycocotools", "ray", "apache-beam", "rapidocr", "spacy", "onnxruntime", "fsspec", "s3fs",
)
# A probe must fail in about a second on a dead endpoint, not after botocore's minute of retries.
FAST_FAIL_OPTIONS = {"s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 10, "retries": {"max_attempts": 1}}}}
PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the output (read once per process: metadata is slow)."""
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def parquet_footer(tail: bytes, size: int) -> tuple[int, str]:
    """(rows, sha256 of the footer) from the last bytes of a Parquet file; ValueError if it has none."""
    if size < 12 or tail[-4:] != b"PAR1":
        raise ValueError("no Parquet footer (truncated or not Parquet)")
    length = struct.unpack("<I", tail[-8:-4])[0]
    if length + 8 > len(tail):
        raise ValueError(f"footer of {length} bytes does not fit in the file")
    footer = tail[-(length + 8):]
    rows = pq.read_metadata(pa.BufferReader(b"PAR1" + footer)).num_rows
    return rows, hashlib.sha256(footer).hexdigest()


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


class ShardStore:
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

    # ------------------------------------------------------------- commits
    def write_shard(self, folder: str, shard: str, table: pa.Table, meta: dict[str, Any] | None = None) -> dict:
        """Write table as <folder>/<shard>.parquet, then its commit record; returns the record."""
        self._check_lease()
        path = self._p(f"{folder}/{shard}.parquet")
        target = self.url(f"{folder}/{shard}.parquet")
        try:
            if self.local:
                os.makedirs(self._p(f"{folder}/{COMMITTED}"), exist_ok=True)
                atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
                with open(path, "rb") as f:
                    digest, size = _sha256_stream(f)
                    f.seek(max(0, size - TAIL_BYTES))
                    tail = f.read()
                etag = None
            else:
                buf = io.BytesIO()
                pq.write_table(table, buf, compression="zstd")
                data = buf.getvalue()
                digest, size, tail = hashlib.sha256(data).hexdigest(), len(data), data[-TAIL_BYTES:]
                response = self.fs.pipe_file(path, data)
                self.fs.invalidate_cache(path)
                # S3's PUT answers with the ETag: no HEAD per commit (other stores: ask for it)
                etag = response.get("ETag") if isinstance(response, dict) else None
                etag = etag or self.fs.info(path).get("ETag")
        except OSError as exc:
            raise write_error(target, exc) from None
        _, footer = parquet_footer(tail, size)
        record = {
            "folder": folder,
            "shard": shard,
            "rows": table.num_rows,
            "sha256": digest,
            "bytes": size,
            "footer_sha256": footer,
            **({"etag": etag} if etag else {}),
            "committed_at": _now(),
            "host": socket.gethostname(),
            **(meta or {}),
        }
        self.write_bytes(self._commit_rel(folder, shard), json.dumps(record, indent=1, default=str).encode())
        self._records.pop((folder, shard), None)
        self._checks.pop(path, None)
        return record

    def commit_record(self, folder: str, shard: str) -> dict | None:
        try:
            rec = json.loads(self.read_bytes(self._commit_rel(folder, shard)))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # an unreadable record commits nothing
        return rec if isinstance(rec, dict) and "rows" in rec and "bytes" in rec else None

    def is_committed(self, folder: str, shard: str, config_hash: str | None = None) -> bool:
        """Committed and intact (cheap checks); with config_hash, also written with that configuration."""
        rec = self.commit_record(folder, shard)
        if rec is None:
            return False
        path = self._p(f"{folder}/{shard}.parquet")
        try:
            self.fs.invalidate_cache(path)
            entry = self.fs.info(path)
        except FileNotFoundError:
            entry = None
        if self._problem(folder, shard, rec, entry) is not None:
            return False
        return config_hash is None or rec.get("config_hash") == config_hash

    def records(self, folder: str) -> dict[str, dict]:
        """Every commit record of a folder, damaged shards included: one listing of _committed/, then
        only the records not seen before (concurrent GETs on object stores)."""
        listing = self._listing(f"{folder}/{COMMITTED}")
        out: dict[str, dict] = {}
        fetch: dict[str, tuple[str, Any]] = {}
        for name, entry in listing.items():
            if not name.endswith(".json") or TEMPORARY.match(name):
                continue
            shard = name[: -len(".json")]
            key = _listing_key(entry)
            cached = self._records.get((folder, shard))
            if cached is not None and cached[0] == key:
                out[shard] = cached[1]
            else:
                fetch[shard] = (entry["name"], key)
        if fetch:
            blobs = self.fs.cat([p for p, _ in fetch.values()], on_error="return")
            for shard, (p, key) in fetch.items():
                blob = blobs.get(p)
                try:
                    if isinstance(blob, BaseException) or blob is None:
                        raise ValueError(one_line(blob) if isinstance(blob, BaseException) else "missing")
                    rec = json.loads(blob)
                    if not isinstance(rec, dict) or "rows" not in rec or "bytes" not in rec:
                        raise ValueError("not a commit record")
                    if not all(isinstance(rec.get(k), int) and not isinstance(rec.get(k), bool) for k in ("rows", "bytes")):
                        raise ValueError("rows and bytes must be integers")
                except ValueError as exc:
                    rec = {"folder": folder, "shard": shard, "unreadable": f"commit record unreadable ({exc})"}
                self._records[(folder, shard)] = (key, rec)
                out[shard] = rec
        return dict(sorted(out.items()))

    def damaged(self, folder: str, report: bool = True) -> dict[str, str]:
        """{shard: what differs from its commit record} for committed shards that were deleted,
        truncated or replaced since: one listing of the folder plus, where the ETag cannot
        vouch for the content, one batched ranged read of the Parquet footers not checked before
        (concurrent on object stores: O(1) round trips at any shard count)."""
        records = self.records(folder)
        if not records:
            return {}
        files = self._listing(folder)
        self._read_footers(folder, [(shard, rec, files.get(f"{shard}.parquet")) for shard, rec in records.items()])
        problems = {}
        for shard, rec in records.items():
            problem = self._problem(folder, shard, rec, files.get(f"{shard}.parquet"))
            if problem is not None:
                problems[shard] = problem
                if report and (folder, shard, problem) not in self._warned:  # a run says which it redoes, and why
                    self._warned.add((folder, shard, problem))
                    log.warning("%s/%s is damaged: %s; a run redoes it", self.out, f"{folder}/{shard}", problem)
        return problems

    def _quick_problem(self, folder: str, shard: str, rec: dict, entry: dict | None) -> tuple[str | None, bool]:
        """(problem, whether the Parquet footer must be read to know) from the record and the listing."""
        if "unreadable" in rec:
            return rec["unreadable"], False
        if rec.get("folder") != folder or rec.get("shard") != shard:  # each record names its own shard
            return (f"its commit record is the one of {str(rec.get('folder'))[:80]}/{str(rec.get('shard'))[:40]} "
                    "(a shard and its record copied over this one)"), False
        if entry is None:
            return "deleted: the shard file is missing", False
        size = entry.get("size")
        if size != rec["bytes"]:
            return f"size {size} bytes, committed {rec['bytes']} (truncated or replaced)", False
        etag = entry.get("ETag") or entry.get("etag")
        if rec.get("etag") and etag:
            return (None if etag == rec["etag"] else f"replaced: ETag {etag} differs from the committed {rec['etag']}"), False
        return None, True

    def _footer_problem(self, rec: dict, tail: bytes | BaseException, size: int) -> str | None:
        try:
            if isinstance(tail, BaseException):
                raise tail
            rows, footer = parquet_footer(tail, size)
        except (ValueError, OSError, pa.ArrowException) as exc:
            return f"unreadable: {one_line(exc)}"
        if rows != rec["rows"]:
            return f"{rows} rows, committed {rec['rows']} (replaced)"
        if rec.get("footer_sha256") and footer != rec["footer_sha256"]:
            return "replaced: its Parquet footer differs from the committed one"
        return None

    def _read_footers(self, folder: str, items: list[tuple[str, dict, dict | None]]) -> None:
        """Check the footers of every (shard, record, listing entry) that needs one and is not cached, in
        one batched ranged read (fsspec cat_ranges: concurrent requests on object stores)."""
        todo = []
        for shard, rec, entry in items:
            if entry is None or not self._quick_problem(folder, shard, rec, entry)[1]:
                continue
            cached = self._checks.get(entry["name"])
            if cached is None or cached[0] != _listing_key(entry):
                todo.append((rec, entry))
        if len(todo) < 2 or self.local:
            return  # _problem reads them one by one (local files: no round trip to save)
        sizes = [int(e["size"]) for _, e in todo]
        tails = self.fs.cat_ranges([e["name"] for _, e in todo], [max(0, n - TAIL_BYTES) for n in sizes], sizes,
                                   on_error="return")
        for (rec, entry), tail, size in zip(todo, tails, sizes):
            self._checks[entry["name"]] = (_listing_key(entry), self._footer_problem(rec, tail, size))

    def _problem(self, folder: str, shard: str, rec: dict, entry: dict | None) -> str | None:
        problem, needs_footer = self._quick_problem(folder, shard, rec, entry)
        if not needs_footer:
            return problem
        path = entry["name"]
        key = _listing_key(entry)
        cached = self._checks.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        size = entry["size"]
        try:
            tail: bytes | BaseException = self._tail(path, size)
        except OSError as exc:
            tail = exc
        problem = self._footer_problem(rec, tail, size)
        self._checks[path] = (key, problem)
        return problem

    def _tail(self, path: str, size: int) -> bytes:
        start = max(0, size - TAIL_BYTES)
        if self.local:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read()
        return self.fs.cat_file(path, start=start, end=size)

    def committed(self, folder: str) -> dict[str, dict]:
        """Commit records of the intact shards: what resume skips and what runners build on."""
        bad = self.damaged(folder)
        return {s: rec for s, rec in self.records(folder).items() if s not in bad}

    def require_intact(self, folders: list[str]) -> None:
        """Readers call this before reading: a damaged shard is an error naming it, never skipped."""
        problems = [f"{folder}/{shard}: {why}" for folder in folders for shard, why in self.damaged(folder, report=False).items()]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise DamagedShardError(f"{self.out} has damaged shards: " + "; ".join(problems[:5]) + more
                                    + ". Rerun `fld run` on it to redo them (`fld verify` checks every checksum)")

    def verify(self, folders: list[str] | None = None) -> tuple[int, list[tuple[str, str, str]]]:
        """Recompute every committed shard's sha256 (reads everything): (shards checked, [(folder, shard, problem)])."""
        folders = folders or self.data_folders()
        checked, problems = 0, []
        manifest = self.manifest_problem()
        if manifest is not None:
            problems.append((MANIFEST, "", f"{manifest}; a run rewrites it (every folder was checked anyway)"))
        for folder in folders:
            bad = self.damaged(folder, report=False)
            for shard, rec in self.records(folder).items():
                checked += 1
                if shard in bad:
                    problems.append((folder, shard, bad[shard]))
                    continue
                try:
                    with self.fs.open(self._p(f"{folder}/{shard}.parquet"), "rb") as f:
                        digest, _ = _sha256_stream(f)
                except OSError as exc:
                    problems.append((folder, shard, f"unreadable: {one_line(exc)}"))
                    continue
                if digest != rec.get("sha256"):
                    problems.append((folder, shard, f"sha256 {digest[:12]}... differs from the committed {str(rec.get('sha256'))[:12]}..."))
        return checked, problems

    def shards(self, folder: str) -> list[str]:
        return sorted(self.committed(folder))

    def shard_files(self, folder: str) -> list[str]:
        """URLs (object stores) or paths (local) of the committed shards, for DuckDB / pyarrow."""
        return [self.shard_path(folder, s) for s in self.shards(folder)]

    def read_shard(self, folder: str, shard: str, columns: list[str] | None = None) -> pa.Table:
        """One shard (or some of its columns). On object stores the whole object in ONE GET: a
        Parquet reader over the network asks for its size, footer and each column chunk apart
        (5-10 requests per shard), and the columns readers pick hold the bulk of it (image bytes)."""
        path = self._p(f"{folder}/{shard}.parquet")
        if self.local:
            return pq.read_table(path, columns=columns)
        # start=0: a ranged GET of the whole object (s3fs asks the size first, a HEAD, for a plain one)
        return pq.read_table(pa.BufferReader(self.fs.cat_file(path, start=0)), columns=columns)

    def uncommit(self, folder: str, shards: list[str] | None = None) -> int:
        """Forget a folder's shards (all, or the ones named): commit records go first, then the files."""
        self._check_lease()
        records = self.records(folder)
        if shards is not None:
            records = {s: r for s, r in records.items() if s in set(shards)}
        if records:
            self.fs.rm([self._p(self._commit_rel(folder, s)) for s in records])
            files = self._listing(folder)
            present = [files[f"{s}.parquet"]["name"] for s in records if f"{s}.parquet" in files]
            if present:
                self.fs.rm(present)
        for shard in records:
            self._records.pop((folder, shard), None)
        self.fs.invalidate_cache(self._p(folder))
        return len(records)

    def annotation_folders(self) -> list[str]:
        """Annotation folders in the order they were first written (steps, then rounds)."""
        manifest = self.read_manifest()
        order = manifest.get("order", [])
        listing = self._listing("annotations")
        found = [f"annotations/{name}" for name, e in sorted(listing.items()) if e.get("type") == "directory"]
        return [f for f in order if f in found] + [f for f in found if f not in order]

    def data_folders(self) -> list[str]:
        return ["images", "quarantine"] + self.annotation_folders()

    def remove_temporaries(self) -> list[str]:
        """Leftovers of a killed writer (hidden *.tmp-<pid> files; on S3, unfinished multipart
        uploads under OUT). Called with the writer lock held, so none of them is in use."""
        removed = []
        if self.local:
            for dirpath, _, files in os.walk(self.root):
                for name in files:
                    if TEMPORARY.match(name):
                        os.unlink(os.path.join(dirpath, name))
                        removed.append(os.path.join(dirpath, name))
        elif hasattr(self.fs, "call_s3"):
            bucket, _, prefix = self.root.partition("/")
            try:
                uploads = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
                for up in uploads.get("Uploads", []):
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                    removed.append(f"{self.protocol}://{bucket}/{up['Key']} (unfinished upload)")
            except Exception as exc:  # noqa: BLE001 - housekeeping never fails a run
                log.info("could not list unfinished uploads under %s: %s", self.out, one_line(exc))
        for p in removed:
            log.warning("removed %s, left by a killed run", p)
        return removed

    # ------------------------------------------------------------------- lock
    @contextmanager
    def lock(self, what: str = "run", lease_seconds: float | None = None) -> Iterator[None]:
        """One writer per OUT: flock locally (released by the kernel even after SIGKILL), a lease
        object on object stores (engine.lease). Temporaries of a killed run are removed once held."""
        if not self.local:
            from engine.store.lease import Lease

            lease = Lease(self, what, lease_seconds)
            lease.acquire()
            self._lease = lease
            try:
                self.remove_temporaries()
                yield
            finally:
                self._lease = None
                lease.release()
            return
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self._p(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                raise RunLockedError(
                    f"{self.out} is being written by another run ({holder}); wait for it to finish or stop it"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, {what} since {_now()}".encode(), 0)
            self.remove_temporaries()
            yield
        finally:
            os.close(fd)

    def _check_lease(self) -> None:
        if self._lease is not None:
            self._lease.check()

    # --------------------------------------------------------------- manifest
    def manifest_problem(self) -> str | None:
        """What is wrong with manifest.json (None: absent or sound). It holds only summaries and the
        order folders were written in, so a damaged one is read as absent and rewritten by the next run."""
        try:
            manifest = json.loads(self.read_bytes(MANIFEST))
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as exc:
            return f"not readable JSON ({one_line(exc)})"
        if not isinstance(manifest, dict):
            return f"not a JSON object but {type(manifest).__name__}"
        order = manifest.get("order", [])
        if not isinstance(order, list) or not all(isinstance(f, str) for f in order):
            return f"'order' must be a list of folder names, not {json.dumps(order)[:60]}"
        for key in ("pipeline", "rounds", "shards"):
            if key in manifest and not isinstance(manifest[key], dict):
                return f"{key!r} must be an object, not {json.dumps(manifest[key])[:60]}"
        return None

    def read_manifest(self) -> dict:
        """manifest.json, or {} (with one warning naming it) when it is damaged: see manifest_problem."""
        problem = self.manifest_problem()
        if problem is not None:
            if (MANIFEST, "", problem) not in self._warned:
                self._warned.add((MANIFEST, "", problem))
                log.warning("%s is damaged (%s): read as absent; the next run rewrites it", self.url(MANIFEST), problem)
            return {}
        try:
            return json.loads(self.read_bytes(MANIFEST))
        except FileNotFoundError:
            return {}

    def update_manifest(self, **fields: Any) -> dict:
        """Merge fields into manifest.json and refresh each folder's summary (shards, rows, bytes).

        Per-shard truth stays in the commit records: at 200k shards per folder a manifest listing
        every shard would be rewritten (megabytes) after every step."""
        manifest = self.read_manifest()
        manifest.setdefault("created", _now())
        manifest["updated"] = _now()
        manifest["versions"] = package_versions()
        order = manifest.setdefault("order", [])
        for key, value in fields.items():
            if key == "folder_order":
                for f in value:
                    if f not in order:
                        order.append(f)
            elif isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key].update(value)
            else:
                manifest[key] = value
        summaries = {}
        for folder in self.data_folders():
            committed = self.committed(folder)
            if committed:
                summaries[folder] = {"shards": len(committed), "rows": sum(int(r["rows"]) for r in committed.values()),
                                     "bytes": sum(int(r["bytes"]) for r in committed.values())}
        manifest["shards"] = summaries
        self.write_bytes(MANIFEST, json.dumps(manifest, indent=1, default=str).encode())
        return manifest


def _sha256_stream(f) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    while chunk := f.read(8 << 20):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _listing_key(entry: dict) -> tuple:
    """What changes when an object is rewritten: size plus ETag / mtime / inode, as the backend lists them."""
    return (entry.get("size"), entry.get("ETag") or entry.get("etag"), entry.get("mtime") or entry.get("LastModified")
            or entry.get("created"), entry.get("ino"))
