"""Helpers shared by the test modules (no test module imports another one): real inputs made here (a rendered
sign, a COCO file over real photos, a report store), small pipelines, CLI calls and comparisons."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont
from typer.testing import CliRunner

from engine.cli import app
from engine.config import load_pipeline
from engine.ingest.decode import QUARANTINE_REASONS
from engine.views.query import run_query
from engine.run import run_pipeline
from engine.stage import IMAGE_BYTES_COLUMN, records_to_table
from engine.store import ShardStore
from schemas.geometry import mask_to_rle
from schemas.records import IMAGES_SCHEMA, QUARANTINE_SCHEMA, empty_record, new_annotation, source_of

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- inputs
def make_batch(images: dict[str, bytes]) -> pa.Table:
    """Image records (no annotations yet) plus the transient image-bytes column."""
    records = []
    for name, data in images.items():
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        records.append(
            empty_record(
                {"image_id": hashlib.sha256(data).hexdigest(), "uri": name, "width": w, "height": h, "source": "test"}
            )
        )
    table = records_to_table(records)
    return table.append_column(IMAGE_BYTES_COLUMN, pa.array(list(images.values()), pa.binary()))


WORDS = ["STOP HERE", "OPEN 24 HOURS", "EXIT 12"]


def rendered_sign() -> bytes:
    img = Image.new("RGB", (520, 320), (235, 230, 220))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=44)
    for i, w in enumerate(WORDS):
        d.text((30, 30 + 95 * i), w, fill=(20, 20, 20), font=font)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def coco_input(photos, folder, *, both_folds: bool = False):
    """Real photos + a COCO file with one box and one caption each (imported as `human`): three camera
    JPEGs and `coffee`; `both_folds`: the skimage photo is chosen so that a 2-fold cross-fit (folds by
    image-id hash) finds images in both folds whichever photo set this machine has
    (tests/conftest._jpeg_photos: darknet's photos or scikit-image's)."""
    from refine.crossfit import fold_of

    names = [n for n in photos if n.startswith("jpeg_")][:3]
    folds = {fold_of(hashlib.sha256(photos[n]).hexdigest(), 2) for n in names}
    names.append(next(n for n in ("coffee", "chelsea", "astronaut", "rocket", "camera")
                      if not both_folds or folds | {fold_of(hashlib.sha256(photos[n]).hexdigest(), 2)} == {0, 1}))
    images, anns = [], []
    for i, name in enumerate(names, start=1):
        data = photos[name]
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            ext = "jpg" if im.format == "JPEG" else "png"
        (folder / f"{name}.{ext}").write_bytes(data)
        images.append({"id": i, "file_name": f"{name}.{ext}", "width": w, "height": h})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [w * 0.2, h * 0.2, w * 0.5, h * 0.5],
                     "area": w * h * 0.25, "iscrowd": 0})
    anns += [{"id": 100 + i, "image_id": i, "caption": "a dog sitting on a wooden bench"} for i in range(1, len(names) + 1)]
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    path = folder / "instances.json"
    path.write_text(json.dumps(coco))
    return path


# ---------------------------------------------------------------------- pipelines and the CLI
# The `ocr` pipeline of the CLI tests: one RapidOCR step, shards of 2 inputs; `ocr_filtered` adds a filter.
OCR_PIPELINES = """
pipelines:
  ocr:
    ingest: {shard_size: 2}
    steps:
      - name: stage1
        stages:
          - {stage: ocr, params: {batch_size: 2, min_score: MIN}}
  ocr_filtered:  # the same stage1 (its shards are reused), then a filter that drops every OCR line
    ingest: {shard_size: 2}
    steps:
      - name: stage1
        stages:
          - {stage: ocr, params: {batch_size: 2, min_score: MIN}}
      - name: stage2
        stages:
          - {stage: region_filter, params: {min_score: {text: 1.01}}}
