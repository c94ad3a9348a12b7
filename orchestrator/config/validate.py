"""Turn a merged YAML mapping into the frozen :class:`~orchestrator.config.schema.Experiment`.

The conversion is generic: it walks the dataclasses of the schema and their type hints
(``Optional``, ``Literal``, ``tuple[X, ...]`` from YAML lists, ``list``, ``dict[str, X]``, nested
dataclasses, ``Any``). An int is accepted where a float is expected; a bool is never an int.
Errors name the file that set the key (from the loader's sources), the dotted key path, what
was expected and what was given. Cross-field rules (one of epochs/iterations, sorted milestones,
GPU counts that divide, positive sizes) live in :mod:`orchestrator.config.checks`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
import types
import typing
from typing import Any, Literal, Union

from cluster.errors import ConfigError
from orchestrator.config.loader import DEFAULT_SOURCE, EXCLUSIVE_KEYS, Sources
from orchestrator.config.schema import Experiment


class Context:
    """Where values came from, to name the file in error messages."""

    def __init__(self, sources: Sources | None = None, default: str = DEFAULT_SOURCE) -> None:
        self.sources = sources or {}
        self.default = default

    def where(self, path: str) -> str:
        """The file (or override) that set ``path`` or its nearest enclosing section."""
        path = path.split("[", 1)[0]
        while path:
            if path in self.sources:
                return self.sources[path]
            path = path.rpartition(".")[0]
        return self.default

    def error(self, path: str, message: str) -> ConfigError:
        """A :class:`ConfigError` ``"<file>: <path>: <message>"``."""
        return ConfigError(f"{self.where(path)}: {path}: {message}" if path else f"{self.default}: {message}")


@functools.lru_cache(maxsize=None)
def type_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a schema dataclass (the modules use ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def all_key_paths(cls: type = Experiment, prefix: str = "") -> tuple[str, ...]:
    """Every dotted field path of the schema below ``cls`` (sections and leaves)."""
    paths: list[str] = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        paths.append(path)
        inner = _dataclass_in(type_hints(cls)[f.name])
        if inner is not None:
            paths.extend(all_key_paths(inner, path + "."))
    return tuple(paths)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass of ``tp`` or ``Optional[tp]``, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def is_schema_path(key: str, cls: type = Experiment) -> bool:
    """Whether dotted ``key`` names a field (anything below a ``dict``/``Any`` field counts)."""
    head, _, rest = key.partition(".")
    names = {f.name: type_hints(cls)[f.name] for f in dataclasses.fields(cls)}
    if head not in names:
        return False
    if not rest:
        return True
    inner = _dataclass_in(names[head])
    if inner is not None:
        return is_schema_path(rest, inner)
    return names[head] is Any or typing.get_origin(names[head]) is dict


def describe(tp: Any) -> str:
    """A type in words: ``a list of integers``, ``one of 'sgd', 'adamw'``, ``a number or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {_plural(args[0]) if args else 'values'}"
    if origin is dict:
        return f"a mapping of names to {_plural(args[1])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping (section {tp.__name__})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _plural(tp: Any) -> str:
    words = {bool: "booleans", int: "integers", float: "numbers", str: "strings", Any: "values"}
    return words.get(tp) or describe(tp)


def _given(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
             tuple: "list", dict: "mapping", type(None): "null"}
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{kinds.get(type(value), type(value).__name__)} {text}"


