"""Reading a configuration file (pipelines.yaml, a model or RapidOCR config) as untrusted input.

- only a regular file of at most MAX_CONFIG_BYTES is read, by engine.ingest.locations' rule
  (stat, non-blocking open, fstat): a FIFO, /dev/zero, a device or a folder is refused before
  anything blocks or runs away;
- YAML with yaml.SafeLoader's types, plus: a duplicate key is refused (YAML keeps the last one
  silently), nesting is limited to engine.values.MAX_DEPTH;
- every number must be finite and fit in 64 bits (engine.values.number_problem);
- every problem is one ConfigError line naming the file and the YAML path or line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from engine.values import MAX_DEPTH, number_problem

MAX_CONFIG_BYTES = 16 << 20


class ConfigError(ValueError):
    """A configuration problem; the message starts with the file and the YAML path."""


def yaml_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def config_error(where: str, exc, prefix: str = "", nested: bool = False) -> ConfigError:
    """The first error of a pydantic ValidationError `exc` as one ConfigError naming its YAML path:
    `where: prefix.path: message`, or, nested (`where` already ends in a YAML path), `where.prefix.path: message`.
    Every configuration error of a pydantic model is reported through here."""
    err = exc.errors()[0]
    path = ".".join(p for p in (prefix, yaml_path(err["loc"])) if p)
    if not path:
        return ConfigError(f"{where}: {err['msg']}")
    return ConfigError(f"{where}.{path}: {err['msg']}" if nested else f"{where}: {path}: {err['msg']}")


def read_config_text(path: str | Path, what: str = "configuration file") -> str:
    """The text of a regular file of at most MAX_CONFIG_BYTES, else one ConfigError naming it."""
    from engine.ingest.locations import open_regular, read_capped
    from engine.ingest.quarantine import Quarantined

    where = str(path)
    try:
        with open_regular(where) as (f, size):
            data = read_capped(f, MAX_CONFIG_BYTES, size)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except Quarantined as exc:
        detail = exc.detail.replace("ingest.max_file_bytes", "the limit for a " + what)
        raise ConfigError(f"{where}: not read as a {what}: {detail}") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text (byte {exc.start})") from None


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader that refuses duplicate keys and nesting deeper than MAX_DEPTH."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.YAMLError(f"line {self.get_mark().line + 1}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: duplicate key {str(key)[:60]!r} "
                                         f"(first on line {seen[key] + 1}); YAML would keep only the last")
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: the constructor's own error follows
                break
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python data with _Loader's rules, or one ConfigError naming `where`."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    found = number_problem(data)
    if found:
        raise ConfigError(f"{where}: {yaml_path(found[0]) or '(top level)'}: {found[1]}")
    return data


