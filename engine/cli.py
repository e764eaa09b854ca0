"""The `fld` command line (typer + rich)."""
from __future__ import annotations

import json
import logging
import os
import sys
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from engine.views.query_output import DEFAULT_MAX_BYTES, DEFAULT_MAX_CELL

# Errors from the operating system or an object store's client that no command expected (a
# read-only OUT or cwd, a full disk, an S3 endpoint lost mid-run) end as one line, never a traceback.
_CLIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs", "adlfs", "fsspec")


def unexpected_error_line(exc: BaseException) -> str | None:
    """One line for an OSError or an object-store client error, else None (a bug: let it show)."""
    from engine.store.errors import one_line

    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return f"{where}{exc.strerror or one_line(exc)}" if exc.strerror else f"{where}{one_line(exc)}"
    if type(exc).__module__.split(".")[0] in _CLIENT_MODULES:
        return (f"object store error ({type(exc).__name__}): {one_line(exc)}; what was committed stays committed, "
                "rerun to resume")
    return None


class _Group(TyperGroup):
    """Every command: usage errors shown escaped (they quote what was typed), unexpected OS and
    object-store errors as one line, log lines through ShownFormatter."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as exc:
            exc.message = shown(exc.message)
            raise

    def invoke(self, ctx):
        install_logging()
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:  # a subcommand's usage error: the value typed, escaped
            exc.message = shown(exc.message)
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is one of the two kinds above
            line = unexpected_error_line(exc)
            if line is None:
                raise
            _fail(line)


# -h works like --help on every command (click contexts inherit help_option_names)
app = typer.Typer(add_completion=False, no_args_is_help=True, help="fld-engine: build FLD-5B-like annotated datasets.",
                  context_settings={"help_option_names": ["-h", "--help"]}, cls=_Group)
# Piped output (CI logs, files) gets wide tables instead of rich's 80-column default, which cuts cells.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
console = Console(stderr=True, width=_WIDTH)
out_console = Console(width=_WIDTH)


# Shown escaped: control characters (ESC sequences, \r, \x00, ...), format characters (bidi
# overrides such as U+202E, zero-width spaces), lone surrogates, line / paragraph separators.
# ZWNJ / ZWJ stay: scripts and emoji need them.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_KEPT_FORMAT = frozenset({"\u200c", "\u200d"})
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def shown(value: object) -> str:
    """Text that is safe on a terminal: characters that move the cursor, recolour, reorder or hide
    what follows are written as Python escapes, so a file name or a cell shows as what it is."""
    text = str(value)
    if text.isprintable():  # C-speed: no control, format, surrogate or separator character
        return text
    out = []
    for ch in text:
        if ch in _KEPT_FORMAT or unicodedata.category(ch) not in _HIDDEN_CATEGORIES:
            out.append(ch)
        elif ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


class ShownFormatter(logging.Formatter):
    """The one format of every log line fld prints (engine, stages, libraries, warnings): the
    whole line, exception text included, passed through `shown`, so a file name with ESC / OSC /
    C1 / bidi characters in a WARNING cannot drive the terminal, and a line stays one line."""

    def format(self, record: logging.LogRecord) -> str:
        return shown(super().format(record).rstrip("\n"))


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test runner swaps it per command)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def install_logging(level: int | None = None) -> None:
    """Root logging to stderr through ShownFormatter (once; `level` sets the level), with
    Python warnings routed through it too."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(ShownFormatter(LOG_FORMAT))
        root.addHandler(handler)
        logging.captureWarnings(True)
    if level is not None:
        root.setLevel(level)


def _say(message: object, style: str | None = None, to: Console = console) -> None:
    """Print data as plain text: rich markup is never parsed from it ("[x, y]" stays, "[/bold]" cannot crash)."""
    to.print(Text(shown(message), style=style or ""))


