"""Local, Ray and Beam runners write the same shards from the same real photos and models.

One real local Ray cluster for the module; Beam runs in-process (FnApiRunner). Pipeline:
step `annotate` = real RapidOCR + Florence-2 (`random:tiny`, deterministic weights) and step
`measure` = a CPU-only stage defined here (needs pixels; a Ray task, not an actor).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from engine import registry
from engine.config import load_pipeline
from engine.views.query import run_query
from engine.run import run_pipeline
from engine.stage import Resources, Stage, StageParams
from engine.store import ShardStore
from helpers import assert_close as _close
from schemas.records import make_ann_id, new_annotation, source_of
from schemas.validate import validate_table

SHARD_SIZE = 2


class TextContrastParams(StageParams):
    min_contrast: float = 10.0
    fail_on_uri: str | None = None  # raise (not record) on this image: exercises Beam's dead-letter path


class TextContrastFilter(Stage):
    """Pixel contrast (std of gray levels) inside each OCR text box; low-contrast boxes are dropped."""

    name = "text_contrast"
    Params = TextContrastParams
    default_resources = Resources(cpus=0.5, batch_size=3)
    needs_images = True
    uses_model = False

    def process_batch(self, records, images):
        for rec, data in zip(records, images):
            if self.params.fail_on_uri and rec["uri"].endswith(self.params.fail_on_uri):
                raise RuntimeError(f"refusing {rec['uri']}")
            gray = np.asarray(data.convert("L"), dtype=np.float32)
            for ann in rec["regions"]:
                x0, y0, x1, y1 = (int(round(v)) for v in ann["box"])
                crop = gray[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
                contrast = float(crop.std()) if crop.size else 0.0
                ann["checks"][f"{self.name}.contrast"] = contrast
                if ann["status"] == "kept" and contrast < self.params.min_contrast:
                    ann["status"], ann["reason"] = "dropped", f"{self.name}:low_contrast"
        return records


class BrightnessModel(Stage):
    """A "model" stage (Ray runs it on an actor pool) asking for more than a GPU-less 2-CPU cluster has:
    a GPU and 2 CPUs for each of 2 actors. Writes each image's mean brightness as a caption."""

    name = "brightness_model"
    Params = StageParams
    default_resources = Resources(cpus=2.0, gpus=1.0, batch_size=2, concurrency=2)
    needs_images = True
    uses_model = True

    def process_batch(self, records, images):
        for rec, image in zip(records, images):
            value = float(np.asarray(image.convert("L"), dtype=np.float32).mean())
            rec["texts"].append(new_annotation(source_of(self.name), ann_id=make_ann_id(rec["image_id"], self.name, "text", 0),
                                               tier="brief", text=f"brightness {value:.1f}"))
        return records


@pytest.fixture(scope="module", autouse=True)
def test_stage_registered():
    """Register the test stages; Ray workers get their classes by value (this module is not importable there)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    registry.STAGES["text_contrast"] = f"{__name__}:TextContrastFilter"
    registry.STAGES["brightness_model"] = f"{__name__}:BrightnessModel"
    yield
    registry.STAGES.pop("text_contrast", None)
    registry.STAGES.pop("brightness_model", None)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    temp = tempfile.mkdtemp(prefix="fldray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def rendered_text_png() -> bytes:
    img = Image.new("RGB", (420, 140), "white")
    d = ImageDraw.Draw(img)
    d.text((20, 20), "FLORENCE DATA", fill="black", font=ImageFont.load_default(size=36))
    d.text((20, 80), "ENGINE 2026", fill=(30, 30, 120), font=ImageFont.load_default(size=36))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("runner_inputs")
    names = ["coffee", "rocket", "chelsea"] + [n for n in photos if n.startswith("jpeg_")][:2]
    for n in names:
        (d / f"{n}.img").write_bytes(photos[n])
        os.rename(d / f"{n}.img", d / (f"{n}.png" if photos[n][:4] == b"\x89PNG" else f"{n}.jpg"))
    (d / "text_sign.png").write_bytes(rendered_text_png())
    # an exact copy of an image of the first chunk, listed last: a duplicate ACROSS ingest chunks,
    # found after the workers ingested their chunks (the first copy in input order wins)
    (d / "zz_copy_of_coffee.png").write_bytes(photos["coffee"])
    return d


PIPELINE_YAML = f"""
models:
  ocr: rapidocr
  florence2: random:tiny
