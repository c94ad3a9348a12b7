"""Printing helpers shared by commands: metric tables and the ``mlflow ui`` hint."""

from __future__ import annotations

from typing import Optional


def print_metrics(metrics: dict[str, float], title: str = "metrics") -> None:
    """Print metrics as a two-column table (rich), main COCO numbers first."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics, key=lambda k: ("/" in k, k)):
        value = metrics[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def mlflow_ui_hint(tracking_uri: Optional[str], run_id: Optional[str], journal: Optional[str] = None) -> Optional[str]:
    """The exact command that shows a run in the MLflow UI: the link to its experiment's runs
    table once ``journal`` (the run's journal folder) was shipped there, else to the UI."""
    from orchestrator.tracking.runs import ui_hint

    return ui_hint(tracking_uri, run_id, journal)
