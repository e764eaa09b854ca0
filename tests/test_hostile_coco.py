"""One bad COCO record never blocks a run (issue 11 item 3): each broken annotation is refused at
import with a reason naming the file and the annotation id, the image comes in with its other
annotations, `fld run` finishes, the refusals are counted by `fld stats` and found with SQL."""
from __future__ import annotations

import json
import logging
import random
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.ingest.coco import CocoError, parse_coco_json, read_coco
from engine.ingest.human import human_annotations
from engine.stage import records_to_table
from schemas.geometry import mask_to_rle
from schemas.records import empty_record
from schemas.validate import validate_table

PIPELINES = """
pipelines:
  filter_only:
    ingest: {shard_size: 2}
    steps:
      - name: stage2
        stages:
          - {stage: region_filter}
"""
DOG, COFFEE, CAT, ASTRONAUT = 7, 9, 11, 13  # image ids of the COCO file
SIZES = {DOG: (768, 576), COFFEE: (600, 400), CAT: (451, 300), ASTRONAUT: (512, 512)}
NAN, INF = float("nan"), float("inf")

# id -> (image_id, annotation fields, why it must be refused): every class of broken record
BAD = {
    101: (DOG, {"category_id": 1, "bbox": [NAN, 10, 20, 20]}, "non-finite"),
    102: (DOG, {"category_id": 1, "bbox": [10, 10, INF, 20]}, "non-finite"),
    103: (DOG, {"category_id": 1, "bbox": [10, 10, 20, -INF]}, "non-finite"),
    104: (DOG, {"category_id": 1, "bbox": [10, 10, -5, 20]}, "negative width or height"),
    105: (DOG, {"category_id": 1, "bbox": [10, 10, 20, -0.5]}, "negative width or height"),
    106: (DOG, {"category_id": 1, "bbox": ["10", 10, 20, 20]}, "non-numeric"),
    107: (DOG, {"category_id": 1, "bbox": [None, 10, 20, 20]}, "non-numeric"),
    108: (DOG, {"category_id": 1, "bbox": [True, 10, 20, 20]}, "non-numeric"),
    109: (DOG, {"category_id": 1, "bbox": [10, 10, 20]}, "must have 4 numbers"),
    110: (DOG, {"category_id": 1, "bbox": [10, 10, 20, 20, 30]}, "must have 4 numbers"),
    111: (DOG, {"category_id": 1, "bbox": "10 10 20 20"}, "must be a list"),
    112: (DOG, {"category_id": 1, "bbox": {"x": 10}}, "must be a list"),
    113: (COFFEE, {"category_id": 2, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 5, 1, 5]]}, "odd number"),
    114: (COFFEE, {"category_id": 2, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, "5", 1, 5, 5]]}, "non-numeric"),
    115: (COFFEE, {"category_id": 2, "bbox": [1, 1, 5, 5], "segmentation": [1, 1, 5, 1, 5, 5]}, "must be a list"),
    116: (COFFEE, {"category_id": 2, "bbox": [1, 1, 5, 5], "segmentation": [[0, 0, 1e9, 0, 1e9, 1e9]]},
          "outside"),
    117: (COFFEE, {"category_id": 2, "bbox": [1, 1, 5, 5], "segmentation": [[1, 2]]}, "no ring with at least 3"),
    118: (COFFEE, {"category_id": 2, "bbox": [1, 1, 5, 5], "segmentation": "polygon"}, "neither"),
    119: (COFFEE, {"category_id": 2, "segmentation": mask_to_rle(np.ones((10, 10), bool))},
          "differs from the image's [400, 600]"),
    120: (COFFEE, {"category_id": 2, "segmentation": {"size": [400, 600], "counts": "ZZZZ"}}, "end inside"),
    121: (COFFEE, {"category_id": 2, "segmentation": {"size": [400, 600], "counts": [5, 5]}}, "adding up"),
    122: (COFFEE, {"category_id": 2, "segmentation": {"size": [400, 600], "counts": 7}}, "compressed RLE"),
    123: (COFFEE, {"category_id": 2, "segmentation": {"size": ["a", 600], "counts": "0"}}, "non-numeric"),
    124: (CAT, {"bbox": [1, 1, 5, 5]}, "has no category_id"),
    125: (CAT, {"category_id": None, "bbox": [1, 1, 5, 5]}, "has no category_id"),
    126: (CAT, {"category_id": 999, "bbox": [1, 1, 5, 5]}, "999 is not in 'categories'"),
    127: (CAT, {"category_id": [1], "bbox": [1, 1, 5, 5]}, "is not in 'categories'"),
    128: (CAT, {"category_id": 5, "bbox": [1, 1, 5, 5]}, "not valid Unicode"),  # its category's name
    129: (CAT, {"caption": 5}, "caption must be a string"),
    130: (CAT, {"caption": None}, "caption must be a string"),
    131: (CAT, {"caption": "\ud800 broken"}, "not valid Unicode"),
    132: (CAT, {"iscrowd": 0}, "no bbox, segmentation or caption"),
}
# entries that belong to no image: logged, never imported
ORPHANS = {
    201: {"image_id": 12345, "category_id": 1, "bbox": [1, 1, 5, 5]},
    202: {"category_id": 1, "bbox": [1, 1, 5, 5]},
    203: {"image_id": [DOG], "category_id": 1, "bbox": [1, 1, 5, 5]},
}


