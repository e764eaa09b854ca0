"""Cross-fitted relabelling (issue 17 item 4, refine.crossfit): the round's images in k folds by image-id
hash, fold model i trains on the other folds and relabels fold i, so no image is relabelled by a model
that saw its own noisy labels; the round's published model still trains on every image.

Input: real photos + a COCO file with one human box and caption each (tests/helpers.coco_input); model:
the tiny random Florence-2 trained a few steps (what it says does not matter; who says it does).
"""
from __future__ import annotations

import copy
import hashlib
import json

import pytest

from engine import identity
from engine.config import ConfigError, load_pipeline
from engine.views.query import run_query
from engine.run import run_pipeline
from engine.stage import decode_image
from engine.store import ShardStore
from helpers import TRAIN_FOLDER, coco_input, write_train_store
from refine.crossfit import CrossFitSettings, OutsideFold, fold_of
from schemas.records import empty_record, make_ann_id, new_annotation, source_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PIPELINE = """
models:
  florence2: random:tiny
pipelines:
  crossfit:
    ingest: {shard_size: 2}
    steps:
      - name: filtered
        stages:
          - {stage: text_filter}
          - {stage: region_filter, params: {min_score: {object: null, text: null}}}
    rounds: ROUNDS
    refine:
      model: florence2
      cross_fit: FOLDS
      train_tasks: ["<CAPTION>", "<OD>"]
      train: {steps: 12, batch_size: 4, lr: 1.0e-3, warmup_steps: 1, checkpoint_every: 6, log_every: 3}
      relabel: {tasks: [caption, od], batch_size: 2, max_new_tokens: 16, num_beams: 1}
      # a few steps from random weights: the health check would refuse every model; it is about who relabels here
      health: {min_distinct: null, max_same_across_tasks: null, min_parse_rate: null}
"""


def _pipeline(tmp_path, rounds=2, folds="2"):
    path = tmp_path / f"p_{rounds}_{folds.replace(' ', '')}.yaml"
    path.write_text(PIPELINE.replace("ROUNDS", str(rounds)).replace("FOLDS", folds))
    return load_pipeline(path, "crossfit")


def _fold(image_id: str, k: int) -> int:
    """The fold of an image, written out again here (not refine.crossfit's function)."""
    return int(hashlib.sha256(f"fold:{image_id}".encode()).hexdigest()[:15], 16) % k


def _records(photos, n: int) -> tuple[list[dict], dict[str, bytes]]:
    human = source_of("human")
    records, images = [], {}
    for name in list(photos)[:n]:
        data = photos[name]
        iid = hashlib.sha256(data).hexdigest()
        w, h = decode_image(data).size
        rec = empty_record({"image_id": iid, "uri": name, "width": w, "height": h, "source": "t"})
        rec["texts"] = [new_annotation(human, ann_id=make_ann_id(iid, "t", "text", 0), tier="brief", text=f"a photo {name}")]
        rec["regions"] = [new_annotation(human, 1.0, ann_id=make_ann_id(iid, "t", "r", 0), kind="object",
                                         box=[0.0, 0.0, w / 2, h / 2], quad=None, polygon=None, mask=None, label="thing",
                                         brief=None)]
        records.append(rec)
        images[iid] = data
    return records, images


# ------------------------------------------------------------------------------ fast
def test_the_default_rule_and_the_yaml_spellings(tmp_path):
    auto = CrossFitSettings()
    assert auto.folds == "auto" and [auto.resolve(n) for n in (8, 31, 32, 5000)] == [0, 0, 2, 2]
    assert CrossFitSettings(folds=3).resolve(10) == 3 and CrossFitSettings(folds=3).resolve(2) == 0
    assert CrossFitSettings(folds=0).resolve(10**6) == 0
    from engine.registry import rounds_plan

    plans = {spelling: rounds_plan(_pipeline(tmp_path, folds=spelling))
             for spelling in ("2", "{folds: 2}", "auto", "0", "{folds: auto, min_images: 4}")}
    assert plans["2"].cfg.cross_fit == plans["{folds: 2}"].cfg.cross_fit == CrossFitSettings(folds=2)
    # the settings are part of the round's identity: another cross-fit, another round hash
    hashes = {s: identity.round_hash("in", p.identity(), {"ref": "m"}, 1) for s, p in plans.items()}
    assert hashes["2"] == hashes["{folds: 2}"] and len(set(hashes.values())) == 4
    with pytest.raises(ConfigError, match=r"refine\.cross_fit\.folds: .*integer >= 2"):
        rounds_plan(_pipeline(tmp_path, folds="1"))
    # the plan: one job per fold (on the other folds' images), then the round's model on every image
    jobs = plans["2"].train_jobs(1, start_ref="random:tiny", input_folder="annotations/filtered",
                                 model_folder="models/round1", config_hash="h", data_hash="d", folds=2)
    assert [(j.name, j.model_folder, j.params["fold"]) for j in jobs] == [
        ("round1-fold0-train", "models/round1-folds/fold0", {"fold": 0, "folds": 2}),
        ("round1-fold1-train", "models/round1-folds/fold1", {"fold": 1, "folds": 2}),
        ("round1-train", "models/round1", None)]


