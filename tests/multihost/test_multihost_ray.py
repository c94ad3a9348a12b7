"""Ray across two hosts: the head in h1, a worker node joined from h2; Ray Train at world size 4
(2 workers per host) gives the local backend's final loss. The driver runs in h1, as it must run
on a node of the cluster; `orch status` reads the job from this machine."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from orch_testing import after_the_job, wait_until_none

#: What a Ray job runs on the hosts: its driver, Ray Train's controller and workers.
JOB_PROCESSES = (b"orchestrator.launchers.ray.driver", b"RayTrainWorker", b"TrainController")


def test_ray_train_world_size_4_on_two_hosts_matches_the_local_backend(local_hosts, ray_on_hosts, tiny, final_loss,
                                                                       local_world4_loss, orch_env,
                                                                       metrics_of_each_host):
    h1, h2 = local_hosts.names
    path = tiny()
    out = local_hosts.run(h1, [sys.executable, "-m", "orchestrator.cli", "submit", str(path), "--backend", "ray",
                               "--address", ray_on_hosts.address, "--gpus", "4", "--nodes", "2", "--gpus-per-node", "2",
                               "--set", f"resources.ray.storage_path={orch_env / 'ray-storage'}", "--wait"],
                          timeout=600, cwd=orch_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for host in (h1, h2):  # two workers on each host
        assert out.stdout.count(f"ip={local_hosts.addr[host]}, pid=") + out.stderr.count(f"ip={local_hosts.addr[host]}, pid=") >= 2
    status = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status"], capture_output=True, text=True, timeout=60)
    assert "SUCCEEDED" in status.stdout, status.stdout
    assert final_loss(orch_env / "work") == pytest.approx(local_world4_loss, rel=1e-6)
    metrics_of_each_host(orch_env / "work", [h1, h2], ranks_per_host=2)  # each worker its own group


def test_a_sweep_lands_trials_on_both_hosts(local_hosts, ray_on_hosts, tiny, orch_env):
    from orchestrator.records import list_records

    # Two trials of 2 CPUs, at once, on two hosts of 2 CPUs: one trial per host.
    sweep = {"space": {"optim.lr": {"grid": [1.0e-3, 2.0e-3]}}, "metric": "loss", "mode": "min",
             "max_concurrent": 2, "cpus_per_trial": 2}
    path = tiny(**{"sweep": sweep, "schedule.iterations": 2, "eval.interval": 2, "eval.classwise": False,
                   "checkpoint.interval": 2, "resources.ray.storage_path": str(orch_env / "ray-storage")})
    out = local_hosts.run(local_hosts.names[0], [sys.executable, "-m", "orchestrator.cli", "sweep", str(path),
                                                 "--address", ray_on_hosts.address], timeout=600, cwd=orch_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [record] = list_records()
    trials = record.extra["trials"]
    assert len(trials) == 2 and all(t["status"] == "TERMINATED" for t in trials.values()), trials
    assert sorted(t.get("host") for t in trials.values()) == sorted(local_hosts.names), trials


def nodes_alive_soon(local_hosts, ray_on_hosts, want: int, timeout_s: float = 90) -> int:
    """The count of alive Ray nodes once it is ``want`` (or the last one seen after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while (alive := ray_nodes_alive(local_hosts, ray_on_hosts)) != want and time.monotonic() < deadline:
        time.sleep(3)
    return alive


def ray_nodes_alive(local_hosts, ray_on_hosts) -> int:
    probe = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))" % ray_on_hosts.address)
    out = local_hosts.run(local_hosts.names[0], [sys.executable, "-c", probe], timeout=60)
    # Ray's own lines (a raylet reconnecting) may come after the count: the last line that is one.
    counts = [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()]
    return int(counts[-1]) if out.returncode == 0 and counts else -1


