"""Ingest reads only what it should (issue 11 item 2): FIFOs, sockets, devices and symlink tricks are
never opened, sizes are capped before and while reading, names that are not UTF-8 are kept exactly,
Pillow sees only the supported formats, unlistable folders / cut tars / bad captions become quarantine
rows, PNG text bombs are bombs in both verify modes, transient read errors are retried, missing
protocol packages fail once, changed list-file and COCO inputs are ingested again, and a URL prefix
that cannot be listed stops the run with its name. After every ingest:
inputs = images + quarantined + duplicates, and every quarantine row has a known reason and names its file.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import resource
import socket
import stat
import struct
import subprocess
import tarfile
import textwrap
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from engine.cli import app
from engine.config import load_pipeline
from engine.ingest import locations
from engine.ingest.decode import QUARANTINE_REASONS, ingest_shard
from engine.ingest.locations import LocationReader, local_path, open_regular
from engine.images import IMAGE_FORMATS
from engine.ingest.quarantine import Quarantined
from engine.ingest.sources import InputItem, list_inputs
from engine.views.query import run_query
from engine.run import run_pipeline
from engine.store import ShardStore
from helpers import image_uris as _images
from helpers import ingest_pipeline as _pipeline
from helpers import ingest_run as _run
from helpers import quarantine_rows as _quarantine
from helpers import tar_bytes as _tar_bytes

GIB = 1 << 30
# --------------------------------------------------------------------------- helpers
def _jpeg(photos, name: str = "chelsea", size: int = 96) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(photos[name])).convert("RGB").resize((size, size)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _encode(photos, fmt: str, name: str = "coffee", size: int = 64, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(photos[name])).convert(mode).resize((size, size)).save(buf, format=fmt)
    return buf.getvalue()


def _shas(out) -> dict:
    store = ShardStore(out)
    return {f: {s: r["sha256"] for s, r in store.committed(f).items()}
            for f in ("inputs", "images", "quarantine", "annotations/s1")}


def _rerun_changes_nothing(tmp_path, src, out_name: str = "out", **ingest) -> None:
    out = tmp_path / out_name
    before = _shas(out)
    summary, _, _ = _run(tmp_path, src, out_name, **ingest)
    assert summary.steps["s1"]["shards_run"] == 0 and _shas(out) == before


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _member_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.GNU_FORMAT)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _with_chunks(png: bytes, chunks: list[bytes], after_pixels: bool) -> bytes:
    """The PNG with extra chunks right after IHDR, or between the last IDAT and IEND."""
    if after_pixels:
        iend = png.rindex(b"IEND") - 4
        return png[:iend] + b"".join(chunks) + png[iend:]
    ihdr_end = 8 + 12 + 13
    return png[:ihdr_end] + b"".join(chunks) + png[ihdr_end:]


def _fake_fs(protocol: str, **methods):
    """A fresh in-memory fsspec backend registered as `protocol` (its own store); `methods` replace
    MemoryFileSystem's (the misbehaviour a test needs). Returns an instance to put objects in."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    def strip(cls, path):
        return MemoryFileSystem._strip_protocol.__func__(cls, path.replace(f"{protocol}://", "memory://", 1))

    cls = type(f"{protocol}FS", (MemoryFileSystem,), {"protocol": (protocol,), "store": {}, "pseudo_dirs": [""],
                                                      "_strip_protocol": classmethod(strip), **methods})
    fsspec.register_implementation(protocol, cls, clobber=True)
    return cls()