def test_a_round_whose_hash_folds_leave_one_empty_relabels_without_cross_fitting(tmp_path, photos, caplog):
    """Folds are drawn by image-id hash: on a small input every image can land in one fold, and that
    fold's model would have nothing to train on (it stopped the run with NoExamplesError)."""
    from engine.registry import rounds_plan

    records, images = _records(photos, len(photos))
    by_fold = {f: [r for r in records if _fold(r["image_id"], 2) == f] for f in (0, 1)}
    one_sided = max(by_fold.values(), key=len)[:3]
    plan = rounds_plan(_pipeline(tmp_path, folds="2"))
    store = write_train_store(tmp_path / "one", one_sided, images, 2)
    with caplog.at_level("WARNING"):
        assert plan.folds(store, TRAIN_FOLDER) == 0
    assert "holds none of the 3 images" in caplog.text and "without cross-fitting" in caplog.text
    both = by_fold[0][:2] + by_fold[1][:1]
    assert plan.folds(write_train_store(tmp_path / "both", both, images, 2), TRAIN_FOLDER) == 2


def test_a_fold_model_never_draws_nor_validates_on_its_fold(tmp_path, photos):
    from refine.dataset import ShardStream, validation_split
    from schemas.task_codec import TaskCodec

    records, images = _records(photos, 8)
    store = write_train_store(tmp_path, records, images, 8)  # one shard: none is validation only
    ids = [r["image_id"] for r in records]
    assert [fold_of(i, 2) for i in ids] == [_fold(i, 2) for i in ids]
    for fold in (0, 1):
        keep = OutsideFold(fold, 2)
        others = {i for i in ids if _fold(i, 2) != fold}
        held, n = validation_split(store, TRAIN_FOLDER, 0.1, 1, 64, keep=keep)
        val = {i for v in held.values() for i in v}
        assert n == len(others) and len(val) == 1 and val <= others
        stream = ShardStream(store, TRAIN_FOLDER, store.shards(TRAIN_FOLDER), TaskCodec(["<CAPTION>", "<OD>"]),
                             exclude=frozenset(val), keep=keep)
        drawn = {ex.image_id for step in range(30) for ex in stream.batch(step, 0, 4)}
        assert drawn == others - val


def _fold_model(folder, summary: dict) -> None:
    from annotators.florence2_model import Florence2Model

    Florence2Model.load("random:tiny").save(folder)
    (folder / "train_summary.json").write_text(json.dumps(summary))


def _says(who: str):
    """generate_scored of a model that answers every caption with `a photo by <who>` and every <OD> with one box."""
    from annotators.florence2_scores import Generated

    def generate_scored(images, task, text_inputs=None, **_):
        text = f"a photo by {who}" if task == "<CAPTION>" else "thing<loc_100><loc_100><loc_500><loc_500>"
        return [Generated(f"</s><s>{text}</s>", text, [(0, len(text))], [-0.1], [5], True) for _ in images]

    return generate_scored


