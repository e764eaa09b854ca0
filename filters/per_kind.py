"""Parameters given per annotation kind / tier, where a partial YAML override keeps the other defaults.

`min_score: {object: 0.5}` in pipelines.yaml must change the object threshold only, not
silently remove the text one; and a misspelt key (`objects:`) must be an error naming it.
"""
from __future__ import annotations

from typing import Any, Iterable


def merge_per_key(value: Any, defaults: dict[str, Any], allowed: Iterable[str], field: str) -> dict[str, Any]:
    """defaults updated with value (a dict keyed by kind / tier); unknown keys raise."""
    if value is None:
        return dict(defaults)
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a mapping of {sorted(allowed)} to values, got {value!r}")
    allowed = set(allowed)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{field}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    merged = dict(defaults)
    for key, v in value.items():
        base = merged.get(key)
        if isinstance(base, dict) and isinstance(v, dict):
            merged[key] = {**base, **v}
        else:
            merged[key] = v
    return merged
