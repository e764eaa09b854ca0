"""Shared fixtures: real photos (scikit-image, Debian darknet) and image-record batches; the hooks of the unit
layer (`python3 -m pytest -m unit`, tests/unit_layer.py) and of the files' order (tests/suite_order.py)."""
from __future__ import annotations

import glob
import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("COLUMNS", "200")  # rich tables of the CLI unwrapped in assertions

import pyarrow as pa
import pytest
from PIL import Image

from helpers import make_batch, rendered_sign
from helpers import ocr_pipelines as write_ocr_pipelines
import suite_order
import unit_layer
from unit_layer import (  # noqa: F401  (the unit layer's hooks: pytest finds them here)
    pytest_runtest_call,
    pytest_runtest_setup,
    pytest_runtest_teardown,
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """The unit layer's markers (tests/unit_layer.py), then the files' order (tests/suite_order.py)."""
    unit_layer.pytest_collection_modifyitems(config, items)
    suite_order.heaviest_first(items)


SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
DARKNET_DIR = "/usr/share/darknet/data"


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_photos() -> list[bytes]:
    """Camera JPEGs: Debian darknet's sample photos (dog 768x576, person, horses, ...) when installed,
    else JPEG photos that ship inside scikit-image (the first one 768x576 like darknet's dog), so the
    suite runs the same on a machine without the Debian package."""
    darknet = {os.path.basename(p)[:-4]: p for p in glob.glob(os.path.join(DARKNET_DIR, "*.jpg"))}
    order = ["dog", "person", "horses", "giraffe", "kite", "eagle", "scream"]
    if all(k in darknet for k in order[:3]):
        return [open(darknet[k], "rb").read() for k in order if k in darknet]
    import skimage

    root = os.path.join(os.path.dirname(skimage.__file__), "data")
    buf = io.BytesIO()
    with Image.open(os.path.join(root, "motorcycle_left.png")) as im:
        im.convert("RGB").resize((768, 576)).save(buf, format="JPEG", quality=90)
    return [buf.getvalue()] + [open(os.path.join(root, n), "rb").read() for n in ("retina.jpg", "hubble_deep_field.jpg")]


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """name -> encoded bytes of real photos shipped by installed packages: scikit-image photos as PNG
    (`astronaut`, `coffee`, ...) and camera JPEGs `jpeg_0`, `jpeg_1`, ... (see _jpeg_photos)."""
    from skimage import data

    out = {name: _png(getattr(data, name)()) for name in SKIMAGE_PHOTOS}
    for i, blob in enumerate(_jpeg_photos()):
        out[f"jpeg_{i}"] = blob
    return out


@pytest.fixture(scope="session")
def photo_batch(photos) -> pa.Table:
    """Four real photos as a stage input batch."""
    names = list(photos)[:4]
    return make_batch({n: photos[n] for n in names})


@pytest.fixture(scope="session")
def ocr_inputs(tmp_path_factory, photos):
    """Five inputs: a rendered sign (OCR finds its words), three photos, one non-image (quarantined)."""
    d = tmp_path_factory.mktemp("ocr_inputs")
    (d / "sign.jpg").write_bytes(rendered_sign())
    for name in ("astronaut", "coffee", "chelsea"):
        (d / f"{name}.png").write_bytes(photos[name])
    (d / "notes.jpg").write_text("not an image at all")
    return d


@pytest.fixture(scope="session")
def ocr_pipelines(tmp_path_factory):
    """test_cli's `ocr` pipeline: one RapidOCR step, shards of 2 inputs."""
    return write_ocr_pipelines(tmp_path_factory.mktemp("ocr_pipelines"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photos):
    """The CLI tests' folder: a rendered sign and an exact copy of it, three photos, an empty file, a non-image."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "sign.jpg").write_bytes(rendered_sign())
    (d / "copy_of_sign.jpg").write_bytes(rendered_sign())  # exact duplicate
    for name in ("astronaut", "coffee", "chelsea"):
        (d / f"{name}.png").write_bytes(photos[name])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("not an image at all")
    return d


@pytest.fixture(scope="session")
def ocr_run(tmp_path_factory, ocr_inputs, ocr_pipelines):
    """A finished local `fld run` of the OCR pipeline (3 shards: images, quarantine, annotations/stage1).
    Tests that change it copy it first (shutil.copytree)."""
    from typer.testing import CliRunner

    from engine.cli import app

    out = tmp_path_factory.mktemp("ocr_run") / "out"
    res = CliRunner().invoke(app, ["run", str(ocr_pipelines), "--pipeline", "ocr", "--input", str(ocr_inputs), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed server` on free ports), started once per session, stopped by pid."""
    import seaweed

    server = seaweed.start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.filesystem().mkdir("fld-test")
        yield server
    finally:
        seaweed.stop(server)


@pytest.fixture()
def sync_api():
    """playwright's sync API; where chromium or playwright is missing the test is skipped, except under CI=true
    (.ci/run installs chromium): there it fails, so a CI run never passes without the browser test."""
    from helpers import missing_browser

    why = missing_browser()
    if why is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the browser test cannot run: {why}")
        pytest.skip(why)
    import playwright.sync_api

    return playwright.sync_api


@pytest.fixture()
def one_torch_thread():
    """1 intra-op torch thread for the test (2 shared cores: ~10x faster than two under contention)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
