"""The label-quality benchmark, stages 1 + 2, one command (from the repository root):

    python -m bench.quality                 # default size: 3 world x 2 specialist seeds -> BENCHMARKS.md + bench/quality/results/
    python -m bench.quality --small         # smoke size (the test suite runs it); outputs stay in --work, with a banner
    python -m bench.quality --world-seeds 0,1,2 --specialist-seeds 1,2   # the seeds (the defaults)

Per world seed (in parallel, `--jobs`): write the world (train + held-out splits), copy the CLIP scorer
(trained once on its own world, cached by configuration: clip_train.py) and measure its held-out AUC per
pair type; a clip_score rule whose pair type is below `--auc-min` is switched off in the pipelines. Then per
specialist seed x noise level, with the engine (engine.run.run_pipeline, what `fld run` calls) on the
held-out split: `base_<noise>` (OCR + simulated specialists + the engine's filters; OCR is computed once per
world seed and copied into the other OUTs: seed_out), `vote_<noise>` (three independently seeded simulated
detectors fused by the `vote` filter), `base_<noise>` on a labelled 20% subset of the train split whose truth
plays the `human` sample of `fld calibrate` (engine.views.calibrate), and `base_<noise>` on the held-out split again
with the calibration's overlay as `--profile` (stage 1 copied, stage 2 recomputed). Every dataset version and
the controls (oracle filter, random drop: controls.py) are scored against the truth; report.py writes the
tables with intervals, the per-rule fate table, PR curves, the calibration table and the Parquet dump.

Stage 3 (refinement rounds) is measured by `python -m bench.quality.stage3`, which reuses effective_config,
seed_out, seed_models and run_engine from here.
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


def effective_config(work: Path, size: Size, thresholds: dict, rounds: int, specialist_seed: int | None = None,
                     clip_off: tuple[str, ...] = ()) -> dict:
    """bench/quality/pipelines.yaml with this run's paths, CLIP cuts and size; `specialist_seed`
    replaces every simulated specialist's seed (the ensemble's extra detectors get seed + 1000 k);
    `clip_off`: clip_score rules ("region", "text") switched off (held-out AUC below AUC_MIN)."""
    cfg = copy.deepcopy(yaml.safe_load(TEMPLATE.read_text()))
    cfg["models"]["clip"] = str(work / "models" / "clip")
    cfg["models"]["florence2"] = f"random:{HERE / size.florence2}"
    cfg.pop("profiles", None)  # the size already chose the model
    reseeded: set[int] = set()
    for spec in _stages(cfg):
        params = spec.setdefault("params", {})
        if "world" in params:
            params["world"] = str(work / "world")
        if spec["stage"] == "clip_score":
            params["min_score"] = {k: None if k in clip_off else thresholds.get(k) for k in ("region", "text")}
        offset = params.pop("seed_offset", 0)  # (YAML aliases: a shared stage is seen once with its offset)
        if specialist_seed is not None and "seed" in params and id(params) not in reseeded:
            params["seed"] = specialist_seed + 1000 * offset
            reseeded.add(id(params))
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


def run_engine(yaml_path: str, pipeline: str, src: str, out: str, runner: str = "local", profile: str | None = None) -> dict:
    """One `fld run` driven from this process on `runner` (with `--profile profile`): (seconds, the run summary)."""
    from engine.config import load_pipeline
    from engine.run import run_pipeline

    t0 = time.perf_counter()
    summary = run_pipeline(load_pipeline(yaml_path, pipeline, profile), src, out, runner=runner)
    return {"pipeline": pipeline, "out": out, "seconds": round(time.perf_counter() - t0, 2), "rounds": summary.rounds}


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def out_dir(work: Path, noise: str, arm: str, split: str) -> Path:
    return work / "runs" / noise / arm / split


# ---------------------------------------------------------------------------- machine
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


# ---------------------------------------------------------------- stage 1 + 2 over seeds
AUC_MIN = 0.65  # a clip_score rule whose CLIP pair type has held-out ROC AUC below this is switched off
CLIP_RULES = {"region": ("region", "ocr"), "text": ("caption",)}  # rule -> the CLIP pair types it reads
CALIB_SHARE = 0.2  # share of the train split's images whose truth plays the `human` sample of `fld calibrate`
TARGET = 0.9  # the calibration's target precision


def clip_switch(heldout_auc: dict, auc_min: float = AUC_MIN) -> dict[str, dict]:
    """rule -> {on, auc (the lowest of its pair types)}: a rule is off when a pair type it reads is below auc_min."""
    out = {}
    for rule, types in CLIP_RULES.items():
        aucs = [heldout_auc.get(t, {}).get("auc") for t in types]
        low = min((a for a in aucs if a is not None), default=None)
        out[rule] = {"auc": low, "types": {t: a for t, a in zip(types, aucs)}, "on": low is not None and low >= auc_min}
    return out


def seed_dir(work: Path, world_seed: int, specialist_seed: int) -> Path:
    return work / f"w{world_seed}" / f"s{specialist_seed}"


def truth_as_human(records: list[dict], truth: dict) -> list[dict]:
    """The records with their image's truth added as `human` annotations (object boxes with their
    category, text lines with their quad and text): the labelled sample `fld calibrate` reads."""
    from bench.quality.world import truth_of
    from engine.ingest.human import HUMAN
    from schemas.records import make_ann_id, new_annotation, source_of

    src = source_of(HUMAN, "world-truth", None, {})
    out = copy.deepcopy(records)
    for rec in out:
        t = truth_of(truth, rec["uri"])
        for k, o in enumerate(t["objects"]):
            rec["regions"].append(new_annotation(src, ann_id=make_ann_id(rec["image_id"], HUMAN, "object", k),
                                                 kind="object", box=o["box"], label=o["category"]))
        for k, line in enumerate(t["texts"]):
            from schemas.geometry import quad_to_box

            rec["regions"].append(new_annotation(src, ann_id=make_ann_id(rec["image_id"], HUMAN, "text", k), kind="text",
                                                 box=quad_to_box(line["quad"]), quad=line["quad"], label=line["text"]))
    return out


def world_task(task: dict) -> dict:
    """Everything of one world seed (run in a worker): world, CLIP, and per specialist seed x noise the
    stage-1 + 2 run on the held-out split (OCR computed once, copied), the ensemble run, the
    calibration on a labelled train subset and the held-out run with its overlay; then the measures."""
    from bench.quality import controls
    from bench.quality.clip_train import train_clip
    from bench.quality.metrics import evaluate
    from bench.quality.world import load_truth, write_world
    from engine.store import ShardStore

    work, size = Path(task["work"]), task["size"]
    w, t_start = task["world_seed"], time.perf_counter()
    wdir = work / f"w{w}"
    write_world(wdir / "world", replace(size.world, seed=w))
    clip = train_clip(wdir / "world", wdir / "models" / "clip", size.clip, log=lambda m: None, cache=work / "clip_cache")
    switch = clip_switch({k: v for k, v in clip["auc"]["heldout"].items()}, task["auc_min"])
    off = tuple(r for r, s in switch.items() if not s["on"])
    truth = load_truth(wdir / "world")
    heldout_src = str(image_dir(wdir / "world", "heldout"))
    # the labelled train subset: CALIB_SHARE of the train images, in their own input folder (same file names)
    calib_src = wdir / "calib_images"
    if not calib_src.is_dir():
        files = sorted(p for p in Path(image_dir(wdir / "world", "train")).iterdir() if p.is_file())
        calib_src.mkdir(parents=True)
        for p in files[: max(2, round(len(files) * CALIB_SHARE))]:
            shutil.copy2(p, calib_src / p.name)
    shared = ["images", "quarantine", "annotations/ocr"]
    first: dict[str, Path] = {}
    result = {"world_seed": w, "clip": {k: clip[k] for k in ("auc", "thresholds", "reused", "key")}, "switch": switch,
              "runs": [], "measures": [], "errors": []}

    def engine(yaml_path, pipeline, src, out, seed_from=None, folders=shared, profile=None):
        if seed_from is not None:
            seed_out(seed_from, out, folders)
        elif src in first:
            seed_out(first[src], out, shared)
        r = run_engine(str(yaml_path), pipeline, src, str(out), task["runner"], profile)
        first.setdefault(src, out)
        result["runs"].append(r)
        return r

    for s in task["specialist_seeds"]:
        sdir = seed_dir(work, w, s)
        sdir.mkdir(parents=True, exist_ok=True)
        cfg = effective_config(wdir, size, clip["thresholds"], size.rounds, specialist_seed=s, clip_off=off)
        yaml_path = sdir / "pipelines.yaml"
        yaml_path.write_text("# written by python -m bench.quality from bench/quality/pipelines.yaml\n" + yaml.safe_dump(cfg, sort_keys=False))
        for noise in NOISES:
            tag = {"world_seed": w, "specialist_seed": s, "noise": noise}
            try:
                base = out_dir(sdir, noise, "full", "heldout")
                engine(yaml_path, f"base_{noise}", heldout_src, base)
                vote = out_dir(sdir, noise, "vote", "heldout")
                engine(yaml_path, f"vote_{noise}", heldout_src, vote)
                # calibration: fld calibrate's function on the labelled train subset, its overlay on held-out
                calib_out = out_dir(sdir, noise, "full", "calib")
                engine(yaml_path, f"base_{noise}", str(calib_src), calib_out)
                cal_info = calibrate_run(calib_out, truth, sdir / f"calibrated_{noise}.yaml")
                cal_heldout = out_dir(sdir, noise, "calibrated", "heldout")
                engine(yaml_path, f"base_{noise}", heldout_src, cal_heldout, seed_from=base,
                       folders=shared + ["annotations/stage1"], profile=str(sdir / f"calibrated_{noise}.yaml"))
                config = ShardStore(base).read_manifest()["pipeline"]["config"]
                stage2 = read_version_full(base, "stage2")
                correct = controls.label_records(stage2, truth)
                vote2 = read_version_full(vote, "stage2")
                vote_correct = controls.label_records(vote2, truth)
                cal2 = read_version_full(cal_heldout, "stage2")
                stage1 = controls.all_kept(stage2)
                versions_ = {"specialists": stage1, "+ filters": stage2, "oracle filter (control)": controls.oracle_version(stage2, correct),
                             "random drop, same keep rate (control)": controls.random_version(stage1, stage2, seed=1000 * w + s),
                             "ensemble of 3 detectors + vote": vote2, "+ filters, calibrated overlay": cal2}
                measure_ = {"tag": tag, "versions": {}, "counts": {}, "keep": {}}
                for name, recs in versions_.items():
                    measure_["versions"][name] = evaluate(recs, truth)
                    measure_["counts"][name] = controls.image_counts(recs, truth)
                    measure_["keep"][name] = controls.keep_counts(recs)
                measure_["fate"] = {f"{k[0]}|{k[1]}": v for k, v in controls.fate_rows(stage2, correct).items()}
                measure_["rules"] = controls.rule_values(stage2, correct, config)
                measure_["calibration"] = cal_info
                measure_["dump"] = dump_rows(tag, {"stage2": (stage2, correct), "vote_stage2": (vote2, vote_correct),
                                                   "calibrated_stage2": (cal2, controls.label_records(cal2, truth))})
                result["measures"].append(measure_)
            except Exception as exc:  # noqa: BLE001 - the other seeds go on; the report names this one
                result["errors"].append({**tag, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["cpu_seconds"] = cpu_seconds()
    return result


def calibrate_run(out: Path, truth: dict, overlay_path: Path) -> dict:
    """`fld calibrate`'s function (engine.views.calibrate) on the stage-2 records of the labelled train subset
    with their truth as `human` annotations; writes the overlay; returns the per-rule figures."""
    from engine.views.calibrate import calibrate, overlay_yaml
    from engine.store import ShardStore

    records = truth_as_human(read_version_full(out, "stage2"), truth)
    config = ShardStore(out).read_manifest()["pipeline"]["config"]
    cal = calibrate(None, records=records, config=config, target=TARGET)
    overlay_path.write_text(overlay_yaml(cal, None, f"{out} (truth of {len(records)} train images as human)"))
    return {"images": cal.images, "labelled": cal.labelled, "target": cal.target,
            "rules": [{k: r[k] for k in ("stage", "rule", "type", "value_of", "keeps", "n", "correct", "auc", "auc_ci",
                                         "current", "now", "fitted", "at_fitted", "decision", "why")} for r in cal.rules]}


def read_version_full(out, step: str) -> list[dict]:
    """The image records of one dataset version of OUT with image_id, as engine.views.calibrate.human_records reads them."""
    from engine.views.query import open_views

    con = open_views(out, step)
    try:
        cur = con.execute("SELECT image_id, uri, width, height, texts, regions, groundings FROM records ORDER BY image_id")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]  # checks as dicts (DuckDB MAP), as fld calibrate reads them
    finally:
        con.close()


def dump_rows(tag: dict, versions_: dict) -> list[dict]:
    """One row per scored annotation of each dataset version: the compact dump (results/annotations.parquet)."""
    import json

    from bench.quality.controls import _annotations

    rows = []
    for version, (records, correct) in versions_.items():
        for rec, _list, a, kind in _annotations(records):
            rows.append({**tag, "version": version, "image": os.path.basename(rec["uri"]), "type": kind,
                         "annotator": (a.get("source") or {}).get("annotator"), "ann_id": a["ann_id"],
                         "text": a.get("label") or a.get("text") or a.get("phrase"), "score": a.get("score"),
                         "status": a.get("status"), "reason": a.get("reason"), "correct": correct.get(a["ann_id"]),
                         "checks": json.dumps(a.get("checks") or {}, sort_keys=True)})
    return rows


@dataclass
class SeedsResult:
    size: str
    world_seeds: list
    specialist_seeds: list
    auc_min: float
    resamples: int
    worlds: list = field(default_factory=list)  # world_task results (counts as arrays)
    seconds: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    specialists: dict = field(default_factory=dict)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> SeedsResult:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description="The label-quality benchmark, stages 1 + 2 "
                                 "over world x specialist seeds with controls and intervals (stage 3: python -m bench.quality.stage3).")
    size_group = ap.add_mutually_exclusive_group()
    size_group.add_argument("--small", action="store_const", dest="size", const="small", help="smoke size (test suite)")
    size_group.add_argument("--gpu", action="store_const", dest="size", const="gpu", help="the size for a GPU machine")
    ap.add_argument("--work", default=None, help="work folder; default out/quality[-small|-gpu]")
    ap.add_argument("--world-seeds", default=None, help="comma-separated world seeds (default 0,1,2; --small 0)")
    ap.add_argument("--seed", type=int, default=None, help="one world seed (the same as --world-seeds N)")
    ap.add_argument("--specialist-seeds", default=None, help="comma-separated specialist seeds (default 1,2; --small 1)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="world seeds run in parallel")
    ap.add_argument("--auc-min", type=float, default=AUC_MIN, help="clip_score rules whose held-out AUC is below this are off")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--runner", choices=("local", "ray", "beam"), default="local", help="the engine's runner for every run")
    ap.add_argument("--report", default=None, help="Markdown to update (default: BENCHMARKS.md for the default size only)")
    ap.add_argument("--results", default=None, help="folder for results.json, tables, plots, the dump "
                    "(default: bench/quality/results for the default size, else <work>)")
    args = ap.parse_args(argv)
    size_name = args.size or "default"
    size = SIZES[size_name]
    small = size_name == "small"
    world_seeds = _ints(args.world_seeds or (str(args.seed) if args.seed is not None else ("0" if small else "0,1,2")))
    spec_seeds = _ints(args.specialist_seeds or ("1" if small else "1,2"))
    work = Path(args.work or REPO / "out" / ("quality" if size_name == "default" else f"quality-{size_name}")).resolve()
    results_dir = Path(args.results) if args.results else (HERE / "results" if size_name == "default" else work)
    report = Path(args.report) if args.report else (REPO / "BENCHMARKS.md" if size_name == "default" else None)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    res = SeedsResult(size_name, world_seeds, spec_seeds, args.auc_min, args.resamples)
    t_all = time.perf_counter()
    say = lambda msg: print(f"[quality {time.perf_counter() - t_all:7.1f}s] {msg}", flush=True)  # noqa: E731
    from bench.quality.clip_train import train_clip
    from bench.quality.world import write_world

    # the CLIP is trained once (cached by its configuration) before the world seeds run in parallel
    w0 = work / f"w{world_seeds[0]}"
    write_world(w0 / "world", replace(size.world, seed=world_seeds[0]))
    t0 = time.perf_counter()
    train_clip(w0 / "world", w0 / "models" / "clip", size.clip, log=say, cache=work / "clip_cache")
    res.seconds["clip"] = round(time.perf_counter() - t0, 1)
    tasks = [{"work": str(work), "size": size, "world_seed": w, "specialist_seeds": spec_seeds, "auc_min": args.auc_min,
              "runner": args.runner} for w in world_seeds]
    t0 = time.perf_counter()
    if args.jobs <= 1 or len(tasks) == 1:
        res.worlds = [world_task(t) for t in tasks]
    else:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(threads,)) as pool:
            res.worlds = list(pool.map(world_task, tasks))
    res.seconds["engine_and_measures"] = round(time.perf_counter() - t0, 1)
    for wr in res.worlds:
        say(f"world seed {wr['world_seed']}: {len(wr['measures'])} runs measured, {len(wr['errors'])} failed, {wr['seconds']} s")
    res.specialists = specialist_params(yaml.safe_load(TEMPLATE.read_text()))
    res.seconds["total"] = round(time.perf_counter() - t_all, 1)
    res.machine = machine_info()
    from bench.quality.report import write_outputs

    written = write_outputs(res, results_dir, report)
    say(f"done in {res.seconds['total']} s ({res.machine['cpu_seconds']} CPU s); wrote {', '.join(str(p) for p in written)}")
    errors = [e for wr in res.worlds for e in wr["errors"]]
    if errors:
        for e in errors:
            print(e["traceback"], file=sys.stderr)
        raise SystemExit(f"{len(errors)} seed run(s) failed: " + "; ".join(f"w{e['world_seed']} s{e['specialist_seed']} {e['noise']}: {e['error']}" for e in errors))
    return res
