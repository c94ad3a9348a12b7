"""``orch submit``: resolve experiment files with the command-line flags folded in, then the one
launch path (:mod:`orchestrator.launch`).

Identity is decided before any process starts: the resolved config is written to the job's
output folder and the MLflow run is created, so every rank, restart and requeue continues the
same run and ``orch status`` can point at it before the first step. A dry run does none of that:
it plans and prints, and writes nothing.
"""

from __future__ import annotations

from cluster.errors import ConfigError
from orchestrator.config.schema import Experiment
from orchestrator.launch import Launch, ResourceFlags, choose_backend
from orchestrator.launchers.base import JobHandle, Plan
from orchestrator.weights import resolve_weights

__all__ = ["ResourceFlags", "resolve_experiments", "submit"]


def resolve_experiments(paths: list[str], overrides: tuple[str, ...], flags: ResourceFlags) -> list[Experiment]:
    """Load every experiment file with ``--set`` overrides and the command-line flags applied."""
    from orchestrator.config import load_experiment

    if not paths:
        raise ConfigError("no experiment file given; usage: orch submit EXPERIMENT.yaml [...]")
    return [load_experiment(path, overrides, extra=flags.as_overrides()) for path in paths]


def submit(paths: list[str], overrides: tuple[str, ...], flags: ResourceFlags,
           dry_run: bool = False) -> tuple[Plan, list[JobHandle]]:
    """Resolve, plan and (unless ``dry_run``) launch. Returns ``(plan, handles)``; handles is
    empty for a dry run."""
    experiments = resolve_experiments(paths, overrides, flags)
    backends = {choose_backend(exp, flags.backend) for exp in experiments}
    if len(backends) > 1:
        raise ConfigError(
            f"the experiments ask for different backends ({', '.join(sorted(backends))}); "
            "submit them separately or pass --backend"
        )
    launch = Launch.to(backends.pop())
    plan = launch.plan(experiments)
    resolve_weights(experiments, download=not dry_run)  # weights names -> the cache, before anything is queued
    if dry_run:
        return plan, []
    launch.preflight(plan, wait_s=flags.wait_for_resources)
    return launch.submit(plan)
