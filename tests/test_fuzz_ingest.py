"""Fuzz-style acceptance test of ingest (issue 11): 200 inputs generated from a seed (random byte
strings, real photos cut at random points or with random bytes overwritten, valid photos and copies,
WebDataset tars with random members and cuts, random names, some not UTF-8) and a COCO JSON of random
entries over them (valid and broken boxes, segmentations, categories, sizes, captions). Each goes
through a real `fld run` (ingest + region_filter): the run finishes, inputs = images + quarantined +
duplicates, every input is accounted for exactly once, every quarantine row has a known reason and a
detail naming its file, and a rerun changes nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import textwrap

import pytest
from PIL import Image
from typer.testing import CliRunner

from engine.cli import app
from engine.ingest.decode import QUARANTINE_REASONS
from engine.ingest.locations import location_of
from engine.views.query import run_query
from engine.store import ShardStore

SEED = 20261130
N_INPUTS = 200
FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
MAGICS = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x10\x00\x00\x00WEBPVP8 ", b"BM",
          b"II*\x00", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"8BPS\x00\x01", b"\x00\x00\x01\x00", b"%PDF-1.4\n"]
PIPELINES = """
pipelines:
  fuzz:
    ingest: {shard_size: 16}
    steps:
      - name: s1
        stages:
          - {stage: region_filter}
"""


def _photo(rng: random.Random, photos: dict[str, bytes]) -> tuple[bytes, str, tuple[int, int]]:
    """A real photo, randomly cropped and scaled, encoded in a random supported format."""
    with Image.open(io.BytesIO(photos[rng.choice(sorted(photos))])) as im:
        im = im.convert("RGB")
        w, h = im.size
        x0, y0 = rng.randrange(w // 2), rng.randrange(h // 2)
        size = (rng.randint(8, 120), rng.randint(8, 120))  # some under min_side: too_small
        im = im.crop((x0, y0, x0 + w // 2, y0 + h // 2)).resize(size)
        fmt = rng.choice(sorted(FORMATS))
        buf = io.BytesIO()
        im.save(buf, format=fmt)
    return buf.getvalue(), FORMATS[fmt], size


def _mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    kind = rng.choices(["valid", "truncated", "flipped"], weights=[3, 2, 2])[0]
    if kind == "truncated":
        return kind, data[: rng.randrange(1, len(data))]
    if kind == "flipped":
        out = bytearray(data)
        for _ in range(rng.randint(1, 24)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return kind, bytes(out)
    return kind, data


def _name(rng: random.Random, i: int, ext: str) -> bytes:
    stem = rng.choice([b"img", b"IMG", b"photo 1", b"caf\xe9", b"100%", "ünï".encode(), b"x\xff\xfe", b"a.b"])
    ext = ext.upper() if rng.random() < 0.2 else ext
    return b"%s-%03d%s" % (stem, i, ext.encode())


def _tar(rng: random.Random, photos) -> tuple[bytes, bool]:
    """A WebDataset tar of random samples, cut at a random point 30% of the time; (bytes, whether
    the cut lost part of it: anything before the end of its first end-of-archive block)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for k in range(rng.randint(1, 5)):
            members = []
            if k == 0 or rng.random() < 0.9:  # every tar has an image: it shows up as a sample or a problem
                data, ext, _ = _photo(rng, photos)
                members.append((f"s{k}{ext}", _mutate(rng, data)[1]))
            if rng.random() < 0.5:
                caption = rng.choice([b"a photo", b'{"caption": "a photo"}', b'{"caption": ', b"\xff\xfe bytes",
                                      b'["not", "a", "caption"]'])
                members.append((f"s{k}." + ("json" if caption[:1] in b"{[" else "txt"), caption))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    whole = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        headers = [m.offset for m in tar.getmembers()]
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512 + 512  # the first end-of-archive block included
    if rng.random() < 0.7:
        return whole, False
    cut = rng.choice([rng.randrange(1, len(whole)),  # anywhere (mostly inside a member's data)
                      rng.choice(headers) + rng.randrange(512),  # inside a header, or right at one
                      end - rng.randrange(1, 513)])  # inside the end-of-archive block
    return whole[:max(cut, 1)], max(cut, 1) < end


