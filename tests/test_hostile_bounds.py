"""Issue 21 items 1-3: one record never stops a run and costs bounded work; nothing silently vanishes
(inputs = images + quarantine rows, duplicates included, IN THE DATA); COCO file_names stay inside the
image root. Each class is tried with several variants; every test has a timeout, and the end-to-end run
is a real `fld run` subprocess whose wall time and peak RSS (os.wait4) are bounded.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.ingest.decode import QUARANTINE_REASONS, ingest_shard
from engine.ingest.human import limit_annotations
from engine.ingest.locations import LocationReader, local_path
from engine.ingest.sources import InputItem, list_inputs, outside_root
from engine.views.query import run_query
from engine.stage import decode_image
from engine.store import ShardStore
from helpers import ingest_run as _run
from helpers import tar_bytes as _tar_bytes

MIB = 1 << 20


# --------------------------------------------------------------------------- helpers
def _photo(i: int, size: int = 48, fmt: str = "JPEG", **save) -> bytes:
    """A distinct small image per i (never an accidental duplicate of another i)."""
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt, **save)
    return buf.getvalue()


def _data(out) -> tuple[list[str], list[tuple[str, str, str]], dict]:
    """(image uris, quarantine (uri, reason, detail) rows, manifest ingest counters), with the equation
    checked in the data: every input is one row of images/ or quarantine/."""
    images = [u for (u,) in run_query(out, "SELECT uri FROM images")[1]]
    quarantine = run_query(out, "SELECT uri, reason, detail FROM quarantine")[1]
    ingest = ShardStore(out).read_manifest()["ingest"]
    assert ingest["inputs"] == len(images) + len(quarantine), (ingest, len(images), len(quarantine))
    assert ingest["images"] == len(images)
    assert ingest["duplicates"] == sum(r == "duplicate" for _, r, _ in quarantine)
    for uri, reason, detail in quarantine:
        assert reason in QUARANTINE_REASONS and detail.startswith(f"{uri}: "), (uri, reason, detail)
    return images, quarantine, ingest


def _records(out, step: str = "s1") -> list[dict]:
    store = ShardStore(out)
    folder = f"annotations/{step}"
    return [r for s in store.shards(folder) for r in store.read_shard(folder, s).to_pylist()]


def _bounded_fld(args: list[str], timeout_s: float, max_rss_mb: int) -> str:
    """`fld ARGS` in a subprocess: exit 0, no traceback, within `timeout_s` and `max_rss_mb` peak RSS."""
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from engine.cli import app; app()", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    wall = time.monotonic() - t0
    rss_mb = usage.ru_maxrss // 1024
    assert wall < timeout_s, f"fld {args[0]} took {wall:.0f} s"
    assert os.waitstatus_to_exitcode(status) == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert rss_mb < max_rss_mb, f"peak RSS {rss_mb} MB over {max_rss_mb} MB"
    print(f"fld {args[0]}: {wall:.1f} s, peak RSS {rss_mb} MB")  # shown with pytest -s
    return output


# --------------------------------------------------------------------------- 1. bounded work per record
GROUNDING_PIPELINE = """
pipelines:
  g:
    ingest: {shard_size: 4}
    steps:
      - name: s1
        stages:
          - {stage: grounding, params: {model: random:tiny, box_threshold: 0.0, text_threshold: 0.0, max_phrases: 8}}
          - {stage: masks, params: {model: random:tiny, batch_size: 4}}
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_hostile_captions_never_stop_a_grounding_run_and_memory_stays_bounded(tmp_path):
    """A 1.1 MB caption (spaCy E088), a 0.88 MB one (7 GB in grounding before), dict / list / number
    captions in a JSONL list, next to normal rows, through grounding + masks in a real `fld run`: exit 0,
    peak RSS bounded, every image is a record, each refused caption is an error on its own image."""
    src = tmp_path / "in"
    src.mkdir()
    captions = {"long.jpg": "a dog on a bike. " * 66_000, "long88.jpg": "a red cup. " * 80_000,
                "dict.jpg": {"text": "a dog"}, "list.jpg": ["a dog", "a cat"], "number.jpg": 42,
                "ok1.jpg": "A cup of coffee on a saucer.", "ok2.jpg": "A dog next to a bicycle."}
    rows = []
    for i, (name, caption) in enumerate(captions.items()):
        (src / name).write_bytes(_photo(i, size=64))
        rows.append(json.dumps({"path": name, "caption": caption}))
    (src / "list.jsonl").write_text("\n".join(rows) + "\n")
    yaml = tmp_path / "p.yaml"
    yaml.write_text(textwrap.dedent(GROUNDING_PIPELINE))
    out = tmp_path / "out"
    _bounded_fld(["run", str(yaml), "-p", "g", "-i", str(src / "list.jsonl"), "-o", str(out)],
                 timeout_s=300, max_rss_mb=3000)
    images, quarantine, _ = _data(out)
    assert len(images) == 7 and not quarantine
    by_name = {r["uri"].rsplit("/", 1)[-1]: r for r in _records(out)}
    assert set(by_name) == set(captions)
    for name, rec in by_name.items():
        assert all(len(t["text"]) <= 10_000 for t in rec["texts"])
        errors = [e["error"] for e in rec["errors"] if e["stage"] == "human"]
        if name.startswith("ok"):
            assert not rec["errors"] and rec["texts"] and rec["groundings"], rec["errors"]
        elif name.startswith("long"):
            assert len(errors) == 1 and "ingest.max_caption_chars=10000" in errors[0] and not rec["texts"]
        else:
            kind = type(captions[name]).__name__
            assert len(errors) == 1 and f"got {kind}" in errors[0] and not rec["texts"], errors
            assert "{" not in errors[0] and "[" not in errors[0]  # no Python repr stored anywhere
    # a rerun resumes: nothing is redone, nothing is added
    before = {f: {s: r["sha256"] for s, r in ShardStore(out).committed(f).items()} for f in ("images", "annotations/s1")}
    _bounded_fld(["run", str(yaml), "-p", "g", "-i", str(src / "list.jsonl"), "-o", str(out)],
                 timeout_s=300, max_rss_mb=3000)
    assert {f: {s: r["sha256"] for s, r in ShardStore(out).committed(f).items()}
            for f in ("images", "annotations/s1")} == before


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_caption_and_annotation_policy_for_every_caption_source(tmp_path):
    """CSV (cells over Python's 128 KiB csv limit), COCO (long caption, too many captions and boxes),
    WebDataset (.txt of 1 MiB - 1 byte, .json caption) and JSONL: the run finishes, no stored caption is
    over the cap, and each refusal is an error on its image naming the setting."""
    cap = 5_000
    settings = {"max_caption_chars": cap, "max_captions_per_image": 2, "max_objects_per_image": 10}

    # CSV: 200 KB and 1.1 MB cells (the csv module's default limit is 128 KiB: _csv.Error before)
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    lines = ["path,caption"]
    for i, caption in enumerate(["x" * 200_000, "y" * 1_100_000, "a short caption", "z" * cap]):
        (csv_dir / f"{i}.jpg").write_bytes(_photo(100 + i))
        lines.append(f"{i}.jpg,{caption}")
    (csv_dir / "list.csv").write_text("\n".join(lines) + "\n")
    _run(tmp_path, csv_dir / "list.csv", "out_csv", **settings)
    texts = {r["uri"].rsplit("/", 1)[-1]: r for r in _records(tmp_path / "out_csv")}
    assert [len(texts[f"{i}.jpg"]["texts"]) for i in range(4)] == [0, 0, 1, 1]
    assert all(any(f"ingest.max_caption_chars={cap}" in e["error"] for e in texts[f"{i}.jpg"]["errors"]) for i in (0, 1))

    # COCO: a long caption, 3 captions over a cap of 2, 25 boxes over a cap of 10
    coco_dir = tmp_path / "coco"
    coco_dir.mkdir()
    (coco_dir / "a.jpg").write_bytes(_photo(200, size=64))
    anns = [{"id": 1, "image_id": 1, "caption": "w" * 1_100_000}] + \
        [{"id": 2 + k, "image_id": 1, "caption": f"caption {k}"} for k in range(3)] + \
        [{"id": 10 + k, "image_id": 1, "category_id": 1, "bbox": [k, k, 5, 5]} for k in range(25)]
    (coco_dir / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
        "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    _run(tmp_path, coco_dir / "ann.json", "out_coco", **settings)
    (rec,) = _records(tmp_path / "out_coco")
    assert len(rec["texts"]) == 2 and len(rec["regions"]) == 10
    errors = " | ".join(e["error"] for e in rec["errors"])
    assert f"ingest.max_caption_chars={cap}" in errors and "ingest.max_captions_per_image=2" in errors
    assert "25 boxes/masks, over ingest.max_objects_per_image=10" in errors

    # WebDataset: a .txt of 1 MiB - 1 byte, a JSON caption list, a normal caption
    tar_dir = tmp_path / "wds"
    tar_dir.mkdir()
    (tar_dir / "s.tar").write_bytes(_tar_bytes([
        ("k1.jpg", _photo(300)), ("k1.txt", b"v" * (MIB - 1)),
        ("k2.jpg", _photo(301)), ("k2.json", json.dumps({"captions": ["u" * 6000, "ok"]}).encode()),
        ("k3.jpg", _photo(302)), ("k3.txt", b"a normal caption")]))
    _run(tmp_path, tar_dir / "s.tar", "out_wds", **settings)
    recs = {r["uri"].rsplit("::", 1)[-1]: r for r in _records(tmp_path / "out_wds")}
    assert [len(recs[k]["texts"]) for k in ("k1.jpg", "k2.jpg", "k3.jpg")] == [0, 1, 1]
    assert all(len(t["text"]) <= cap for r in recs.values() for t in r["texts"])


def test_limit_annotations_variants():
    """The policy itself: unchanged under the caps (same object), each kind of excess named once."""
    ok = {"origin": "f", "captions": [{"text": "a"}], "objects": [{"box": [0, 0, 1, 1]}]}
    assert limit_annotations(ok, 10, 5, 5) is ok and limit_annotations(None, 1, 1, 1) is None
    human = {"origin": "f", "captions": [{"text": "x" * 11}, {"text": {"a": 1}}, {"text": "b"}, {"text": "c"}],
             "objects": [{"box": [0, 0, 1, 1]}] * 7, "rejected": ["earlier"]}
    out = limit_annotations(human, 10, 1, 3)
    assert out["captions"] == [{"text": "b"}] and len(out["objects"]) == 3
    assert out["rejected"][0] == "earlier" and len(out["rejected"]) == 5
    assert "got dict" in out["rejected"][2] and "7 boxes/masks" in out["rejected"][4]


def _progressive_with_repeated_scans(repeat: int) -> tuple[bytes, int]:
    """A real progressive JPEG whose last scan is repeated `repeat` more times (valid, slower per scan)."""
    data = _photo(400, size=64, progressive=True, quality=90)
    last = data.rfind(b"\xff\xda")
    eoi = data.rfind(b"\xff\xd9")
    scan = data[last:eoi]
    bomb = data[:eoi] + scan * repeat + data[eoi:]
    return bomb, bomb.count(b"\xff\xda")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("verify", ["header", "decode"])
def test_jpeg_scan_bombs_are_slow_decode_before_any_pixel_is_decoded(verify):
    normal, normal_scans = _progressive_with_repeated_scans(0)
    near, near_scans = _progressive_with_repeated_scans(100 - normal_scans)
    bomb, bomb_scans = _progressive_with_repeated_scans(20_000)
    assert 1 < normal_scans < 20 and near_scans == 100 and bomb_scans > 20_000
    items = [InputItem(uri=f"{name}.jpg", source="t", read=lambda d=d: d)
             for name, d in (("normal", normal), ("near", near), ("bomb", bomb))]
    t0 = time.monotonic()
    images, quarantine, counters = ingest_shard(items, 16, 10**8, set(), verify=verify)
    assert time.monotonic() - t0 < 10  # the bomb alone decodes for minutes
    assert images.column("uri").to_pylist() == ["normal.jpg", "near.jpg"]
    (row,) = quarantine.to_pylist()
    assert row["reason"] == "slow_decode" and f"{bomb_scans} scans" in row["detail"]
    assert "ingest.max_jpeg_scans=100" in row["detail"]
    # the cap is a setting
    _, q, _ = ingest_shard(items[:1], 16, 10**8, set(), verify=verify, max_scans=normal_scans - 1)
    assert q.column("reason").to_pylist() == ["slow_decode"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("values, expected_mean", [
    (np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64), 127.5),  # 0..1: scaled
    (np.full((64, 64), 0.25, np.float32), 64.0),
    (np.linspace(0.0, 255.0, 64 * 64, dtype=np.float32).reshape(64, 64), 127.5),  # 0..255: kept
    (np.where(np.eye(64, dtype=bool), np.nan, 0.5).astype(np.float32), 126.5),  # NaN on the diagonal: black
])
def test_float_tiff_is_scaled_not_black(values, expected_mean):
    buf = io.BytesIO()
    Image.fromarray(values, mode="F").save(buf, format="TIFF")
    images, quarantine, _ = ingest_shard([InputItem(uri="f.tif", source="t", read=lambda: buf.getvalue())],
                                         16, 10**8, set())
    assert quarantine.num_rows == 0 and images.column("mode").to_pylist() == ["F"]
    rgb = np.asarray(decode_image(images.column("bytes")[0].as_py()))
    assert rgb.shape == (64, 64, 3) and abs(rgb.mean() - expected_mean) < 1.5, rgb.mean()


# --------------------------------------------------------------------------- 2. nothing vanishes
@pytest.mark.timeout(180)
@pytest.mark.parametrize("pattern, shard_size", [
    ("AAAAAAAA", 4),  # the example: one image named 8 times, two chunks
    ("ABABABABAB", 2),  # two images alternating over five chunks
    ("ABCAAB", 1),  # one input per chunk
    ("AAB", 4),  # one chunk only
])
def test_cross_chunk_duplicates_are_rows_in_the_data(tmp_path, pattern, shard_size):
    src = tmp_path / "in"
    src.mkdir()
    for letter in sorted(set(pattern)):
        (src / f"{letter}.jpg").write_bytes(_photo(ord(letter)))
    (src / "list.jsonl").write_text("".join(json.dumps({"path": f"{c}.jpg"}) + "\n" for c in pattern))
    summary, _, _ = _run(tmp_path, src / "list.jsonl", shard_size=shard_size)
    images, quarantine, ingest = _data(tmp_path / "out")
    distinct = len(set(pattern))
    assert sorted(u.rsplit("/", 1)[-1] for u in images) == [f"{c}.jpg" for c in sorted(set(pattern))]
    assert [r for _, r, _ in quarantine] == ["duplicate"] * (len(pattern) - distinct)
    assert ingest["duplicates"] == len(pattern) - distinct and ingest["quarantined"] == 0


def _tar_entry(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.timeout(120)
def test_every_tar_member_that_names_an_image_gets_a_row(tmp_path):
    inner = _tar_bytes([("x.jpg", _photo(1)), ("y.jpg", _photo(2))])
    src = tmp_path / "in"
    src.mkdir()
    with tarfile.open(src / "shard.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        _tar_entry(tar, "a.jpg", _photo(10))
        _tar_entry(tar, "a.txt", b"caption of a")
        _tar_entry(tar, "a.jpg", _photo(11))  # the same name again
        _tar_entry(tar, "b.jpg", _photo(12))
        _tar_entry(tar, "b.png", _photo(13, fmt="PNG"))
        _tar_entry(tar, "c.JPG", _photo(14))
        _tar_entry(tar, "c.jpg", _photo(15))
        _tar_entry(tar, "photo.v2.jpg", _photo(16))
        _tar_entry(tar, "inner.tar", inner)
        _tar_entry(tar, "link.jpg", kind=tarfile.SYMTYPE, link="a.jpg")
        _tar_entry(tar, "meta.cls", b"7")  # not an image: part of no input
    _run(tmp_path, src)
    images, quarantine, ingest = _data(tmp_path / "out")
    members = sorted(u.split("::", 1)[1] for u in images)
    assert members == ["a.jpg", "b.jpg", "b.png", "c.JPG", "c.jpg", "photo.v2.jpg"]
    reasons = {u.split("::", 1)[1]: r for u, r, _ in quarantine}
    assert reasons.pop("inner.tar") == "nested_archive" and reasons.pop("link.jpg") == "not_a_file"
    ((again, reason),) = reasons.items()
    assert again.startswith("a.jpg#byte=") and reason == "duplicate_name"
    assert ingest["inputs"] == 9
    (a,) = [r for r in _records(tmp_path / "out") if r["uri"].endswith("::a.jpg")]
    assert [t["text"] for t in a["texts"]] == ["caption of a"]  # captions stay with the sample's image


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["shard.tar::evil.jpg", "50%::x.jpg", "a::b::c.jpg"])
def test_a_file_name_holding_the_member_separator_never_shares_a_uri(tmp_path, name):
    src = tmp_path / "in"
    src.mkdir()
    tar_name, _, member = name.partition("::")
    if tar_name.endswith(".tar"):
        (src / tar_name).write_bytes(_tar_bytes([(member, _photo(1))]))
    (src / name).write_bytes(_photo(2))
    _run(tmp_path, src)
    images, quarantine, _ = _data(tmp_path / "out")
    assert not quarantine and len(images) == len(set(images)) == (2 if tar_name.endswith(".tar") else 1)
    (escaped,) = [u for u in images if u.startswith("file://")]
    assert local_path(escaped) == str(src / name) and "::" not in escaped
    assert LocationReader(local_path(escaped))() == _photo(2)


def _random_tree(root, rng: random.Random) -> int:
    """Image files (some byte copies of others), tars with repeated names, several extensions per key,
    nested tars and byte copies across tars; returns how many inputs the listing must give."""
    pool = [_photo(1000 + k, fmt=rng.choice(["JPEG", "PNG"])) for k in range(6)]
    root.mkdir()
    expected = 0
    for i in range(rng.randint(3, 9)):
        (root / f"f{i}.{rng.choice(['jpg', 'png', 'JPG'])}").write_bytes(rng.choice(pool))
        expected += 1
    for t in range(rng.randint(1, 3)):
        entries = []
        for _ in range(rng.randint(1, 8)):
            kind = rng.random()
            if kind < 0.15 and entries:
                entries.append((rng.choice(entries)[0], rng.choice(pool)))  # a repeated name
            elif kind < 0.25:
                entries.append((f"n{len(entries)}.tar", _tar_bytes([("z.jpg", rng.choice(pool))])))
            else:
                key = rng.choice(["k0", "k1", "k2", "deep/k3"])
                ext = rng.choice(["jpg", "png", "JPG", "v2.jpg", "seg.png"])
                entries.append((f"{key}.{ext}", rng.choice(pool)))
            expected += 1
        entries.append(("k0.txt", b"a caption"))  # a caption member is never an input
        (root / f"t{t}.tar").write_bytes(_tar_bytes(entries))
    return expected


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_property_inputs_equal_images_plus_quarantine_rows_in_the_data(tmp_path, seed):
    """Random trees with byte copies across chunks and inside tars, repeated member names, nested tars
    and several image members per key: every input is exactly one row (image or quarantine) in the
    data, the manifest agrees, duplicates are rows, and a rerun changes nothing."""
    rng = random.Random(seed)
    expected = _random_tree(tmp_path / "in", rng)
    shard_size = rng.choice([1, 2, 3])
    _run(tmp_path, tmp_path / "in", shard_size=shard_size)
    images, quarantine, ingest = _data(tmp_path / "out")
    assert ingest["inputs"] == expected == len(images) + len(quarantine)
    ids = run_query(tmp_path / "out", "SELECT image_id FROM images")[1]
    assert len(ids) == len(set(ids))  # one image per distinct content
    store = ShardStore(tmp_path / "out")
    before = {s: r["sha256"] for s, r in store.committed("quarantine").items()}
    _run(tmp_path, tmp_path / "in", shard_size=shard_size)
    assert {s: r["sha256"] for s, r in store.committed("quarantine").items()} == before


# --------------------------------------------------------------------------- 3. COCO file_name confined
class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):  # noqa: N802
        _Recorder.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(_photo(7))

    def log_message(self, *args):
        pass


@pytest.mark.timeout(120)
def test_coco_file_names_stay_inside_the_image_root(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        root = tmp_path / "coco"
        (root / "img").mkdir(parents=True)
        (root / "img" / "ok.jpg").write_bytes(_photo(1))
        (root / "img" / "ok2.jpg").write_bytes(_photo(2))
        secret = tmp_path / "secret.jpg"
        secret.write_bytes(_photo(3))
        names = {
            "img/ok.jpg": None, "img/../img/ok2.jpg": None,
            "../secret.jpg": "outside_root", "img/../../secret.jpg": "outside_root",
            str(secret): "outside_root", f"file://{secret}": "outside_root", f"FILE:{secret}": "outside_root",
            f"http://127.0.0.1:{port}/internal.jpg": "outside_root",
            f"HTTPS://127.0.0.1:{port}/x.jpg": "outside_root", "s3://bucket/key.jpg": "outside_root",
            "~/secret.jpg": "outside_root", "C:\\secret.jpg": "outside_root", "img\\..\\..\\secret.jpg": "outside_root",
        }
        coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)], "annotations": [],
                "categories": []}
        (root / "ann.json").write_text(json.dumps(coco))
        _run(tmp_path, root / "ann.json")
        images, quarantine, _ = _data(tmp_path / "out")
        assert sorted(u.rsplit("/", 1)[-1] for u in images) == ["ok.jpg", "ok2.jpg"]
        assert sorted(r for _, r, _ in quarantine) == ["outside_root"] * (len(names) - 2)
        assert all("image root" in d for _, _, d in quarantine)
        assert _Recorder.hits == []  # no request was sent to the internal address
    finally:
        server.shutdown()
        server.server_close()


