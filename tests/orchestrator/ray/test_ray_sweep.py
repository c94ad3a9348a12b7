"""``orch sweep`` on a real Ray cluster: a 4-trial ASHA search over the learning rate recorded as
one MLflow parent run with 4 child runs, some stopped early (tagged, ended, never RUNNING)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main as orch
from orchestrator.commands.sweep import attach
from orchestrator.records import list_records
from orchestrator.jobs import JobHandle
from orchestrator.spec import JobState

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _all_shipped(client, count: int) -> bool:
    """``count`` runs in the sweep's experiment, none RUNNING (every final status shipped)."""
    experiment = client.get_experiment_by_name("tiny-tests")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return len(runs) == count and all(r.info.status != "RUNNING" for r in runs)


def test_asha_sweep_over_the_lr(ray_head, orch_home, make_experiment, tracking_uri, capsys):
    from mlflow.tracking import MlflowClient

    # Four evaluations per trial (every 2 of 8 iterations) give ASHA rungs at 1 and 2. The grid
    # runs the good LRs first (2 at a time), so the later, tiny LRs fall below the rung cut.
    sweep = {
        "space": {"optim.lr": {"grid": [3.0e-3, 1.0e-3, 1.0e-5, 1.0e-6]}},
        "metric": "loss", "mode": "min", "max_concurrent": 2, "cpus_per_trial": 1,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    }
    path = make_experiment(**{"sweep": sweep, "schedule.iterations": 8, "eval.interval": 2,
                              "eval.classwise": False, "checkpoint.interval": 8})
    started = time.monotonic()
    assert orch(["sweep", str(path), "--address", ray_head.address, "--detach"]) == 0
    assert time.monotonic() - started < 60  # --detach returns once submitted
    [record] = list_records()
    assert f"submitted sweep {record.job_id}" in capsys.readouterr().out
    assert JobHandle(record.job_id).wait(timeout_s=600) == JobState.SUCCEEDED, Path(record.log_path).read_text()[-3000:]
    # Re-attaching to the finished sweep replays its log and shows its trials.
    assert attach(record.job_id) == 0
    out = capsys.readouterr().out
    assert "trials (4), objective min loss" in out and "best: trial" in out and "Trial status" in out
    assert orch(["status", record.job_id]) == 0 and "SUCCEEDED" in capsys.readouterr().out
    [record] = list_records()
    assert record.extra["kind"] == "sweep" and len(record.extra["trials"]) == 4

    # The sweep driver ships the parent and every trial in its last pass; what a pass could not
    # write (a busy store under load) its host shipper delivers after it: waited for, not assumed.
    client = MlflowClient(tracking_uri=tracking_uri)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not _all_shipped(client, 5):
        time.sleep(2)
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == ["tiny-tests"]  # one: nesting shows
    experiment = client.get_experiment_by_name("tiny-tests")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("orch.sweep") == "parent"]
    assert len(parents) == 1 and parents[0].info.run_id == record.mlflow_run_id
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and len(runs) == 5
    assert all(c.info.run_name.startswith("trial ") and "lr=" in c.info.run_name for c in children)
    # The trial table names each trial's run.
    assert {t["run_id"] for t in [record.extra["best"]]} <= {c.info.run_id for c in children}
    assert sorted(float(c.data.params["optim.lr"]) for c in children) == [1e-6, 1e-5, 1e-3, 3e-3]
    assert all(c.info.status != "RUNNING" for c in children)
    stopped = [c for c in children if c.data.tags.get("orch.stopped_early") == "true"]
    assert 1 <= len(stopped) <= 3 and all(c.info.status == "KILLED" for c in stopped)
    finished = [c for c in children if c.data.tags.get("orch.stopped_early") == "false"]
    assert finished and all(c.info.status == "FINISHED" for c in finished)

    # The parent: the best trial's config and metrics, and the table of all trials.
    assert parent.info.status == "FINISHED"
    best_run = client.get_run(parent.data.tags["orch.best_run_id"])
    assert parent.data.params["best.optim.lr"] == best_run.data.params["optim.lr"]
    # "loss" is reported to Tune at each evaluation (iterations 2, 4, 6, 8): the best of those.
    at_evals = [m.value for m in client.get_metric_history(best_run.info.run_id, "loss") if m.step % 2 == 0]
    assert parent.data.metrics["best/loss"] == pytest.approx(min(at_evals))
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.md", "trials.csv", "best_config.yaml", "sweep_config.yaml"} <= artifacts
    table = client.download_artifacts(parent.info.run_id, "trials.csv")
    lines = open(table).read().strip().splitlines()
    assert len(lines) == 5 and "stopped early" in "".join(lines)
    best_config = yaml.safe_load(open(client.download_artifacts(parent.info.run_id, "best_config.yaml")))
    assert best_config["optim"]["lr"] == float(best_run.data.params["optim.lr"]) and best_config["sweep"] is None