def _fail(msg: str, code: int = 2) -> None:
    """Each line of msg as one unwrapped `error:` line, shown as data (no markup, control characters escaped)."""
    for line in str(msg).splitlines() or [""]:
        console.print(Text.assemble(("error: ", "bold red"), shown(line)), soft_wrap=True)
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


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out_console.print(f"fld-engine {version('fld-engine')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """fld-engine: build FLD-5B-like annotated datasets."""


def _render(tables: list[dict]) -> None:
    for t in tables:
        rt = Table(title=Text(shown(t["title"])), title_justify="left")
        for c in t["columns"]:
            rt.add_column(Text(shown(c)))
        for row in t["rows"]:
            rt.add_row(*[Text("" if v is None else shown(v)) for v in row])
        out_console.print(rt)


@contextmanager
def _progress_display():
    """A progress factory for run_pipeline: rich bars on a terminal, plain lines otherwise."""
    from engine.progress import PlainProgress, RichProgress

    if console.is_terminal:
        with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), console=console) as prog:
            yield lambda name, images, shards: RichProgress(prog, shown(name), images)
    else:
        yield lambda name, images, shards: PlainProgress(name, images, shards, out=sys.stderr,
                                                          every=float(os.environ.get("FLD_PROGRESS_EVERY", "5")))


@app.command()
def run(
    pipelines: Optional[Path] = typer.Argument(None, help="pipelines.yaml (default: the pipelines installed with fld-engine)"),
    pipeline: str = typer.Option(..., "--pipeline", "-p", help="pipeline name in the YAML"),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="folder, list file (csv/jsonl/parquet), tar(s), or COCO JSON"),
    out: str = typer.Option(..., "--out", "-o", help="output folder or fsspec URL, e.g. s3://bucket/prefix (resumable)"),
    runner: str = typer.Option("local", "--runner", "-r", help="local | ray | beam"),
    profile: Optional[str] = typer.Option(None, "--profile", help="swap models by a profile of the YAML (e.g. offline), or a profile file (fld calibrate's calibrated.yaml)"),
    force: bool = typer.Option(False, "--force", help="redo everything, ignoring committed shards"),
    from_step: Optional[str] = typer.Option(None, "--from", help="redo this step and the ones after it"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (auto, ray://host:port)"),
    ray_fuse: Optional[str] = typer.Option(None, "--ray-fuse", help="Ray: auto | always | never: every stage of a "
                                           "segment in one task per shard (auto: where the model pools do not fit side by side)"),
    beam_runner: Optional[str] = typer.Option(None, "--beam-runner", help="Beam runner (DirectRunner, FlinkRunner, ...)"),
    beam_option: list[str] = typer.Option([], "--beam-option", help="extra Beam pipeline option, repeatable (--beam-option=--project=x)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="engine INFO logs, Ray's own logs and progress bars"),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP),
) -> None:
    """Ingest SRC and run every step of PIPELINE into OUT; rerun to resume."""
    from engine.config import ConfigError, load_pipeline
    from engine.counters import summary_cells
    from engine.preflight import check_run
    from engine.run import run_pipeline
    from engine.store import StoreError

    install_logging(logging.INFO if verbose else logging.WARNING)
    options: dict = {"verbose": verbose}
    if address:
        options["address"] = address
    if ray_fuse:
        options["fuse"] = ray_fuse
    if beam_runner:
        options["beam_runner"] = beam_runner
    if beam_option:
        options["beam_options"] = list(beam_option)
    try:
        pipe = load_pipeline(pipelines, pipeline, profile)
        check_run(pipe, runner, from_step)  # every model found before anything is written to OUT
        store = open_store(out, storage_option, for_writing=True)
        with _progress_display() as factory:
            summary = run_pipeline(pipe, input, store, runner=runner, force=force, from_step=from_step,
                                   runner_options=options, progress=factory)
    except (ConfigError, StoreError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    ing = summary.ingest
    _say(f"inputs {ing.get('inputs', 0)} = images {ing.get('images', 0)} + quarantined {ing.get('quarantined', 0)}"
         f" + duplicates {ing.get('duplicates', 0)}", style="bold")
    rows = []
    for step, s in summary.steps.items():
        for stage, c in s["counters"].items():
            rows.append([step, stage, *summary_cells(c), f"{s['shards_run']} run / {s['shards_skipped']} resumed"])
    _render([{"title": f"{pipeline} -> {out} ({runner}, {summary.seconds}s)",
              "columns": ["step", "stage", "in", "out", "added", "dropped", "errors", "seconds", "shards"], "rows": rows}])
    for r in summary.rounds:
        t, made = r.get("train") or {}, r.get("relabel") or {}
        added = ", ".join(f"{k} {v}" for k, v in (made.get("added") or {}).items() if v) or "nothing"
        gt = r.get("ground_truth")
        _say(f"round {r.get('round')}: trained {t.get('steps')} steps (loss {t.get('first_loss') or 0:.3f} -> "
             f"{t.get('last_loss') or 0:.3f}); relabel added {added} on {made.get('images_with_output', 0)}/"
             f"{made.get('images', 0)} images" + (f"; mAP vs human {gt['map']}" if gt else ""),
             style="yellow" if r.get("empty") else None)
        from engine.run import health_messages

        for line in health_messages(r.get("health")):
            _say(line, style="yellow")


@app.command()
def query(
    out: str = typer.Argument(..., help="output folder (or URL) of fld run"),
    sql: str = typer.Argument(..., help="SQL over the views images, texts, regions, groundings, quarantine, records"),
    format: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    step: Optional[str] = typer.Option(None, "--step", help="which step's annotations (default: the latest)"),
    timeout: float = typer.Option(60.0, "--timeout", help="stop the query after this many seconds"),
    max_rows: int = typer.Option(1000, "--max-rows", help="table output: print at most this many rows (says how many were cut)"),
    max_bytes: int = typer.Option(DEFAULT_MAX_BYTES, "--max-bytes", help="csv / json output: stop after this many bytes, at a row boundary (says so)"),
    max_cell: int = typer.Option(DEFAULT_MAX_CELL, "--max-cell", help="csv / json output: cut cells longer than this many characters (says so)"),
    memory_limit: str = typer.Option("2GB", "--memory-limit", help="DuckDB memory limit"),
    threads: int = typer.Option(2, "--threads", help="DuckDB threads"),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP),
) -> None:
    """Read-only SQL over OUT (DuckDB), sandboxed: SELECT only, no files outside OUT, limits.

    Rows are streamed; one --timeout covers the whole command, printing included."""
    from engine.views.query import QueryError, QueryInterrupted, check_limits, execute_query
    from engine.views.query_output import CsvSink, JsonSink, TableSink
    from engine.store import StoreError

    if format not in ("table", "csv", "json"):
        _fail(f"--format must be table, csv or json, not {format!r}")
    for name, value in (("--max-bytes", max_bytes), ("--max-cell", max_cell)):
        if value < 1:
            _fail(f"{name} must be at least 1, not {value}")
    try:
        check_limits(memory_limit, threads, timeout, max_rows)
    except QueryError as exc:
        _fail(str(exc))
    note = lambda text: _say(text, to=console)  # noqa: E731 - stderr, beside the data
    if format == "table":
        sink = TableSink(max_rows, lambda cols, rows: _render([{"title": "", "columns": cols, "rows": rows}]), note)
    else:
        sink = JsonSink(sys.stdout, note, max_bytes, max_cell) if format == "json" else \
            CsvSink(sys.stdout, note, max_bytes, max_cell, escape=shown if sys.stdout.isatty() else None)
    try:
        store = open_store(out, storage_option)
        execute_query(store, sql, step, timeout=timeout, memory_limit=memory_limit, threads=threads, sink=sink)
    except (QueryInterrupted, KeyboardInterrupt):
        _fail("query interrupted (Ctrl-C)", code=130)
    except (QueryError, StoreError) as exc:
        _fail(str(exc))


@app.command()
def stats(
    out: str = typer.Argument(..., help="output folder (or URL) of fld run"),
    step: Optional[str] = typer.Option(None, "--step", help="one step or round (default: latest; Tables 2/3: every step)"),
    format: str = typer.Option("table", "--format", "-f", help="table | json (an object keyed by section)"),
    sample: Annotated[int, typer.Option("--sample", min=1, help="Table 3: at most N captions per tier go through spaCy")] = 2000,  # engine.views.fld5b.DEFAULT_SAMPLE
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP),
) -> None:
    """What OUT holds so far: ingest, quarantine, statuses, counters, FLD-5B Tables 2 and 3, funnel."""
    from engine.views.query import QueryError
    from engine.views.stats import collect_stats
    from engine.store import StoreError

    if format not in ("table", "json"):
        _fail(f"--format must be table or json, not {format!r}")
    try:
        sections = collect_stats(open_store(out, storage_option), step, sample)
    except (QueryError, StoreError) as exc:
        _fail(str(exc))
    if format == "json":
        sys.stdout.write(json.dumps(sections, default=str) + "\n")
    else:
        _render(list(sections.values()))


@app.command()
def calibrate(
    out: str = typer.Argument(..., help="output folder (or URL) of fld run whose inputs carried human annotations"),
    step: Optional[str] = typer.Option(None, "--step", help="which step or round (default: the latest)"),
    target_precision: float = typer.Option(0.9, "--target-precision", help="fit each rule's threshold to reach this precision"),
    overlay: Path = typer.Option(Path("calibrated.yaml"), "--out", "-o", help="profile overlay to write (for fld run --profile)"),
    resamples: int = typer.Option(1000, "--bootstrap", min=0, help="bootstrap resamples of the AUC intervals"),
    min_labels: int = typer.Option(5, "--min-labels", min=1, help="a rule is fitted or switched off only with at least "
                                   "this many correct and this many wrong labelled items"),
    format: str = typer.Option("table", "--format", "-f", help="table | json"),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP),
) -> None:
    """Measure every filter check and rule against OUT's human annotations; write a profile with fitted thresholds."""
    from engine.atomic import atomic_write_bytes
    from engine.views.calibrate import as_json, calibrate as do_calibrate, overlay_yaml, tables
    from engine.config import is_profile_file, load_profile_file
    from engine.views.query import QueryError
    from engine.store import StoreError

    if format not in ("table", "json"):
        _fail(f"--format must be table or json, not {format!r}")
    try:
        store = open_store(out, storage_option)
        cal = do_calibrate(store, step, target_precision, resamples, min_labels=min_labels)
        profile = (store.read_manifest().get("pipeline") or {}).get("profile")
    except (QueryError, StoreError, ValueError) as exc:
        _fail(str(exc))
    if not cal.labelled:
        _fail(f"{out}: no machine annotation on an image with human annotations: import a labelled sample "
              "(a COCO JSON as --input) with the images, then rerun fld calibrate")
    extends = load_profile_file(profile).extends if is_profile_file(profile) else profile
    atomic_write_bytes(overlay, overlay_yaml(cal, extends, out).encode())
    if format == "json":
        sys.stdout.write(json.dumps(as_json(cal), default=str) + "\n")
    else:
        _render(list(tables(cal).values()))
    _say(f"wrote {overlay}: fld run ... --profile {overlay}", to=console)


@app.command()
def export(
    out: str = typer.Argument(..., help="output folder (or URL) of fld run"),
    format: str = typer.Option("florence", "--format", "-f", help="florence | coco | webdataset | hf"),
    dest: Path = typer.Option(..., "--dest", "-d", help="folder to write the export to"),
    step: Optional[str] = typer.Option(None, "--step", help="which step or round (default: the latest)"),
    task: list[str] = typer.Option([], "--task", help="florence: only these task tokens, repeatable"),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP),
) -> None:
    """Export kept annotations: Florence-2 training shards, COCO JSON, WebDataset tars, or a Hugging Face dataset."""
    from engine.views.export import ExportError, export as do_export
    from engine.views.query import QueryError
    from engine.store import StoreError

    try:
        counts = do_export(open_store(out, storage_option), dest, format, step, task or None)
    except (ExportError, QueryError, StoreError, ValueError) as exc:
        _fail(str(exc))
    left_out = counts.pop("left_out", {})
    _say(f"exported to {dest}: {json.dumps(counts)}")
    for what, n in left_out.items():
        _say(f"left out: {n} {what}", style="yellow")


