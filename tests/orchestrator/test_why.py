"""``orch why`` on real failures of local and torchrun jobs: a rank killed with SIGKILL, a worker's
config error (the hang is in test_hang_watchdog.py); and the output excerpt on literal logs. The
same SIGKILL on Slurm and Ray: slurm/test_slurm_why.py, ray/test_ray_why.py."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner
from orch_testing import assert_why_names_the_kill, kill_rank_and_explain

from orchestrator import records
from orchestrator.commands.why import around_error, why_cmd
from orchestrator.launch import ResourceFlags
from orchestrator.spec import JobState
from orchestrator.submit import submit


def _wait(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _why(job_id: str) -> str:
    result = CliRunner().invoke(why_cmd, [job_id])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
@pytest.mark.usefixtures("local_orch_env")
@pytest.mark.parametrize("backend", ["local", "torchrun"])
def test_why_names_the_rank_killed_by_sigkill(make_experiment, backend):
    path = make_experiment(**{"schedule.iterations": 100000, "eval.interval": 100000, "resources.gpus": 2,
                              "tracking.enable": False})
    _, [handle] = submit([str(path)], (), ResourceFlags(backend=backend))
    beat, text = kill_rank_and_explain(handle)
    assert f"job {handle.job_id} (tiny, {backend}): FAILED" in text
    assert_why_names_the_kill(text, f"rank 1 (pid {beat.pid})", beat.host, "orchestrator.worker")
    assert "world size 2" in text, text
    if backend == "local":
        assert "RANK=1" in text, text


@pytest.mark.slow
@pytest.mark.usefixtures("local_orch_env")
def test_why_shows_a_workers_config_error(make_experiment):
    path = make_experiment(**{"runtime.device": "cuda", "tracking.enable": False})  # this machine has no GPU
    _, [handle] = submit([str(path)], (), ResourceFlags(backend="local"))
    _wait(lambda: records.load_record(handle.job_id).state.finished, 240, "the job to end")
    record = records.load_record(handle.job_id)
    assert record.state == JobState.FAILED
    text = _why(handle.job_id)
    assert "first failure: rank 0 (pid" in text and "exited with status 2 (bad input)" in text, text
    assert "  orch worker: error: runtime.device=cuda but no CUDA GPU is visible" in text, text
    assert text.splitlines()[-1].startswith("next: fix what the error names"), text


LOG = """\
[orch 10:00:00] started 2 process(es)
10:00:05 [rank 0] INFO detection.train: iter 1/10
Traceback (most recent call last):
  File "/src/orchestrator/worker.py", line 91, in main
    run(args.config)
  File "/src/detection/data/coco.py", line 163, in _load_image
    raise DataError(msg)
detection.data.DataError: /d/1.png: cannot read image
[rank1]: RuntimeError: Connection closed by peer
"""


def test_the_excerpt_starts_at_the_traceback():
    lines = around_error(LOG)
    assert lines[0] == "Traceback (most recent call last):"
    assert "[rank1]: RuntimeError: Connection closed by peer" in lines
    assert around_error("a\nb\n") == ["a", "b"]


def test_a_kill_by_the_oom_killer_is_named():
    from orchestrator.commands.why import Failure

    assert Failure("rank 1 (pid 5)", "h2", -9, True).describe() == \
        "rank 1 (pid 5) on h2 was killed by SIGKILL (signal 9) - out of memory (the kernel's OOM killer)"
    assert Failure("task 3", "", -15).describe() == "task 3 was killed by SIGTERM (signal 15)"
    assert Failure("rank 0", "h", 2).describe() == "rank 0 on h exited with status 2 (bad input)"


def test_a_sweeps_trials(tmp_path):
    from orchestrator.commands.why import sweep_trials

    for trial in ("a1b2c_00000", "a1b2c_00001"):
        (tmp_path / "trials" / trial).mkdir(parents=True)
    error = tmp_path / "ray" / "sweep" / "run_trial_a1b2c_00001_1_lr=0.1" / "error.txt"
    error.parent.mkdir(parents=True)
    error.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad lr\n")
    lines = sweep_trials(str(tmp_path))
    assert lines[:3] == ["trials: 2", "  a1b2c_00000: ok", "  a1b2c_00001: failed"]
    assert lines[3].startswith("first failed trial a1b2c_00001") and lines[-1] == "  ValueError: bad lr"
