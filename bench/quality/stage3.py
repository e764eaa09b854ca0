"""Stage 3 of the label-quality benchmark: do the engine's refinement rounds add correct labels?

    python -m bench.quality.stage3            # default size: tables -> bench/quality/results/stage3.{json,md}
    python -m bench.quality.stage3 --small    # smoke size (the test suite runs it); outputs stay in --work

A tiny Florence-2 from random weights does not generalise from a few hundred noisy images in CPU
minutes (issue 17), so the rounds start, as real users do, from a pretrained model:

1. Pretraining (the role of Florence-2's own pre-training): a separate generated world (its own
   world seed, so none of its images is a train or held-out image) goes through the benchmark's
   stage 1 + stage 2 (the simulated specialists, then the engine's filters); the benchmark's
   Florence-2 (bench/quality/florence2_cpu.json, random init) is trained on those filtered labels
   with the engine's trainer (refine.trainer.Florence2Trainer, through engine.training's in-process
   path), into <work>/stage3/pretrain/models/<hash>/: the hash is of the model config, the
   pretraining world's config and seed, the train settings and the labels' shard digests, so a
   rerun reuses it. Its own health check (refine.health: distinct generations, parse rate,
   agreement with the kept labels of its validation images) is in its train_summary.json.
2. Arms, each scored on the held-out images of the stage-1/2 benchmark (`python -m bench.quality`
   with the same --work: its world, CLIP scorer, effective pipelines.yaml and the stage-1/2 OUTs
   are reused, and made first when missing):
   - `stage 2`: the held-out stage-2 labels, no round;
   - `pretrained`: the pretrained model relabels the held-out images (one round without training);
   - `rounds`: the engine's rounds (`refine.model` = the pretrained folder) on the train split's
     filtered labels; the held-out OUT copies each round's model and only relabels, filters, merges;
   - `clean`: the same rounds trained on the train split's truth (stage `truth_labels` below) instead
     of the filtered labels: the upper bound of what training on better labels gives.
   For every arm and round two views: `dataset` (the kept labels of annotations/round<k>: what the
   engine outputs) and `model` (only the round's own relabels, whatever the filters and merge made of
   them: what the model itself can do). Every figure has a 95% bootstrap interval over held-out images.

`--refine-set KEY=VALUE` changes the rounds' `refine:` block (e.g. `--refine-set cross_fit.folds=3`;
`cross_fit.folds=0` turns cross-fitted relabelling off); `--pretrain-set KEY=VALUE` / `--pretrain-images N` change
the pretraining (another recipe is another cached model and another set of runs, <work>/stage3/runs/<model>/);
`--world-seeds 0,1` runs each world in <work>/w<seed> (stage 1/2 one after the other, sharing the CLIP scorer, then
`--jobs` worlds in parallel) and pools the held-out images of all of them in the tables. The pipelines actually run
are in <work>/stage3/stage3-<model>.yaml.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import yaml

from bench.quality.specialists import WorldStage
from schemas.geometry import quad_to_box
from schemas.records import make_ann_id, new_annotation

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PRETRAIN_SEED_OFFSET = 7919  # the pretraining world's seed: the benchmark world's + this (disjoint images)
SMOKE_BANNER = ("> **Smoke test (`--small`)**: a few images and steps; these numbers say the code path runs, "
                "not how well stage 3 works.\n")


# --------------------------------------------------------------------------- the truth
class TruthLabels(WorldStage):
    """The world's truth as annotations (objects, OCR lines, both caption tiers, their groundings):
    what the clean-label arm trains on. Never used on held-out images."""

    name: ClassVar[str] = "truth_labels"

    def simulate(self, record: dict, truth: dict, rng: np.random.Generator) -> None:
        iid = record["image_id"]
        for k, o in enumerate(truth["objects"]):
            record["regions"].append(new_annotation(
                self._source, score=1.0, ann_id=make_ann_id(iid, self.name, "object", k), kind="object",
                box=list(o["box"]), quad=None, polygon=None, mask=None, label=o["category"], brief=o["brief"]))
        for k, t in enumerate(truth["texts"]):
            record["regions"].append(new_annotation(
                self._source, score=1.0, ann_id=make_ann_id(iid, self.name, "text", k), kind="text",
                box=list(quad_to_box(t["quad"])), quad=list(t["quad"]), polygon=None, mask=None, label=t["text"], brief=None))
        boxes = {o["id"]: o["box"] for o in truth["objects"]}
        g = 0
        for k, tier in enumerate(("brief", "detailed")):
            caption_id = make_ann_id(iid, self.name, "texts", k)
            record["texts"].append(new_annotation(self._source, ann_id=caption_id, tier=tier, text=truth["captions"][tier]))
            for phrase in truth["phrases"][tier]:
                for oid in phrase["object_ids"]:
                    record["groundings"].append(new_annotation(
                        self._source, score=1.0, ann_id=make_ann_id(iid, self.name, "groundings", g, caption_id),
                        text_ann_id=caption_id, phrase=phrase["phrase"], char_start=phrase["char_start"],
                        char_end=phrase["char_end"], box=list(boxes[oid]), mask=None))
                    g += 1


TRUTH_STAGE = "bench.quality.stage3:TruthLabels"  # not __name__: `python -m` runs this file as __main__


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Stage3Size:
    pretrain_images: int  # images of the pretraining world
    pretrain: dict  # refine.trainer.TrainConfig of the pretraining
    rounds: int
    train: dict  # each round's TrainConfig (fine-tuning the pretrained model)
    relabel: dict
    bootstrap: int  # resamples of the held-out images per interval


SIZES: dict[str, Stage3Size] = {
    "small": Stage3Size(8, {"steps": 4, "batch_size": 4, "lr": 3.0e-4, "warmup_steps": 1, "eval_every": 2,
                            "checkpoint_every": 4, "log_every": 1},
                        rounds=2, train={"steps": 3, "batch_size": 4, "lr": 1.0e-4, "warmup_steps": 1,
                                         "checkpoint_every": 3, "log_every": 1},
                        relabel={"max_new_tokens": 12, "batch_size": 8}, bootstrap=50),
    # Measured (BENCHMARKS.md): 800 pretraining steps left <OD> collapsed (one output for every validation
    # image, validation loss 4.7); <OD> is drawn 3x as often as a caption task (its <loc_*> tokens are the slowest);
    # every shard in the shuffle window (256 small images), so batches mix the whole pretraining set
    "default": Stage3Size(256, {"steps": 3000, "batch_size": 8, "lr": 3.0e-4, "warmup_steps": 150, "eval_every": 250,
                                "checkpoint_every": 500, "log_every": 50, "window_shards": 16,
                                "task_weights": {"<OD>": 3.0, "<CAPTION_TO_PHRASE_GROUNDING>": 1.5}},
                          rounds=2, train={"steps": 100, "batch_size": 8, "lr": 1.0e-4, "warmup_steps": 10,
                                           "eval_every": 50, "checkpoint_every": 100, "log_every": 25},
                          relabel={"max_new_tokens": 256, "batch_size": 16}, bootstrap=500),
}


# -------------------------------------------------------------------- the stage-1/2 part
def ensure_base(work: Path, noise: str, small: bool, log, world_seed: int | None = None,
                clip_cache: Path | None = None) -> dict:
    """The stage-1/2 benchmark's world (its size's, or seed `world_seed`), CLIP scorer (trained once per
    configuration in `clip_cache`), effective pipelines and stage-2 OUTs of both splits in `work` (made
    with bench.quality.run's own functions when missing). Returns the config."""
    from bench.quality import run

    yaml_path = work / "pipelines.yaml"
    if not yaml_path.exists():
        from bench.quality.clip_train import train_clip
        from bench.quality.world import write_world

        size = run.SIZES["small" if small else "default"]
        log("stage 1/2: world and CLIP scorer (python -m bench.quality's own steps)")
        write_world(work / "world", size.world if world_seed is None else replace(size.world, seed=world_seed))
        clip = train_clip(work / "world", work / "models" / "clip", size.clip, log=log, cache=clip_cache)
        # the clip_score rules the stage-1/2 benchmark switches off (held-out AUC below run.AUC_MIN) are off here too
        off = tuple(r for r, sw in run.clip_switch(dict(clip["auc"]["heldout"])).items() if not sw["on"])
        cfg = run.effective_config(work, size, clip["thresholds"], size.rounds, clip_off=off)
        yaml_path.write_text("# written by python -m bench.quality.stage3 (bench.quality.run.effective_config)\n"
                             + yaml.safe_dump(cfg, sort_keys=False))
    cfg = yaml.safe_load(yaml_path.read_text())
    for split in run.SPLITS:
        out = run.out_dir(work, noise, "full", split)
        if not (out / "annotations" / "stage2" / "_committed").is_dir():
            log(f"stage 1/2: base_{noise} on {split}")
            run.run_engine(str(yaml_path), f"base_{noise}", str(run.image_dir(work / "world", split)), str(out))
    return cfg


# ---------------------------------------------------------------------- pipelines file
def _set_world(steps: list[dict], world: Path) -> list[dict]:
    steps = copy.deepcopy(steps)
    for step in steps:
        for spec in step["stages"]:
            if "world" in (spec.get("params") or {}):
                spec["params"]["world"] = str(world)
    return steps


def _apply_sets(refine: dict, sets: list[str]) -> None:
    """`a.b=VALUE` (VALUE read as YAML) into the refine block."""
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--refine-set {item!r}: expected KEY=VALUE (e.g. cross_fit.folds=3)")
        node = refine
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)


