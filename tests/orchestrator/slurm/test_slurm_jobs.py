"""Real Slurm jobs (2-node local cluster with accounting, see conftest.py) that train the tiny model
and log to a real MLflow server over HTTP. Everything goes through ``orch submit``'s code path
(:func:`orchestrator.submit.submit`) and ``orch status/cancel`` (:func:`orchestrator.cli.main`).

Every job of the module is submitted at the start (``jobs``) so that they run side by side, as on
a real cluster, and each test then checks its own job: the module takes about as long as its
slowest job instead of the sum of all.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.spec import JobState

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(300)]


def submit(paths, check_data=True, **flags):
    """``orch submit PATHS --backend slurm --partition dev [flags]`` -> (plan, handles, seconds)."""
    from orchestrator.submit import ResourceFlags, submit as orch_submit

    started = time.monotonic()
    plan, handles = orch_submit([str(p) for p in paths], (), ResourceFlags(backend="slurm", partition="dev", **flags),
                                check_data=check_data)
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


def mlflow_run(record):
    """The job's run at its tracking server, once shipped (by the task's shipper, or by the one
    `orch status` starts from this machine when the allocation ended first)."""
    from orch_testing import shipped_run

    return shipped_run(record)


@pytest.fixture(scope="module")
def jobs(slurm_cluster, write_experiment, module_orch_home, tmp_path_factory):
    """name -> (plan, handles, submit seconds, folder) of every job of this module."""
    root = tmp_path_factory.mktemp("slurm_jobs")
    out = {}

    def add(key, paths, check_data=True, **flags):
        out[key] = (*submit(paths, check_data, **flags), root / key)

    # The interactive ones first (and their tests come first in this file): they act on their jobs
    # while those train.
    add("cancel", [write_experiment(root / "cancel", "cancel", **{"schedule.iterations": 5000, "eval.interval": 5000})])
    for key in ("usr2", "scontrol_requeue"):  # checkpoint.interval 100: only the preemption checkpoint
        add(key, [write_experiment(root / key, key, **{"schedule.iterations": 60, "eval.interval": 60,
                                                       "checkpoint.interval": 100, "tracking.experiment": key})])
    add("single", [write_experiment(root / "single", "single")])
    # device auto: the job asks for GPUs (fake GRES, one per node) and trains on CPU (no CUDA here).
    add("two_node", [write_experiment(root / "two_node", "two-node", **{"runtime.device": "auto"})], gpus=2, gpus_per_node=1)
    # Data seen only from the compute nodes (--no-data-check): the job finds it missing.
    add("fail", [write_experiment(root / "fail", "fail", **{"data.train.ann_file": "/nonexistent/instances_train.json"})],
        check_data=False)
    add("array", [write_experiment(root / "array" / str(i), f"arr-{i}", **{
        "schedule.iterations": 2, "eval.interval": 2, "resources.slurm.array_parallelism": 2}) for i in range(3)])
    yield out


def check_resumed(handle, mlflow_server: str) -> str:
    """The job was requeued once, resumed from the preemption checkpoint and finished the same
    MLflow run (and its own MLflow experiment holds no other run). Returns its log."""
    from mlflow.tracking import MlflowClient

    assert handle.wait(timeout_s=240) is JobState.SUCCEEDED, log_text(handle)
    log = log_text(handle)
    saved = re.search(r"checkpoint (\S+) \(preempted\)", log)
    assert saved and "restart 1" in log, log
    assert f"resumed from {saved.group(1)} at iteration" in log, log  # the preemption checkpoint
    record = handle.record()
    result = json.loads((Path(record.output_dir) / "result.json").read_text())
    assert result["iterations"] == 60
    run = mlflow_run(record)
    client = MlflowClient(mlflow_server)
    assert run.info.status == "FINISHED" and run.data.tags["slurm.restarts"] == "1"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "restarts")] == [0, 1]
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run.info.run_id]
    return log


def test_preemption_checkpoints_requeues_and_resumes_same_mlflow_run(jobs, mlflow_server):
    """USR2 (time limit near, or a preempting admin): orch checkpoints and requeues the job itself.
    ``scontrol requeue`` (SIGTERM): orch checkpoints first and Slurm requeues. Both signals are
    sent while the two jobs train side by side."""
    usr2, term = jobs["usr2"][1][0], jobs["scontrol_requeue"][1][0]
    for handle in (usr2, term):
        wait_for(lambda: "iter 3/60" in log_text(handle), 180, "training to be under way")
        command = ["scancel", "--signal=USR2"] if handle is usr2 else ["scontrol", "requeue"]
        subprocess.run([*command, handle.record().native_id], check=True)
    assert "USR2: checkpoint written; requeueing job" in check_resumed(usr2, mlflow_server)
    # After SIGTERM Slurm kills the task KillWait (5 s here) later, possibly before it logs more
    # than the checkpoint: what matters is that the checkpoint came first and was resumed from.
    check_resumed(term, mlflow_server)


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
    assert Path(record.extra["submission_file"]).read_text() == plan.groups[0].script
    assert handle.wait(timeout_s=240) is JobState.SUCCEEDED, log_text(handle)
    record = handle.record()
    assert record.exit_code == 0 and record.extra["state_source"] == "sacct"
    assert "detection.train: done: 4 iterations" in log_text(handle)
    run = mlflow_run(record)
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
    assert mlflow_run(record).info.status == "FINISHED"


def test_array_of_three(jobs):
    plan, handles, _, folder = jobs["array"]
    assert len(plan.groups) == 1 and "#SBATCH --array=0-2%2" in plan.text
    ids = [h.record().native_id for h in handles]
    array_id = ids[0].split("_")[0]
    assert ids == [f"{array_id}_{i}" for i in range(3)]
    script = plan.groups[0].script
    assert {Path(h.record().extra["submission_file"]).read_text() for h in handles} == {script}
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


def test_status_without_accounting(slurm_cluster, write_experiment, module_orch_home, tmp_path, capsys):
    """Many clusters run without slurmdbd: sacct then fails and submitit cannot see states (it
    even waits forever on a cancelled job). orch reads squeue / scontrol instead. Last in this
    module: it restarts the cluster without accounting."""
    from orchestrator.cli import main
    from orch_testing import slurm_accounting_enabled
    from orchestrator.launchers.slurm import state as slurm_state

    slurm_cluster.up(accounting=False)
    assert not slurm_accounting_enabled()
    _, [done], _ = submit([write_experiment(tmp_path / "ok", "ok", **{"schedule.iterations": 2, "eval.interval": 2})])
    _, [cancelled], _ = submit([write_experiment(tmp_path / "cancel", "cancel", **{"schedule.iterations": 5000,
                                                                                 "eval.interval": 5000})])
    assert done.state() in (JobState.PENDING, JobState.RUNNING)
    assert done.record().extra["state_source"] == "squeue"
    wait_for(lambda: "iter 1/5000" in log_text(cancelled), 180, "the first training step")
    assert main(["cancel", cancelled.job_id]) == 0
    assert done.wait(timeout_s=240) is JobState.SUCCEEDED, log_text(done)
    assert done.record().exit_code == 0 and done.record().extra["state_source"] == "scontrol"
    # Slurm's own word on the cancelled job, not orch's record of having cancelled it.
    native = cancelled.record().native_id
    status = wait_for(lambda: (s := slurm_state.query(native)).state.finished and s, 120, "the cancel to land")
    assert status.state is JobState.CANCELLED and status.source == "scontrol"
    capsys.readouterr()
    assert main(["status", done.job_id]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