pipelines:
  equal:
    ingest: {{shard_size: {SHARD_SIZE}}}
    steps:
      - name: annotate
        stages:
          - {{stage: ocr, params: {{model: ocr, batch_size: 2, threads: 1}}}}
          - {{stage: florence2, params: {{model: florence2, tasks: [caption, od], max_new_tokens: 12, num_beams: 1, batch_size: 2}}}}
      - name: measure
        stages:
          - {{stage: text_contrast, params: {{min_contrast: 20.0}}}}
  deadletter:
    ingest: {{shard_size: {SHARD_SIZE}}}
    steps:
      - name: measure
        stages:
          - {{stage: text_contrast, params: {{fail_on_uri: rocket.png}}}}
  greedy:
    ingest: {{shard_size: {SHARD_SIZE}}}
    steps:
      - name: bright
        stages:
          - {{stage: brightness_model}}
"""


@pytest.fixture(scope="module")
def pipelines_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("runner_cfg") / "pipelines.yaml"
    p.write_text(PIPELINE_YAML)
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory, input_dir, pipelines_file, ray_cluster):
    """The same pipeline on the same photos with each runner: {runner: (out dir, summary)}."""
    import torch

    torch.set_num_threads(1)
    out = {}
    for runner in ("local", "ray", "beam"):
        dest = tmp_path_factory.mktemp(f"out_{runner}")
        pipe = load_pipeline(pipelines_file, "equal")
        out[runner] = (dest, run_pipeline(pipe, str(input_dir), str(dest), runner=runner))
    return out


def _without_seconds(counters: dict) -> dict:
    return {stage: {k: v for k, v in c.items() if k != "seconds"} for stage, c in counters.items()}


def test_same_images_and_quarantine_on_every_runner(runs):
    """Ingest ran on each runner's workers: the same images/, quarantine/ and counters everywhere."""
    local = ShardStore(runs["local"][0])
    ingest = runs["local"][1].ingest
    assert (ingest["inputs"], ingest["images"], ingest["duplicates"], ingest["quarantined"]) == (7, 6, 1, 0)
    assert local.shards("images") == local.shards("inputs") == [f"part-{i:05d}" for i in range(4)]
    dup = run_query(runs["local"][0], "SELECT uri, reason, detail FROM quarantine")[1]
    assert len(dup) == 1 and dup[0][0].endswith("zz_copy_of_coffee.png") and dup[0][1] == "duplicate"
    assert "coffee.png" in dup[0][2] and "earlier input chunk" in dup[0][2]
    for runner in ("ray", "beam"):
        other = ShardStore(runs[runner][0])
        assert runs[runner][1].ingest == ingest, runner
        for folder in ("images", "quarantine"):
            assert other.shards(folder) == local.shards(folder)
            for shard in local.shards(folder):
                assert other.read_shard(folder, shard).equals(local.read_shard(folder, shard)), f"{runner}:{folder}/{shard}"
                assert other.commit_record(folder, shard)["runner"] == runner


def test_same_shards_rows_and_counters_on_every_runner(runs):
    local_out, local_summary = runs["local"]
    local = ShardStore(local_out)
    assert local_summary.ingest["images"] == 6 and len(local.shards("images")) == 4
    for step in ("annotate", "measure"):
        folder = f"annotations/{step}"
        shards = local.shards(folder)
        assert shards == ["part-00000", "part-00001", "part-00002", "part-00003"]  # the last one is empty
        for runner in ("ray", "beam"):
            other = ShardStore(runs[runner][0])
            assert other.shards(folder) == shards, f"{runner} {folder}"
            for shard in shards:
                a, b = local.read_shard(folder, shard), other.read_shard(folder, shard)
                validate_table(b, name=f"{runner}:{folder}/{shard}")
                assert b.schema.equals(a.schema)
                _close(a.to_pylist(), b.to_pylist(), f"{runner}:{folder}/{shard}")
                rec_a, rec_b = local.commit_record(folder, shard), other.commit_record(folder, shard)
                assert rec_b["runner"] == runner and rec_a["runner"] == "local"
                assert rec_b["config_hash"] == rec_a["config_hash"] and rec_b["rows"] == rec_a["rows"]
                assert _without_seconds(rec_b["counters"]) == _without_seconds(rec_a["counters"])
        assert _without_seconds(runs["ray"][1].steps[step]["counters"]) == _without_seconds(local_summary.steps[step]["counters"])