@app.command()
def show(
    out: str = typer.Argument(..., help="output folder (or URL) of fld run"),
    report: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write"),
    step: Optional[str] = typer.Option(None, "--step", help="which step or round (default: the latest)"),
    limit: int = typer.Option(50, "--limit", help="at most this many images"),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP),
) -> None:
    """One self-contained HTML page: annotations drawn as toggleable layers, models, funnel, checks, quarantine."""
    from engine.views.query import QueryError
    from engine.views.show import build_report
    from engine.store import StoreError

    try:
        n = build_report(open_store(out, storage_option), report, step, limit)
    except (QueryError, StoreError, ValueError) as exc:
        _fail(str(exc))
    _say(f"wrote {report} ({n} images)")


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
def samples(
    dest: Path = typer.Argument(Path("samples"), help="folder to write the sample images to"),
    human: bool = typer.Option(False, "--human", help="also DEST/instances.json: COCO truth (boxes, text lines, "
                                                       "captions) for fld calibrate; run it with --input DEST/instances.json"),
) -> None:
    """Write the quickstart's sample images (generated scenes with text + photos from installed packages)."""
    from engine.samples import write_human_sample, write_samples

    paths = write_samples(dest)
    _say(f"wrote {len(paths)} sample images to {dest}")
    if human:
        _say(f"wrote {write_human_sample(dest, paths)} (human annotations)")


