"""``orch status``, ``orch logs``, ``orch cancel`` (owned by the cluster/local-backend work)."""

from __future__ import annotations

import click

from cluster.errors import LaunchError


@click.command("status")
@click.argument("job", required=False)
def status_cmd(job: str | None) -> None:
    """Show jobs (all, or one JOB)."""
    raise LaunchError("orch status is not available yet")


@click.command("logs")
@click.argument("job")
@click.option("-f", "--follow", is_flag=True)
def logs_cmd(job: str, follow: bool) -> None:
    """Print the log of JOB."""
    raise LaunchError("orch logs is not available yet")


@click.command("cancel")
@click.argument("job")
def cancel_cmd(job: str) -> None:
    """Cancel JOB."""
    raise LaunchError("orch cancel is not available yet")
