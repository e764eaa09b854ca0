"""Ingest as a runner job: chunk plan, workers, duplicates across chunks, changed inputs, resume."""
from __future__ import annotations

import pytest

from engine.config import load_pipeline
from engine.ingest.chunks import EmptyInputError
from engine.views.query import run_query
from engine.run import run_pipeline
from engine.store import ShardStore

YAML = """
pipelines:
  p:
    ingest: {shard_size: 2, workers: WORKERS}
    steps:
      - name: s1
        stages:
          - {stage: region_filter}
"""


@pytest.fixture()
def pipelines(tmp_path):
    def make(workers: int = 1):
        p = tmp_path / f"pipelines-{workers}.yaml"
        p.write_text(YAML.replace("WORKERS", str(workers)))
        return load_pipeline(p, "p")

    return make


def _photos_dir(root, photos, names):
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        ext = "png" if photos[n][:4] == b"\x89PNG" else "jpg"
        (root / f"{i:02d}_{n}.{ext}").write_bytes(photos[n])
    return root


def _equation(summary) -> tuple:
    i = summary.ingest
    assert i["inputs"] == i["images"] + i["quarantined"] + i["duplicates"]
    return i["inputs"], i["images"], i["quarantined"], i["duplicates"]


def test_chunks_workers_and_first_copy_wins(tmp_path, photos, pipelines):
    """Two worker processes; copies of an image in three chunks: the first in input order is kept."""
    names = ["astronaut", "coffee", "chelsea", "astronaut", "rocket", "camera", "astronaut"]
    src = _photos_dir(tmp_path / "in", photos, names)
    out = tmp_path / "out"
    summary = run_pipeline(pipelines(workers=2), str(src), str(out))
    assert _equation(summary) == (7, 5, 0, 2)
    store = ShardStore(out)
    assert store.shards("inputs") == store.shards("images") == [f"part-0000{i}" for i in range(4)]
    kept = run_query(out, "SELECT uri FROM images WHERE uri LIKE '%astronaut%'")[1]
    assert [u for (u,) in kept] == [str(src / "00_astronaut.png")]
    dups = run_query(out, "SELECT uri, duplicate_of IS NOT NULL FROM quarantine WHERE reason = 'duplicate' ORDER BY uri")[1]
    assert [u.rsplit("/", 1)[1] for u, _ in dups] == ["03_astronaut.png", "06_astronaut.png"] and all(d for _, d in dups)
    assert store.commit_record("images", "part-00001")["cross_duplicates"] == 1
    # rerun: nothing is ingested or annotated again
    before = {f: {s: r["sha256"] for s, r in store.committed(f).items()} for f in ("images", "annotations/s1")}
    again = run_pipeline(pipelines(workers=2), str(src), str(out))
    assert _equation(again) == (7, 5, 0, 2) and again.steps["s1"]["shards_run"] == 0
    assert before == {f: {s: r["sha256"] for s, r in store.committed(f).items()} for f in ("images", "annotations/s1")}


def test_changed_inputs_are_said_and_reingested(tmp_path, photos, pipelines, caplog):
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera"]
    src = _photos_dir(tmp_path / "in", photos, names)
    out = tmp_path / "out"
    run_pipeline(pipelines(), str(src), str(out))
    store = ShardStore(out)
    shas = {s: r["sha256"] for s, r in store.committed("annotations/s1").items()}
    # a file of chunk 1 is replaced by another picture: only chunk 1 and its step shard are redone
    (src / "02_chelsea.png").write_bytes(photos["jpeg_0"])
    summary = run_pipeline(pipelines(), str(src), str(out))
    assert "part-00001" in caplog.text and "changed since it was ingested" in caplog.text
    assert _equation(summary) == (5, 5, 0, 0) and summary.steps["s1"]["shards_run"] == 1
    now = {s: r["sha256"] for s, r in store.committed("annotations/s1").items()}
    assert [s for s in shas if shas[s] != now[s]] == ["part-00001"]
    uris = [u for (u,) in run_query(out, "SELECT i.uri FROM records r JOIN images i USING (image_id) ORDER BY 1")[1]]
    assert len(uris) == 5
    # two files removed: the listing shrinks to 2 chunks; the third chunk's shards leave every folder
    (src / "00_astronaut.png").unlink()
    (src / "04_camera.png").unlink()
    summary = run_pipeline(pipelines(), str(src), str(out))
    assert _equation(summary) == (3, 3, 0, 0)
    for folder in ("inputs", "images", "quarantine", "annotations/s1"):
        assert store.shards(folder) == ["part-00000", "part-00001"], folder
    assert run_query(out, "SELECT count(*) FROM records")[1] == [(3,)]


