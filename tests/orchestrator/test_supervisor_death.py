"""kill -9 of the local supervisor: its job's processes die with it (the parent-death signal set
by ``cluster.pdeath`` and by every worker), so the devices and port it held are never used by two
jobs at once; the job is recorded FAILED, its MLflow run is ended, and nothing of it runs on."""

from __future__ import annotations

import os
import signal
import time

import pytest

from cluster.gpus import list_device_leases
from orch_testing import port_leases
from cluster.process import group_alive
from orchestrator import records
from orchestrator.jobs import refresh_job
from orchestrator.launch import ResourceFlags
from orchestrator.spec import JobState
from orchestrator.submit import submit

pytestmark = pytest.mark.usefixtures("local_orch_env")


def _wait(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_supervisor_takes_its_ranks_with_it(make_experiment):
    path = make_experiment(**{"schedule.iterations": 100000, "eval.interval": 100000, "resources.gpus": 2})
    _, [handle] = submit([str(path)], (), ResourceFlags(backend="local"))
    _wait(lambda: "iter 2/" in open(records.load_record(handle.job_id).log_path).read(), 240, "training")
    record = records.load_record(handle.job_id)
    pids, pgid = record.extra["pids"], record.extra["pgid"]
    assert len(pids) == 2 and list_device_leases("cpu") and port_leases()
    os.kill(record.pid, signal.SIGKILL)  # the supervisor
    _wait(lambda: not group_alive(pgid), 30, "the ranks to die with their supervisor")
    # The ranks learn of the death while the kernel still ends the supervisor: on a loaded
    # machine it can still show as running for a moment after them (clean-clone run 24).
    _wait(lambda: refresh_job(handle.job_id).state.finished, 30, "the job to be recorded as ended")
    record = refresh_job(handle.job_id)
    assert record.state == JobState.FAILED and "supervisor" in record.error
    assert list_device_leases("cpu") == [] and port_leases() == []  # freed with a dead owner, nothing left using them
    from orch_testing import shipped_run

    assert shipped_run(record).info.status == "FAILED"  # not left RUNNING


def test_cancel_of_an_ended_job_still_stops_its_leftovers(make_experiment):
    """A job recorded as ended whose processes somehow run on can still be stopped through orch."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    record = records.create_record(name="x", backend="local", output_dir="/tmp/x", config_path="/none",
                                   extra={"pgid": proc.pid})
    records.transition(record.job_id, JobState.FAILED, error="supervisor died")
    from orchestrator.jobs import cancel_job

    assert cancel_job(record.job_id).state == JobState.FAILED  # the record keeps its state
    assert proc.wait(timeout=30) != 0 and not group_alive(proc.pid)