def stage3_config(base: dict, noise: str, pretrain_world: Path, pretrained: Path | None, size: Stage3Size,
                  rounds: int, refine_sets: list[str]) -> dict:
    """The pipelines stage 3 runs, from the stage-1/2 benchmark's effective config:
    pretrain_base (stage 1 + 2 on the pretraining world), rounds (full_<noise> from the pretrained
    model), pretrained (one round whose model is the pretrained one: held-out relabelling only),
    clean (the truth, then stage 2 as the rounds' filters; the rounds train on the truth)."""
    full = base["pipelines"][f"full_{noise}"]
    refine = copy.deepcopy(full["refine"])
    refine["model"] = str(pretrained) if pretrained else "florence2"
    refine["train"].update(size.train)
    refine["relabel"].update(size.relabel)
    _apply_sets(refine, refine_sets)
    pipes = {
        "pretrain_base": {"description": "stage 1 + 2 on the pretraining world", "ingest": copy.deepcopy(full["ingest"]),
                          "steps": _set_world(base["pipelines"][f"base_{noise}"]["steps"], pretrain_world)},
        "rounds": {"description": "the engine's rounds from the pretrained model", "ingest": copy.deepcopy(full["ingest"]),
                   "steps": copy.deepcopy(full["steps"]), "rounds": rounds, "refine": refine},
    }
    only = copy.deepcopy(refine)
    only["train"]["steps"] = size.pretrain["steps"]
    pipes["pretrained"] = {"description": "the pretrained model relabels (held-out only: never trained here)",
                           "ingest": copy.deepcopy(full["ingest"]), "steps": copy.deepcopy(full["steps"]),
                           "rounds": 1, "refine": only}
    world = next(spec["params"]["world"] for step in full["steps"] for spec in step["stages"]
                 if "world" in (spec.get("params") or {}))
    stage2 = next(step for step in full["steps"] if step["name"] == "stage2")
    clean = copy.deepcopy(refine)
    clean["from_step"] = "truth"
    pipes["clean"] = {"description": "clean-label upper bound: the rounds train on the train split's truth",
                      "ingest": copy.deepcopy(full["ingest"]),
                      "steps": [{"name": "truth", "stages": [{"stage": TRUTH_STAGE, "params": {"world": world}}]},
                                copy.deepcopy(stage2)],
                      "rounds": rounds, "refine": clean}
    return {"models": copy.deepcopy(base["models"]), "pipelines": pipes}