def test_allow_urls_lets_urls_through_but_never_local_escapes():
    for name in ("http://example.org/a.jpg", "s3://bucket/a.jpg", "gs://b/c.png"):
        assert outside_root(name) is not None and outside_root(name, allow_urls=True) is None
    for name in ("file:///etc/passwd", "/etc/passwd", "../x.jpg", "a/../../x.jpg", "~/x.jpg", "D:/x.jpg"):
        assert outside_root(name, allow_urls=True) is not None, name
    for name in ("a.jpg", "a/b/../c.jpg", "./a.jpg", "a..b.jpg", "..a.jpg"):
        assert outside_root(name) is None, name


# --------------------------------------------------------------------------- 5. URLs: timeouts, deadline, reasons
class _SilentServer:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers; stops by itself."""

    def __init__(self, lifetime_s: float = 60.0):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.held: list = []
        self.deadline = time.monotonic() + lifetime_s
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while time.monotonic() < self.deadline:
            try:
                conn, _ = self.sock.accept()
                self.held.append(conn)  # held open, never read from or written to
            except OSError:
                continue
        self.close()

    def close(self):
        self.deadline = 0
        for c in self.held:
            c.close()
        self.sock.close()


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connections are refused
    return port


def _ingest_url(url: str) -> tuple[dict | None, dict | None, float]:
    """(image row, quarantine row, seconds) of ingesting one URL."""
    from engine.ingest.decode import decode_input

    t0 = time.monotonic()
    row, bad = decode_input(InputItem(uri=url, source="t", read=LocationReader(url)), 16, 10**8)
    return row, bad, time.monotonic() - t0


def _short_timeouts(monkeypatch, budget_s: float) -> None:
    """Network timeouts of 1 s and short retries, so a test of a hanging server takes seconds."""
    from engine.ingest import locations

    monkeypatch.setattr(locations, "CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(locations, "READ_TIMEOUT_S", 1.0)
    monkeypatch.setattr(locations, "RETRY_DELAYS", (0.1, 0.1, 0.1))
    monkeypatch.setattr(locations, "RETRY_BUDGET_S", budget_s)


@pytest.mark.timeout(120)
def test_urls_have_timeouts_one_deadline_and_reasons_that_say_what_happened(monkeypatch, caplog):
    from engine.ingest import locations

    _short_timeouts(monkeypatch, 3.0)
    deadline = locations.RETRY_BUDGET_S + 2 * (locations.CONNECT_TIMEOUT_S + locations.READ_TIMEOUT_S) + 5
    server = _SilentServer()
    try:
        for path in ("/a.jpg", "/b/c.png?x=1"):
            url = f"http://127.0.0.1:{server.port}{path}"
            row, bad, took = _ingest_url(url)
            assert row is None and bad["reason"] == "timeout", bad
            assert took < deadline, took  # before: ~8 minutes, then called `missing`
            assert "attempts" in bad["detail"]
    finally:
        server.close()
    caplog.set_level("INFO", logger="engine.ingest.locations")
    for path in ("/x.jpg", "/y.webp"):
        url = f"http://127.0.0.1:{_closed_port()}{path}"
        caplog.clear()
        row, bad, _ = _ingest_url(url)
        assert row is None and bad["reason"] == "connection_refused", bad
        assert sum("transient read error" in r.message for r in caplog.records) >= 2  # retried as transient


class _DripServer:
    """An HTTP server on 127.0.0.1 that answers every request a byte every `every` seconds: its headers
    ("headers") or, after prompt headers claiming 1 MB, its body ("body"); stops by itself."""

    def __init__(self, mode: str, every: float = 0.05, lifetime_s: float = 60.0):
        import socket

        self.mode, self.every = mode, every
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.deadline = time.monotonic() + lifetime_s
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while time.monotonic() < self.deadline:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()
        self.sock.close()

    def _answer(self, conn):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 1000000\r\n\r\n"
        try:
            conn.settimeout(5)
            request = conn.recv(65536)
            if self.mode == "body":
                conn.sendall(head)
                if request.startswith(b"HEAD"):
                    return
            for i in range(10**6):
                if time.monotonic() > self.deadline:
                    return
                conn.sendall(head[i:i + 1] if self.mode == "headers" and i < len(head) else b"\xff")
                time.sleep(self.every)
        except OSError:
            return
        finally:
            conn.close()

    def close(self):
        self.deadline = 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["body", "headers"])
def test_a_url_that_drips_bytes_meets_one_deadline_per_input(monkeypatch, mode):
    """A server that sends a byte every 50 ms never trips the read timeout (it is per socket read): one
    deadline per input ends it, as a `timeout` that is not tried again (the attempt took past the
    retry budget); its headers dripped or its body."""
    from engine.ingest import locations

    _short_timeouts(monkeypatch, 2.0)
    monkeypatch.setattr(locations, "INPUT_DEADLINE_S", 3.0)
    server = _DripServer(mode)
    try:
        url = f"http://127.0.0.1:{server.port}/slow.jpg"
        row, bad, took = _ingest_url(url)
    finally:
        server.close()
    assert row is None and bad["reason"] == "timeout", bad
    assert "after 1 attempts" in bad["detail"], bad
    assert took < locations.INPUT_DEADLINE_S + locations.READ_TIMEOUT_S + 3, took


@pytest.mark.timeout(120)
def test_an_s3_endpoint_that_never_answers_is_a_timeout_in_bounded_time(monkeypatch):
    """S3 inputs had botocore's 60 s connect / read timeouts, retried by botocore inside s3fs's own
    attempts (67 s per input even with 1 s timeouts): the input timeouts apply, one botocore request per
    call, and the input is `timeout`."""
    import fsspec.config

    from engine.ingest import locations

    _short_timeouts(monkeypatch, 3.0)
    server = _SilentServer()
    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{server.port}"},
                                                   "key": "k", "secret": "s"})
    try:
        row, bad, took = _ingest_url("s3://bucket/b/c.png")
        assert row is None and bad["reason"] == "timeout", bad
        assert took < 30, took  # measured 15.5 s (s3fs's own 5 attempts of 1 s + 1 s); before: 67 s
    finally:
        server.close()


class _HeadOnlyS3:
    """An HTTP server on 127.0.0.1 that answers HEAD like S3 (an object of 1,000 bytes) and never answers a GET."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        stop = self.stop = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802
                self.send_response(200)
                for key, value in (("Content-Length", "1000"), ("Content-Type", "image/png"), ("ETag", '"e"'),
                                   ("Last-Modified", "Sat, 05 Dec 2026 10:00:00 GMT")):
                    self.send_header(key, value)
                self.end_headers()

            def do_GET(self):  # noqa: N802
                stop.wait(60)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("silent", ["head", "get"])
