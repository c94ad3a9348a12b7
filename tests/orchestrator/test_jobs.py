"""Job records under $ORCH_HOME (orchestrator.records), fresh states through each backend's
launcher (orchestrator.jobs), and the status / logs / cancel commands (real processes)."""

import os
import re
import subprocess
import sys
import time

import pytest

from cluster.errors import JobNotFound, LaunchError
from cluster.process import group_alive
from orchestrator import jobs, records
from orchestrator.cli import main as cli
from orchestrator.launchers import LAUNCHERS
from orchestrator.launchers.base import Launcher
from orchestrator.launchers.local import cancel_requested
from orchestrator.spec import JobState


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make(name="exp", backend="local", state=JobState.PENDING, **fields):
    record = records.create_record(name=name, backend=backend, output_dir="/out/" + name,
                                   config_path="/out/config.yaml", extra=fields.pop("extra", None))
    if state != JobState.PENDING:
        records.transition(record.job_id, state)
    if fields:
        records.annotate(record.job_id, **fields)
    return records.load_record(record.job_id)


def test_job_ids_are_readable_unique_and_records_round_trip(home):
    ids = {records.new_job_id("my exp/1") for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"my-exp-1-\d{8}-\d{6}-[0-9a-f]{4}", i) for i in ids)
    record = make(mlflow_run_id="abc", extra={"devices": ["cpu0"]})
    assert records.load_record(record.job_id) == record
    assert (home / "jobs" / record.job_id / "record.json").exists()


def test_prefix_match_and_helpful_errors():
    a, b = make("alpha"), make("beta")
    assert records.load_record("alp").job_id == a.job_id
    assert records.load_record(b.job_id[:6]).job_id == b.job_id
    make("alpha")
    with pytest.raises(JobNotFound, match="matches 2 jobs"):
        records.load_record("alpha")
    with pytest.raises(JobNotFound, match="orch status --all"):
        records.load_record("nothing")
    assert [r.name for r in records.list_records()][:1] == ["alpha"]  # newest first


def test_transition_rules_first_finished_state_wins():
    record = make(state=JobState.CANCELLED)
    records.transition(record.job_id, JobState.RUNNING)
    assert records.load_record(record.job_id).state == JobState.CANCELLED
    # A later terminal state (the supervisor seeing the killed process) fills empty fields only.
    after = records.transition(record.job_id, JobState.FAILED, exit_code=-15, error="killed")
    assert after.state == JobState.CANCELLED and after.exit_code == -15
    running = make("r")
    started = records.transition(running.job_id, JobState.RUNNING)
    assert started.started_at and not started.ended_at
    ended = records.transition(running.job_id, JobState.SUCCEEDED, exit_code=0)
    assert ended.ended_at >= started.started_at
    with pytest.raises(TypeError, match="transition"):
        records.annotate(running.job_id, state=JobState.FAILED)


def test_a_job_that_never_trained_ends_its_mlflow_run(tmp_path):
    """A job that failed before training (or was cancelled while queued) gets its final status
    in its journal from the record store, and a shipper delivers it: no run left RUNNING."""
    from detection.journal import last_status
    from orchestrator.config import build_experiment
    from orchestrator.tracking import runs
    from orch_testing import shipped_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    runs.create_journal(runs.journal_dir(str(out)), build_experiment({"name": "exp"}), "job").close()
    record = records.create_record(name="job", backend="local", output_dir=str(out), config_path="/none",
                                   tracking_uri=uri)
    records.transition(record.job_id, JobState.FAILED, error="ValueError: bad data")
    assert last_status(runs.journal_dir(str(out))) == "FAILED"
    run = shipped_run(records.load_record(record.job_id), timeout_s=120)
    assert run.info.status == "FAILED" and run.data.tags["orch.error"] == "ValueError: bad data"
    assert "MLflow run of job ends FAILED" in records.log_path(record.job_id).read_text()
    # The run id reaches the record (orch status shows it).
    assert jobs.refresh_record(records.load_record(record.job_id)).mlflow_run_id == run.info.run_id


def test_dead_supervisor_marks_the_job_failed():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    record = make(state=JobState.RUNNING, pid=proc.pid)
    refreshed = jobs.refresh_record(record)
    assert refreshed.state == JobState.FAILED and "supervisor" in refreshed.error


class FakeLauncher(Launcher):
    """A backend that only counts the calls the job layer makes."""

    name = "fakesched"
    calls: list = []

    def plan(self, jobs):
        raise NotImplementedError

    def preflight(self, plan, wait_s=0.0):
        pass

    def submit(self, plan):
        raise NotImplementedError

    def status(self, records):
        self.calls.append("status")
        return {}

    def cancel(self, record):
        self.calls.append("cancel")

    def describe(self, record):
        return [("fake", "row")]


def test_every_backend_is_reached_through_the_registry(monkeypatch, capsys):
    monkeypatch.setitem(LAUNCHERS, "fakesched", f"{__name__}:FakeLauncher")
    FakeLauncher.calls.clear()
    record = make(backend="fakesched", state=JobState.RUNNING)
    assert jobs.refresh_record(record).state == JobState.RUNNING
    assert cli(["status", record.job_id]) == 0 and "fake  row" in capsys.readouterr().out
    assert jobs.cancel_job(record.job_id).state == JobState.CANCELLED
    assert FakeLauncher.calls == ["status", "status", "status", "cancel"]
    # A backend that is not in the registry: the stored state is shown (with a warning).
    other = make(backend="nosuchbackend", state=JobState.RUNNING)
    assert jobs.refresh_record(other).state == JobState.RUNNING
    with pytest.raises(LaunchError, match="unknown backend 'nosuchbackend'"):
        jobs.cancel_job(other.job_id)


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
    assert not group_alive(proc.pid)  # the grandchild too (zombies aside)
    assert cli(["cancel", record.job_id]) == 0
    assert "already ended: CANCELLED" in capsys.readouterr().out
    assert cancel_requested(record.job_id)


def test_status_logs_commands(capsys):
    done = make("done", state=JobState.SUCCEEDED, mlflow_run_id="run123", exit_code=0,
                tracking_uri="sqlite:////tmp/m.db")
    records.annotate(done.job_id, started_at=done.submitted_at, ended_at=done.submitted_at + 75)
    failed = make("broken", state=JobState.FAILED, exit_code=3, error="ValueError: bad")
    records.log_path(failed.job_id).write_text("line one\nValueError: bad\n")
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