# --------------------------------------------------------------------------- only regular files
@pytest.mark.timeout(120)
def test_only_regular_files_are_opened(tmp_path, photos, monkeypatch):
    """FIFOs, sockets, devices, dangling symlinks, symlink loops, and all of them behind symlinks,
    are quarantined as not_a_file without being opened (a FIFO would hang the run, /dev/zero never
    ends, opening some devices has effects); a directory named like an image is walked; a symlink to
    a real image is ingested."""
    opened = []
    real_open = os.open

    def recording_open(path, flags, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    src = tmp_path / "in"
    (src / "album.jpg").mkdir(parents=True)  # a folder named like an image: walked, not read
    (src / "album.jpg" / "inside.jpg").write_bytes(_jpeg(photos, "astronaut"))
    (src / "good.jpg").write_bytes(_jpeg(photos))
    (tmp_path / "elsewhere.png").write_bytes(_encode(photos, "PNG", "rocket"))
    os.symlink(tmp_path / "elsewhere.png", src / "linked.png")
    os.mkfifo(src / "fifo.jpg")
    os.mkfifo(src / "fifo.tar")  # the driver lists tars: it must not open this one either
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "socket.png"))
    expected = {"fifo.jpg": "a FIFO", "fifo.tar": "a FIFO", "socket.png": "a socket",
                "zero.jpg": "a character device", "null.png": "a character device", "urandom.webp": "a character device",
                "to_fifo.png": "a FIFO", "to_socket.gif": "a socket", "dangling.jpg": "does not exist",
                "loop_a.jpg": "loop", "loop_b.jpg": "loop", "self": "a folder above it", "album.jpg/up": "a folder above it"}
    for name, target in [("zero.jpg", "/dev/zero"), ("null.png", "/dev/null"), ("urandom.webp", "/dev/urandom"),
                         ("to_fifo.png", src / "fifo.jpg"), ("to_socket.gif", src / "socket.png"),
                         ("dangling.jpg", src / "nowhere.jpg"), ("loop_a.jpg", src / "loop_b.jpg"),
                         ("loop_b.jpg", src / "loop_a.jpg"), ("self", "."), ("album.jpg/up", "..")]:
        os.symlink(target, src / name)
    loops = [e for e in ("/dev/loop0", "/dev/sda") if os.path.exists(e) and stat.S_ISBLK(os.stat(e).st_mode)]
    if loops:  # a block device, where the machine has one
        os.symlink(loops[0], src / "disk.jpg")
        expected["disk.jpg"] = "a block device"
    try:
        summary, quarantine, images = _run(tmp_path, src)
    finally:
        sock.close()
    assert {os.path.relpath(u, src) for u in images} == {"album.jpg/inside.jpg", "good.jpg", "linked.png"}
    got = {os.path.relpath(u, src): q for u, q in quarantine.items()}
    assert set(got) == set(expected), got
    for name, words in expected.items():
        reason, detail = got[name]
        assert reason == "not_a_file" and words in detail, (name, detail)
    assert summary.ingest["quarantine_reasons"] == {"not_a_file": len(expected)}
    inputs_opened = [p for p in opened if p.startswith(str(src))]
    assert inputs_opened and all(stat.S_ISREG(os.stat(p).st_mode) for p in inputs_opened), inputs_opened
    _rerun_changes_nothing(tmp_path, src)

    # the same paths named by a list file (rows are not filtered by the listing: the worker checks)
    listing = tmp_path / "rows.csv"
    listing.write_text("path\n" + "\n".join(["/dev/zero", str(src / "fifo.jpg"), str(src / "album.jpg"),
                                            str(src / "good.jpg")]) + "\n")
    _, quarantine, images = _run(tmp_path, listing, "out_list")
    assert list(images) == [str(src / "good.jpg")]
    assert {u: r for u, (r, _) in quarantine.items()} == {"/dev/zero": "not_a_file", str(src / "fifo.jpg"): "not_a_file",
                                                         str(src / "album.jpg"): "not_a_file"}


@pytest.mark.timeout(60)
def test_a_list_or_coco_file_that_is_not_a_file_is_one_error(tmp_path):
    """The input itself (read in the driver) must be a regular file: one error line, exit code 2."""
    os.mkfifo(tmp_path / "list.csv")
    os.symlink("/dev/zero", tmp_path / "coco.json")
    os.symlink("/dev/urandom", tmp_path / "rows.jsonl")
    _, yaml = _pipeline(tmp_path)
    for name in ("list.csv", "coco.json", "rows.jsonl"):
        res = _cli("run", yaml, "-p", "p", "-i", tmp_path / name, "-o", tmp_path / f"out-{name}")
        assert res.exit_code == 2, res.output
        assert len(_errors(res.output)) == 1 and name in res.output and "not a regular file" in res.output


@pytest.mark.timeout(30)
def test_a_file_swapped_for_a_fifo_after_the_check_is_refused_not_waited_on(tmp_path, monkeypatch):
    """The stat before open can race with a swap: the open cannot block (O_NONBLOCK) and fstat refuses it."""
    os.mkfifo(tmp_path / "swapped.jpg")
    monkeypatch.setattr(locations, "_stat_regular", lambda path: None)  # as if it was a file a moment ago
    with pytest.raises(Quarantined) as q:
        LocationReader(str(tmp_path / "swapped.jpg"))(1000)
    assert q.value.reason == "not_a_file" and "FIFO" in q.value.detail


# --------------------------------------------------------------------------- size cap
def _sparse_tar_with_a_huge_caption(path, photos) -> None:
    """A tar that is a few KB on disk: k1 (image + a 3 GiB caption of zeros, a hole), then k2."""
    k1, k2 = _jpeg(photos, "astronaut", 64), _jpeg(photos, "coffee", 64)
    pad = lambda n: b"\0" * (-n % 512)  # noqa: E731
    with open(path, "wb") as f:
        f.write(_member_header("k1.jpg", len(k1)) + k1 + pad(len(k1)))
        f.write(_member_header("k1.txt", 3 * GIB))
        f.seek(3 * GIB, os.SEEK_CUR)
        f.write(_member_header("k2.jpg", len(k2)) + k2 + pad(len(k2)) + b"\0" * 1024)


