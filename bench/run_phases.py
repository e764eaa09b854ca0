"""Where the wall time of one `fld run` goes, phase by phase, on any runner (in this process).

    python bench/run_phases.py --input samples --out /tmp/phases [--runner ray] [--pipeline quickstart] [--profile offline]

Times each call the driver makes on the runner (connect to Ray, ingest tasks, each segment / step, each
training job) and what is left between them (planning, manifests; preflight is not run). Why: a run's fixed cost is
spread over phases that a whole-run timing (bench/scale.py's quickstart section) cannot tell apart.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHASES = ("connect", "run_tasks", "run_segment", "run_step", "run_train")


def timed(cls: type, name: str, phases: list) -> None:
    """Wrap cls.name so that each call appends (phase, what, seconds) to phases."""
    real = getattr(cls, name)

    def call(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(self, *args, **kwargs)
        finally:
            job = args[1] if len(args) > 1 else None
            phases.append((name, getattr(job, "name", ""), time.perf_counter() - t0))

    setattr(cls, name, call)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True, help="removed first")
    ap.add_argument("--runner", default="ray")
    ap.add_argument("--pipeline", default="quickstart")
    ap.add_argument("--profile", default="offline")
    ap.add_argument("--ray-fuse", default=None, help="auto | always | never")
    args = ap.parse_args()
    from engine.config import load_pipeline
    from engine.run import run_pipeline
    from engine.runners.base import get_runner

    phases: list = []
    runner_cls = type(get_runner(args.runner))
    for name in PHASES:
        if hasattr(runner_cls, name):
            timed(runner_cls, name, phases)
    shutil.rmtree(args.out, ignore_errors=True)
    pipeline = load_pipeline(ROOT / "pipelines.yaml", args.pipeline, args.profile)
    options = {"fuse": args.ray_fuse} if args.ray_fuse else {}
    t0 = time.perf_counter()
    run_pipeline(pipeline, args.input, args.out, runner=args.runner, runner_options=options)
    total = time.perf_counter() - t0
    print(f"{args.runner} ({args.pipeline}, {args.profile}), load average {os.getloadavg()[0]:.1f}:")
    for name, what, seconds in phases:  # the first connect is inside the first runner call (ingest)
        if name != "connect" or seconds >= 0.01:  # later connects find Ray connected
            print(f"  {name:12s} {what:24s} {seconds:7.2f} s" + ("  (connect included)" if name == "run_tasks" and
                                                                  any(n == "connect" for n, _, _ in phases) else ""))
    print(f"  {'driver, between the calls':37s} {total - sum(s for n, _, s in phases if n != 'connect'):7.2f} s")
    print(f"  {'run_pipeline':37s} {total:7.2f} s")


if __name__ == "__main__":
    main()
