"""The one configuration identity of everything `fld run` writes: ingest, steps and rounds.

A committed shard carries the hash of the configuration that produced it; a rerun skips shards with
the current hash and refuses to mix shards of another one. So the hash must cover exactly what
decides the output, and nothing else:

- ingest: the ingest settings that change which rows land in images/ and quarantine/ (limits,
  shard size, source name, ...), not the number of workers;
- a step: the hash of what it reads (ingest or the previous step), then for each stage its name
  and its semantic parameters (engine.stage.EXECUTION_PARAMS left out: batch size, CPUs, GPUs,
  actors, threads) and the resolved reference + revision of every model it uses
  (`Stage.model_params`). Renaming an alias, or changing an alias no stage uses, changes nothing;
  pointing a used alias at other weights changes the hash;
- a refinement round: what it trains on (the hash of its input step or round), the training and
  relabel settings, the model it starts from (reference + revision) and the round number.

Every hash in the engine is computed here with `digest`, so there is one recipe. Checksums of bytes
are not identities and stay where the bytes are: ingest's sha256 of each image (dedup, provenance),
the store's shard and footer sha256 (engine/store/integrity.py); so do the local cache's folder
names (engine/local_cache.py), the seeds of the random test models (engine/random_models/seeding.py,
frozen as first released) and the label colours of `fld show`.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from engine.models import model_revision

HASH_LENGTH = 16
INGEST_EXECUTION_SETTINGS = frozenset({"workers", "read_threads"})


def digest(payload: Any) -> str:
    """sha256 of the canonical JSON of payload (sorted keys), shortened."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:HASH_LENGTH]


def ingest_identity(ingest_config) -> dict:
    return {"ingest": ingest_config.model_dump(mode="json", exclude=set(INGEST_EXECUTION_SETTINGS))}


def ingest_hash(ingest_config) -> str:
    return digest(ingest_identity(ingest_config))


def stage_identity(stage, spec_name: str | None = None) -> dict:
    """What decides one stage's output: name, semantic params, models used (ref + revision)."""
    models = {param: {"ref": ref, "revision": stage.model_revision(param, ref)} for param, ref in stage.model_refs().items()}
    return {"stage": spec_name or stage.name, "params": stage.semantic_params(), "models": models}


def step_hash(stages: list, input_hash: str, spec_names: list[str] | None = None) -> str:
    """A step = its input's hash + its stages' identities, in order."""
    names = spec_names or [None] * len(stages)
    return digest({"input": input_hash, "stages": [stage_identity(s, n) for s, n in zip(stages, names)]})


def model_identity(ref: str, family: str = "hf") -> dict:
    return {"ref": ref, "revision": model_revision(ref, family)}


def round_hash(input_hash: str, settings: dict, start_model: dict, round_: int) -> str:
    """Round k: the data it trains on and relabels (its input's hash), the settings, the start model."""
    return digest({"input": input_hash, "settings": settings, "start": start_model, "round": round_})