def _coco() -> dict:
    square = np.zeros((400, 600), bool)
    square[100:200, 150:300] = True
    good = [
        {"id": 1, "image_id": DOG, "category_id": 1, "bbox": [120.0, 210.0, 200.0, 330.0],
         "segmentation": [[120, 210, 320, 210, 320, 540, 120, 540]]},
        {"id": 2, "image_id": DOG, "caption": "A dog in front of a bicycle."},
        {"id": 3, "image_id": COFFEE, "category_id": 2, "bbox": [150, 100, 150, 100], "segmentation": mask_to_rle(square)},
        {"id": 4, "image_id": COFFEE, "category_id": 2, "segmentation": [[10, 10, 60, 10, 60, 40, 10, 40]]},  # no bbox
        {"id": 5, "image_id": CAT, "category_id": 3, "bbox": [50, 20, 300, 250]},
        {"id": 6, "image_id": CAT, "category_id": 3, "bbox": [0, 0, 0, 0]},  # zero-size: kept, the filter decides
        {"id": 7, "image_id": ASTRONAUT, "category_id": 4, "segmentation": mask_to_rle(np.ones((10, 10), bool))},
    ]
    bad = [{"id": i, "image_id": image_id, **fields} for i, (image_id, fields, _) in BAD.items()]
    orphans = [{"id": i, **fields} for i, fields in ORPHANS.items()]
    return {
        "images": [
            {"id": DOG, "file_name": "dog.jpg", "width": 768, "height": 576},
            {"id": COFFEE, "file_name": "coffee.png", "width": 600, "height": 400},
            {"id": CAT, "file_name": "chelsea.png", "width": 451, "height": 300},
            {"id": ASTRONAUT, "file_name": "astronaut.png"},  # no declared size: checked when decoded
            {"file_name": "no_id.png"},  # no id: logged, not listed
        ],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cup"}, {"id": 3, "name": "cat"},
                       {"id": 4, "name": "person"}, {"id": 5, "name": "bad \ud800 name"}, {"name": "no id"}],
        "annotations": good + bad + ["not an object", None] + orphans,
    }


