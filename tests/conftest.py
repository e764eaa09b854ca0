"""Shared fixtures: real photos (scikit-image, Debian darknet) and image-record batches; the unit layer.

The unit layer (`python3 -m pytest -m unit`): every test of a module in UNIT_MODULES that is not marked `slow` and
not listed in NOT_UNIT gets the `unit` marker. A unit test starts no subprocess, Ray or Beam (so no SeaweedFS and
no browser either): while one runs (its fixtures included), starting any of them raises, and the test fails
naming what it started, even where the code under test catches the error.
"""
from __future__ import annotations

import glob
import importlib.util
import io
import os
import sys

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


# ---------------------------------------------------------------------- the unit layer
# Modules whose tests (other than `slow` ones and NOT_UNIT) are unit tests: in-process, seconds each.
UNIT_MODULES = {
    "test_clip_model.py",
    "test_config.py",
    "test_detect.py",
    "test_detect_ssd.py",
    "test_export.py",
    "test_filter_clip_score.py",
    "test_filter_funnel.py",
    "test_filter_grounding.py",
    "test_filter_region.py",
    "test_filter_text.py",
    "test_florence2.py",
    "test_grounding.py",
    "test_hf.py",
    "test_hostile_coco.py",
    "test_hostile_geometry.py",
    "test_hostile_ingest.py",
    "test_hostile_output.py",
    "test_ingest.py",
    "test_layering.py",
    "test_loc_tokens.py",
    "test_masks.py",
    "test_ocr.py",
    "test_phrases.py",
    "test_preflight.py",
    "test_quality_metrics.py",
    "test_quality_specialists.py",
    "test_readme.py",
    "test_refine_loop.py",
    "test_region_text.py",
    "test_schemas.py",
    "test_show.py",
    "test_store.py",
    "test_task_codec.py",
}
# Tests of those modules that are not unit tests (they start a subprocess, Ray or Beam, or take long).
NOT_UNIT = {
    "test_hostile_coco.py::test_run_finishes_and_rejections_are_counted_and_queryable",
    "test_hostile_coco.py::test_rerun_resumes_with_identical_rows",
    "test_hostile_coco.py::test_file_that_is_not_coco_is_one_clear_error_through_the_cli",
    "test_preflight.py::test_offline_profile_resolves_everything_with_revisions",
    "test_florence2.py::test_random_build_is_identical_in_another_process",
    "test_hostile_ingest.py::test_size_cap_before_and_while_reading",
    "test_preflight.py::test_fld_run_with_unreachable_hub_exits_2_before_writing",
    "test_store.py::test_lock_refuses_a_second_run_with_a_clear_message",
    "test_store.py::test_lock_is_released_when_the_holder_is_killed",
    "test_store.py::test_lease_of_a_dead_pid_on_this_host_is_taken_over_at_once",
}
# audit events (sys.addaudithook) that start another process
PROCESS_EVENTS = {"subprocess.Popen": "a subprocess", "os.fork": "a forked process", "os.forkpty": "a forked process",
                  "os.posix_spawn": "a process", "os.system": "a shell command", "os.exec": "a program"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if (item.path.name in UNIT_MODULES and item.get_closest_marker("slow") is None
                and f"{item.path.name}::{item.originalname}" not in NOT_UNIT):
            item.add_marker(pytest.mark.unit)


class UnitLayerViolation(RuntimeError):
    pass


class _Guard:
    """While a unit test runs: refuse new processes (audit hook), Ray (`ray.init`) and Beam (`Pipeline.run`)."""

    def __init__(self):
        self.item = None
        self.started: list[str] = []
        self.installed = False

    def refuse(self, what: str):
        self.started.append(what)
        raise UnitLayerViolation(f"unit test {self.item.nodeid} started {what}: the unit layer starts no subprocess, "
                                 "Ray or Beam; move the test out of UNIT_MODULES / into NOT_UNIT (tests/conftest.py)")

    def audit(self, event, args):
        if self.item is not None and event in PROCESS_EVENTS:
            self.refuse(f"{PROCESS_EVENTS[event]} ({event} {str(args[:2])[:200]})")

    def install(self):
        if not self.installed:
            sys.addaudithook(self.audit)  # cannot be removed: it does nothing while no unit test runs
            if importlib.util.find_spec("apache_beam") is not None:
                import apache_beam.pipeline  # noqa: F401  (patched below while a unit test runs)
            self.installed = True

    def patches(self):
        """(object, attribute, replacement) for Ray / Beam / multiprocessing while a unit test runs."""
        out = []
        def refuse(what):
            return lambda *a, **k: self.refuse(what)
        import multiprocessing.process
        out.append((multiprocessing.process.BaseProcess, "start", refuse("a multiprocessing process")))
        if "ray" in sys.modules and hasattr(sys.modules["ray"], "init"):
            out.append((sys.modules["ray"], "init", refuse("Ray (ray.init)")))
        if "apache_beam.pipeline" in sys.modules:
            out.append((sys.modules["apache_beam.pipeline"].Pipeline, "run", refuse("a Beam pipeline (Pipeline.run)")))
        return out

    def run(self, item):
        """Generator body of the hook wrappers below."""
        if item.get_closest_marker("unit") is None:
            return (yield)
        self.install()
        patches = self.patches()
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
        for obj, name, new in patches:
            setattr(obj, name, new)
        self.item, self.started = item, []
        try:
            result = yield
        finally:
            self.item = None
            for obj, name, old in saved:
                setattr(obj, name, old)
        ray = sys.modules.get("ray")
        if ray is not None and getattr(ray, "is_initialized", lambda: False)():
            self.started.append("Ray")
        if self.started:  # also when the code under test caught the error
            raise UnitLayerViolation(f"unit test {item.nodeid} started {', '.join(self.started)}; move it out of "
                                     "UNIT_MODULES / into NOT_UNIT (tests/conftest.py)")
        return result


_GUARD = _Guard()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _GUARD.run(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _GUARD.run(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _GUARD.run(item))