# --------------------------------------------------------------------------- pretraining
def pretrain(store_dir: Path, cfg: dict, size: Stage3Size, world_cfg: dict, log) -> tuple[Path, dict]:
    """Train the benchmark's Florence-2 from random weights on the pretraining OUT's stage-2 labels
    with the engine's trainer, cached: (model folder, its training summary)."""
    from engine.identity import digest
    from engine.store import ShardStore
    from engine.training import TrainJob, train_in_process
    from refine.trainer import Florence2Trainer

    store = ShardStore(store_dir)
    refine = cfg["pipelines"]["rounds"]["refine"]
    start = cfg["models"]["florence2"]
    model_cfg = Path(start.split(":", 1)[1]).read_text() if start.startswith("random:") else start
    params = {"start": start, "from_random": True, "train": dict(size.pretrain),
              "codec": {"tasks": refine["train_tasks"], "max_target_tokens": refine.get("max_target_tokens", 1024),
                        "max_region_examples": refine.get("max_region_examples", 8)}}
    labels = {s: r["sha256"] for s, r in store.committed("annotations/stage2").items()}
    h = digest({"model": model_cfg, "world": world_cfg, "params": params, "labels": labels})
    folder = f"models/pretrain-{h}"
    job = TrainJob("pretrain", Florence2Trainer, params, dict(cfg["models"]), "annotations/stage2", folder, h)
    summary = job.build().finished(store, job)
    if summary is None:
        log(f"pretraining {size.pretrain['steps']} steps on {len(labels)} shard(s) -> {store_dir / folder}")
        summary = train_in_process(store, job)
        summary = job.build().finished(store, job) or summary
    else:
        log(f"pretrained model cached: {store_dir / folder}")
    return store_dir / folder, summary


