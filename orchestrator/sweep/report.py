"""The records of a sweep: the parent run's journal (created first, summarised last), the trial
table in the orch job record while it runs (``orch status SWEEP``), and the end of every trial
run that a scheduler stopped early. Parent and trials are shipped to MLflow by the sweep driver
(one experiment, the experiment file's; trials nested under the parent)."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from typing import Any, Optional

from orchestrator.config.schema import Experiment
from orchestrator.sweep.plan import SweepPlan
from orchestrator.tracking import runs

log = logging.getLogger("orchestrator.sweep")

STOPPED_TAG = "orch.stopped_early"
# Tune's own bookkeeping in a result, not training metrics.
TUNE_KEYS = ("iteration", "max_iters", "timestamp", "pid", "training_iteration", "done",
             "iterations_since_restore", "checkpoint_dir_name")


def create_parent_journal(exp: Experiment, plan: SweepPlan) -> str:
    """Create the sweep's parent run journal in ``<sweep folder>/journal`` with the sweep's
    settings and search space as params and the base config as an artifact; returns its folder."""
    journal = runs.create_journal(runs.journal_dir(plan.output_dir), exp, f"{exp.name} sweep",
                                  tags={"orch.sweep": "parent", "orch.sweep_job": plan.job_id, "backend": "ray"})
    journal.log_params({
        "sweep.metric": plan.metric, "sweep.mode": plan.mode, "sweep.searcher": plan.searcher,
        "sweep.num_samples": plan.num_samples, "sweep.trials": plan.trials, "sweep.scheduler": plan.scheduler.type,
        **{f"sweep.space.{d.key}": f"{d.kind} {list(d.args)}" for d in plan.space},
    })
    journal.log_text(plan.config_yaml, "sweep_config.yaml")
    journal.set_status("RUNNING")
    journal.close()
    return journal.folder


def reopen_parent_journal(plan: SweepPlan) -> None:
    """A resumed sweep goes on in the same parent run: when the run was ended (FAILED by the
    check that found the driver dead, KILLED by a cancel), a RUNNING status is appended to its
    journal, which the shipper sends as ``update_run(status=RUNNING)``."""
    from detection.journal import TERMINAL, Journal, is_journal, last_status

    if plan.parent_journal and is_journal(plan.parent_journal) and last_status(plan.parent_journal) in TERMINAL:
        with Journal.open(plan.parent_journal) as journal:
            journal.set_status("RUNNING")


def trial_journal(plan: SweepPlan, trial_id: str) -> str:
    """The journal folder of a trial (its run, nested under the sweep's)."""
    return runs.journal_dir(os.path.join(plan.output_dir, "trials", trial_id))


def RecordCallback(job_id: str):
    """A Tune callback keeping ``record.extra["trials"]`` current (status, evaluations, metric,
    params, host), so ``orch status SWEEP`` shows the trials from any shell."""
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
                if result.get("hostname"):  # Tune adds the host the trial ran on to each result
                    entry["host"] = result["hostname"]
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


def _best_of(df: Any, metric: str, mode: str) -> Optional[float]:
    if df is None or metric not in getattr(df, "columns", ()):
        return None
    values = [float(v) for v in df[metric].tolist() if v is not None and math.isfinite(float(v))]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def summarize(plan: SweepPlan, results: Any) -> dict[str, Any]:
    """Classify each trial (completed / stopped early / failed), end the trial runs a scheduler
    stopped (tag ``orch.stopped_early=true``, KILLED) or whose actor died before its training
    could end them, and pick the best trial. Run ids are those already shipped."""
    from detection.journal import Journal, is_journal

    metric, mode = plan.metric, plan.mode
    rows, best = [], None
    for result in results:
        last = result.metrics or {}
        trial_id = str(last.get("trial_id", ""))
        if result.error is not None:
            outcome = "failed"
        elif last.get("iteration") is not None and last.get("iteration") < last.get("max_iters", 0):
            outcome = "stopped early"
        else:
            outcome = "completed"
        folder = trial_journal(plan, trial_id)
        if plan.tracking_uri and is_journal(folder):
            with Journal.open(folder) as journal:
                journal.set_tags({STOPPED_TAG: "true" if outcome == "stopped early" else "false"})
            runs.close_journal(folder, {"completed": "FINISHED", "failed": "FAILED"}.get(outcome, "KILLED"))
        value = _best_of(getattr(result, "metrics_dataframe", None), metric, mode)
        params = {k: v for k, v in (result.config or {}).items()}
        run_id = runs.run_id_of(folder, plan.tracking_uri) or ""
        row = {"trial_id": trial_id, "run_id": run_id, "outcome": outcome,
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
    """End every trial run still RUNNING (the sweep was cancelled or failed under them)."""
    if not plan.tracking_uri:
        return
    trials = os.path.join(plan.output_dir, "trials")
    for trial_id in sorted(os.listdir(trials)) if os.path.isdir(trials) else []:
        runs.close_journal(trial_journal(plan, trial_id), status)


def finish_parent_run(plan: SweepPlan, summary: Optional[dict[str, Any]], status: str) -> None:
    """Record the best trial (params ``best.<key>``, its metrics, ``best_config.yaml``) and the
    trial table (``trials.md``, ``trials.csv``) on the parent run, then end it."""
    from detection.journal import Journal

    if not plan.parent_journal:
        return
    with Journal.open(plan.parent_journal) as journal:
        try:
            if summary is not None:
                best = summary["best"]
                journal.log_text(trials_table(summary["trials"], "md"), "trials.md")
                journal.log_text(trials_table(summary["trials"], "csv"), "trials.csv")
                if best is not None:
                    import yaml

                    from orchestrator.config import build_experiment, dump_experiment, with_overrides

                    journal.log_params({f"best.{key}"[:250]: value for key, value in best["params"].items()})
                    journal.set_tags({"orch.best_trial": best["trial_id"], "orch.best_run_id": best["run_id"]})
                    values = {f"best/{plan.metric}": best["value"]}
                    values.update({k: float(v) for k, v in best["metrics"].items()
                                   if k not in TUNE_KEYS and not k.startswith("time_")})
                    journal.log_metrics(values, step=0)
                    base = build_experiment(yaml.safe_load(plan.config_yaml), source=plan.config_path)
                    journal.log_text(dump_experiment(with_overrides(base, {**best["params"], "sweep": None})),
                                     "best_config.yaml")
        finally:
            journal.set_status(status)


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
    hint = runs.ui_hint(record.tracking_uri, record.mlflow_run_id, runs.journal_dir(record.output_dir))
    if hint:  # the parent run, its trials nested under it
        lines.append(f"  {hint}")
    return "\n".join(lines)
