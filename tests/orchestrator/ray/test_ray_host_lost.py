"""A host lost under a Ray job: ``resources.ray.min_workers`` makes the job elastic
(``ScalingConfig(num_workers=(min, max))``); the driver's node watch names the lost host and ends
a job the hosts left cannot hold. The end-to-end runs are in tests/multihost (seconds here)."""

from __future__ import annotations

import pytest

from cluster.errors import ConfigError
from orchestrator.launchers.ray.driver import lost_host_verdict
from orchestrator.launchers.ray.request import RayJobRequest
from test_ray_plan import _plan


def node(node_id, host, alive=True, cpus=2.0):
    return {"NodeID": node_id, "NodeManagerHostname": host, "NodeManagerAddress": f"10.0.0.{node_id}", "Alive": alive,
            "Resources": {"CPU": cpus} if alive else {}}


def request(**fields):
    return RayJobRequest(name="tiny", config_path="c.yaml", output_dir="out", num_workers=4, storage_path="s",
                         cpus_per_worker=1.0, **fields)


def test_min_workers_makes_the_scaling_elastic_and_is_said(tiny_experiment):
    plan = _plan(tiny_experiment, **{"resources.gpus": 4, "resources.ray.min_workers": 2})
    assert plan.requests[0].scaling_workers() == (2, 4)
    assert "workers:              2..4 (ScalingConfig num_workers=(2, 4)" in plan.text
    fixed = _plan(tiny_experiment, **{"resources.gpus": 4, "resources.ray.min_workers": 4})
    assert fixed.requests[0].scaling_workers() == 4  # min = max: a fixed world size
    with pytest.raises(ConfigError, match=r"resources.ray.min_workers=5: use 1..4"):
        _plan(tiny_experiment, **{"resources.gpus": 4, "resources.ray.min_workers": 5})


def test_a_host_lost_is_named_and_fails_only_a_job_the_hosts_left_cannot_hold():
    before = [node("1", "h1"), node("2", "h2"), node("9", "old", alive=False)]
    after = [node("1", "h1"), node("2", "h2", alive=False), node("9", "old", alive=False)]
    assert lost_host_verdict(before, before, request(), use_gpu=False) == ([], None)
    lost, error = lost_host_verdict(before, after, request(), use_gpu=False)
    assert lost == ["h2"] and error.startswith("orch: error: host h2 was lost (Ray marked its node dead); ")
    assert "hold 2 of its 4 workers" in error and "resources.ray.min_workers (e.g. 2)" in error
    assert lost_host_verdict(before, after, request(min_workers=2), use_gpu=False) == (["h2"], None)
    lost, error = lost_host_verdict(before, after, request(min_workers=3), use_gpu=False)
    assert lost == ["h2"] and "hold 2 of the 3 workers resources.ray.min_workers asks for" in error
    # A node gone from the answer altogether counts as lost; a third host with room keeps the job.
    assert lost_host_verdict(before, [node("1", "h1")], request(), use_gpu=False)[0] == ["h2"]
    roomy = [node("1", "h1"), node("2", "h2", alive=False), node("3", "h3")]
    assert lost_host_verdict(before, roomy, request(), use_gpu=False) == (["h2"], None)
