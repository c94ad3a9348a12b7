"""Pure expansion of an experiment into trials: the grid's cartesian product times the folds.

Names are deterministic and readable: ``lr=0.01,backbone=resnet18/fold-2``. Rule for the short
key names: a grid key is written by its last dotted component (``optim.lr`` -> ``lr``) unless
two grid keys share that component, in which case both are written in full
(``model.options.x`` and ``data.x`` stay long). Keys keep the order of the ``grid:`` section.

Seeds: a trial's ``runtime.seed`` is the base seed (the grid point's ``runtime.seed`` if the grid
varies it, else the experiment's) plus the fold index. Every fold gets its own seed and every
grid point uses the same seed on the same fold, so that the paired comparison across folds sees
the effect of the grid value, not of a different random initialisation (common random numbers).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from cluster.errors import ConfigError
from orchestrator.config.schema import Experiment


@dataclass(frozen=True)
class Trial:
    """One run of a grid x folds set.

    ``point_name`` names the grid point (``""`` without a grid); ``name`` adds the fold
    (``point/fold-k``); ``overrides`` are the dotted keys applied to the base experiment
    (grid values, fold data files, seed, output folder, run name, tags); ``experiment`` is the
    result of applying them."""

    name: str
    point_name: str
    point: dict[str, Any]
    fold: Optional[int]
    seed: int
    overrides: dict[str, Any]
    experiment: Experiment = field(repr=False)

    @property
    def slug(self) -> str:
        """The trial's folder, relative to the set's: ``<point>/fold-<k>`` made file-system safe."""
        return slug_of(self.point_name, self.fold)


def format_value(value: Any) -> str:
    """A grid value as written in names and tags: YAML-like scalars, compact JSON otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float, str)):
        return str(value) if not isinstance(value, float) else repr(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Map each grid key to its display name (see the module docstring for the rule)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def grid_points(grid: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``(point name, {key: value})`` for every point of the cartesian product, in the order of
    the grid's keys and values. An empty grid is one unnamed point."""
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
    keys = list(grid)
    display = short_keys(keys)
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, combo))
        name = ",".join(f"{display[k]}={format_value(v)}" for k, v in point.items())
        points.append((name, point))
    names = [n for n, _ in points]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"grid: the point {dup!r} appears twice; remove repeated values from the grid lists")
    return points


def check_grid_values(experiment: Experiment, grid: dict[str, list[Any]]) -> None:
    """Validate every value of the grid once, each alone on the experiment (the whole experiment
    with its cross-field checks): a bad value fails here, naming its key, and the trials are then
    derived from the checked values without validating the experiment again per trial."""
    from orchestrator.config import with_overrides

    for key, values in grid.items():
        seen: list[Any] = []
        for value in values:
            if value in seen:
                continue
            seen.append(value)
            with_overrides(experiment, {key: value, "grid": {}, "kfold": None},
                           source=f"grid.{key} value {format_value(value)}")


def slug_of(point_name: str, fold: Optional[int] = None) -> str:
    """Relative folder of a trial: the point name made file-system safe (anything a shell or a
    file system could trip on, ``/`` included, becomes ``_``), then ``fold-<k>``."""
    parts = [re.sub(r"[^A-Za-z0-9._=,+\-]", "_", point_name)] if point_name else []
    return "/".join(parts + ([f"fold-{fold}"] if fold is not None else []))


def expand(experiment: Experiment, folds: Optional[Sequence[tuple[str, str]]] = None) -> list[Trial]:
    """Every trial of ``experiment``: grid points (``experiment.grid``) x ``folds``.

    ``folds`` lists ``(train_ann_file, val_ann_file)`` per fold index; the images of both stay in
    ``data.train.img_dir`` (a fold's validation images come from the training file). Each trial
    writes into ``<runtime.output_dir>/<slug>`` and is named in MLflow by its ``name``, tagged
    ``fold`` and with each grid key. Pure: nothing is written or created.
    """
    from orchestrator.config import derive, output_dir_of

    base_dir = output_dir_of(experiment).rstrip("/")
    fold_list: list[Optional[int]] = list(range(len(folds))) if folds else [None]
    trials = []
    points = grid_points(dict(experiment.grid))
    check_grid_values(experiment, dict(experiment.grid))
    for point_name, point in points:
        base_seed = int(point.get("runtime.seed", experiment.runtime.seed))
        for fold in fold_list:
            parts = [p for p in (point_name, f"fold-{fold}" if fold is not None else "") if p]
            name = "/".join(parts) or experiment.name
            seed = base_seed + (fold or 0)
            tags = {k: format_value(v) for k, v in point.items()}
            overrides: dict[str, Any] = dict(point)
            if fold is not None:
                train_ann, val_ann = folds[fold]
                train = experiment.data.train
                overrides["data.train.ann_file"] = str(train_ann)
                overrides["data.val"] = {"ann_file": str(val_ann), "img_dir": train.img_dir,
                                         "classes": list(train.classes) if train.classes else None}
                overrides["eval.split"] = "val"
                tags["fold"] = str(fold)
            overrides["runtime.seed"] = seed
            overrides["runtime.output_dir"] = "/".join(p for p in (base_dir, slug_of(point_name, fold)) if p)
            overrides["tracking.run_name"] = name
            overrides["tracking.tags"] = {**experiment.tracking.tags, **tags}
            # the trial is one plain run: it carries no grid or kfold section of its own
            resolved = derive(experiment, {**overrides, "grid": {}, "kfold": None},
                              source=f"grid point {point_name or '(none)'}")
            trials.append(Trial(name=name, point_name=point_name, point=point, fold=fold, seed=seed,
                                overrides=overrides, experiment=resolved))
    return trials