def copy_model(src: Path, dst: Path) -> None:
    """A trained model folder as a round's finished model (no checkpoints, best weights or marker)."""
    if (dst / "train_summary.json").exists():
        return
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "best", "round.json", "ray_results"),
                    dirs_exist_ok=True)


# ----------------------------------------------------------------------------- scoring
HEADLINE = (  # (metric, label) of the tables
    ("obj_precision", "box P"), ("obj_recall", "box R"), ("category_accuracy", "category acc"),
    ("brief_object_precision", "brief mention P"), ("brief_coverage", "brief coverage"),
    ("detailed_object_precision", "detailed mention P"), ("detailed_coverage", "detailed coverage"),
    ("detailed_attribute_recall", "detailed attr R"), ("grounding_accuracy", "grounding acc"),
    ("ocr_precision", "OCR P"), ("ocr_recall", "OCR R"),
)


def model_view(records: list[dict], round_: int) -> list[dict]:
    """Only the annotations round k's model made (kept, dropped or merged away alike), as kept."""
    out = []
    for rec in records:
        rec = dict(rec)
        for key in ("texts", "regions", "groundings"):
            rec[key] = [dict(a, status="kept") for a in rec.get(key) or []
                        if a.get("round") == round_ and (a.get("source") or {}).get("annotator") == "refine"]
        out.append(rec)
    return out


def image_tally(rec: dict, truth: dict):
    """bench.quality.metrics' Tally of one record (evaluate's accounting, image by image)."""
    from bench.quality.metrics import Tally, _kept
    from bench.quality.world import truth_of

    tally, t = Tally(), truth_of(truth, rec["uri"])
    regions = _kept(rec.get("regions"))
    tally.add_objects(t, [r for r in regions if r["kind"] == "object"])
    tally.add_ocr(t, [r for r in regions if r["kind"] == "text"])
    tally.add_groundings(t, _kept(rec.get("groundings")))
    tally.add_captions(t, _kept(rec.get("texts")))
    return tally


def score(records: list[dict], truth: dict, resamples: int, seed: int = 0) -> tuple[dict, list]:
    """Every metric of bench.quality.metrics on these records, with a 95% bootstrap interval over
    images for the headline ones: ({metric: value, metric + '_ci': [lo, hi]}, the per-image counts
    (pooled over world seeds by `pooled`)). mAP needs every box of a resample: no interval."""
    from bench.quality.metrics import evaluate

    figures = evaluate(records, truth)
    per_image = [dict(image_tally(rec, truth).n) for rec in records]
    figures.update(intervals(per_image, resamples, seed))
    return figures, per_image


def intervals(per_image: list[dict], resamples: int, seed: int = 0) -> dict:
    """{headline metric + '_ci': [lo, hi]}: 95% bootstrap over the images' counts."""
    import warnings

    from bench.quality.metrics import Tally

    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k, _ in HEADLINE}
    for _ in range(resamples if per_image else 0):
        t = Tally()
        for i in rng.integers(0, len(per_image), len(per_image)):
            for k, v in per_image[i].items():
                t.n[k] += v
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # box_map of no pairs
            f = t.figures()
        for k in draws:
            if f.get(k) is not None:
                draws[k].append(f[k])
    return {f"{k}_ci": ([round(float(np.percentile(values, 2.5)), 4), round(float(np.percentile(values, 97.5)), 4)]
                        if values else None) for k, values in draws.items()}


def pooled(per_image: list[dict], resamples: int, seed: int = 0) -> dict:
    """The headline metrics of the images of several world seeds together (their counts summed), with
    a bootstrap interval over all of them."""
    import warnings

    from bench.quality.metrics import Tally

    t = Tally()
    for n in per_image:
        for k, v in n.items():
            t.n[k] += v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figures = {k: t.figures().get(k) for k, _ in HEADLINE}
    return {**figures, "images": len(per_image), **intervals(per_image, resamples, seed)}


# ---------------------------------------------------------------------------------- main
@dataclass
class Stage3Result:
    """Everything stage 3 measured (stage3.json)."""

    size: str
    noise: str
    rounds: int
    seconds: dict = field(default_factory=dict)
    cpu_seconds: dict = field(default_factory=dict)
    pretrain: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)  # {arm, round, view, metrics}
    health: list = field(default_factory=list)  # {arm, round, health} of every trained model
    runs: list = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    world_seed: int | None = None
    worlds: list = field(default_factory=list)  # several world seeds: each one's Stage3Result (rows: its own figures)


