"""`random:<preset>` / `random:<config.json|yaml>` models: the real architecture classes with random
weights, built the same way by every process (tests, smoke runs, the `offline` profile).

Why one home: five model families need the same three things, presets (with config files that name
a preset and override it), tokenizers built without a model hub, and weights seeded from the config
so that Ray / Beam workers, resumed runs and other machines build bit-identical models. Annotator
modules keep only annotation code and import their builder from here; preflight validates a `random:`
reference here without importing any stage (`check(family, ref)`).

One module per family: florence2, detectors (DETR family, OWLv2), grounding_dino, sam, open_clip;
seeding.py and tokenizers.py are shared. Importing this package imports no model library.
"""
from __future__ import annotations

import importlib

from engine.models import parse_model_ref

# family -> the module whose check_config(location, config) validates a random: reference of it
FAMILIES = {
    "florence2": "engine.random_models.florence2",
    "detr": "engine.random_models.detectors",
    "owlv2": "engine.random_models.detectors",
    "grounding_dino": "engine.random_models.grounding_dino",
    "sam": "engine.random_models.sam",
    "open_clip": "engine.random_models.open_clip",
}


def check(family: str, ref: str) -> None:
    """A `random:` reference of `family` names a valid preset / config (ValueError or OSError saying what
    is wrong); any other reference passes (hub ids and folders are preflight's resolvers' business).
    Nothing is built."""
    if family not in FAMILIES:
        raise ValueError(f"unknown random model family {family!r}; known: {', '.join(FAMILIES)}")
    parsed = parse_model_ref(ref)
    if parsed.kind != "random":
        return
    module = importlib.import_module(FAMILIES[family])
    module.check_config(family, parsed)
