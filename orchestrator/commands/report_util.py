"""Printing helpers shared by commands: metric tables and the ``mlflow ui`` hint."""

from __future__ import annotations

from typing import Optional


def print_metrics(metrics: dict[str, float], title: str = "metrics") -> None:
    """Print metrics as a two-column table (rich), the one metric table of every command
    (``orch train``, ``orch submit --wait``, ``orch eval``): each IoU type's 12 COCO numbers in
    COCOeval's order, then any other number, then the per-class ones (``bbox_AP/<class>``). A
    COCO number that is absent (no ground truth in its area range: left out of the metrics, or
    COCOeval's -1 in older files) shows as "–"."""
    from rich.console import Console
    from rich.table import Table

    from detection.evaluation import ABSENT, STAT_NAMES

    if not metrics:
        Console().print(f"{title}: (no metrics)")
        return
    coco = [f"{iou_type}_{name}" for iou_type in sorted({k.split("_", 1)[0] for k in metrics if k.endswith("_mAP")})
            for name in STAT_NAMES]
    keys = coco + sorted(k for k in metrics if k not in coco and "/" not in k) + sorted(k for k in metrics if "/" in k)
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in keys:
        value = metrics.get(key)
        absent = value is None or (key in coco and value == ABSENT)
        table.add_row(key, "–" if absent else f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def mlflow_ui_hint(tracking_uri: Optional[str], run_id: Optional[str], journal: Optional[str] = None,
                   kfold_set: Optional[str] = None) -> Optional[str]:
    """The exact command that shows a run in the MLflow UI: the link to its experiment's runs
    table (``kfold_set``: that set's runs only) once ``journal`` (the run's journal folder) was
    shipped there, else to the UI."""
    from orchestrator.tracking.runs import ui_hint

    return ui_hint(tracking_uri, run_id, journal, kfold_set)
