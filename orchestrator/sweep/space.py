"""The search space of ``orch sweep``: parse and check ``sweep.space``, turn it into Ray Tune
domains. Pure, except :func:`to_tune` (imports ray.tune).

Each entry maps a config key to ONE kind and its arguments::

    sweep:
      space:
        optim.lr: {loguniform: [1.0e-4, 1.0e-2]}   # log-uniform float in [low, high)
        optim.weight_decay: {uniform: [0.0, 1.0e-3]}
        data.batch_size_per_gpu: {randint: [2, 9]}   # integer in [low, high)
        model.backbone: {choice: [resnet18, resnet34]}  # sampled
        optim.type: {grid: [sgd, adamw]}             # every value, x num_samples
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from cluster.errors import ConfigError

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
SEARCHERS = ("random", "grid", "optuna")


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``kind`` from :data:`KINDS` and its ``args`` (values or bounds)."""

    key: str
    kind: str
    args: tuple[Any, ...]

    def describe(self) -> str:
        """``optim.lr: loguniform [0.0001, 0.01)`` style text."""
        if self.kind in ("choice", "grid"):
            return f"{self.key}: {self.kind} {list(self.args)}"
        return f"{self.key}: {self.kind} [{self.args[0]}, {self.args[1]})"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_dimension(key: str, spec: Any, where: str = "sweep.space") -> Dimension:
    """Check one ``key: {kind: args}`` entry; ConfigError names ``where.key`` and the fix."""
    at = f"{where}.{key}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(
            f"{at}: expected one kind and its arguments, e.g. {{loguniform: [1.0e-4, 1.0e-2]}} or "
            f"{{choice: [a, b]}}; got {spec!r} (kinds: {', '.join(KINDS)})"
        )
    kind, args = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(f"{at}: unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if not isinstance(args, (list, tuple)):
        raise ConfigError(f"{at}.{kind}: expected a list, got {args!r}")
    args = tuple(args)
    if kind in ("choice", "grid"):
        if not args:
            raise ConfigError(f"{at}.{kind}: needs at least one value")
        return Dimension(key, kind, args)
    if len(args) != 2 or not all(_number(a) for a in args):
        raise ConfigError(f"{at}.{kind}: expected two numbers [low, high], got {list(args)!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"{at}.{kind}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{at}.loguniform: bounds must be > 0 (got low {low}); use uniform for ranges with 0")
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{at}.randint: bounds must be integers, got {list(args)!r}")
        if high - low < 1:
            raise ConfigError(f"{at}.randint: [low, high) = [{low}, {high}) holds no integer")
    return Dimension(key, kind, (low, high))


def parse_space(space: Mapping[str, Any], where: str = "sweep.space") -> list[Dimension]:
    """Every dimension of ``space`` (in file order). An empty space is an error: nothing to search."""
    if not space:
        raise ConfigError(f"{where} is empty; add e.g. `optim.lr: {{loguniform: [1.0e-4, 1.0e-2]}}`")
    return [parse_dimension(str(key), spec, where) for key, spec in space.items()]


def check_searcher(dims: list[Dimension], searcher: str, where: str = "sweep.searcher") -> None:
    """Searcher and kinds must fit: ``grid`` takes only grid/choice (every value is run);
    ``optuna`` needs the package and samples, so it takes no grid kind."""
    if searcher not in SEARCHERS:
        raise ConfigError(f"{where}: unknown searcher {searcher!r}; valid: {', '.join(SEARCHERS)}")
    if searcher == "grid":
        bad = [d.key for d in dims if d.kind not in ("grid", "choice")]
        if bad:
            raise ConfigError(f"{where}=grid cannot enumerate continuous kinds ({', '.join(bad)}); use grid/choice "
                              "values there, or sweep.searcher=random")
    if searcher == "optuna":
        bad = [d.key for d in dims if d.kind == "grid"]
        if bad:
            raise ConfigError(f"{where}=optuna samples values; use choice instead of grid for {', '.join(bad)}")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(f"{where}=optuna needs the optuna package (pip install optuna), "
                              "or use sweep.searcher=random") from None


def grid_size(dims: list[Dimension], searcher: str) -> int:
    """Configurations one sample expands to (product of grid sizes; choice counts under grid)."""
    size = 1
    for dim in dims:
        if dim.kind == "grid" or (searcher == "grid" and dim.kind == "choice"):
            size *= len(dim.args)
    return size


def trial_count(dims: list[Dimension], searcher: str, num_samples: int) -> int:
    """How many trials the sweep runs: ``num_samples`` x the grid (Tune's rule)."""
    return grid_size(dims, searcher) * num_samples


def to_tune(dims: list[Dimension], searcher: str) -> dict[str, Any]:
    """``param_space`` for ``tune.Tuner``: flat dotted keys to Tune domains."""
    from ray import tune

    space: dict[str, Any] = {}
    for dim in dims:
        if dim.kind == "grid" or (searcher == "grid" and dim.kind == "choice"):
            space[dim.key] = tune.grid_search(list(dim.args))
        elif dim.kind == "choice":
            space[dim.key] = tune.choice(list(dim.args))
        elif dim.kind == "uniform":
            space[dim.key] = tune.uniform(*dim.args)
        elif dim.kind == "loguniform":
            space[dim.key] = tune.loguniform(*dim.args)
        else:
            space[dim.key] = tune.randint(*dim.args)
    return space
