"""Experiments back to plain data: dicts, resolved YAML, a stable hash, flat dotted keys.

The serialisation itself is :mod:`detection.serialize` (shared with the training side)."""

from __future__ import annotations

from typing import Any

from detection.serialize import config_hash as _config_hash
from detection.serialize import dump_yaml, to_plain
from orchestrator.config.schema import Experiment


def experiment_to_dict(exp: Experiment) -> dict:
    """Every field of ``exp`` as plain data (no ``_base_``); ``build_experiment`` reverses it."""
    return to_plain(exp)


def dump_experiment(exp: Experiment) -> str:
    """The resolved experiment as YAML that :func:`load_experiment` reloads to an equal object."""
    return dump_yaml(exp)


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

