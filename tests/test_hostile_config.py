"""Configuration errors are one line naming the file and the key (issue 21 item 5).

Every variant goes through a real `fld run` (or `fld pipelines`) in a bounded process: exit 2,
one `error:` line naming the file and the YAML path or line, no traceback, bounded time and
memory, and OUT never created (nothing is written before the configuration is valid).
"""
import os
import stat

import pytest

from bounded import fld_bounded

GOOD = """pipelines:
  p:
    ingest: {shard_size: 2}
    steps:
      - name: s1
        stages:
          - {stage: region_filter, params: {min_side: 2.0}}
"""


def _run(tmp_path, text: str | None = None, path=None, *, says=(), seconds=60):
    if path is None:
        path = tmp_path / "pipelines.yaml"
        path.write_text(text)
    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    out = tmp_path / "out"
    res = fld_bounded("run", path, "-p", "p", "-i", src, "-o", out, timeout=seconds + 30).check(2, seconds=seconds,
                                                                                                 rss_mib=1200)
    assert str(path) in res.stderr, res.stderr
    for part in says:
        assert part in res.stderr, (part, res.stderr)
    assert not out.exists()
    return res.stderr


@pytest.mark.timeout(120)
def test_the_good_file_runs(tmp_path):
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "in" / "red.png")
    path = tmp_path / "pipelines.yaml"
    path.write_text(GOOD)
    fld_bounded("run", path, "-p", "p", "-i", tmp_path / "in", "-o", tmp_path / "out").check(0, clean=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("text,says", [
    ("a: " + "[" * 5000 + "]" * 5000 + "\n" + GOOD, ["nested deeper"]),  # flow lists
    ("a: " + "{b: " * 3000 + "1" + "}" * 3000 + "\n" + GOOD, ["nested deeper"]),  # flow mappings
    ("".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "  " * 200 + "x: 1\n", ["nested deeper"]),  # block
    (GOOD.replace("{min_side: 2.0}", "{min_side: " + "[" * 300 + "1" + "]" * 300 + "}"), ["nested deeper"]),
])
def test_deep_nesting_is_one_line(tmp_path, text, says):
    _run(tmp_path, text, says=says)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stage", ["..x:Y", ".x:Y", "...:Y", ":Y", "engine.stage:", "json:JSONDecoder",
                                   "engine.no_such_module:X", "x\\0y:Z", "os.path:" + "a" * 5000])
