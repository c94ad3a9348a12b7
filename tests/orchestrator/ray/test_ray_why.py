"""``orch why`` on a 2-worker Ray job whose rank 1 is killed with SIGKILL (on a real ``ray start``
head; the other backends' kills beside their tests)."""

from __future__ import annotations

import pytest
from orch_testing import assert_why_names_the_kill, kill_rank_and_explain

from orchestrator.submit import ResourceFlags, submit

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_why_names_the_worker_killed_by_sigkill(ray_head, orch_home, make_experiment):
    path = make_experiment(**{"schedule.iterations": 100000, "eval.interval": 100000, "tracking.enable": False,
                              "resources.ray.max_failures": 0})
    _, [handle] = submit([str(path)], (), ResourceFlags(backend="ray", gpus=2, address=ray_head.address))
    beat, text = kill_rank_and_explain(handle)
    # Ray's raylet reaps its workers and records no exit status: the signal is not known.
    assert_why_names_the_kill(text, f"rank 1 (pid {beat.pid})", beat.host, f"ray address {ray_head.address}",
                              signal_known=False)
