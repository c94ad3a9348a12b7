"""MLflow runs of a k-fold set: journals created by the orchestrator before launch (identity
first), shipped to MLflow as the set runs (or later, ``orch sync``).

Layout in ``mlflow ui`` (ONE MLflow experiment, the experiment file's: ``tracking.experiment``,
else its ``name``), parents with their children nested under them:

- without a grid: a parent run ``<name> k-fold`` (journal ``<set>/journal``) with one child
  run per fold (``fold-0``, ...);
- with a grid: a parent ``<name> grid`` (``<set>/journal``) holding one parent per grid point
  (``lr=0.01``, ``<set>/<point>/journal``), each holding its fold runs (``lr=0.01/fold-0``).

Every run is tagged ``orch.kfold_set``; children carry ``fold`` and one tag per grid key; the grid
parent carries the grid as params (``grid.<key>``) and each point parent its values, so the
compare view's parallel-coordinates plot works on points and folds alike. At the end each point's
parent gets ``mean/<metric>``, ``std/<metric>`` and ``oof/<metric>`` for every evaluation metric
(per-class AP included), ``test_mean/<metric>`` and ``test_std/<metric>`` when the set has a
held-out test file (``kfold.test``), and the top parent the report files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from orchestrator.config.schema import Experiment
from orchestrator.tracking import runs


def ensure_parents(exp: Experiment, trials: Sequence[Any], state: dict, set_id: str, set_dir: Path) -> Optional[str]:
    """Create (or continue, on a resumed set) the parent runs' journals, record their folders in
    ``state`` and start their shippers; returns the absolute tracking URI, or None when tracking
    is off."""
    if not exp.tracking.enable:
        return None
    from orchestrator.kfold.expand import slug_of

    uri = runs.tracking_uri_of(exp)
    parents = state.setdefault("parents", {})
    tags = {"orch.kfold_set": set_id, **exp.tracking.tags}
    points = {t.point_name: t.point for t in trials}
    has_grid = any(points)
    settings = {"kfold.folds": state.get("folds"), "kfold.seed": state.get("seed")}
    made = []
    if has_grid:
        grid = _parent(runs.journal_dir(str(set_dir)), exp, f"{exp.name} grid", {**tags, "orch.kind": "kfold-grid"})
        grid.log_params({**settings, **{f"grid.{k}": _text(list(v)) for k, v in exp.grid.items()}})
        parents["grid"] = grid.folder
        made.append(grid)
    known = parents.setdefault("points", {})
    for name, point in points.items():
        folder = set_dir / slug_of(name) if has_grid else set_dir
        journal = _parent(runs.journal_dir(str(folder)), exp, name if has_grid else f"{exp.name} k-fold",
                          {**tags, "orch.kind": "kfold-point" if has_grid else "kfold",
                           **{k: _text(v) for k, v in point.items()}},
                          parent=parents.get("grid") if has_grid else None)
        journal.log_params({**settings, **{k: _text(v) for k, v in point.items()}})
        known[name] = journal.folder
        made.append(journal)
    from cluster.files import fsync_paths

    fsync_paths([path for journal in made for path in journal.paths_to_sync(journal.folder)])  # all at once
    for journal in made:
        journal.close()
        if exp.tracking.mode != "offline":
            runs.start_shipper(journal.folder, uri, until_pid=os.getpid())
    return uri


def _parent(folder: str, exp: Experiment, run_name: str, tags: dict, parent: Optional[str] = None):
    """A parent run's journal: continued when the set resumes (it runs again), else new."""
    journal = runs.create_journal(folder, exp, run_name, tags=tags, parent=parent, resume=True,
                                  durable=False)  # ensure_parents makes them durable together
    journal.set_status("RUNNING")
    return journal


def trial_tracking(trial: Any, state: dict, set_id: str, uri: str) -> dict[str, Any]:
    """The tracking keys of one trial: its parent (its point's run) and its tags; its journal is
    made at submission in the trial's folder (continued by a retried fold)."""
    return {"tracking.uri": uri, "tracking.parent_journal": state["parents"]["points"][trial.point_name],
            "tracking.tags": {"orch.kfold_set": set_id, "orch.trial": trial.name, **trial.experiment.tracking.tags}}


def _text(value: Any) -> str:
    from orchestrator.kfold.expand import format_value

    return format_value(value)


def log_summaries(state: dict, summaries: Sequence[Any], paths: dict[str, Path], finished: bool,
                  metric: str = "bbox_mAP", mode: str = "max") -> None:
    """Record mean/std/out-of-fold metrics on each point's parent, the report (and, with a grid,
    the best point by mean ``metric``) on the top parent, and end the parents (FAILED where some
    folds did not finish). Their shippers deliver it."""
    from detection.journal import Journal
    from detection.journal_hook import metric_key
    from orchestrator.kfold.aggregate import compare_points

    parents = state["parents"]
    done = set()
    for s in summaries:
        with Journal.open(parents["points"][s.name]) as journal:
            groups = (("mean", s.mean), ("std", s.std), ("oof", s.oof), ("test_mean", s.test_mean), ("test_std", s.test_std))
            values = {metric_key(f"{kind}/{k}"): float(v) for kind, group in groups for k, v in group.items()}
            journal.log_metrics({**values, "folds": float(len(s.folds))}, step=0)
        done.add(s.name)
    top = parents.get("grid") or next(iter(parents["points"].values()))
    rows = compare_points(summaries, metric, mode)
    with Journal.open(top) as journal:
        if parents.get("grid") and rows:
            journal.set_tags({"best_point": rows[0]["point"]})
            best = next(s for s in summaries if s.name == rows[0]["point"])
            tested = {f"best/{kind}/{metric}": group[metric] for kind, group in
                      (("test_mean", best.test_mean), ("test_std", best.test_std)) if metric in group}
            journal.log_metrics({**{metric_key(f"best/{kind}/{metric}"): float(rows[0][kind])
                                    for kind in ("mean", "std", "oof")},
                                 **{metric_key(k): float(v) for k, v in tested.items()}}, step=0)
        for path in paths.values():
            journal.log_artifact(str(path), artifact_path="kfold")
    end_parents(state, {name: "FINISHED" if name in done else "FAILED" for name in parents["points"]},
                "FINISHED" if finished else "FAILED")


def end_parents(state: dict, points: dict[str, str], grid: str) -> None:
    """End the parent runs: each point's with ``points[name]``, the grid parent with ``grid``."""
    from detection.journal import Journal

    parents = state.get("parents", {})
    folders = [(parents["points"][name], status) for name, status in points.items() if name in parents.get("points", {})]
    if parents.get("grid"):
        folders.append((parents["grid"], grid))
    for folder, status in folders:
        with Journal.open(folder) as journal:
            journal.set_status(status)
