"""The records of a sweep: the parent MLflow run (created first, summarised last), the trial
table in the orch job record while it runs (``orch status SWEEP``), and the end of every child
run that a scheduler stopped early."""

from __future__ import annotations

import csv
import io
import logging
import math
from typing import Any, Optional

from orchestrator.config.schema import Experiment
from orchestrator.sweep.plan import SweepPlan
from orchestrator.tracking import runs

log = logging.getLogger("orchestrator.sweep")

STOPPED_TAG = "orch.stopped_early"
# Tune's own bookkeeping in a result, not training metrics.
TUNE_KEYS = ("iteration", "max_iters", "timestamp", "pid", "training_iteration", "done",
             "iterations_since_restore", "checkpoint_dir_name")


def create_parent_run(exp: Experiment, plan: SweepPlan) -> tuple[str, str]:
    """Create the sweep's parent run (in the experiment file's MLflow experiment, where the trials
    go too) with the sweep's settings as params and the base config as an artifact; returns
    ``(tracking_uri, run_id)``."""
    uri = runs.tracking_uri_of(exp)
    run_id = runs.create_run(uri, runs.experiment_name(exp), f"{exp.name} sweep",
                             tags={"orch.sweep": "parent", "orch.sweep_job": plan.job_id, "backend": "ray"})
    runs.log_params(uri, run_id, {
        "sweep.metric": plan.metric, "sweep.mode": plan.mode, "sweep.searcher": plan.searcher,
        "sweep.num_samples": plan.num_samples, "sweep.trials": plan.trials, "sweep.scheduler": plan.scheduler.type,
        **{f"sweep.space.{d.key}": f"{d.kind} {list(d.args)}" for d in plan.space},
    })
    runs.client(uri).log_text(run_id, plan.config_yaml, "sweep_config.yaml")
    return uri, run_id


