"""The label-quality benchmark, one command (from the repository root):

    python -m bench.quality                 # default size: measured table -> BENCHMARKS.md + bench/quality/results/
    python -m bench.quality --small         # smoke size (the test suite runs it); outputs stay in --work
    python -m bench.quality --gpu           # the size for a GPU machine (larger world, CLIP and Florence-2)

Steps: write the world (train + held-out splits), train and measure the CLIP scorer, write the
effective pipelines YAML (bench/quality/pipelines.yaml with paths, calibrated CLIP thresholds and
the size filled in) to <work>/pipelines.yaml, run it with the engine (engine.run.run_pipeline, what
`fld run` calls) for both noise levels and both refinement arms on both splits, then score every
dataset version (annotations/stage1, stage2, round<k>) against the truth and write the table, the
JSON and the plot. Every OUT stays queryable: `fld stats <work>/runs/mild/full/heldout --step round2`.

Held-out split: the engine's rounds train on every image of their OUT. To keep held-out images out
of training, the held-out OUT runs the same pipeline with each round's model copied from the train
OUT (models/round<k>/, final weights + train_summary.json, no checkpoints): the engine's resume sees
a finished training and only relabels, filters and merges the held-out images.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import yaml

from bench.quality.clip_train import ClipConfig
from bench.quality.world import WorldConfig, image_dir

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TEMPLATE = HERE / "pipelines.yaml"
NOISES = ("mild", "harsh")
ARMS = ("full", "nofilter")
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Size:
    world: WorldConfig
    clip: ClipConfig
    rounds: int
    train: dict
    relabel: dict
    florence2: str  # the refine model's random config (relative to bench/quality)
    shard_size: int


SIZES: dict[str, Size] = {
    # Seconds on 2 CPU cores: every stage and both arms, 2 rounds, a few training steps.
    "small": Size(WorldConfig(n_train=6, n_heldout=3, sign_prob=0.9), ClipConfig(steps=12, batch_size=16, layers=2, text_layers=2, width=64, text_width=64, embed_dim=32, variants=1, images=16, calib_images=8),
                  rounds=2, train={"steps": 3, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 1},
                  relabel={"max_new_tokens": 12, "batch_size": 8}, florence2="florence2_cpu.json", shard_size=4),
    # The measured default: under 40 minutes on this 2-core CPU (BENCHMARKS.md says how long it took).
    "default": Size(WorldConfig(n_train=64, n_heldout=32), ClipConfig(), rounds=3,
                    train={"steps": 300, "batch_size": 8, "lr": 3.0e-4, "warmup_steps": 30, "checkpoint_every": 300},
                    relabel={"max_new_tokens": 256, "batch_size": 16}, florence2="florence2_cpu.json", shard_size=16),
    # A GPU machine: a 20x larger world, a larger CLIP, a 45M-parameter Florence-2 at 384 px, 20x the steps.
    "gpu": Size(WorldConfig(n_train=1200, n_heldout=300), ClipConfig(steps=3000, batch_size=256, width=384, layers=6, text_width=384, text_layers=6, embed_dim=256, image_size=96),
                rounds=3, train={"steps": 3000, "batch_size": 32, "lr": 3.0e-4, "warmup_steps": 200, "checkpoint_every": 500},
                relabel={"max_new_tokens": 256, "batch_size": 64, "num_beams": 3}, florence2="florence2_gpu.json", shard_size=256),
}


# ------------------------------------------------------------------ effective config
def _stages(cfg: dict):
    for pipe in cfg["pipelines"].values():
        for step in pipe["steps"]:
            yield from step["stages"]


def effective_config(work: Path, size: Size, thresholds: dict, rounds: int) -> dict:
    """bench/quality/pipelines.yaml with this run's paths, CLIP cuts and size."""
    cfg = copy.deepcopy(yaml.safe_load(TEMPLATE.read_text()))
    cfg["models"]["clip"] = str(work / "models" / "clip")
    cfg["models"]["florence2"] = f"random:{HERE / size.florence2}"
    cfg.pop("profiles", None)  # the size already chose the model
    for spec in _stages(cfg):
        params = spec.setdefault("params", {})
        if "world" in params:
            params["world"] = str(work / "world")
        if spec["stage"] == "clip_score":
            params["min_score"] = {k: thresholds.get(k) for k in ("region", "text")}
    for pipe in cfg["pipelines"].values():
        pipe["ingest"]["shard_size"] = size.shard_size
        if "rounds" in pipe:
            pipe["rounds"] = rounds
            pipe["refine"] = copy.deepcopy(pipe["refine"])
            pipe["refine"]["train"].update(size.train)
            pipe["refine"]["relabel"].update(size.relabel)
    return cfg


