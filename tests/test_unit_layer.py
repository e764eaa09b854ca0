"""The unit layer of tests/conftest.py, run on a small suite written here (pytester, in this process): `-m unit`
selects the tests of UNIT_MODULES that are not slow nor in NOT_UNIT, and a unit test that starts a subprocess or a
multiprocessing process fails, also when the code under test catches the error. Not itself in the unit layer: the
guard of an outer unit test would catch the processes these tests start on purpose."""
from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()

SUITE = '''
import multiprocessing
import subprocess
import sys

import pytest


def test_pure():
    assert sum(range(4)) == 6


def test_starts_a_subprocess():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_catches_the_refusal():
    try:
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    except Exception:
        pass


def test_starts_a_process():
    p = multiprocessing.get_context("spawn").Process(target=print)
    p.start()
    p.join()


@pytest.mark.slow
def test_slow_may_start_a_subprocess():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
'''


def test_unit_marker_selection_and_process_guard(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n    unit: unit\n")
    pytester.makepyfile(test_schemas=SUITE)  # a module name of UNIT_MODULES
    pytester.makepyfile(test_rounds="def test_elsewhere():\n    pass\n")  # a module that is not
    opts = ["-p", "no:cacheprovider", "-p", "no:xdist", "--import-mode=importlib"]  # names like the outer suite's
    res = pytester.runpytest_inprocess("-m", "unit", *opts)
    res.assert_outcomes(passed=1, failed=3, deselected=2)
    res.stdout.fnmatch_lines(["*test_starts_a_subprocess*UnitLayerViolation*started a subprocess*",
                              "*test_catches_the_refusal*UnitLayerViolation*started a subprocess*",
                              "*test_starts_a_process*UnitLayerViolation*started a multiprocessing process*"])
    every = pytester.runpytest_inprocess("-k", "slow or elsewhere", *opts)
    every.assert_outcomes(passed=2)  # outside the unit layer processes are allowed
