"""Cheap, deterministic tuning of the fusion settings: a coordinate search over small grids.

Starting from the library's defaults, each setting in turn is set to the value of its grid that
scores best with the others held fixed; rounds repeat until one changes nothing (at most
:data:`MAX_ROUNDS`). A move needs a strict gain, so ties keep the current (default-side) value.
Every setting tried is scored once (memoised). With the grids below that is 12-22 scorings for
WBF, against 100 for the full WBF grid. The caller decides what the score is; ``orch ensemble``
scores on out-of-fold predictions only (:mod:`orchestrator.kfold.ensemble`), and keeps the result
(:func:`cached_search`) so that another ``--tta`` on the same predictions tunes nothing again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cluster.files import read_json, write_json_atomic
from orchestrator.kfold.fusion import CONF_TYPES, FusionSettings

MAX_ROUNDS = 2
IOU_GRID = (0.4, 0.5, 0.55, 0.6, 0.7)
SKIP_GRID = (0.0, 0.01, 0.02, 0.05, 0.1)
SIGMA_GRID = (0.1, 0.3, 0.5, 0.7)

#: The grid of each setting a method uses, in the order they are searched.
SPACES: dict[str, dict[str, Sequence[Any]]] = {
    "wbf": {"iou_thr": IOU_GRID, "skip_thr": SKIP_GRID, "conf_type": CONF_TYPES},
    "nms": {"iou_thr": IOU_GRID, "skip_thr": SKIP_GRID},
    "soft-nms": {"sigma": SIGMA_GRID, "skip_thr": SKIP_GRID},
}


@dataclass(frozen=True)
class Tuned:
    """The chosen settings, their score, the score of the defaults, and every (settings, score)
    tried in order."""

    settings: FusionSettings
    score: float
    default_score: float
    trace: tuple[tuple[dict[str, Any], float], ...]


def coordinate_search(score: Callable[[FusionSettings], float], method: str,
                      space: Mapping[str, Sequence[Any]] | None = None, rounds: int = MAX_ROUNDS) -> Tuned:
    """Maximise ``score`` over the grid ``space`` (default :data:`SPACES` of ``method``) one
    setting at a time (see the module docstring)."""
    space = SPACES[method] if space is None else space
    seen: dict[FusionSettings, float] = {}
    trace: list[tuple[dict[str, Any], float]] = []

    def value(settings: FusionSettings) -> float:
        if settings not in seen:
            seen[settings] = float(score(settings))
            trace.append((settings.params(), seen[settings]))
        return seen[settings]

    start = FusionSettings(method=method)
    best, best_score = start, value(start)
    for _ in range(rounds):
        moved = False
        for name, grid in space.items():
            for candidate_value in grid:
                candidate = dataclasses.replace(best, **{name: candidate_value})
                candidate_score = value(candidate)
                if candidate_score > best_score + 1e-9:
                    best, best_score, moved = candidate, candidate_score, True
        if not moved:
            break
    return Tuned(best, best_score, seen[start], tuple(trace))


def cached_search(score: Callable[[FusionSettings], float], method: str, cache: Path,
                  key: Mapping[str, Any]) -> tuple[Tuned, bool]:
    """:func:`coordinate_search` of ``method``, or its result saved in ``cache`` under the same
    ``key`` (JSON data naming everything the score depends on: the predictions, the ground
    truth, the metric); the search's grids and rounds are added to the key here. Returns the
    result and whether it came from the cache."""
    key = {**key, "method": method, "rounds": MAX_ROUNDS,
           "space": {name: list(grid) for name, grid in SPACES[method].items()}}
    saved = read_json(cache)
    if saved is not None and saved.get("key") == key:
        t = saved["tuned"]
        return Tuned(FusionSettings(**t["settings"]), t["score"], t["default_score"],
                     tuple((dict(p), float(v)) for p, v in t["trace"])), True
    tuned = coordinate_search(score, method)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache, {"key": key, "tuned": {"settings": tuned.settings.params(), "score": tuned.score,
                                                    "default_score": tuned.default_score,
                                                    "trace": [list(item) for item in tuned.trace]}}, indent=1)
    return tuned, False
