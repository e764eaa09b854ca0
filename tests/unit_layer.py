"""The unit layer (`python3 -m pytest -m unit`), hooked in by tests/conftest.py.

Every test of a module in UNIT_MODULES that is not marked `slow` and not listed in NOT_UNIT gets the `unit`
marker. A unit test starts no subprocess, Ray or Beam (so no SeaweedFS and no browser either): while one runs (its
fixtures included), starting any of them raises, and the test fails naming what it started, even where the code
under test catches the error. Threads left running by earlier tests are not the unit test's: what they start is
let through.
"""
from __future__ import annotations

import importlib.util
import sys
import threading

import pytest

# Modules whose tests (other than `slow` ones and NOT_UNIT) are unit tests: in-process, seconds each.
UNIT_MODULES = {
    "test_clip_model.py",
    "test_config.py",
    "test_crossfit.py",
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
    "test_quality_clip.py",
    "test_quality_controls.py",
    "test_quality_metrics.py",
    "test_quality_specialists.py",
    "test_readme.py",
    "test_refine_loop.py",
    "test_region_text.py",
    "test_schemas.py",
    "test_show.py",
    "test_store.py",
    "test_suite_order.py",
    "test_task_codec.py",
}
# Tests of those modules that are not unit tests (they start a subprocess, Ray or Beam, or take long).
NOT_UNIT = {
    "test_hostile_coco.py::test_run_finishes_and_rejections_are_counted_and_queryable",
    "test_hostile_coco.py::test_rerun_resumes_with_identical_rows",
    "test_hostile_coco.py::test_file_that_is_not_coco_is_one_clear_error_through_the_cli",
    "test_hostile_coco.py::test_a_50_mb_coco_file_is_read_in_bounded_memory",
    "test_preflight.py::test_offline_profile_resolves_everything_with_revisions",
    "test_florence2.py::test_random_build_is_identical_in_another_process",
    "test_hostile_ingest.py::test_size_cap_before_and_while_reading",
    "test_preflight.py::test_fld_run_with_unreachable_hub_exits_2_before_writing",
    "test_store.py::test_lock_refuses_a_second_run_with_a_clear_message",
    "test_store.py::test_lock_is_released_when_the_holder_is_killed",
    "test_store.py::test_lease_of_a_dead_pid_on_this_host_is_taken_over_at_once",
    "test_store.py::test_local_dir_downloads_once_per_node_and_never_deletes_a_copy_in_use",
    "test_hostile_output.py::test_warning_lines_escape_file_names",
    "test_hostile_output.py::test_usage_errors_escape_what_was_typed",
    "test_hostile_output.py::test_store_warnings_escape_the_out_name",
    "test_hostile_output.py::test_a_warning_on_a_ray_worker_reaches_the_driver_escaped",
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
        self.earlier_threads: set = set()  # threads left by earlier tests: what they start is not this test's

    def refuse(self, what: str):
        self.started.append(what)
        raise UnitLayerViolation(f"unit test {self.item.nodeid} started {what}: the unit layer starts no subprocess, "
                                 "Ray or Beam; move the test out of UNIT_MODULES / into NOT_UNIT (tests/unit_layer.py)")

    def ours(self) -> bool:
        """A unit test runs and the caller is its thread or a thread it started."""
        return self.item is not None and threading.current_thread() not in self.earlier_threads

    def audit(self, event, args):
        if event in PROCESS_EVENTS and self.ours():
            self.refuse(f"{PROCESS_EVENTS[event]} ({event} {str(args[:2])[:200]})")

    def install(self):
        if not self.installed:
            sys.addaudithook(self.audit)  # cannot be removed: it does nothing while no unit test runs
            if importlib.util.find_spec("apache_beam") is not None:
                import apache_beam.pipeline  # noqa: F401  (patched below while a unit test runs)
            if importlib.util.find_spec("torch") is not None:
                import torch  # noqa: F401  (its import looks for libraries with ldconfig: not the test's process)
            self.installed = True

    def patches(self):
        """(object, attribute, replacement) for Ray / Beam / multiprocessing while a unit test runs."""
        out = []
        def refuse(obj, name, what):
            original = getattr(obj, name)
            return obj, name, lambda *a, **k: self.refuse(what) if self.ours() else original(*a, **k)

        import multiprocessing.process
        out.append(refuse(multiprocessing.process.BaseProcess, "start", "a multiprocessing process"))
        if "ray" in sys.modules and hasattr(sys.modules["ray"], "init"):
            out.append(refuse(sys.modules["ray"], "init", "Ray (ray.init)"))
        if "apache_beam.pipeline" in sys.modules:
            out.append(refuse(sys.modules["apache_beam.pipeline"].Pipeline, "run", "a Beam pipeline (Pipeline.run)"))
        return out

    @staticmethod
    def ray_running() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and getattr(ray, "is_initialized", lambda: False)()

    def run(self, item):
        """Generator body of the hook wrappers below."""
        if item.get_closest_marker("unit") is None:
            return (yield)
        self.install()
        patches = self.patches()
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
        for obj, name, new in patches:
            setattr(obj, name, new)
        self.earlier_threads = {t for t in threading.enumerate() if t is not threading.main_thread()}
        self.item, self.started = item, []
        ray_before = self.ray_running()  # an earlier end-to-end test in this process may have left Ray up
        try:
            result = yield
        finally:
            self.item = None
            for obj, name, old in saved:
                setattr(obj, name, old)
        if self.ray_running() and not ray_before:
            self.started.append("Ray")
        if self.started:  # also when the code under test caught the error
            raise UnitLayerViolation(f"unit test {item.nodeid} started {', '.join(self.started)}; move it out of "
                                     "UNIT_MODULES / into NOT_UNIT (tests/unit_layer.py)")
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
