"""``orch sweep --resume JOB`` refuses what it cannot finish, in one line, before anything starts;
``records.reopen`` is the one way back from a finished state (fast: no Ray)."""

import pytest

from orchestrator import records
from orchestrator.cli import main as orch
from orchestrator.spec import JobState


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    return tmp_path


def _job(tmp_path, state, kind="sweep"):
    record = records.create_record(name="s", backend="ray", output_dir=str(tmp_path / "out"),
                                   config_path=str(tmp_path / "out" / "config.yaml"), extra={"kind": kind})
    if state != JobState.PENDING:
        records.transition(record.job_id, state)
    return record.job_id


def test_reopen_brings_a_failed_sweep_back_under_its_id(home):
    job_id = _job(home, JobState.FAILED)
    records.transition(job_id, JobState.CANCELLED)  # the first finished state wins ...
    assert records.load_record(job_id).state == JobState.FAILED
    reopened = records.reopen(job_id)  # ... and only reopen goes back
    assert (reopened.state, reopened.ended_at, reopened.error, reopened.extra["resumes"]) == (
        JobState.PENDING, None, None, 1)
    assert [r.state for r in records.list_records()] == [JobState.PENDING]  # the index follows
    assert records.transition(job_id, JobState.RUNNING).state == JobState.RUNNING


@pytest.mark.parametrize("state, kind, message", [
    (JobState.FAILED, "kfold", "is not a sweep"),
    (JobState.SUCCEEDED, "sweep", "already finished"),
    (JobState.FAILED, "sweep", "sweep.json"),  # its folder is gone
])
def test_resume_refuses(home, capsys, state, kind, message):
    job_id = _job(home, state, kind)
    assert orch(["sweep", "--resume", job_id]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert records.load_record(job_id).state == state  # nothing reopened


def test_a_sweep_whose_driver_runs_is_not_resumed(home, capsys):
    import os

    job_id = _job(home, JobState.PENDING)
    records.transition(job_id, JobState.RUNNING, pid=os.getpid())  # a live driver: this process
    assert orch(["sweep", "--resume", job_id]) == 2
    assert f"orch cancel {job_id}" in capsys.readouterr().err
    assert records.load_record(job_id).state == JobState.RUNNING


def test_resume_takes_no_experiment(home, capsys):
    assert orch(["sweep", "exp.yaml", "--resume", "x"]) == 2
    assert "--resume JOB takes no experiment" in capsys.readouterr().err
