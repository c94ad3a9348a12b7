"""Real Slurm jobs (2-node local cluster with accounting, see conftest.py) that train the tiny model
and log to a real MLflow server over HTTP. Everything goes through ``orch submit``'s code path
(:func:`orchestrator.submit.submit`) and ``orch status/cancel`` (:func:`orchestrator.cli.main`).

Every job of the module is submitted at the start (``jobs``) so that they run side by side, as on
a real cluster, and each test then checks its own job: the module takes about as long as its
slowest job instead of the sum of all.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.spec import JobState

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(300)]


def submit(paths, **flags):
    """``orch submit PATHS --backend slurm --partition dev [flags]`` -> (plan, handles, seconds)."""
    from orchestrator.submit import SubmitFlags, submit as orch_submit

    started = time.monotonic()
    plan, handles = orch_submit([str(p) for p in paths], (), SubmitFlags(backend="slurm", partition="dev", **flags))
    return plan, handles, time.monotonic() - started


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def log_text(handle) -> str:
    path = Path(handle.record().log_path)
    return path.read_text(errors="replace") if path.exists() else ""


def mlflow_run(uri: str, run_id: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(run_id)


@pytest.fixture(scope="module")
def jobs(slurm_cluster, write_experiment, module_orch_home, tmp_path_factory):
    """name -> (plan, handles, submit seconds, folder) of every job of this module."""
    root = tmp_path_factory.mktemp("slurm_jobs")
    out = {}

    def add(key, paths, **flags):
        out[key] = (*submit(paths, **flags), root / key)

    # The interactive ones first (and their tests come first in this file): they act on their jobs
    # while those train.
    add("cancel", [write_experiment(root / "cancel", "cancel", **{"schedule.iterations": 5000, "eval.interval": 5000})])
    add("requeue", [write_experiment(root / "requeue", "requeue", **{
        "schedule.iterations": 60, "eval.interval": 60, "checkpoint.interval": 100, "tracking.experiment": "requeue-test"})])
    add("single", [write_experiment(root / "single", "single")])
    # device auto: the job asks for GPUs (fake GRES, one per node) and trains on CPU (no CUDA here).
    add("two_node", [write_experiment(root / "two_node", "two-node", **{"runtime.device": "auto"})], gpus=2, gpus_per_node=1)
    add("fail", [write_experiment(root / "fail", "fail", **{"data.train.ann_file": "/nonexistent/instances_train.json"})])
    add("array", [write_experiment(root / "array" / str(i), f"arr-{i}", **{
        "schedule.iterations": 2, "eval.interval": 2, "resources.slurm.array_parallelism": 2}) for i in range(3)])
    yield out


def test_requeue_after_usr2_resumes_same_mlflow_run(jobs, mlflow_server):
    from mlflow.tracking import MlflowClient

    _, [handle], _, _ = jobs["requeue"]
    wait_for(lambda: "iter 3/60" in log_text(handle), 180, "training to be under way")
    native = handle.record().native_id
    # What Slurm sends `signal_delay_s` before the time limit (or a preempting admin): USR2.
    subprocess.run(["scancel", "--signal=USR2", native], check=True)
    assert handle.wait(timeout_s=240) is JobState.SUCCEEDED, log_text(handle)
    log = log_text(handle)
    assert "requeueing job" in log and "restart 1" in log and "resumed from" in log
    record = handle.record()
    result = json.loads((Path(record.output_dir) / "result.json").read_text())
    assert result["iterations"] == 60 and result["run_id"] == record.mlflow_run_id
    client = MlflowClient(mlflow_server)
    run = client.get_run(record.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["slurm.restarts"] == "1"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "restarts")] == [0, 1]
    # One run, continued: the test's own MLflow experiment holds no other run.
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [record.mlflow_run_id]


def test_cancel(jobs, capsys):
    from orchestrator.cli import main

    _, [handle], _, _ = jobs["cancel"]
    wait_for(lambda: "iter 1/5000" in log_text(handle), 180, "the first training step")
    assert main(["cancel", handle.job_id]) == 0
    assert handle.state() is JobState.CANCELLED
    native = handle.record().native_id
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", native], capture_output=True, text=True).stdout.strip(),
             30, "the job to leave the queue")
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-j", native, "-o", "State"], capture_output=True, text=True)
    assert sacct.stdout.startswith("CANCELLED")
    assert main(["cancel", handle.job_id]) == 0  # idempotent
    capsys.readouterr()
    assert main(["status", handle.job_id]) == 0
    assert "CANCELLED" in capsys.readouterr().out


def test_single_node_job(jobs, mlflow_server):
    plan, [handle], seconds, _ = jobs["single"]
    record = handle.record()
    # Submission returned with the Slurm job id; what --dry-run shows is exactly what went to sbatch.
    assert record.native_id and record.native_id.isdigit() and seconds < 30
    assert Path(record.extra["submission_file"]).read_text() == plan.payload["groups"][0]["script"]
    assert handle.wait(timeout_s=240) is JobState.SUCCEEDED, log_text(handle)
    record = handle.record()
    assert record.exit_code == 0 and record.extra["state_source"] == "sacct"
    assert "detection.train: done: 4 iterations" in log_text(handle)
    run = mlflow_run(mlflow_server, record.mlflow_run_id)
    assert run.info.status == "FINISHED" and "bbox_mAP" in run.data.metrics
    assert run.data.tags["slurm.restarts"] == "0"


def test_two_node_job_ranks_agree_on_master(jobs, mlflow_server):
    plan, [handle], _, _ = jobs["two_node"]
    assert "#SBATCH --nodes=2" in plan.text and "#SBATCH --gpus-per-node=1" in plan.text
    assert "#SBATCH --ntasks-per-node=1" in plan.text
    assert handle.wait(timeout_s=240) is JobState.SUCCEEDED, log_text(handle)
    record = handle.record()
    folder = Path(record.extra["slurm_folder"])
    ranks = [json.loads((folder / f"{record.native_id}_rank{r}_env.json").read_text()) for r in (0, 1)]
    assert {r["slurm_node"] for r in ranks} == {"node1", "node2"}
    assert [r["node_rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["master_addr"] == ranks[1]["master_addr"] == "node1"  # first host of the allocation
    assert ranks[0]["master_port"] == ranks[1]["master_port"] and ranks[0]["master_port"] is not None
    assert {r["cuda_visible_devices"] for r in ranks} == {"0"}  # one fake GPU per task
    assert mlflow_run(mlflow_server, record.mlflow_run_id).info.status == "FINISHED"


def test_array_of_three(jobs):
    plan, handles, _, folder = jobs["array"]
    assert len(plan.payload["groups"]) == 1 and "#SBATCH --array=0-2%2" in plan.text
    ids = [h.record().native_id for h in handles]
    array_id = ids[0].split("_")[0]
    assert ids == [f"{array_id}_{i}" for i in range(3)]
    assert [h.wait(timeout_s=240) for h in handles] == [JobState.SUCCEEDED] * 3
    for i in range(3):
        assert json.loads((folder / str(i) / "work" / "result.json").read_text())["iterations"] == 2


def test_failing_job_reports_error_and_exit_status(jobs, capsys):
    from orchestrator.cli import main

    _, [handle], _, _ = jobs["fail"]
    assert handle.wait(timeout_s=240) is JobState.FAILED
    record = handle.record()
    assert record.exit_code == 1
    assert record.error.startswith(f"Slurm job {record.native_id} FAILED (exit 1)")
    assert "/nonexistent/instances_train.json does not exist" in record.error
    assert main(["status", handle.job_id]) == 0
    assert "FAILED" in capsys.readouterr().out
