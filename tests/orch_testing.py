"""Helpers shared by test modules (``from orch_testing import ...``; tests/ is on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


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
    """Pids of every live descendant of ``root`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    """The (Ray-retitled) command line of ``pid``, or '' when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


SHIPPER_MARKS = ("orchestrator.tracking.shipper",)  # the host shipper runs as `shipper --host`
SESSION_ENV = "ORCH_TEST_SESSION"  # set by the test session; every process it starts inherits it


def processes_with_env(name: str, value: str) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the live processes whose environment holds ``name=value``
    (read from /proc; processes of other users are skipped)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ and state not in ("Z", "X"):
            found.append((int(entry), cmdline(int(entry))))
    return found


def leftover_shippers(session: str, grace_s: float = 60.0) -> list[tuple[int, str]]:
    """MLflow shipper processes started during test session ``session`` (their environment holds
    ``ORCH_TEST_SESSION=session``) still alive after ``grace_s`` seconds: a shipper exits once
    what it follows is shipped, so one left is a shipper that outlived its purpose (or a test that
    stopped a server without reaping its shippers). Those found are killed (SIGKILL, by pid)."""
    import signal
    import time

    deadline = time.monotonic() + grace_s
    while True:
        left = [(pid, argv) for pid, argv in processes_with_env(SESSION_ENV, session)
                if any(mark in argv for mark in SHIPPER_MARKS)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left
