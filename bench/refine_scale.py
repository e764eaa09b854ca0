"""Stage 3 at scale, measured side by side in one run: round memory, relabel speed-up, training workers.

    python bench/refine_scale.py [--small 200] [--large 800] [--relabel-images 64] [--train-steps 12] [--repeat 2]

- rss: peak RSS of a whole `fld run` (ingest + a filter step + 1 refinement round: training on the
  kept labels, relabel, filters, merge; local runner, one process) at `--small` and `--large`
  images of the same generated world (a COCO file with a box and a caption per image). Target:
  within 15% (a round streams its shards; nothing holds the dataset).
- relabel: images/s of the round's relabel stage (a trained tiny Florence-2) as a bare in-process
  loop over the shards vs the engine on Ray with 1 and 2 actors (`--relabel-model random:base`: a model of
  Florence-2-base's size instead of the round's tiny one). Target: 2 actors >= 1.5x one. CPU seconds
  per image beside each (bench.scale.TreeCPU: driver + Ray processes), the work shared cores hide.
- train: training samples/s with 1 worker (in-process) vs Ray Train `num_workers: 2` (DDP, CPU).
  On 2 cores expect < 2x (the workers share the cores and synchronise gradients). And the same 1-worker
  training as a round runs it on Ray (a plain Ray task): its wall time minus the in-process one is the
  round's start-up on Ray beyond the training itself (target <= 5 s).

1 torch thread per worker. Rounds interleaved, best time of each column kept.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scale import best_of  # noqa: E402 - the same interleaved best-of-N (and CPU seconds) as scale.py

PIPELINE = """
models: {{florence2: "random:tiny"}}
pipelines:
  round:
    ingest: {{shard_size: 32}}
    steps:
      - name: filtered
        stages:
          - {{stage: region_filter}}
    rounds: 1
    refine:
      model: florence2
      train_tasks: ["<CAPTION>", "<OD>"]
      train: {{steps: {steps}, batch_size: 4, lr: 1.0e-3, warmup_steps: 2, checkpoint_every: 1000, log_every: 5}}
      relabel: {{tasks: [caption, od], batch_size: 8, max_new_tokens: 12, num_beams: 1}}
