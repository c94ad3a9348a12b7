"""Session fixtures of the Slurm tests: a real Slurm cluster and a real MLflow tracking server.

``slurm_cluster`` starts Debian's Slurm on this machine once per session through
``scripts/local_slurm.py`` (two slurmd "nodes", two fake GPUs each, slurmdbd + MariaDB so that
sacct works; packages are installed when missing), exports ``SLURM_CONF`` for the tests, and
stops everything (state and accounting database wiped) at the end. ``mlflow_server`` is an
``mlflow server`` on 127.0.0.1 that the jobs log to over HTTP, as compute nodes would.
Both use ports chosen at run time. Tests that use them are marked ``slurm`` and ``slow``.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cluster.process import stop_group

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "local_slurm.py"


@dataclass
class SlurmCluster:
    """The running test cluster: its state dir and how to restart it with other options."""

    state_dir: Path
    conf: Path
    accounting: bool = True

    def up(self, accounting: bool) -> None:
        """(Re)start with accounting on or off; a no-op when already so."""
        subprocess.run([sys.executable, str(SCRIPT), "up", "--nodes", "2", "--gpus-per-node", "2",
                        "--accounting" if accounting else "--no-accounting", "--state-dir", str(self.state_dir)],
                       check=True, timeout=900)
        self.accounting = accounting

    def down(self) -> None:
        subprocess.run([sys.executable, str(SCRIPT), "down", "--state-dir", str(self.state_dir)], timeout=120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """``http://127.0.0.1:PORT`` of a running ``mlflow server`` (SQLite store, proxied artifacts)."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        # The server runs in its own session: stop its whole process group (our child only).
        stop_group(proc.pid, grace_s=20)
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="session")
def slurm_cluster(mlflow_server):
    """A running 2-node Slurm cluster with accounting; ``SLURM_CONF`` points at it meanwhile.
    Depends on ``mlflow_server`` so that the server starts (slowly) while Slurm comes up."""
    # Not under pytest's 0700 tmp folders: MariaDB runs as user mysql and must reach its datadir.
    state = Path(tempfile.mkdtemp(prefix="orch-slurm-test-", dir="/tmp"))
    state.chmod(0o755)
    cluster = SlurmCluster(state_dir=state, conf=state / "slurm.conf")
    old = os.environ.get("SLURM_CONF")
    try:
        cluster.up(accounting=True)
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        cluster.down()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def _root_conftest():
    """tests/conftest.py as a plain module (its ``tiny_experiment_dict``), loaded under its own
    name: module-scoped fixtures here cannot use its function-scoped ``make_experiment``."""
    path = REPO / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("orch_tests_root_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def write_experiment(shapes_data, mlflow_server):
    """``write_experiment(folder, name, **dotted)`` -> path of a tiny experiment YAML in ``folder``
    (outputs in ``folder/work``) that logs to the MLflow server."""
    root = _root_conftest()

    def write(folder: Path, name: str = "tiny", **overrides) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        mapping = copy.deepcopy(root.tiny_experiment_dict(shapes_data, folder / "work", mlflow_server))
        mapping["name"] = name
        for key, value in overrides.items():
            root._set_dotted(mapping, key, value)
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(mapping, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="module")
def module_orch_home(tmp_path_factory):
    """A private ``ORCH_HOME`` (job records) for one test module."""
    home = tmp_path_factory.mktemp("orch_home")
    old = os.environ.get("ORCH_HOME")
    os.environ["ORCH_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("ORCH_HOME", None)
    else:
        os.environ["ORCH_HOME"] = old
