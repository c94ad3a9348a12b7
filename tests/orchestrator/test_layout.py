"""``Resources.layout()``: the one nodes x GPUs-per-node rule. The Slurm plan, the torchrun plan,
the Ray request and ``orch config`` used to carry three copies of it that disagreed; each now
reads the same answer, and this test pins that they agree."""

from __future__ import annotations

import pytest

from cluster.errors import ConfigError
from orchestrator.commands.config import derived_values
from orchestrator.config import load_experiment, with_overrides
from orchestrator.config.schema import Experiment
from orchestrator.launch import job_spec
from orchestrator.launchers.slurm import sbatch_parameters
from orchestrator.launchers.torchrun import layout as torchrun_layout

CASES = [(16, None, 8, (2, 8)), (4, None, None, (1, 4)), (6, 3, None, (3, 2)), (8, 2, 4, (2, 4)), (1, None, None, (1, 1))]


@pytest.mark.parametrize("gpus,nodes,per_node,expected", CASES)
def test_layout(gpus, nodes, per_node, expected):
    res = with_overrides(Experiment(), {"resources.gpus": gpus, "resources.nodes": nodes,
                                        "resources.gpus_per_node": per_node}).resources
    assert res.layout() == expected


@pytest.mark.parametrize("gpus,nodes,per_node,expected", CASES)
def test_every_backend_and_orch_config_agree(tiny_experiment, gpus, nodes, per_node, expected):
    exp = with_overrides(load_experiment(tiny_experiment), {
        "resources.gpus": gpus, "resources.nodes": nodes, "resources.gpus_per_node": per_node})
    spec = job_spec(exp, "slurm", write=False)
    params = sbatch_parameters(spec)
    assert (params["nodes"], params["ntasks_per_node"]) == expected
    assert torchrun_layout(spec) == expected
    derived = derived_values(exp)
    assert (derived["nodes"], derived["gpus_per_node"]) == expected


@pytest.mark.parametrize(
    "gpus,nodes,per_node,message",
    [(12, None, 8, "--gpus 12 does not fill whole nodes of --gpus-per-node 8; give a multiple of 8"),
     (16, 3, 8, "--nodes 3 x --gpus-per-node 8 != --gpus 16; give --gpus 24"),
     (5, 2, None, "--gpus 5 does not split evenly over --nodes 2"),
     (0, None, None, "at least 1 GPU")],
)
def test_impossible_layouts_are_one_line(gpus, nodes, per_node, message):
    import dataclasses

    from orchestrator.config.schema import Resources

    res = dataclasses.replace(Resources(), gpus=gpus, nodes=nodes, gpus_per_node=per_node)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")) as err:
        res.layout()
    assert "\n" not in str(err.value)
