"""The records of a sweep: the parent MLflow run (created first, summarised last), the trial
table in the orch job record while it runs (``orch status SWEEP``), and the end of every child
run that a scheduler stopped early."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
from typing import Any, Optional

from orchestrator.config.schema import Experiment

log = logging.getLogger("orchestrator.sweep")

STOPPED_TAG = "orch.stopped_early"
# Tune's own bookkeeping in a result, not training metrics.
TUNE_KEYS = ("iteration", "max_iters", "timestamp", "pid", "training_iteration", "done",
             "iterations_since_restore", "checkpoint_dir_name")


def create_parent_run(exp: Experiment, payload: dict[str, Any]) -> tuple[str, str]:
    """Create the sweep's parent run with the sweep's settings as params and the base config as an
    artifact; returns ``(tracking_uri, run_id)``."""
    from detection.tracking import _client, create_run, resolve_tracking_uri

    uri = resolve_tracking_uri(exp.tracking)
    tracking = dataclasses.replace(exp.tracking, uri=uri)
    run_id = create_run(tracking, f"{exp.name}-sweep", parent_run_id=None,
                        tags={"orch.sweep": "parent", "orch.sweep_job": payload["job_id"], "orch.backend": "ray"})
    client = _client(tracking)
    params = {
        "sweep.metric": payload["metric"], "sweep.mode": payload["mode"], "sweep.searcher": payload["searcher"],
        "sweep.num_samples": payload["num_samples"], "sweep.trials": payload["trials"],
        "sweep.scheduler": payload["scheduler"]["type"],
        **{f"sweep.space.{k}": f"{kind} {a}" for k, kind, a in payload["space"]},
    }
    for key, value in params.items():
        client.log_param(run_id, key[:250], str(value)[:6000])
    client.log_text(run_id, payload["config_yaml"], "sweep_config.yaml")
    return uri, run_id


def RecordCallback(job_id: str):
    """A Tune callback keeping ``record.extra["trials"]`` current (status, evaluations, metric,
    params), so ``orch status SWEEP`` shows the trials from any shell."""
    from ray.tune import Callback

    from orchestrator import jobs as records

    class _RecordCallback(Callback):
        def _update(self, trial: Any, status: str, result: Optional[dict] = None) -> None:
            result = result or trial.last_result or {}

            def change(r: Any) -> None:
                trials = r.extra.setdefault("trials", {})
                entry = trials.setdefault(trial.trial_id, {})
                entry.update(status=status, params={k: v for k, v in (trial.config or {}).items()})
                if "training_iteration" in result:
                    entry["evaluations"] = result["training_iteration"]
                metric = r.extra.get("metric")
                if metric in result:
                    entry[metric] = result[metric]

            try:
                records.update_record(job_id, change)
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


def _client(payload: dict[str, Any]):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=payload["tracking_uri"])


def child_runs(payload: dict[str, Any]) -> dict[str, Any]:
    """trial id -> MLflow run of that trial (children of the parent run)."""
    client = _client(payload)
    parent = client.get_run(payload["parent_run_id"])
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{payload['parent_run_id']}'", max_results=10000)
    return {r.data.tags.get("orch.trial_id"): r for r in runs}


def _best_of(df: Any, metric: str, mode: str) -> Optional[float]:
    if df is None or metric not in getattr(df, "columns", ()):
        return None
    values = [float(v) for v in df[metric].tolist() if v is not None and math.isfinite(float(v))]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def summarize(payload: dict[str, Any], results: Any) -> dict[str, Any]:
    """Classify each trial (completed / stopped early / failed), end the children a scheduler
    stopped (tag ``orch.stopped_early=true``, KILLED), and pick the best trial."""
    metric, mode = payload["metric"], payload["mode"]
    runs = child_runs(payload) if payload.get("parent_run_id") else {}
    client = _client(payload) if runs else None
    rows, best = [], None
    for result in results:
        last = result.metrics or {}
        trial_id = str(last.get("trial_id", ""))
        run = runs.get(trial_id)
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


def end_running_children(payload: dict[str, Any], status: str = "KILLED") -> None:
    """End every child run still RUNNING (the sweep was cancelled or failed under them)."""
    if not payload.get("parent_run_id"):
        return
    client = _client(payload)
    for run in child_runs(payload).values():
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status=status)


def finish_parent_run(payload: dict[str, Any], summary: Optional[dict[str, Any]], status: str) -> None:
    """Write the best trial (params ``best.<key>``, its metrics, ``best_config.yaml``) and the
    trial table (``trials.md``, ``trials.csv``) on the parent run, then end it."""
    if not payload.get("parent_run_id"):
        return
    client = _client(payload)
    run_id = payload["parent_run_id"]
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
                client.log_metric(run_id, f"best/{payload['metric']}", best["value"])
                for key, value in best["metrics"].items():
                    if key not in TUNE_KEYS and not key.startswith("time_"):
                        client.log_metric(run_id, key, float(value))
                base = build_experiment(yaml.safe_load(payload["config_yaml"]), source=payload["config_path"])
                config = with_overrides(base, {**best["params"], "sweep": None})
                client.log_text(run_id, dump_experiment(config), "best_config.yaml")
    finally:
        client.set_terminated(run_id, status=status)
