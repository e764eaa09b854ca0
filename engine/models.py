"""Model references: a hub id, a local directory, or `random:<config>` for a random-initialised
model of the real architecture (tests, smoke runs, offline profile).

Loading never needs the network when a local directory or a random config is given.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class ModelRef:
    ref: str
    kind: str  # hub | local | random
    location: str  # hub id, directory, or config path / preset name

    @property
    def revision(self) -> str:
        """What provenance records: a content hash for local/random, the hub id's revision name else."""
        if self.kind == "random":
            return "random-" + hashlib.sha1(json.dumps(self.random_config(), sort_keys=True).encode()).hexdigest()[:12]
        if self.kind == "local":
            return "local-" + _directory_fingerprint(Path(self.location))
        return os.environ.get("FLD_HUB_REVISION", "main")

    def random_config(self) -> dict:
        """The JSON/YAML config of a random reference ({} for a preset name)."""
        if self.kind != "random":
            raise ValueError(f"{self.ref} is not a random: reference")
        path = Path(self.location)
        if path.suffix in (".json", ".yaml", ".yml"):
            if not path.exists():
                raise FileNotFoundError(f"model config {path} (from {self.ref!r}) does not exist")
            text = path.read_text()
            if path.suffix == ".json":
                return json.loads(text)
            import yaml

            return yaml.safe_load(text) or {}
        return {"preset": self.location}


def _directory_fingerprint(root: Path) -> str:
    """Configs whole; weights by name, size and their first MiB (safetensors headers, checkpoints
    differ there): two checkpoints with the same config but other weights get other revisions."""
    h = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        h.update(rel.encode())
        if path.suffix in (".json", ".yaml", ".yml", ".txt"):
            h.update(path.read_bytes())
        else:
            h.update(str(path.stat().st_size).encode())
            with open(path, "rb") as f:
                h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def parse_model_ref(ref: str) -> ModelRef:
    if not ref or not isinstance(ref, str):
        raise ValueError(f"model reference must be a non-empty string, got {ref!r}")
    if ref.startswith(RANDOM_PREFIX):
        return ModelRef(ref, "random", ref[len(RANDOM_PREFIX):])
    if os.path.isdir(ref):
        return ModelRef(ref, "local", ref)
    if ref.startswith((".", "/", "~")) or os.sep in ref.strip("/").replace("/", "", 1):
        raise FileNotFoundError(f"model directory {ref!r} does not exist (and it is not a hub id org/name)")
    return ModelRef(ref, "hub", ref)