"""


def ocr_pipelines(tmp_path, min_score=0.5):
    p = tmp_path / "pipelines.yaml"
    p.write_text(textwrap.dedent(OCR_PIPELINES).replace("MIN", str(min_score)))
    return p


def export_cli(out, fmt, dest):
    """`fld export OUT --format FMT --dest DEST`, which must succeed."""
    res = CliRunner().invoke(app, ["export", str(out), "--format", fmt, "--dest", str(dest)])
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------------- stores
def store_one_image(root, data: bytes, uri: str, width: int, height: int, annotate) -> str:
    """A store with one image and its step-1 record, `annotate(record, source)` filling the annotations."""
    iid = hashlib.sha256(data).hexdigest()
    store = ShardStore(root)
    store.write_shard("images", "part-00000", pa.Table.from_pylist(
        [{"image_id": iid, "uri": uri, "source": "t", "width": width, "height": height, "format": "PNG",
          "mode": "RGB", "bytes": data, "human": None}], schema=IMAGES_SCHEMA))
    rec = empty_record({"image_id": iid, "uri": uri, "width": width, "height": height, "source": "t"})
    annotate(rec, source_of("unit"))
    store.write_shard("annotations/stage1", "part-00000", records_to_table([rec]))
    store.update_manifest(folder_order=["annotations/stage1"])
    return root


EVIL = "<script>window.__pwned=1</script>[/bold]"
COFFEE_URI = f"coffee {EVIL}.png"
CAPTION = "<loc_5>a cup of coffee<loc_9> on a table"  # a model leaked location tokens
REPORT_SOURCE = source_of("unit", "unit-model")


def _report_ann(score=None, status="kept", reason=None, checks=None, **fields):
    a = new_annotation(REPORT_SOURCE, score, **fields)
    a.update(status=status, reason=reason, checks=checks or {})
    return a


def rect_mask(h, w, box):
    m = np.zeros((h, w), bool)
    m[box[1]:box[3], box[0]:box[2]] = True
    return mask_to_rle(m)


def make_report_store(root: Path, photos: dict, pipeline: str = "quickstart", profile: str | None = "offline") -> ShardStore:
    """Two real photos with every kind of annotation (kept and dropped), hostile strings in a file
    name, a caption, a label, a reason and the quarantine; manifest from a real pipeline config."""
    store = ShardStore(root)
    rows, ids = [], []
    for uri, data in ((COFFEE_URI, photos["coffee"]), ("astronaut.png", photos["astronaut"])):
        ids.append(hashlib.sha256(data).hexdigest())
        rows.append({"image_id": ids[-1], "uri": uri, "source": "t", "width": 600 if "coffee" in uri else 512,
                     "height": 400 if "coffee" in uri else 512, "format": "PNG", "mode": "RGB", "bytes": data, "human": None})
    counters = {"inputs": 5, "images": 2, "quarantined": 3, "duplicates": 0}
    store.write_shard("images", "part-00000", pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), {"counters": counters})
    quarantine = [{"uri": f"broken {EVIL}.jpg", "source": "t", "reason": "truncated", "detail": f"cut at byte 10 {EVIL}",
                   "image_id": None, "duplicate_of": None},
                  {"uri": "https://example.com/missing.jpg", "source": "t", "reason": "missing", "detail": "404",
                   "image_id": None, "duplicate_of": None},
                  {"uri": "empty.jpg", "source": "t", "reason": "empty", "detail": "0 bytes", "image_id": None,
                   "duplicate_of": None}]
    store.write_shard("quarantine", "part-00000", pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))

    coffee = empty_record({"image_id": ids[0], "uri": COFFEE_URI, "width": 600, "height": 400, "source": "t"})
    start = CAPTION.index("a cup")
    coffee["texts"] = [
        _report_ann(ann_id="t1", tier="brief", text=CAPTION),
        _report_ann(ann_id="t2", tier="brief", text=f"{EVIL} junk", status="dropped", reason="text_filter:too_few_objects"),
        _report_ann(ann_id="t3", tier="detailed", text="a white cup on a saucer<loc_12><lo"),  # generation cut mid-token
    ]
    coffee["regions"] = [
        _report_ann(0.9, ann_id="r1", kind="object", box=[150.0, 100.0, 450.0, 300.0], quad=None, polygon=None,
             mask=rect_mask(400, 600, (150, 100, 450, 300)), label="cup", brief="a white cup",
             checks={"region_filter.nms_iou": 0.0}),
        _report_ann(0.8, ann_id="r2", kind="text", box=[20.0, 330.0, 220.0, 370.0],
             quad=[20.0, 330.0, 220.0, 335.0, 218.0, 370.0, 22.0, 366.0], polygon=None, mask=None,
             label="COFFEE & <b>", brief=None),
        _report_ann(0.2, ann_id="r3", kind="object", box=[0.0, 0.0, 50.0, 50.0], quad=None, polygon=None, mask=None,
             label="spoon", brief=None, status="dropped", reason="region_filter:low_score",
             checks={"region_filter.nms_iou": 0.1}),
        _report_ann(0.7, ann_id="r4", kind="object", box=[480.0, 20.0, 580.0, 120.0], quad=None,
             polygon=[[480.0, 120.0, 530.0, 20.0, 580.0, 120.0]], mask=None, label=f"{EVIL}", brief=None),
    ]
    coffee["groundings"] = [
        _report_ann(0.6, ann_id="g1", text_ann_id="t1", phrase="a cup", char_start=start, char_end=start + 5,
             box=[150.0, 100.0, 450.0, 300.0], mask=rect_mask(400, 600, (160, 110, 440, 290))),
        _report_ann(0.5, ann_id="g2", text_ann_id="t1", phrase="a table", char_start=CAPTION.index("a table"),
             char_end=len(CAPTION), box=[0.0, 250.0, 600.0, 400.0], mask=None, status="dropped",
             reason=f"grounding_filter:{EVIL}"),
    ]
    astronaut = empty_record({"image_id": ids[1], "uri": "astronaut.png", "width": 512, "height": 512, "source": "t"})
    astronaut["regions"] = [_report_ann(0.95, ann_id="r5", kind="object", box=[100.0, 50.0, 400.0, 500.0], quad=None,
                                 polygon=None, mask=None, label="person", brief="a woman in a space suit")]
    astronaut["errors"] = [{"stage": "masks", "error": f"ValueError: {EVIL}"}]
    store.write_shard("annotations/stage2", "part-00000", records_to_table([coffee, astronaut]))
    pipe = load_pipeline(REPO / "pipelines.yaml", pipeline, profile)
    store.update_manifest(folder_order=["annotations/stage2"], pipeline={
        "name": pipe.name, "file": "pipelines.yaml", "profile": profile, "input": "samples",
        "models": pipe.models, "config": pipe.config.model_dump(mode="json")})
    return store


# ---------------------------------------------------------------------- comparisons and counting
def assert_close(a, b, path="") -> None:
    """Deep equality with a float tolerance (scores, geometry); names the first differing path."""
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5), f"{path}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def count_forwards(stage, table: pa.Table) -> tuple[pa.Table, int]:
    """Run the stage on the table, counting the forward calls of its `model`: (output, calls)."""
    calls = []
    handle = stage.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = stage(table)
    finally:
        handle.remove()
    return out, len(calls)


# --- a real browser (Debian chromium through Playwright) ---
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No sandbox as root; no background traffic (this network refuses it, many connections at a time).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]



def missing_browser() -> str | None:
    """Why the browser test cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (it is in the test extra: pip install -e '.[test]')"
    if not os.path.exists(CHROMIUM):
        return "Debian's chromium is not installed (apt-get install chromium; .ci/run does it)"
    return None