def specialist_params(cfg: dict) -> dict:
    """noise -> stage -> its parameters (the error rates printed with the results)."""
    out = {}
    for noise in NOISES:
        step = next(s for s in cfg["pipelines"][f"base_{noise}"]["steps"] if s["name"] == "stage1")
        out[noise] = {spec["stage"].rsplit(":", 1)[-1]: {k: v for k, v in spec["params"].items() if k != "world"}
                      for spec in step["stages"]}
    return out


# ------------------------------------------------------------------------- engine jobs
def seed_out(src: Path, dst: Path, folders: list[str]) -> None:
    """Copy committed folders of one OUT into another: identical steps are not recomputed. The
    engine's resume then checks each shard's configuration hash (a mismatch is refused)."""
    for folder in folders:
        if (dst / folder / "_committed").is_dir():
            continue  # already there (a resumed benchmark)
        shutil.copytree(src / folder, dst / folder, dirs_exist_ok=True)


def seed_models(train_out: Path, heldout_out: Path, rounds: int) -> None:
    """Each round's final model of the train OUT into the held-out OUT (no checkpoints, no marker)."""
    for k in range(1, rounds + 1):
        src, dst = train_out / "models" / f"round{k}", heldout_out / "models" / f"round{k}"
        if (dst / "train_summary.json").exists():
            continue
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "round.json", "ray_results"), dirs_exist_ok=True)


def run_engine(yaml_path: str, pipeline: str, src: str, out: str, runner: str = "local") -> dict:
    """One `fld run` driven from this process on `runner`: (seconds, the run summary)."""
    from engine.config import load_pipeline
    from engine.run import run_pipeline

    t0 = time.perf_counter()
    summary = run_pipeline(load_pipeline(yaml_path, pipeline), src, out, runner=runner)
    return {"pipeline": pipeline, "out": out, "seconds": round(time.perf_counter() - t0, 2), "rounds": summary.rounds}


