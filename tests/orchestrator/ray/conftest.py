"""A real Ray head for the Ray tests: ``ray start --head --block`` on 127.0.0.1, CPU only, two
CPUs, no dashboard, ports chosen at run time, its own temp dir; one per pytest-xdist worker (the
Ray tests run in one, see ``SHARED_DAEMONS`` in tests/conftest.py), shared by every Ray test
module, started by the first test that asks for it and stopped (SIGTERM to that one process,
never `ray stop`, which would kill other users' Ray) after the last Ray test of this folder that
the worker runs, not at the session's end: idle, its daemons (raylet, GCS, log monitor) still
take CPU from the tests that run after it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from orch_testing import cmdline, descendants

HERE = Path(__file__).resolve().parent


class SharedHead:
    """The worker's one head: :meth:`get` starts it when none runs, :meth:`stop` stops it."""

    def __init__(self) -> None:
        self.head = None

    def get(self):
        if self.head is None:
            from orchestrator.launchers.ray.cluster import LocalRay

            saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            # Workers inherit the head's environment: one thread each on this 2-core machine.
            os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            head = LocalRay(num_cpus=2, num_gpus=0)
            try:
                head.start()
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
            self.head = head
        return self.head

    def stop(self) -> None:
        head, self.head = self.head, None
        if head is not None:
            head.stop()


SHARED = SharedHead()


@pytest.fixture(scope="session")
def _shared_ray_head():
    # Session-scoped so that a head still up at the end stops before the session's check for
    # processes left running (a session fixture set up before it).
    yield SHARED
    SHARED.stop()


@pytest.fixture
def ray_head(_shared_ray_head):
    """The running :class:`~orchestrator.launchers.ray.cluster.LocalRay` (``.address``). Jobs
    on it get their submitter's ``ORCH_HOME`` (the driver passes it on), not the head's."""
    return _shared_ray_head.get()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    # The worker runs its Ray tests in a row: when the next test is not one of this folder's,
    # the head stops (a later one that asks starts another).
    if nextitem is not None and HERE not in Path(str(nextitem.fspath)).resolve().parents:
        SHARED.stop()


@pytest.fixture
def orch_home(tmp_path, monkeypatch) -> Path:
    """A private ``ORCH_HOME`` for this test's job records."""
    home = tmp_path / "orch-home"
    monkeypatch.setenv("ORCH_HOME", str(home))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return home


@pytest.fixture
def train_worker_pids(ray_head):
    """``train_worker_pids()``: pids of the Ray Train worker processes of ``ray_head`` (only
    descendants of this head: other Ray clusters on the machine are never touched)."""

    def find() -> list[int]:
        return [p for p in descendants(ray_head.process.pid) if cmdline(p).startswith("ray::RayTrainWorker")]

    return find
