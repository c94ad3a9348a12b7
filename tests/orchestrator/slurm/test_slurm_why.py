"""``orch why`` on a 2-task Slurm job whose task 1 is killed with SIGKILL (the config error and the
hang are in test_slurm_hang.py; the local, torchrun and Ray kills beside their tests)."""

from __future__ import annotations

import pytest
from orch_testing import assert_why_names_the_kill, kill_rank_and_explain

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(420)]


def test_why_names_the_task_killed_by_sigkill(slurm_cluster, write_experiment, module_orch_home, tmp_path):
    from orchestrator.submit import ResourceFlags, submit

    path = write_experiment(tmp_path / "kill", "kill", **{"schedule.iterations": 100000, "eval.interval": 100000,
                                                         "tracking.enable": False})
    _, [handle] = submit([str(path)], (), ResourceFlags(backend="slurm", partition="dev", gpus=2, gpus_per_node=1))
    beat, text = kill_rank_and_explain(handle)
    # Slurm names the node (node2 of the local cluster: 2 nodes, one task each), not its hostname.
    assert_why_names_the_kill(text, "task 1", "node2", "#SBATCH")
