"""fld-engine's generic top-level names (engine, annotators, filters, refine, schemas): a module of the same
name that comes first on sys.path is named in one clear error, never a confusing ImportError mid-run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(argv, cwd, pythonpath):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath)}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("shadow", ["filters/__init__.py", "schemas.py", "refine/__init__.py", "annotators.py"])
def test_a_same_named_module_first_on_sys_path_is_named(tmp_path, shadow):
    fake = tmp_path / shadow
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text("X = 1\n")
    res = _run([sys.executable, "-c", "import engine.config"], cwd=tmp_path, pythonpath=[REPO])
    assert res.returncode == 1 and "ShadowedPackageError" in res.stderr, res.stderr[-2000:]
    name = shadow.split("/")[0].removesuffix(".py")
    assert f"'{name}' resolves to {fake.parent if '/' in shadow else fake}" in res.stderr, res.stderr[-2000:]


def test_the_fld_script_says_it_in_one_line(tmp_path):
    fld = shutil.which("fld")
    if fld is None:
        pytest.skip("the fld console script is not installed")
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "__init__.py").write_text("")
    res = _run([fld, "--help"], cwd=tmp_path, pythonpath=[tmp_path, REPO])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.startswith("error: fld-engine's top-level packages") and str(tmp_path / "schemas") in res.stderr


def test_the_own_installation_passes(tmp_path):
    res = _run([sys.executable, "-c", "import engine, schemas; print(schemas.__file__)"], cwd=tmp_path, pythonpath=[REPO])
    assert res.returncode == 0 and res.stdout.strip() == str(REPO / "schemas" / "__init__.py"), res.stderr
