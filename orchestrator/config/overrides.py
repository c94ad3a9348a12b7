"""Dotted-key overrides: ``--set optim.lr=0.01`` on the command line, or ``{"optim.lr": 0.01}``.

A value replaces what is at its key (a mapping value replaces the whole mapping; new nested keys
are created). ``--set`` values are parsed as YAML with the same loader as experiment files, so
``--set optim.lr=1e-3`` is a float, ``--set runtime.amp=true`` a boolean and
``--set schedule.milestones=[8,11]`` a list; quote a string that would parse otherwise
(``--set name="'123'"``).
"""

from __future__ import annotations

import copy
import re
from typing import Any, Iterable, Mapping

from cluster.errors import ConfigError
from orchestrator.config.loader import EXCLUSIVE_KEYS, Sources, leaf_sources, parse_yaml

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*$")


def parse_override(item: str) -> tuple[str, Any]:
    """Split one ``--set`` item ``"a.b.c=value"`` into ``("a.b.c", parsed value)``."""
    flag = f"--set {item}"
    if "=" not in item:
        raise ConfigError(f"{flag}: expected KEY=VALUE, e.g. --set optim.lr=0.01")
    key, text = item.split("=", 1)
    key = key.strip()
    if not _KEY.match(key):
        raise ConfigError(
            f"{flag}: {key!r} is not a dotted key; write section.key=value, e.g. --set optim.lr=0.01"
        )
    return key, parse_yaml(text, flag, show_line=False) if text.strip() else None


def set_dotted(mapping: dict, key: str, value: Any, where: str) -> None:
    """Set ``mapping[a][b][c] = value`` for ``key="a.b.c"``, creating missing mappings.

    A null on the way is replaced by a new mapping (``data.val`` unset in the file and
    ``--set data.val.ann_file=...``); any other non-mapping on the way is an error.
    """
    parts = key.split(".")
    node = mapping
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"{where}: cannot set {key!r}: {prefix!r} is {type(child).__name__} {child!r}, "
                "not a section; set the whole value instead"
            )
        node = child
    node[parts[-1]] = value


def apply_dotted(
    mapping: dict,
    items: Mapping[str, Any] | Iterable[tuple[str, Any]],
    sources: Sources | None = None,
    origin: str = "overrides",
    in_place: bool = False,
) -> dict:
    """Return a copy of ``mapping`` with every ``(dotted key, value)`` of ``items`` set in order
    (``in_place``: ``mapping`` itself, changed; for a mapping the caller has just made).

    ``sources`` (updated in place when given) records ``origin`` for every key path set. Setting
    ``schedule.iterations`` without ``schedule.epochs`` in the same call clears the inherited
    ``epochs`` (and the other way round); setting both is left for validation to report.
    """
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    return _apply(mapping, [(key, value, origin) for key, value in pairs], sources, in_place)


def apply_overrides(
    mapping: dict, overrides: Iterable[str] = (), sources: Sources | None = None
) -> dict:
    """Return a copy of ``mapping`` with ``--set`` items (``"a.b=value"``) applied in order."""
    triples = []
    for item in overrides:
        key, value = parse_override(item)
        triples.append((key, value, f"--set {item}"))
    return _apply(mapping, triples, sources)


def _apply(mapping: dict, triples: list[tuple[str, Any, str]], sources: Sources | None,
           in_place: bool = False) -> dict:
    result = mapping if in_place else copy.deepcopy(mapping)
    for key, value, where in triples:
        set_dotted(result, key, copy.deepcopy(value), where)
        if sources is not None:
            for path in [p for p in sources if p == key or p.startswith(key + ".")]:
                del sources[path]
            sources[key] = where
            sources.update(leaf_sources(value, where, key))
    _clear_excluded(result, triples, sources)
    return result


def _clear_excluded(result: dict, triples: list, sources: Sources | None) -> None:
    given = {key: (value, where) for key, value, where in triples}
    for section, keys in EXCLUSIVE_KEYS.items():
        set_here = [k for k in keys if given.get(f"{section}.{k}", (None,))[0] is not None]
        node = result.get(section)
        if len(set_here) != 1 or not isinstance(node, dict):
            continue
        for other in keys:
            path = f"{section}.{other}"
            if other != set_here[0] and path not in given and node.get(other) is not None:
                node[other] = None
                if sources is not None:
                    sources[path] = given[f"{section}.{set_here[0]}"][1]
