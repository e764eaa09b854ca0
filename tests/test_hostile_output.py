"""Output is data, not markup (issue 11 item 6): through the real CLI, file names and cells holding
rich markup, terminal escape sequences, carriage returns, NULs and bidi overrides are shown as
what they are, never interpreted; JSON output keeps them exactly."""
from __future__ import annotations

import json
import textwrap

import pytest
from typer.testing import CliRunner

from engine.cli import app, shown

PIPELINES = """
pipelines:
  filter_only:
    ingest: {shard_size: 4}
    steps:
      - name: stage2
        stages:
          - {stage: region_filter}
"""
# file name -> caption of that image (a list file carries both)
HOSTILE = {
    "evil\x1b[31mred\x1b[0m.png": "[/bold] closes a tag that was never opened",
    "line\nbreak.png": "bbox must be [x, y, width, height]",
    "carriage\rreturn.png": "[link=https://example.com]click[/link] and [bold red]shout[/]",
    "bidi\u202egnp.exe.png": "title \x1b]0;pwned\x07 bell, nul \x00 here, tab\tand \u2028 separator",
}
RAW = ["\x1b", "\r", "\x00", "\x07", "\u202e", "\u2028"]  # must never reach the terminal


@pytest.fixture(scope="module")
def out(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("hostile")
    names = ("astronaut", "coffee", "chelsea", "rocket")
    rows = []
    for (name, caption), photo in zip(HOSTILE.items(), names):
        (d / name).write_bytes(photos[photo])
        rows.append(json.dumps({"path": name, "caption": caption}))
    (d / "list.jsonl").write_text("\n".join(rows))
    (d / "pipelines.yaml").write_text(textwrap.dedent(PIPELINES))
    out = d / "out"
    res = CliRunner().invoke(app, ["run", str(d / "pipelines.yaml"), "--pipeline", "filter_only",
                                   "--input", str(d / "list.jsonl"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "inputs 4 = images 4 + quarantined 0 + duplicates 0" in res.output
    return out


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _no_raw(text: str) -> None:
    for ch in RAW:
        assert ch not in text, f"{ch!r} reached the terminal"


@pytest.mark.timeout(120)
def test_query_table_shows_cells_literally(out):
    res = _cli("query", out, "SELECT i.uri, t.text FROM images i JOIN texts t USING (image_id) ORDER BY i.uri")
    assert res.exit_code == 0, res.output
    _no_raw(res.output)
    flat = " ".join(res.output.split())  # rich wraps long cells
    for caption in HOSTILE.values():
        for piece in ("[/bold]", "[x, y, width, height]", "[link=https://example.com]click[/link]", "[bold red]shout[/]"):
            if piece in caption:
                assert piece in flat, piece
    assert "evil\\x1b[31mred\\x1b[0m.png" in flat
    assert "line\\nbreak.png" in flat and "carriage\\rreturn.png" in flat and "bidi\\u202egnp.exe.png" in flat
    assert "\\x1b]0;pwned\\x07" in flat and "nul \\x00 here" in flat and "\\u2028" in flat


@pytest.mark.timeout(120)
def test_column_names_and_titles_are_data_too(out):
    res = _cli("query", out, 'SELECT 1 AS "[bold]x[/bold]", \'[/]\' AS "\x1b[2J"')
    assert res.exit_code == 0, res.output
    _no_raw(res.output)
    assert "[bold]x[/bold]" in res.output and "\\x1b[2J" in res.output and "[/]" in res.output


@pytest.mark.timeout(120)
def test_json_output_keeps_the_exact_values(out):
    res = _cli("query", out, "SELECT i.uri, t.text FROM images i JOIN texts t USING (image_id)", "--format", "json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    got = {r["uri"].rsplit("/", 1)[1]: r["text"] for r in rows}
    assert got == {name: caption.strip() for name, caption in HOSTILE.items()}  # exact, control characters kept


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sql, shown_part", [
    ('SELECT * FROM "[bold]no_such_table[/bold]"', "[bold]no_such_table[/bold]"),
    ("SELECT * FROM \"evil\x1b[31m\"", "evil\\x1b[31m"),
    ('SELECT "[x, y]" FROM images', "[x, y]"),
])
def test_error_messages_are_printed_literally(out, sql, shown_part):
    res = _cli("query", out, sql)
    assert res.exit_code == 2
    _no_raw(res.output)
    assert "error:" in res.output and shown_part in " ".join(res.output.split()), res.output


@pytest.mark.timeout(120)
def test_errors_naming_hostile_paths(tmp_path):
    bad = tmp_path / "no[bold]\x1b[31mwhere\u202e"
    res = _cli("stats", bad)
    assert res.exit_code != 0
    _no_raw(res.output)
    res = _cli("run", tmp_path / "missing[/].yaml", "--pipeline", "p", "--input", bad, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "missing[/].yaml" in res.output, res.output
    _no_raw(res.output)


@pytest.mark.timeout(120)
def test_stats_tables_render_hostile_data(out):
    res = _cli("stats", out)
    assert res.exit_code == 0, res.output
    _no_raw(res.output)


def test_shown_escapes_only_what_hides_or_moves_text():
    assert shown("plain ascii [x] é 中文 👍") == "plain ascii [x] é 中文 👍"
    assert shown("a\x1bb\rc\nd\te\x00f\x7fg\x9bh") == "a\\x1bb\\rc\\nd\\te\\x00f\\x7fg\\x9bh"
    assert shown("\u202eabc\u2066\u200b\ufeff") == "\\u202eabc\\u2066\\u200b\\ufeff"
    assert shown("\ud800") == "\\ud800"  # a lone surrogate cannot even be encoded for the terminal
    assert shown("क्\u200dष 👨\u200d👩") == "क्\u200dष 👨\u200d👩"  # joiners that scripts and emoji need stay
    assert shown(None) == "None" and shown(3.5) == "3.5"


# ---- issue 21 item 7: one formatter for every line fld prints (logs, warnings, usage errors) ----
from bounded import fld_bounded  # noqa: E402

# C0 (ESC, BEL, CR), OSC hyperlink / title, CSI as C1 (U+009B), bidi overrides and isolates, NEL (U+0085)
CONTROL_NAMES = {
    "csi": "a\x1b[2J\x1b[31mred",
    "osc": "b\x1b]8;;http:evil.example\x07link\x1b]8;;\x07",
    "title": "c\x1b]0;pwned\x1b\\",
    "c1": "d\u009b31m\u0085nel",
    "bidi": "e\u202egpj.exe\u2066iso\u2069",
    "cr": "f\rhidden",
}
RAW_ALL = RAW + ["\u009b", "\u0085", "\u2066", "\u2069"]


def _no_raw_anywhere(text: str) -> None:
    for ch in RAW_ALL:
        assert ch not in text, f"{ch!r} reached the terminal: {text[-500:]!r}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", CONTROL_NAMES)
def test_warning_lines_escape_file_names(tmp_path, photos, kind):
    """engine.ingest.coco warns about entries naming no image, quoting the COCO file's name."""
    folder = tmp_path / ("coco" + CONTROL_NAMES[kind])
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photos["jpeg_0"])
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 768, "height": 576}],
            "annotations": [{"id": 1, "image_id": 99, "bbox": [1, 1, 5, 5], "category_id": 1},
                            {"id": 2, "image_id": "x" + CONTROL_NAMES[kind], "bbox": [1, 1, 5, 5], "category_id": 1}],
            "categories": [{"id": 1, "name": "thing" + CONTROL_NAMES[kind]}]}
    path = folder / f"ann{CONTROL_NAMES[kind]}.json"
    path.write_text(json.dumps(coco))
    (tmp_path / "p.yaml").write_text(textwrap.dedent(PIPELINES))
    res = fld_bounded("run", tmp_path / "p.yaml", "-p", "filter_only", "-i", path, "-o", tmp_path / "out").check(
        0, seconds=120, rss_mib=2500)
    assert "WARNING engine.ingest.coco" in res.stderr, res.stderr
    assert shown(str(path)) in res.stderr
    _no_raw_anywhere(res.stdout + res.stderr)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args", [
    ("no-such-command\x1b[2J",),
    ("query", "--bogus\x1b]0;x\x07", "o", "s"),
    ("query", "o", "SELECT 1", "--threads", "2\u202e"),
    ("stats", "o\u009b31m", "--format", "table\x1b[5m"),
    ("run", "-p", "p\x1b[8m", "-o", "o", "--runner", "r\u2066"),
])
def test_usage_errors_escape_what_was_typed(args):
    res = fld_bounded(*args).check(2, seconds=60, lines=20, first=("Usage:", "error:"))  # click usage block or ours
    _no_raw_anywhere(res.stdout + res.stderr)