def submit_ray_until_checkpoint(local_hosts, ray_on_hosts, path, orch_env):
    """Start a 4-worker Ray job on both hosts (driver in h1, detached); return its record once the
    job has written its first periodic checkpoint."""
    from orchestrator import records

    h1, _ = local_hosts.names
    out = local_hosts.run(h1, [sys.executable, "-m", "orchestrator.cli", "submit", str(path), "--backend", "ray",
                               "--address", ray_on_hosts.address, "--gpus", "4", "--nodes", "2", "--gpus-per-node",
                               "2", "--set", f"resources.ray.storage_path={orch_env / 'ray-storage'}"],
                          timeout=120, cwd=orch_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [record] = records.list_records()
    deadline = time.monotonic() + 300
    checkpoints = orch_env / "work" / "checkpoints"
    while time.monotonic() < deadline and not list(checkpoints.glob("iter_*.pth")):
        assert records.load_record(record.job_id).state in ("PENDING", "RUNNING"), Path(record.log_path).read_text()[-3000:]
        time.sleep(1)
    assert list(checkpoints.glob("iter_*.pth")), Path(record.log_path).read_text()[-3000:]
    return record


def test_a_host_lost_ray_train_resumes_on_the_host_left_at_the_smaller_world_size(local_hosts, ray_on_hosts, tiny,
                                                                                   orch_env):
    from orchestrator import records
    from orchestrator.jobs import JobHandle
    from orchestrator.spec import JobState

    h1, h2 = local_hosts.names
    path = tiny(**{"schedule.iterations": 40, "eval.interval": 100000, "checkpoint.interval": 4,
                   "eval.classwise": False, "resources.ray.min_workers": 2})
    record = submit_ray_until_checkpoint(local_hosts, ray_on_hosts, path, orch_env)
    subprocess.run(["ip", "-n", h2, "link", "set", "eth0", "down"], check=True)
    cut = time.monotonic()
    detected = resumed = None
    try:
        log = Path(record.log_path)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and records.load_record(record.job_id).state in ("PENDING", "RUNNING"):
            if detected is None and records.load_record(record.job_id).extra.get("hosts_lost"):
                detected = time.monotonic() - cut
            if resumed is None and "LR rule re-applied" in log.read_text(errors="replace"):
                resumed = time.monotonic() - cut
            time.sleep(1)
        state = JobHandle(record.job_id).wait(timeout_s=5)
        ended = time.monotonic() - cut
    finally:
        subprocess.run(["ip", "-n", h2, "link", "set", "eth0", "up"], check=True)
    text = log.read_text(errors="replace")
    print(f"ray: {h2} lost; noticed after {detected} s, resumed at world size 2 after {resumed} s, ended after {ended:.1f} s")
    assert state == JobState.SUCCEEDED, text[-4000:]
    assert records.load_record(record.job_id).extra.get("hosts_lost") == [h2]
    assert "on world size 2" in text and "LR rule re-applied" in text, text[-4000:]
    assert not after_the_job(records.load_record(record.job_id))  # its MLflow run ended, no lease held
    ray_on_hosts.rejoin()  # h2's node was marked dead: back for the tests after this one
    assert nodes_alive_soon(local_hosts, ray_on_hosts, 2) == 2
    assert not wait_until_none(local_hosts.names, JOB_PROCESSES, 60)


def test_a_host_lost_at_a_fixed_world_size_fails_in_one_line_naming_it(local_hosts, ray_on_hosts, tiny, orch_env):
    from orchestrator import records
    from orchestrator.jobs import JobHandle
    from orchestrator.spec import JobState

    h1, h2 = local_hosts.names
    path = tiny(**{"schedule.iterations": 100000, "eval.interval": 100000, "checkpoint.interval": 2})
    record = submit_ray_until_checkpoint(local_hosts, ray_on_hosts, path, orch_env)
    subprocess.run(["ip", "-n", h2, "link", "set", "eth0", "down"], check=True)
    cut = time.monotonic()
    try:
        state = JobHandle(record.job_id).wait(timeout_s=180)
        ended = time.monotonic() - cut
    finally:
        subprocess.run(["ip", "-n", h2, "link", "set", "eth0", "up"], check=True)
    error = records.load_record(record.job_id).error or ""
    print(f"ray: the job ended {ended:.1f} s after {h2}'s link was cut: {error}")
    assert state == JobState.FAILED, Path(record.log_path).read_text()[-3000:]
    assert error.startswith(f"orch: error: host {h2} was lost (") and "\n" not in error, error
    ray_on_hosts.rejoin()
    assert nodes_alive_soon(local_hosts, ray_on_hosts, 2) == 2
    assert not wait_until_none(local_hosts.names, JOB_PROCESSES, 60)