# --- a real `fld run` of ingest + one CPU step (the hostile-ingest tests) ---
INGEST_PIPELINES = """
pipelines:
  p:
    ingest: {INGEST}
    steps:
      - name: s1
        stages:
          - {stage: region_filter}
"""


def ingest_pipeline(tmp_path, **ingest):
    settings = {"shard_size": 4, **ingest}
    path = tmp_path / f"p-{hashlib.sha1(repr(sorted(settings.items())).encode()).hexdigest()[:8]}.yaml"
    path.write_text(INGEST_PIPELINES.replace("{INGEST}", json.dumps(settings)))
    return load_pipeline(path, "p"), path


def quarantine_rows(out) -> dict[str, tuple[str, str]]:
    rows = run_query(out, "SELECT uri, reason, detail FROM quarantine ORDER BY uri")[1]
    for uri, reason, detail in rows:
        assert reason in QUARANTINE_REASONS, (uri, reason)
        assert detail.startswith(f"{uri}: "), detail  # every detail names its file
    return {uri: (reason, detail) for uri, reason, detail in rows}


def image_uris(out) -> dict[str, str]:
    return dict(run_query(out, "SELECT uri, image_id FROM images ORDER BY uri")[1])


def ingest_run(tmp_path, src, out_name: str = "out", **ingest):
    """A real `fld run` (in this process: monkeypatches reach it); (summary, quarantine, images)."""
    pipe, _ = ingest_pipeline(tmp_path, **ingest)
    out = tmp_path / out_name
    summary = run_pipeline(pipe, str(src), str(out))
    i = summary.ingest
    assert i["inputs"] == i["images"] + i["quarantined"] + i["duplicates"], i
    return summary, quarantine_rows(out), image_uris(out)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --- a training OUT (stage 3 tests) ---
TRAIN_FOLDER = "annotations/train"


def write_train_store(out, records: list[dict], images: dict[str, bytes], shard_size: int) -> ShardStore:
    """A training OUT: images/part-k and annotations/train/part-k holding the same images, committed."""
    store = ShardStore(out)
    for k in range(0, len(records), shard_size):
        chunk = records[k:k + shard_size]
        shard = f"part-{k // shard_size:05d}"
        rows = [{"image_id": r["image_id"], "uri": r["uri"], "source": "t", "width": r["width"], "height": r["height"],
                 "format": "PNG", "mode": "RGB", "bytes": images[r["image_id"]], "human": None} for r in chunk]
        store.write_shard("images", shard, pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA))
        store.write_shard(TRAIN_FOLDER, shard, records_to_table(chunk))
    return store


def kill_run(proc) -> None:
    """SIGKILL a run started with start_new_session=True, and its process group; then reap it."""
    for kill in (lambda: os.kill(proc.pid, signal.SIGKILL), lambda: os.killpg(proc.pid, signal.SIGKILL)):
        try:
            kill()
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
