"""``orch cancel`` of a running sweep on a real Ray head: the parent and every trial run end
KILLED in MLflow within 60 s, and nothing of the sweep runs on (its driver, its trials)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orch_testing import cmdline, descendants, gone
from orchestrator.cli import main as orch
from orchestrator.records import list_records, load_record
from orchestrator.spec import JobState

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _stepping(output_dir: str, trials: int) -> bool:
    beats = list(Path(output_dir, "trials").glob("*/heartbeat/rank-0.jsonl"))
    return len(beats) >= trials and all(
        any(json.loads(line).get("step", 0) >= 1 for line in b.read_text().splitlines() if line.endswith("}"))
        for b in beats)


def test_cancel_ends_every_trial_run(ray_head, orch_home, make_experiment, tracking_uri):
    from mlflow.tracking import MlflowClient

    sweep = {"space": {"optim.lr": {"grid": [1.0e-3, 2.0e-3]}}, "metric": "loss", "mode": "min",
             "max_concurrent": 2, "cpus_per_trial": 1}
    path = make_experiment(**{"sweep": sweep, "schedule.iterations": 100000, "eval.interval": 100000,
                              "checkpoint.interval": 100000})
    client = MlflowClient(tracking_uri)
    client.search_experiments()  # the SQLite store created now, not by two processes at once
    assert orch(["sweep", str(path), "--address", ray_head.address, "--detach"]) == 0
    [record] = list_records()
    deadline = time.monotonic() + 300
    while not _stepping(record.output_dir, 2):
        assert time.monotonic() < deadline, Path(record.log_path).read_text()[-3000:]
        time.sleep(1)
    driver = load_record(record.job_id).pid
    assert orch(["cancel", record.job_id]) == 0
    cancelled = time.monotonic()

    def statuses() -> dict[str, str]:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        return {r.info.run_name: r.info.status for r in runs}

    while set(statuses().values()) != {"KILLED"} or len(statuses()) != 3:
        assert time.monotonic() - cancelled < 60, statuses()
        time.sleep(1)
    assert load_record(record.job_id).state == JobState.CANCELLED
    while not gone(driver):  # a zombie until this process (which started it) reaps it
        assert time.monotonic() - cancelled < 60, cmdline(driver)
        time.sleep(0.5)
    left = [p for p in descendants(ray_head.process.pid) if "run_trial" in cmdline(p) or "ImplicitFunc" in cmdline(p)]
    assert not left, [cmdline(p) for p in left]

