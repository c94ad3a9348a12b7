"""The seeded fault suite (issue 12): each seed injects one fault into a real job on a real backend
(local, torchrun, the local Slurm cluster, Ray) and checks the invariants (see ``fault_run``).

    make faults N=40            # seeds 0..39 (every (backend, fault) pair of the matrix, twice)
    make test                   # includes the CI set: seeds 0..CI_SEEDS-1
    python tests/faults/summary.py RESULTS.json    # the table of RELIABILITY.md
"""

from __future__ import annotations

import pytest
from fault_run import run_scenario
from fault_schedule import schedule, selected_seeds

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.mark.parametrize("seed", selected_seeds())
def test_fault(seed, fault_context, fault_results, request):
    scenario = schedule(seed)
    if scenario.backend == "slurm":
        fault_context.slurm_dir = request.getfixturevalue("fault_slurm")
    outcome = run_scenario(scenario, fault_context)
    fault_results.add(outcome.to_json())
    assert not outcome.problems, f"{scenario}:\n" + "\n".join(outcome.problems)
