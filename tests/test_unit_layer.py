"""The unit layer (tests/unit_layer.py): which tests `-m unit` selects, and that a unit test starting a subprocess or
a process fails, also when the code under test catches the error, while threads of earlier tests and tests outside
the layer may start them. Not itself in the unit layer: the guard of an outer unit test would catch the processes
these tests start on purpose. The guard is driven here as pytest drives it (its hook-wrapper generator)."""
from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import unit_layer
from unit_layer import UnitLayerViolation


class FakeItem(SimpleNamespace):
    """What the unit layer reads of a pytest item."""

    def __init__(self, module: str, name: str, marks=()):
        super().__init__(path=Path("tests") / module, originalname=name, nodeid=f"tests/{module}::{name}",
                         marks=set(marks))

    def get_closest_marker(self, name):
        return name if name in self.marks else None

    def add_marker(self, mark):
        self.marks.add(mark.name)


def test_selection_by_module_slow_and_not_unit(monkeypatch):
    monkeypatch.setattr(unit_layer, "UNIT_MODULES", {"test_a.py"})
    monkeypatch.setattr(unit_layer, "NOT_UNIT", {"test_a.py::test_spawns"})
    items = [FakeItem("test_a.py", "test_pure"), FakeItem("test_a.py", "test_long", ["slow"]),
             FakeItem("test_a.py", "test_spawns"), FakeItem("test_b.py", "test_other")]
    unit_layer.pytest_collection_modifyitems(None, items)
    assert ["unit" in i.marks for i in items] == [True, False, False, False]


def _start_python():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def _start_process():
    p = multiprocessing.get_context("spawn").Process(target=print)
    p.start()
    p.join()


def _caught():
    try:
        _start_python()
    except Exception:
        pass


@pytest.mark.parametrize("body, what", [(_start_python, "a subprocess"), (_start_process, "a multiprocessing process"),
                                        (_caught, "a subprocess")])
def test_a_unit_test_that_starts_a_process_fails(body, what):
    guard = unit_layer._Guard()
    item = FakeItem("test_a.py", body.__name__, ["unit"])
    run = guard.run(item)
    next(run)  # the phase starts: guarded
    if body is _caught:
        body()  # the code under test swallows the refusal ...
    else:
        with pytest.raises(UnitLayerViolation, match=what):
            body()
    with pytest.raises(UnitLayerViolation, match=f"{item.nodeid} started {what}"):  # ... the test still fails
        run.send(None)
    _start_python()  # after the phase: allowed again


def test_outside_the_layer_and_earlier_threads_may_start_processes():
    guard = unit_layer._Guard()
    plain = guard.run(FakeItem("test_a.py", "test_e2e"))
    next(plain)
    _start_python()
    with pytest.raises(StopIteration) as done:
        plain.send("result")
    assert done.value.value == "result"

    go, finished, errors = threading.Event(), threading.Event(), []

    def earlier():  # started before the unit test: an earlier test's background thread
        go.wait(60)
        try:
            _start_python()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finished.set()

    threading.Thread(target=earlier, daemon=True).start()
    unit = guard.run(FakeItem("test_a.py", "test_pure", ["unit"]))
    next(unit)
    go.set()
    assert finished.wait(60) and errors == []
    with pytest.raises(StopIteration):
        unit.send(None)
