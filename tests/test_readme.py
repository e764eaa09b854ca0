"""Every `fld ...` command in the code blocks of README.md and docs/*.md runs to completion on this machine.

Generic on purpose: commands added to the README or to any docs/*.md file later are run too (docs files are
found by glob at collection time). README.md's commands run in README order in one fresh working folder (so
`out/...`, `samples`, `report.html` are relative to it), after the README's file blocks (a code block whose first
line is `# FILE`) are written there; its first commands run `fld quickstart`. Then each docs/*.md file's commands
run in that same folder (so `samples/` and `out/quickstart` exist), in file-name order, after that file's own
file blocks are written there. Placeholders get small real inputs (PLACEHOLDERS). A command that cannot run here
is either listed in CANNOT_RUN with the reason and the error it must fail fast with, or, in its line, ends with
`# needs: cluster|gpu|network <test>` naming the test that covers its code path (`tests/test_x.py` or
`tests/test_x.py::test_name`), instead of being left out silently.

The README's `fld quickstart` is also the quickstart's end-to-end test (one run, not two): what it prints (the
round's summary, the next commands, which then work) and what its report shows in Chromium.
"""
from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
SHELL_LANGS = ("bash", "sh", "shell", "console")

# README placeholder -> what this test gives instead (the folder `fld quickstart` / `fld samples` writes)
PLACEHOLDERS = {"/path/to/images": "samples"}

# command (after placeholders, comment stripped) -> (why it cannot run here, text its error must contain)
CANNOT_RUN = {
    "fld run --pipeline fld --input samples --out out/real": (
        "the real hub models (Florence-2-large, D-FINE-X, CLIP ViT-L/14, Grounding DINO, SAM) cannot be "
        "downloaded here: preflight must stop it at once, before OUT exists",
        "fix: --profile offline",
    ),
    "fld run --pipeline fld --input s3://my-bucket/images/ --out s3://my-bucket/fld/run1 --runner ray --address auto": (
        "a cluster of real hub models: the same preflight stops it before anything is listed or written",
        "fix: --profile offline",
    ),
    "fld stats s3://my-bucket/fld/run1": (
        "reads the cluster run above, which cannot run here: one line, exit 2",
        "error:",
    ),
}
# `# needs: KIND TEST` at the end of a command line: not run here, KIND says why, TEST covers its code path
NEEDS = re.compile(r"#\s*needs:\s*(?P<kind>\S+)\s*(?P<test>\S*)")
NEEDS_KINDS = ("cluster", "gpu", "network")
# The object-storage commands run for real against SeaweedFS (tests/seaweed.py): the bucket `my-bucket` is
# created and the shell array "${S3[@]}" becomes that server's --storage-option arguments.
S3_ARRAY = "${S3[@]}"
COMMAND_TIMEOUT = 900


@dataclass
class Command:
    doc: str  # file it comes from, relative to the repository
    line: str  # as written
    env: dict[str, str]  # leading VAR=value assignments
    argv: list[str]  # starts with "fld"
    needs: tuple[str, str] | None = None  # (kind, test) of a `# needs:` comment

    @property
    def text(self) -> str:
        return " ".join(self.argv)


