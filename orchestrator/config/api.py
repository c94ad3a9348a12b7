"""The entry points: file (+ overrides) -> validated :class:`Experiment`, and changes to one."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from orchestrator.config.loader import load_with_sources
from orchestrator.config.overrides import apply_dotted, apply_overrides
from orchestrator.config.schema import Experiment
from orchestrator.config.serialize import experiment_to_dict, to_plain
from orchestrator.config.validate import Context, build, convert, type_hints


def load_experiment(
    path: str | os.PathLike,
    overrides: Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Experiment:
    """Load, merge, override and validate one experiment file.

    ``overrides`` are ``--set`` items (``"optim.lr=0.01"``, value parsed as YAML). ``extra`` maps
    dotted keys to values applied after them: the command-line flags a command folds into the
    experiment (``{"resources.gpus": 4}``); a ``None`` value means "flag not given" and is skipped.
    ``name`` defaults to the file's stem when neither the file nor its bases set one.
    """
    mapping, sources = load_with_sources(path)
    mapping = apply_overrides(mapping, overrides, sources)
    flags = {key: value for key, value in (extra or {}).items() if value is not None}
    if flags:
        mapping = apply_dotted(mapping, flags, sources, origin="command-line option")
    if mapping.get("name") is None:
        mapping["name"] = Path(path).stem
    return build(mapping, sources, default=str(path))


def build_experiment(mapping: Mapping[str, Any], source: str = "<file>") -> Experiment:
    """Validate a plain mapping (no ``_base_``) into an :class:`Experiment`; errors name ``source``."""
    return build(dict(mapping), None, default=source)


def with_overrides(exp: Experiment, changes: Mapping[str, Any], source: str = "with_overrides") -> Experiment:
    """A copy of ``exp`` with dotted-key ``changes`` (``{"optim.lr": 0.01}``) applied, re-validated.

    A mapping value replaces the whole section it names. Setting ``schedule.iterations`` clears
    ``schedule.epochs`` (and the other way round) unless both are given.
    """
    sources: dict[str, str] = {}
    mapping = apply_dotted(experiment_to_dict(exp), changes, sources, origin=source)
    return build(mapping, sources, default=f"{source} (experiment {exp.name!r})")


def derive(exp: Experiment, changes: Mapping[str, Any], source: str = "derive") -> Experiment:
    """:func:`with_overrides` for values already known to be valid (a trial's grid values, each
    checked once per key; the output folder, seed and tags orch computes itself): only the
    top-level sections that ``changes`` name are converted again, the others are shared with
    ``exp``, and the experiment-wide cross-field checks are not run again. Same rules for
    mapping values and exclusive keys as :func:`with_overrides`; types are still checked in the
    sections it rebuilds (a wrong type fails here, naming ``source``)."""
    hints = type_hints(Experiment)
    sections: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        head = key.split(".", 1)[0]
        if head not in hints:
            return with_overrides(exp, changes, source)  # an unknown key: the full path says what is valid
        sections.setdefault(head, {})[key] = value
    ctx = Context(None, f"{source} (experiment {exp.name!r})")
    updates = {}
    for head, items in sections.items():
        current = to_plain(getattr(exp, head))
        mapping = apply_dotted({head: current}, items, origin=source, in_place=True)  # to_plain made a copy
        updates[head] = convert(hints[head], mapping[head], head, ctx)
    return dataclasses.replace(exp, **updates)
