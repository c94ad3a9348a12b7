"""Read experiment YAML files: safe loading, ``_base_`` inheritance, and where each key came from.

Rules (MMDetection's, without executing anything):

- ``_base_: path`` or ``_base_: [a, b]``: paths relative to the file naming them; the bases are
  merged in order, then the file itself on top.
- Mappings deep-merge; anything else (lists, scalars, null) replaces what was inherited.
- ``_delete_: true`` in a mapping replaces the inherited mapping instead of merging into it
  (in a base file it acts on that file's own bases, not on the bases listed before it).
- ``schedule.epochs`` and ``schedule.iterations`` exclude each other: a layer (a file over its
  bases, an override over the file) that sets one of them clears the other it inherited.
  Setting one to ``null`` also clears it.

The YAML dialect is YAML 1.2's core schema for scalars: ``1e-4`` is a float (YAML 1.1 reads it as
a string), ``4:00:00`` is a string (not the sexagesimal integer 14400) and only ``true``/``false``
are booleans (so a class named ``NO`` stays a string). Duplicate keys are an error.

Every merge also records, for each dotted key path, the file (or override) that set it, so that
validation errors can say which file to fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from cluster.errors import ConfigError
from detection.serialize import YAML12_RESOLVERS

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"
DEFAULT_SOURCE = "defaults"

# Sections whose keys exclude each other: a layer that sets one (not null) clears the others.
EXCLUSIVE_KEYS: dict[str, tuple[str, ...]] = {"schedule": ("epochs", "iterations")}

Sources = dict[str, str]  # dotted key path -> file (or override) that set it

_SCALAR_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


# libyaml's parser when PyYAML was built with it (several times faster); same safe constructor.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Loader(_SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 core scalars and an error on duplicate keys."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in _SCALAR_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_yaml_int(self, node: yaml.Node) -> int:
        text = self.construct_scalar(node)
        if text.startswith("0x"):
            return int(text[2:], 16)
        if text.startswith("0o"):
            return int(text[2:], 8)
        return int(text, 10)  # "010" is ten, not YAML 1.1's octal eight

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            if isinstance(key, (list, dict)):
                break  # unhashable key: let PyYAML report it
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


for _tag, _rx, _first in YAML12_RESOLVERS:
    Loader.add_implicit_resolver(_tag, _rx, list(_first))
Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)


def parse_yaml(text: str, where: str, show_line: bool = True) -> Any:
    """Parse YAML ``text`` with the safe :class:`Loader`; errors name ``where`` (and the line)."""
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader derives from SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None and show_line else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}{line}: invalid YAML: {problem}") from None


def display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _read_file(path: Path, chain: list[Path]) -> dict:
    where = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if chain:
            trail = " -> ".join(display_path(p) for p in chain)
            raise ConfigError(
                f"base file {where} not found (_base_ chain: {trail} -> {where}); "
                "_base_ paths are relative to the file that names them"
            ) from None
        raise ConfigError(f"experiment file not found: {where}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read experiment file {where}: {err}") from None
    data = parse_yaml(text, where)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: an experiment file must be a mapping of sections, got a {type(data).__name__}"
        )
    return data


def _base_paths(data: dict, path: Path) -> list[Path]:
    bases = data.get(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(
            f"{display_path(path)}: _base_ must be a path or a list of paths, got {bases!r}"
        )
    return [path.parent / Path(b).expanduser() for b in bases]


def leaf_sources(data: Any, origin: str, prefix: str = "") -> Sources:
    """Every dotted key path in ``data`` (a nested mapping) mapped to ``origin``."""
    sources: Sources = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if key in (BASE_KEY, DELETE_KEY):
                continue
            path = f"{prefix}.{key}" if prefix else str(key)
            sources[path] = origin
            sources.update(leaf_sources(value, origin, path))
    return sources


def _strip_delete(value: Any, origin: str) -> Any:
    """Drop ``_delete_`` markers from a mapping that replaces (nothing left to delete there)."""
    if not isinstance(value, dict):
        return value
    _check_delete_flag(value, origin)
    return {k: _strip_delete(v, origin) for k, v in value.items() if k != DELETE_KEY}


def _check_delete_flag(mapping: dict, origin: str) -> bool:
    flag = mapping.get(DELETE_KEY, False)
    if not isinstance(flag, bool):
        raise ConfigError(f"{origin}: _delete_ must be true or false, got {flag!r}")
    return flag


def _drop_under(sources: Sources, path: str) -> None:
    for key in [k for k in sources if k == path or k.startswith(path + ".")]:
        del sources[key]


def merge(
    base: dict, base_sources: Sources, top: dict, top_sources: Sources, origin: str, prefix: str = ""
) -> tuple[dict, Sources]:
    """Deep-merge ``top`` over ``base``; returns the new mapping and its sources.

    ``top_sources`` says where each of ``top``'s keys came from (``origin`` when missing).
    Neither input is modified.
    """
    sources = dict(base_sources)
    if _check_delete_flag(top, origin):
        base = {}
        if prefix:
            _drop_under(sources, prefix)
            sources[prefix] = top_sources.get(prefix, origin)
        else:
            sources.clear()
    result = dict(base)
    for key, value in top.items():
        if key in (DELETE_KEY, BASE_KEY):
            continue
        path = f"{prefix}.{key}" if prefix else str(key)
        inherited = result.get(key)
        if isinstance(value, dict) and isinstance(inherited, dict):
            result[key], sources = merge(inherited, sources, value, top_sources, origin, path)
            continue
        _drop_under(sources, path)
        result[key] = _strip_delete(value, origin)
        sources[path] = top_sources.get(path, origin)
        for sub, src in leaf_sources(result[key], origin, path).items():
            sources[sub] = top_sources.get(sub, src)
    section = EXCLUSIVE_KEYS.get(prefix)
    if section:
        _clear_excluded(result, sources, top, section, prefix, top_sources, origin)
    return result, sources


def _clear_excluded(
    result: dict, sources: Sources, top: dict, keys: tuple[str, ...], prefix: str,
    top_sources: Sources, origin: str,
) -> None:
    """A layer that sets one of ``keys`` (not null) and none of the others clears the others."""
    given = [k for k in keys if top.get(k) is not None]
    if len(given) != 1:
        return  # none given, or several (validation reports the conflict)
    for other in keys:
        if other != given[0] and other not in top and result.get(other) is not None:
            result[other] = None
            sources[f"{prefix}.{other}"] = top_sources.get(f"{prefix}.{given[0]}", origin)


def load_with_sources(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> tuple[dict, Sources]:
    """Load ``path`` with its ``_base_`` files merged; returns ``(mapping, sources)``."""
    path = Path(path).expanduser()
    resolved = path.resolve()
    if resolved in _chain:
        trail = " -> ".join(display_path(p) for p in (*_chain, resolved))
        raise ConfigError(f"cycle in _base_ inheritance: {trail}; remove one of these _base_ entries")
    data = _read_file(path, list(_chain))
    if not data and not _chain:
        # An empty experiment would silently train the defaults (COCO paths): almost surely a
        # wrong or truncated file.
        raise ConfigError(f"{display_path(path)} is empty; an experiment needs at least data.train (see experiments/)")
    chain = (*_chain, resolved)
    merged: dict = {}
    sources: Sources = {}
    for base in _base_paths(data, path):
        base_data, base_sources = load_with_sources(base, chain)
        merged, sources = merge(merged, sources, base_data, base_sources, display_path(base))
    own = {k: v for k, v in data.items() if k != BASE_KEY}
    origin = display_path(path)
    return merge(merged, sources, own, leaf_sources(own, origin), origin)


def load_raw(path: str | os.PathLike) -> dict:
    """The merged mapping of ``path`` and its bases (no ``_base_`` key), before validation."""
    return load_with_sources(path)[0]


def section_of(text: str, section: str) -> dict:
    """Section ``section`` of a resolved experiment's YAML ``text`` as plain data, without
    validation: ``{}`` when the text or the section is not a mapping. For a process that needs
    one setting of a job it did not build (a supervisor's hang watchdog, the end of a job's MLflow
    run, a sweep driver); a resolved file has no ``_base_`` to follow."""
    try:
        data = yaml.load(text, Loader=Loader)  # noqa: S506 - Loader derives from SafeLoader
    except yaml.YAMLError:
        return {}
    found = data.get(section) if isinstance(data, dict) else None
    return found if isinstance(found, dict) else {}


def read_section(path: str | os.PathLike, section: str) -> dict:
    """:func:`section_of` the resolved experiment file ``path`` (``{}`` when it is unreadable)."""
    try:
        return section_of(Path(path).read_text(encoding="utf-8"), section)
    except (OSError, UnicodeDecodeError):
        return {}