def _cpu() -> float:
    from bench.quality.run import cpu_seconds

    return cpu_seconds()


def arm_outs(s3: Path, model: str) -> dict[str, dict[str, Path]]:
    """The arms' OUTs, per pretrained model (another pretraining recipe is another set of runs)."""
    return {arm: {split: s3 / "runs" / model / arm / split for split in ("train", "heldout")}
            for arm in ("rounds", "clean", "pretrained")}


def _parse_sets(items: list[str], what: str) -> dict:
    out: dict = {}
    _apply_sets(out, items)
    unknown = set(out) - set(__import__("refine.trainer", fromlist=["TrainConfig"]).TrainConfig.model_fields)
    if unknown:
        raise SystemExit(f"{what}: unknown refine.train key(s) {sorted(unknown)}")
    return out


def main(argv: list[str] | None = None) -> Stage3Result:
    from bench.quality import run

    ap = argparse.ArgumentParser(prog="python -m bench.quality.stage3", description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_const", dest="size", const="small", default="default", help="smoke size (test suite)")
    ap.add_argument("--work", default=None, help="the stage-1/2 benchmark's work folder (default out/quality[-small]); "
                    "stage 3 writes into <work>/stage3 (with --world-seeds: <work>/w<seed>/...)")
    ap.add_argument("--noise", choices=run.NOISES, default="mild", help="specialists' noise level")
    ap.add_argument("--rounds", type=int, default=None, help="refinement rounds (default: the size's)")
    ap.add_argument("--arms", default="rounds,clean,pretrained", help="comma-separated arms besides stage 2")
    ap.add_argument("--refine-set", action="append", default=[], metavar="KEY=VALUE",
                    help="set a key of the rounds' refine: block (YAML value), e.g. cross_fit.folds=3")
    ap.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                    help="set a key of the pretraining's refine.train config (YAML value), e.g. steps=800")
    ap.add_argument("--pretrain-images", type=int, default=None, help="images of the pretraining world (default: the size's)")
    ap.add_argument("--world-seeds", default=None, help="comma-separated world seeds, each a world of its own "
                    "(<work>/w<seed>), pooled in the tables (default: the size's one world)")
    ap.add_argument("--jobs", type=int, default=1, help="world seeds run in parallel (after their stage 1/2)")
    ap.add_argument("--results", default=None, help="folder for stage3.json + stage3.md "
                    "(default: bench/quality/results for the default size, else <work>/stage3)")
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    size = replace(size, pretrain={**size.pretrain, **_parse_sets(args.pretrain_set, "--pretrain-set")},
                   pretrain_images=args.pretrain_images or size.pretrain_images)
    rounds = args.rounds if args.rounds is not None else size.rounds
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - {"rounds", "clean", "pretrained"}
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {sorted(unknown)}; choose from rounds, clean, pretrained")
    small = args.size == "small"
    work = Path(args.work or REPO / "out" / ("quality-small" if small else "quality")).resolve()
    results_dir = Path(args.results) if args.results else (work / "stage3" if small else HERE / "results")
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    task = {"size_name": args.size, "size": size, "noise": args.noise, "rounds": rounds, "arms": arms,
            "refine_sets": args.refine_set}
    if args.world_seeds is None:
        res = run_world({**task, "work": work, "world_seed": None, "clip_cache": None})
    else:
        seeds = [int(x) for x in args.world_seeds.split(",") if x.strip()]
        t_all, cpu_all = time.perf_counter(), _cpu()
        tasks = [{**task, "work": work / f"w{w}", "world_seed": w, "clip_cache": work / "clip_cache"} for w in seeds]
        for t in tasks:  # stage 1/2 one world after the other: the CLIP scorer is trained once, then reused
            ensure_base(t["work"], args.noise, small, lambda m, w=t["world_seed"]: print(f"[stage3 w{w}] {m}", flush=True),
                        world_seed=t["world_seed"], clip_cache=t["clip_cache"])
        if args.jobs > 1 and len(tasks) > 1:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
                worlds = list(pool.map(run_world, tasks))
        else:
            worlds = [run_world(t) for t in tasks]
        res = combine(worlds, size.bootstrap)
        res.seconds["total"] = round(time.perf_counter() - t_all, 1)
        res.cpu_seconds["total"] = round(_cpu() - cpu_all, 1)  # the parent and its finished workers
    written = write_outputs(res, results_dir)
    print(f"[stage3] done in {res.seconds['total']} s ({res.cpu_seconds['total']} CPU s); wrote "
          f"{', '.join(map(str, written))}", flush=True)
    return res