def _tar_with_a_huge_pax_header(path, photos) -> None:
    k0, k1 = _jpeg(photos, "rocket", 64), _jpeg(photos, "camera", 64)
    pad = lambda n: b"\0" * (-n % 512)  # noqa: E731
    with open(path, "wb") as f:
        f.write(_member_header("k0.jpg", len(k0)) + k0 + pad(len(k0)))
        f.write(_member_header("././@PaxHeader", 3 * GIB, tarfile.XHDTYPE))  # tarfile reads a pax header whole
        f.seek(3 * GIB, os.SEEK_CUR)
        f.write(_member_header("k1.jpg", len(k1)) + k1 + pad(len(k1)) + b"\0" * 1024)


@pytest.mark.timeout(180)
def test_size_cap_before_and_while_reading(tmp_path, photos):
    """ingest.max_file_bytes: a file, a tar member, a caption inside a tar (also GNU sparse) or a tar
    header over the cap is too_large without being read (sparse 3 GiB files here); a file whose size
    lies (a /proc file says 0) is stopped after cap + 1 bytes. Memory stays flat."""
    cap = 300_000
    src = tmp_path / "in"
    src.mkdir()
    big = _encode(photos, "PNG", "astronaut", 512)  # a real photo, about 500 KB as PNG
    assert len(big) > cap
    (src / "big.png").write_bytes(big)
    (src / "small.jpg").write_bytes(_jpeg(photos))
    with open(src / "sparse.jpg", "wb") as f:
        f.write(_jpeg(photos, "rocket"))
        f.truncate(3 * GIB)  # 3 GiB by stat, a few KB on disk
    proc = next((p for p in ("/proc/kallsyms", "/proc/self/smaps") if os.access(p, os.R_OK)), None)
    if proc and os.stat(proc).st_size == 0 and len(open(proc, "rb").read(cap + 1)) > cap:
        os.symlink(proc, src / "says_zero.jpg")  # stat size 0, content larger than the cap
    (src / "members.tar").write_bytes(_tar_bytes([("m1.png", big), ("m2.jpg", _jpeg(photos, "camera"))]))
    _sparse_tar_with_a_huge_caption(src / "caption.tar", photos)
    _tar_with_a_huge_pax_header(src / "pax.tar", photos)
    (tmp_path / "gnu").mkdir()
    (tmp_path / "gnu" / "k3.jpg").write_bytes(_jpeg(photos, "chelsea", 80))
    with open(tmp_path / "gnu" / "k3.txt", "wb") as f:
        f.truncate(3 * GIB)
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(src / "gnu_sparse.tar"), "k3.jpg", "k3.txt"],
                   cwd=tmp_path / "gnu", check=True)
    assert os.path.getsize(src / "gnu_sparse.tar") < 1 << 20

    (tmp_path / "warm").mkdir()  # a first run imports what a run needs: not counted below
    (tmp_path / "warm" / "w.jpg").write_bytes(_jpeg(photos, "camera", 50))
    _run(tmp_path, tmp_path / "warm", "out_warm", max_file_bytes=cap)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary, quarantine, images = _run(tmp_path, src, max_file_bytes=cap)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 100, grown_mib  # the files claim 3 GiB each
    names = {os.path.relpath(u, src) for u in images}
    assert names == {"small.jpg", "members.tar::m2.jpg", "caption.tar::k2.jpg", "pax.tar::k0.jpg"}
    got = {os.path.relpath(u, src): q for u, q in quarantine.items()}
    expected = {"big.png": f"{len(big)} bytes", "sparse.jpg": f"{3 * GIB} bytes", "members.tar::m1.png": "tar header",
                "caption.tar::k1.jpg": "caption member 'k1.txt'", "gnu_sparse.tar::k3.jpg": "caption member 'k3.txt'",
                "pax.tar": "header"}
    if (src / "says_zero.jpg").exists():
        expected["says_zero.jpg"] = "while reading"
    assert set(got) == set(expected), got
    for name, words in expected.items():
        assert got[name][0] == "too_large" and words in got[name][1], (name, got[name])
    assert "max_file_bytes" in got["big.png"][1]
    _rerun_changes_nothing(tmp_path, src, max_file_bytes=cap)


@pytest.mark.timeout(60)
def test_size_cap_on_a_url_whose_listed_size_lies(tmp_path, photos):
    """fsspec: the object's info size is checked before reading; a size that lies is caught while reading."""
    from fsspec.implementations.memory import MemoryFileSystem

    def info(self, path, **kwargs):
        info = MemoryFileSystem.info(self, path, **kwargs)
        return {**info, "size": 10} if "liar" in path else info

    fs = _fake_fs("lying", info=info)
    big = _encode(photos, "PNG", "astronaut", 512)
    fs.pipe("/b/big.png", big)
    fs.pipe("/b/liar.png", big)
    fs.pipe("/b/ok.jpg", _jpeg(photos))
    _, quarantine, images = _run(tmp_path, "lying://b", max_file_bytes=200_000)
    assert list(images) == ["lying://b/ok.jpg"]
    assert quarantine["lying://b/big.png"][0] == quarantine["lying://b/liar.png"][0] == "too_large"
    assert "while reading" in quarantine["lying://b/liar.png"][1]


