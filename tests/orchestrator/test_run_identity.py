"""A run is never overwritten or merged into another (issue 23).

- A new ``orch train`` / ``orch submit`` of an experiment whose folder holds a run goes to
  ``<folder>-2``: the first run's checkpoints and MLflow run (status, params, every metric
  series) stay as they were, also after ``orch sync --all``; the second is its own MLflow run.
- ``runtime.resume`` keeps the folder (the only way to continue a run).
- One live run per folder: of two ``orch train`` started together one runs, the other exits 2
  at once with one line.
- ``orch submit`` with a missing ``ann_file`` exits 2 at once: no record, no folder, no MLflow run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.errors import LaunchError
from orchestrator import records
from orchestrator.launch import ResourceFlags
from orchestrator.outputs import choose_run_folder, hold, is_locked, release
from orchestrator.submit import submit
from orch_testing import store_untouched

pytestmark = pytest.mark.usefixtures("local_orch_env")
ORCH = [sys.executable, "-m", "orchestrator.cli"]


def _orch(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*ORCH, *args], capture_output=True, text=True, timeout=600, **kwargs)


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _mlflow_runs(uri: str) -> dict:
    """{run name: (status, params, {metric: [(step, value), ...]})} of every run in the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    out = {}
    for run in client.search_runs(experiments, max_results=1000):
        series = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                  for key in run.data.metrics}
        out[run.info.run_name] = (run.info.run_id, run.info.status, dict(run.data.params), series)
    return out


@pytest.mark.slow
def test_training_again_makes_a_new_run_and_leaves_the_first_as_it_was(make_experiment, tmp_path, tracking_uri):
    path = make_experiment()
    first = _orch("train", str(path))
    assert first.returncode == 0, first.stderr[-2000:]
    work = tmp_path / "work"
    checkpoints = _files(work / "checkpoints")
    assert "best_bbox_mAP.pth" in checkpoints
    assert _orch("sync", "--all").returncode == 0 and _orch("sync", str(tmp_path), "--uri", tracking_uri).returncode == 0
    before = _mlflow_runs(tracking_uri)
    [(name, (run_id, status, params, series))] = before.items()
    assert status == "FINISHED" and params["optim.lr"] == "0.001" and series["loss"]

    second = _orch("train", str(path), "--set", "optim.lr=0.002")
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"{work} holds an earlier run" in second.stderr and f"this run goes to {work}-2" in second.stderr
    assert "runtime.resume=auto" in second.stderr
    assert _files(work / "checkpoints") == checkpoints  # the first run's files, byte for byte
    assert (tmp_path / "work-2" / "checkpoints" / "best_bbox_mAP.pth").is_file()
    for args in (("sync", "--all"), ("sync", str(tmp_path), "--uri", tracking_uri)):
        assert _orch(*args).returncode == 0
        after = _mlflow_runs(tracking_uri)
        assert after[name] == before[name]  # status, params and every metric series unchanged
        assert set(after) == {name, "work-2"}
        new_id, new_status, new_params, new_series = after["work-2"]
        assert new_id != run_id and new_status == "FINISHED" and new_params["optim.lr"] == "0.002"
        assert [step for step, _ in new_series["loss"]] == [step for step, _ in series["loss"]]  # not merged
    assert _files(work / "checkpoints") == checkpoints


