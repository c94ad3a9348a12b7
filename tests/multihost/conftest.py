"""One set of hosts for the whole session: ``scripts/local_hosts.py up --hosts 2`` (network
namespaces h1, h2 on a private bridge, each with its own hostname, /etc/hosts with Debian's
``127.0.1.1`` line and sshd), always taken down at the end. Needs root, ``ip``, ``sshd``; skipped
otherwise. Every test here is marked ``multihost`` and ``slow`` and runs in one xdist group."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "local_hosts.py"
HOSTS_WAIT_S = 300.0


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.multihost)
            item.add_marker(pytest.mark.slow)  # its xdist group: the root conftest


class Hosts:
    """The running hosts: ``names``, ``addr[name]``, ``run(name, argv)`` inside one of them."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        state = json.loads((state_dir / "hosts.json").read_text())
        self.names = [h["name"] for h in state["hosts"]]
        self.addr = {h["name"]: h["addr"] for h in state["hosts"]}

    def script(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), *args, "--state-dir", str(self.state_dir)],
                              capture_output=True, text=True, timeout=timeout)

    def run(self, name: str, argv: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), "exec", name, "--state-dir", str(self.state_dir), "--", *argv],
                              capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def local_hosts():
    """Hosts h1, h2 up for the session (state in a fresh folder under /run, which only root writes)."""
    if os.geteuid() != 0 or not (shutil.which("ip") and os.path.exists("/usr/sbin/sshd")):
        pytest.skip("needs root, iproute2 and openssh-server (network namespaces and sshd)")
    state = Path(tempfile.mkdtemp(prefix="orch-hosts-test-", dir="/run"))
    state.chmod(0o755)
    deadline = time.monotonic() + HOSTS_WAIT_S
    while True:
        up = subprocess.run([sys.executable, str(SCRIPT), "up", "--hosts", "2", "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=120)
        # The machine has one set of hosts: another pytest-xdist worker of this run that holds it
        # (these tests are one xdist group, yet a worker was seen holding the set while another
        # ran the rest) is waited for, a while; then this worker's multihost tests are skipped.
        if up.returncode == 0 or "exist already" not in up.stderr:
            break
        if time.monotonic() > deadline:
            shutil.rmtree(state, ignore_errors=True)
            pytest.skip(f"the hosts h1, h2 are held by another test process: {up.stderr.strip()}")
        time.sleep(5)
    try:
        assert up.returncode == 0, up.stderr
        yield Hosts(state)
    finally:  # also after a failed `up`: it cleans what it made, and only that
        down = subprocess.run([sys.executable, str(SCRIPT), "down", "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr


def read_final_loss(output_dir: Path) -> float:
    """The loss of the last training step, from the run's journal (written by rank 0 as it trains,
    whatever the backend)."""
    loss = None
    for line in (Path(output_dir) / "journal" / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("t") == "metrics":
            for _, _, values in event["v"]:
                loss = values.get("loss", loss)
    assert loss is not None, f"no loss in the journal of {output_dir}"
    return loss


@pytest.fixture
def orch_env(tmp_path, monkeypatch):
    """An isolated orch home and lease folder, 4 CPU slots, one thread per process, ``tmp_path``
    (on the filesystem every host shares) as the working directory."""
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ORCH_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.setenv("ORCH_CPU_SLOTS", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_tiny(shapes_data: Path, folder: Path, **dotted) -> Path:
    """The tiny experiment (tests/conftest.py) in ``folder``, outputs in ``folder/work``."""
    import copy

    import yaml

    from orch_testing import root_conftest

    root = root_conftest()
    folder.mkdir(parents=True, exist_ok=True)
    mapping = copy.deepcopy(root.tiny_experiment_dict(shapes_data, folder / "work", f"sqlite:///{folder / 'mlflow.db'}"))
    for key, value in dotted.items():
        root._set_dotted(mapping, key, value)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def local_world4_loss(shapes_data, tmp_path_factory):
    """Final loss of the tiny experiment on the local backend at world size 4 (4 processes on this
    machine): what every 2-host run at world size 4 must reproduce. One training per session."""
    folder = tmp_path_factory.mktemp("local-world4")
    env = {"ORCH_HOME": str(folder / "home"), "ORCH_RUNTIME_DIR": str(folder / "rt"), "ORCH_CPU_SLOTS": "4",
           "OMP_NUM_THREADS": "1"}
    path = write_tiny(shapes_data, folder)
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(path), "--backend", "local",
                          "--gpus", "4", "--wait"], capture_output=True, text=True, timeout=600, cwd=folder,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return read_final_loss(folder / "work")


def host_metrics(output_dir: Path) -> dict[str, dict[str, list[float]]]:
    """The run's ``system/<host>/<name>`` series from its journal: host -> name -> values."""
    found: dict[str, dict[str, list[float]]] = {}
    for line in (Path(output_dir) / "journal" / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("t") == "metrics":
            for _, _, values in event["v"]:
                for key, value in values.items():
                    if key.startswith("system/"):
                        _, host, name = key.split("/", 2)
                        found.setdefault(host, {}).setdefault(name, []).append(value)
    return found


def assert_metrics_of_each_host(output_dir: Path, hosts: list[str], ranks_per_host: int) -> None:
    """CPU and RSS series of each host under its own name, each counting that host's ranks."""
    found = host_metrics(output_dir)
    assert sorted(found) == sorted(hosts), found
    for host in hosts:
        assert {"cpu_percent", "rss_mb", "processes"} <= set(found[host]), (host, found[host])
        assert max(found[host]["processes"]) >= ranks_per_host and max(found[host]["rss_mb"]) > 50, (host, found[host])


@pytest.fixture
def metrics_of_each_host():
    """``metrics_of_each_host(output_dir, hosts, ranks_per_host)``: see :func:`assert_metrics_of_each_host`."""
    return assert_metrics_of_each_host


@pytest.fixture
def final_loss():
    """``final_loss(output_dir)``: see :func:`read_final_loss`."""
    return read_final_loss


@pytest.fixture
def tiny(shapes_data, orch_env):
    """``tiny(**dotted)``: the tiny experiment in this test's folder (outputs in ``work/``)."""
    return lambda **dotted: write_tiny(shapes_data, orch_env, **dotted)


@pytest.fixture(scope="session")
def slurm_on_hosts(local_hosts):
    """``SLURM_CONF`` of a Slurm cluster whose nodes are the hosts (one slurmd in each, NodeAddr its
    address; ``local_slurm.py up --hosts-from``), no accounting; stopped at the end. Its own state
    dir: another local cluster (other tests, other sessions) may run beside it."""
    state = Path(tempfile.mkdtemp(prefix="orch-slurm-hosts-", dir="/tmp"))
    state.chmod(0o755)
    script = REPO / "scripts" / "local_slurm.py"
    try:
        subprocess.run([sys.executable, str(script), "up", "--hosts-from", str(local_hosts.state_dir), "--no-accounting",
                        "--gpus-per-node", "2", "--state-dir", str(state)], check=True, timeout=900)
        yield str(state / "slurm.conf")
    finally:
        subprocess.run([sys.executable, str(script), "down", "--state-dir", str(state)], timeout=120)


class RayOnHosts:
    """The Ray cluster of :func:`ray_on_hosts`: ``address`` (``HEAD:PORT``), ``rejoin()`` (start
    h2's worker node again after a test lost it)."""

    def __init__(self, hosts: Hosts):
        from orchestrator.launchers.ray.cluster import LocalRay

        self.hosts = hosts
        h1, _ = hosts.names
        self.head = LocalRay(num_cpus=2, num_gpus=0, node_ip=hosts.addr[h1], prefix=self.inside(h1))
        self.worker = None

    def inside(self, name: str) -> list[str]:
        return [sys.executable, str(SCRIPT), "exec", name, "--state-dir", str(self.hosts.state_dir), "--"]

    @property
    def address(self) -> str:
        return self.head.address

    def rejoin(self) -> None:
        """(Re)start the worker node in h2 (the one before stopped first, if it still runs)."""
        from orchestrator.launchers.ray.cluster import LocalRay

        _, h2 = self.hosts.names
        if self.worker is not None:
            self.worker.stop()
        self.worker = LocalRay(num_cpus=2, num_gpus=0, node_ip=self.hosts.addr[h2], join=self.head.address,
                               prefix=self.inside(h2))
        self.worker.start()

    def stop(self) -> None:
        for node in (self.worker, self.head):
            if node is not None:
                node.stop()


@pytest.fixture(scope="module")
def ray_on_hosts(local_hosts):
    """A Ray cluster (:class:`RayOnHosts`) whose head runs in h1 and whose second node joins from
    h2 (``ray start --address HEAD:PORT --node-ip-address <h2's address>``), 2 CPUs each; stopped
    after the module's last test (``LocalRay``: SIGTERM to each ``ray start --block``), not at the
    session's end: idle, its nodes' daemons (raylets, GCS, log monitors) still take CPU from the
    tests that run after it."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the workers inherit it
    cluster = RayOnHosts(local_hosts)
    try:
        cluster.head.start()
        cluster.rejoin()
        yield cluster
    finally:
        cluster.stop()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
