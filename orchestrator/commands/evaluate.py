"""``orch eval`` (owned by the trainer work)."""

from __future__ import annotations

import click

from cluster.errors import LaunchError


@click.command("eval")
@click.argument("experiment")
def eval_cmd(experiment: str) -> None:
    """Evaluate a checkpoint."""
    raise LaunchError("orch eval is not available yet")