def _annotation(rng: random.Random, ann_id: int, image_id: int, size: tuple[int, int] | None) -> dict:
    w, h = size or (100, 100)
    ann: dict = {"id": ann_id, "image_id": image_id}
    choice = rng.randrange(10)
    if choice == 0:
        ann["caption"] = rng.choice(["a photo of something", 17, None, ["list"], "\ud800 lone surrogate"])
        return ann
    ann["category_id"] = rng.choice([1, 2, 3, 99, None, "1", [1]])
    x, y = rng.uniform(-5, w), rng.uniform(-5, h)
    bw, bh = rng.uniform(0, w), rng.uniform(0, h)
    ann["bbox"] = rng.choice([[x, y, bw, bh]] * 4 + [[float("nan"), y, bw, bh], [x, y, float("inf"), bh],
                                                    [x, y, -bw, bh], ["x", y, bw, bh], [x, y, bw], {"x": 1}, None])
    if rng.random() < 0.4:
        ann["segmentation"] = rng.choice([
            [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
            [[x, y, x + bw]],  # too short / odd
            [["a", "b", "c", "d", "e", "f"]],
            {"size": [h, w], "counts": [0, w * h]},
            {"size": [h + 7, w], "counts": [0, (h + 7) * w]},  # not the image's size
            {"size": [h, w], "counts": "garbage!"},
            "neither",
        ])
    return ann


def generate(root, photos, seed: int = SEED) -> tuple[list[bytes], dict[bytes, bool], dict]:
    """Write the fuzz inputs under root; (plain file names, tar name -> cut, COCO dict), all deterministic."""
    rng = random.Random(seed)
    os.makedirs(os.fsencode(root) + b"/sub/deeper", exist_ok=True)
    files, tars, sizes, usable = [], {}, {}, []
    for i in range(N_INPUTS):
        folder = rng.choice([b"", b"sub/", b"sub/deeper/"])
        roll = rng.random()
        size = None
        if roll < 0.12:
            name = folder + b"shard-%03d.tar" % i
            data, tars[name] = _tar(rng, photos)
        else:
            if roll < 0.32:
                prefix = rng.choice(MAGICS) if rng.random() < 0.6 else b""
                data, ext = prefix + rng.randbytes(rng.randint(0, 3000)), rng.choice(list(FORMATS.values()))
            elif roll < 0.38 and usable:
                data, ext = rng.choice(usable), ".png"  # an exact copy of an earlier image: a duplicate
            elif roll < 0.40:
                data, ext = b"", ".jpg"
            else:
                photo, ext, size = _photo(rng, photos)
                kind, data = _mutate(rng, photo)
                size = size if kind == "valid" else None
                if size and min(size) >= 16:
                    usable.append(data)
            name = folder + _name(rng, i, ext)
            files.append(name)
            sizes[name] = size
        with open(os.fsencode(root) + b"/" + name, "wb") as f:
            f.write(data)

    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": 3},
                  {"id": "x"}, {"name": "no id"}, {"id": 2, "name": "dog again"}]
    images, annotations = [], []
    for image_id, name in enumerate(files + [b"not-there-%d.jpg" % k for k in range(5)]):
        entry = {"id": image_id, "file_name": os.fsdecode(name)}
        size = sizes.get(name)
        declared = rng.choice(["right", "right", "wrong", "missing", "junk"])
        if declared == "right" and size:
            entry["width"], entry["height"] = size
        elif declared == "wrong":
            entry["width"], entry["height"] = rng.randint(1, 300), rng.randint(1, 300)
        elif declared == "junk":
            entry["width"], entry["height"] = rng.choice([("10", 10), (-4, 5), (None, 3), (1.5, 2)])
        images.append(entry)
        for _ in range(rng.randint(0, 4)):
            annotations.append(_annotation(rng, len(annotations) + 1, rng.choice([image_id] * 9 + [10_000]), size))
    images.append({"file_name": "entry-without-id.jpg"})
    return files, tars, {"images": images, "annotations": annotations, "categories": categories}


