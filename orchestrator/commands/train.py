"""``orch train``: run the training program in this process (what every backend finally runs)."""

from __future__ import annotations

import click

from orchestrator.commands.common import experiment_argument, set_option


@click.command("train")
@experiment_argument
@set_option
def train_cmd(experiment: str, overrides: tuple[str, ...]) -> None:
    """Train EXPERIMENT here, in this process (single process, or one rank under torchrun).

    \b
    Examples:
      orch train experiments/shapes_demo.yaml
      orch train exp.yaml --set optim.lr=0.005 --set schedule.epochs=24
      torchrun --nproc_per_node 2 -m orchestrator.worker exp.yaml   # what backends run
    """
    import logging
    import os
    from pathlib import Path

    from cluster.env import DistEnv
    from cluster.logs import setup_logging
    from orchestrator.config import load_experiment, output_dir_of
    from orchestrator.outputs import check_free
    from orchestrator.worker import run

    env = DistEnv.detect(os.environ)
    setup_logging(env.rank)
    # Never into the folder of a live job (its checkpoints and journal): every rank refuses alike.
    check_free(Path(output_dir_of(load_experiment(experiment, overrides))))
    result = run(experiment, overrides, env=env)
    if env.is_main:
        _print_result(experiment, overrides, result)
    logging.shutdown()


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