def run_world(task: dict) -> Stage3Result:
    """Stage 3 on one world: pretraining, the arms, their held-out scores (rows keep the per-image counts)."""
    from bench.quality import run
    from bench.quality.metrics import read_version
    from bench.quality.world import WorldConfig, image_dir, load_truth, write_world

    work, size, rounds, arms, noise = task["work"], task["size"], task["rounds"], task["arms"], task["noise"]
    small = task["size_name"] == "small"
    s3 = work / "stage3"
    res = Stage3Result(task["size_name"], noise, rounds, world_seed=task["world_seed"])
    t_all, cpu_all = time.perf_counter(), _cpu()
    tag = "" if task["world_seed"] is None else f" w{task['world_seed']}"
    say = lambda msg: print(f"[stage3{tag} {time.perf_counter() - t_all:7.1f}s] {msg}", flush=True)  # noqa: E731

    def phase(name: str, t0: float, c0: float) -> None:
        res.seconds[name] = round(time.perf_counter() - t0, 1)
        res.cpu_seconds[name] = round(_cpu() - c0, 1)

    t0, c0 = time.perf_counter(), _cpu()
    base = ensure_base(work, noise, small, say, world_seed=task["world_seed"], clip_cache=task["clip_cache"])
    phase("stage12", t0, c0)

    # 1. pretraining world -> stage 1 + 2 -> Florence-2 from random weights
    t0, c0 = time.perf_counter(), _cpu()
    main_world = json.loads((work / "world" / "world.json").read_text())["config"]
    wcfg = {k: tuple(v) if isinstance(v, list) else v for k, v in main_world.items()}
    pre_world_cfg = replace(WorldConfig(**wcfg), seed=wcfg["seed"] + PRETRAIN_SEED_OFFSET, n_train=size.pretrain_images, n_heldout=0)
    pre_world = s3 / f"pretrain_world_{size.pretrain_images}"
    write_world(pre_world, pre_world_cfg)
    yaml_path = s3 / f"stage3-pretrain{size.pretrain_images}.yaml"  # per pretraining world: runs may share <work>
    cfg = stage3_config(base, noise, pre_world, None, size, rounds, task["refine_sets"])
    yaml_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    pre_out = s3 / f"pretrain_{size.pretrain_images}"
    res.runs.append(run.run_engine(str(yaml_path), "pretrain_base", str(image_dir(pre_world, "train")), str(pre_out)))
    say(f"pretraining labels: {size.pretrain_images} images through stage 1 + 2 in {pre_out}")
    model_dir, summary = pretrain(pre_out, cfg, size, asdict(pre_world_cfg), say)
    res.pretrain = {"images": size.pretrain_images, "world_seed": pre_world_cfg.seed, "model": str(model_dir),
                    "world": asdict(pre_world_cfg),
                    "train": size.pretrain, "summary": {k: summary.get(k) for k in (
                        "steps", "first_loss", "last_loss", "best_step", "best_val_loss", "val_loss", "samples_per_s",
                        "validation", "lr")},
                    "health": {k: v for k, v in (summary.get("health") or {}).items() if k != "generations"}}
    phase("pretrain", t0, c0)
    cfg = stage3_config(base, noise, pre_world, model_dir, size, rounds, task["refine_sets"])
    yaml_path = s3 / f"stage3-{model_dir.name}.yaml"
    yaml_path.write_text("# written by python -m bench.quality.stage3 from <work>/pipelines.yaml\n"
                         + yaml.safe_dump(cfg, sort_keys=False))

    # 2. the arms: train OUTs seeded with the stage-1/2 OUT's committed folders, held-out OUTs relabel only
    outs = arm_outs(s3, model_dir.name)
    shared = ["images", "quarantine", "annotations/ocr", "annotations/stage1", "annotations/stage2"]
    base_out = {split: run.out_dir(work, noise, "full", split) for split in ("train", "heldout")}
    for arm in arms:
        t0, c0 = time.perf_counter(), _cpu()
        train_out, held_out = outs[arm]["train"], outs[arm]["heldout"]
        if arm != "pretrained":
            run.seed_out(base_out["train"], train_out, ["images", "quarantine"] if arm == "clean" else shared)
            pipe = "clean" if arm == "clean" else "rounds"
            res.runs.append(run.run_engine(str(yaml_path), pipe, str(image_dir(work / "world", "train")), str(train_out)))
            say(f"{arm}: {rounds} round(s) trained in {train_out}")
            run.seed_models(train_out, held_out, rounds)
        else:
            copy_model(model_dir, held_out / "models" / "round1")
        run.seed_out(base_out["heldout"], held_out, shared)
        res.runs.append(run.run_engine(str(yaml_path), "pretrained" if arm == "pretrained" else "rounds",
                                       str(image_dir(work / "world", "heldout")), str(held_out)))
        say(f"{arm}: held-out images relabelled in {held_out}")
        phase(arm, t0, c0)

    # 3. scores on the held-out images
    t0, c0 = time.perf_counter(), _cpu()
    truth = load_truth(work / "world")
    metrics, tallies = score(read_version(base_out["heldout"], "stage2"), truth, size.bootstrap)
    res.rows.append({"arm": "stage 2", "round": 0, "view": "dataset", "metrics": metrics, "tallies": tallies})
    for arm in arms:
        held_out = outs[arm]["heldout"]
        for k in range(1, (1 if arm == "pretrained" else rounds) + 1):
            records = read_version(held_out, f"round{k}")
            for view, recs in (("dataset", records), ("model", model_view(records, k))):
                metrics, tallies = score(recs, truth, size.bootstrap)
                res.rows.append({"arm": arm, "round": k, "view": view, "metrics": metrics, "tallies": tallies})
            # the verdict that decided what merged is the train OUT's (its models made the train labels;
            # the held-out OUT reuses the same models, so its health is the same figures)
            manifest = json.loads((held_out / "manifest.json").read_text())
            health = ((manifest.get("rounds") or {}).get(str(k)) or {}).get("health") or {}
            res.health.append({"arm": arm, "round": k, "health": health})
    phase("score", t0, c0)
    res.seconds["total"] = round(time.perf_counter() - t_all, 1)
    res.cpu_seconds["total"] = round(_cpu() - cpu_all, 1)
    res.machine = run.machine_info()
    if task["world_seed"] is not None:
        write_outputs(res, s3)  # this world's own tables, next to its runs
    return res