def run_chain(jobs: list[dict]) -> list[dict]:
    """Engine runs that depend on each other, in order; a failure stops the chain and is reported."""
    done = []
    for job in jobs:
        try:
            if job.get("seed_models_from"):
                seed_models(Path(job["seed_models_from"]), Path(job["out"]), job["rounds"])
            for src, folders in job.get("seed_from", []):
                seed_out(Path(src), Path(job["out"]), folders)
            done.append(run_engine(job["yaml"], job["pipeline"], job["input"], job["out"], job.get("runner", "local")))
        except Exception as exc:  # noqa: BLE001 - the other chains go on; the report names this one
            done.append({"pipeline": job["pipeline"], "out": job["out"], "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()})
            break
    return done


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def run_parallel(chains: list[list[dict]], jobs: int) -> list[dict]:
    """Independent chains on `jobs` worker processes (1: in this process)."""
    if jobs <= 1:
        return [r for chain in chains for r in run_chain(chain)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(threads,)) as pool:
        return [r for chain_result in pool.map(run_chain, chains) for r in chain_result]


def out_dir(work: Path, noise: str, arm: str, split: str) -> Path:
    return work / "runs" / noise / arm / split


def plan(work: Path, yaml_path: Path, rounds: int) -> list[list[list[dict]]]:
    """Phases of chains: (1) stage 1 + 2 at mild noise on both splits (the only OCR), (2) the same
    at harsh noise, OCR copied, (3) the four refinement chains (noise x arm), train then held-out."""
    src = {split: str(image_dir(work / "world", split)) for split in SPLITS}
    job = lambda pipeline, noise, arm, split, **kw: {  # noqa: E731
        "yaml": str(yaml_path), "pipeline": pipeline, "input": src[split], "out": str(out_dir(work, noise, arm, split)), **kw}
    shared = ["images", "quarantine", "annotations/ocr"]
    phase1 = [[job("base_mild", "mild", "full", split)] for split in SPLITS]
    phase2 = [[job("base_harsh", "harsh", "full", split, seed_from=[(str(out_dir(work, "mild", "full", split)), shared)])]
              for split in SPLITS]
    phase3 = []
    for noise in NOISES:
        for arm in ARMS:
            seed = [] if arm == "full" else [(str(out_dir(work, noise, "full", "train")), shared + ["annotations/stage1"])]
            seed_h = [] if arm == "full" else [(str(out_dir(work, noise, "full", "heldout")), shared + ["annotations/stage1"])]
            phase3.append([
                job(f"{arm}_{noise}", noise, arm, "train", seed_from=seed),
                job(f"{arm}_{noise}", noise, arm, "heldout", seed_from=seed_h,
                    seed_models_from=str(out_dir(work, noise, arm, "train")), rounds=rounds),
            ])
    return [phase1, phase2, phase3]


# ------------------------------------------------------------------------- measuring
def versions(rounds: int) -> list[tuple[str, str, str]]:
    """(label, arm OUT, folder) of every dataset version the table shows."""
    out = [("specialists", "full", "stage1"), ("+ filters", "full", "stage2")]
    out += [(f"refine, no filters, round {k}", "nofilter", f"round{k}") for k in range(1, rounds + 1)]
    out += [(f"full engine, round {k}", "full", f"round{k}") for k in range(1, rounds + 1)]
    return out


def measure(work: Path, rounds: int) -> list[dict]:
    """Metrics of every version x noise x split."""
    from bench.quality.metrics import evaluate, read_version
    from bench.quality.world import load_truth

    truth = load_truth(work / "world")
    rows = []
    for noise in NOISES:
        for label, arm, folder in versions(rounds):
            for split in SPLITS:
                out = out_dir(work, noise, arm, split)
                try:
                    metrics = evaluate(read_version(out, folder), truth)
                except Exception as exc:  # noqa: BLE001 - a missing version is reported, not fatal
                    metrics = {"error": f"{type(exc).__name__}: {exc}"}
                rows.append({"noise": noise, "version": label, "arm": arm, "folder": folder, "split": split,
                             "out": str(out), "metrics": metrics})
    return rows


def costs(work: Path, rounds: int) -> list[dict]:
    """Seconds and images/s of each step and round, from each OUT's manifest (the engine's own
    per-stage counters; a copied step is reported where it ran)."""
    from engine.store import ShardStore

    rows = []
    for noise in NOISES:
        for arm in ARMS:
            for split in SPLITS:
                store = ShardStore(out_dir(work, noise, arm, split))
                m = store.read_manifest()
                images = (m.get("ingest") or {}).get("images") or 0
                ran_here = {"ocr": noise == "mild" and arm == "full", "stage1": arm == "full", "stage2": arm == "full"}
                for step, here in ran_here.items():
                    stages = (m.get("counters") or {}).get(step)
                    if here and stages:
                        sec = sum(c.get("seconds", 0) for c in stages.values())
                        rows.append({"noise": noise, "arm": arm, "split": split, "step": step, "seconds": round(sec, 1),
                                     "images": images, "images_per_s": round(images / sec, 2) if sec else None})
                for k in range(1, rounds + 1):
                    r = (m.get("rounds") or {}).get(str(k))
                    if r:
                        t = r.get("train") or {}
                        rows.append({"noise": noise, "arm": arm, "split": split, "step": f"round{k}",
                                     "seconds": r.get("seconds"), "images": images,
                                     "images_per_s": round(images / r["seconds"], 2) if r.get("seconds") else None,
                                     "trained": split == "train", "train_samples_per_s": t.get("samples_per_s"),
                                     "train_loss": [t.get("first_loss"), t.get("last_loss")]})
    return rows


# ---------------------------------------------------------------------------- main
@dataclass
class Result:
    size: str
    rounds: int
    jobs: int
    seconds: dict = field(default_factory=dict)
    clip: dict = field(default_factory=dict)
    specialists: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    costs: list = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    runner: str = "local"


def cpu_seconds() -> float:
    """CPU time of this process and its finished workers: what the run cost whatever else the
    machine was doing (wall seconds grow with other processes' load, this does not)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, 1)


def machine_info() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in load] if load else None,
            "python": sys.version.split()[0], "nice": os.nice(0), "cpu_seconds": cpu_seconds()}


def main(argv: list[str] | None = None) -> Result:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    size_group = ap.add_mutually_exclusive_group()
    size_group.add_argument("--small", action="store_const", dest="size", const="small", help="smoke size (test suite)")
    size_group.add_argument("--gpu", action="store_const", dest="size", const="gpu", help="the size for a GPU machine")
    ap.add_argument("--work", default=None, help="work folder (world, models, runs); default out/quality[-small|-gpu]")
    ap.add_argument("--rounds", type=int, default=None, help="refinement rounds (default 3; --small 2)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="refinement chains run in parallel")
    ap.add_argument("--seed", type=int, default=0, help="world seed")
    ap.add_argument("--runner", choices=("local", "ray", "beam"), default="local",
                    help="the engine's runner for every run (the rounds write the same shards on every runner: "
                         "tests/test_rounds.py)")
    ap.add_argument("--report", default=None, help="Markdown to update (default: BENCHMARKS.md for the default size only)")
    ap.add_argument("--results", default=None, help="folder for results.json + plot (default: bench/quality/results for the default size, else <work>)")
    args = ap.parse_args(argv)
    size_name = args.size or "default"
    size = SIZES[size_name]
    size = replace(size, world=replace(size.world, seed=args.seed))
    rounds = args.rounds if args.rounds is not None else size.rounds
    work = Path(args.work or REPO / "out" / ("quality" if size_name == "default" else f"quality-{size_name}")).resolve()
    results_dir = Path(args.results) if args.results else (HERE / "results" if size_name == "default" else work)
    report = Path(args.report) if args.report else (REPO / "BENCHMARKS.md" if size_name == "default" else None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = Result(size_name, rounds, args.jobs, runner=args.runner)
    t_all = time.perf_counter()
    say = lambda msg: print(f"[quality {time.perf_counter() - t_all:7.1f}s] {msg}", flush=True)  # noqa: E731

    from bench.quality.clip_train import train_clip
    from bench.quality.world import write_world

    t0 = time.perf_counter()
    write_world(work / "world", size.world)
    res.seconds["world"] = round(time.perf_counter() - t0, 1)
    say(f"world: {size.world.n_train} train + {size.world.n_heldout} held-out images in {work / 'world'}")
    t0 = time.perf_counter()
    res.clip = train_clip(work / "world", work / "models" / "clip", size.clip, log=say)
    res.seconds["clip"] = round(time.perf_counter() - t0, 1)
    say(f"clip: ROC AUC held-out {({k: v['auc'] for k, v in res.clip['auc']['heldout'].items()})}, thresholds {res.clip['thresholds']}")
    cfg = effective_config(work, size, res.clip["thresholds"], rounds)
    yaml_path = work / "pipelines.yaml"
    yaml_path.write_text("# written by python -m bench.quality from bench/quality/pipelines.yaml\n" + yaml.safe_dump(cfg, sort_keys=False))
    res.specialists = specialist_params(cfg)
    t0 = time.perf_counter()
    for i, phase in enumerate(plan(work, yaml_path, rounds), start=1):
        for chain in phase:
            for job in chain:
                job["runner"] = args.runner
        tp = time.perf_counter()
        done = run_parallel(phase, args.jobs if i == 3 else min(args.jobs, len(phase)))
        res.runs += done
        for r in done:
            say(f"{r['pipeline']} -> {r['out']}: " + (f"ERROR {r['error']}" if "error" in r else f"{r['seconds']} s"))
        res.seconds[f"engine_phase{i}"] = round(time.perf_counter() - tp, 1)
    res.seconds["engine"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    res.metrics = measure(work, rounds)
    res.costs = costs(work, rounds)
    res.seconds["metrics"] = round(time.perf_counter() - t0, 1)
    res.seconds["total"] = round(time.perf_counter() - t_all, 1)
    res.machine = machine_info()
    from bench.quality.report import write_outputs

    written = write_outputs(res, results_dir, report)
    say(f"done in {res.seconds['total']} s; wrote {', '.join(str(p) for p in written)}")
    failed = [r for r in res.runs if "error" in r]
    if failed:
        for r in failed:
            print(r["traceback"], file=sys.stderr)
        raise SystemExit(f"{len(failed)} engine run(s) failed: " + "; ".join(f"{r['pipeline']} {r['out']}: {r['error']}" for r in failed))
    return res

