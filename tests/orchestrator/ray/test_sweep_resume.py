"""A sweep outlives its driver: a 6-trial sweep on a real Ray head whose driver is SIGKILLed after
its 3rd trial finished, then ``orch sweep --resume JOB``: 6 trials in all, one MLflow parent (the
same run) with 6 children, none duplicated, nothing RUNNING, no trial process left."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from orch_testing import cmdline, descendants, gone
from orchestrator.cli import main as orch
from orchestrator.records import list_records, load_record
from orchestrator.spec import JobState

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _finished(job_id: str) -> int:
    return sum(t.get("status") == "TERMINATED" for t in (load_record(job_id).extra.get("trials") or {}).values())


def test_resume_after_the_driver_is_killed(ray_head, orch_home, make_experiment, tracking_uri):
    from mlflow.tracking import MlflowClient

    lrs = [1.0e-3, 2.0e-3, 3.0e-3, 4.0e-3, 5.0e-3, 6.0e-3]
    sweep = {"space": {"optim.lr": {"grid": lrs}}, "metric": "loss", "mode": "min", "max_concurrent": 1,
             "cpus_per_trial": 1, "scheduler": {"type": "fifo"}}
    path = make_experiment(**{"sweep": sweep, "schedule.iterations": 4, "eval.interval": 2,
                              "eval.classwise": False, "checkpoint.interval": 2})
    client = MlflowClient(tracking_uri)
    client.search_experiments()  # the SQLite store created now, not by two processes at once
    assert orch(["sweep", str(path), "--address", ray_head.address, "--detach"]) == 0
    [record] = list_records()
    deadline = time.monotonic() + 400
    while _finished(record.job_id) < 3:
        assert time.monotonic() < deadline, Path(record.log_path).read_text()[-3000:]
        time.sleep(0.5)
    driver = load_record(record.job_id).pid
    os.kill(driver, signal.SIGKILL)
    while not gone(driver):  # a zombie until this process (which started it) reaps it
        assert time.monotonic() < deadline
        time.sleep(0.2)

    assert orch(["sweep", "--resume", record.job_id]) == 0, Path(record.log_path).read_text()[-3000:]
    done = load_record(record.job_id)
    assert done.state == JobState.SUCCEEDED and done.extra["resumes"] == 1
    assert len(done.extra["trials"]) == 6

    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("orch.sweep") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 6 and len(runs) == 7
    assert sorted(float(c.data.params["optim.lr"]) for c in children) == lrs  # each value once
    assert len({c.data.tags["orch.trial_id"] for c in children}) == 6
    assert all(c.info.status == "FINISHED" for c in children), [(c.info.run_name, c.info.status) for c in children]
    # Each trial trained to its end once: the 3 finished ones were not trained again.
    ends = [line.rsplit("/", 1)[-1] for line in Path(record.log_path).read_text().splitlines()
            if "detection.train: done:" in line]
    assert sorted(ends) == sorted(done.extra["trials"]), ends
    left = [p for p in descendants(ray_head.process.pid) if "run_trial" in cmdline(p) or "ImplicitFunc" in cmdline(p)]
    assert not left, [cmdline(p) for p in left]

