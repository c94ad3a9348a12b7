"""A real Ray head for the Ray tests: ``ray start --head --block`` on 127.0.0.1, CPU only, two
CPUs, no dashboard, ports chosen at run time, its own temp dir; one per test session (per
pytest-xdist worker: the Ray tests run in one, see ``SHARED_DAEMONS`` in tests/conftest.py),
shared by every Ray test module, and stopped (SIGTERM to that one process, never `ray stop`,
which would kill other users' Ray) when the session ends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from orch_testing import cmdline, descendants


@pytest.fixture(scope="session")
def ray_head():
    """The running :class:`~orchestrator.launchers.ray.cluster.LocalRay` (``.address``). Jobs
    on it get their submitter's ``ORCH_HOME`` (the driver passes it on), not the head's."""
    from orchestrator.launchers.ray.cluster import LocalRay

    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    # Workers inherit the head's environment: one thread each on this 2-core machine.
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    head = LocalRay(num_cpus=2, num_gpus=0)
    try:
        head.start()
        yield head
    finally:
        head.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