"""
SHAPES = ("square", "disc")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def world(dest: Path, n: int, seed: int = 0) -> Path:
    """n images (160-320 px) with one coloured shape each, and a COCO file: its box and a caption."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    dest.mkdir(parents=True, exist_ok=True)
    images, anns, cats = [], [], {}
    for i in range(n):
        w, h = rng.randint(160, 320), rng.randint(120, 240)
        img = Image.new("RGB", (w, h), tuple(rng.randint(90, 160) for _ in range(3)))
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        bw, bh = rng.randint(w // 5, w // 2), rng.randint(h // 5, h // 2)
        x0, y0 = rng.randint(0, w - bw), rng.randint(0, h - bh)
        draw = ImageDraw.Draw(img)
        (draw.rectangle if shape == "square" else draw.ellipse)([x0, y0, x0 + bw, y0 + bh], fill=COLOURS[colour])
        draw.text((2, 2), str(i), fill="white")
        img.save(dest / f"img_{i:05d}.png")
        name = f"{colour} {shape}"
        cid = cats.setdefault(name, len(cats) + 1)
        images.append({"id": i + 1, "file_name": f"img_{i:05d}.png", "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": cid, "bbox": [x0, y0, bw, bh], "iscrowd": 0})
        anns.append({"id": 100000 + i, "image_id": i + 1, "caption": f"a {colour} {shape} on a grey background"})
    coco = {"images": images, "annotations": anns, "categories": [{"id": c, "name": n} for n, c in cats.items()]}
    (dest / "instances.json").write_text(json.dumps(coco))
    return dest / "instances.json"


RSS_RUN = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
from engine.config import load_pipeline
from engine.run import run_pipeline
import torch
torch.set_num_threads(1)
t0 = time.perf_counter()
s = run_pipeline(load_pipeline({cfg!r}, "round"), {src!r}, {out!r})
print(json.dumps({{"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "images": s.ingest["images"], "seconds": time.perf_counter() - t0,
                  "relabel": s.rounds[0]["relabel"]}}))
"""


def section_rss(args, work: Path) -> dict:
    cfg = work / "round.yaml"
    cfg.write_text(PIPELINE.format(steps=args.train_steps))
    print(f"\n== peak RSS of a run with 1 round (local runner, one process): {args.small} vs {args.large} images", flush=True)
    out = {}
    for n in (args.small, args.large):
        src = world(work / f"world_{n}", n)
        code = RSS_RUN.format(root=str(ROOT), cfg=str(cfg), src=str(src), out=str(work / f"rss_out_{n}"))
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=7200)
        if res.returncode:
            raise RuntimeError(res.stderr[-3000:])
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"  {n} images: peak RSS {out[n]['maxrss_mib']:.0f} MiB, {out[n]['seconds']:.0f} s, relabel {out[n]['relabel']}",
              flush=True)
    ratio = out[args.large]["maxrss_mib"] / out[args.small]["maxrss_mib"]
    print(f"peak RSS {args.large} / {args.small} images: {ratio:.3f}x (target within 1.15)")
    return {"runs": out, "ratio": ratio}


def section_relabel_and_train(args, work: Path) -> dict:
    import ray

    from engine.config import load_pipeline
    from engine.execute import batches, read_step_input
    from engine.run import run_pipeline
    from engine.runners.base import StageRecipe, StepJob, get_runner
    from engine.runners.ray_train import run_train
    from engine.store import ShardStore
    from engine.training import TrainJob, World
    from refine.relabel import RefineRelabeler
    from refine.trainer import Florence2Trainer

    cfg = work / "relabel.yaml"
    cfg.write_text(PIPELINE.format(steps=args.train_steps).replace("shard_size: 32", f"shard_size: {args.shard_size}"))
    src = world(work / "world_relabel", args.relabel_images, seed=5)
    base = work / "relabel_base"
    run_pipeline(load_pipeline(cfg, "round"), str(src), str(base))  # a trained round-1 model + its data
    store = ShardStore(base)
    model_dir = store.local_dir("models/round1")
    shards = store.shards("images")
    n = sum(store.commit_record("images", s)["rows"] for s in shards)
    params = {"model": args.relabel_model or model_dir, "round": 1, "tasks": ["caption", "od"], "batch_size": 8, "max_new_tokens": 12,
              "num_beams": 1, "cpus": 1}
    if "relabel" in args.sections:
        print(f"\n== relabel: {args.relabel_model or 'round-1 model'}, {n} images in {len(shards)} shards, batch 8, 1 thread per worker", flush=True)

    def bare() -> float:
        tables = [read_step_input(store, "annotations/filtered", s, frozenset({"pixels"})) for s in shards]
        t0 = time.perf_counter()
        stage = RefineRelabeler(dict(params))
        stage.ensure_setup()
        for table in tables:
            for batch in batches(table, 8):
                stage(batch)
        return time.perf_counter() - t0

    def engine(actors: int) -> float:
        out = work / f"relabel_{actors}_{time.time_ns()}"
        shutil.copytree(base, out)
        s = ShardStore(out)
        inputs = s.committed("annotations/filtered")
        job = StepJob("relabel", [StageRecipe(RefineRelabeler, {**params, "concurrency": actors})], "annotations/filtered",
                      "annotations/relabel", shards, "bench", {k: inputs[k] for k in shards})
        t0 = time.perf_counter()
        get_runner("ray").run_step(s, job)
        return time.perf_counter() - t0

    temp = tempfile.mkdtemp(prefix="fldrb", dir="/tmp")
    from engine.runners.ray_runner import local_system_config

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             **local_system_config(os.cpu_count()))  # as the engine starts a local instance
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    try:
        out: dict = {}
        if "relabel" in args.sections:
            cpu: dict = {}
            relabel = best_of(args.repeat, [("bare loop", bare), ("ray, 1 actor", lambda: engine(1)),
                                            ("ray, 2 actors", lambda: engine(2))], cpu)
            print(f"{'':<16}{'seconds':>9}{'images/s':>10}{'CPU s/image':>13}")
            for name, s in relabel.items():
                print(f"{name:<16}{s:>9.2f}{n / s:>10.2f}{cpu[name] / n:>13.3f}")
            speedup = relabel["ray, 1 actor"] / relabel["ray, 2 actors"]
            work_ratio = cpu["ray, 2 actors"] / cpu["ray, 1 actor"]
            print(f"ray 2 actors / 1 actor: {speedup:.2f}x (target >= 1.5); 1 actor / bare: {relabel['bare loop'] / relabel['ray, 1 actor']:.2f}x; "
                  f"CPU s per image 2 actors / 1 actor: {work_ratio:.2f}")

            out |= {"relabel_seconds": relabel, "relabel_cpu_seconds": cpu, "relabel_images": n,
                    "relabel_two_vs_one": speedup, "relabel_cpu_two_vs_one": work_ratio}
        if "train" in args.sections:
            print(f"\n== training: {args.train_bench_steps} steps, batch 4 per worker, tiny Florence-2", flush=True)
            rates, walls = {}, {}
            for how in ("in process", "ray task", "ray train"):  # 1 worker, 1 worker, 2 workers
                workers = 2 if how == "ray train" else 1
                job = TrainJob(f"bench-{workers}", Florence2Trainer,
                               {"start": "random:tiny", "codec": {"tasks": ["<CAPTION>", "<OD>"]},
                                "train": {"steps": args.train_bench_steps, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2,
                                          "checkpoint_every": 10_000, "log_every": 2}},
                               {}, "annotations/filtered", f"models/bench{workers}_{time.time_ns()}", "h", workers)
                t0 = time.perf_counter()
                if how == "in process":
                    import torch

                    torch.set_num_threads(1)
                    summary = job.build().fit(store, job, World())
                else:  # one worker: a plain Ray task (engine.runners.ray_train); two: a TorchTrainer
                    summary = run_train(store, job)
                walls[how], rates[how] = time.perf_counter() - t0, summary["samples_per_s"]
                print(f"  {how}, {workers} worker(s): {rates[how]:.2f} samples/s, {walls[how]:.2f} s", flush=True)
            startup = walls["ray task"] - walls["in process"]
            print(f"training 2 workers / 1: {rates['ray train'] / rates['in process']:.2f}x (2 cores: < 2x expected); "
                  f"round start-up of 1 worker on Ray beyond the same training in process: {startup:.2f} s (target <= 5)")
            out |= {"train_samples_per_s": rates, "train_seconds": walls,
                    "train_two_vs_one": rates["ray train"] / rates["in process"], "one_worker_ray_startup_s": startup}
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=200)
    ap.add_argument("--large", type=int, default=800)
    ap.add_argument("--relabel-images", type=int, default=64)
    ap.add_argument("--relabel-model", default="", help="relabel section: the model relabelling instead of the "
                    "round's tiny one, e.g. random:base (Florence-2-base's size, random weights): work per image that "
                    "dwarfs an actor's start-up, so the 2-actor ratio measures the scaling, not the start-up")
    ap.add_argument("--shard-size", type=int, default=8, help="relabel section: images per shard")
    ap.add_argument("--train-steps", type=int, default=12, help="training steps of the measured rounds")
    ap.add_argument("--train-bench-steps", type=int, default=20)
    ap.add_argument("--sections", default="rss,relabel,train", help="rss, relabel, train (comma-separated)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    work = Path(tempfile.mkdtemp(prefix="fld_refine_scale_"))
    results = {}
    try:
        if "rss" in args.sections:
            results["rss"] = section_rss(args, work)
        if "relabel" in args.sections or "train" in args.sections:  # both use the same trained round-1 store
            results["relabel_train"] = section_relabel_and_train(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
