"""MLflow runs of a k-fold set, created by the orchestrator before launch (identity first).

Layout in ``mlflow ui`` (one MLflow experiment, ``tracking.experiment``):

- without a grid: a parent run ``<name> k-fold`` with one child run per fold (``fold-0``, ...);
- with a grid: a parent ``<name> grid`` holding one parent per grid point (``lr=0.01``), each
  holding its fold runs (``lr=0.01/fold-0``).

Every run is tagged ``orch.kfold_set``; children carry ``fold`` and one tag per grid key. At the
end each point's parent gets ``mean/<metric>``, ``std/<metric>`` and ``oof/<metric>`` for every
evaluation metric (per-class AP included), and the top parent the report files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

from orchestrator.config.schema import Experiment
from orchestrator.tracking import runs


def ensure_parents(exp: Experiment, trials: Sequence[Any], state: dict, set_id: str) -> Optional[str]:
    """Create (or reopen, on a resumed set) the parent runs and record them in ``state``;
    returns the absolute tracking URI, or None when tracking is off."""
    if not exp.tracking.enable:
        return None
    uri = runs.tracking_uri_of(exp)
    experiment = runs.experiment_name(exp)
    parents = state.setdefault("parents", {})
    tags = {"orch.kfold_set": set_id, **exp.tracking.tags}
    points = {t.point_name: t.point for t in trials}
    has_grid = any(points)
    if has_grid and not runs.is_active(uri, parents.get("grid")):
        parents["grid"] = runs.create_run(uri, experiment, f"{exp.name} grid", tags={**tags, "orch.kind": "kfold-grid"})
    elif has_grid:
        runs.reopen(uri, parents["grid"])
    known = parents.setdefault("points", {})
    for name, point in points.items():
        if runs.is_active(uri, known.get(name)):
            runs.reopen(uri, known[name])
            continue
        point_tags = {**tags, "orch.kind": "kfold-point" if has_grid else "kfold",
                      **{k: _text(v) for k, v in point.items()}}
        known[name] = runs.create_run(uri, experiment, name if has_grid else f"{exp.name} k-fold", tags=point_tags,
                                      parent_run_id=parents.get("grid") if has_grid else None)
        runs.log_params(uri, known[name], {k: _text(v) for k, v in point.items()})
    return uri


def child_run(exp: Experiment, trial: Any, state: dict, set_id: str, uri: str) -> str:
    """The run of one trial: the one recorded for it (a retried fold continues its run), else new."""
    recorded = state["trials"].get(trial.name, {}).get("run_id")
    if runs.is_active(uri, recorded):
        return recorded
    tags = {"orch.kfold_set": set_id, "orch.trial": trial.name, **trial.experiment.tracking.tags}
    return runs.create_run(uri, runs.experiment_name(exp), trial.name, tags=tags,
                           parent_run_id=state["parents"]["points"][trial.point_name])


def _text(value: Any) -> str:
    from orchestrator.kfold.expand import format_value

    return format_value(value)


def log_summaries(uri: str, state: dict, summaries: Sequence[Any], paths: dict[str, Path], finished: bool,
                  metric: str = "bbox_mAP", mode: str = "max") -> None:
    """Log mean/std/out-of-fold metrics to each point's parent, the report (and, with a grid, the
    best point by mean ``metric``) to the top parent, and end the parents (FAILED where some folds
    did not finish)."""
    from mlflow.entities import Metric

    from detection.tracking import metric_key
    from orchestrator.kfold.aggregate import compare_points

    client = runs.client(uri)
    parents = state["parents"]
    now = int(time.time() * 1000)
    done = set()
    for s in summaries:
        run_id = parents["points"][s.name]
        metrics = [Metric(metric_key(f"{kind}/{k}"), float(v), now, 0)
                   for kind, values in (("mean", s.mean), ("std", s.std), ("oof", s.oof)) for k, v in values.items()]
        metrics.append(Metric("folds", float(len(s.folds)), now, 0))
        for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics a call
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
        done.add(s.name)
    top = parents.get("grid") or next(iter(parents["points"].values()))
    rows = compare_points(summaries, metric, mode)
    if parents.get("grid") and rows:
        client.set_tag(top, "best_point", rows[0]["point"])
        client.log_batch(top, metrics=[Metric(metric_key(f"best/{kind}/{metric}"), float(rows[0][kind]), now, 0)
                                       for kind in ("mean", "std", "oof")])
    for path in paths.values():
        client.log_artifact(top, str(path), artifact_path="kfold")
    for name, run_id in parents["points"].items():
        client.set_terminated(run_id, "FINISHED" if name in done else "FAILED")
    if parents.get("grid"):
        client.set_terminated(parents["grid"], "FINISHED" if finished else "FAILED")