def test_an_s3_input_meets_one_deadline_whatever_the_timeouts_and_retries(monkeypatch, silent):
    """One deadline per S3 input, like URL inputs: s3fs's own 5 attempts and botocore's timeouts
    (here 30 s, the deadline 2 s) cannot stretch it, whether the endpoint is silent at the HEAD or
    only at the GET; the reason is `timeout` and says which deadline."""
    import fsspec.config

    from engine.ingest import locations

    monkeypatch.setattr(locations, "CONNECT_TIMEOUT_S", 30.0)
    monkeypatch.setattr(locations, "READ_TIMEOUT_S", 30.0)
    monkeypatch.setattr(locations, "RETRY_BUDGET_S", 1.0)  # below the deadline, as 30 s is below 120 s
    monkeypatch.setattr(locations, "INPUT_DEADLINE_S", 2.0)
    server = _SilentServer() if silent == "head" else _HeadOnlyS3()
    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{server.port}"},
                                                   "key": "k", "secret": "s"})
    try:
        row, bad, took = _ingest_url(f"s3://bucket-{silent}/b/c.png")
        assert row is None and bad["reason"] == "timeout", bad
        assert "input deadline of 2 s" in bad["detail"], bad
        assert took < 2.0 + 2.5, took  # before: 30 s x s3fs's attempts
    finally:
        server.close()


