"""A private, single-node Ray cluster on 127.0.0.1 for one job, a sweep, or a test.

``ray stop`` kills every Ray process of the machine (other users' clusters included), and the
default ports (6379, 10001, 8265, 52365, ...) collide when two clusters share a node. So orch
starts ``ray start --head --block`` as one child process with ports chosen at run time and its own
``--temp-dir``, and stops it by sending SIGTERM to that one process: in ``--block`` mode Ray's
own handler then tears down exactly the processes it started (GCS, raylet, workers). The head
also gets that SIGTERM when the process that started it dies (``cluster.pdeath``): a private
head never outlives its Ray driver (kill -9, OOM), which would leave a whole Ray cluster behind.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from cluster.env import LOOPBACK
from cluster.errors import ClusterError
from cluster.process import stop_group
from cluster.retry import retry

# The --*-port options of `ray start` that would otherwise default to fixed numbers.
PORT_OPTIONS = (
    "--port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-grpc-port",
    "--dashboard-agent-listen-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)
READY_LINE = "Ray runtime started"


def ray_environ(base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Environment for Ray processes: bind to loopback as asked (FIELD_NOTES: 2.60 needs
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for that), no usage report, and no 30 s drain on stop."""
    env = dict(os.environ if base is None else base)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    return env


def is_loopback(address: Optional[str]) -> bool:
    """True for no address (a private head) or an address on 127.0.0.1 / localhost."""
    if not address:
        return True
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def prepare_client(address: Optional[str]) -> None:
    """Call before the first ``import ray`` of a process that connects to ``address``: Ray reads
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import, and without it a driver rewrites 127.0.0.1 into
    the machine's other address and never reaches a loopback head. Left alone for a real
    multi-node cluster, whose workers must reach the driver's real address."""
    if is_loopback(address):
        os.environ.update(ray_environ({}))


def set_socket_ifname() -> None:
    """Ray worker process setup hook (``worker_process_setup_hook``): ``GLOO_SOCKET_IFNAME`` /
    ``NCCL_SOCKET_IFNAME`` from the route to the head, unless set. Ray Train starts the process
    group before any of orch's code runs in the worker, and without them gloo binds the address of
    the host's own name: ``127.0.1.1`` under Debian's /etc/hosts, which the other nodes cannot
    reach (every rank then fails in ``connectFullMesh``)."""
    import ray

    from cluster.env import resolve_reachable, route_interface, socket_ifname_env

    head = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    if not is_loopback(head):
        os.environ.update(socket_ifname_env(os.environ, route_interface(resolve_reachable(head))[0]))


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct ports that could be bound on ``host`` just now (held open together so
    none is returned twice; a later collision makes ``ray start`` fail and :meth:`start` retry)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def ray_executable() -> str:
    """The ``ray`` script of this Python environment."""
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


class _NotReady(Exception):
    """A try of LocalRay.start whose head did not come up (the message: its log's tail)."""


class LocalRay:
    """``with LocalRay(num_cpus=2) as ray_cluster: ray.init(address=ray_cluster.address)``.

    ``num_cpus``/``num_gpus`` None let Ray count the machine's. ``log_path`` receives the output of
    ``ray start`` (default: a file in the temporary folder, removed on stop). A node of several:
    ``node_ip`` (the address it advertises; a head's address is then ``node_ip:PORT``), ``join``
    (``HEAD:PORT``: a worker node joining that head) and ``prefix`` (a command that runs ``ray
    start`` in another host, e.g. ``scripts/local_hosts.py exec h2 --``).
    """

    def __init__(
        self,
        num_cpus: Optional[float] = None,
        num_gpus: Optional[int] = None,
        log_path: Optional[str] = None,
        start_timeout_s: float = 90.0,
        node_ip: str = LOOPBACK,
        join: Optional[str] = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.node_ip, self.join, self.prefix = node_ip, join, tuple(prefix)
        self.process: Optional[subprocess.Popen] = None
        self.temp_dir: Optional[str] = None
        self.port: Optional[int] = None

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the head's GCS (what ``ray.init(address=...)`` takes); the
        joined head's for a worker node."""
        if self.port is None:
            raise ClusterError("the local Ray cluster is not started")
        return self.join or f"{self.node_ip}:{self.port}"

    def command(self, ports: list[int]) -> list[str]:
        """The ``ray start`` command line for the given ports (one per :data:`PORT_OPTIONS`)."""
        head = ["--head"] if self.join is None else [f"--address={self.join}"]
        argv = [ray_executable(), "start", *head, "--block", f"--node-ip-address={self.node_ip}"]
        # A worker node has no GCS port of its own.
        argv += [f"{option}={port}" for option, port in zip(PORT_OPTIONS, ports) if self.join is None or option != "--port"]
        argv += ["--include-dashboard=false"] * (self.join is None) + ["--disable-usage-stats", f"--temp-dir={self.temp_dir}"]
        if self.num_cpus is not None:
            argv.append(f"--num-cpus={int(self.num_cpus)}")
        if self.num_gpus is not None:
            argv.append(f"--num-gpus={int(self.num_gpus)}")
        return argv

    def start(self, attempts: int = 3) -> str:
        """Start the head; returns its address. Retries with new ports when ``ray start`` fails
        (another process took a port between our check and Ray's bind)."""
        try:
            return retry(self._start_once, attempts, delay_s=0.0, retry_if=lambda err: isinstance(err, _NotReady))
        except _NotReady as err:
            raise ClusterError(
                f"could not start a local Ray head ({attempts} tries); last output: {err}; "
                "check `ray start --head` by hand, or pass --address of a running cluster"
            ) from None

    def _start_once(self) -> str:
        """One try of :meth:`start` on newly chosen ports; _NotReady (the log's tail) when the
        head did not come up (it is stopped then)."""
        # Short path: Ray's unix sockets live under it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="orch-ray-", dir="/tmp")
        log_file = self.log_path or os.path.join(self.temp_dir, "ray-start.log")
        ports = free_ports(len(PORT_OPTIONS))
        # SIGTERM on our death: `ray start --block` then stops what it started.
        guard = [sys.executable, "-m", "cluster.pdeath", str(os.getpid()), "--signal", "TERM", "--"]
        with open(log_file, "ab") as log:
            env = ray_environ()
            if not is_loopback(self.node_ip):  # that variable makes Ray advertise loopback
                env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
            self.process = subprocess.Popen(
                guard + list(self.prefix) + self.command(ports), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        self.port = ports[0]
        if self._wait_ready(log_file):
            return self.address
        tail = _tail(log_file)
        self.stop()
        raise _NotReady(tail)

    def _wait_ready(self, log_file: str) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if READY_LINE in Path(log_file).read_text(errors="replace"):
                    return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the ``ray start --block`` process group (it stops what it started); SIGKILL
        what lingers after ``timeout_s``. Idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            stop_group(process.pid, grace_s=timeout_s)
            process.wait(timeout=10)
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
        self.port = None

    def __enter__(self) -> "LocalRay":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _tail(path: str, lines: int = 3) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no output)"
    return " | ".join(text[-lines:]) or "(no output)"