@pytest.mark.timeout(180)
def test_store_warnings_escape_the_out_name(tmp_path, ocr_run):
    """A damaged manifest.json is warned about with OUT's name: escaped."""
    import shutil

    out = tmp_path / ("out" + CONTROL_NAMES["osc"] + CONTROL_NAMES["c1"])
    shutil.copytree(ocr_run, out)
    (out / "manifest.json").write_text("{")
    res = fld_bounded("query", out, "SELECT count(*) FROM images").check(0)
    assert "manifest.json is damaged" in res.stderr
    _no_raw_anywhere(res.stdout + res.stderr)


_RAY_WARNING = """
import logging, time
import ray
from engine.runners.ray_runner import RayRunner

RayRunner(num_cpus=1, verbose=True).connect()  # -v: worker output is sent to the driver's stderr


@ray.remote
def warn(name):
    logging.getLogger("engine.ingest.coco").warning("image %s has no annotations", name)


ray.get([warn.remote(name) for name in NAMES])
time.sleep(3)  # the driver prints worker lines as they arrive
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_warning_on_a_ray_worker_reaches_the_driver_escaped(tmp_path):
    """Worker processes log through their own handlers, and Ray copies their lines to the driver's stderr
    raw: the runner's worker setup hook installs fld's one formatter in every worker."""
    import os
    import subprocess
    import sys

    names = list(HOSTILE)
    script = tmp_path / "ray_warning.py"
    script.write_text(f"NAMES = {names!r}\n" + _RAY_WARNING)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=240,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in (res.stdout + res.stderr).splitlines() if "has no annotations" in line]
    assert len(lines) == len(names), res.stderr[-3000:]
    for name in names:
        assert any(shown(name) in line for line in lines), (name, lines)
    for line in lines:
        tail = line.split("WARNING", 1)[-1]  # Ray's own coloured "(warn pid=...)" prefix comes first
        assert "WARNING" in line and not any(ch in tail for ch in RAW), line
