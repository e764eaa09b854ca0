"""pipelines.yaml: parsed and validated with pydantic; every error names its YAML path.

    models:   {alias: model reference}          # real (hub) models by default
    profiles:                                    # --profile swaps models and parameters without editing pipelines
      NAME: {models: {alias: ref}, params: {STAGE: {param: value}, refine: {train: {steps: 12}}}}
    pipelines:
      NAME:
        ingest: {shard_size: 256, min_side: 16, ...}
        steps:                                   # each step writes annotations/<step>/
          - name: stage1
            stages:
              - {stage: ocr, params: {batch_size: 4}}

A configuration file is untrusted input like any other: it is read only when it is a regular
file of at most MAX_CONFIG_BYTES (engine.ingest.locations' rule: a FIFO or /dev/zero is refused
before it is opened), duplicate keys are refused (YAML would keep the last one silently),
nesting is limited, numbers must be finite and fit in 64 bits (engine.values), and every
problem is one ConfigError line naming the file and the YAML path or line.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator

from engine.registry import UnknownStageError, stage_class
from engine.stage import Stage
from engine.config_files import ConfigError, config_error, parse_yaml, read_config_text
from engine.values import BoundedModel

__all__ = ["ConfigError", "parse_yaml", "read_config_text", "load_config", "load_pipeline"]


class _Strict(BoundedModel):
    model_config = ConfigDict(extra="forbid")


class IngestConfig(_Strict):
    shard_size: int = Field(256, ge=1, description="images per shard (the unit of resume)")
    min_side: int = Field(16, ge=1, description="smaller images are quarantined as too_small")
    max_pixels: int = Field(178_956_970, ge=1, description="larger images are decompression_bomb")
    max_file_bytes: int = Field(256 << 20, ge=1, description="larger files (and tar members) are too_large, "
                                "checked before reading and while reading; default 256 MiB")
    source: str | None = Field(None, description="dataset / origin name recorded on each image")
    verify: Literal["header", "decode"] = Field("header", description="header: structure checks only (fast); "
                                                "decode: decode every image's pixels at ingest")
    image_root: str | None = Field(None, description="COCO input: image folder, relative to the JSON's folder")
    allow_urls: bool = Field(False, description="COCO input: file_name may be a URL (http(s)://, s3://, ...); by "
                             "default every file_name must stay inside the image root")
    max_caption_chars: int = Field(10_000, ge=1, description="longer imported captions are not imported (an error "
                                   "on the image names each); bounds the work of every caption stage")
    max_captions_per_image: int = Field(1_000, ge=0, description="imported captions of one image beyond this are "
                                        "not imported (one error on the image says how many)")
    max_objects_per_image: int = Field(5_000, ge=0, description="imported boxes / masks of one image beyond this are "
                                       "not imported (one error on the image says how many)")
    max_jpeg_scans: int = Field(100, ge=1, description="JPEGs with more scans are quarantined as slow_decode (a "
                                "progressive JPEG repeating its scans costs minutes per decode, in every step)")
    workers: int = Field(1, ge=0, description="chunks ingested at once: local processes, Ray / Beam tasks (0 on Ray: "
                         "as many as the cluster runs)")
    read_threads: int = Field(1, ge=1, description="threads reading the inputs of one chunk (raise it for "
                              "high-latency object stores and URLs)")


class StageSpec(_Strict):
    stage: str
    params: dict[str, Any] = Field(default_factory=dict)


class StepConfig(_Strict):
    name: str
    stages: list[StageSpec] = Field(min_length=1)
    # Ray chains the steps of a run segment into one execution; true: this step runs on its own
    # (its pools apart from the other steps', a barrier before and after it). Not part of the step's identity.
    barrier: bool = False

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, v: str) -> str:
        if not v or not v.replace("_", "").replace("-", "").isalnum():
            raise ValueError("step name must be letters, digits, '_' or '-' (it names a folder)")
        if v in ("images", "quarantine", "models", "exports"):
            raise ValueError(f"step name {v!r} is reserved")
        return v


class PipelineConfig(_Strict):
    description: str = ""
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    steps: list[StepConfig] = Field(default_factory=list, description="none: ingest only")
    rounds: int = Field(0, ge=0, description="stage-3 refinement rounds after the steps")
    refine: dict[str, Any] = Field(default_factory=dict, description="stage-3 settings")


REFINE_KEY = "refine"  # profiles.<p>.params.refine overrides the stage-3 `refine:` block


class ProfileConfig(_Strict):
    description: str = ""
    models: dict[str, str] = Field(default_factory=dict)
    params: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="stage name (or 'refine') -> parameter overrides for every use of that stage",
    )


class ProfileFile(ProfileConfig):
    """A profile in a file of its own (`--profile calibrated.yaml`, what `fld calibrate` writes): applied
    after the profile it `extends` (a profile of the pipelines file, or none)."""

    extends: str | None = None


def is_profile_file(profile: str | None) -> bool:
    """`--profile` names a file (a YAML path that exists) rather than a profile of the pipelines file."""
    return bool(profile) and profile.endswith((".yaml", ".yml")) and Path(profile).is_file()


def load_profile_file(path: str | Path) -> ProfileFile:
    return _load_yaml_model(Path(path), ProfileFile, "a profile file must be a mapping (extends, models, params)",
                            "profile file")


class FileConfig(_Strict):
    models: dict[str, str] = Field(default_factory=dict)
    profiles: dict[str, ProfileConfig] = Field(default_factory=dict)
    pipelines: dict[str, PipelineConfig]


class Pipeline:
    """A validated pipeline with its profile applied: builds stage objects per step."""

    def __init__(self, name: str, config: PipelineConfig, models: dict[str, str], origin: str, profile: str | None):
        self.name = name
        self.config = config
        self.models = models
        self.origin = origin
        self.profile = profile
        seen = set()
        for i, step in enumerate(config.steps):
            if step.name in seen:
                raise ConfigError(f"{origin}: pipelines.{name}.steps[{i}].name: duplicate step {step.name!r}")
            seen.add(step.name)
            for j, spec in enumerate(step.stages):
                self._check_stage(spec, f"pipelines.{name}.steps[{i}].stages[{j}]")
        if config.rounds or config.refine:
            from engine.registry import rounds_plan  # stage 3 owns its settings' schema

            rounds_plan(self)

    def _check_stage(self, spec: StageSpec, path: str) -> None:
        try:
            cls = stage_class(spec.stage)
        except UnknownStageError as exc:
            raise ConfigError(f"{self.origin}: {path}.stage: {exc.args[0]}") from None
        try:
            cls.Params(**spec.params)
        except ValidationError as exc:
            raise config_error(self.origin, exc, f"{path}.params") from None

    @property
    def steps(self) -> list[StepConfig]:
        return self.config.steps

    def step(self, name: str) -> StepConfig:
        for s in self.config.steps:
            if s.name == name:
                return s
        raise ConfigError(f"pipeline {self.name!r} has no step {name!r}; steps: {[s.name for s in self.steps]}")

    def build_stages(self, step: StepConfig) -> list[Stage]:
        return [stage_class(s.stage)(s.params, models=self.models) for s in step.stages]

    def step_hash(self, step_name: str) -> str:
        """The configuration identity of a step (engine.identity): what it reads + its stages."""
        from engine import identity

        h = self.ingest_hash
        for s in self.steps:
            h = identity.step_hash(self.build_stages(s), h, [spec.stage for spec in s.stages])
            if s.name == step_name:
                return h
        raise ConfigError(f"pipeline {self.name!r} has no step {step_name!r}; steps: {[s.name for s in self.steps]}")

    @property
    def ingest_hash(self) -> str:
        from engine import identity

        return identity.ingest_hash(self.config.ingest)


def load_config(path: str | Path) -> FileConfig:
    return _load_yaml_model(Path(path), FileConfig, "the top level must be a mapping with a 'pipelines' key")


def _load_yaml_model(path: Path, model: type[BaseModel], not_a_mapping: str, what: str = "pipelines file"):
    """A YAML file (a regular file, capped, duplicate keys refused) validated by a pydantic model; every error
    is a ConfigError naming the file and YAML path."""
    raw = parse_yaml(read_config_text(path, what), str(path))
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: {not_a_mapping}")
    try:
        return model(**(raw or {}))
    except ValidationError as exc:
        raise config_error(str(path), exc) from None
    except TypeError:
        raise ConfigError(f"{path}: {not_a_mapping}") from None


def packaged_pipelines() -> Path:
    """The pipelines.yaml installed with the package (a symlink to the repo's top-level file in a
    checkout; the wheel build copies its content), used when no file is given."""
    return Path(str(resources.files("engine") / "pipelines.yaml"))


def load_pipeline(path: str | Path | None, name: str, profile: str | None = None) -> Pipeline:
    """A pipeline of `path` (default: the packaged pipelines.yaml) with `profile` applied."""
    path = packaged_pipelines() if path is None else path
    cfg = load_config(path)
    if name not in cfg.pipelines:
        raise ConfigError(f"{path}: pipelines.{name}: no such pipeline; defined: {sorted(cfg.pipelines)}")
    models = dict(cfg.models)
    pipe_cfg = cfg.pipelines[name]
    if is_profile_file(profile):
        overlay = load_profile_file(profile)
        if overlay.extends:
            pipe = load_pipeline(path, name, overlay.extends)
            models, pipe_cfg = dict(pipe.models), pipe.config
        models.update(overlay.models)
        pipe_cfg = apply_profile_params(pipe_cfg, overlay.params, f"{profile}: params")
        return Pipeline(name, pipe_cfg, models, str(path), profile)
    if profile:
        if profile not in cfg.profiles:
            raise ConfigError(f"{path}: profiles.{profile}: no such profile; defined: {sorted(cfg.profiles)}")
        models.update(cfg.profiles[profile].models)
        pipe_cfg = apply_profile_params(pipe_cfg, cfg.profiles[profile].params, f"{path}: profiles.{profile}.params")
    return Pipeline(name, pipe_cfg, models, str(path), profile)


def _deep_update(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_by(override: dict, loc: tuple) -> bool:
    """Whether the value at `loc` (a pydantic error location) was set by `override`."""
    node: Any = override
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def apply_profile_params(config: PipelineConfig, overrides: dict[str, dict], where: str) -> PipelineConfig:
    """Profile parameter overrides merged into every use of each named stage (and into `refine:`).

    Why a profile and not a second pipeline: the same pipeline must finish on a CPU with tiny
    random models (short generation, one beam) and run at full length with real ones. Errors
    name the profile's YAML path when the bad value comes from the profile.
    """
    if not overrides:
        return config
    config = config.model_copy(deep=True)
    for key, values in overrides.items():
        if key == REFINE_KEY:
            continue
        try:
            cls = stage_class(key)
        except UnknownStageError as exc:
            raise ConfigError(f"{where}.{key}: {exc.args[0]}") from None
        unknown = sorted(set(values) - set(cls.Params.model_fields))
        if unknown:
            raise ConfigError(f"{where}.{key}.{unknown[0]}: not a parameter of stage {key!r}; "
                              f"parameters: {', '.join(sorted(cls.Params.model_fields))}")
        for step in config.steps:
            for spec in step.stages:
                if spec.stage != key:
                    continue
                merged = {**spec.params, **values}
                try:
                    cls.Params(**merged)
                except ValidationError as exc:
                    if _set_by(values, exc.errors()[0]["loc"][:1]):
                        raise config_error(f"{where}.{key}", exc, nested=True) from None
                spec.params = merged
    refine = overrides.get(REFINE_KEY)
    if refine:  # validated even when this pipeline has no rounds: a typo is an error everywhere
        from engine.registry import rounds_class  # stage 3 owns its settings' schema

        merged = _deep_update(config.refine, refine)
        try:
            rounds_class().Config(**merged)
        except ValidationError as exc:
            if _set_by(refine, exc.errors()[0]["loc"]):
                raise config_error(f"{where}.{REFINE_KEY}", exc, nested=True) from None
        if config.rounds or config.refine:
            config.refine = merged
    return config