# --------------------------------------------------------------------------- 4. tar listings bounded
@pytest.mark.timeout(120)
def test_a_tar_of_many_members_is_listed_in_bounded_memory_with_a_member_cap(tmp_path, monkeypatch):
    """tarfile keeps every TarInfo it reads (1.9 GB for 1,000,000 empty members): the listing keeps
    none it does not need, and a tar over MAX_TAR_MEMBERS gives its first members plus one too_large
    row naming the limit."""
    import tracemalloc

    import engine.ingest.webdataset as wds

    path = tmp_path / "many.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(20_000):
            info = tarfile.TarInfo(f"{i}.cls")  # metadata members: part of no input
            info.size = 0
            tar.addfile(info, io.BytesIO(b""))
        for i in range(3):
            info = tarfile.TarInfo(f"img{i}.jpg")
            data = _photo(500 + i)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tracemalloc.start()
    try:
        samples = wds.list_samples(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [u.rsplit("::", 1)[1] for u, _, _ in samples] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert peak < 6 * MIB, peak  # with tarfile's own list of 20,003 TarInfo: 9 MB

    monkeypatch.setattr(wds, "MAX_TAR_MEMBERS", 20_001)
    samples = wds.list_samples(str(path))
    assert [u.rsplit("::", 1)[-1] for u, _, _ in samples[:-1]] == ["img0.jpg"]
    uri, problem, _ = samples[-1]
    assert uri == str(path) and problem.reason == "too_large" and "more than 20001 members" in problem.detail


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".json"])
def test_a_sparse_16_gb_list_or_coco_file_is_one_error_naming_it(tmp_path, ext):
    """A sparse 16 GB list / COCO file (no newline anywhere) was read whole: 9 GB, then MemoryError.
    Lines are read with a cap, a COCO JSON is streamed: one error naming the file, at once."""
    import tracemalloc

    from engine.ingest.coco import CocoError
    from engine.ingest.sources import InputError

    path = tmp_path / f"huge{ext}"
    with open(path, "wb") as f:
        f.write(b'{"path": "a.jpg"}\n' if ext == ".jsonl" else b"path\na.jpg\n" if ext == ".csv" else b"")
        f.truncate(16 << 30)  # sparse: no disk used
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises((InputError, CocoError)) as err:  # a COCO JSON is streamed: its first byte is not JSON
            list_inputs(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - t0 < 30 and peak < 200 * MIB, peak
    if ext != ".json":  # the line after the header / first row
        assert f"line {3 if ext == '.csv' else 2}: longer than" in str(err.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("column", ["path", "caption"])
def test_a_parquet_list_whose_cell_decompresses_huge_is_one_error(tmp_path, monkeypatch, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import engine.ingest.sources as sources

    monkeypatch.setattr(sources, "MAX_PARQUET_COLUMN_BYTES", 1 * MIB)
    big = "a" * (3 * MIB)  # compresses to a few KB, like the 13 KB file whose cell was 300 MB
    table = pa.table({"path": ["x.jpg", big if column == "path" else "y.jpg"],
                      "caption": ["ok", big if column == "caption" else "ok"]})
    path = tmp_path / "list.parquet"
    pq.write_table(table, path, compression="zstd")
    assert path.stat().st_size < 64 * 1024
    with pytest.raises(sources.InputError) as err:
        list_inputs(str(path))
    assert str(path) in str(err.value) and f"column '{column}'" in str(err.value)


# --------------------------------------------------------------------------- 1. pixels a step holds
@pytest.mark.timeout(120)
def test_a_shard_over_the_pixel_budget_is_decoded_batch_by_batch_with_the_same_results(monkeypatch):
    """Four 13000 x 13000 PNGs (518 KB each) made a step decode 7.2 GB at once. Over SHARD_PIXEL_BUDGET
    a step gets the encoded bytes and each stage decodes its own batches: the same records, an
    undecodable image still one error, never the whole shard in memory."""
    import pyarrow as pa

    import engine.execute as execute
    import engine.stage as stage_mod
    from engine.stage import Resources, Stage
    from schemas.records import empty_record, make_ann_id, new_annotation, source_of

    class Brightness(Stage):
        name = "brightness"
        needs_images = True
        default_resources = Resources(batch_size=2)

        def process_batch(self, records, images):
            for rec, im in zip(records, images):
                value = float(np.asarray(im.convert("L"), dtype=np.float32).mean())
                rec["texts"].append(new_annotation(source_of(self.name), ann_id=make_ann_id(rec["image_id"], self.name,
                                                   "text", len(rec["texts"])), tier="brief", text=f"{value:.3f}"))
            return records

    photos = [_photo(600 + i, size=200) for i in range(5)]
    photos[3] = photos[3][:300]  # cut: undecodable
    rows = [{"image_id": hashlib.sha256(p).hexdigest(), "uri": f"{i}.jpg", "source": "t", "width": 200,
             "height": 200, "format": "JPEG", "mode": "RGB", "bytes": p, "human": None} for i, p in enumerate(photos)]
    images = pa.Table.from_pylist(rows)
    records = stage_mod.records_to_table(empty_record(r) for r in rows)
    decodes = []
    real = stage_mod.decode_pixels
    monkeypatch.setattr(stage_mod, "decode_pixels", lambda *a: (decodes.append(1), real(*a))[1])

    def step(budget):
        monkeypatch.setattr(execute, "SHARD_PIXEL_BUDGET", budget)
        decodes.clear()
        table = execute.attach_images(records, images)
        held = stage_mod.PIXELS_COLUMN in table.column_names
        out = execute.run_stages([Brightness(), Brightness()], table, {})
        return stage_mod.table_to_records(out), held, len(decodes)

    whole, held_whole, n_whole = step(10**12)
    batched, held_batched, n_batched = step(100_000)  # under the 5 x 40,000 pixels of the shard
    assert held_whole and not held_batched
    assert n_whole == 5 and n_batched == 5 + 4  # per stage, per batch; the cut one is not tried again
    assert [r["texts"] for r in batched] == [r["texts"] for r in whole]
    assert [r["errors"] for r in batched] == [r["errors"] for r in whole]
    assert [len(r["errors"]) for r in batched] == [0, 0, 0, 1, 0] and batched[3]["errors"][0]["stage"] == "decode"


def _pixel_batches(sizes: list[tuple[int, int]], batch_size: int, first_row: int = 0) -> list[list[int]]:
    import pyarrow as pa

    from engine.execute import batch_bounds, row_pixels

    table = pa.table({"width": [w for w, _ in sizes], "height": [h for _, h in sizes]})
    pixels = row_pixels(table)
    return [pixels[a:b] for a, b in batch_bounds(len(sizes), batch_size, first_row, pixels)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sizes, batch_size, n_batches", [
    ([(4000, 4000)] * 64, 64, 16),  # many medium images: 4 of 16 MP per batch
    ([(13000, 13000)] + [(64, 64)] * 63, 64, 2),  # one huge (alone, over the budget) + many small (together)
    ([(64, 64)] * 30 + [(9000, 9000)] * 3 + [(64, 64)] * 31, 64, 5),  # huge ones in the middle
    ([(3000, 2000)] * 50, 8, 7),  # the size cut comes first
    ([(0, 0)] * 5 + [(8001, 8000)] * 2, 64, 3),  # a row over the budget by one pixel next to empty ones
])
def test_a_batch_is_cut_before_its_decoded_pixels_pass_the_budget(sizes, batch_size, n_batches):
    """batch_size x ingest.max_pixels could be decoded at once (64 x 179 MP): a stage that reads images
    gets batches cut where their pixels would pass BATCH_PIXEL_BUDGET; an image over it is a batch alone;
    every row in exactly one batch, in order; the size cuts (multiples of batch_size) stay."""
    from engine.execute import BATCH_PIXEL_BUDGET

    assert BATCH_PIXEL_BUDGET == 64_000_000  # the figure docs/security-ingest.md gives
    got = _pixel_batches(sizes, batch_size)
    assert len(got) == n_batches, [len(b) for b in got]
    assert [p for b in got for p in b] == [w * h for w, h in sizes]
    for b in got:
        assert 1 <= len(b) <= batch_size
        assert sum(b) <= BATCH_PIXEL_BUDGET or len(b) == 1, b
    cuts = np.cumsum([len(b) for b in got])
    assert set(range(batch_size, len(sizes), batch_size)) <= set(cuts.tolist())  # size cuts kept
    assert max(sum(b) for b in got) <= max(BATCH_PIXEL_BUDGET, *(w * h for w, h in sizes))


_PIXEL_STAGE = '''
import numpy as np
from engine.stage import Resources, Stage
from schemas.records import make_ann_id, new_annotation, source_of


class BatchPixels(Stage):
    """Writes, on each image, how many pixels its batch held and how many images it had."""
    name = "batch_pixels"
    needs_images = True
    default_resources = Resources(batch_size=64)

    def process_batch(self, records, images):
        held = sum(im.width * im.height for im in images if im is not None)
        for rec, im in zip(records, images):
            level = int(np.asarray(im.crop((0, 0, 8, 8))).mean())  # the pixels are there
            rec["texts"].append(new_annotation(source_of(self.name), ann_id=make_ann_id(rec["image_id"], self.name,
                                "text", 0), tier="brief", text=f"{held} {len(images)} {level}"))
        return records
'''


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_step_with_batch_size_64_of_large_images_holds_one_pixel_budget(tmp_path):
    """A real `fld run` of one stage with batch_size 64 over one 12000 x 12000 image (144 MP, under
    ingest.max_pixels), 10 of 16 MP and 40 small ones in one shard (over SHARD_PIXEL_BUDGET, so batches
    are decoded by the stage): every image a record, no batch over BATCH_PIXEL_BUDGET but the huge
    image alone, and the peak RSS under 1.9 GiB (measured 1.67 GiB; a batch of all 51 images: 2.4 GiB)."""
    from bounded import fld_bounded

    from engine.execute import BATCH_PIXEL_BUDGET

    src = tmp_path / "in"
    src.mkdir()
    sizes = {"huge.png": 12000, **{f"m{i}.png": 4000 for i in range(10)}, **{f"s{i}.png": 64 for i in range(40)}}
    for i, (name, side) in enumerate(sizes.items()):
        Image.new("RGB", (side, side), (i, 100, 200)).save(src / name)
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "pixelstage.py").write_text(_PIXEL_STAGE)
    yaml = tmp_path / "p.yaml"
    yaml.write_text("pipelines:\n  b:\n    ingest: {shard_size: 64}\n    steps:\n"
                    "      - {name: s1, stages: [{stage: 'pixelstage:BatchPixels'}]}\n")
    out = tmp_path / "out"
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), str(tmp_path / "mods")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = fld_bounded("run", yaml, "-p", "b", "-i", src, "-o", out, timeout=300, address_space_gib=6, env=env)
    res.check(rc=0, seconds=300, rss_mib=1900, clean=False)
    print(f"fld run: {res.seconds:.1f} s, peak RSS {res.rss_mib:.0f} MiB")  # shown with pytest -s
    images, quarantine, _ = _data(out)
    assert len(images) == len(sizes) and not quarantine
    recs = _records(out)
    assert {r["uri"].rsplit("/", 1)[-1] for r in recs} == set(sizes)
    for r in recs:
        held, n, _ = map(int, r["texts"][0]["text"].split())
        assert held <= BATCH_PIXEL_BUDGET or n == 1, (r["uri"], held, n)
        if r["uri"].endswith("huge.png"):
            assert n == 1 and held == 12000 * 12000


