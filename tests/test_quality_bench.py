"""`python -m bench.quality --small`: the stage-1 + 2 benchmark at smoke size completes for every
version and control, writes the smoke-test banner, the dump and the PR plots, and every run's OUT
stays queryable. Thresholds are not asserted: at this size the numbers mean nothing."""
from __future__ import annotations

import json

import duckdb
import pytest

from bench.quality.report import BEGIN, END, SMOKE_BANNER
from bench.quality.run import NOISES, main, out_dir, seed_dir

VERSIONS = {"specialists", "+ filters", "oracle filter (control)", "random drop, same keep rate (control)",
            "ensemble of 3 detectors + vote", "+ filters, calibrated overlay"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_small_benchmark_end_to_end(tmp_path):
    report = tmp_path / "BENCH.md"
    report.write_text("# Benchmarks\n\nprose stays\n\n" + BEGIN + "\nold numbers\n" + END + "\n\nmore prose\n")
    work = tmp_path / "work"
    res = main(["--small", "--work", str(work), "--jobs", "1", "--report", str(report), "--resamples", "200"])
    (wr,) = res.worlds
    assert not wr["errors"] and len(wr["measures"]) == len(NOISES)
    for m in wr["measures"]:
        assert set(m["versions"]) == VERSIONS
        oracle = m["versions"]["oracle filter (control)"]
        assert oracle["obj_precision"] == 1.0 and oracle["grounding_accuracy"] in (1.0, None)
        assert m["keep"]["random drop, same keep rate (control)"] == m["keep"]["+ filters"]
        assert sum(r + w for r, w in m["fate"].values()) == sum(n for _k, (_kept, n) in m["keep"]["specialists"].items())
        assert m["calibration"]["rules"] and m["calibration"]["images"] >= 2
    text = report.read_text()
    assert "prose stays" in text and "more prose" in text and "old numbers" not in text
    assert SMOKE_BANNER in text and "| oracle filter (control) |" in text and "### Per-rule ablation" in text
    saved = json.loads((work / "results.json").read_text())
    assert set(saved["summary"]) == set(NOISES)
    assert any(p.name.startswith("pr_") for p in (work / "pr").iterdir())
    # the dump answers the fate table's question by SQL
    dump = str(work / "annotations.parquet")
    n_dropped = duckdb.connect().execute(f"SELECT count(*) FROM '{dump}' WHERE version = 'stage2' AND status = 'dropped'").fetchone()[0]
    assert n_dropped == sum(r + w for m in wr["measures"] for k, (r, w) in m["fate"].items() if not k.endswith("|kept"))
    # every OUT is a normal engine output
    from engine.views.query import run_query

    heldout = out_dir(seed_dir(work, 0, 1), "harsh", "vote", "heldout")
    _cols, rows = run_query(heldout, "SELECT annotator, count(*) FROM regions GROUP BY ALL ORDER BY 1", step="stage2")
    assert {"sim_detector", "sim_detector_2", "sim_detector_3"} <= {r[0] for r in rows}