def blocks(path: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block of a Markdown file, in order."""
    return re.findall(r"```([a-z]*)\n(.*?)```", path.read_text(), flags=re.S)


def file_blocks(path: Path) -> dict[str, str]:
    """The file's code blocks whose first line is `# NAME` (a .py / .yaml / .toml / .json file name)."""
    out = {}
    for _, body in blocks(path):
        match = re.fullmatch(r"# ([\w./-]+\.(?:py|yaml|yml|toml|json))", body.partition("\n")[0].strip())
        if match:
            out[match.group(1)] = body
    return out


def commands(path: Path) -> list[Command]:
    """Every `fld` command of the file's shell blocks (`a && b` and `a; b` split), in order."""
    found = []
    for lang, body in blocks(path):
        if lang not in SHELL_LANGS:
            continue
        for raw in body.splitlines():
            line = raw
            for key, value in PLACEHOLDERS.items():
                line = line.replace(key, value)
            needs = NEEDS.search(line)
            tokens = shlex.split(line.replace('"' + S3_ARRAY + '"', S3_ARRAY), comments=True)
            segment: list[str] = []
            for tok in tokens + ["&&"]:
                if tok not in ("&&", ";"):
                    segment.append(tok)
                    continue
                env = {}
                while segment and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", segment[0]):
                    key, _, value = segment.pop(0).partition("=")
                    env[key] = value
                if segment and segment[0] == "fld":
                    found.append(Command(str(path.relative_to(REPO)), raw.strip(), env, segment,
                                         (needs["kind"], needs["test"]) if needs else None))
                segment = []
    return found


def readme_commands() -> list[Command]:
    return commands(README)


def all_commands() -> list[Command]:
    return readme_commands() + [c for doc in DOCS for c in commands(doc)]


def needs_problem(command: Command) -> str | None:
    """Why a `# needs:` comment is not acceptable, or None: a known kind and an existing test."""
    kind, test = command.needs
    if kind not in NEEDS_KINDS:
        return f"kind {kind!r} is not one of {', '.join(NEEDS_KINDS)}"
    if not test:
        return "no test named after the kind (tests/test_x.py or tests/test_x.py::test_name)"
    path, *names = test.split("::")
    if not (REPO / path).is_file() or not path.startswith("tests/"):
        return f"{path} is not a file under tests/"
    source = (REPO / path).read_text()
    for name in names:
        name = name.partition("[")[0]
        if not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b", source, flags=re.M):
            return f"{path} defines no {name}"
    return None


def test_readme_commands_are_found():
    readme = [c.text for c in readme_commands()]
    assert "fld quickstart" in readme
    assert any(c.startswith("fld run --pipeline fld") and "--profile offline" in c for c in readme)
    every = [c.text for c in all_commands()]
    assert set(CANNOT_RUN) <= set(every), "a CANNOT_RUN entry is no longer in README.md or docs/*.md: remove it"
    assert DOCS, "docs/*.md not found"


def test_commands_that_cannot_run_name_their_test():
    """A `# needs:` comment names a kind (cluster / gpu / network) and a test that exists."""
    problems = [f"{c.doc}: {c.line}: {p}" for c in all_commands() if c.needs and (p := needs_problem(c))]
    assert not problems, "\n".join(problems)


def test_needs_comments_are_checked(tmp_path, monkeypatch):
    """The checks above on a doc written here: a valid reference passes, the others are named."""
    doc = tmp_path / "x.md"
    doc.write_text("```bash\n"
                   "fld run --runner ray --address auto   # needs: cluster tests/test_ray_cluster.py\n"
                   "fld stats out/x  # needs: gpu tests/test_readme.py::test_needs_comments_are_checked\n"
                   "fld stats out/y  # needs: gpu tests/test_readme.py::no_such_test\n"
                   "fld stats out/z  # needs: quantum tests/test_readme.py\n"
                   "fld stats out/w  # needs: network\n"
                   "PYTHONPATH=. fld query out/q 'SELECT 1' && fld verify out/q\n"
                   "```\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "tests").mkdir()
    for name in ("test_ray_cluster.py", "test_readme.py"):
        (tmp_path / "tests" / name).write_text((Path(__file__).parent / name).read_text())
    found = commands(doc)
    assert [c.text for c in found] == ["fld run --runner ray --address auto", "fld stats out/x", "fld stats out/y",
                                       "fld stats out/z", "fld stats out/w", "fld query out/q SELECT 1",
                                       "fld verify out/q"]
    assert found[5].env == {"PYTHONPATH": "."} and found[5].needs is None
    problems = [needs_problem(c) for c in found[:5]]
    assert problems[:2] == [None, None]
    assert "defines no no_such_test" in problems[2]
    assert "quantum" in problems[3]
    assert "no test named" in problems[4]


def test_ci_runs_the_readme_commands():
    """.ci/run runs the README's set-up commands (install + quickstart) and its test command: each README
    quickstart command's words appear, in order, in one line of .ci/run (which may add flags such as -q)."""
    quickstart = next(body for lang, body in blocks(README) if lang in SHELL_LANGS and "fld quickstart" in body)
    ci_lines = [shlex.split(line, comments=True)
                for line in (REPO / ".ci" / "run").read_text().replace("\\\n", " ").splitlines()]

    def in_order(words, line):
        it = iter(line)
        return all(w in it for w in words)

    for line in quickstart.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert any(in_order(words, ci) for ci in ci_lines), f".ci/run does not run the README's {line!r}"


@dataclass
class Folder:
    """The working folder the README's and the docs' commands run in, and the S3 server they may use."""
    path: Path
    env: dict[str, str]
    server: object = None
    timings: list[tuple[float, str]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)  # command text -> its stdout + stderr

    def s3_options(self) -> list[str]:
        if self.server is None:
            import seaweed

            self.server = seaweed.start(self.path.parent / "seaweedfs")
            self.server.filesystem().mkdir("my-bucket")
        return self.server.cli_options()

    def write_files(self, doc: Path) -> None:
        for name, text in file_blocks(doc).items():
            (self.path / name).parent.mkdir(parents=True, exist_ok=True)
            (self.path / name).write_text(text)

    def run(self, command: Command) -> None:
        """Run one command here; assert it finished (or, for CANNOT_RUN, that it failed fast as promised)."""
        argv = command.argv
        if S3_ARRAY in argv:
            i = argv.index(S3_ARRAY)
            argv = argv[:i] + self.s3_options() + argv[i + 1:]
        run_env = dict(self.env)
        for key, value in command.env.items():  # e.g. PYTHONPATH=. : the doc's value first, ours after it
            run_env[key] = value + (os.pathsep + self.env[key] if key == "PYTHONPATH" else "")
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "engine.cli", *argv[1:]], cwd=self.path, env=run_env,
                             capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        self.timings.append((round(time.perf_counter() - t0, 1), f"{command.doc}: {command.text}"))
        output = self.outputs[command.text] = res.stdout + res.stderr
        if command.text in CANNOT_RUN:
            reason, expected = CANNOT_RUN[command.text]
            assert res.returncode == 2 and expected in output and "Traceback" not in output, (reason, output[-3000:])
            if "--out" in argv:
                out = argv[argv.index("--out") + 1]
                assert "://" in out or not (self.path / out).exists(), f"{command.text}: wrote {out} before failing"
            return
        assert res.returncode == 0, f"{command.doc}: {command.text} exited {res.returncode}:\n{output[-4000:]}"

    def run_doc(self, doc: Path) -> None:
        self.write_files(doc)
        for command in commands(doc):
            if command.needs is None:
                self.run(command)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A fresh folder where every command of README.md ran, in order (`fld quickstart` among them)."""
    root = tmp_path_factory.mktemp("readme")
    (root / "work").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    state = Folder(root / "work", env)
    try:
        state.run_doc(README)
        yield state
    finally:
        if state.server is not None:
            import seaweed

            seaweed.stop(state.server)
        print("\n".join(f"{s:7.1f}s  {c}" for s, c in state.timings))


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_every_readme_command_finishes(folder):
    # what the quickstart promises: real objects (SSD) and real OCR on the sample photos
    done = subprocess.run([sys.executable, "-m", "engine.cli", "query", "out/quickstart",
                           "SELECT DISTINCT label FROM regions WHERE kind = 'object'", "--format", "csv"],
                          cwd=folder.path, env=folder.env, capture_output=True, text=True, timeout=300)
    labels = set(done.stdout.split()[1:])
    assert {"cup", "cat", "person"} <= labels, done.stdout
    assert (folder.path / "samples").is_dir() and (folder.path / "out" / "quickstart" / "manifest.json").exists()


@pytest.mark.slow
def test_quickstart_says_what_the_round_did_and_what_to_try_next(folder):
    out = folder.outputs["fld quickstart"]  # tables on stdout, messages (the round, the next commands) on stderr
    line = next(x for x in out.splitlines() if x.startswith("stage 3 round 1: "))
    assert "trained 12 steps (loss " in line and "relabelled 11 images (" in line and " merged" in line
    assert "CLIP score rule: off" in out  # fld stats says why no CLIP rule applies
    tail = out[out.index("next, try:"):].splitlines()[1:]
    commands = [shlex.split(x.strip()) for x in tail if x.strip().startswith("fld ")]
    assert [c[1] for c in commands] == ["query", "show", "export"]
    (folder.path / "report.html").unlink(missing_ok=True)  # the README's `fld show` wrote one: these write theirs
    for cmd in commands:
        res = subprocess.run([sys.executable, "-m", "engine.cli", *cmd[1:]], cwd=folder.path, capture_output=True,
                             text=True, timeout=300, env={**folder.env, "COLUMNS": "200"})
        assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-2000:])
    assert (folder.path / "report.html").stat().st_size > 50_000 and (folder.path / "export").is_dir()


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quickstart_report_draws_captions_boxes_and_masks_in_chromium(folder, sync_api, tmp_path):
    from engine.views.show import build_report
    from helpers import CHROMIUM, FLAGS

    report = tmp_path / "screenshot-report.html"
    assert build_report(folder.path / "out" / "quickstart", report, step="stage2") == 11
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(report.as_uri())
            card = page.locator("article.card").filter(has_text="photo_darknet_dog.jpg")
            card.scroll_into_view_if_needed()
            caption = card.locator("ul.captions li").first
            assert caption.is_visible() and "dog" in caption.inner_text()
            assert card.locator("b.phrase").first.is_visible()  # a grounded phrase, coloured like its box
            assert card.locator(".layer-objects rect").count() >= 2 and card.locator(".layer-objects rect").first.is_visible()
            assert card.locator(".layer-masks path.mask-outline").count() >= 2
            assert page.is_checked("#layer-masks")  # few masks: shown at start
            svg = card.locator("svg.annotated")
            with_all = _png(svg.screenshot())
            page.click("label[for=layer-masks]")
            no_masks = _png(svg.screenshot())
            page.click("label[for=layer-objects]")
            page.click("label[for=layer-groundings]")
            bare = _png(svg.screenshot())
            page.click("label[for=layer-masks]")
            page.click("label[for=layer-objects]")
            page.click("label[for=layer-groundings]")
            card.screenshot(path=str(tmp_path / "card.png"))
            page.screenshot(path=str(tmp_path / "report.png"))
        finally:
            browser.close()
    # masks and boxes change visible pixels: they are drawn, not only present in the markup
    assert (np.abs(with_all - no_masks).sum(axis=2) > 30).mean() > 0.01
    assert (np.abs(no_masks - bare).sum(axis=2) > 30).mean() > 0.002


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_docs_command_finishes(folder, doc):
    """docs/<doc>'s commands, in the folder where the README's commands (and so `fld quickstart`) ran."""
    folder.run_doc(doc)
