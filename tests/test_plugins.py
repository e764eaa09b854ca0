"""Plug-in stages defined outside the package: the example of docs/stages.md, by import path and by entry point."""
import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.registry import ENTRY_POINT_GROUP, UnknownStageError, stage_class
from helpers import rendered_sign

README = Path(__file__).resolve().parent.parent / "docs" / "stages.md"  # its "Custom stages (plug-ins)"


def readme_files() -> dict[str, str]:
    """The README's code blocks whose first line is `# FILE`: file name -> content (exactly as shown)."""
    out = {}
    for block in re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), flags=re.S):
        first = block.partition("\n")[0]
        match = re.fullmatch(r"# ([\w./-]+\.(?:py|yaml|yml|toml|json))", first.strip())
        if match:
            out[match.group(1)] = block
    return out


def readme_entry_points() -> dict[str, str]:
    """The README's `[project.entry-points."fld_engine.stages"]` table (pyproject.toml syntax)."""
    import tomllib

    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    table = next(b for b in blocks if f'entry-points."{ENTRY_POINT_GROUP}"' in b)
    return tomllib.loads(table)["project"]["entry-points"][ENTRY_POINT_GROUP]


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    """A folder on sys.path holding the README's filter module, and a tiny installed distribution
    (`my-filters`, a .dist-info as pip writes it) declaring the README's entry point."""
    site = tmp_path / "site"
    site.mkdir()
    files = readme_files()
    (site / "my_filters.py").write_text(files["my_filters.py"])
    dist = site / "my_filters-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-filters\nVersion: 0.1\n")
    # entry_points.txt is what pip writes from that pyproject table
    lines = [f"{name} = {target}" for name, target in readme_entry_points().items()]
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("my_filters", None)


@pytest.fixture(scope="module")
def signs(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("signs")
    (d / "sign.jpg").write_bytes(rendered_sign())
    (d / "coffee.png").write_bytes(photos["coffee"])
    return d


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _short_text_rows(out):
    res = _run("query", out, "SELECT label, status, reason, checks['short_text.chars'] AS chars FROM regions "
                             "WHERE kind = 'text' ORDER BY label", "--format", "json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _check_rows(rows, min_chars):
    assert rows, "OCR found no text on the rendered sign"
    for r in rows:
        assert r["chars"] == len(r["label"].strip())
        if r["chars"] < min_chars:
            assert (r["status"], r["reason"]) == ("dropped", "short_text:too_short")
        else:
            assert r["status"] == "kept"


@pytest.mark.timeout(600)
def test_readme_filter_by_import_path_and_by_entry_point(plugin_dir, signs, tmp_path):
    # 1. import path, with the README's own pipelines file
    yaml_text = readme_files()["my_pipelines.yaml"]
    assert "my_filters:ShortText" in yaml_text
    cfg = tmp_path / "my_pipelines.yaml"
    cfg.write_text(yaml_text)
    res = _run("run", cfg, "--pipeline", "signs", "--input", signs, "--out", tmp_path / "by_path")
    assert res.exit_code == 0, res.output
    by_path = _short_text_rows(tmp_path / "by_path")
    _check_rows(by_path, 4)
    # 2. the entry point of the installed distribution: the short name, another threshold
    cfg2 = tmp_path / "entry.yaml"
    cfg2.write_text(yaml_text.replace('"my_filters:ShortText"', "short_text").replace("min_chars: 4", "min_chars: 8"))
    res = _run("run", cfg2, "--pipeline", "signs", "--input", signs, "--out", tmp_path / "by_entry")
    assert res.exit_code == 0, res.output
    by_entry = _short_text_rows(tmp_path / "by_entry")
    _check_rows(by_entry, 8)
    assert [r["label"] for r in by_entry] == [r["label"] for r in by_path]
    assert sum(r["status"] == "dropped" for r in by_entry) > sum(r["status"] == "dropped" for r in by_path)


def test_fld_stages_lists_origins_and_params(plugin_dir):
    res = _run("stages")
    assert res.exit_code == 0, res.output
    line = next(line for line in res.output.splitlines() if "short_text" in line)
    assert "entry point (package my-filters)" in line and "my_filters:ShortText" in line and "min_chars=3" in line
    ocr = next(line for line in res.output.splitlines() if line.strip("│ ").startswith("ocr "))
    assert "built-in" in ocr and "min_score=0.5" in ocr
    assert "import path" in res.output


def test_broken_plugin_is_named(plugin_dir):
    dist = plugin_dir / "my_filters-0.1.dist-info" / "entry_points.txt"
    dist.write_text(dist.read_text() + "broken = my_filters:NoSuchClass\n")
    with pytest.raises(UnknownStageError, match="stage 'broken': cannot import my_filters:NoSuchClass"):
        stage_class("broken")
    res = _run("stages")
    assert res.exit_code == 0 and "cannot load" in res.output
    with pytest.raises(UnknownStageError, match="known stages: .*short_text"):
        stage_class("short_txt")