def _digest(root) -> str:
    h = hashlib.sha256()
    for folder, _, names in sorted(os.walk(os.fsencode(root))):
        for name in sorted(names):
            path = os.path.join(folder, name)
            h.update(path[len(os.fsencode(root)):] + b"\0")
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _shas(out) -> dict:
    store = ShardStore(out)
    return {f: {s: r["sha256"] for s, r in store.committed(f).items()}
            for f in ["inputs", "images", "quarantine"] + store.annotation_folders()}


def _fld_run(yaml, src, out):
    res = CliRunner().invoke(app, ["run", str(yaml), "-p", "fuzz", "-i", str(src), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return res.output


def _check_run(out, output: str) -> tuple[set[str], dict[str, str]]:
    """The invariant, the printed summary, every quarantine row; (image uris, quarantine uri -> reason)."""
    store = ShardStore(out)
    ingest = store.read_manifest()["ingest"]
    assert ingest["inputs"] == ingest["images"] + ingest["quarantined"] + ingest["duplicates"], ingest
    assert (f"inputs {ingest['inputs']} = images {ingest['images']} + quarantined {ingest['quarantined']} + "
            f"duplicates {ingest['duplicates']}") in output
    images = [u for (u,) in run_query(out, "SELECT uri FROM images")[1]]
    quarantine = run_query(out, "SELECT uri, reason, detail FROM quarantine")[1]
    assert len(images) == ingest["images"] and len(quarantine) == ingest["quarantined"] + ingest["duplicates"]
    for uri, reason, detail in quarantine:
        assert reason in QUARANTINE_REASONS, (uri, reason)
        assert detail.startswith(f"{uri}: "), (uri, detail)
    assert run_query(out, "SELECT count(*) FROM records")[1] == [(len(images),)]  # the step saw every image
    # every input once: the uris of images and quarantine together have no repeats
    uris = images + [u for u, _, _ in quarantine]
    assert len(uris) == len(set(uris)) == ingest["inputs"]
    return set(images), {u: r for u, r, _ in quarantine}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fuzz_inputs_never_break_a_run(tmp_path, photos):
    root = tmp_path / "fuzz"
    files, tars, coco = generate(root, photos)
    again = tmp_path / "again"
    generate(again, photos)
    assert _digest(root) == _digest(again) and len(files) + len(tars) == N_INPUTS  # the seed decides everything
    yaml = tmp_path / "pipelines.yaml"
    yaml.write_text(textwrap.dedent(PIPELINES))

    # the folder: plain files and tars
    out = tmp_path / "out_folder"
    images, quarantine = _check_run(out, _fld_run(yaml, root, out))
    listed = {location_of(os.fsdecode(os.fsencode(root) + b"/" + name)) for name in files}
    assert listed <= images | set(quarantine)  # every plain file is an image or a quarantine row
    assert 3 < sum(tars.values()) < len(tars)
    for tar, cut in tars.items():  # a cut tar is never a silent loss: one row names it
        uri = location_of(os.fsdecode(os.fsencode(root) + b"/" + tar))
        assert any(u.startswith(uri + "::") for u in images | set(quarantine)) or uri in quarantine, tar
        assert (uri in quarantine) == cut, (tar, cut, quarantine.get(uri))
    assert {"not_image", "truncated", "duplicate", "empty", "too_small"} <= set(quarantine.values())
    assert len(images) > 20
    before = _shas(out)
    output = _fld_run(yaml, root, out)
    assert "0 run" in output and _shas(out) == before

    # the COCO JSON of random entries over the same files
    (root / "annotations.json").write_text(json.dumps(coco))
    out = tmp_path / "out_coco"
    images, quarantine = _check_run(out, _fld_run(yaml, root / "annotations.json", out))
    assert len(images) + len(quarantine) == len(files) + 5  # + the 5 entries naming no file
    assert sum(r == "missing" for r in quarantine.values()) == 5
    errors = run_query(out, "SELECT count(*) FROM records r, unnest(r.errors) AS t(e) WHERE e.stage = 'human'")[1]
    assert errors[0][0] > 0  # broken COCO entries are refused per annotation, the images still come in
    before = _shas(out)
    output = _fld_run(yaml, root / "annotations.json", out)
    assert "0 run" in output and _shas(out) == before
