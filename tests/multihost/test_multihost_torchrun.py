"""torchrun over ssh across two hosts (CPU ranks, gloo): world size 4 gives the local backend's
final loss; a node that cannot reach the master fails the job at once in one line naming both."""

import subprocess
import sys
import time

import pytest

from orchestrator import records as jobs
from orchestrator.spec import JobState
from orchestrator.submit import ResourceFlags, submit


def orch(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_two_hosts_world_size_4_match_the_local_backend(local_hosts, tiny, final_loss, local_world4_loss):
    h1, h2 = local_hosts.names
    path = tiny()
    flags = ["--backend", "torchrun", "--hosts", f"{h1},{h2}", "--gpus-per-node", "2", "--gpus", "4"]
    dry = orch("submit", str(path), *flags, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for rank, host in enumerate((h1, h2)):  # per host: the command, the rendezvous address, the interface
        assert f"# node {rank} ({host}, over ssh): rendezvous {local_hosts.addr[h1]}:{{port}}, interface the route to" in dry.stdout
        assert f"ssh -tt -o BatchMode=yes {host} " in dry.stdout
    _, handles = submit([str(path)], (), ResourceFlags(backend="torchrun", hosts=f"{h1},{h2}", gpus_per_node=2, gpus=4))
    state = handles[0].wait(600)
    record = jobs.load_record(handles[0].job_id)
    log = open(record.log_path).read()
    assert state == JobState.SUCCEEDED, log[-3000:]
    for host in (h1, h2):  # each node said how it reaches the master: its own eth0, not loopback
        assert f"orch: {host}: the master {h1} at {local_hosts.addr[h1]}:" in log
        assert f"via eth0 ({local_hosts.addr[host]}); GLOO_SOCKET_IFNAME=eth0" in log
    assert final_loss(record.output_dir) == pytest.approx(local_world4_loss, rel=1e-6)


def test_master_unreachable_fails_at_once_naming_both_hosts(local_hosts, tiny):
    h1, h2 = local_hosts.names
    path = tiny()
    started = time.monotonic()
    # h2 has no way to h1 (a routing or firewall fault between nodes); both answer ssh.
    cut = ["ip", "-n", h2, "route", "add", "unreachable", f"{local_hosts.addr[h1]}/32"]
    subprocess.run(cut, check=True)
    try:
        _, handles = submit([str(path)], (), ResourceFlags(backend="torchrun", hosts=f"{h1},{h2}", gpus_per_node=2, gpus=4))
        state = handles[0].wait(120)
    finally:
        subprocess.run(["ip", "-n", h2, "route", "del", "unreachable", f"{local_hosts.addr[h1]}/32"], check=True)
    record = jobs.load_record(handles[0].job_id)
    assert state == JobState.FAILED
    assert record.error.startswith(f"orch: error: host {h2} cannot reach the master {h1} at {local_hosts.addr[h1]}:"), record.error
    assert time.monotonic() - started < 60
