"""Experiments back to plain data: dicts, resolved YAML, a stable hash, flat dotted keys.

The serialisation itself is :mod:`detection.serialize` (shared with the training side)."""

from __future__ import annotations

import dataclasses
from typing import Any

from detection.serialize import config_hash as _config_hash
from detection.serialize import dump_yaml, to_plain
from orchestrator.config.schema import Experiment


def experiment_to_dict(exp: Experiment) -> dict:
    """Every field of ``exp`` as plain data (no ``_base_``); ``build_experiment`` reverses it."""
    return to_plain(exp)


_SECTION_YAML: dict[int, tuple[Any, str]] = {}  # id(section) -> (section, its YAML)


def dump_experiment(exp: Experiment) -> str:
    """The resolved experiment as YAML that :func:`load_experiment` reloads to an equal object.

    The same text as ``dump_yaml(exp)``, written one top-level section at a time: the YAML of a
    section object (frozen) is kept, so the 1000 configs of a set, whose trials share most
    sections with their experiment (:func:`~orchestrator.config.derive`), format those once."""
    parts = []
    for field in dataclasses.fields(exp):
        value = getattr(exp, field.name)
        if not dataclasses.is_dataclass(value):
            parts.append(dump_yaml({field.name: value}))
            continue
        known = _SECTION_YAML.get(id(value))
        if known is None or known[0] is not value:
            if len(_SECTION_YAML) >= 1024:
                _SECTION_YAML.clear()
            known = _SECTION_YAML[id(value)] = (value, dump_yaml({field.name: value}))
        parts.append(known[1])
    return "".join(parts)


def config_hash(exp: Experiment, length: int = 12) -> str:
    """Short, stable sha256 hex digest of the configuration (run ids excluded); the same function
    the training side tags MLflow runs with."""
    return _config_hash(exp, length)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [2]}`` -> ``{"a.b": 1, "c": [2]}``; empty mappings are kept as ``{}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat

