"""manifest.json of OUT: per-folder summaries, the order folders were written in, package versions."""
from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
from importlib import metadata
from typing import Any

from engine.store.errors import one_line

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRACKED_PACKAGES = (
    "fld-engine", "torch", "transformers", "open_clip_torch", "pyarrow", "duckdb", "pillow",
    "pycocotools", "ray", "apache-beam", "rapidocr", "spacy", "onnxruntime", "fsspec", "s3fs",
)

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


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """Reading and updating manifest.json (a mixin of ShardStore)."""
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
        manifest.setdefault("created", utc_now())
        manifest["updated"] = utc_now()
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
