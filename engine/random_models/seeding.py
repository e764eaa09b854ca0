"""Seeds of random weights: a pure function of the model's configuration, applied inside a forked RNG.

Why: every Ray / Beam worker and every resumed run must build bit-identical random weights from the
same reference, and building a model must not disturb the caller's torch random state. The seed
formulas are part of the weights: tests/test_random_models.py pins the weights of every preset, so
the two hash functions below stay as the families were first released (sha256 of the JSON config;
Grounding DINO and SAM hash their reference's revision string with sha1).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any, Iterator


def text_seed(text: str, algorithm: str = "sha256") -> int:
    """The first 32 bits of a hash of `text`, as an int."""
    return int(hashlib.new(algorithm, text.encode()).hexdigest()[:8], 16)


def config_seed(config: Any) -> int:
    """Seed of a JSON-able configuration (keys sorted: dict order does not matter)."""
    return text_seed(json.dumps(config, sort_keys=True))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch seeded with `seed` inside; the caller's CPU RNG state is restored afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
