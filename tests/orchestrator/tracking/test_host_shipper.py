"""One shipper per host (``orchestrator.tracking.host_shipper``): every journal registered in
``$ORCH_HOME/shipping/<host>`` is shipped by one process, started by the first job that needs
it and gone once nothing is left (shipped, folder deleted, job ended and its server silent past
the linger); ``pending_shipments`` says what waits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.files import lock_fd
from orch_testing import processes_with_env
from orchestrator.tracking import registry
from orchestrator.tracking.cursor import load_cursor
from orchestrator.tracking.pending import pending_shipments
from ship_helpers import REPO, _free_port, expected_metrics, make_journal, step_values, values_of


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An ORCH_HOME of the test's own (its own registry, so its own shipper)."""
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def shippers(home: Path) -> list[int]:
    """Pids of the shipper processes serving ``home``."""
    return [pid for pid, argv in processes_with_env("ORCH_HOME", str(home)) if "tracking.shipper --host" in argv]


def wait_no_shipper(home: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while shippers(home):
        assert time.monotonic() < deadline, f"a shipper still runs after {timeout_s:.0f} s: {shippers(home)}"
        time.sleep(0.2)


def shipper_log(home: Path) -> str:
    return (registry.registry_dir() / "shipper.log").read_text()


def test_one_shipper_ships_every_journal_registered_then_exits(tmp_path, home, sqlite_uri):
    """Six jobs hand their journals over at the same moment, from six processes: one shipper
    starts, ships all six (each value once, FINISHED) and exits; ``pending_shipments`` lists
    them while they wait and nothing after."""
    journals = [make_journal(tmp_path / f"job{i}" / "journal", experiment="host", run_name=f"job{i}", steps=20)
                for i in range(6)]
    for journal in journals:  # registered, no shipper yet: what `orch status` shows
        registry.register(journal.folder, sqlite_uri)
    waiting = pending_shipments()
    assert sorted(p.journal for p in waiting) == sorted(j.folder for j in journals)
    assert {p.shipper_pid for p in waiting} == {None} and all("no shipper running" in p.describe() for p in waiting)

    code = "import sys; from orchestrator.tracking import runs; print(runs.start_shipper(sys.argv[1], sys.argv[2]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, j.folder, sqlite_uri], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO))) for j in journals]
    started = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert started.count("None") == 5 and all(s == "None" or s.isdigit() for s in started), started  # one started
    wait_no_shipper(home)
    for journal in journals:
        found = values_of(sqlite_uri, load_cursor(journal.folder, sqlite_uri).run_id)
        assert found["run"].info.status == "FINISHED" and step_values(found) == expected_metrics(20)
    assert registry.entries() == [] and pending_shipments() == []
    assert "nothing left to ship (6 journal(s) shipped" in shipper_log(home)


def test_deleted_folders_and_a_silent_server_after_the_job_let_it_exit(tmp_path, home, sqlite_uri, monkeypatch):
    """A journal whose folder is deleted while followed is dropped; one whose job ended while its
    server does not answer is dropped after the linger (``ORCH_SHIPPER_LINGER_S``, here 3 s):
    the shipper then exits, leaving the journal to ``orch sync``."""
    from orchestrator.tracking import runs

    monkeypatch.setenv("ORCH_SHIPPER_LINGER_S", "3")
    owner = subprocess.Popen(["sleep", "600"])
    deleted = make_journal(tmp_path / "deleted" / "journal", run_name="deleted", steps=5, status=None)
    silent = make_journal(tmp_path / "silent" / "journal", run_name="silent", steps=5)
    closed = f"http://127.0.0.1:{_free_port()}"
    try:
        assert runs.start_shipper(deleted.folder, sqlite_uri, until_pid=owner.pid)
        assert runs.start_shipper(silent.folder, closed, until_pid=owner.pid) is None  # the same shipper
        deadline = time.monotonic() + 120
        while not load_cursor(deleted.folder, sqlite_uri).offset:  # followed while its job runs
            assert time.monotonic() < deadline, shipper_log(home)
            time.sleep(0.2)
        remove_tree(tmp_path / "deleted")
        while len(registry.entries()) > 1:
            assert time.monotonic() < deadline, shipper_log(home)
            time.sleep(0.2)
        assert shippers(home), "the shipper left while a job still ran"
        [left] = pending_shipments()
        assert left.journal == silent.folder and left.job_running and left.shipped_bytes == 0
    finally:
        owner.kill()
        owner.wait()
    wait_no_shipper(home, 120)
    log = shipper_log(home)
    assert f"{deleted.folder} no longer followed: its folder is gone" in log
    assert f"{silent.folder} no longer followed: {closed} did not answer for 3 s after the job ended" in log
    assert registry.entries() == [] and not os.path.exists(os.path.join(silent.folder, "cursors"))
    assert not (tmp_path / "deleted").exists(), "the shipper made the deleted journal's folder again"


def remove_tree(path: Path, timeout_s: float = 30) -> None:
    """``rm -rf`` of a journal while its shipper may be writing a cursor into it: a file made
    between rmtree's listing and its rmdir fails that one; again until the folder is gone (the
    shipper never makes a journal's folder again once it is gone)."""
    deadline = time.monotonic() + timeout_s
    while path.exists():
        assert time.monotonic() < deadline, f"{path} keeps coming back"
        shutil.rmtree(path, ignore_errors=True)


def test_a_journal_registered_while_the_shipper_exits_is_not_left_alone(tmp_path):
    """The shipper gives its lock up only under ``start.lock`` and only when nothing is
    registered, so a registrant either is seen or finds no shipper and starts one."""
    folder = tmp_path / "registry"
    folder.mkdir()
    fd = lock_fd(folder / registry.SHIPPER_LOCK, blocking=False)  # what a running shipper holds
    entry = registry.register(str(tmp_path / "job" / "journal"), "sqlite:///x.db", folder=folder)
    assert registry.shipper_alive(folder) and not registry.release(fd, folder)  # an entry arrived: go on
    registry.drop(entry)
    assert registry.release(fd, folder)  # nothing left: the lock is given up before start.lock
    assert registry.shipper_alive(folder) is None


@pytest.mark.slow
def test_a_failed_orch_train_leaves_no_shipper(make_experiment, tmp_path, home):
    """``orch train`` failing in training (its weights file is missing): its journal is shipped
    once, FAILED, and no shipper process is left."""
    path = make_experiment(**{"runtime.load_from": str(tmp_path / "missing.pth")})
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(path)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode != 0 and "missing.pth" in done.stderr + done.stdout
    wait_no_shipper(home, 120)
    assert registry.entries() == []
    from orchestrator.tracking.runs import fully_shipped

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for journal in (tmp_path / "work").rglob("journal"):  # created before the failure: shipped, FAILED
        assert fully_shipped(str(journal), uri) and load_cursor(str(journal), uri).status == "FAILED"


def test_a_store_that_stalls_holds_up_only_its_own_journals(tmp_path, home, sqlite_uri):
    """A server that accepts connections and never answers (MLflow waits 120 s per try, then
    retries): a journal for another store is shipped meanwhile, by the same shipper."""
    import signal
    import socket

    from orchestrator.tracking import runs

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete in the backlog; nothing is ever read or answered
    stalled = make_journal(tmp_path / "stalled" / "journal", run_name="stalled", steps=5)
    other = make_journal(tmp_path / "other" / "journal", run_name="other", steps=5)
    try:
        runs.start_shipper(stalled.folder, f"http://127.0.0.1:{silent.getsockname()[1]}")
        time.sleep(3)  # the shipper's first call to the silent server is under way
        runs.start_shipper(other.folder, sqlite_uri)
        deadline = time.monotonic() + 90  # well under MLflow's 120 s request timeout
        while load_cursor(other.folder, sqlite_uri).status != "FINISHED":
            assert time.monotonic() < deadline, shipper_log(home)
            time.sleep(0.2)
        assert len(shippers(home)) == 1
    finally:
        for pid in shippers(home):  # the stalled journal would keep it for MLflow's retries
            os.kill(pid, signal.SIGKILL)
        silent.close()


def test_a_requeued_run_is_followed_again_after_its_first_final_status(tmp_path, home, sqlite_uri):
    """A Slurm job preempted (its journal ends KILLED, shipped) and requeued: the requeued run
    registers the same journal again, maybe while the shipper ends the first part. That entry is
    neither removed with the old one nor taken as done before the run writes on: the same MLflow
    run ends FINISHED with every value."""
    from detection.journal import Journal
    from orchestrator.tracking.host_shipper import HostShipper
    from ship_helpers import KEYS

    journal = make_journal(tmp_path / "job" / "journal", run_name="job", steps=5, status="KILLED")
    shipper = HostShipper(registry.registry_dir())
    registry.register(journal.folder, sqlite_uri)  # the preempted run's entry (its owner gone)
    shipper.pass_once(wait_s=120)
    first = load_cursor(journal.folder, sqlite_uri)
    assert first.status == "KILLED" and registry.entries() == []

    owner = subprocess.Popen(["sleep", "600"])  # the requeued run's process
    try:
        stale = registry.register(journal.folder, sqlite_uri)
        with Journal.open(journal.folder) as resumed:  # before it registers: its restart count
            resumed.set_tags({"slurm.restarts": "1"})
        time.sleep(0.01)
        again = registry.register(journal.folder, sqlite_uri, owner_pid=owner.pid)
        registry.drop(stale)  # a pass that read the entry before it was registered again
        assert registry.entries() == [again]
        shipper.pass_once(wait_s=120)  # the tag shipped, the journal still ends KILLED: followed
        assert registry.entries() == [again] and load_cursor(journal.folder, sqlite_uri).offset > first.offset

        with Journal.open(journal.folder) as resumed:
            resumed.set_status("RUNNING")
            for step in range(5, 10):
                resumed.log_metrics({k: step + i / 10 for i, k in enumerate(KEYS)}, step=step)
            resumed.set_status("FINISHED")
        shipper.pass_once(wait_s=120)
    finally:
        owner.kill()
        owner.wait()
    assert registry.entries() == []
    found = values_of(sqlite_uri, first.run_id)
    assert found["run"].info.status == "FINISHED" and step_values(found) == expected_metrics(10)
    assert found["run"].data.tags["slurm.restarts"] == "1"