def combine(worlds: list[Stage3Result], resamples: int) -> Stage3Result:
    """Several worlds' results as one: each headline figure pooled over every world's held-out images
    (counts summed, one bootstrap over all images), the worlds kept as they are in `worlds`."""
    first = worlds[0]
    res = Stage3Result(first.size, first.noise, first.rounds, worlds=worlds, machine=first.machine)
    for i, row in enumerate(first.rows):
        tallies = [n for w in worlds for n in w.rows[i]["tallies"]]
        res.rows.append({"arm": row["arm"], "round": row["round"], "view": row["view"],
                         "metrics": {**pooled(tallies, resamples), "box_map": float(np.mean(
                             [w.rows[i]["metrics"].get("box_map") or 0.0 for w in worlds]))}})
    for w in worlds:
        for name, v in w.cpu_seconds.items():
            res.cpu_seconds[f"w{w.world_seed} {name}"] = v
            res.seconds[f"w{w.world_seed} {name}"] = w.seconds.get(name)
    return res


# ------------------------------------------------------------------------------ outputs
ARM_LABEL = {"stage 2": "stage 2 (no round)", "pretrained": "pretrained model", "rounds": "rounds (filtered labels)",
             "clean": "rounds (clean labels: bound)"}


def _ci(m: dict, key: str) -> str:
    v, ci = m.get(key), m.get(f"{key}_ci")
    if v is None:
        return "-"
    return f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:.3f}"