def test_each_image_is_relabelled_by_its_folds_model_and_a_failed_fold_drops_its_own(tmp_path, photos):
    """Two fold models (the random tiny Florence-2 saved twice): fold 0's summary fails the health check,
    fold 1's passes; each image's annotations name its fold's model and carry round.fold; only fold 0's
    captions (the task that failed) are dropped `round:unhealthy_model`; generation is sized per fold from its own training targets."""
    from refine.relabel import RefineRelabeler

    records, images = _records(photos, 6)
    folds = {_fold(r["image_id"], 2) for r in records}
    assert folds == {0, 1}, "the photos should fall in both folds"
    healthy = {"checked": True, "images": 4, "tasks": {"<CAPTION>": {"distinct": 1.0}}}
    collapsed = {"checked": True, "images": 4, "tasks": {"<CAPTION>": {"distinct": 0.0, "distinct_generations": 1,
                                                                       "distinct_targets": 4}}}
    root = tmp_path / "out" / "models"
    _fold_model(root / "round1-folds" / "fold0", {"health": collapsed, "generation_tokens": {"<CAPTION>": 5}})
    _fold_model(root / "round1-folds" / "fold1", {"health": healthy, "generation_tokens": {"<CAPTION>": 7}})
    store = ShardStore(tmp_path / "out")
    stage = RefineRelabeler({"model": "models/round1", "model_store": store.spec(), "round": 1, "folds": 2,
                             "tasks": ["caption", "od"], "batch_size": 6, "num_beams": 1, "max_new_tokens": 6})
    stage.setup()
    assert [m.florence.token_limits for m in stage.members] == [{"<CAPTION>": 5}, {"<CAPTION>": 6}]  # 7 capped at 6
    for member in stage.members:  # each model says who it is (a random model mostly says <loc_*> tokens only)
        member.florence.generate_scored = _says(f"model {member.fold}")
    out = stage.process_batch(copy.deepcopy(records), [decode_image(images[r["image_id"]]) for r in records])
    seen = set()
    for rec in out:
        fold = _fold(rec["image_id"], 2)
        assert [t["text"] for t in rec["texts"]] == [f"a photo by model {fold}"] and len(rec["regions"]) == 1
        for ann in rec["texts"] + rec["regions"]:
            assert ann["source"]["model"] == f"models/round1-folds/fold{fold}"
            assert ann["checks"]["round.fold"] == fold and ann["round"] == 1
            # fold 0's model failed at <CAPTION> only: its captions are dropped, its boxes merge
            failed = fold == 0 and ann in rec["texts"]
            assert (ann["status"], ann["reason"]) == (("dropped", "round:unhealthy_model") if failed else ("kept", None))
        seen.add(fold)
    assert seen == {0, 1}


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def coco(tmp_path_factory, photos):
    return coco_input(photos, tmp_path_factory.mktemp("coco_in"), both_folds=True)


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, coco):
    import torch

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("crossfit")
    out = tmp / "out"
    summary = run_pipeline(_pipeline(tmp), str(coco), str(out))
    return out, summary


def _refine_rows(out, step):
    q = ("SELECT image_id, round, model, checks['round.fold'] AS fold, text || ' ' || score AS what FROM texts "
         "WHERE annotator = 'refine' UNION ALL SELECT image_id, round, model, checks['round.fold'], "
         "label || ' ' || CAST(box AS VARCHAR) || ' ' || score FROM regions WHERE annotator = 'refine' ORDER BY ALL")
    return run_query(out, q, step=step)[1]


@pytest.mark.slow
def test_two_cross_fitted_rounds(two_rounds):
    """Every relabelled annotation of both rounds was made by the fold model of its image, which trained on the
    other fold only; the published models trained on every image; SQL shows round 1 and round 2 differ."""
    out, summary = two_rounds
    store = ShardStore(out)
    ids = sorted(r["image_id"] for s in store.shards("images") for r in store.read_shard("images", s, columns=["image_id"]).to_pylist())
    assert len(ids) == 4 and {_fold(i, 2) for i in ids} == {0, 1}
    for k, metrics in enumerate(summary.rounds, start=1):
        assert metrics["cross_fit"] == {"folds": 2, "fold_models": [f"models/round{k}-folds/fold{i}" for i in (0, 1)]}
        assert [f["fold"] for f in metrics["health"]["folds"]] == [0, 1]
        published = store.read_json(f"models/round{k}/train_summary.json")
        assert "cross_fit" not in published and sum(published["validation"][x] for x in ("images", "train_images")) == 4
        for i in (0, 1):
            fold_summary = store.read_json(f"models/round{k}-folds/fold{i}/train_summary.json")
            assert fold_summary["cross_fit"] == {"fold": i, "folds": 2}
            # it trained and validated on the other fold's images only
            assert sum(fold_summary["validation"][x] for x in ("images", "train_images")) == sum(_fold(j, 2) != i for j in ids)
        rows = [r for r in _refine_rows(out, f"round{k}") if r[1] == k]
        assert {r[0] for r in rows} == set(ids)  # every image relabelled
        for image_id, _, model, fold, _ in rows:
            assert (model, fold) == (f"models/round{k}-folds/fold{_fold(image_id, 2)}", _fold(image_id, 2))
    # round 2 started from round 1's published model and trained on round 1's merged labels
    marker = store.read_json("models/round2/round.json")
    assert marker["data_hash"] == identity.digest({s: r["sha256"] for s, r in store.committed("annotations/round1").items()})
    r2 = _refine_rows(out, "round2")
    by_round = {k: [(r[0], r[4]) for r in r2 if r[1] == k] for k in (1, 2)}
    assert by_round[1] and by_round[2] and by_round[1] != by_round[2]