def test_real_content_reaches_every_runner(runs):
    """OCR read the rendered sign, Florence-2 captioned every image, the CPU stage measured pixels."""
    sql_regions = ("SELECT image_id, ann_id, kind, label, box, score, status, reason FROM regions "
                   "WHERE annotator = 'ocr' ORDER BY ann_id")
    sql_captions = "SELECT image_id, ann_id, tier, text FROM texts ORDER BY ann_id"
    results = {}
    for runner, (out, _) in runs.items():
        results[runner] = (run_query(out, sql_regions, "measure")[1], run_query(out, sql_captions, "annotate")[1])
    ocr_rows, captions = results["local"]
    labels = " ".join(r[3] for r in ocr_rows).upper()
    assert "FLORENCE" in labels and "2026" in labels, labels
    assert {r[6] for r in ocr_rows} <= {"kept", "dropped"}
    assert len({c[0] for c in captions}) == 6 and all(c[2] == "brief" for c in captions)
    for runner in ("ray", "beam"):
        _close(results[runner][0], ocr_rows, runner)
        assert results[runner][1] == captions
    measured = run_query(runs["ray"][0], "SELECT count(*) FROM regions WHERE checks['text_contrast.contrast'] IS NOT NULL", "measure")[1]
    assert measured[0][0] == run_query(runs["ray"][0], "SELECT count(*) FROM regions", "measure")[1][0][0] > 0


def test_observability(runs):
    ray_out, beam_out = runs["ray"][0], runs["beam"][0]
    # both steps ran as ONE Ray Data execution; two 1-CPU model pools do not fit beside the read on 2 CPUs,
    # so (fuse: auto) every stage of the segment, and each step's commit, ran in one fused task
    stats = (ray_out / "logs" / "annotate+measure.ray-stats.txt").read_text()
    assert "MapBatches(FusedOcrFlorence2TextContrast)" in stats, stats
    assert "Actor" not in stats and not (ray_out / "logs" / "measure.ray-stats.txt").exists()
    manifest = json.loads((ray_out / "manifest.json").read_text())
    assert sum(manifest["engine_metrics"]["annotate"]["nodes"]["ocr"].values()) == 6
    manifest = json.loads((beam_out / "manifest.json").read_text())
    metrics = manifest["engine_metrics"]["annotate"]
    assert metrics["runner"] == "beam" and metrics["ocr"]["records"] == 6 and metrics["florence2"]["records"] == 6
    assert metrics["write"] == {"shards": 4, "records": 6}
    assert manifest["counters"]["annotate"]["ocr"]["records_in"] == 6


def test_beam_dead_letter_keeps_the_record_with_its_error(tmp_path, input_dir, pipelines_file):
    out = tmp_path / "beam_dead"
    summary = run_pipeline(load_pipeline(pipelines_file, "deadletter"), str(input_dir), str(out), runner="beam")
    store = ShardStore(out)
    rows = [r for s in store.shards("annotations/measure") for r in store.read_shard("annotations/measure", s).to_pylist()]
    assert len(rows) == 6 and len({r["image_id"] for r in rows}) == 6
    bad = [r for r in rows if r["uri"].endswith("rocket.png")]
    assert len(bad) == 1 and bad[0]["errors"][0]["stage"] == "text_contrast"
    assert "refusing" in bad[0]["errors"][0]["error"]
    assert all(not r["errors"] for r in rows if r is not bad[0])
    counters = summary.steps["measure"]["counters"]["text_contrast"]
    # the stage itself redoes a failing batch record by record (engine.stage.Stage._isolated, every
    # runner): the record carries its error and Beam's own dead-letter path is not needed
    assert counters["records_in"] == 6 and counters["errors"] == 1 and "dead_letter" not in counters
    assert 1 <= counters["metrics"]["records_isolated"] <= 3  # the failing batch (batch_size 3) redone


