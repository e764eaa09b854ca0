"""The order the suite's files start in: the heaviest first, hooked in by tests/conftest.py.

With `-n 2 --dist loadfile` (pyproject addopts) a file is one unit of work, and xdist hands the next file to
whichever process runs dry. Its own order (`--loadscope-reorder`: files with the most tests first) starts the
heaviest files last, because they hold 1-3 end-to-end tests each: a 3-minute file started last keeps one process
busy while the other idles. pyproject's addopts turn that order off (`--no-loadscope-reorder`) and this hook sorts
whole files, longest first (the LPT rule: the tail is made of short files, so both processes end together):
files in SECONDS by their measured seconds, then the others by their number of `slow` tests and of tests. Tests
inside a file keep their order. Only the order changes: every test still runs, with -n 0 too.
"""
from __future__ import annotations

# Seconds per file, estimated from a full quiet run's --durations (2 cores) and per-file runs under load: the files
# above ~30 s. A file renamed or removed fails tests/test_suite_order.py; a new heavy file belongs here (or it
# starts where its number of slow tests puts it).
SECONDS = {
    "test_readme.py": 200,
    "test_rounds.py": 180,
    "test_learning.py": 110,
    "test_segments.py": 110,
    "test_runners.py": 60,
    "test_ray_resume.py": 55,
    "test_ray_rounds_s3.py": 84,
    "test_crossfit.py": 52,
    "test_ray_cluster.py": 50,
    "test_quality_stage3.py": 40,
    "test_quality_bench.py": 40,
    "test_hostile_integrity.py": 40,
    "test_s3.py": 30,
    "test_trainer.py": 30,
}


def cost(name: str, tests: int, slow: int) -> tuple:
    """Sort key of a file (smaller starts first)."""
    return (-SECONDS.get(name, 0), -slow, -tests, name)


def heaviest_first(items: list) -> None:
    """Reorder pytest items in place: whole files, by cost(); stable inside a file."""
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(str(item.path), []).append(item)
    order = sorted(files, key=lambda path: cost(files[path][0].path.name, len(files[path]),
                                                sum(i.get_closest_marker("slow") is not None for i in files[path])))
    items[:] = [item for path in order for item in files[path]]
