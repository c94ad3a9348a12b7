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

    from cluster.env import DistEnv
    from orchestrator.worker import setup_logging, run

    env = DistEnv.detect(os.environ)
    setup_logging(env.rank)
    result = run(experiment, overrides, env=env)
    if env.is_main:
        _print_result(result)
    logging.shutdown()


def _print_result(result) -> None:
    from orchestrator.commands.report_util import print_metrics, mlflow_ui_hint

    print_metrics(result.metrics, title="final metrics")
    hint = mlflow_ui_hint(getattr(result, "tracking_uri", None), getattr(result, "run_id", None))
    if hint:
        click.echo(hint)
