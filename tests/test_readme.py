"""Every `fld ...` command in README.md's code blocks runs to completion on this machine.

Generic on purpose: commands added to the README later are run too. The commands run in README order
in one fresh working folder (so `out/...`, `samples`, `report.html` are relative to it), after the
README's file blocks (a code block whose first line is `# FILE`) are written there. Placeholders get
small real inputs (PLACEHOLDERS). A command that cannot run here must be listed in CANNOT_RUN with the
reason and the error it must fail fast with, instead of being left out silently.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

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
# The README's object-storage commands run for real against SeaweedFS (tests/seaweed.py): the bucket
# `my-bucket` is created and the shell array "${S3[@]}" becomes that server's --storage-option arguments.
S3_ARRAY = "${S3[@]}"
COMMAND_TIMEOUT = 900


def readme_blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return re.findall(r"```([a-z]*)\n(.*?)```", README.read_text(), flags=re.S)


def readme_files() -> dict[str, str]:
    out = {}
    for _, body in readme_blocks():
        match = re.fullmatch(r"# ([\w./-]+\.(?:py|yaml|yml|toml|json))", body.partition("\n")[0].strip())
        if match:
            out[match.group(1)] = body
    return out


def readme_commands() -> list[tuple[dict[str, str], list[str]]]:
    """(environment assignments, argv) of every `fld` command of the README's shell blocks."""
    commands = []
    for lang, body in readme_blocks():
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        for line in body.splitlines():
            for key, value in PLACEHOLDERS.items():
                line = line.replace(key, value)
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
                    commands.append((env, segment))
                segment = []
    return commands


def test_readme_commands_are_found():
    commands = [" ".join(argv) for _, argv in readme_commands()]
    assert "fld quickstart" in commands
    assert any(c.startswith("fld run --pipeline fld") and "--profile offline" in c for c in commands)
    assert set(CANNOT_RUN) <= set(commands), "a CANNOT_RUN entry is no longer in the README: remove it"


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_every_readme_command_finishes(tmp_path):
    for name, text in readme_files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    timings = []
    server = None
    for env, argv in readme_commands():
        command = " ".join(argv)
        if S3_ARRAY in argv:
            if server is None:
                import seaweed

                server = seaweed.start(tmp_path / "seaweedfs")
                server.filesystem().mkdir("my-bucket")
            i = argv.index(S3_ARRAY)
            argv = argv[:i] + server.cli_options() + argv[i + 1:]
        run_env = dict(base_env)
        for key, value in env.items():  # e.g. PYTHONPATH=. : the README's value first, ours after it
            run_env[key] = value + (os.pathsep + base_env[key] if key == "PYTHONPATH" else "")
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "engine.cli", *argv[1:]], cwd=tmp_path, env=run_env,
                             capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        seconds = time.perf_counter() - t0
        timings.append((round(seconds, 1), command))
        output = res.stdout + res.stderr
        if command in CANNOT_RUN:
            reason, expected = CANNOT_RUN[command]
            assert res.returncode == 2 and expected in output and "Traceback" not in output, (reason, output[-3000:])
            if "--out" in argv:
                out = argv[argv.index("--out") + 1]
                assert "://" in out or not (tmp_path / out).exists(), f"{command}: wrote {out} before failing"
            continue
        assert res.returncode == 0, f"{command} exited {res.returncode}:\n{output[-4000:]}"
    if server is not None:
        import seaweed

        seaweed.stop(server)
    print("\n".join(f"{s:7.1f}s  {c}" for s, c in timings))
    # what the quickstart promises: real objects (SSD) and real OCR on the sample photos
    done = subprocess.run([sys.executable, "-m", "engine.cli", "query", "out/quickstart",
                           "SELECT DISTINCT label FROM regions WHERE kind = 'object'", "--format", "csv"],
                          cwd=tmp_path, env=base_env, capture_output=True, text=True, timeout=300)
    labels = set(done.stdout.split()[1:])
    assert {"cup", "cat", "person"} <= labels, done.stdout
