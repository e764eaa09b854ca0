"""Values a configuration may hold: finite numbers and integers that fit in 64 bits.

Why: an integer beyond 64 bits is accepted by Python and pydantic and fails only when a stage
writes it to Parquet (after OUT was written); a NaN threshold compares false with everything
and silently drops every region. Both are refused where the configuration is read:
`number_problem` walks the raw YAML (so the error names its path), and `BoundedModel` applies
the same rule to every field of a pydantic model, catching strings that pydantic coerces
("nan", "1e999", "99999999999999999999").
"""
from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

INT64 = (-(1 << 63), (1 << 63) - 1)
MAX_DEPTH = 64  # nesting of a configuration value (YAML mappings / lists)


def number_problem(value: Any, path: tuple = (), depth: int = 0) -> tuple[tuple, str] | None:
    """(path, what is wrong) of the first bad number inside `value`, or None."""
    if depth > MAX_DEPTH:
        return path, f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if not INT64[0] <= value <= INT64[1]:
            return path, f"integer {str(value)[:30]}{'...' if len(str(value)) > 30 else ''} does not fit in 64 bits"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, f"{value} is not a finite number")
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = number_problem(item, (*path, key), depth + 1)
        if found:
            return found
    return None


class BoundedModel(BaseModel):
    """A pydantic model whose every field holds only finite numbers and 64-bit integers."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded_numbers(cls, value: Any) -> Any:
        found = number_problem(value)
        if found:
            where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in found[0])
            raise ValueError(f"{found[1]}{' at ' + where.lstrip('.') if where else ''}")
        return value
