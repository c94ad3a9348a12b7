"""Experiments back to plain data: dicts, resolved YAML, a stable hash, flat dotted keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import yaml

from orchestrator.config.loader import _BOOL, _FLOAT, _INT
from orchestrator.config.schema import Experiment

# Fields that identify a run rather than configure it: left out of config_hash so that the hash
# of an experiment is the same before and after submit fills them in.
HASH_EXCLUDED = ("tracking.run_id", "tracking.parent_run_id")


class Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # libyaml's emitter when available
    """``yaml.SafeDumper`` that also quotes strings our YAML 1.2 loader would read as numbers
    or booleans (``'1e-4'``), so a dumped experiment reloads to equal values."""


for _tag, _rx, _first in (
    ("tag:yaml.org,2002:bool", _BOOL, "tTfF"),
    ("tag:yaml.org,2002:int", _INT, "-+0123456789"),
    ("tag:yaml.org,2002:float", _FLOAT, "-+0123456789."),
):
    Dumper.add_implicit_resolver(_tag, _rx, list(_first))


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    # Short lists of scalars on one line ([8, 11]); anything nested in block style.
    flow = all(not isinstance(item, (list, dict)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


Dumper.add_representer(list, _represent_list)


def to_plain(value: Any) -> Any:
    """Dataclasses to dicts and tuples to lists, recursively (YAML/JSON-ready)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def experiment_to_dict(exp: Experiment) -> dict:
    """Every field of ``exp`` as plain data (no ``_base_``); ``build_experiment`` reverses it."""
    return to_plain(exp)


def dump_experiment(exp: Experiment) -> str:
    """The resolved experiment as YAML that :func:`load_experiment` reloads to an equal object."""
    return yaml.dump(
        experiment_to_dict(exp), Dumper=Dumper, sort_keys=False, default_flow_style=False,
        allow_unicode=True, width=100,
    )


def config_hash(exp: Experiment, length: int = 12) -> str:
    """Short, stable sha256 hex digest of the configuration (run ids excluded)."""
    data = experiment_to_dict(exp)
    for path in HASH_EXCLUDED:
        section, key = path.split(".")
        data[section].pop(key, None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


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


def output_dir_of(exp: Experiment) -> str:
    """``runtime.output_dir`` with ``{name}`` replaced by the experiment name."""
    return exp.runtime.output_dir.replace("{name}", exp.name)
