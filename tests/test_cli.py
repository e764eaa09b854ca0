"""End to end through the `fld` CLI: run (resume, --from, stale config), query, stats."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from engine.cli import app
from helpers import WORDS, rendered_sign
from helpers import ocr_pipelines as _yaml

runner = CliRunner()


def _run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res


def _query(out, sql, *extra):
    res = _run("query", out, sql, "--format", "json", *extra)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def done(tmp_path_factory, inputs):
    tmp = tmp_path_factory.mktemp("run")
    cfg = _yaml(tmp)
    out = tmp / "out"
    res = _run("run", cfg, "--pipeline", "ocr", "--input", inputs, "--out", out)
    assert res.exit_code == 0, res.output
    return cfg, out, res.output


def test_run_reports_the_input_equation(done):
    _, _, output = done
    assert "inputs 7 = images 4 + quarantined 2 + duplicates 1" in output


def test_query_views_and_join(done):
    _, out, _ = done
    rows = _query(out, "SELECT count(*) AS n FROM regions WHERE kind='text'")
    assert rows[0]["n"] >= 3
    rows = _query(out, "SELECT i.uri, r.label FROM regions r JOIN images i USING (image_id) "
                       "WHERE i.uri LIKE '%sign.jpg' ORDER BY r.box[2]")
    assert [r["label"] for r in rows] == WORDS
    q = _query(out, "SELECT reason, count(*) AS n FROM quarantine GROUP BY reason ORDER BY reason")
    assert {r["reason"]: r["n"] for r in q} == {"duplicate": 1, "empty": 1, "not_image": 1}
    csv_out = _run("query", out, "SELECT count(*) AS n FROM images", "--format", "csv")
    assert csv_out.stdout.splitlines() == ["n", "4"]


@pytest.mark.parametrize("sql", ["DELETE FROM images", "COPY (SELECT * FROM images) TO '/tmp/x.csv'",
                                 "CREATE TABLE t AS SELECT 1", "ATTACH 'x.db'", "INSTALL httpfs"])
def test_query_is_read_only(done, sql):
    _, out, _ = done
    res = _run("query", out, sql)
    assert res.exit_code == 2 and "read-only" in res.output


def test_stats_json(done):
    _, out, _ = done
    res = _run("stats", out, "--format", "json")
    assert res.exit_code == 0, res.output
    tables = json.loads(res.stdout)  # keyed by section
    ingest = tables["ingest"]["rows"][0]
    assert ingest == [7, 4, 2, 1]
    counters = tables["counters"]["rows"]
    assert counters[0][:4] == ["stage1", "ocr", 4, 4]


def test_rerun_resumes_everything_and_changes_nothing(done, inputs):
    cfg, out, _ = done
    before = _query(out, "SELECT image_id, ann_id, label FROM regions ORDER BY ann_id")
    res = _run("run", cfg, "--pipeline", "ocr", "--input", inputs, "--out", out)
    assert res.exit_code == 0 and "0 run / 4 resumed" in res.output
    assert _query(out, "SELECT image_id, ann_id, label FROM regions ORDER BY ann_id") == before


def test_changed_config_is_refused_then_redone_with_from(tmp_path, done, inputs):
    cfg, out, _ = done
    work = tmp_path / "out"
    shutil.copytree(out, work)
    (work / ".lock").unlink(missing_ok=True)
    strict = _yaml(tmp_path, 0.99)
    res = _run("run", strict, "--pipeline", "ocr", "--input", inputs, "--out", work)
    assert res.exit_code == 2 and "--from stage1" in res.output
    res = _run("run", strict, "--pipeline", "ocr", "--out", work, "--from", "stage1")  # no --input needed
    assert res.exit_code == 0, res.output
    n_strict = _query(work, "SELECT count(*) AS n FROM regions")[0]["n"]
    n_default = _query(out, "SELECT count(*) AS n FROM regions")[0]["n"]
    assert n_strict < n_default


def test_bad_config_and_missing_input_give_clear_errors(tmp_path):
    cfg = _yaml(tmp_path)
    res = _run("run", cfg, "--pipeline", "nope", "--input", tmp_path, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "pipelines.nope" in res.output
    res = _run("run", cfg, "--pipeline", "ocr", "--input", tmp_path / "missing", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "missing" in res.output


def test_version_and_short_help_on_every_command():
    from importlib.metadata import version

    import typer

    res = _run("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"fld-engine {version('fld-engine')}"
    names = sorted(typer.main.get_command(app).commands)
    assert {"run", "query", "stats", "export", "show", "quickstart", "samples", "stages", "pipelines"} <= set(names)
    for name in names:
        short, long = _run(name, "-h"), _run(name, "--help")
        assert short.exit_code == 0 and "Usage:" in short.output, (name, short.output)
        assert short.output == long.output
    assert _run("-h").output == _run("--help").output


def test_pipelines_lists_the_installed_file():
    from engine.config import load_config, packaged_pipelines

    res = _run("pipelines")
    assert res.exit_code == 0, res.output
    cfg = load_config(packaged_pipelines())
    lines = res.output.splitlines()
    for name, p in cfg.pipelines.items():
        row = next(line for line in lines if line.strip("│ ").startswith(name + " "))
        assert p.description[:30] in row and f"│ {p.rounds} " in row
    assert "stage1: ocr, detect, masks, compose_caption" in res.output and "offline" in res.output
    assert _run("pipelines", "/no/such.yaml").exit_code == 2


def test_run_without_a_file_uses_the_installed_pipelines(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "sign.jpg").write_bytes(rendered_sign())
    res = _run("run", "--pipeline", "ocr", "--input", tmp_path / "in", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    from engine.config import packaged_pipelines

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["pipeline"]["file"] == str(packaged_pipelines())
    assert [r["label"] for r in _query(tmp_path / "out", "SELECT label FROM regions ORDER BY box[2]")] == WORDS


def _statuses(out, *step) -> dict:
    rows = _query(out, "SELECT status, coalesce(reason, '') AS reason, count(*) AS n FROM regions GROUP BY ALL", *step)
    return {(r["status"], r["reason"]): r["n"] for r in rows}


def test_step_of_query_and_stats_chooses_the_step(tmp_path, done):
    """Two steps whose regions differ (stage2 drops every OCR line): `--step` reads the one named,
    the default is the last; the same for `fld stats`."""
    cfg, out, _ = done
    work = tmp_path / "out"
    shutil.copytree(out, work)
    res = _run("run", cfg, "--pipeline", "ocr_filtered", "--out", work)
    assert res.exit_code == 0 and "4 run / 0 resumed" in res.output and "0 run / 4 resumed" in res.output, res.output
    n = _query(out, "SELECT count(*) AS n FROM regions")[0]["n"]
    assert n >= 3
    assert _statuses(work, "--step", "stage1") == {("kept", ""): n}
    assert _statuses(work) == _statuses(work, "--step", "stage2") == {("dropped", "region_filter:low_score"): n}
    res = _run("query", work, "SELECT 1", "--step", "stage9")
    assert res.exit_code == 2 and "stage9" in res.output and "stage1" in res.output

    def annotations(*step) -> tuple[str, dict]:
        res = _run("stats", work, "--format", "json", *step)
        assert res.exit_code == 0, res.output
        section = json.loads(res.stdout)["annotations"]
        return section["title"], {(t, s, r): k for t, s, r, k in section["rows"]}

    title, rows = annotations("--step", "stage1")
    assert "annotations/stage1" in title and rows == {("regions", "kept", ""): n}
    title, rows = annotations()
    assert "annotations/stage2" in title and rows == {("regions", "dropped", "region_filter:low_score"): n}
    assert _run("stats", work, "--step", "stage9").exit_code == 2


def test_force_redoes_ingest_and_every_step(tmp_path, done, inputs):
    """A changed configuration is refused; --force redoes everything: inputs re-ingested, every shard
    recommitted with the new configuration."""
    cfg, out, _ = done
    work = tmp_path / "out"
    shutil.copytree(out, work)
    (work / ".lock").unlink(missing_ok=True)
    records = lambda folder: {p.name: json.loads(p.read_text()) for p in (work / folder / "_committed").glob("*.json")}  # noqa: E731
    before = {f: records(f) for f in ("images", "quarantine", "annotations/stage1")}
    strict = _yaml(tmp_path, 0.99)
    assert _run("run", strict, "--pipeline", "ocr", "--input", inputs, "--out", work).exit_code == 2
    res = _run("run", strict, "--pipeline", "ocr", "--input", inputs, "--out", work, "--force")
    assert res.exit_code == 0 and "4 run / 0 resumed" in res.output, res.output
    after = {f: records(f) for f in before}
    for folder in before:
        assert sorted(after[folder]) == sorted(before[folder]), folder
        for shard, record in after[folder].items():  # rewritten, not kept (ingest too)
            assert record["committed_at"] != before[folder][shard]["committed_at"], (folder, shard)
    assert {r["config_hash"] for r in after["annotations/stage1"].values()} != {r["config_hash"] for r in before["annotations/stage1"].values()}
    assert _query(work, "SELECT count(*) AS n FROM regions")[0]["n"] < _query(out, "SELECT count(*) AS n FROM regions")[0]["n"]