def test_bad_stage_import_paths_are_one_line(tmp_path, stage):
    _run(tmp_path, GOOD.replace("region_filter", f'"{stage}"'), says=["stages[0].stage"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("old,new,says", [
    ("shard_size: 2", "shard_size: 18446744073709551616", "pipelines.p.ingest.shard_size"),
    ("shard_size: 2", "shard_size: 1" + "0" * 400, "pipelines.p.ingest.shard_size"),
    ("shard_size: 2", 'shard_size: "99999999999999999999999"', "pipelines.p.ingest.shard_size"),
    ("{min_side: 2.0}", "{min_side: 2.0, batch_size: -9223372036854775809}", "batch_size"),
    ("{min_side: 2.0}", "{min_side: .nan}", "min_side"),
    ("{min_side: 2.0}", "{min_side: .inf}", "min_side"),
    ("{min_side: 2.0}", "{min_side: -.Inf}", "min_side"),
    ("{min_side: 2.0}", '{min_side: "nan"}', "min_side"),
    ("{min_side: 2.0}", '{min_side: "1e999"}', "min_side"),
    ("{min_side: 2.0}", "{min_side: 1e999}", "min_side"),
    ("{min_side: 2.0}", "{min_side: 2.0, cpus: .NaN}", "cpus"),
])
def test_numbers_must_be_finite_and_fit_64_bits(tmp_path, old, new, says):
    _run(tmp_path, GOOD.replace(old, new), says=[says])


REFINED = """pipelines:
  p:
    steps:
      - name: s1
        stages:
          - {stage: florence2, params: {model: florence2, tasks: [caption]}}
    rounds: 1
    refine: {model: florence2, train: {steps: 5}}
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("refine,says", [
    ('train: {steps: 5, weight_decay: "inf"}', "pipelines.p.refine.train.weight_decay"),
    ('train: {steps: 5, max_grad_norm: "1e999"}', "pipelines.p.refine.train.max_grad_norm"),
    ('train: {steps: 5}, relabel: {cpus: "nan"}', "pipelines.p.refine.relabel.cpus"),
    ('train: {steps: 5}, relabel: {gpus: "-Infinity"}', "pipelines.p.refine.relabel.gpus"),
    ('train: {steps: 5}, health: {min_distinct: "NaN"}', "pipelines.p.refine.health.min_distinct"),
    ("train: {steps: 5}, merge: {nms_iou: .nan}", "pipelines.p.refine.merge.nms_iou"),
    ('train: {steps: "99999999999999999999999"}', "pipelines.p.refine.train.steps"),
])
def test_the_refine_block_refuses_nan_and_inf_strings(tmp_path, refine, says):
    """Stage 3's own schema (refine/rounds.py, trainer, health) coerced "nan" / "inf" strings into floats
    that compare false with every threshold: one line naming the file and the key, nothing written."""
    _run(tmp_path, REFINED.replace("train: {steps: 5}", refine), says=[says])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("text,says", [
    (GOOD + "pipelines:\n  q: {}\n", ["duplicate key 'pipelines'", "line 8"]),
    (GOOD.replace("{shard_size: 2}", "{shard_size: 2, shard_size: 3}"), ["duplicate key 'shard_size'"]),
    (GOOD + "  p:\n    steps: []\n", ["duplicate key 'p'"]),
    (GOOD.replace("{min_side: 2.0}", "{min_side: 2.0, min_side: .nan}"), ["duplicate key 'min_side'"]),
    ("models: {a: x}\nmodels: {a: y}\n" + GOOD, ["duplicate key 'models'"]),
    (GOOD.replace("{shard_size: 2}", "{1: a, 1.0: b}"), ["duplicate key"]),
])
def test_duplicate_keys_are_refused(tmp_path, text, says):
    _run(tmp_path, text, says=says)


@pytest.mark.timeout(60)
def test_merge_keys_are_not_duplicates(tmp_path):
    text = "base: &b {shard_size: 2, min_side: 8}\n" + GOOD.replace("{shard_size: 2}", "{<<: *b, shard_size: 3}")
    (tmp_path / "p.yaml").write_text(text.replace("base:", "x_base:").replace("pipelines:", "pipelines:", 1))
    # min_side merged in from x_base, shard_size overridden: parsing passes; x_base is then not a
    # known top-level key, and the pydantic error names it
    res = fld_bounded("pipelines", tmp_path / "p.yaml").check(2)
    assert "x_base" in res.stderr and "duplicate" not in res.stderr


def _fifo(tmp_path):
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("make,says", [
    (lambda t: "/dev/zero", "character device"),
    (lambda t: "/dev/null", "character device"),
    (_fifo, "FIFO"),
    (lambda t: (t / "folder.yaml").mkdir() or t / "folder.yaml", "directory"),
    (lambda t: os.symlink("/dev/zero", t / "link.yaml") or t / "link.yaml", "character device"),
    (lambda t: os.truncate(open(t / "huge.yaml", "w").name, 40 << 20) or t / "huge.yaml", "bytes"),
    (lambda t: ((t / "bin.yaml").write_bytes(b"pipelines: \xff\xfe\n"), t / "bin.yaml")[1], "not UTF-8"),
])
def test_only_a_regular_file_is_read_as_a_pipelines_file(tmp_path, make, says):
    path = make(tmp_path)
    _run(tmp_path, path=path, says=[says], seconds=30)
    if stat.S_ISFIFO(os.stat(path).st_mode):  # fld has exited without opening it (no reader left)
        with pytest.raises(OSError):  # ENXIO: no reader has it open
            os.open(path, os.O_WRONLY | os.O_NONBLOCK)


@pytest.mark.timeout(60)
def test_fld_pipelines_lists_refuse_the_same(tmp_path):
    res = fld_bounded("pipelines", "/dev/zero").check(2, seconds=30)
    assert "/dev/zero" in res.stderr and "not read" in res.stderr