def RecordCallback(job_id: str):
    """A Tune callback keeping ``record.extra["trials"]`` current (status, evaluations, metric,
    params), so ``orch status SWEEP`` shows the trials from any shell."""
    from ray.tune import Callback

    from orchestrator import records

    class _RecordCallback(Callback):
        def _update(self, trial: Any, status: str, result: Optional[dict] = None) -> None:
            result = result or trial.last_result or {}
            try:  # the driver is the only writer of `trials`
                record = records.load_record(job_id)
                trials = record.extra.get("trials") or {}
                entry = trials.setdefault(trial.trial_id, {})
                entry.update(status=status, params={k: v for k, v in (trial.config or {}).items()})
                if "training_iteration" in result:
                    entry["evaluations"] = result["training_iteration"]
                metric = record.extra.get("metric")
                if metric in result:
                    entry[metric] = result[metric]
                records.annotate(job_id, extra={"trials": trials})
            except Exception as err:  # noqa: BLE001 - bookkeeping must not stop the sweep
                log.warning("could not update the record of %s: %s", job_id, err)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._update(trial, "RUNNING")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._update(trial, "RUNNING", result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._update(trial, "TERMINATED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._update(trial, "ERROR")

    return _RecordCallback()


def child_runs(plan: SweepPlan) -> dict[str, Any]:
    """trial id -> MLflow run of that trial (children of the parent run)."""
    client = runs.client(plan.tracking_uri)
    parent = client.get_run(plan.parent_run_id)
    found = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{plan.parent_run_id}'", max_results=10000)
    return {r.data.tags.get("orch.trial_id"): r for r in found}


def _best_of(df: Any, metric: str, mode: str) -> Optional[float]:
    if df is None or metric not in getattr(df, "columns", ()):
        return None
    values = [float(v) for v in df[metric].tolist() if v is not None and math.isfinite(float(v))]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def summarize(plan: SweepPlan, results: Any) -> dict[str, Any]:
    """Classify each trial (completed / stopped early / failed), end the children a scheduler
    stopped (tag ``orch.stopped_early=true``, KILLED), and pick the best trial."""
    metric, mode = plan.metric, plan.mode
    children = child_runs(plan) if plan.parent_run_id else {}
    client = runs.client(plan.tracking_uri) if children else None
    rows, best = [], None
    for result in results:
        last = result.metrics or {}
        trial_id = str(last.get("trial_id", ""))
        run = children.get(trial_id)
        if result.error is not None:
            outcome = "failed"
        elif last.get("iteration") is not None and last.get("iteration") < last.get("max_iters", 0):
            outcome = "stopped early"
        else:
            outcome = "completed"
        if run is not None and client is not None:
            if outcome == "stopped early":
                client.set_tag(run.info.run_id, STOPPED_TAG, "true")
                client.set_terminated(run.info.run_id, status="KILLED")
            else:
                client.set_tag(run.info.run_id, STOPPED_TAG, "false")
                if client.get_run(run.info.run_id).info.status == "RUNNING":
                    # Training ended (or failed) but the trial's actor was gone before its
                    # MLflow hook could say so.
                    client.set_terminated(run.info.run_id, status="FINISHED" if outcome == "completed" else "FAILED")
        value = _best_of(getattr(result, "metrics_dataframe", None), metric, mode)
        params = {k: v for k, v in (result.config or {}).items()}
        row = {"trial_id": trial_id, "run_id": run.info.run_id if run is not None else "", "outcome": outcome,
               **params, "evaluations": last.get("training_iteration"), "iteration": last.get("iteration"),
               f"best {metric}": value, f"last {metric}": last.get(metric)}
        rows.append(row)
        if value is not None and (best is None or (value > best["value"] if mode == "max" else value < best["value"])):
            best = {"trial_id": trial_id, "run_id": row["run_id"], "value": value, "params": params,
                    "metrics": {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
    return {"best": best, "trials": rows}


def trials_table(rows: list[dict[str, Any]], fmt: str = "md") -> str:
    """The trial table as markdown (``md``) or CSV."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def end_running_children(plan: SweepPlan, status: str = "KILLED") -> None:
    """End every child run still RUNNING (the sweep was cancelled or failed under them)."""
    if not plan.parent_run_id:
        return
    client = runs.client(plan.tracking_uri)
    for run in child_runs(plan).values():
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status=status)


def finish_parent_run(plan: SweepPlan, summary: Optional[dict[str, Any]], status: str) -> None:
    """Write the best trial (params ``best.<key>``, its metrics, ``best_config.yaml``) and the
    trial table (``trials.md``, ``trials.csv``) on the parent run, then end it."""
    if not plan.parent_run_id:
        return
    client = runs.client(plan.tracking_uri)
    run_id = plan.parent_run_id
    try:
        if summary is not None:
            best = summary["best"]
            client.log_text(run_id, trials_table(summary["trials"], "md"), "trials.md")
            client.log_text(run_id, trials_table(summary["trials"], "csv"), "trials.csv")
            if best is not None:
                import yaml

                from orchestrator.config import build_experiment, dump_experiment, with_overrides

                for key, value in best["params"].items():
                    client.log_param(run_id, f"best.{key}"[:250], str(value))
                client.set_tag(run_id, "orch.best_trial", best["trial_id"])
                client.set_tag(run_id, "orch.best_run_id", best["run_id"])
                client.log_metric(run_id, f"best/{plan.metric}", best["value"])
                for key, value in best["metrics"].items():
                    if key not in TUNE_KEYS and not key.startswith("time_"):
                        client.log_metric(run_id, key, float(value))
                base = build_experiment(yaml.safe_load(plan.config_yaml), source=plan.config_path)
                config = with_overrides(base, {**best["params"], "sweep": None})
                client.log_text(run_id, dump_experiment(config), "best_config.yaml")
    finally:
        client.set_terminated(run_id, status=status)


def trial_table(record: Any) -> str:
    """The trials of a sweep record (status, evaluations, metric, params) and the best so far:
    what ``orch status SWEEP`` and ``orch sweep`` print."""
    metric = record.extra.get("metric", "metric")
    trials = record.extra.get("trials") or {}
    lines = [f"  trials ({len(trials)}), objective {record.extra.get('mode', '')} {metric}:"]
    for trial_id, t in sorted(trials.items()):
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.get("params", {}).items())
        value = t.get(metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
        lines.append(f"    {trial_id:<14} {t.get('status', '?'):<11} evals {t.get('evaluations', 0):<3} "
                     f"{metric} {shown:<8} {params}")
    best = record.extra.get("best")
    if best:
        lines.append(f"  best: trial {best['trial_id']} {metric}={best['value']:.4f} (MLflow run {best['run_id']})")
    return "\n".join(lines)
