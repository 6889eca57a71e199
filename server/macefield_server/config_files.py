"""Reading configuration files into typed dataclasses: one reader for the server's and the trainer's configs.

Both configs are dataclasses (:mod:`macefield_server.serving.config`, :mod:`macefield_server.training.config`);
a file is YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON (``.json``).  Unknown keys are errors that name
the key and its place (a typo must never fall back to a default silently).  Imports nothing heavy (no torch).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Type, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or value is malformed (unknown key, wrong type, bad value); the message names where."""


def read_mapping(path: str | Path) -> Dict[str, Any]:
    """The top-level mapping of a YAML, TOML or JSON file (an empty file: ``{}``)."""
    path = Path(path)
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r} (use .yaml, .toml or .json)")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: invalid {suffix[1:].upper()} ({exc})") from exc
    except Exception as exc:  # yaml.YAMLError without importing yaml up front
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
        raise
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def build(cls: Type[T], data: Any, where: str,
          nested: Optional[Mapping[str, Callable[[Any, str], Any]]] = None) -> T:
    """``cls(**data)`` for a dataclass, refusing unknown keys; ``nested[key](value, place)`` builds a field.

    ``where``: the place of ``data`` in the file ("" at the top level), used in every error message.
    ``None`` gives the dataclass's defaults.
    """
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {sorted(known)})")
    nested = nested or {}
    kwargs = {key: nested[key](value, f"{where}.{key}" if where else key) if key in nested else value
              for key, value in data.items()}
    return cls(**kwargs)


__all__ = ["ConfigError", "read_mapping", "build"]