@app.command()
def quickstart(
    out: str = typer.Option("out/quickstart", "--out", "-o", help="output folder"),
    samples_dir: Path = typer.Option(Path("samples"), "--samples", help="where the sample images are written"),
    pipelines: Optional[Path] = typer.Option(None, "--pipelines", help="pipelines.yaml (default: the installed one)"),
    pipeline: str = typer.Option("quickstart", "--pipeline", "-p"),
    profile: Optional[str] = typer.Option("offline", "--profile", help="offline: no network needed"),
    runner: str = typer.Option("local", "--runner", "-r"),
) -> None:
    """The main job on the embedded default: sample images -> the quickstart pipeline -> stats."""
    samples(samples_dir, False)
    # by keyword: a positional call silently shifts when run() gains an option (--ray-fuse did)
    run(pipelines, pipeline, str(samples_dir), out, runner=runner, profile=profile, force=False, from_step=None,
        address=None, ray_fuse=None, beam_runner=None, beam_option=[], verbose=False, storage_option=[])
    stats(out, None, "table", 2000, [])
    from engine.views.stats import round_summaries

    for line in round_summaries(out):
        _say(f"stage 3 {line}")
    for line in ("", "next, try:",
                 f"  fld query {out} \"SELECT i.uri, t.tier, t.text FROM texts t JOIN images i USING (image_id) "
                 "WHERE t.status = 'kept' LIMIT 10\"",
                 f"  fld show {out} --out report.html",
                 f"  fld export {out} --format coco --dest export/"):
        console.print(Text(shown(line)), soft_wrap=True)  # never wrapped: each command copies as one line


