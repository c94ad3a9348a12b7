"""Slurm across two hosts (one slurmd per host, NodeAddr its address): a 2-node job at world size 4
gives the local backend's final loss; `orch status/logs/cancel` work from this machine."""

import os
import subprocess
import sys
import time

import pytest
from orch_testing import after_the_job, wait_until_none


def orch(env, *args, timeout=120):
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    return out


def job_state(env, job):
    out = orch(env, "status", job)
    return next((s for s in ("SUCCEEDED", "FAILED", "CANCELLED", "RUNNING", "PENDING") if s in out.stdout), out.stdout)


def wait_state(env, job, states, timeout_s):
    deadline = time.monotonic() + timeout_s
    while (state := job_state(env, job)) not in states and time.monotonic() < deadline:
        time.sleep(2)
    return state


@pytest.fixture
def slurm_env(orch_env, slurm_on_hosts):
    return {**os.environ, "SLURM_CONF": slurm_on_hosts}


def submit(env, path, *extra):
    out = orch(env, "submit", str(path), "--backend", "slurm", "--nodes", "2", "--gpus-per-node", "2", "--gpus", "4", *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("submitted ")[1].split()[0]


def test_two_hosts_world_size_4_match_the_local_backend(local_hosts, slurm_env, tiny, final_loss, local_world4_loss, orch_env):
    h1, h2 = local_hosts.names
    job = submit(slurm_env, tiny())
    assert wait_state(slurm_env, job, ("SUCCEEDED", "FAILED", "CANCELLED"), 600) == "SUCCEEDED", orch(slurm_env, "logs", job).stdout[-3000:]
    logs = orch(slurm_env, "logs", job).stdout
    assert f"{h1}: master {h1} at {local_hosts.addr[h1]}:" in logs and "via eth0" in logs  # never 127.0.1.1
    assert final_loss(orch_env / "work") == pytest.approx(local_world4_loss, rel=1e-6)


def test_cancel_from_this_machine_leaves_no_process_on_the_hosts(local_hosts, slurm_env, tiny):
    job = submit(slurm_env, tiny(**{"schedule.iterations": 10000}))
    assert wait_state(slurm_env, job, ("RUNNING",), 120) == "RUNNING"
    deadline = time.monotonic() + 120  # until the ranks run on both hosts
    while time.monotonic() < deadline and not all(workers(local_hosts, h) for h in local_hosts.names):
        time.sleep(1)
    assert all(workers(local_hosts, h) for h in local_hosts.names)
    assert orch(slurm_env, "cancel", job).returncode == 0
    assert wait_state(slurm_env, job, ("CANCELLED",), 60) == "CANCELLED"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(workers(local_hosts, h) for h in local_hosts.names):
        time.sleep(1)
    assert not any(workers(local_hosts, h) for h in local_hosts.names)


def back_in_service(local_hosts, env, host, timeout_s: float = 180) -> int:
    """Wait until ``host`` (its link back up) has none of the lost job's processes left and Slurm
    has it in service again (not down, not drained); returns how often it was resumed by hand.
    Its slurmd kills what the lost job left there; when that kill outlasts Slurm's
    UnkillableStepTimeout (a loaded machine), Slurm drains the node ("Kill task failed") and
    waits for an admin: once the processes are gone, the test resumes it as an admin does."""
    node = lambda fmt: subprocess.run(["sinfo", "-h", "-N", "-n", host, "-o", fmt], capture_output=True, text=True,
                                      env=env).stdout.strip().lower()
    resumed, deadline = 0, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not workers(local_hosts, host):
            state = node("%T")
            if state and "*" not in state and not any(word in state for word in ("down", "drain", "fail")):
                return resumed
            if "drain" in state and "kill task failed" in node("%E") and resumed < 3:
                subprocess.run(["scontrol", "update", f"NodeName={host}", "State=RESUME"], check=True, env=env)
                resumed += 1
        time.sleep(2)
    raise AssertionError(f"{host} not back in service after {timeout_s:.0f} s: workers {workers(local_hosts, host)}, "
                         f"sinfo {node('%T')!r} ({node('%E')!r})")


def workers(local_hosts, host):
    """Pids of training processes inside ``host``."""
    pids = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd or b"orchestrator.worker" in cmd:
            found.append(int(pid))
    return found


def test_a_host_lost_mid_run_ends_the_job_in_one_line_naming_it(local_hosts, slurm_env, tiny):
    from orchestrator.config import load_experiment

    h1, h2 = local_hosts.names
    path = tiny(**{"schedule.iterations": 100000, "eval.interval": 100000, "checkpoint.interval": 100000})
    timeout_s = load_experiment(str(path)).runtime.collective_timeout_s
    job = submit(slurm_env, path)
    deadline = time.monotonic() + 300  # until the ranks run on both hosts
    while time.monotonic() < deadline and not all(workers(local_hosts, h) for h in local_hosts.names):
        time.sleep(1)
    subprocess.run(["ip", "-n", h2, "link", "set", "eth0", "down"], check=True)
    cut = time.monotonic()
    try:
        state = wait_state(slurm_env, job, ("FAILED", "SUCCEEDED", "CANCELLED"), timeout_s + 60)
        ended = time.monotonic() - cut
        print(f"slurm: the job ended {ended:.1f} s after {h2}'s link was cut")
        assert state == "FAILED" and ended < timeout_s + 60
        error = next(line for line in orch(slurm_env, "status", job).stdout.splitlines() if line.strip().startswith("error"))
        assert f"host {h2} was lost" in error, error
        assert not workers(local_hosts, h1)
    finally:
        subprocess.run(["ip", "-n", h2, "link", "set", "eth0", "up"], check=True)
    # h2 back: Slurm returns it to service and has it kill what the lost job left there.
    back_in_service(local_hosts, slurm_env, h2)


def test_a_host_lost_with_requeue_allowed_resumes_from_its_checkpoint(local_hosts, slurm_env, tiny, orch_env):
    """``resources.slurm.requeue_on_node_fail`` (sbatch --requeue): Slurm requeues the job when h2
    is lost. A requeued job waits for as many nodes as it had (Slurm keeps its NumNodes and
    NumTasks); h2 back, it resumes from its last checkpoint at world size 4, in the same MLflow
    run, and finishes."""
    from orchestrator.records import list_records

    h1, h2 = local_hosts.names
    path = tiny(**{"schedule.iterations": 40, "eval.interval": 100000, "checkpoint.interval": 4,
                   "eval.classwise": False, "resources.slurm.requeue_on_node_fail": True})
    job = submit(slurm_env, path)
    native = list_records()[0].native_id
    checkpoints = orch_env / "work" / "checkpoints"
    deadline = time.monotonic() + 300  # until the first checkpoint, both hosts training
    while time.monotonic() < deadline and not list(checkpoints.glob("iter_*.pth")):
        time.sleep(1)
    assert list(checkpoints.glob("iter_*.pth")) and all(workers(local_hosts, h) for h in local_hosts.names)
    subprocess.run(["ip", "-n", h2, "link", "set", "eth0", "down"], check=True)
    cut = time.monotonic()
    show = lambda: subprocess.run(["scontrol", "show", "job", native], capture_output=True, text=True, env=slurm_env).stdout
    try:
        deadline = time.monotonic() + 120  # NODE_FAIL, then requeued: pending for want of h2
        while time.monotonic() < deadline and not ("Restarts=1" in show() and "JobState=PENDING" in show()):
            time.sleep(1)
        requeued = time.monotonic() - cut
        assert "Restarts=1" in show() and "JobState=PENDING" in show(), show()
        assert job_state(slurm_env, job) == "PENDING"  # not FAILED: orch waits with Slurm
        # Held while h2 comes back: its slurmd, unlike a rebooted host's, still has the lost run and
        # revokes the job's credentials when it hears of its end; a launch at that moment is refused
        # ("Job credential revoked"). Released once h2 is idle and the revocation expired (10 s).
        subprocess.run(["scontrol", "hold", native], check=True, env=slurm_env)
    finally:
        subprocess.run(["ip", "-n", h2, "link", "set", "eth0", "up"], check=True)
    resumed = back_in_service(local_hosts, slurm_env, h2)
    time.sleep(12)
    subprocess.run(["scontrol", "release", native], check=True, env=slurm_env)
    back = time.monotonic()
    # A launch h2's slurmd still refuses (its revocation outlived the 12 s under load) puts the job
    # back held ("launch failed requeued held", as on a real cluster): released again, as an admin does.
    releases = 1
    deadline = time.monotonic() + 300
    while (text := show()) and "JobState=PENDING" in text and time.monotonic() < deadline:
        if "Reason=launch_failed_requeued_held" in text or "JobHeldAdmin" in text:
            assert releases < 4, text
            time.sleep(10)
            subprocess.run(["scontrol", "release", native], check=True, env=slurm_env)
            releases += 1
        time.sleep(2)
    assert "JobState=PENDING" not in show(), show() + subprocess.run(["sinfo", "-R"], capture_output=True, text=True,
                                                                     env=slurm_env).stdout
    state = wait_state(slurm_env, job, ("SUCCEEDED", "FAILED", "CANCELLED"), 600)
    ended = time.monotonic() - back
    logs = orch(slurm_env, "logs", job).stdout
    print(f"slurm: {h2} lost; requeued after {requeued:.1f} s; released with {h2} back ({releases} release(s), "
          f"{h2} resumed by hand {resumed} time(s)), "
          f"resumed and finished {ended:.1f} s later")
    assert state == "SUCCEEDED", logs[-4000:]
    assert "restart 1" in logs and "resumed from" in logs, logs[-4000:]
    assert not after_the_job(list_records()[0])
    assert not wait_until_none(local_hosts.names, (b"submitit.core._submit", b"orchestrator.worker"), 60)