# --------------------------------------------------------------------------- names that are not UTF-8
@pytest.mark.timeout(120)
def test_names_that_are_not_utf8_are_kept_exactly(tmp_path, photos):
    """Undecodable bytes in file, folder, tar and tar-member names and in list-file rows (CSV bytes,
    JSONL escapes, binary Parquet) never crash the run (Arrow refuses such strings): the uri keeps the
    name losslessly (file:// URL, %XX for the undecodable bytes and '%'), the worker reopens the exact
    bytes, a rerun changes nothing."""
    root = os.fsencode(tmp_path / "in")
    os.makedirs(root + b"/dir\xfe")
    files = {b"caf\xe9.jpg": _jpeg(photos, "coffee"), b"100%\xff.png": _encode(photos, "PNG", "rocket"),
             b"100%.jpg": _jpeg(photos, "camera"), b"dir\xfe/inner.jpg": _jpeg(photos, "astronaut"),
             "ünïcødé.jpg".encode(): _jpeg(photos, "chelsea", 72)}
    for name, data in files.items():
        with open(root + b"/" + name, "wb") as f:
            f.write(data)
    bad_member = os.fsdecode(b"k\xff1.jpg")
    with open(root + b"/sh\xe4rd.tar", "wb") as f:
        f.write(_tar_bytes([(bad_member, _jpeg(photos, "chelsea", 88)), (os.fsdecode(b"k\xff1.txt"), b"a cat \xff\xfe")]))
    summary, quarantine, images = _run(tmp_path, os.fsdecode(root))
    assert quarantine == {}
    base = "file://" + str(tmp_path / "in")
    assert set(images) == {f"{base}/caf%E9.jpg", f"{base}/100%25%FF.png", str(tmp_path / "in" / "100%.jpg"),
                           f"{base}/dir%FE/inner.jpg", str(tmp_path / "in" / "ünïcødé.jpg"),
                           f"{base}/sh%E4rd.tar::k%FF1.jpg"}
    for uri, image_id in images.items():  # lossless: the uri leads back to the very bytes ingested
        if "::" not in uri:
            with open(local_path(uri), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == image_id, uri
    caption = run_query(tmp_path / "out", "SELECT t.text FROM records r, unnest(r.texts) AS u(t) "
                                          "WHERE r.uri LIKE '%sh%E4rd%'")[1]
    assert caption == [("a cat \ufffd\ufffd",)]
    _rerun_changes_nothing(tmp_path, os.fsdecode(root))

    # list files naming them: raw bytes in a CSV, \udcXX escapes in JSONL, a binary Parquet column
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "rows.csv").write_bytes(b"path,caption\n" + root + b"/caf\xe9.jpg,un caf\xe9\n"
                                     + root + b"/dir\xfe/inner.jpg,\n")
    (lists / "rows.jsonl").write_text(json.dumps({"path": os.fsdecode(root + b"/100%\xff.png")}) + "\n"
                                      + json.dumps({"path": "\ud800.jpg"}) + "\n")  # no file can have that name
    pq.write_table(pa.table({"path": pa.array([root + b"/sh\xe4rd.tar", root + b"/caf\xe9.jpg"], pa.binary())}),
                   lists / "rows.parquet")
    _, quarantine, images = _run(tmp_path, lists / "rows.csv", "out_csv")
    assert set(images) == {f"{base}/caf%E9.jpg", f"{base}/dir%FE/inner.jpg"} and quarantine == {}
    _, quarantine, images = _run(tmp_path, lists / "rows.jsonl", "out_jsonl")
    assert set(images) == {f"{base}/100%25%FF.png"}
    assert [(u.rsplit("/", 1)[1], r) for u, (r, _) in quarantine.items()] == [("%ED%A0%80.jpg", "missing")]
    _, quarantine, images = _run(tmp_path, lists / "rows.parquet", "out_parquet")
    assert set(images) == {f"{base}/caf%E9.jpg"}  # the tar row is not an image: quarantined, named exactly
    assert {u: r for u, (r, _) in quarantine.items()} == {f"{base}/sh%E4rd.tar": "not_image"}


