"""Port leases: distinct, bind-checked ports for jobs started at the same moment; reclaim of the
leases of dead processes. Real processes, real sockets."""

import multiprocessing as mp
import os
import signal
import socket
import time

import pytest

from cluster.errors import ClusterError
from cluster.lease import lease_dir
from cluster.ports import candidate_ports, lease_port, port_is_free
from orch_testing import port_leases


@pytest.fixture(autouse=True)
def runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("ORCH_PORT_RANGE", raising=False)
    return tmp_path / "rt"


def _lease_and_bind(barrier, queue):
    barrier.wait()  # all 32 ask at the same moment
    lease = lease_port(label=f"job-{os.getpid()}")
    sock = socket.socket()
    try:
        sock.bind(("", lease.port))  # what rank 0's store does with it
        sock.listen()
        queue.put((lease.port, True))
        barrier.wait()  # hold port and lease until everyone has bound
    except OSError:
        queue.put((lease.port, False))
        barrier.wait()
    finally:
        sock.close()
        lease.release()


def test_32_simultaneous_leases_are_distinct_and_bind():
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(32), ctx.Queue()
    procs = [ctx.Process(target=_lease_and_bind, args=(barrier, queue)) for _ in range(32)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    ports = [port for port, _ in results]
    assert len(set(ports)) == 32
    assert all(bound for _, bound in results)
    assert port_leases() == []  # all released


def _hold(queue, port_range):
    lease = lease_port(ports=port_range)
    queue.put(lease.port)
    time.sleep(600)


def test_lease_of_a_killed_process_is_reclaimed():
    # A one-port range: the second lease can only succeed by reclaiming the first.
    port = next(p for p in candidate_ports(30500, 30999) if port_is_free(p))
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    holder = ctx.Process(target=_hold, args=(queue, (port, port)))
    holder.start()
    try:
        assert queue.get(timeout=60) == port
        with pytest.raises(ClusterError, match="no free port"):
            lease_port(ports=(port, port))
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=30)
        with lease_port(ports=(port, port)) as lease:
            assert lease.port == port
            assert [entry["pid"] for entry in port_leases()] == [os.getpid()]
    finally:
        holder.kill()


def test_reused_pid_does_not_keep_a_lease():
    lease = lease_port()
    # Same pid, another start time: the pid was reused by a process that owns nothing.
    path = lease.path
    path.write_text(path.read_text().replace('"start": "', '"start": "1'))
    assert port_leases() == []
    assert not path.exists()


def test_a_busy_port_is_skipped():
    port = next(p for p in candidate_ports(31000, 31999) if port_is_free(p))
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    try:
        assert not port_is_free(port)
        with pytest.raises(ClusterError, match="no free port"):
            lease_port(ports=(port, port))
    finally:
        sock.close()


def test_user_master_port_wins_but_is_exclusive(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29555")
    with lease_port(label="first") as lease:
        assert (lease.port, lease.user_set) == (29555, True)
        with pytest.raises(ClusterError, match="MASTER_PORT=29555 is already used by orch job first"):
            lease_port()
    monkeypatch.setenv("MASTER_PORT", "abc")
    with pytest.raises(ClusterError, match="MASTER_PORT"):
        lease_port()


def test_range_avoids_the_ephemeral_ports(monkeypatch):
    low, high = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    ports = candidate_ports(29500, 39999)
    assert ports and not any(low <= p <= high for p in ports)
    monkeypatch.setenv("ORCH_PORT_RANGE", "40000-30000")
    with pytest.raises(ClusterError, match="ORCH_PORT_RANGE"):
        lease_port()


def test_release_is_idempotent_and_per_host_folder(runtime):
    lease = lease_port()
    assert lease.path.parent == lease_dir("ports") and str(lease.path).startswith(str(runtime))
    lease.release()
    lease.release()
    assert port_leases() == []