def test_runner_resumes_committed_shards_of_another_runner(tmp_path, runs, input_dir, pipelines_file):
    """Half the shards committed by local, the rest by Ray: skipped vs run, and `runner` says who wrote which."""
    out = tmp_path / "mixed"
    shutil.copytree(runs["local"][0], out)
    store = ShardStore(out)
    for folder in ("annotations/annotate", "annotations/measure"):
        for shard in ("part-00001", "part-00002"):
            store.delete(f"{folder}/{shard}.parquet")
    summary = run_pipeline(load_pipeline(pipelines_file, "equal"), None, str(out), runner="ray")
    assert summary.steps["annotate"]["shards_run"] == 2 and summary.steps["annotate"]["shards_skipped"] == 2
    writers = {s: r["runner"] for s, r in store.committed("annotations/annotate").items()}
    assert writers == {"part-00000": "local", "part-00001": "ray", "part-00002": "ray", "part-00003": "local"}
    local = ShardStore(runs["local"][0])
    for shard in writers:
        _close(local.read_shard("annotations/measure", shard).to_pylist(), store.read_shard("annotations/measure", shard).to_pylist())


@pytest.mark.slow
def test_quickstart_pipeline_gives_the_same_annotations_on_every_runner(tmp_path_factory, ray_cluster):
    """The shipped quickstart pipeline (offline profile: real OCR, SSD objects, GrabCut masks, composed
    captions and groundings; its refinement round left out) on real photos: detector scores, grounding
    boxes and masks equal on every runner, because every runner cuts a shard into the same batches and
    limits threads to the stage's CPUs."""
    from engine.samples import write_samples

    src = tmp_path_factory.mktemp("qs_in")
    for path in write_samples(tmp_path_factory.mktemp("qs_all"))[:5]:
        shutil.copy(path, src / path.name)
    pipe_file = os.path.join(os.path.dirname(__file__), "..", "pipelines.yaml")
    outs = {}
    for runner in ("local", "ray", "beam"):
        pipe = load_pipeline(pipe_file, "quickstart", "offline")
        pipe.config.ingest.shard_size = 2
        pipe.config.rounds = 0  # stage 3 on every runner is test_rounds' subject
        outs[runner] = tmp_path_factory.mktemp(f"qs_{runner}")
        run_pipeline(pipe, str(src), str(outs[runner]), runner=runner)
    local = ShardStore(outs["local"])
    for folder in ("annotations/stage1", "annotations/stage2"):
        shards = local.shards(folder)
        assert len(shards) == 3
        rows = [r for s in shards for r in local.read_shard(folder, s).to_pylist()]
        assert sum(len(r["regions"]) for r in rows) and sum(len(r["groundings"]) for r in rows)
        for runner in ("ray", "beam"):
            other = ShardStore(outs[runner])
            _close(rows, [r for s in shards for r in other.read_shard(folder, s).to_pylist()], f"{runner}:{folder}")


def test_fit_actor_cpus_leaves_room_for_read_and_write_tasks():
    from engine.runners.ray_runner import fit_actor_cpus

    assert fit_actor_cpus([(0.5, 1), (0.25, 2)], 2.0) == ([0.5, 0.25], False)  # 1.0 <= 2 - 0.5
    assert fit_actor_cpus([(2.0, 2)], 2.0) == ([0.75], True)  # 4 asked, 1.5 left: 2 x 0.75
    assert fit_actor_cpus([(1.0, 2), (1.0, 1)], 2.0) == ([0.5, 0.5], True)  # 3 asked -> 1.5
    assert fit_actor_cpus([(4.0, 2)], 8.0) == ([3.5], True)  # big machines keep a whole core
    assert fit_actor_cpus([(2.0, 3)], 8.0) == ([2.0], False)


@pytest.mark.timeout(600)
class _Model(Stage):
    uses_model = True


def _stages(*resources: Resources) -> list[Stage]:
    return [type(f"S{k}", (_Model,), {"name": f"s{k}", "default_resources": r})() for k, r in enumerate(resources)]