# --------------------------------------------------------------------------- formats
@pytest.mark.timeout(120)
def test_only_supported_formats_reach_pillow(tmp_path, photos, monkeypatch):
    """Real EPS, PDF, ICO, PCX, TGA, PPM, SGI, DDS, IM, QOI ... files (and a PSD / SVG) renamed .jpg are
    not_image, and no Pillow plugin but the supported ones is even asked (EPS would run Ghostscript),
    in both verify modes; the steps' decoder refuses them too."""
    from engine.stage import decode_image

    Image.init()
    others = {"EPS": "RGB", "PDF": "RGB", "ICO": "RGB", "PCX": "RGB", "TGA": "RGB", "PPM": "RGB", "SGI": "RGB",
              "DDS": "RGB", "IM": "RGB", "QOI": "RGB", "MSP": "1", "XBM": "1", "SPIDER": "F", "JPEG2000": "RGB"}
    blobs, identified = {}, set()
    for fmt, mode in others.items():
        try:
            blobs[fmt] = _encode(photos, fmt, mode=mode)
        except (KeyError, OSError, ValueError):  # a plugin without its encoder on this machine
            continue
        try:
            with Image.open(io.BytesIO(blobs[fmt])):  # unrestricted, Pillow's plugin would take it
                identified.add(fmt)
        except Exception:  # noqa: BLE001,S110 - PDF: Pillow writes it, never reads it
            pass
    assert {"EPS", "ICO", "PCX", "TGA", "PPM", "SGI", "IM"} <= identified and "PDF" in blobs
    blobs["PSD"] = b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 64, 64, 8, 3) + b"\x00" * 64
    blobs["SVG"] = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'
    real = _jpeg(photos)
    calls = []

    def spy(fmt, fn):
        def wrapped(*args, **kwargs):
            calls.append(fmt)
            return fn(*args, **kwargs)
        return wrapped

    for fmt, (factory, accept) in list(Image.OPEN.items()):
        if fmt not in IMAGE_FORMATS:
            monkeypatch.setitem(Image.OPEN, fmt, (spy(fmt, factory), spy(fmt, accept) if accept else None))
    src = tmp_path / "in"
    src.mkdir()
    for fmt, blob in blobs.items():
        (src / f"{fmt.lower()}.jpg").write_bytes(blob)
    (src / "real.jpg").write_bytes(real)
    for verify in ("header", "decode"):
        _, quarantine, images = _run(tmp_path, src, f"out_{verify}", verify=verify)
        assert [os.path.basename(u) for u in images] == ["real.jpg"]
        assert {os.path.basename(u): r for u, (r, _) in quarantine.items()} == \
            {f"{fmt.lower()}.jpg": "not_image" for fmt in blobs}
    for blob in blobs.values():
        with pytest.raises(Exception):  # noqa: B017 - UnidentifiedImageError
            decode_image(blob)
    assert calls == [], sorted(set(calls))


# --------------------------------------------------------------------------- listing problems
@pytest.mark.timeout(120)
def test_unlistable_folders_become_quarantine_rows(tmp_path, photos, monkeypatch):
    """A folder that cannot be listed is a quarantine row naming it (its siblings are ingested), a
    real one (/proc/1/map_files: refused even to root without CAP_SYS_ADMIN) and a refused scandir."""
    src = tmp_path / "in"
    for sub in ("a", "locked", "z"):
        (src / sub).mkdir(parents=True)
        (src / sub / f"{sub}.jpg").write_bytes(_jpeg(photos, {"a": "astronaut", "locked": "coffee", "z": "rocket"}[sub]))
    real = "/proc/1/map_files"
    try:
        os.listdir(real)
    except PermissionError:
        os.symlink(real, src / "proc_map_files")
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    summary, quarantine, images = _run(tmp_path, src)
    assert {os.path.relpath(u, src) for u in images} == {"a/a.jpg", "z/z.jpg"}
    expected = {"locked"} | ({"proc_map_files"} if (src / "proc_map_files").is_symlink() else set())
    assert {os.path.relpath(u, src) for u in quarantine} == expected
    for reason, detail in quarantine.values():
        assert reason == "unreadable" and "cannot be listed (Permission denied)" in detail
    # the input folder itself
    _, quarantine, images = _run(tmp_path, src / "locked", "out_root")
    assert images == {} and [(r, "cannot be listed" in d) for r, d in quarantine.values()] == [("unreadable", True)]


def _sample_tar(photos, variant: int) -> bytes:
    """Four samples s0..s3 whose images differ from every other variant's (no duplicates across tars)."""
    return _tar_bytes([(f"s{i}.jpg", _jpeg(photos, name, 64 + 8 * i + variant)) for i, name in
                       enumerate(["astronaut", "coffee", "chelsea", "rocket"])])