def convert(tp: Any, value: Any, path: str, ctx: Context, shown: Any = None) -> Any:
    """Check ``value`` against type ``tp`` and convert it (lists to tuples, mappings to dataclasses).

    ``shown`` is the type named in an error about ``value`` itself (``Optional[X]`` for ``X``).
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    shown = shown if shown is not None else tp
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return convert(options[0], value, path, ctx, shown=tp) if value is not None else _fail(tp, value, path, ctx)
        for option in options:
            try:
                return convert(option, value, path, ctx)
            except ConfigError:
                continue
        _fail(tp, value, path, ctx)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        hint = _did_you_mean(str(value), [str(a) for a in args])
        raise ctx.error(path, f"must be {describe(shown)}; got {_given(value)}{hint}")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path, ctx) if isinstance(value, dict) else _fail(shown, value, path, ctx)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            _fail(shown, value, path, ctx)
        item_tp = args[0] if args else Any
        items = [convert(item_tp, v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            _fail(shown, value, path, ctx)
        key_tp, value_tp = args if args else (str, Any)
        if typing.get_origin(value_tp) in (list, tuple):
            value = _flatten_nested(value)  # grid: {optim: {lr: [..]}} means {"optim.lr": [..]}
        result = {}
        for key, item in value.items():
            if key_tp is str and not isinstance(key, str):
                raise ctx.error(f"{path}.{key}", f"keys must be strings; got {_given(key)} (quote it)")
            result[key] = convert(value_tp, item, f"{path}.{key}", ctx)
        return result
    if tp is bool:
        return value if isinstance(value, bool) else _fail(shown, value, path, ctx)
    # numbers.* also admits numpy scalars (Ray Tune samples them); bool is never a number here.
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        _fail(shown, value, path, ctx)
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        _fail(shown, value, path, ctx)
    if tp is str:
        return value if isinstance(value, str) else _fail(shown, value, path, ctx)
    raise TypeError(f"schema type {tp!r} at {path} is not supported by the validator")


def _fail(tp: Any, value: Any, path: str, ctx: Context) -> Any:
    raise ctx.error(path, f"expected {describe(tp)}, got {_given(value)}")


def _flatten_nested(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(_flatten_nested(value, path))
        else:
            flat[path] = value
    return flat


def _did_you_mean(word: str, candidates: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6) or _abbreviations(word, candidates)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _initials(word: str) -> str:
    return "".join(part[0] for part in word.lower().split("_") if part)


def _abbreviations(word: str, candidates: list[str]) -> list[str]:
    """Candidates that spell ``word`` short or long: ``learning_rate`` -> ``lr`` (initials),
    ``max_keep`` <- ``mk``, ``iters`` -> ``iterations`` (one begins the other)."""
    low = word.lower()
    found = [c for c in candidates if "_" in low and c.lower() == _initials(low)]
    found += [c for c in candidates if "_" in c and low == _initials(c)]
    found += [c for c in candidates if min(len(low), len(c)) >= 4 and (c.startswith(low) or low.startswith(c))]
    return found


def build_dataclass(cls: type, value: Any, path: str, ctx: Context) -> Any:
    """Build the frozen dataclass ``cls`` from mapping ``value``; unset fields keep their defaults."""
    if not isinstance(value, dict):
        _fail(cls, value, path, ctx)
    hints = type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, item in value.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise _unknown_key(cls, key, key_path, names, ctx)
        kwargs[key] = convert(hints[key], item, key_path, ctx)
    # A section that sets one of two exclusive keys (schedule: epochs/iterations) without the
    # other means the other is off, whatever its default.
    exclusive = EXCLUSIVE_KEYS.get(path, ())
    given = [k for k in exclusive if kwargs.get(k) is not None]
    if len(given) == 1:
        for other in exclusive:
            kwargs.setdefault(other, None)
    return cls(**kwargs)


def _unknown_key(cls: type, key: Any, key_path: str, names: list[str], ctx: Context) -> ConfigError:
    section = key_path.rpartition(".")[0]
    hint = _did_you_mean(str(key), names, f"{section}." if section else "")
    if not hint:  # a key put in the wrong section: optim.epochs -> schedule.epochs
        elsewhere = [p for p in all_key_paths() if p.rpartition(".")[2] == str(key)]
        if elsewhere:
            hint = f" (did you mean {elsewhere[0]!r}?)"
    where = ctx.where(key_path)
    under = f" under {section!r}" if section else ""
    return ConfigError(
        f"{where}: unknown key {key_path!r}{hint}; valid keys{under}: {', '.join(names)}"
    )


def build(mapping: dict, sources: Sources | None = None, default: str = DEFAULT_SOURCE) -> Experiment:
    """Validate a merged mapping into an :class:`Experiment` and run the cross-field checks."""
    from orchestrator.config.checks import check_experiment

    ctx = Context(sources, default)
    if not isinstance(mapping, dict):
        raise ConfigError(f"{default}: an experiment must be a mapping of sections, got {_given(mapping)}")
    experiment = build_dataclass(Experiment, mapping, "", ctx)
    check_experiment(experiment, ctx)
    return experiment
