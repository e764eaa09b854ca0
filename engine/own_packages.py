"""fld-engine's five top-level packages must come from one installation.

Why this exists: the repository's layout (engine/ annotators/ filters/ refine/ schemas/) is installed as is,
so site-packages gets these generic names (README "Packaging"). Another module of the same name earlier on
sys.path (a `filters` package of another project, a `schemas.py` in the working folder of `python -m`)
would otherwise surface as a confusing ImportError deep inside a run; this check names the culprit first.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

TOP_LEVEL = ("engine", "annotators", "filters", "refine", "schemas")


class ShadowedPackageError(ImportError):
    """One of fld-engine's top-level names resolves outside fld-engine's installation."""


def _location(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve()
    return Path(spec.origin).resolve() if spec.origin else None


def _distributions(name: str) -> list[str]:
    try:
        from importlib.metadata import packages_distributions

        return sorted(set(packages_distributions().get(name, [])))
    except Exception:  # metadata of a broken installation must not hide the real message
        return []


def check_own_packages(root: Path) -> None:
    """Raise ShadowedPackageError naming each top-level package that does not live in `root`."""
    problems = []
    for name in TOP_LEVEL:
        where = _location(name)
        if where is None:
            problems.append(f"'{name}' is missing from {root}")
        elif where.parent != root or where.name != name:
            dists = [d for d in _distributions(name) if d.lower().replace("_", "-") != "fld-engine"]
            by = f" (installed by {', '.join(dists)})" if dists else ""
            problems.append(f"'{name}' resolves to {where}{by}, not {root / name}")
    if problems:
        raise ShadowedPackageError(
            "fld-engine's top-level packages (" + ", ".join(TOP_LEVEL) + ") must come from one installation: "
            + "; ".join(problems) + ". Another module of that name comes first on sys.path: rename or uninstall "
            "it, run from another folder, or install fld-engine in its own virtual environment.")