@pytest.mark.timeout(120)
def test_webdataset_formats_captions_and_cut_or_corrupt_tars(tmp_path, photos):
    """Samples whose image is gif / bmp / tif / tiff / webp / png / jpeg are ingested; an invalid JSON
    caption (or absurdly nested) quarantines its sample only (bad_caption); a tar cut inside a member,
    inside a header or at a member boundary, with a corrupt header in the middle, not a tar at all, or
    empty: the readable samples are ingested, one row names the tar and why the rest is lost."""
    src = tmp_path / "in"
    src.mkdir()
    kinds = {"GIF": "gif", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp", "PNG": "png", "JPEG": "jpeg"}
    members = [(f"k{i}.{ext}", _encode(photos, fmt, size=48 + i)) for i, (fmt, ext) in enumerate(kinds.items())]
    members += [("k6.tiff", _encode(photos, "TIFF", "rocket", 40)), ("k6.json", b'{"caption": "a rocket"}'),
                ("k7.jpg", _jpeg(photos, "camera")), ("k7.json", b'{"caption": "unterminated'),
                ("k8.jpg", _jpeg(photos, "astronaut", 70)), ("k8.json", b"[" * 100_000 + b"]" * 100_000),
                ("k9.jpg", _jpeg(photos, "coffee", 70)), ("k9.txt", b"a cup")]
    (src / "formats.tar").write_bytes(_tar_bytes(members))

    def third_header(whole: bytes) -> int:
        return [i for i in range(0, len(whole), 512) if whole[i + 257:i + 262] == b"ustar"][2]

    cuts = {
        "cut_in_member.tar": lambda w: w[: third_header(w) + 512 + 100],  # s2's data is cut
        "cut_in_header.tar": lambda w: w[: third_header(w) + 200],
        "cut_at_boundary.tar": lambda w: w[:third_header(w)],  # no end-of-archive block
        "corrupt_header.tar": lambda w: w[:third_header(w)] + b"\x7f" * 512 + w[third_header(w) + 512:],
        "not_a_tar.tar": lambda w: b"this is not a tar archive at all, " * 40,
        "empty.tar": lambda w: b"",
    }
    for variant, (name, cut) in enumerate(cuts.items()):
        (src / name).write_bytes(cut(_sample_tar(photos, variant)))
    summary, quarantine, images = _run(tmp_path, src)
    ingested = {os.path.relpath(u, src) for u in images}
    assert {f"formats.tar::{n}" for n, _ in members if not n.endswith(("json", "txt")) and n[:2] not in ("k7", "k8")} \
        <= ingested
    for name in ("cut_in_member", "cut_in_header", "cut_at_boundary", "corrupt_header"):
        assert {f"{name}.tar::s0.jpg", f"{name}.tar::s1.jpg"} <= ingested, name
    got = {os.path.relpath(u, src): q for u, q in quarantine.items()}
    expected = {"formats.tar::k7.jpg": ("bad_caption", "'k7.json' is not valid JSON"),
                "formats.tar::k8.jpg": ("bad_caption", "'k8.json' is not valid JSON"),
                "cut_in_member.tar::s2.jpg": ("truncated", "the tar ends inside this member"),
                "cut_in_member.tar": ("truncated", "the tar is cut after 3 members"),
                "cut_in_header.tar": ("truncated", "after 2 members"),
                "cut_at_boundary.tar": ("truncated", "without its end-of-archive block after 2 members"),
                "corrupt_header.tar": ("unreadable", "corrupt header"),
                "not_a_tar.tar": ("unreadable", "not a readable tar archive"),
                "empty.tar": ("empty", "an empty file")}
    assert set(got) == set(expected), got
    for name, (reason, words) in expected.items():
        assert got[name][0] == reason and words in got[name][1], (name, got[name])
    captions = dict(run_query(tmp_path / "out", "SELECT r.uri, t.text FROM records r, unnest(r.texts) AS u(t)")[1])
    assert captions == {str(src / "formats.tar") + "::k6.tiff": "a rocket", str(src / "formats.tar") + "::k9.jpg": "a cup"}
    _rerun_changes_nothing(tmp_path, src)


# --------------------------------------------------------------------------- PNG text bombs
@pytest.mark.timeout(120)
@pytest.mark.parametrize("verify", ["header", "decode"])
def test_png_text_and_icc_chunk_bombs(photos, verify):
    """zTXt / iTXt / iCCP chunks that decompress past Pillow's MAX_TEXT_CHUNK, and text chunks past
    MAX_TEXT_MEMORY in total, before or after the pixels: decompression_bomb in both verify modes
    (a PNG's chunks after IDAT are read by Pillow only when it decodes). Small ones are fine."""
    png = _encode(photos, "PNG", "chelsea", 96)
    big = zlib.compress(b"a" * (2 << 20), 9)
    bombs = {
        "ztxt": [_png_chunk(b"zTXt", b"Comment\0\0" + big)],
        "itxt": [_png_chunk(b"iTXt", b"Comment\0\x01\0en\0\0" + big)],
        "iccp": [_png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * (2 << 20), 9))],
        "many": [_png_chunk(b"zTXt", b"k%d\0\0" % i + zlib.compress(b"b" * 1_000_000, 9)) for i in range(70)],
    }
    items, expected = [], []
    for name, chunks in bombs.items():
        for after in (False, True):
            data = _with_chunks(png, chunks, after)
            items.append(InputItem(uri=f"{name}-{'after' if after else 'before'}.png", source="t",
                                   read=lambda d=data: d))
            expected.append("decompression_bomb")
    small = [_png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"fine " * 100)), _png_chunk(b"tEXt", b"Title\0ok")]
    for after in (False, True):
        data = _with_chunks(png, small, after)
        items.append(InputItem(uri=f"small-{after}.png", source="t", read=lambda d=data: d))
    images, quarantine, counters = ingest_shard(items, 16, 10**8, set(), verify=verify)
    assert counters["inputs"] == counters["images"] + counters["quarantined"] + counters["duplicates"]
    assert quarantine.column("reason").to_pylist() == expected, quarantine.to_pylist()
    assert images.column("uri").to_pylist() == ["small-False.png", "small-True.png"]


