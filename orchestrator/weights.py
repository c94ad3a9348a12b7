"""Torchvision weights names of an experiment -> files in the weights cache, at submit time.

``orch submit``, ``orch kfold``, ``orch sweep`` and ``orch weights fetch`` call
:func:`resolve_weights` on the submitting machine before anything is queued or written: every
name the experiment can train with (its own values, its grid's and its sweep's choices) is
downloaded into the cache once (:func:`orchestrator.downloads.fetch`); a dry run only reports whether
each file is there. Jobs then read the cache and never download.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from cluster.errors import ConfigError
from detection.weights import WEIGHT_KEYS, WeightsFile, is_weights_name, lookup
from orchestrator.downloads import cache_dir, download_url, fetch
from orchestrator.config.schema import Experiment


@dataclass(frozen=True)
class ResolvedWeights:
    """One weights file an experiment needs: the key and name that asked for it, the file, where
    it is in the cache, and ``status``: ``cached`` (was there), ``downloaded`` (now) or ``missing``
    (a dry run found it absent)."""

    key: str
    value: str
    entry: WeightsFile
    path: Path
    status: str
    size: Optional[int] = None

    def describe(self) -> str:
        """One line: ``weights: model.weights=COCO_V1 (FasterRCNN_..._Weights.COCO_V1): already cached /p (167.1 MB)``."""
        head = f"weights: {self.key}={self.value} ({self.entry.name})"
        if self.status == "missing":
            return f"{head}: not cached; a real submit downloads {download_url(self.entry)} to {self.path}"
        verb = "already cached" if self.status == "cached" else "downloaded to"
        return f"{head}: {verb} {self.path} ({(self.size or 0) / 1e6:.1f} MB)"


def _values(exp: Experiment, field: str) -> list[Any]:
    """Every value ``model.<field>`` takes in some run of ``exp``: the grid's or the sweep's
    choice values when they vary it, else the experiment's own."""
    key = f"model.{field}"
    if key in exp.grid:
        return list(exp.grid[key])
    spec = exp.sweep.space.get(key) if exp.sweep is not None else None
    if isinstance(spec, dict) and len(spec) == 1:
        kind, args = next(iter(spec.items()))
        if kind in ("choice", "grid") and isinstance(args, (list, tuple)):
            return list(args)
    return [getattr(exp.model, field)]


def weights_requests(exp: Experiment) -> list[tuple[str, str, WeightsFile]]:
    """``(key, name, file)`` of every torchvision weights name ``exp`` can train with, each file
    once. Combinations that are not valid models are skipped: the config checks of each run
    report those."""
    seen: dict[str, tuple[str, str, WeightsFile]] = {}
    for model_type, backbone in product(_values(exp, "type"), _values(exp, "backbone")):
        for key in WEIGHT_KEYS:
            for value in _values(exp, key.split(".", 1)[1]):
                if not is_weights_name(value):
                    continue
                try:
                    entry = lookup(model_type, backbone, key, value)
                except ConfigError:  # not a valid model: the config checks of that run say so
                    continue
                seen.setdefault(entry.file_name, (key, value, entry))
    return list(seen.values())


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def resolve_weights(experiments: Union[Experiment, Sequence[Experiment]], download: bool,
                    echo: Optional[Callable[[str], None]] = _stderr) -> list[ResolvedWeights]:
    """Put every torchvision weights file of ``experiments`` into the weights cache (``download``)
    or only report whether it is there (a dry run); one line per file to ``echo``. Nothing to do
    (no names) costs nothing. A file that cannot be downloaded is a one-line
    :class:`~cluster.errors.LaunchError` (exit 2) raised before anything is queued."""
    if isinstance(experiments, Experiment):
        experiments = [experiments]
    requests: dict[str, tuple[str, str, WeightsFile]] = {}
    for exp in experiments:
        for key, value, entry in weights_requests(exp):
            requests.setdefault(entry.file_name, (key, value, entry))
    out = []
    for key, value, entry in requests.values():
        if download:
            got = fetch(entry)
            resolved = ResolvedWeights(key, value, entry, got.path, "cached" if got.cached else "downloaded", got.size)
        else:
            path = cache_dir() / entry.file_name
            cached = path.is_file()
            resolved = ResolvedWeights(key, value, entry, path, "cached" if cached else "missing",
                                       path.stat().st_size if cached else None)
        if echo is not None:
            echo(resolved.describe())
        out.append(resolved)
    return out


def weights_overrides(experiment: Experiment) -> dict[str, str]:
    """``{"model.weights_dir": <cache>}`` when ``experiment`` uses weights names: the job reads
    the cache that this submit filled (on any node), never a default of its own."""
    return {"model.weights_dir": str(cache_dir())} if weights_requests(experiment) else {}
