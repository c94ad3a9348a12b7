"""``orch split``, ``orch kfold``, ``orch report`` (owned by the k-fold work)."""

from __future__ import annotations

import click

from cluster.errors import LaunchError


@click.command("split")
@click.argument("ann_file")
def split_cmd(ann_file: str) -> None:
    """Split a COCO file into K folds."""
    raise LaunchError("orch split is not available yet")


@click.command("kfold")
@click.argument("experiment")
def kfold_cmd(experiment: str) -> None:
    """Run K-fold cross-validation."""
    raise LaunchError("orch kfold is not available yet")


@click.command("report")
@click.argument("set_id")
def report_cmd(set_id: str) -> None:
    """Print the comparison table of a k-fold set."""
    raise LaunchError("orch report is not available yet")