# --------------------------------------------------------------------------- transient errors, protocols
class _Flaky:
    """What the fake backend does: `fail[path]` exceptions are raised first, one per open;
    `always[path]` on every open; `calls[path]` counts the opens."""

    fail: dict = {}
    always: dict = {}
    calls: dict = {}

    @staticmethod
    def open(fs, path, mode="rb", **kwargs):
        _Flaky.calls[path] = _Flaky.calls.get(path, 0) + 1
        if path in _Flaky.always:
            raise _Flaky.always[path]
        if _Flaky.fail.get(path):
            raise _Flaky.fail[path].pop(0)
        from fsspec.implementations.memory import MemoryFileSystem

        return MemoryFileSystem._open(fs, path, mode, **kwargs)


class _Status503(Exception):
    """Like aiohttp's ClientResponseError: the HTTP status on the exception."""

    status = 503


@pytest.mark.timeout(120)
def test_transient_read_errors_are_retried_with_backoff(tmp_path, photos, monkeypatch):
    """A fake fsspec backend fails N times then serves the bytes: connection resets, timeouts, s3fs's
    EBUSY (503 SlowDown), an HTTP 503 status are retried with growing delays; a file that keeps
    failing is unreadable after the last attempt; permissions and missing files are not retried."""
    fs = _fake_fs("flaky", _open=_Flaky.open)
    names = ["reset.jpg", "timeout.jpg", "busy.jpg", "status.jpg", "always.jpg", "denied.jpg"]
    for i, name in enumerate(names):
        fs.pipe(f"/bucket/{name}", _jpeg(photos, ["astronaut", "coffee", "chelsea", "rocket", "camera", "coffee"][i],
                                         60 + i))
    _Flaky.calls.clear()
    _Flaky.fail = {
        "/bucket/reset.jpg": [ConnectionResetError("reset"), ConnectionError("refused")],
        "/bucket/timeout.jpg": [TimeoutError("read timed out")],
        "/bucket/busy.jpg": [OSError(errno.EBUSY, "SlowDown: please reduce your request rate")] * 3,
        "/bucket/status.jpg": [_Status503("Service Unavailable"), _Status503("Service Unavailable")],
    }
    _Flaky.always = {"/bucket/always.jpg": ConnectionResetError("connection reset by peer, every time"),
                     "/bucket/denied.jpg": PermissionError(errno.EACCES, "Access Denied")}
    sleeps = []
    monkeypatch.setattr(locations.time, "sleep", lambda s: sleeps.append(s))
    listing = tmp_path / "urls.csv"
    listing.write_text("url\n" + "".join(f"flaky://bucket/{n}\n" for n in names + ["gone.jpg"]))
    _, quarantine, images = _run(tmp_path, listing)
    assert sorted(u.rsplit("/", 1)[1] for u in images) == ["busy.jpg", "reset.jpg", "status.jpg", "timeout.jpg"]
    got = {u.rsplit("/", 1)[1]: q for u, q in quarantine.items()}
    assert {n: r for n, (r, _) in got.items()} == {"always.jpg": "unreadable", "denied.jpg": "unreadable",
                                                   "gone.jpg": "missing"}
    attempts = len(locations.RETRY_DELAYS) + 1
    assert f"after {attempts} attempts" in got["always.jpg"][1] and "connection reset" in got["always.jpg"][1]
    calls = {p.rsplit("/", 1)[1]: n for p, n in _Flaky.calls.items()}
    assert calls == {"reset.jpg": 3, "timeout.jpg": 2, "busy.jpg": 4, "status.jpg": 3, "always.jpg": attempts,
                     "denied.jpg": 1}  # gone.jpg: info says missing, never opened
    assert sorted(set(sleeps)) == sorted(locations.RETRY_DELAYS) and locations.RETRY_DELAYS == tuple(
        sorted(locations.RETRY_DELAYS))  # growing delays
    assert len(sleeps) == 2 + 1 + 3 + 2 + (attempts - 1)