@pytest.mark.slow
def test_two_trainings_started_together_one_runs_the_other_exits_2_at_once(make_experiment, tmp_path):
    path = make_experiment(**{"schedule.iterations": 40, "eval.interval": 40, "checkpoint.interval": 40})
    procs = [subprocess.Popen([*ORCH, "train", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    while all(p.poll() is None for p in procs):
        time.sleep(0.05)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    assert winner.poll() is None  # the refused one ended while the other still trains
    _, err = loser.communicate()
    assert loser.returncode == 2, err[-2000:]
    assert err.count("\n") == 1 and err.startswith("orch: error: the output folder") and str(tmp_path / "work") in err
    out, err = winner.communicate(timeout=600)
    assert winner.returncode == 0, err[-2000:]
    assert not (tmp_path / "work-2").exists()


def test_a_finished_runs_folder_gives_the_next_folder_resume_keeps_it(make_experiment, tmp_path, capsys):
    path = make_experiment()
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text("name: tiny\n")  # an earlier run
    (tmp_path / "work-2").mkdir()  # an empty folder (or only orch's lock files) holds no run
    (tmp_path / "work-2" / ".orch-run.lock").write_text("")
    plan, _ = submit([str(path)], (), ResourceFlags(backend="local"), dry_run=True)
    assert plan.jobs[0].output_dir == tmp_path / "work-2"
    assert plan.jobs[0].experiment.tracking.run_name == "work-2"
    assert f"this run goes to {tmp_path / 'work-2'}" in capsys.readouterr().err
    plan, _ = submit([str(path)], ("runtime.resume=auto",), ResourceFlags(backend="local"), dry_run=True)
    assert plan.jobs[0].output_dir == work
    # Two runs of one submission never share a folder.
    plan, _ = submit([str(path), str(path)], (), ResourceFlags(backend="local"), dry_run=True)
    assert [j.output_dir for j in plan.jobs] == [tmp_path / "work-2", tmp_path / "work-3"]


def test_a_folder_held_by_a_live_run_is_refused(make_experiment, tmp_path):
    path = make_experiment()
    work = tmp_path / "work"
    # Held by another process: a child holding the lock (it dies with that process).
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from orchestrator.outputs import hold; "
                              f"hold({str(work)!r}); print('held', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert child.stdout.readline().strip() == "held"
        assert is_locked(work)
        with pytest.raises(LaunchError, match=rf"output folder {work} belongs to a running orch train"):
            choose_run_folder(work, resume=True)
        with pytest.raises(LaunchError, match="in use by another running training"):
            hold(work)
        from orchestrator.cli import main as orch

        assert orch(["train", str(path)]) == 2
        assert orch(["submit", str(path), "--backend", "local"]) == 2
        assert records.list_records() == []
    finally:
        child.kill()
        child.wait()
    assert not is_locked(work)  # the lock died with its owner
    assert hold(work) and is_locked(work)
    release(work)
    assert not is_locked(work)


def test_submit_with_a_missing_ann_file_exits_2_writing_nothing(make_experiment, tmp_path, capsys, empty_store):
    from orchestrator.cli import main as orch

    path = make_experiment(**{"data.train.ann_file": str(tmp_path / "nope.json")})
    assert orch(["submit", str(path), "--backend", "local"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.train.ann_file" in err and "nope.json" in err and "--no-data-check" in err
    assert records.list_records() == []
    assert not (tmp_path / "work").exists()
    assert store_untouched(tmp_path / "mlflow.db", empty_store)
    # A dry run prints the plan (it may run where the data is not seen): no check
    assert orch(["submit", str(path), "--backend", "local", "--dry-run"]) == 0
    # Missing image folder, missing local weights: the same
    path = make_experiment(**{"data.val.img_dir": str(tmp_path / "nodir")})
    assert orch(["submit", str(path), "--backend", "local"]) == 2
    assert "data.val.img_dir" in capsys.readouterr().err
    path = make_experiment(**{"runtime.load_from": str(tmp_path / "w.pth")})
    assert orch(["submit", str(path), "--backend", "local"]) == 2
    assert "runtime.load_from" in capsys.readouterr().err
    assert records.list_records() == []


@pytest.mark.slow
def test_ctrl_c_during_submit_wait_leaves_the_job_running_and_says_how_to_cancel(make_experiment, tmp_path):
    import signal

    from orchestrator.jobs import cancel_job, refresh_job

    path = make_experiment(**{"schedule.iterations": 100000, "eval.interval": 100000})
    # SIGINT as a terminal gives it: a suite started in the background by a non-interactive shell
    # (`make test &`) runs with SIGINT ignored, which its children inherit (the orch here waited on).
    proc = subprocess.Popen([*ORCH, "submit", str(path), "--backend", "local", "--wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline()
    assert first.startswith("submitted "), first + proc.stderr.read()
    job_id = first.split()[1]
    assert f"outputs in {tmp_path / 'work'}" in first
    time.sleep(2)  # waiting (following the log)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    try:
        assert proc.returncode == 130
        assert "the job goes on" in err and f"orch cancel {job_id}" in err, err
        assert not refresh_job(job_id).state.finished  # still pending or running
    finally:
        cancel_job(job_id)


def test_orch_train_under_torchrun_refuses_a_folder_that_holds_a_run(make_experiment, tmp_path):
    """Several ranks cannot agree on a new folder before they meet: rank 0 refuses, with the ways on."""
    from cluster.env import DistEnv
    from orchestrator.commands.train import _run_folder

    path = make_experiment()
    (tmp_path / "work").mkdir()
    rank0, rank1 = DistEnv(rank=0, world_size=2, master_port=29400), DistEnv(rank=1, world_size=2, master_port=29400)
    assert _run_folder(str(path), (), rank0) == ((), tmp_path / "work")  # an empty folder: used (and held)
    release(tmp_path / "work")
    (tmp_path / "work" / "config.yaml").write_text("name: tiny\n")
    with pytest.raises(LaunchError, match=r"holds an earlier run; under torchrun .*runtime.resume=auto"):
        _run_folder(str(path), (), rank0)
    assert _run_folder(str(path), (), rank1) == ((), None)  # other ranks follow rank 0
    assert _run_folder(str(path), ("runtime.resume=auto",), rank0) == (("runtime.resume=auto",), tmp_path / "work")
    release(tmp_path / "work")
