"""Run `fld` as a separate process with bounds, and check the hostile-input invariant.

`fld_bounded` starts `python -m engine.cli ARGS` in a fresh working folder with its own TMPDIR,
under an address-space limit (RLIMIT_AS) and a wall-clock timeout, and measures the child's
peak RSS (os.wait4). `check` then asserts the invariant every hostile test shares: the expected
exit code, no traceback, at most `lines` lines of `error:` output, bounded seconds and memory,
and nothing left in the working folder or TMPDIR (nothing written outside OUT).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    rss_mib: float
    cwd: Path
    tmpdir: Path

    def check(self, rc: int = 2, *, seconds: float = 60, rss_mib: float = 1500, lines: int = 1,
              clean: bool = True, first: str | tuple = "error:") -> "Outcome":
        both = self.stdout + self.stderr
        assert self.rc == rc, (self.rc, both[-3000:])
        assert "Traceback" not in both, both[-3000:]
        assert self.seconds < seconds, self.seconds
        assert self.rss_mib < rss_mib, self.rss_mib
        if rc == 2:
            errors = [line for line in self.stderr.splitlines() if line.strip()]
            assert errors and errors[0].startswith(first) and len(errors) <= lines, self.stderr[-3000:]
        if clean:
            left = sorted(str(p) for p in (*self.cwd.rglob("*"), *self.tmpdir.rglob("*")))
            assert not left, left
        return self


def fld_bounded(*args: str, timeout: float = 120, address_space_gib: float = 6, cwd: Path | None = None,
                env: dict | None = None, stdin: str | None = None) -> Outcome:
    """`fld ARGS` in a fresh cwd and TMPDIR (or `cwd`), killed after `timeout` seconds."""
    work = Path(tempfile.mkdtemp(prefix="fld-bounded-"))
    cwd = cwd or (work / "cwd")
    cwd.mkdir(exist_ok=True)
    tmpdir = work / "tmp"
    tmpdir.mkdir()
    limit = int(address_space_gib * (1 << 30))

    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path]), "TMPDIR": str(tmpdir),
                **(env or {})}
    started = time.monotonic()
    # A small launcher sets the limit, starts fld and reports fld's own peak RSS: a child forked
    # from this (large) test process would count the fork's pages in its peak, even after exec.
    peak = work / "peak_rss_kib"
    launcher = ("import os, resource, subprocess, sys; resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2); "
                "p = subprocess.Popen([sys.executable, '-m', 'engine.cli', *sys.argv[3:]]); "
                "_, status, usage = os.wait4(p.pid, 0); open(sys.argv[2], 'w').write(str(usage.ru_maxrss)); "
                "sys.exit(os.waitstatus_to_exitcode(status))")
    proc = subprocess.Popen([sys.executable, "-c", launcher, str(limit), str(peak), *map(str, args)], cwd=cwd,
                            env=full_env, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    streams: dict = {}
    readers = [threading.Thread(target=lambda n=n, f=f: streams.__setitem__(n, f.read()), daemon=True)
               for n, f in (("out", proc.stdout), ("err", proc.stderr))]
    if stdin is not None:
        proc.stdin.write(stdin.encode())
        proc.stdin.close()
    for r in readers:
        r.start()
    killer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    killer.start()
    proc.wait()
    killer.cancel()
    for r in readers:
        r.join()
    seconds = time.monotonic() - started
    stdout, stderr = (streams[n].decode("utf-8", "replace") for n in ("out", "err"))
    if seconds >= timeout:
        raise AssertionError(f"fld {' '.join(map(str, args))[:200]} ran past {timeout} s: {stderr[-2000:]}")
    rss_mib = int(peak.read_text()) / 1024
    peak.unlink()
    return Outcome(proc.returncode, stdout, stderr, seconds, rss_mib, cwd, tmpdir)
