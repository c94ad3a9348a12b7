"""Helpers shared by test modules (``from orch_testing import ...``; tests/ is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import psutil


def root_conftest() -> Any:
    """tests/conftest.py as a plain module (its ``tiny_experiment_dict``), loaded under its own
    name: ``from conftest import`` finds whichever conftest module was imported first."""
    import importlib.util
    import sys

    name = "orch_tests_root_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("conftest.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def shipped_run(record: Any, timeout_s: float = 180.0) -> Any:
    """The MLflow run of a job, once the shipper beside it has delivered its final status
    (read back with ``MlflowClient``); fails the test when it does not arrive in time."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.runs import journal_dir, wait_shipped

    run_id = wait_shipped(journal_dir(record.output_dir), record.tracking_uri, timeout_s)
    assert run_id, f"the MLflow run of job {record.job_id} was not shipped within {timeout_s:.0f} s"
    return MlflowClient(record.tracking_uri).get_run(run_id)


def descendants(root: int) -> list[int]:
    """Pids of every live descendant of ``root`` (children, their children, ...)."""
    try:
        return [child.pid for child in psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cmdline(pid: int) -> str:
    """The (Ray-retitled) command line of ``pid``, or '' when it is gone."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


# -- what a test session leaves running --------------------------------------------------------
#: The variable that marks every process a test session starts (they inherit it); its value is
#: one session's (under pytest-xdist: one worker's) own id.
SESSION_VAR = "ORCH_TEST_SESSION"
#: Helpers of the Python standard library that live as long as the process that started them
#: (multiprocessing's resource tracker and fork server): not leftovers of a test.
LIFELONG_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def session_processes(session_id: str, root: Optional[int] = None) -> list[psutil.Process]:
    """The live processes of the test session ``session_id`` running as ``root`` (default: this
    process): its descendants, and every process whose environment carries
    ``ORCH_TEST_SESSION=<session_id>`` (daemons that detached into their own session and were
    reparented). Zombies (they hold nothing), ``root`` itself, its ancestors and
    :data:`LIFELONG_HELPERS` are left out."""
    root = os.getpid() if root is None else root
    session_root = psutil.Process(root)
    skip = {root, *(p.pid for p in session_root.parents())}
    found = {p.pid: p for p in session_root.children(recursive=True)}
    for process in psutil.process_iter():
        if process.pid in found or process.pid in skip:
            continue
        try:
            if process.environ().get(SESSION_VAR) == session_id:
                found[process.pid] = process
        except (psutil.Error, OSError):
            continue  # gone, or another user's (its environment is private)
    live = []
    for pid, process in sorted(found.items()):
        try:
            if pid in skip or process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                continue
            if any(helper in " ".join(process.cmdline()) for helper in LIFELONG_HELPERS):
                continue
        except psutil.Error:
            continue
        live.append(process)
    return live


def reap_session(session_id: str, grace_s: float = 5.0) -> list[str]:
    """Wait up to ``grace_s`` for the processes of test session ``session_id`` to end (a fixture
    may have just stopped them); SIGKILL those still alive and return their command lines
    (``pid: argv``), empty when the session left nothing running."""
    deadline = time.monotonic() + grace_s
    left = session_processes(session_id)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = session_processes(session_id)
    lines = []
    for process in left:
        try:
            lines.append(f"{process.pid}: {' '.join(process.cmdline()) or process.name()}")
            process.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(left, timeout=5)
    return lines


def fifo_dataset(shapes_data: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the shapes data whose first training image is a named pipe nobody writes
    (reading it blocks, as a hung network file system does); returns (folder, image name)."""
    import json
    import shutil

    data = Path(tmp_path) / "data"
    shutil.copytree(shapes_data, data)
    first = json.loads((data / "annotations" / "instances_train.json").read_text())["images"][0]["file_name"]
    image = data / "train" / first
    image.unlink()
    os.mkfifo(image)
    return data, os.path.basename(first)


SHIPPER_MARKS = ("orchestrator.tracking.shipper",)  # the host shipper runs as `shipper --host`


def leftover_shippers(session: str, grace_s: float = 60.0) -> list[tuple[int, str]]:
    """MLflow shipper processes of test session ``session`` (:func:`session_processes`) still
    alive after ``grace_s`` seconds: a shipper exits once what it follows is shipped, so one left
    is a shipper that outlived its purpose (or a test that stopped a server without reaping its
    shippers). Those found are killed (SIGKILL)."""
    deadline = time.monotonic() + grace_s
    while True:
        left = []
        for process in session_processes(session):
            try:
                argv = " ".join(process.cmdline())
            except psutil.Error:
                continue
            if any(mark in argv for mark in SHIPPER_MARKS):
                left.append((process, argv))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    for process, _ in left:
        try:
            process.kill()
        except psutil.Error:
            pass
    return [(process.pid, argv) for process, argv in left]


def processes_with_env(name: str, value: str) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the live processes whose environment holds ``name=value``
    (processes of other users, whose environment is private, are skipped)."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get(name) == value and process.status() not in (
                    psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                found.append((process.pid, " ".join(process.cmdline())))
        except (psutil.Error, OSError):
            continue
    return found


def store_untouched(path: Path, template: Path) -> bool:
    """True when the SQLite store ``path``, a copy of ``template`` (the ``tracking_uri`` fixture's),
    was never opened for writing: the same bytes, and no journal or write-ahead log beside it (orch
    turns WAL on whenever it opens a store, which rewrites the file's header)."""
    path = Path(path)
    beside = [path.with_name(path.name + suffix) for suffix in ("-wal", "-journal")]
    return path.read_bytes() == Path(template).read_bytes() and not any(p.exists() for p in beside)


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for its parent to reap it counts as ended)."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