def tables(res: Stage3Result) -> str:
    """Markdown: held-out figures per arm and round, dataset view then model view (pooled over the world
    seeds when there are several, then each world's headline); pretraining; health; costs."""
    out = [SMOKE_BANNER] if res.size == "small" else []
    images = next((r["metrics"].get("images") for r in res.rows), "?")
    seeds = [w.world_seed for w in res.worlds]
    where = f"world seeds {', '.join(map(str, seeds))} pooled" if seeds else f"world seed {res.world_seed or 0}"
    for view, title in (("dataset", "the labels the engine keeps (annotations/round<k>)"),
                        ("model", "the round's model alone (its relabels, before filters and merge)")):
        out.append(f"**Held-out ({images} images, {where}), {res.noise} noise: {title}.** Mean [95% bootstrap "
                   "interval over images].\n")
        out.append("| arm | round | " + " | ".join(label for _, label in HEADLINE) + (" | box mAP (mean of seeds) |" if seeds else " | box mAP |"))
        out.append("|---|---|" + "---|" * (len(HEADLINE) + 1))
        for row in res.rows:
            if row["view"] != view and not (row["arm"] == "stage 2" and view == "dataset"):
                continue
            m = row["metrics"]
            out.append(f"| {ARM_LABEL[row['arm']]} | {row['round']} | " + " | ".join(_ci(m, k) for k, _ in HEADLINE)
                       + f" | {m.get('box_map', float('nan')):.3f} |")
        out.append("")
    worlds = res.worlds or [res]
    if seeds:
        keys = (("obj_precision", "box P"), ("obj_recall", "box R"), ("brief_object_precision", "brief mention P"),
                ("brief_coverage", "brief coverage"), ("ocr_recall", "OCR R"))
        out.append("**Per world seed** (held-out, each world's own images; dataset view / model view):\n")
        out.append("| world | arm | round | " + " | ".join(f"{label} (dataset / model)" for _, label in keys) + " |")
        out.append("|---|---|---|" + "---|" * len(keys))
        for w in worlds:
            by = {(r["arm"], r["round"], r["view"]): r["metrics"] for r in w.rows}
            for (arm, k, view), m in by.items():
                if view != "dataset":
                    continue
                model = by.get((arm, k, "model"), {})
                cell = lambda key: " / ".join("-" if x.get(key) is None else f"{x[key]:.3f}" for x in (m, model) if x)  # noqa: E731
                out.append(f"| {w.world_seed} | {ARM_LABEL[arm]} | {k} | " + " | ".join(cell(key) for key, _ in keys) + " |")
        out.append("")
    for w in worlds:
        p = w.pretrain
        h, s = p.get("health") or {}, p.get("summary") or {}
        tasks = h.get("tasks") or {}
        od = tasks.get("<OD>") or {}
        out.append(f"**Pretraining**{f' (world {w.world_seed})' if seeds else ''} ({p.get('images')} images of world seed "
                   f"{p.get('world_seed')}, {s.get('steps')} steps, lr {s.get('lr')}, recipe {json.dumps(p.get('train'), sort_keys=True)}): "
                   f"loss {s.get('first_loss') or float('nan'):.3f} -> {s.get('last_loss') or float('nan'):.3f}, best validation "
                   f"loss {s.get('best_val_loss') or float('nan'):.3f} at step {s.get('best_step')}; health on its "
                   f"{h.get('images')} validation images: <OD> box recall {h.get('box_recall')}, box precision "
                   f"{h.get('box_precision')}, <OD> distinct {od.get('distinct')}, parse rate {od.get('parse_rate')}, mention "
                   f"precision {h.get('mention_precision')}; per task: "
                   + json.dumps({t: {k: v for k, v in f.items() if k in ("distinct", "parse_rate", "mention_precision")}
                                 for t, f in tasks.items()}, sort_keys=True) + "\n")
    out.append("**Round health** (refine.health, on each round's validation images; `dropped`: whose relabels the "
               "check dropped, `model` = all of them):\n")
    out.append("| world | arm | round | ok | dropped | failed checks | box recall | box precision | mention precision |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for w in worlds:
        for row in w.health:
            h = row["health"]
            fig = lambda k: "-" if h.get(k) is None else f"{h[k]:.3f}"  # noqa: E731
            dropped = "model" if h.get("model_failed") else (", ".join(h.get("dropped_tasks") or []) or "-")
            out.append(f"| {w.world_seed if w.world_seed is not None else 0} | {ARM_LABEL[row['arm']]} | {row['round']} | "
                       f"{h.get('ok')} | {dropped} | {'; '.join(h.get('failed') or []) or '-'} | "
                       f"{fig('box_recall')} | {fig('box_precision')} | {fig('mention_precision')} |")
    out.append("")
    out.append("**Cost** (CPU seconds of this process and its workers; wall seconds measured under other load):\n")
    out.append("| part | CPU s | wall s |")
    out.append("|---|---|---|")
    for k in res.cpu_seconds:
        out.append(f"| {k} | {res.cpu_seconds[k]} | {res.seconds.get(k)} |")
    return "\n".join(out) + "\n"


def _plain(res: Stage3Result) -> dict:
    """The result as JSON, without the per-image counts."""
    d = asdict(res)
    for r in [d, *d["worlds"]]:
        for row in r["rows"]:
            row.pop("tallies", None)
    return d


def write_outputs(res: Stage3Result, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    js, md = folder / "stage3.json", folder / "stage3.md"
    js.write_text(json.dumps(_plain(res), indent=1, default=str))
    md.write_text(tables(res))
    return [js, md]


if __name__ == "__main__":
    main(sys.argv[1:])
