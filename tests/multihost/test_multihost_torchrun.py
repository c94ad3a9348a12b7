"""torchrun over ssh across two hosts (CPU ranks, gloo): world size 4 gives the local backend's
final loss; a node that cannot reach the master fails the job at once in one line naming both."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from orch_testing import host_processes

from orchestrator import records as jobs
from orchestrator.spec import JobState
from orchestrator.submit import ResourceFlags, submit


def orch(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_two_hosts_world_size_4_match_the_local_backend(local_hosts, tiny, final_loss, local_world4_loss, metrics_of_each_host):
    h1, h2 = local_hosts.names
    path = tiny()
    flags = ["--backend", "torchrun", "--hosts", f"{h1},{h2}", "--gpus-per-node", "2", "--gpus", "4"]
    dry = orch("submit", str(path), *flags, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for rank, host in enumerate((h1, h2)):  # per host: the command, the rendezvous address, the interface
        assert f"# node {rank} ({host}, over ssh): rendezvous {local_hosts.addr[h1]}:{{port}}, interface the route to" in dry.stdout
        assert f"-m cluster.remote {host} " in dry.stdout
    _, handles = submit([str(path)], (), ResourceFlags(backend="torchrun", hosts=f"{h1},{h2}", gpus_per_node=2, gpus=4))
    state = handles[0].wait(600)
    record = jobs.load_record(handles[0].job_id)
    log = open(record.log_path).read()
    assert state == JobState.SUCCEEDED, log[-3000:]
    for host in (h1, h2):  # each node said how it reaches the master: its own eth0, not loopback
        assert f"orch: {host}: the master {h1} at {local_hosts.addr[h1]}:" in log
        assert f"via eth0 ({local_hosts.addr[host]}); GLOO_SOCKET_IFNAME=eth0" in log
    assert final_loss(record.output_dir) == pytest.approx(local_world4_loss, rel=1e-6)
    # System metrics of each host under its own name: h2's sampler relays through rank 0 on h1.
    metrics_of_each_host(record.output_dir, [h1, h2], ranks_per_host=2)
    assert sorted(p.name for p in (Path(record.output_dir) / "system").iterdir()) == [f"{h2}.jsonl"]


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


def job_processes(host):
    """The job's processes (torchrun agents, workers) inside ``host``."""
    return host_processes(host, b"orchestrator.worker", b"torchrun")


def test_a_host_lost_mid_run_ends_the_job_in_one_line_naming_it(local_hosts, tiny):
    from orchestrator.config import load_experiment

    h1, h2 = local_hosts.names
    path = tiny(**{"schedule.iterations": 100000, "eval.interval": 100000, "checkpoint.interval": 100000})
    timeout_s = load_experiment(str(path)).runtime.collective_timeout_s
    _, handles = submit([str(path)], (), ResourceFlags(backend="torchrun", hosts=f"{h1},{h2}", gpus_per_node=2, gpus=4))
    record = jobs.load_record(handles[0].job_id)
    events = Path(record.output_dir) / "journal" / "events.jsonl"
    deadline = time.monotonic() + 300  # until it trains (a step's metrics in the journal)
    while time.monotonic() < deadline and not (events.exists() and '"t":"metrics"' in events.read_text()):
        time.sleep(2)
    assert events.exists() and '"t":"metrics"' in events.read_text(), open(record.log_path).read()[-3000:]
    subprocess.run(["ip", "-n", h2, "link", "set", "eth0", "down"], check=True)
    cut = time.monotonic()
    try:
        state = handles[0].wait(timeout_s + 60)
        ended = time.monotonic() - cut
        record = jobs.load_record(handles[0].job_id)
        print(f"torchrun: the job ended {ended:.1f} s after {h2}'s link was cut: {record.error}")
        assert state == JobState.FAILED and ended < timeout_s + 60
        assert record.error.startswith(f"orch: error: host {h2} was lost ("), record.error
        deadline = time.monotonic() + 60  # h1's agent hung up by the supervisor stops its workers
        while time.monotonic() < deadline and job_processes(h1):
            time.sleep(1)
        assert not job_processes(h1), job_processes(h1)
    finally:
        subprocess.run(["ip", "-n", h2, "link", "set", "eth0", "up"], check=True)
    # What ran on h2 while it was cut off ends once it hears again that its session is gone.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and job_processes(h2):
        time.sleep(1)
    assert not job_processes(h2), job_processes(h2)
