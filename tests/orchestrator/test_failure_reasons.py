"""The one-line reason of a failed local / torchrun job (found by the fault suite, tests/faults:
a killed rank was reported as "exit status -9" or as the other rank's lost connection, and a
torchrun job as a bare "ChildFailedError:")."""

from __future__ import annotations

from orchestrator.launchers.local.reasons import failure_reason

TORCHRUN = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : -15 (pid: 5475)  (SIGTERM)
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_00:44:00
  rank      : 0 (local_rank: 0)
  exitcode  : -9 (pid: 5474)  (SIGKILL)
  traceback : Signal 9 (SIGKILL) received by PID 5474
"""


def test_a_process_killed_by_a_signal_is_the_reason():
    assert failure_reason("[rank1]: RuntimeError: Connection closed by peer", -9, (1, 42)) == \
        "process 1 of the job (pid 42) was killed by SIGKILL (kill -9, or the out-of-memory killer)"
    assert failure_reason("", -15, (0, 7)) == "process 0 of the job (pid 7) was killed by SIGTERM"


def test_torchrun_root_cause():
    assert failure_reason(TORCHRUN, 1) == "rank 0 (pid 5474) was killed by SIGKILL (kill -9, or the out-of-memory killer)"


def test_orch_reason_before_the_tracebacks_of_other_ranks():
    log = ("[rank0]: orch worker: error: no space left on device writing /w/iter_8.pth: free space in /w\n"
           "[rank1]: RuntimeError: [gloo/pair.cc:561] Connection closed by peer [127.0.0.1]:60598\n")
    assert failure_reason(log, 1).endswith("orch worker: error: no space left on device writing /w/iter_8.pth: free space in /w")
    assert failure_reason("[rank0]: ValueError: bad\n", 1) == "[rank0]: ValueError: bad"
    assert failure_reason("nothing useful\n", 3) == "exit status 3"
