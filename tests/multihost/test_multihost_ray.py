"""Ray across two hosts: the head in h1, a worker node joined from h2; Ray Train at world size 4
(2 workers per host) gives the local backend's final loss. The driver runs in h1, as it must run
on a node of the cluster; `orch status` reads the job from this machine."""

import subprocess
import sys

import pytest


def test_ray_train_world_size_4_on_two_hosts_matches_the_local_backend(local_hosts, ray_on_hosts, tiny, final_loss,
                                                                       local_world4_loss, orch_env,
                                                                       metrics_of_each_host):
    h1, h2 = local_hosts.names
    path = tiny()
    out = local_hosts.run(h1, [sys.executable, "-m", "orchestrator.cli", "submit", str(path), "--backend", "ray",
                               "--address", ray_on_hosts, "--gpus", "4", "--nodes", "2", "--gpus-per-node", "2",
                               "--set", f"resources.ray.storage_path={orch_env / 'ray-storage'}", "--wait"],
                          timeout=600, cwd=orch_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for host in (h1, h2):  # two workers on each host
        assert out.stdout.count(f"ip={local_hosts.addr[host]}, pid=") + out.stderr.count(f"ip={local_hosts.addr[host]}, pid=") >= 2
    status = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status"], capture_output=True, text=True, timeout=60)
    assert "SUCCEEDED" in status.stdout, status.stdout
    assert final_loss(orch_env / "work") == pytest.approx(local_world4_loss, rel=1e-6)
    metrics_of_each_host(orch_env / "work", [h1, h2], ranks_per_host=2)  # each worker its own group