@pytest.mark.timeout(60)
def test_a_missing_protocol_package_fails_once_with_one_line(tmp_path):
    """Rows of a URL protocol whose fsspec backend is not installed: one error line naming the package,
    before anything is ingested, not one quarantine row per URL (also for the input URL itself)."""
    import importlib.util

    import fsspec

    fsspec.register_implementation("fldmissing", "fld_no_such_package.FileSystem", clobber=True,
                                   errtxt="Install fld_no_such_package to read fldmissing:// URLs")
    _, yaml = _pipeline(tmp_path)
    cases = [("fldmissing", "fld_no_such_package")]
    if importlib.util.find_spec("gcsfs") is None:
        cases.append(("gs", "pip install gcsfs"))
    if importlib.util.find_spec("adlfs") is None:
        cases.append(("az", "pip install adlfs"))
    for protocol, words in cases:
        listing = tmp_path / f"{protocol}.csv"
        listing.write_text("url\n" + "".join(f"{protocol}://bucket/img{i}.jpg\n" for i in range(50)))
        for src in (listing, f"{protocol}://bucket/prefix"):
            out = tmp_path / f"out-{protocol}-{'list' if src == listing else 'url'}"
            res = _cli("run", yaml, "-p", "p", "-i", src, "-o", out)
            assert res.exit_code == 2, res.output
            errors = _errors(res.output)
            assert len(errors) == 1 and words in errors[0] and f"{protocol}://" in errors[0], res.output
            assert "Traceback" not in res.output and not ShardStore(out).shards("images")


@pytest.mark.timeout(60)
def test_a_url_prefix_that_cannot_be_listed_is_an_error_naming_it(tmp_path, photos):
    """One sub-prefix whose listing fails stops the run with its name (fsspec's walk would omit it
    silently); an input that lists no image is an error too; both exit 2 with one line."""
    from fsspec.implementations.memory import MemoryFileSystem

    def ls(self, path, detail=True, **kwargs):
        if path.rstrip("/").endswith("/b"):
            raise PermissionError(errno.EACCES, "AccessDenied on ListObjectsV2")
        return MemoryFileSystem.ls(self, path, detail=detail, **kwargs)

    fs = _fake_fs("brokenls", ls=ls)
    for sub in ("a", "b", "c"):
        fs.pipe(f"/bucket/data/{sub}/x.jpg", _jpeg(photos))
    _, yaml = _pipeline(tmp_path)
    res = _cli("run", yaml, "-p", "p", "-i", "brokenls://bucket/data", "-o", tmp_path / "out")
    assert res.exit_code == 2 and len(_errors(res.output)) == 1, res.output
    assert "brokenls://bucket/data/b: this prefix cannot be listed" in res.output and "AccessDenied" in res.output
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("no images")
    (tmp_path / "nothing" / ".hidden.jpg").write_bytes(_jpeg(photos))
    res = _cli("run", yaml, "-p", "p", "-i", tmp_path / "nothing", "-o", tmp_path / "out2")
    assert res.exit_code == 2 and "lists no image" in res.output and len(_errors(res.output)) == 1, res.output


# --------------------------------------------------------------------------- changed inputs
@pytest.mark.timeout(120)
def test_list_file_and_coco_rows_whose_files_changed_are_ingested_again(tmp_path, photos, caplog):
    """The rows of a list file or COCO JSON stay the same, the files they name change: each local row
    carries its file's size + mtime, so the rerun says which chunk changed and ingests it again
    (replaced, removed, restored); nothing is reported from the old bytes."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera"]
    for n in names:
        (imgs / f"{n}.jpg").write_bytes(_jpeg(photos, n))
    (tmp_path / "list.csv").write_text("path\n" + "".join(f"imgs/{n}.jpg\n" for n in names))
    coco = {"images": [{"id": i, "file_name": f"{n}.jpg"} for i, n in enumerate(names)],
            "annotations": [{"id": 1, "image_id": 0, "caption": "an astronaut"}], "categories": []}
    (imgs / "coco.json").write_text(json.dumps(coco))
    for src, out in ((tmp_path / "list.csv", "out_list"), (imgs / "coco.json", "out_coco")):
        _, _, first = _run(tmp_path, src, out, shard_size=2)
        assert len(first) == 5
        caplog.clear()
        (imgs / "coffee.jpg").write_bytes(_jpeg(photos, "coffee", 120))  # same name, other bytes
        (imgs / "camera.jpg").unlink()
        with caplog.at_level(logging.WARNING):
            summary, quarantine, images = _run(tmp_path, src, out, shard_size=2)
        assert "changed since it was ingested" in caplog.text, out
        assert images[str(imgs / "coffee.jpg")] != first[str(imgs / "coffee.jpg")]
        assert {u: r for u, (r, _) in quarantine.items()} == {str(imgs / "camera.jpg"): "missing"}
        assert summary.steps["s1"]["counters"]["region_filter"]["records_in"] == 4
        (imgs / "camera.jpg").write_bytes(_jpeg(photos, "camera"))
        (imgs / "coffee.jpg").write_bytes(_jpeg(photos, "coffee"))
        _, quarantine, images = _run(tmp_path, src, out, shard_size=2)
        assert quarantine == {} and images == first
        _rerun_changes_nothing(tmp_path, src, out, shard_size=2)
