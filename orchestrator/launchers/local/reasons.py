"""Why a job of the local supervisor failed, in one line (the record's ``error``, what ``orch
status JOB`` shows), from its exit status and the tail of its log.

In order: a process of the job killed by a signal (that is the cause, whatever the other ranks
printed as they lost their peer: a gloo "connection closed"); torchrun's own root cause when
it names a rank killed by a signal; orch's own one-line reason (``orch worker: error: ...``),
which the other ranks' tracebacks that follow it only echo; the last line that looks like an
error; the exit status.
"""

from __future__ import annotations

import re
import signal
from typing import Optional

# torch.distributed prefixes every line of an uncaught traceback with "[rank<N>]: ".
ERROR_LINE = re.compile(r"^(\[rank\d+\]:\s*)?(\w+\.)*\w*(Error|Exception|Interrupt)\b|orch( worker)?: error:|^Killed")
ORCH_ERROR = re.compile(r"orch( worker)?: error:")
# torchrun's failure summary: "Root Cause (first observed failure):" then "rank : R (local_rank: L)"
# and "exitcode : -9 (pid: P)".
TORCHRUN_ROOT = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)",
                           re.S)


def killed(who: str, signum: int) -> str:
    """``<who> was killed by SIGKILL (kill -9, or the out-of-memory killer)``."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    hint = " (kill -9, or the out-of-memory killer)" if signum == signal.SIGKILL else ""
    return f"{who} was killed by {name}{hint}"


def error_line(lines: list[str]) -> Optional[str]:
    """orch's last one-line reason in ``lines``, else the last line that looks like an error."""
    found = [line.strip() for line in lines if ERROR_LINE.search(line.strip())]
    picked = [line for line in found if ORCH_ERROR.search(line)] or found
    return picked[-1][:500] if picked else None


def failure_reason(log_tail: str, code: int, first: Optional[tuple[int, int]] = None) -> str:
    """The reason a job ended with exit status ``code``; ``first`` is ``(index, pid)`` of the job's
    process that failed first (its exit status is ``code``)."""
    if code < 0:
        index, pid = first or (0, 0)
        return killed(f"process {index} of the job (pid {pid})", -code)
    roots = TORCHRUN_ROOT.findall(log_tail)
    if roots and int(roots[-1][1]) < 0:
        rank, exit_code, pid = roots[-1]
        return killed(f"rank {rank} (pid {pid})", -int(exit_code))
    return error_line(log_tail.splitlines()) or f"exit status {code}"