def _dump(coco: dict) -> str:
    # json.dumps writes NaN / Infinity literals, as Python-made COCO files do
    return json.dumps(coco)


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("coco")
    (d / "dog.jpg").write_bytes(photos["jpeg_0"])
    for name in ("coffee", "chelsea", "astronaut"):
        (d / f"{name}.png").write_bytes(photos[name])
    (d / "instances.json").write_text(_dump(_coco()))
    (d / "pipelines.yaml").write_text(textwrap.dedent(PIPELINES))
    return d


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _query(out, sql):
    res = _run("query", out, sql, "--format", "json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def done(coco_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    res = _run("run", coco_dir / "pipelines.yaml", "--pipeline", "filter_only", "--input",
               coco_dir / "instances.json", "--out", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.timeout(60)
def test_read_coco_refuses_each_bad_annotation_with_file_and_id(coco_dir, caplog):
    path = str(coco_dir / "instances.json")
    with caplog.at_level(logging.WARNING, logger="engine.ingest.coco"):
        humans = read_coco(json.loads((coco_dir / "instances.json").read_text()), path)
    by_image = {h["coco_id"]: h for h in humans}
    assert sorted(by_image) == [DOG, COFFEE, CAT, ASTRONAUT]
    rejected = [r for h in humans for r in h.get("rejected", [])]
    assert len(rejected) == len(BAD)
    for ann_id, (image_id, _, why) in BAD.items():
        (reason,) = [r for r in by_image[image_id]["rejected"] if f"(id {ann_id})" in r]
        assert reason.startswith(f"{path} annotations[") and why in reason, (ann_id, reason)
    assert [len(by_image[i]["objects"]) for i in (DOG, COFFEE, CAT, ASTRONAUT)] == [1, 2, 2, 1]
    warnings = [r.getMessage() for r in caplog.records]
    for ann_id in ORPHANS:
        assert any(f"(id {ann_id})" in w and "names no image" in w and path in w for w in warnings), ann_id
    assert any("images[4]" in w for w in warnings) and any("categories[5]" in w for w in warnings)


@pytest.mark.timeout(300)
def test_run_finishes_and_rejections_are_counted_and_queryable(done, coco_dir):
    res = _run("stats", done, "--format", "json")
    assert res.exit_code == 0, res.output
    tables = json.loads(res.stdout)  # keyed by section
    inputs, images, quarantined, duplicates = tables["ingest"]["rows"][0]
    assert (inputs, images, quarantined, duplicates) == (4, 4, 0, 0)
    assert inputs == images + quarantined + duplicates
    per_image = tables["per_image"]
    stage_errors = per_image["rows"][0][per_image["columns"].index("stage_errors")]
    assert stage_errors == len(BAD) + 1  # + the astronaut's RLE, refused once its decoded size is known

    errors = _query(done, "SELECT r.uri, e.stage, e.error FROM records r, unnest(r.errors) AS t(e) ORDER BY e.error")
    assert {e["stage"] for e in errors} == {"human"}
    for ann_id, (image_id, _, why) in BAD.items():
        (hit,) = [e for e in errors if f"(id {ann_id})" in e["error"]]
        assert "instances.json" in hit["error"] and why in hit["error"]
    (astronaut,) = [e for e in errors if e["uri"].endswith("astronaut.png")]
    assert "annotation id 7" in astronaut["error"] and "[512, 512]" in astronaut["error"]

    regions = _query(done, "SELECT i.uri, r.label, r.box, r.mask IS NOT NULL AS has_mask FROM regions r "
                           "JOIN images i USING (image_id) ORDER BY i.uri, r.ann_id")
    labels = sorted((r["uri"].rsplit("/", 1)[1], r["label"]) for r in regions)
    assert labels == [("chelsea.png", "cat"), ("chelsea.png", "cat"), ("coffee.png", "cup"), ("coffee.png", "cup"),
                      ("dog.jpg", "dog")]
    cups = [r for r in regions if r["uri"].endswith("coffee.png")]
    assert sorted(r["box"] for r in cups) == [[10.0, 10.0, 60.0, 40.0], [150.0, 100.0, 300.0, 200.0]]
    captions = _query(done, "SELECT text FROM texts")
    assert [c["text"] for c in captions] == ["A dog in front of a bicycle."]


@pytest.mark.timeout(120)
def test_rerun_resumes_with_identical_rows(done, coco_dir):
    before = _query(done, "SELECT image_id, ann_id, status, reason FROM regions ORDER BY ann_id")
    res = _run("run", coco_dir / "pipelines.yaml", "--pipeline", "filter_only", "--input",
               coco_dir / "instances.json", "--out", done)
    assert res.exit_code == 0, res.output
    assert _query(done, "SELECT image_id, ann_id, status, reason FROM regions ORDER BY ann_id") == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content, message", [
    ("not json at all", "not valid JSON"),
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not a COCO file \\(JSON nested too deeply\\)"),
], ids=["text", "binary", "deep nesting"])
def test_file_that_is_not_json_is_one_clear_error(tmp_path, content, message):
    with pytest.raises(CocoError, match=f"broken.json: {message}"):
        parse_coco_json(content, "broken.json")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("coco", [[], {"info": {}}, {"images": {}}, {"images": [], "annotations": {}},
                                  {"images": [], "categories": "cats"}])