# --------------------------------------------------------------------------- 1. a MemoryError is one record's error
_MEMORY_STAGE = '''
from engine.stage import Resources, Stage
from schemas.records import make_ann_id, new_annotation, source_of


class SizeNote(Stage):
    """Notes each image's size; a batch holding the 41-pixel-wide image cannot be allocated (as a
    batched model that pads every image to the largest one would)."""
    name = "size_note"
    needs_images = True
    default_resources = Resources(batch_size=4)

    def process_batch(self, records, images):
        if any(im.width == 41 for im in images):
            raise MemoryError("cannot allocate 7.2 GiB for this batch")
        for rec, im in zip(records, images):
            rec["texts"].append(new_annotation(source_of(self.name), ann_id=make_ann_id(rec["image_id"], self.name,
                                "text", 0), tier="brief", text=f"{im.width}x{im.height}"))
        return records
'''


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["stage", "decode"])
def test_a_memory_error_on_one_record_is_that_records_error_and_the_run_goes_on(tmp_path, monkeypatch, where):
    """A real local run of six images: a MemoryError raised by a stage's batch (redone record by record,
    Stage._isolated) or by decoding one image (the step's pixel column, engine.stage.with_pixels) becomes
    that record's error naming MemoryError; the other five are annotated and the run finishes."""
    import engine.stage
    from engine.config import load_pipeline
    from engine.run import run_pipeline

    src = tmp_path / "in"
    src.mkdir()
    widths = [40, 41, 42, 43, 44, 45]
    for i, w in enumerate(widths):
        Image.new("RGB", (w, 30), (i * 40, 100, 200)).save(src / f"w{w}.png")
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "memstage.py").write_text(_MEMORY_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    bad_width = 41  # the stage's batch fails on it; in the decode variant its decode fails first
    if where == "decode":
        real = engine.stage.decode_image

        def decode(data):
            img = real(data)
            if img.width == bad_width:
                raise MemoryError("cannot allocate the pixels of this image")
            return img

        monkeypatch.setattr(engine.stage, "decode_image", decode)
    yaml = tmp_path / "p.yaml"
    yaml.write_text("pipelines:\n  m:\n    ingest: {shard_size: 6}\n    steps:\n"
                    "      - {name: s1, stages: [{stage: 'memstage:SizeNote'}]}\n")
    out = tmp_path / "out"
    summary = run_pipeline(load_pipeline(str(yaml), "m"), str(src), str(out))
    recs = {r["width"]: r for r in _records(out)}
    assert sorted(recs) == widths
    bad = recs.pop(bad_width)
    (error,) = bad["errors"]
    assert error["stage"] == ("size_note" if where == "stage" else "decode") and "MemoryError" in error["error"], error
    assert bad["texts"] == []
    for w, rec in recs.items():
        assert not rec["errors"] and [t["text"] for t in rec["texts"]] == [f"{w}x30"], rec
    counters = summary.steps["s1"]["counters"]["size_note"]
    assert counters["records_in"] == 6
    if where == "stage":
        assert counters["errors"] == 1 and counters["metrics"]["records_isolated"] == 4  # its batch of 4, redone
