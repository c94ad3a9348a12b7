"""Fixtures of the shipper tests (helpers in ``ship_helpers``).

    mlflow_server      (session) a running ``mlflow server`` shared by the test modules
    own_server         a server of one test's own (the test may stop and restart it)
    sqlite_uri         a fresh SQLite store (the root conftest's ``tracking_uri``)
    destination        parametrised: ``sqlite_uri``, then the session's server
    reap_shippers      (session) ``reap_shippers(folder)``: kill the shippers of journals under
                       ``folder`` that still run (a test's clean-up); returns their pids
    chromium           (session) path of Debian's ``chromium``, installed with apt-get when missing
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from ship_helpers import MlflowServer


def _server(folder: Path):
    server = MlflowServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A running server shared by the tests of a session (one per pytest-xdist worker that runs
    any of them: each start costs ~10 s of CPU). Tests use experiments of their own."""
    yield from _server(tmp_path_factory.mktemp("mlflow_server"))


@pytest.fixture
def own_server(tmp_path):
    """A server for one test, which may ``stop()`` and ``start()`` it (same port)."""
    folder = tmp_path / "server"
    folder.mkdir()
    yield from _server(folder)


@pytest.fixture
def sqlite_uri(tracking_uri) -> str:
    """A fresh SQLite store for one test: the root conftest's ``tracking_uri``, by the name the
    shipper tests contrast with a server."""
    return tracking_uri


@pytest.fixture(params=["sqlite", "server"])
def destination(request) -> str:
    """Each test with it runs twice: into a fresh SQLite file and into the session's server."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_uri")
    return request.getfixturevalue("mlflow_server").uri


def _shipper_pids(folder: Path) -> list[int]:
    """Pids of the shipper processes (``python -m orchestrator.tracking.shipper JOURNAL ...``)
    whose journal lies under ``folder``."""
    prefix = str(Path(folder).resolve()) + os.sep
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "orchestrator.tracking.shipper" in argv and any(a.startswith(prefix) for a in argv):
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="session")
def reap_shippers():
    """``reap_shippers(folder)``: SIGKILL the shippers of journals under ``folder`` that still
    run, by pid (a shipper of a server a test stopped would retry for a day); returns their pids."""

    def reap(folder: Path) -> list[int]:
        pids = _shipper_pids(folder)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    return reap


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's ``chromium``, to look at the MLflow UI headless. Installed here with apt-get when
    missing (CI runs ``make test`` as root on a fresh Debian machine); a user without root is
    told the command to run."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("the MLflow UI tests need Debian's chromium: run `sudo apt-get install -y chromium` "
                    "(they install it themselves when run as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Wait for dpkg's lock rather than fail: under pytest-xdist another worker may be installing
    # Slurm (scripts/local_slurm.py) at the same moment.
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=900", "-q"]
    install = [*apt, "install", "-y", "--no-install-recommends", "chromium"]
    if subprocess.run(install, env=env, capture_output=True, timeout=1200).returncode != 0:  # no package lists yet
        subprocess.run([*apt, "update"], env=env, capture_output=True, check=True, timeout=1200)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"apt-get install chromium failed: {done.stdout[-3000:]}{done.stderr[-2000:]}"
    return shutil.which("chromium")