def test_file_that_is_not_coco_is_one_clear_error_through_the_cli(tmp_path, coco):
    (tmp_path / "pipelines.yaml").write_text(textwrap.dedent(PIPELINES))
    (tmp_path / "broken.json").write_text(json.dumps(coco))
    res = _run("run", tmp_path / "pipelines.yaml", "--pipeline", "filter_only", "--input", tmp_path / "broken.json",
               "--out", tmp_path / "out")
    assert res.exit_code == 2 and "broken.json: not a COCO file" in res.output, res.output


# ------------------------------------------------------------------ fuzz: random COCO entries
def _hostile_value(rng: random.Random, depth: int = 0):
    pool = [NAN, INF, -INF, -1, 0, 1, 1e308, 1e-300, 2 ** 63, "10", "", "\ud800", None, True, [], {},
            [1, 2], [1, 2, 3, 4], [NAN] * 4, [[1, 2, 3, 4, 5, 6]], [[1, 2, 3]], {"size": [5, 5], "counts": "0"},
            {"size": [400, 600], "counts": [240000]}, {"size": [400, 600], "counts": "\x00"}]
    if depth < 2 and rng.random() < 0.2:
        return [_hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return rng.choice(pool)


def _random_annotation(rng: random.Random, i: int) -> dict:
    ann: dict = {"id": i, "image_id": rng.choice([DOG, COFFEE, CAT, ASTRONAUT, 4242])}
    for key in ("bbox", "segmentation", "category_id", "caption", "iscrowd", "area"):
        if rng.random() < 0.6:
            ann[key] = _hostile_value(rng)
    if rng.random() < 0.3:  # a plausible one now and then
        x, y = rng.uniform(-50, 500), rng.uniform(-50, 300)
        ann.update(category_id=rng.choice([1, 2, 3]), bbox=[x, y, rng.uniform(0, 200), rng.uniform(0, 200)])
    return ann


@pytest.mark.timeout(120)
def test_fuzz_200_random_annotations_are_imported_or_refused_never_raise():
    rng = random.Random(11)
    coco = _coco()
    coco["annotations"] = [_random_annotation(rng, i) for i in range(200)]
    humans = read_coco(json.loads(_dump(coco)), "fuzz.json")
    imported = sum(len(h["objects"]) + len(h["captions"]) for h in humans)
    refused = sum(len(h.get("rejected", [])) for h in humans)
    orphans = sum(1 for a in coco["annotations"] if a["image_id"] not in SIZES)
    with_caption_and_box = sum(1 for h in humans for c in h["captions"]
                               if any(o["coco_id"] == c["coco_id"] for o in h["objects"]))
    assert imported - with_caption_and_box + refused + orphans == 200
    assert all(isinstance(r, str) and "fuzz.json annotations[" in r for h in humans for r in h.get("rejected", []))
    records = []
    for h in humans:  # what a pipeline's first step does, with the decoded size (declared or not)
        w, hgt = SIZES[h["coco_id"]]
        rec = empty_record({"image_id": str(h["coco_id"]), "uri": h["file_name"], "width": w, "height": hgt,
                            "source": "fuzz"})
        records.append(human_annotations(rec, json.dumps(h, sort_keys=True)))
    validate_table(records_to_table(records))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("human", [
    "{not json", "[1, 2]", '"text"', "null", "[" * 50_000 + "]" * 50_000,
    '{"objects": "abc"}', '{"captions": 5}', '{"objects": [5, null, "x"]}',
    '{"objects": [{"box": [0, 0, NaN, 5]}]}', '{"objects": [{"box": [0, 0, 5, 5], "rle": {"size": [3, 3], "counts": "3"}}]}',
    '{"objects": [{"box": [0, 0, 5, 5], "polygon": [[0, 0, 1e30, 0, 5, 5]]}]}',
    '{"objects": [{"box": [0, 0, 5, 5], "label": 12}]}', '{"captions": [{"text": "ok", "tier": "epic"}]}',
    '{"width": "wide", "height": 3, "objects": [{"box": [0, 0, 5, 5]}]}', '{"rejected": "just one"}',
], ids=lambda value: value[:40])
def test_stored_human_json_of_any_shape_never_raises(human):
    """Step 0 re-reads the stored `human` JSON (older stores, list files, WebDataset): never raises."""
    rec = human_annotations(empty_record({"image_id": "x", "uri": "x.png", "width": 64, "height": 48, "source": "t"}),
                            human)
    validate_table(records_to_table([rec]))
    assert rec["errors"] and all(e["stage"] == "human" for e in rec["errors"])


@pytest.mark.timeout(60)
def test_bad_image_entries_keep_their_files_listed(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
                   {"id": 1, "file_name": "b.jpg"},  # duplicate id: listed, annotations go to the first
                   {"id": 2, "file_name": "c.jpg", "width": "wide", "height": 0},  # unusable size: not checked
                   {"id": 3, "file_name": ""}],  # no file to read: logged
        "categories": [{"id": 1, "name": "dog"}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},
                        {"id": 11, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4],
                         "segmentation": [[0, 0, 50, 0, 50, 50]]}],
    }
    humans = read_coco(coco, "dup.json")
    assert [h["file_name"] for h in humans] == ["a.jpg", "b.jpg", "c.jpg"]
    a, b, c = humans
    assert len(a["objects"]) == 1 and b["objects"] == [] and "appears twice" in b["rejected"][0]
    assert c["width"] is None and "not positive integers" in c["rejected"][0] and len(c["objects"]) == 1


