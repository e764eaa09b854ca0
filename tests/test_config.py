"""pipelines.yaml validation: every error names the file and the YAML path."""
import textwrap

import pytest

from engine.config import ConfigError, load_pipeline
from engine.models import parse_model_ref


def _write(tmp_path, text):
    p = tmp_path / "pipelines.yaml"
    p.write_text(textwrap.dedent(text))
    return p


GOOD = """
models: {ocr: rapidocr}
profiles:
  alt: {models: {ocr: /some/where}}
pipelines:
  p:
    steps:
      - name: stage1
        stages:
          - {stage: ocr, params: {model: ocr, min_score: 0.6}}
"""


def test_repo_pipelines_yaml_is_valid():
    from pathlib import Path

    from engine.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "pipelines.yaml")
    for name in cfg.pipelines:
        for profile in [None, *cfg.profiles]:
            load_pipeline(Path(__file__).parent.parent / "pipelines.yaml", name, profile)


def test_profile_swaps_models_and_changes_step_hash(tmp_path):
    path = _write(tmp_path, GOOD)
    base = load_pipeline(path, "p")
    alt = load_pipeline(path, "p", profile="alt")
    assert base.models["ocr"] == "rapidocr" and alt.models["ocr"] == "/some/where"
    assert base.step_hash("stage1") != alt.step_hash("stage1")
    stage = alt.build_stages(alt.steps[0])[0]
    assert stage.resolve_model(stage.params.model) == "/some/where"


@pytest.mark.parametrize(
    "text, where",
    [
        (GOOD.replace("stage: ocr,", "stage: ocrr,"), "pipelines.p.steps[0].stages[0].stage: unknown stage 'ocrr'"),
        (GOOD.replace("min_score: 0.6", "min_score: 7"), "pipelines.p.steps[0].stages[0].params.min_score"),
        (GOOD.replace("min_score: 0.6", "min_scor: 0.6"), "pipelines.p.steps[0].stages[0].params.min_scor"),
        (GOOD.replace("    steps:", "    stepz: 1\n    steps:"), "pipelines.p.stepz"),
        (GOOD.replace("name: stage1", "name: images"), "pipelines.p.steps[0].name"),
    ],
)
def test_errors_name_the_yaml_path(tmp_path, text, where):
    with pytest.raises(ConfigError) as err:
        load_pipeline(_write(tmp_path, text), "p")
    assert str(tmp_path) in str(err.value) and where in str(err.value)


def test_unknown_pipeline_and_profile(tmp_path):
    path = _write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="pipelines.q: no such pipeline"):
        load_pipeline(path, "q")
    with pytest.raises(ConfigError, match="profiles.nope: no such profile"):
        load_pipeline(path, "p", profile="nope")


def test_model_references(tmp_path):
    assert parse_model_ref("florence-community/Florence-2-large").kind == "hub"
    assert parse_model_ref(str(tmp_path)).kind == "local"
    ref = parse_model_ref("random:tiny")
    assert ref.kind == "random" and ref.random_config() == {"preset": "tiny"}
    cfg = tmp_path / "m.json"
    cfg.write_text('{"d_model": 32}')
    r = parse_model_ref(f"random:{cfg}")
    assert r.random_config() == {"d_model": 32} and r.revision.startswith("random-")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_model_ref("./missing/model_dir")


PROFILED = """
models: {florence2: "random:tiny"}
profiles:
  small:
    params:
      florence2: {max_new_tokens: 12, num_beams: 1}
      refine: {train: {steps: 3}, relabel: {max_new_tokens: 8}}
pipelines:
  p:
    steps:
      - name: stage1
        stages:
          - {stage: florence2, params: {model: florence2, max_new_tokens: 64, tasks: [caption]}}
      - name: stage2
        stages:
          - {stage: florence2, params: {model: florence2, tasks: [od]}}
    rounds: 1
    refine: {model: florence2, train: {steps: 50, lr: 1.0e-4}}
"""


def test_profile_params_override_every_use_of_a_stage_and_refine(tmp_path):
    from engine.registry import rounds_plan

    path = _write(tmp_path, PROFILED)
    base, small = load_pipeline(path, "p"), load_pipeline(path, "p", "small")
    assert [s.stages[0].params for s in small.steps] == [
        {"model": "florence2", "max_new_tokens": 12, "num_beams": 1, "tasks": ["caption"]},
        {"model": "florence2", "max_new_tokens": 12, "num_beams": 1, "tasks": ["od"]}]
    assert base.steps[0].stages[0].params["max_new_tokens"] == 64  # the pipeline itself is untouched
    stage = small.build_stages(small.steps[0])[0]
    assert (stage.params.max_new_tokens, stage.params.num_beams) == (12, 1)
    cfg = rounds_plan(small).cfg
    assert (cfg.train.steps, cfg.train.lr, cfg.relabel.max_new_tokens) == (3, 1.0e-4, 8)  # merged, lr kept
    assert base.step_hash("stage1") != small.step_hash("stage1")


@pytest.mark.parametrize("override, where", [
    ("florence2: {max_new_tokenz: 3}", "profiles.small.params.florence2.max_new_tokenz: not a parameter of stage 'florence2'"),
    ("florence2: {num_beams: 0}", "profiles.small.params.florence2.num_beams"),
    ("florence3: {num_beams: 1}", "profiles.small.params.florence3: unknown stage 'florence3'"),
    ("refine: {train: {stepz: 3}}", "profiles.small.params.refine.train.stepz"),
    ("refine: {relabel: {num_beams: -1}}", "profiles.small.params.refine.relabel.num_beams"),
])
def test_profile_param_errors_name_the_profile_path(tmp_path, override, where):
    text = PROFILED.replace("""      florence2: {max_new_tokens: 12, num_beams: 1}
      refine: {train: {steps: 3}, relabel: {max_new_tokens: 8}}""", "      " + override)
    with pytest.raises(ConfigError) as err:
        load_pipeline(_write(tmp_path, text), "p", "small")
    assert str(tmp_path) in str(err.value) and where in str(err.value)


def test_packaged_pipelines_is_the_repo_file():
    from pathlib import Path

    from engine.config import packaged_pipelines

    assert packaged_pipelines().read_text() == (Path(__file__).parent.parent / "pipelines.yaml").read_text()
    assert load_pipeline(None, "quickstart", "offline").origin == str(packaged_pipelines())