def test_a_removed_first_copy_brings_its_later_copy_back(tmp_path, photos, pipelines):
    """The duplicate pass moved chunk 2's copy to quarantine; once chunk 0's copy is gone, it is an image again."""
    src = _photos_dir(tmp_path / "in", photos, ["astronaut", "coffee", "chelsea", "rocket", "astronaut"])
    out = tmp_path / "out"
    assert _equation(run_pipeline(pipelines(), str(src), str(out))) == (5, 4, 0, 1)
    (src / "00_astronaut.png").write_bytes(photos["camera"])  # same name, other picture: chunks do not shift
    summary = run_pipeline(pipelines(), str(src), str(out))
    assert _equation(summary) == (5, 5, 0, 0)
    assert [u.rsplit("/", 1)[1] for (u,) in run_query(out, "SELECT uri FROM images WHERE uri LIKE '%astronaut%' ORDER BY 1")[1]] \
        == ["00_astronaut.png", "04_astronaut.png"]  # 00 is the camera photo now, 04 the astronaut


def test_resume_without_input_uses_the_planned_chunks(tmp_path, photos, pipelines):
    src = _photos_dir(tmp_path / "in", photos, ["astronaut", "coffee", "chelsea"])
    out = tmp_path / "out"
    run_pipeline(pipelines(), str(src), str(out))
    store = ShardStore(out)
    store.uncommit("images", ["part-00001"])  # as if killed before chunk 1 was ingested
    summary = run_pipeline(pipelines(), None, str(out))
    assert _equation(summary) == (3, 3, 0, 0) and store.shards("images") == ["part-00000", "part-00001"]


def test_an_empty_input_is_an_error(tmp_path, pipelines):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(EmptyInputError, match="lists no image"):
        run_pipeline(pipelines(), str(tmp_path / "empty"), str(tmp_path / "out"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_cut_files_are_truncated_without_decoding(fmt, photos):
    """verify: header finds a cut file of every supported format from its structure alone."""
    import io

    from PIL import Image

    from engine.ingest.decode import decode_input
    from engine.ingest.sources import InputItem

    buf = io.BytesIO()
    Image.open(io.BytesIO(photos["chelsea"])).convert("RGB").save(buf, format=fmt)
    whole = buf.getvalue()
    row, bad = decode_input(InputItem(uri=f"x.{fmt}", source="t", read=lambda: whole), 16, 10**8)
    assert bad is None and (row["width"], row["height"]) == (451, 300)
    cut = whole[: len(whole) * 2 // 3]
    row, bad = decode_input(InputItem(uri=f"cut.{fmt}", source="t", read=lambda: cut), 16, 10**8)
    assert row is None and bad["reason"] == "truncated", bad


def test_corrupt_pixels_in_a_complete_file_are_an_error_of_the_first_step(tmp_path, photos):
    """verify: header ingests a structurally complete PNG whose compressed pixels are garbage; the step
    that decodes it records the error on that image and the others go on. verify: decode quarantines it."""
    data = bytearray(photos["astronaut"])
    idat = data.find(b"IDAT")
    data[idat + 100: idat + 600] = bytes(range(250)) * 2  # inside the zlib stream; IEND still at the end
    src = tmp_path / "in"
    src.mkdir()
    (src / "bad.png").write_bytes(bytes(data))
    (src / "good.png").write_bytes(photos["coffee"])
    yaml = tmp_path / "p.yaml"
    yaml.write_text("""
pipelines:
  p:
    ingest: {verify: VERIFY}
    steps:
      - name: s1
        stages:
          - {stage: ocr, params: {batch_size: 2}}
""")
    text = yaml.read_text()
    yaml.write_text(text.replace("VERIFY", "header"))
    summary = run_pipeline(load_pipeline(yaml, "p"), str(src), str(tmp_path / "header"))
    assert _equation(summary) == (2, 2, 0, 0)
    errors = run_query(tmp_path / "header", "SELECT uri, errors FROM records ORDER BY uri")[1]
    assert [len(e) for _, e in errors] == [1, 0] and errors[0][1][0]["stage"] == "decode"
    yaml.write_text(text.replace("VERIFY", "decode"))
    summary = run_pipeline(load_pipeline(yaml, "p"), str(src), str(tmp_path / "decode"))
    assert _equation(summary) == (2, 1, 1, 0)
