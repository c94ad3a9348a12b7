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
from orchestrator.jobs import JobHandle
from orchestrator.launchers.base import Plan
from orchestrator.submit_checks import check_inputs
from orchestrator.weights import resolve_weights

__all__ = ["ResourceFlags", "resolve_experiments", "submit"]


def resolve_experiments(paths: list[str], overrides: tuple[str, ...], flags: ResourceFlags) -> list[Experiment]:
    """Load every experiment file with ``--set`` overrides and the command-line flags applied."""
    from orchestrator.config import load_experiment

    if not paths:
        raise ConfigError("no experiment file given; usage: orch submit EXPERIMENT.yaml [...]")
    return [load_experiment(path, overrides, extra=flags.as_overrides()) for path in paths]


def run_folders(experiments: list[Experiment], refuse_live: bool = True) -> list[Experiment]:
    """Each experiment sent to the folder of a new run (:func:`orchestrator.outputs.choose_run_folder`):
    its ``runtime.output_dir`` unless that holds an earlier run (then ``<folder>-2``, ..., said on
    stderr) or ``runtime.resume`` continues it. A folder a live job holds is refused here
    (``refuse_live``; a dry run only plans)."""
    import sys

    from orchestrator.config import with_overrides
    from orchestrator.launch import job_output_dir
    from orchestrator.outputs import choose_run_folder, new_folder_note, run_folder_overrides

    out, taken = [], set()
    for exp in experiments:
        base = job_output_dir(exp)
        folder = choose_run_folder(base, resume=bool(exp.runtime.resume), probe=refuse_live, skip=taken)
        taken.add(folder)
        if folder != base:
            print(new_folder_note(base, folder), file=sys.stderr, flush=True)
            exp = with_overrides(exp, run_folder_overrides(exp, folder))
        out.append(exp)
    return out


def submit(paths: list[str], overrides: tuple[str, ...], flags: ResourceFlags,
           dry_run: bool = False, check_data: bool = True) -> tuple[Plan, list[JobHandle]]:
    """Resolve, plan and (unless ``dry_run``) launch. Returns ``(plan, handles)``; handles is
    empty for a dry run. A real submission checks the input files first
    (:mod:`orchestrator.submit_checks`); ``check_data=False`` (``--no-data-check``) leaves out
    the annotation files and image folders (data seen only from the compute nodes)."""
    experiments = resolve_experiments(paths, overrides, flags)
    backends = {choose_backend(exp, flags.backend) for exp in experiments}
    if len(backends) > 1:
        raise ConfigError(
            f"the experiments ask for different backends ({', '.join(sorted(backends))}); "
            "submit them separately or pass --backend"
        )
    experiments = run_folders(experiments, refuse_live=not dry_run)
    launch = Launch.for_backend(backends.pop())
    plan = launch.plan(experiments)
    resolve_weights(experiments, download=not dry_run)  # weights names -> the cache, before anything is queued
    if dry_run:  # the plan only: it may be printed on a machine that does not see the data
        return plan, []
    launch.preflight(plan, wait_s=flags.wait_for_resources)
    check_inputs(experiments, data=check_data)  # the files `orch train` would miss, before anything is queued
    return launch.submit(plan)
