"""Config dataclasses back to plain data, YAML text and a stable hash: the one serialisation that
the orchestrator (``orch config``, the ``config.yaml`` it writes at submit) and the training side
(the MLflow ``config_hash`` tag and ``config.yaml`` artifact) share, so the two never drift.

No torch here; PyYAML only. The YAML dialect is YAML 1.2's core schema for scalars (``1e-4`` is a
float, ``NO`` a string); the loader in :mod:`orchestrator.config.loader` reads with the same rules,
and :class:`Dumper` quotes any string those rules would read as a number or boolean, so a dumped
config reloads to equal values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

import yaml

YAML12_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
YAML12_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
YAML12_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
YAML12_RESOLVERS = (
    ("tag:yaml.org,2002:bool", YAML12_BOOL, "tTfF"),
    ("tag:yaml.org,2002:int", YAML12_INT, "-+0123456789"),
    ("tag:yaml.org,2002:float", YAML12_FLOAT, "-+0123456789."),
)

# Fields that identify a run rather than configure it: left out of config_hash so that the hash
# of an experiment is the same before and after submit fills them in.
HASH_EXCLUDED = ("tracking.parent_journal",)


class Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # libyaml's emitter when available
    """``yaml.SafeDumper`` that also quotes strings the YAML 1.2 loader would read as numbers or
    booleans (``'1e-4'``)."""


for _tag, _rx, _first in YAML12_RESOLVERS:
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


def dump_yaml(config: Any) -> str:
    """``config`` (a dataclass or plain mapping) as YAML that reloads to equal values."""
    return yaml.dump(to_plain(config), Dumper=Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)


def config_hash(config: Any, length: int = 12) -> str:
    """Short, stable sha256 hex digest of a configuration (run ids excluded)."""
    data = to_plain(config)
    for path in HASH_EXCLUDED:
        section, key = path.split(".")
        if isinstance(data.get(section), dict):
            data[section].pop(key, None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]