@pytest.mark.slow
def test_a_round_killed_between_folds_resumes_without_retraining_them(tmp_path, coco, two_rounds, monkeypatch):
    """The run dies in fold 1's training (after its step-6 checkpoint): the rerun trains neither fold 0 again
    nor fold 1 from scratch, and round 1 equals that of the run never interrupted."""
    from helpers import assert_close
    from refine.trainer import Florence2Trainer

    fit = Florence2Trainer.fit
    calls: list[tuple[str, int | None]] = []

    def dying_fit(self, store, job, world, stop_after=None):
        calls.append((job.name, None))
        if job.name == "round1-fold1-train" and len(calls) < 3:
            fit(self, store, job, world, stop_after=6)
            raise KeyboardInterrupt("killed between two checkpoints of fold 1")
        return fit(self, store, job, world, stop_after)

    monkeypatch.setattr(Florence2Trainer, "fit", dying_fit)
    pipeline, out = _pipeline(tmp_path, rounds=1), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(pipeline, str(coco), str(out))
    fold0 = (out / "models/round1-folds/fold0/model.safetensors").stat().st_mtime_ns
    assert [c[0] for c in calls] == ["round1-fold0-train", "round1-fold1-train"]
    run_pipeline(pipeline, str(coco), str(out))
    assert [c[0] for c in calls[2:]] == ["round1-fold1-train", "round1-train"]  # fold 0 not trained again
    assert (out / "models/round1-folds/fold0/model.safetensors").stat().st_mtime_ns == fold0
    store, ref = ShardStore(out), ShardStore(two_rounds[0])
    assert store.read_json("models/round1-folds/fold1/train_summary.json")["resumed_from"] == 6
    for folder in ("models/round1-folds/fold0", "models/round1-folds/fold1", "models/round1"):
        assert (out / folder / "model.safetensors").read_bytes() == (two_rounds[0] / folder / "model.safetensors").read_bytes()
    assert store.shards("annotations/round1") == ref.shards("annotations/round1")
    for shard in ref.shards("annotations/round1"):
        assert_close(store.read_shard("annotations/round1", shard).to_pylist(),
                     ref.read_shard("annotations/round1", shard).to_pylist(), shard)


@pytest.mark.slow
def test_a_seeded_model_relabels_every_image_itself(tmp_path, coco, two_rounds):
    """An OUT given round 1's published model from another OUT (the benchmark's held-out images: models/round1
    copied, no checkpoints, no round.json) trains nothing and relabels every image with that model, no folds."""
    import shutil

    out = tmp_path / "heldout"
    shutil.copytree(two_rounds[0] / "models/round1", out / "models/round1",
                    ignore=shutil.ignore_patterns("checkpoints", "round.json"))
    summary = run_pipeline(_pipeline(tmp_path, rounds=1), str(coco), str(out))
    assert summary.rounds[0]["cross_fit"] == {"folds": 0, "fold_models": []}
    assert not (out / "models/round1-folds").exists() and not (out / "models/round1/checkpoints").exists()
    assert {r[2] for r in _refine_rows(out, "round1")} == {"models/round1"}


def test_the_rounds_health_is_its_fold_models(tmp_path):
    """With folds, the fold models made the labels: their checks decide the round's verdict and message."""
    from engine.registry import rounds_plan

    plan = rounds_plan(_pipeline(tmp_path, rounds=1))
    store = ShardStore(tmp_path / "out")
    figures = {"checked": True, "images": 3, "tasks": {"<OD>": {"distinct": 1.0, "parse_rate": 0.2}}}
    store.write_json("models/round1/train_summary.json", {"health": {**figures, "tasks": {"<OD>": {"distinct": 1.0}}}})
    store.write_json("models/round1-folds/fold0/train_summary.json", {"health": {**figures, "tasks": {"<OD>": {"distinct": 1.0}}}})
    store.write_json("models/round1-folds/fold1/train_summary.json", {"health": figures})
    plan.cfg.health.min_parse_rate = 0.5
    health = plan.metrics(store, "annotations/round1", 1, {}, folds=2)["health"]
    assert not health["ok"] and health["failed"] == ["fold 1: <OD> parse rate 0.20 < 0.5"]
    assert [(f["fold"], f["ok"]) for f in health["folds"]] == [(0, True), (1, False)]
    assert health["dropped_tasks"] == ["<OD>"] and len(health["messages"]) == 1
    assert health["messages"][0].startswith("round 1: fold model 1 failed the <OD> health check (<OD> parse rate 0.20")
    assert plan.metrics(store, "annotations/round1", 1, {}, folds=0)["health"]["ok"]  # the published model alone passes
    store.write_json("models/round1-folds/fold1/train_summary.json", {"health": {**figures, "images": 1}})
    health = plan.metrics(store, "annotations/round1", 1, {}, folds=2)["health"]
    assert health["ok"] and not health["checked"] and "validation images per fold: 3, 1" in health["messages"][0]
