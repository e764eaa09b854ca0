"""The commit protocol of ShardStore (see engine/store/shards.py): a shard counts only once its record is written."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.atomic import TEMPORARY, atomic_write
from engine.store.errors import one_line, write_error
from engine.store.integrity import TAIL_BYTES, listing_key, parquet_footer, sha256_stream
from engine.store.manifest import utc_now

log = logging.getLogger(__name__)

COMMITTED = "_committed"


class Commits:
    """Writing, committing, listing and uncommitting shards (a mixin of ShardStore)."""
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
                    digest, size = sha256_stream(f)
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
            "committed_at": utc_now(),
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
            key = listing_key(entry)
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