# ------------------------------------------------------------------ streaming (ijson): bounded, order-free
def _stream(tmp_path, text: str | bytes, limits=None, name: str = "s.json"):
    from engine.ingest.coco import read_coco_file

    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return read_coco_file(lambda: open(path, "rb"), str(path), limits)


def _standard(coco: dict) -> dict:
    """_coco() without NaN / Infinity (not standard JSON: those files are parsed whole) and without
    lone surrogates (\\ud800: ijson reads them as '?', json as an invalid str that is refused)."""
    coco = json.loads(json.dumps(coco))
    coco["annotations"] = [a for a in coco["annotations"]
                           if not (isinstance(a, dict) and a.get("id") in (101, 102, 103, 128, 131))]
    return coco


@pytest.mark.timeout(60)
@pytest.mark.parametrize("order", [("images", "categories", "annotations"), ("annotations", "categories", "images"),
                                   ("categories", "annotations", "images"), ("annotations", "images", "categories")])
def test_streamed_file_equals_the_parsed_one_whatever_the_key_order(tmp_path, order):
    coco = _standard(_coco())
    text = "{" + ", ".join([f'"info": {{"x": [1, {{"y": "z"}}]}}'] +
                           [f"{json.dumps(k)}: {json.dumps(coco[k])}" for k in order]) + "}"
    assert _stream(tmp_path, text) == read_coco(coco, str(tmp_path / "s.json"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.999])
def test_truncated_json_is_one_error_naming_file_position_and_entry(tmp_path, cut):
    text = json.dumps(_standard(_coco()))
    with pytest.raises(CocoError) as err:
        _stream(tmp_path, text[:int(len(text) * cut)], name="cut.json")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'cut.json'}: not valid JSON (") and "\n" not in message, message
    assert "within bytes 0-" in message and "at or after" in message, message


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text, message", [
    ('{"images": [], "images": []}', "'images' appears twice"),
    ('{"annotations": []}', "no 'images' list"),
    ('{"images": 5}', "no 'images' list"),
    ('{"images": [], "annotations": "x"}', "'annotations' is a str, not a list"),
    ('[{"images": []}]', "no 'images' list"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "x": ' + "[" * 200 + "]" * 200 + "}]}", "nested deeper than 32"),
    ('{"images": [], "annotations": [' + "[" * 100_000 + "]" * 100_000 + "]}", "nested deeper than 32"),
    ('{"images": []} trailing', "not valid JSON"),
    ('{"images": [{"id": 1, "file_name": "a\x01.jpg"}]}', "not valid JSON"),
    (b'{"images": [{"id": 1, "file_name": "\xff\xfe"}]}', "not valid JSON"),
    (b"\x89PNG\r\n\x1a\n\x00binary", "not valid JSON"),
    ("", "not valid JSON"),
], ids=["dup-key", "no-images", "images-int", "ann-str", "root-list", "deep-image", "deep-ann", "trailing",
        "control-char", "not-utf8", "binary", "empty"])
