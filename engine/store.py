"""Parquet shard store: atomic shard commits, resume, a lock per OUT, and manifest.json.

A shard is written under a temporary name, fsynced and renamed, then a commit record
(`<folder>/_committed/<shard>.json`) is written the same way. A shard counts as done only
when its commit record exists, so a run killed at any instant leaves either nothing or a
complete shard: a rerun skips committed shards and redoes the rest (no loss, no duplicates).
Commit records are per shard so any engine (local, Ray workers, Beam workers) can commit
without a coordinator; manifest.json is rebuilt from them.
"""
from __future__ import annotations

import datetime as _dt
import functools
import fcntl
import hashlib
import json
import os
import socket
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

COMMITTED = "_committed"
TRACKED_PACKAGES = (
    "fld-engine", "torch", "transformers", "open_clip_torch", "pyarrow", "duckdb", "pillow",
    "pycocotools", "ray", "apache-beam", "rapidocr", "spacy", "onnxruntime",
)


class StoreError(RuntimeError):
    pass


class RunLockedError(StoreError):
    """Another run holds OUT."""


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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardStore:
    """OUT/ folders: images, quarantine, annotations/<step>, models/<round>, exports."""

    def __init__(self, out: str | Path):
        self.out = Path(out).absolute()  # workers in another cwd (Ray, Beam, processes) open the same files

    # ------------------------------------------------------------------ paths
    def folder(self, folder: str) -> Path:
        return self.out / folder

    def shard_path(self, folder: str, shard: str) -> Path:
        return self.out / folder / f"{shard}.parquet"

    def _commit_path(self, folder: str, shard: str) -> Path:
        return self.out / folder / COMMITTED / f"{shard}.json"

    # ----------------------------------------------------------------- commits
    def write_shard(self, folder: str, shard: str, table: pa.Table, meta: dict[str, Any] | None = None) -> dict:
        """Write table as <folder>/<shard>.parquet atomically, then its commit record."""
        path = self.shard_path(folder, shard)
        (path.parent / COMMITTED).mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
            digest = hashlib.sha256(f.read()).hexdigest()
        os.replace(tmp, path)
        record = {
            "folder": folder,
            "shard": shard,
            "rows": table.num_rows,
            "sha256": digest,
            "bytes": path.stat().st_size,
            "committed_at": _now(),
            "host": socket.gethostname(),
            **(meta or {}),
        }
        _atomic_write_bytes(self._commit_path(folder, shard), json.dumps(record, indent=1, default=str).encode())
        return record

    def commit_record(self, folder: str, shard: str) -> dict | None:
        p = self._commit_path(folder, shard)
        if not p.exists():
            return None
        return json.loads(p.read_text())

    def is_committed(self, folder: str, shard: str, config_hash: str | None = None) -> bool:
        rec = self.commit_record(folder, shard)
        if rec is None or not self.shard_path(folder, shard).exists():
            return False
        return config_hash is None or rec.get("config_hash") == config_hash

    def committed(self, folder: str) -> dict[str, dict]:
        d = self.out / folder / COMMITTED
        if not d.is_dir():
            return {}
        out = {}
        for p in sorted(d.glob("*.json")):
            rec = json.loads(p.read_text())
            if self.shard_path(folder, rec["shard"]).exists():
                out[rec["shard"]] = rec
        return out

    def shards(self, folder: str) -> list[str]:
        return sorted(self.committed(folder))

    def shard_files(self, folder: str) -> list[Path]:
        return [self.shard_path(folder, s) for s in self.shards(folder)]

    def read_shard(self, folder: str, shard: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.shard_path(folder, shard), columns=columns)

    def uncommit(self, folder: str, shards: list[str] | None = None) -> int:
        """Forget a folder's shards (all, or the ones named): commit records go first, then the files."""
        n = 0
        for shard in self.shards(folder) if shards is None else shards:
            self._commit_path(folder, shard).unlink(missing_ok=True)
            self.shard_path(folder, shard).unlink(missing_ok=True)
            n += 1
        return n

    def annotation_folders(self) -> list[str]:
        """Annotation folders in the order they were first written (steps, then rounds)."""
        manifest = self.read_manifest()
        order = manifest.get("order", [])
        found = [f"annotations/{p.name}" for p in sorted((self.out / "annotations").glob("*")) if p.is_dir()]
        return [f for f in order if f in found] + [f for f in found if f not in order]

    def read_json(self, rel: str) -> dict | None:
        p = self.out / rel
        return json.loads(p.read_text()) if p.exists() else None

    def write_json(self, rel: str, obj: dict) -> None:
        p = self.out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(p, json.dumps(obj, indent=1, default=str).encode())

    def delete_tree(self, rel: str) -> None:
        import shutil

        shutil.rmtree(self.out / rel, ignore_errors=True)

    def local_dir(self, rel: str) -> str:
        """A local folder holding OUT/<rel> (OUT is local: the folder itself)."""
        return str(self.out / rel)

    def write_log(self, name: str, text: str) -> None:
        """OUT/logs/<name>: diagnostics kept with the data (e.g. Ray Data's per-operator stats)."""
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(logs / name, text.encode())

    # ------------------------------------------------------------------- lock
    @contextmanager
    def lock(self, what: str = "run") -> Iterator[None]:
        """One writer per OUT. flock is released by the kernel even after SIGKILL."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
            yield
        finally:
            os.close(fd)

    # --------------------------------------------------------------- manifest
    def read_manifest(self) -> dict:
        p = self.out / "manifest.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def update_manifest(self, **fields: Any) -> dict:
        """Merge fields into manifest.json and refresh the committed shards of every folder."""
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
        folders = ["images", "quarantine"] + self.annotation_folders()
        committed = {f: self.committed(f) for f in folders}
        manifest["shards"] = {f: shards for f, shards in committed.items() if shards}
        _atomic_write_bytes(self.out / "manifest.json", json.dumps(manifest, indent=1, default=str).encode())
        return manifest
