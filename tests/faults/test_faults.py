"""The seeded fault suite (issue 12): each seed injects one fault into a real job on a real backend
(local, torchrun, the local Slurm cluster, Ray) and checks the invariants (see ``fault_run``).

    make faults N=48            # seeds 0..47 (every (backend, fault) pair of the matrix, twice)
    make test                   # includes the CI set: seeds 0..CI_SEEDS-1
    python tests/faults/summary.py RESULTS.json    # the table of RELIABILITY.md

Under pytest-xdist (``--dist loadgroup``) the Slurm seeds run in the ``slurm`` group (the one
local Slurm cluster of the session's worker, reused when the Slurm tests started it) and the Ray
seeds in the ``ray`` group; local and torchrun seeds run anywhere (their own lease folder, ports
chosen at run time).
"""

from __future__ import annotations

import pytest
from fault_run import run_scenario
from fault_schedule import schedule, selected_seeds

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(900)]
GROUPS = {"slurm": [pytest.mark.slurm, pytest.mark.xdist_group("slurm")],
          "ray": [pytest.mark.ray, pytest.mark.xdist_group("ray")]}


def _params() -> list:
    return [pytest.param(seed, marks=GROUPS.get(schedule(seed).backend, []), id=schedule(seed).name)
            for seed in selected_seeds()]


@pytest.mark.parametrize("seed", _params())
def test_fault(seed, fault_context, fault_results, request):
    scenario = schedule(seed)
    if scenario.backend == "slurm":
        fault_context.slurm_dir = request.getfixturevalue("fault_slurm")
    outcome = run_scenario(scenario, fault_context)
    fault_results.add(outcome.to_json())
    assert not outcome.problems, f"{scenario}:\n" + "\n".join(outcome.problems)