def test_a_local_ray_instance_keeps_idle_task_workers(monkeypatch):
    """Ray kills idle workers beyond num_workers_soft_limit (default: the CPU count); with actors holding the
    CPU slots every 0.25-CPU read / commit task then started a fresh process. A local instance keeps 4 per CPU;
    a limit the user set in the environment wins."""
    from engine.runners.ray_runner import local_system_config

    monkeypatch.delenv("RAY_num_workers_soft_limit", raising=False)
    assert local_system_config(2) == {"_system_config": {"num_workers_soft_limit": 8}}
    assert local_system_config(0.5) == {"_system_config": {"num_workers_soft_limit": 2}}
    assert local_system_config(None)["_system_config"]["num_workers_soft_limit"] == 4 * (os.cpu_count() or 1)
    monkeypatch.setenv("RAY_num_workers_soft_limit", "3")
    assert local_system_config(2) == {}
    monkeypatch.delenv("RAY_num_workers_soft_limit")

    import ray

    from engine.runners.ray_runner import RayRunner

    calls = []  # what connect() hands ray.init: the local instance it starts gets the setting, a cluster does not
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    RayRunner(num_cpus=2).connect()
    RayRunner(address="auto").connect()
    assert calls[0]["_system_config"] == {"num_workers_soft_limit": 8} and "_system_config" not in calls[1], calls


def test_fuse_plan_fuses_model_stages_only_where_their_pools_do_not_fit():
    from engine.runners.ray_runner import fuse_plan

    one, half, gpu = Resources(cpus=1.0), Resources(cpus=0.5), Resources(cpus=1.0, gpus=1.0)
    cpu_only = type("C", (Stage,), {"name": "c"})()
    two = _stages(one, one) + [cpu_only]
    assert fuse_plan(two, "auto", 2.0) == [([0, 1, 2], True)]  # 2 CPUs asked, 1.5 beside the read: one process
    assert fuse_plan(two, "auto", 8.0) == [([0], False), ([1], False), ([2], False)]  # room: a pool per stage
    assert fuse_plan(_stages(half, half), "auto", 2.0) == [([0], False), ([1], False)]  # 1 CPU fits
    assert fuse_plan(_stages(Resources(cpus=2.0, concurrency=2)), "auto", 2.0) == [([0], False)]  # nothing to fuse
    assert fuse_plan(_stages(half, half), "always", 64.0) == [([0, 1], True)]
    assert fuse_plan(two, "never", 2.0) == [([0], False), ([1], False), ([2], False)]
    # a GPU stage keeps its own pool on a GPU cluster and cuts the fused runs; on a CPU-only cluster it fuses
    mixed = _stages(one, gpu, one, one)
    assert fuse_plan(mixed, "always", 2.0, cluster_gpus=1.0) == [([0], True), ([1], False), ([2, 3], True)]
    assert fuse_plan(mixed, "always", 2.0) == [([0, 1, 2, 3], True)]
    with pytest.raises(ValueError, match="ray fuse: 'sometimes' is not one of auto, always, never"):
        fuse_plan(two, "sometimes", 2.0)


def test_ray_runs_gpu_stages_on_cpu_and_scales_actor_cpus(tmp_path, input_dir, pipelines_file, ray_cluster,
                                                          caplog, monkeypatch):
    """On the GPU-less 2-CPU cluster, 2 actors asking for a GPU and 2 CPUs each would never start (the job
    hangs silently): the runner drops the GPU request with a warning and scales the actors to 0.75 CPUs."""
    import logging

    import ray.data

    from engine.runners.ray_runner import StageActor

    asked = []
    real_map_batches = ray.data.Dataset.map_batches

    def recording_map_batches(self, fn, *args, **kwargs):
        if isinstance(fn, type) and issubclass(fn, StageActor):
            asked.append({k: kwargs.get(k) for k in ("num_cpus", "num_gpus")})
            # fail now, not after a silent hang: these actors could never be scheduled here
            assert not kwargs.get("num_gpus") and kwargs.get("num_cpus", 1) * 2 <= 1.5, asked
        return real_map_batches(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", recording_map_batches)
    caplog.set_level(logging.WARNING, logger="engine.runners.ray_runner")
    out = tmp_path / "greedy"
    summary = run_pipeline(load_pipeline(pipelines_file, "greedy"), str(input_dir), str(out), runner="ray")
    assert asked == [{"num_cpus": 0.75, "num_gpus": None}]
    warnings = [r.getMessage() for r in caplog.records]
    assert any("brightness_model asks for 1.0 GPU(s) but the cluster has none; running it on CPU" in w for w in warnings)
    assert any("scaled to [0.75] CPUs per actor" in w for w in warnings), warnings
    assert summary.steps["bright"]["counters"]["brightness_model"]["records_out"] == 6
    texts = run_query(out, "SELECT text FROM texts WHERE annotator = 'brightness_model'")[1]
    assert len(texts) == 6 and all(t[0].startswith("brightness ") for t in texts)