def test_garbage_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(CocoError) as err:
        _stream(tmp_path, text, name="g.json")
    assert str(err.value).startswith(f"{tmp_path / 'g.json'}: ") and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.timeout(60)
def test_nested_garbage_inside_entries_is_refused_per_entry(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48, "extra": {"a": [[{"b": [[]]}]]}}],
            "categories": [{"id": 1, "name": "dog"}, {"id": {"x": [1]}, "name": "bad"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": {"a": [[{}]]}},
                            {"id": 11, "image_id": 1, "category_id": 1, "segmentation": [[[1, 2], [3, [4]]]]},
                            {"id": 12, "image_id": {"id": 1}, "category_id": 1, "bbox": [1, 2, 3, 4]},
                            {"id": 13, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}]}
    (human,) = _stream(tmp_path, json.dumps(coco))
    assert len(human["objects"]) == 1 and len(human["rejected"]) == 2
    assert all("(id 1" in r for r in human["rejected"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["caption", "file_name", "category", "label_key"])
def test_a_20_mb_string_refuses_its_entry_only(tmp_path, where, caplog):
    from engine.ingest.coco import MAX_CELL_CHARS

    huge = "x" * (20 << 20)
    coco = {"images": [{"id": 1, "file_name": "a.jpg"},
                       {"id": 2, "file_name": huge if where == "file_name" else "b.jpg"}],
            "categories": [{"id": 1, "name": huge if where == "category" else "dog"}, {"id": 2, "name": "cat"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4]},
                            {"id": 11, "image_id": 1, "caption": huge if where == "caption" else "ok"},
                            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4],
                             **({huge: 1} if where == "label_key" else {})}]}
    with caplog.at_level(logging.WARNING, logger="engine.ingest.coco"):
        humans = _stream(tmp_path, json.dumps(coco))
    by_name = {h["file_name"]: h for h in humans}
    assert "a.jpg" in by_name and all(len(h["file_name"]) < 100 for h in humans)
    a = by_name["a.jpg"]
    assert {o["label"] for o in a["objects"]} >= {"cat"}
    warned = " ".join(r.getMessage() for r in caplog.records)
    if where == "file_name":
        assert "images[1]" in warned and f"over {MAX_CELL_CHARS}" in warned
    elif where == "category":
        assert "categories[0]" in warned and [o["label"] for o in a["objects"]] == ["cat"]
        assert any("(id 12)" in r and "not in 'categories'" in r for r in a["rejected"])
    elif where == "caption":
        assert a["captions"] == [] and any("(id 11)" in r and f"over {MAX_CELL_CHARS}" in r for r in a["rejected"])
    else:  # a 20 MB key: json keys are not values, ijson hands them whole: kept, bounded by the run cap
        assert len(a["objects"]) == 2


@pytest.mark.timeout(60)
def test_a_value_without_end_is_refused_before_it_is_buffered(tmp_path, monkeypatch):
    """One multi-GB string (or number) would be buffered whole by the parser: a run of MAX_RUN_BYTES
    without an unescaped quote ends the file with one error (here 1 MiB; escaped quotes do not count)."""
    import engine.ingest.coco as coco_mod

    monkeypatch.setattr(coco_mod, "MAX_RUN_BYTES", 1 << 20)
    for value in ('"' + '\\"' * (1 << 20) + '"', "1" * (2 << 20)):
        with pytest.raises(CocoError, match="a JSON value of more than 1 MiB"):
            _stream(tmp_path, '{"images": [{"id": 1, "file_name": ' + value + "}]}")