def port_leases() -> list[dict]:
    """Live port leases of this host (each: port, pid, start, label, created); those of dead
    owners are reclaimed on the way, as ``cluster.ports`` does before choosing a port."""
    from cluster.lease import lease_dir, locked
    from cluster.ports import _live_leases

    folder = lease_dir("ports")
    with locked(folder):
        return [dict(record, port=port) for port, record in sorted(_live_leases(folder).items())]


def slurm_accounting_enabled() -> bool:
    """True when ``sacct`` answers (slurmdbd configured and reachable)."""
    import subprocess

    proc = subprocess.run(["sacct", "-n", "-X", "-j", "1", "-o", "JobID"], capture_output=True, timeout=20)
    return proc.returncode == 0


def kill_rank_and_explain(handle: Any, rank: int = 1, timeout_s: float = 300.0) -> tuple[Any, str]:
    """SIGKILL rank ``rank`` of a running job once every rank has made a step (its pid and host
    from the heartbeat, whatever the backend), wait for the job to end, and return (that rank's
    beat, the text of ``orch why``)."""
    import signal

    from click.testing import CliRunner

    from orchestrator.commands.why import why_cmd
    from orchestrator.progress import read_progress

    deadline = time.monotonic() + timeout_s
    while True:
        record = handle.record()
        progress = read_progress(record.output_dir)
        if progress is not None and progress.step >= 1 and rank in progress.ranks:
            break
        assert not record.state.finished, f"job {record.job_id} ended before training: {record.error}"
        assert time.monotonic() < deadline, f"job {record.job_id}: no step of every rank in {timeout_s:.0f} s"
        time.sleep(0.5)
    beat = progress.ranks[rank]
    os.kill(beat.pid, signal.SIGKILL)
    while not handle.record().state.finished:
        assert time.monotonic() < deadline, f"job {record.job_id} still {handle.record().state} after the kill"
        time.sleep(0.5)
    result = CliRunner().invoke(why_cmd, [handle.job_id])
    assert result.exit_code == 0, result.output
    return beat, result.output


def assert_why_names_the_kill(text: str, who: str, host: str, ran: str, signal_known: bool = True) -> None:
    """``orch why``'s screen of a job whose rank ``who`` ("rank 1", "task 1") on ``host`` was
    killed with SIGKILL: that rank first, the signal (no OOM claim: the kernel's OOM killer did not
    do it), an excerpt of that rank's own output, what ran (``ran`` appears), the resume step.
    ``signal_known`` False: the backend cannot know the signal (Ray: the raylet reaps its workers
    and records no exit status), so the line says the process died, naming kill -9 as a cause."""
    lines = text.splitlines()
    assert ": FAILED" in lines[0], text
    first = next((line for line in lines if line.startswith("first failure: ")), "")
    assert first.startswith(f"first failure: {who}") and f" on {host} " in first, text
    killed = ("was killed by SIGKILL (signal 9)" if signal_known
              else "died without an error of its own: killed by a signal (kill -9")
    assert killed in first and "out of memory (the kernel" not in first, text
    assert f"output of {who}" in text, text
    assert "what ran:" in text and ran in text, text
    assert lines[-1].startswith("next: ") and "--set runtime.resume=auto" in lines[-1], text


# -- hosts of scripts/local_hosts.py (network namespaces) ----------------------------------------

def host_processes(host: str, *needles: bytes) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the processes inside ``host`` whose command line holds one of
    ``needles`` (what a job runs there: ``orchestrator.worker``, ``torchrun``, ...)."""
    found = []
    for pid in subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True).stdout.split():
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if any(needle in cmd for needle in needles):
            found.append((int(pid), cmd.replace(b"\0", b" ")[:200].decode(errors="replace")))
    return found


def wait_until_none(hosts: list[str], needles: tuple[bytes, ...], timeout_s: float) -> dict[str, list]:
    """Wait (``timeout_s`` at most) until no host runs a process matching ``needles``; what is
    left then, per host (empty: nothing)."""
    deadline = time.monotonic() + timeout_s
    while (left := {h: p for h in hosts if (p := host_processes(h, *needles))}) and time.monotonic() < deadline:
        time.sleep(2)
    return left


def after_the_job(record: Any) -> list[str]:
    """What a job that has ended must not leave behind: its MLflow run RUNNING (once the shipper
    delivered its final status), a device or port lease in this test's lease folder."""
    from cluster.gpus import list_device_leases

    problems = [f"MLflow run {run.info.run_id} left RUNNING" for run in [shipped_run(record)]
                if run.info.status == "RUNNING"]
    problems += [f"device lease {lease}" for kind in ("cpu", "gpu") for lease in list_device_leases(kind)]
    return problems + [f"port lease {lease}" for lease in port_leases()]
