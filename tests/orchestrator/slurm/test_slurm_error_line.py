"""The one-line reason of a failed Slurm job (``state.error_line``) names a task killed by a
signal before anything else rank 0's log printed (found by the fault suite: kill -9 of a rank
was reported as rank 0's last INFO line). Literal log files, no Slurm needed."""

from orchestrator.launchers.slurm.state import error_line

LOG = """\
02:08:01 [rank 0] INFO detection.train: iter 12/16 epoch 3 loss 10.3667 lr 0.001
srun: error: node1: task 0: Killed
srun: launch/slurm: _step_signal: Terminating StepId=4.0
srun: error: node2: task 1: Exited with exit code 1
srun: Force Terminated StepId=4.0
"""


def test_a_killed_task_is_the_reason(tmp_path):
    log = tmp_path / "4_0_log.out"
    log.write_text(LOG)
    assert error_line(None, str(log)) == "task 0 on node1: Killed (SIGKILL: kill -9, or the out-of-memory killer)"


def test_without_a_killed_task_the_last_useful_line(tmp_path):
    log = tmp_path / "4_0_log.out"
    log.write_text("x\nValueError: bad value\nsrun: error: node2: task 1: Exited with exit code 1\n")
    assert error_line(None, str(log)) == "ValueError: bad value"


def test_a_killed_task_comes_before_the_other_ranks_pickled_error(tmp_path):
    import pickle

    result = tmp_path / "4_0_result.pkl"
    result.write_bytes(pickle.dumps(("error", "Traceback...\nRuntimeError: Connection closed by peer")))
    log = tmp_path / "4_0_log.out"
    log.write_text(LOG.replace("node1: task 0", "node2: task 1"))
    assert error_line(str(result), str(log)).startswith("task 1 on node2: Killed")
    assert error_line(str(result), None) == "RuntimeError: Connection closed by peer"


def test_a_task_srun_killed_after_another_failed_is_not_the_reason(tmp_path):
    log = tmp_path / "1_0_log.out"
    log.write_text("torch.distributed.DistNetworkError: address already in use\n"
                   "srun: error: node1: task 0: Exited with exit code 1\n"
                   "srun: launch/slurm: _step_signal: Terminating StepId=1.0\n"
                   "srun: error: node2: task 1: Killed\n")
    assert error_line(None, str(log)) == "torch.distributed.DistNetworkError: address already in use"