@pytest.mark.timeout(60)
def test_per_image_caps_hold_while_reading_and_orphans_are_counted(tmp_path, caplog):
    from engine.config import IngestConfig

    limits = IngestConfig(max_objects_per_image=5, max_captions_per_image=2, max_caption_chars=10)
    anns = [{"id": i, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]} for i in range(50)]
    anns += [{"id": 100 + i, "image_id": 1, "caption": "short"} for i in range(4)]
    anns += [{"id": 200, "image_id": 1, "caption": "much longer than ten"}]
    anns += [{"id": 300 + i, "image_id": 99, "bbox": [1, 2, 3, 4]} for i in range(30)]
    anns += [{"id": 400 + i, "image_id": 1, "category_id": 1, "bbox": [1, 2, -3, 4]} for i in range(150)]
    coco = {"annotations": anns, "images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "dog"}]}
    with caplog.at_level(logging.WARNING, logger="engine.ingest.coco"):
        (human,) = _stream(tmp_path, json.dumps(coco), limits)
    assert len(human["objects"]) == 5 and len(human["captions"]) == 2
    rejected = human["rejected"]
    assert any("50 boxes/masks, over ingest.max_objects_per_image=5; the 45 after" in r for r in rejected)
    assert any("4 captions, over ingest.max_captions_per_image=2; the 2 after" in r for r in rejected)
    assert any("(id 200)" in r and "max_caption_chars=10" in r for r in rejected)
    assert any("51 more annotations of this image not imported" in r for r in rejected)  # 151 refused, 100 kept
    assert len(rejected) == 100 + 3
    assert any("30 annotations name no image of the file" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(120)
def test_a_50_mb_coco_file_is_read_in_bounded_memory(tmp_path):
    """A 50 MB file of 600,000 small annotations on 20 images, `images` last: parsed whole it took
    635 MiB peak RSS; streamed with the per-image caps, ~130 MiB (measured, under load)."""
    import subprocess
    import sys

    path = tmp_path / "big.json"
    with open(path, "w") as f:
        f.write('{"annotations": [')
        for start in range(0, 640_000, 10_000):
            f.write(("," if start else "") + ",".join(
                f'{{"id": {i}, "image_id": {i % 20}, "category_id": 1, "bbox": [{i % 300}, 5, 10.5, 20.25]}}'
                for i in range(start, start + 10_000)))
        f.write('], "images": [' + ",".join(f'{{"id": {k}, "file_name": "i{k}.jpg"}}' for k in range(20)))
        f.write('], "categories": [{"id": 1, "name": "thing"}]}')
    assert path.stat().st_size > 50_000_000
    code = ("import sys; from engine.config import IngestConfig; from engine.ingest.sources import list_inputs; "
            "items = list_inputs(sys.argv[1], limits=IngestConfig()); "
            "print(len(items), sum(len(i.human['objects']) for i in items))")
    # a small launcher reports the reader's own peak RSS (a child forked from pytest would count pytest's pages)
    launcher = ("import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', *sys.argv[1:]]); "
                "_, status, usage = os.wait4(p.pid, 0); print(usage.ru_maxrss // 1024); "
                "sys.exit(os.waitstatus_to_exitcode(status))")
    res = subprocess.run([sys.executable, "-c", launcher, code, str(path)], capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, res.stderr[-2000:]
    n_items, n_objects, rss_mib = map(int, res.stdout.split())
    assert (n_items, n_objects) == (20, 20 * 5000)
    assert rss_mib < 250, rss_mib


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value, why", [("NaN", "non-finite"), ("-Infinity", "non-finite"),
                                        ('"\\udc80"', "not valid Unicode")], ids=["nan", "-inf", "surrogate"])
def test_non_standard_json_is_parsed_whole_up_to_a_cap(tmp_path, monkeypatch, value, why):
    """NaN / Infinity literals and lone surrogate escapes (Python's json writes them) stop ijson: such a
    file is parsed whole, its entries refused one by one as before; over the cap, one error."""
    import engine.ingest.sources as sources

    field = '"caption"' if value.startswith('"') else '"category_id": 1, "bbox"'
    text = ('{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "dog"}], "annotations": ['
            '{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}, '
            f'{{"id": 2, "image_id": 1, {field}: '
            + (value if value.startswith('"') else f"[1, 2, {value}, 4]") + "}]}")
    (tmp_path / "n.json").write_text(text)
    (item,) = sources.list_inputs(str(tmp_path / "n.json"))
    (reason,) = item.human["rejected"]
    assert len(item.human["objects"]) == 1 and why in reason and "(id 2)" in reason
    monkeypatch.setattr(sources, "MAX_COCO_WHOLE_BYTES", 100)
    with pytest.raises(sources.InputError, match="n.json: has NaN / Infinity literals or lone surrogates"):
        sources.list_inputs(str(tmp_path / "n.json"))