@app.command()
def stages() -> None:
    """List every stage a pipeline can name: built-in, from installed packages, with params and defaults."""
    from engine.registry import all_entries, stage_class

    rows = []
    for entry in all_entries():
        try:
            params = _param_defaults(stage_class(entry.name).Params)
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is listed with its error
            params = f"cannot load: {exc}"
        rows.append([entry.name, entry.origin, entry.target, params])
    rows.append(["module.path:Class", "import path", "any importable engine.stage.Stage subclass", ""])
    _render([{"title": "stages", "columns": ["name", "origin", "class", "params (default)"], "rows": rows}])


def _param_defaults(params_cls) -> str:
    from pydantic_core import to_jsonable_python

    from engine.stage import StageParams

    shown = []
    for name, field in params_cls.model_fields.items():
        if name in StageParams.model_fields:  # batch_size / cpus / gpus / concurrency: every stage has them
            continue
        default = field.get_default(call_default_factory=True)
        shown.append(f"{name}={json.dumps(to_jsonable_python(default))}" if not field.is_required() else f"{name} (required)")
    return ", ".join(shown)


@app.command("pipelines")
def pipelines_(
    file: Optional[Path] = typer.Argument(None, help="pipelines.yaml (default: the installed one)"),
) -> None:
    """List the pipelines of a pipelines.yaml: name, description, steps and their stages, rounds."""
    from engine.config import ConfigError, load_config, packaged_pipelines

    path = file or packaged_pipelines()
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        _fail(str(exc))
    rows = [[name, p.description, "; ".join(f"{s.name}: {', '.join(x.stage for x in s.stages)}" for s in p.steps), p.rounds]
            for name, p in cfg.pipelines.items()]
    _render([{"title": f"pipelines in {path}", "columns": ["name", "description", "steps", "rounds"], "rows": rows}])
    if cfg.profiles:
        _render([{"title": "profiles (--profile)", "columns": ["name", "description", "models", "params"],
                  "rows": [[n, p.description, ", ".join(f"{a}={r}" for a, r in p.models.items()), ", ".join(p.params)]
                           for n, p in cfg.profiles.items()]}])


if __name__ == "__main__":
    app()
