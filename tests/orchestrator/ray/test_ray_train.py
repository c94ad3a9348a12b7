"""Ray Train on a real Ray cluster: a 2-worker gloo run recorded as ONE MLflow run, and a run
that survives a SIGKILLed worker by restarting from its last reported checkpoint."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.spec import JobState
from orchestrator.submit import ResourceFlags, submit

from orch_testing import shipped_run

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _runs(tracking_uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("tiny-tests")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _registered_in(home: Path, journal: str) -> list[str]:
    """Files of the shipping registries under ``home`` (entries, shipper logs) naming ``journal``."""
    found = []
    for path in sorted((home / "shipping").rglob("*")):
        if path.is_file() and journal in path.read_text(errors="replace"):
            found.append(str(path))
    return found


def test_two_cpu_workers_log_one_mlflow_run(ray_head, orch_home, tiny_experiment, tracking_uri):
    plan, handles = submit([str(tiny_experiment)], (), ResourceFlags(backend="ray", gpus=2, address=ray_head.address))
    assert f"cluster address:      {ray_head.address}" in plan.text
    state = handles[0].wait(timeout_s=400)
    record = handles[0].record()
    log = Path(record.log_path).read_text(errors="replace")
    assert state == JobState.SUCCEEDED, f"{record.error}\n{log[-3000:]}"
    run = shipped_run(record)  # by the shipper that Ray worker rank 0 started
    runs = _runs(tracking_uri)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    assert run.info.run_id == runs[0].info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.tags["backend"] == "ray"
    assert "bbox_mAP" in run.data.metrics
    # Ray stored the reported checkpoint in the job's storage path.
    assert list(Path(record.output_dir, "ray", record.job_id).glob("checkpoint_*"))
    # Rank 0 handed the journal to the shipper of the submitter's ORCH_HOME (where its `orch
    # status` looks), not to one of the ORCH_HOME the cluster was started with.
    from orchestrator.tracking.runs import journal_dir

    head_home = psutil.Process(ray_head.process.pid).environ().get("ORCH_HOME")
    assert head_home and Path(head_home) != orch_home
    journal = journal_dir(record.output_dir)
    assert _registered_in(orch_home, journal)
    assert not _registered_in(Path(head_home), journal)


def test_killed_worker_restarts_from_its_checkpoint(ray_head, orch_home, make_experiment, tracking_uri,
                                                   train_worker_pids):
    # Long enough to be killed mid-run: 16 iterations, a checkpoint (and a Ray report) every 2.
    path = make_experiment(**{"schedule.iterations": 16, "checkpoint.interval": 2, "eval.interval": 16,
                              "eval.classwise": False})
    _, handles = submit([str(path)], (), ResourceFlags(backend="ray", gpus=1, address=ray_head.address))
    record = handles[0].record()
    storage = Path(record.output_dir, "ray", record.job_id)
    deadline = time.monotonic() + 300
    # The controller writes this snapshot once it has registered a reported checkpoint (the
    # checkpoint folder alone appears before the report reaches it).
    while not (storage / "checkpoint_manager_snapshot.json").exists():
        assert time.monotonic() < deadline, "no checkpoint was registered by Ray in 300 s"
        assert not handles[0].state().finished, Path(record.log_path).read_text()[-3000:]
        time.sleep(0.2)
    workers = train_worker_pids()
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)

    state = handles[0].wait(timeout_s=400)
    record = handles[0].record()
    log = Path(record.log_path).read_text(errors="replace")
    assert state == JobState.SUCCEEDED, f"{record.error}\n{log[-3000:]}"
    # from the newest of Ray's restored checkpoint and the job's own (launchers/ray/worker.py)
    assert re.search(r"restarted by Ray: resuming from \S+/(ray_restore/rank0|checkpoints)/iter_\d+", log), log[-3000:]
    assert train_worker_pids() == []  # the new worker group ended too
    # One run, continued by the restarted worker, with the full 16 iterations done.
    assert shipped_run(record).info.status == "FINISHED"
    runs = _runs(tracking_uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert Path(record.output_dir, "checkpoints", "iter_16.pth").exists()
