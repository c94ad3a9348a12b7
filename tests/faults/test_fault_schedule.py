"""The pure parts of the fault suite (fast): the seeded schedule, the lost-work arithmetic on
literal logs, and the summary table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from fault_checks import Progress, lost_work_problems, progress
from fault_schedule import CI_SEEDS, MATRIX, MAX_ITERS, WINDOWED, schedule, seeds

pytestmark = pytest.mark.faults


def test_same_seed_same_scenario_and_every_pair_once_per_round():
    assert [schedule(s) for s in range(60)] == [schedule(s) for s in range(60)]
    assert {(schedule(s).backend, schedule(s).fault) for s in range(len(MATRIX))} == set(MATRIX)
    assert len(set(MATRIX)) == len(MATRIX)
    assert {schedule(s).backend for s in seeds()} == {"local", "torchrun", "slurm"}  # CI; Ray: seed 3
    assert schedule(CI_SEEDS).backend == "ray" and seeds() == list(range(CI_SEEDS)) and seeds(5, 100) == [100, 101, 102, 103, 104]


def test_parameters_stay_in_range():
    for seed in range(200):
        sc = schedule(seed)
        assert 0 <= sc.at_iter <= MAX_ITERS - 4 and sc.rank in (0, 1)
        assert sc.window == "step" or sc.fault in WINDOWED
        if sc.window == "eval":
            assert sc.at_iter % 6 == 0
        assert not (sc.pair and sc.backend == "ray")
        assert sc.fatal == {"signal_job": sc.signal == "SIGTERM", "port_squat": sc.mode == "all_ports"}.get(
            sc.fault, sc.fatal)


LOG = """\
x training job: 16 iterations (4 per epoch)
x iter 1/16 epoch 1
x iter 4/16 epoch 1
x checkpoint /w/checkpoints/iter_4.pth (interval)
x iter 6/16 epoch 2
"""


def test_progress_of_a_resubmitted_job():
    again = "x resumed from /w/checkpoints/iter_4.pth at iteration 4\nx training job: 16 iterations (4 per epoch)\n"
    p = progress(LOG, len(LOG), again)
    assert (p.fault_iter, p.saved_iter, p.resumed_iter, p.lost) == (6, 4, 4, 2)
    fresh = "x runtime.resume=auto: no checkpoint in /w yet, starting fresh\nx training job: 16 iterations (4 per epoch)\n"
    assert progress(LOG, len(LOG), fresh).lost == 6


def test_progress_in_one_log_requeued_or_not():
    requeued = LOG + "x resumed from /w/checkpoints/iter_4.pth at iteration 4\nx training job: 16 iterations (\nx iter 5/16 epoch\n"
    p = progress(requeued, len(LOG) - 10, None)
    assert (p.fault_iter, p.resumed_iter, p.lost) == (6, 4, 2)
    survived = LOG + "x iter 7/16 epoch 2\n"
    assert progress(survived, len(LOG), None).resumed_iter is None and progress(survived, len(LOG)).lost == 0


def test_lost_work_rules():
    assert lost_work_problems(Progress(8, 8, 8), 4) == []
    assert "more than one checkpoint interval" in lost_work_problems(Progress(9, 8, 4), 4)[0]
    assert "although step 8 was checkpointed" in lost_work_problems(Progress(8, 8, 4), 4)[0]


def test_summary_renders_the_tables():
    spec = importlib.util.spec_from_file_location("fault_summary", Path(__file__).with_name("summary.py"))
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    outcome = {"scenario": {**schedule(1).to_json()}, "landed": "eval", "first_state": "FAILED", "error": "exit status -9",
               "finished": True, "lost_steps": 2, "running_runs": 0, "orphans": [], "leaked_leases": [], "shared": [],
               "problems": []}
    text = summary.render({"outcomes": [outcome], "seeds": [1], "seconds": 12.0, "cores": 2, "command": "make faults"})
    assert "| local   | 1               | 1/1" in text and "exit status -9" in text and "- none" in text
