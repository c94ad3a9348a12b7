"""``orch train``: run the training program in this process (what every backend finally runs)."""

from __future__ import annotations

import click

from orchestrator.commands.common import experiment_argument, set_option


@click.command("train")
@experiment_argument
@set_option
def train_cmd(experiment: str, overrides: tuple[str, ...]) -> None:
    """Train EXPERIMENT here, in this process (single process, or one rank under torchrun).

    A new run never goes into a folder that holds another run: when runtime.output_dir holds
    one, this run goes to <folder>-2 (then -3, ...), said in one line; --set runtime.resume=auto
    continues the run in runtime.output_dir instead. A folder a live run holds is refused (exit 2).

    \b
    Examples:
      orch train experiments/shapes_demo.yaml
      orch train exp.yaml --set optim.lr=0.005 --set schedule.epochs=24
      torchrun --nproc_per_node 2 -m orchestrator.worker exp.yaml   # what backends run
    """
    import logging
    import os

    from cluster.env import DistEnv
    from cluster.logs import setup_logging
    from orchestrator.outputs import release
    from orchestrator.worker import run

    env = DistEnv.detect(os.environ)
    setup_logging(env.rank)
    overrides, folder = _run_folder(experiment, tuple(overrides), env)
    try:
        result = run(experiment, overrides, env=env)
    finally:
        if folder is not None:
            release(folder)
    if env.is_main:
        _print_result(experiment, overrides, result)
    logging.shutdown()


def _run_folder(experiment: str, overrides: tuple[str, ...], env):
    """Decide this run's folder (:mod:`orchestrator.outputs`) and hold it (rank 0); returns the
    overrides that send the run there and the folder held here (None on other ranks). A folder
    that holds a finished run is kept as it is: the new run goes to ``<folder>-2`` (...), said
    in one line. Several ranks (``orch train`` under
    torchrun) cannot agree on a new folder before they meet, so there a folder that holds a run
    is refused instead; rank 0 alone checks and holds (the others follow it or are stopped)."""
    import json
    from pathlib import Path

    from cluster.errors import LaunchError
    from orchestrator.config import load_experiment, output_dir_of
    from orchestrator.outputs import choose_run_folder, hold, holds_run, new_folder_note, run_folder_overrides

    exp = load_experiment(experiment, overrides)
    base, resume = Path(output_dir_of(exp)), bool(exp.runtime.resume)
    if not env.is_main:
        return overrides, None
    if env.world_size > 1:
        folder = choose_run_folder(base, resume=True)  # live: refused
        if not resume and holds_run(base):
            raise LaunchError(f"the output folder {base} holds an earlier run; under torchrun `orch train` does "
                              "not pick a new folder: --set runtime.output_dir=... (or name=...), continue it with "
                              "--set runtime.resume=auto, or use orch submit --backend torchrun")
    else:
        folder = choose_run_folder(base, resume=resume)
    hold(folder)  # until this process ends: a second `orch train` into it is refused at once
    if folder == base:
        return overrides, folder
    click.echo(new_folder_note(base, folder), err=True)
    keys = run_folder_overrides(exp, folder)
    return overrides + tuple(f"{key}={json.dumps(value)}" for key, value in keys.items()), folder


def _print_result(experiment: str, overrides: tuple[str, ...], result) -> None:
    from orchestrator.commands.report_util import mlflow_ui_hint, print_metrics
    from orchestrator.config import load_experiment
    from orchestrator.tracking.runs import journal_dir, tracking_uri_of, wait_shipped

    print_metrics(result.metrics, title="final metrics")
    exp = load_experiment(experiment, overrides)
    if not exp.tracking.enable:
        return
    uri = tracking_uri_of(exp)
    run_id = wait_shipped(journal_dir(result.output_dir), uri, 60.0) if exp.tracking.mode != "offline" else None
    hint = mlflow_ui_hint(uri, run_id, journal_dir(result.output_dir))
    if hint:
        click.echo(hint + ("" if run_id else f"   (not shipped yet; `orch sync {result.output_dir}` sends it)"))
