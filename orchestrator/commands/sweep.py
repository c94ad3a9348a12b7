"""``orch sweep`` (owned by the Ray work)."""

from __future__ import annotations

import click

from cluster.errors import LaunchError


@click.command("sweep")
@click.argument("experiment")
def sweep_cmd(experiment: str) -> None:
    """Run a Ray Tune search."""
    raise LaunchError("orch sweep is not available yet")
