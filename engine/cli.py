"""The `fld` command line (typer + rich)."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fld-engine: build FLD-5B-like annotated datasets.")
# Piped output (CI logs, files) gets wide tables instead of rich's 80-column default, which cuts cells.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
console = Console(stderr=True, width=_WIDTH)
out_console = Console(width=_WIDTH)


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


STORAGE_OPTION_HELP = ("fsspec storage option for an object-store OUT, repeatable: key=value, the value parsed as JSON "
                       "when it parses (client_kwargs={\"endpoint_url\": \"http://host:8333\"}); credentials otherwise "
                       "from the usual environment variables (AWS_*, FSSPEC_S3_*)")


def storage_options(pairs: list[str]) -> dict:
    """--storage-option key=value pairs -> fsspec storage options (JSON values where they parse)."""
    options: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            _fail(f"--storage-option must be key=value, got {pair.split('=')[0]!r}...")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def open_store(out: str, pairs: list[str], for_writing: bool = False):
    """The store of OUT, probed once: a bad endpoint, credentials or path is one line and exit 2."""
    from engine.store import ShardStore, StoreError

    try:
        store = ShardStore(out, storage_options(pairs))
        store.probe(for_writing=for_writing)
    except StoreError as exc:
        _fail(str(exc))
    return store


def _render(tables: list[dict]) -> None:
    for t in tables:
        rt = Table(title=t["title"], title_justify="left")
        for c in t["columns"]:
            rt.add_column(str(c))
        for row in t["rows"]:
            rt.add_row(*["" if v is None else str(v) for v in row])
        out_console.print(rt)


@app.command()
def run(
    pipelines: Path = typer.Argument(..., help="pipelines.yaml"),
    pipeline: str = typer.Option(..., "--pipeline", "-p", help="pipeline name in the YAML"),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="folder, list file (csv/jsonl/parquet), tar(s), or COCO JSON"),
    out: str = typer.Option(..., "--out", "-o", help="output folder or fsspec URL, e.g. s3://bucket/prefix (resumable)"),
    runner: str = typer.Option("local", "--runner", "-r", help="local | ray | beam"),
    profile: Optional[str] = typer.Option(None, "--profile", help="swap models by a profile of the YAML (e.g. offline)"),
    force: bool = typer.Option(False, "--force", help="redo everything, ignoring committed shards"),
    from_step: Optional[str] = typer.Option(None, "--from", help="redo this step and the ones after it"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (auto, ray://host:port)"),
    beam_runner: Optional[str] = typer.Option(None, "--beam-runner", help="Beam runner (DirectRunner, FlinkRunner, ...)"),
    beam_option: list[str] = typer.Option([], "--beam-option", help="extra Beam pipeline option, repeatable (--beam-option=--project=x)"),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP),
) -> None:
    """Ingest SRC and run every step of PIPELINE into OUT; rerun to resume."""
    from engine.config import ConfigError, load_pipeline
    from engine.counters import summary_cells
    from engine.run import run_pipeline
    from engine.store import StoreError

    options: dict = {}
    if address:
        options["address"] = address
    if beam_runner:
        options["beam_runner"] = beam_runner
    if beam_option:
        options["beam_options"] = list(beam_option)
    try:
        pipe = load_pipeline(pipelines, pipeline, profile)
        store = open_store(out, storage_option, for_writing=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=console, disable=not console.is_terminal and os.environ.get("FLD_PROGRESS") != "1") as prog:

            def factory(name: str, total: int):
                task = prog.add_task(name, total=total or None, info="")

                def advance(shard: str, rows: int, skipped: bool = False) -> None:
                    prog.update(task, advance=1, info=f"{shard}: {rows} {'(resumed)' if skipped else ''}")

                return advance

            summary = run_pipeline(pipe, input, store, runner=runner, force=force, from_step=from_step,
                                   runner_options=options, progress_factory=factory)
    except (ConfigError, StoreError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    ing = summary.ingest
    console.print(
        f"[bold]inputs {ing.get('inputs', 0)} = images {ing.get('images', 0)} + quarantined {ing.get('quarantined', 0)}"
        f" + duplicates {ing.get('duplicates', 0)}[/]"
    )
    rows = []
    for step, s in summary.steps.items():
        for stage, c in s["counters"].items():
            rows.append([step, stage, *summary_cells(c), f"{s['shards_run']} run / {s['shards_skipped']} resumed"])
    _render([{"title": f"{pipeline} -> {out} ({runner}, {summary.seconds}s)",
              "columns": ["step", "stage", "in", "out", "added", "dropped", "errors", "seconds", "shards"], "rows": rows}])
    for r in summary.rounds:
        console.print(f"round {r.get('round')}: {json.dumps({k: v for k, v in r.items() if k != 'round'}, default=str)}")


@app.command()
def query(
    out: str = typer.Argument(..., help="output folder (or URL) of fld run"),
    sql: str = typer.Argument(..., help="SQL over the views images, texts, regions, groundings, quarantine, records"),
    format: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    step: Optional[str] = typer.Option(None, "--step", help="which step's annotations (default: the latest)"),
    timeout: float = typer.Option(60.0, "--timeout", help="stop the query after this many seconds"),
    max_rows: int = typer.Option(1000, "--max-rows", help="table output: print at most this many rows (says how many were cut)"),
    memory_limit: str = typer.Option("2GB", "--memory-limit", help="DuckDB memory limit"),
    threads: int = typer.Option(2, "--threads", help="DuckDB threads"),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP),
) -> None:
    """Read-only SQL over OUT (DuckDB), sandboxed: SELECT only, no files outside OUT, limits."""
    from engine.query import QueryError, QueryInterrupted, execute_query
    from engine.store import StoreError

    if format not in ("table", "csv", "json"):
        _fail(f"--format must be table, csv or json, not {format!r}")
    try:
        store = open_store(out, storage_option)
        result = execute_query(store, sql, step, max_rows=max_rows if format == "table" else None, timeout=timeout,
                               memory_limit=memory_limit, threads=threads)
    except (QueryInterrupted, KeyboardInterrupt):
        _fail("query interrupted (Ctrl-C)", code=130)
    except (QueryError, StoreError) as exc:
        _fail(str(exc))
    cols, rows = result.columns, result.rows
    if format == "json":
        sys.stdout.write(json.dumps([dict(zip(cols, r)) for r in rows], default=str) + "\n")
    elif format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        w.writerows(rows)
        sys.stdout.write(buf.getvalue())
    else:
        _render([{"title": "", "columns": cols, "rows": rows}])
        if result.cut:
            console.print(f"{result.cut} more rows not shown ({result.total} in all; --max-rows {max_rows}, "
                          "or --format csv / json for every row)")


@app.command()
def stats(
    out: str = typer.Argument(..., help="output folder (or URL) of fld run"),
    step: Optional[str] = typer.Option(None, "--step", help="which step (default: the latest)"),
    format: str = typer.Option("table", "--format", "-f", help="table | json"),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP),
) -> None:
    """Counts per table, status and reason; per-stage counters; the filter funnel."""
    from engine.query import QueryError
    from engine.stats import collect_stats
    from engine.store import StoreError

    try:
        tables = collect_stats(open_store(out, storage_option), step)
    except (QueryError, StoreError) as exc:
        _fail(str(exc))
    if format == "json":
        sys.stdout.write(json.dumps(tables, default=str) + "\n")
    else:
        _render(tables)


@app.command()
def export(
    out: str = typer.Argument(..., help="output folder (or URL) of fld run"),
    format: str = typer.Option("florence", "--format", "-f", help="florence | coco | webdataset"),
    dest: Path = typer.Option(..., "--dest", "-d", help="folder to write the export to"),
    step: Optional[str] = typer.Option(None, "--step", help="which step or round (default: the latest)"),
    task: list[str] = typer.Option([], "--task", help="florence: only these task tokens, repeatable"),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP),
) -> None:
    """Export kept annotations: Florence-2 training shards, COCO JSON, or WebDataset tars."""
    from engine.export import ExportError, export as do_export
    from engine.query import QueryError
    from engine.store import StoreError

    try:
        counts = do_export(open_store(out, storage_option), dest, format, step, task or None)
    except (ExportError, QueryError, StoreError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"exported to {dest}: {json.dumps(counts)}")


@app.command()
def show(
    out: str = typer.Argument(..., help="output folder (or URL) of fld run"),
    report: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write"),
    step: Optional[str] = typer.Option(None, "--step", help="which step or round (default: the latest)"),
    limit: int = typer.Option(50, "--limit", help="at most this many images"),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP),
) -> None:
    """A self-contained HTML page: images with boxes, masks and caption phrases linked by colour."""
    from engine.query import QueryError
    from engine.show import build_report
    from engine.store import StoreError

    try:
        n = build_report(open_store(out, storage_option), report, step, limit)
    except (QueryError, StoreError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"wrote {report} ({n} images)")


@app.command()
def verify(
    out: str = typer.Argument(..., help="output folder (or URL) of fld run"),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP),
) -> None:
    """Recompute every committed shard's sha256 against its commit record (reads all data)."""
    from engine.store import StoreError

    store = open_store(out, storage_option)
    try:
        checked, problems = store.verify()
    except StoreError as exc:
        _fail(str(exc))
    if problems:
        _render([{"title": f"{len(problems)} of {checked} shards differ from their commit records",
                  "columns": ["folder", "shard", "problem"], "rows": [list(p) for p in problems]}])
        console.print("rerun `fld run` on OUT to redo them")
        raise typer.Exit(1)
    console.print(f"{checked} shards verified: every sha256 matches its commit record")


