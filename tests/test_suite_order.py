"""The suite's files start heaviest first (tests/suite_order.py): whole files, longest first, tests inside a file
in their order; the table names files that exist; pyproject keeps xdist from re-sorting by test count."""
from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace

import suite_order

TESTS = Path(__file__).resolve().parent


class FakeItem(SimpleNamespace):
    """What the order reads of a pytest item."""

    def __init__(self, module: str, name: str, slow: bool = False):
        super().__init__(path=TESTS / module, name=name, slow=slow)

    def get_closest_marker(self, name):
        return "slow" if name == "slow" and self.slow else None


def test_whole_files_start_heaviest_first(monkeypatch):
    monkeypatch.setattr(suite_order, "SECONDS", {"test_big.py": 100, "test_mid.py": 50})
    items = [FakeItem("test_many.py", f"t{i}") for i in range(5)] + [
        FakeItem("test_mid.py", "a"), FakeItem("test_one_slow.py", "s", slow=True), FakeItem("test_big.py", "b1"),
        FakeItem("test_mid.py", "c"), FakeItem("test_big.py", "b2", slow=True), FakeItem("test_few.py", "f")]
    suite_order.heaviest_first(items)
    assert [(i.path.name, i.name) for i in items] == [
        ("test_big.py", "b1"), ("test_big.py", "b2"), ("test_mid.py", "a"), ("test_mid.py", "c"),
        ("test_one_slow.py", "s"), *[("test_many.py", f"t{i}") for i in range(5)], ("test_few.py", "f")]


def test_the_table_names_test_files_that_exist():
    missing = [name for name in suite_order.SECONDS if not (TESTS / name).is_file()]
    assert not missing, f"tests/suite_order.py SECONDS names files that are gone: {missing}"


def test_xdist_keeps_the_order():
    addopts = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert "--dist loadfile" in addopts and "--no-loadscope-reorder" in addopts
