"""Integrity of committed shards (see engine/store/shards.py): damaged(), committed(), require_intact(), verify()."""
from __future__ import annotations

import hashlib
import logging
import struct

import pyarrow as pa
import pyarrow.parquet as pq

from engine.store.errors import DamagedShardError, one_line
from engine.store.manifest import MANIFEST

log = logging.getLogger(__name__)

TAIL_BYTES = 64 * 1024  # one ranged read gets the footer of any shard the engine writes


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


def sha256_stream(f) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    while chunk := f.read(8 << 20):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def listing_key(entry: dict) -> tuple:
    """What changes when an object is rewritten: size plus ETag / mtime / inode, as the backend lists them."""
    return (entry.get("size"), entry.get("ETag") or entry.get("etag"), entry.get("mtime") or entry.get("LastModified")
            or entry.get("created"), entry.get("ino"))


class Integrity:
    """Finding shards deleted, truncated or replaced after their commit (a mixin of ShardStore)."""
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
            if cached is None or cached[0] != listing_key(entry):
                todo.append((rec, entry))
        if len(todo) < 2 or self.local:
            return  # _problem reads them one by one (local files: no round trip to save)
        sizes = [int(e["size"]) for _, e in todo]
        tails = self.fs.cat_ranges([e["name"] for _, e in todo], [max(0, n - TAIL_BYTES) for n in sizes], sizes,
                                   on_error="return")
        for (rec, entry), tail, size in zip(todo, tails, sizes):
            self._checks[entry["name"]] = (listing_key(entry), self._footer_problem(rec, tail, size))

    def _problem(self, folder: str, shard: str, rec: dict, entry: dict | None) -> str | None:
        problem, needs_footer = self._quick_problem(folder, shard, rec, entry)
        if not needs_footer:
            return problem
        path = entry["name"]
        key = listing_key(entry)
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
                        digest, _ = sha256_stream(f)
                except OSError as exc:
                    problems.append((folder, shard, f"unreadable: {one_line(exc)}"))
                    continue
                if digest != rec.get("sha256"):
                    problems.append((folder, shard, f"sha256 {digest[:12]}... differs from the committed {str(rec.get('sha256'))[:12]}..."))
        return checked, problems
