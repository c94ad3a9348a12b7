"""Job records under $ORCH_HOME and the status / logs / cancel commands (real processes)."""

import os
import re
import subprocess
import sys
import time
import types

import pytest

from cluster.errors import JobNotFound
from orchestrator import jobs
from orchestrator.cli import main as cli
from orchestrator.spec import JobRecord, JobState


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make(name="exp", backend="local", state=JobState.PENDING, **extra):
    job_id = jobs.new_job_id(name)
    record = JobRecord(job_id=job_id, name=name, backend=backend, state=state, output_dir="/out/" + name,
                       config_path="/out/config.yaml", log_path=str(jobs.log_path(job_id)),
                       submitted_at=time.time(), **extra)
    jobs.save_record(record)
    return record


def test_job_ids_are_readable_unique_and_records_round_trip(home):
    ids = {jobs.new_job_id("my exp/1") for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"my-exp-1-\d{8}-\d{6}-[0-9a-f]{4}", i) for i in ids)
    record = make(mlflow_run_id="abc", extra={"devices": ["cpu0"]})
    assert jobs.load_record(record.job_id) == record
    assert (home / "jobs" / record.job_id / "record.json").exists()


def test_prefix_match_and_helpful_errors():
    a, b = make("alpha"), make("beta")
    assert jobs.load_record("alp").job_id == a.job_id
    assert jobs.load_record(b.job_id[:6]).job_id == b.job_id
    make("alpha")
    with pytest.raises(JobNotFound, match="matches 2 jobs"):
        jobs.load_record("alpha")
    with pytest.raises(JobNotFound, match="orch status --all"):
        jobs.load_record("nothing")
    assert [r.name for r in jobs.list_records()][:1] == ["alpha"]  # newest first


def test_finished_state_is_never_overwritten_by_a_running_one():
    record = make(state=JobState.CANCELLED)
    jobs.update_record(record.job_id, lambda r: setattr(r, "state", JobState.RUNNING))
    assert jobs.load_record(record.job_id).state == JobState.CANCELLED


def test_dead_supervisor_marks_the_job_failed():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    record = make(state=JobState.RUNNING, pid=proc.pid)
    refreshed = jobs.refresh_record(record)
    assert refreshed.state == JobState.FAILED and "supervisor" in refreshed.error


def test_remote_backends_are_dispatched_lazily(monkeypatch):
    calls = []
    module = types.SimpleNamespace(
        refresh_record=lambda r: (calls.append("refresh"), r)[1],
        cancel_record=lambda r: calls.append("cancel"),
    )
    monkeypatch.setitem(sys.modules, "orchestrator.launchers.fakesched", module)
    record = make(backend="fakesched", state=JobState.RUNNING)
    assert jobs.refresh_record(record).state == JobState.RUNNING
    assert jobs.cancel_job(record.job_id).state == JobState.CANCELLED
    assert calls == ["refresh", "refresh", "cancel"]
    # A backend without a module: the stored state is shown.
    other = make(backend="nosuchbackend", state=JobState.RUNNING)
    assert jobs.refresh_record(other).state == JobState.RUNNING


def test_cancel_kills_the_process_group_and_is_idempotent(capsys):
    # A job whose worker started a child: both must die.
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess,sys,time; "
                             "subprocess.Popen([sys.executable,'-c','import time; time.sleep(600)']); time.sleep(600)"],
                            start_new_session=True)
    record = make(state=JobState.RUNNING, pid=os.getpid(), extra={"pgid": proc.pid})
    time.sleep(0.5)
    assert cli(["cancel", record.job_id[:10]]) == 0
    assert "CANCELLED" in capsys.readouterr().out
    assert proc.wait(timeout=15) != 0
    assert not jobs._group_alive(proc.pid)  # the grandchild too (zombies aside)
    assert cli(["cancel", record.job_id]) == 0
    assert "already ended: CANCELLED" in capsys.readouterr().out
    assert jobs.cancel_requested(record.job_id)


def test_status_logs_commands(capsys):
    done = make("done", state=JobState.SUCCEEDED, mlflow_run_id="run123", exit_code=0,
                tracking_uri="sqlite:////tmp/m.db")
    jobs.update_record(done.job_id, lambda r: (setattr(r, "started_at", r.submitted_at), setattr(r, "ended_at", r.submitted_at + 75)))
    failed = make("broken", state=JobState.FAILED, exit_code=3, error="ValueError: bad")
    jobs.log_path(failed.job_id).write_text("line one\nValueError: bad\n")
    assert cli(["status"]) == 0
    out = capsys.readouterr().out
    assert done.job_id in out and failed.job_id in out and "run123" in out and "1m15s" in out
    assert cli(["status", "broken"]) == 0
    out = capsys.readouterr().out
    assert "exit status" in out and "3" in out and "ValueError: bad" in out
    assert cli(["status", done.job_id]) == 0
    assert "mlflow ui --backend-store-uri sqlite:////tmp/m.db" in capsys.readouterr().out
    assert cli(["logs", "broken"]) == 0
    assert capsys.readouterr().out == "line one\nValueError: bad\n"
    assert cli(["logs", "-f", "broken"]) == 0  # finished: prints and returns
    assert cli(["status", "nope"]) == 2
    assert "orch: error: no job 'nope'" in capsys.readouterr().err