@app.command()
def samples(dest: Path = typer.Argument(Path("samples"), help="folder to write the sample images to")) -> None:
    """Write the quickstart's sample images (generated scenes with text + photos from installed packages)."""
    from engine.samples import write_samples

    paths = write_samples(dest)
    console.print(f"wrote {len(paths)} sample images to {dest}")


@app.command()
def quickstart(
    out: str = typer.Option("out/quickstart", "--out", "-o", help="output folder"),
    samples_dir: Path = typer.Option(Path("samples"), "--samples", help="where the sample images are written"),
    pipelines: Path = typer.Option(Path("pipelines.yaml"), "--pipelines", help="pipelines.yaml"),
    pipeline: str = typer.Option("quickstart", "--pipeline", "-p"),
    profile: Optional[str] = typer.Option("offline", "--profile", help="offline: no network needed"),
    runner: str = typer.Option("local", "--runner", "-r"),
) -> None:
    """The main job on the embedded default: sample images -> the quickstart pipeline -> stats."""
    samples(samples_dir)
    run(pipelines, pipeline, str(samples_dir), out, runner, profile, False, None, None, None, [], [])
    stats(out, None, "table", [])


@app.command()
def stages() -> None:
    """List the registered stages."""
    from engine.registry import STAGES

    _render([{"title": "stages", "columns": ["name", "class"], "rows": [[k, v] for k, v in sorted(STAGES.items())]}])


if __name__ == "__main__":
    app()
