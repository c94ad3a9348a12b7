"""``python -m cluster.pdeath PARENT_PID [--signal NAME] -- COMMAND...``: run COMMAND so that it
dies with PARENT.

The local supervisor starts every process of a job through this: Linux's parent-death signal
(``prctl(PR_SET_PDEATHSIG, SIGKILL)``) is set, then COMMAND replaces this process (``exec``: no
extra process; the setting survives the exec). If the supervisor is killed (kill -9, OOM), the
job's processes die with it instead of running on after their device and port leases were
freed for the next job. Processes that COMMAND starts (torchrun's workers) are covered by
``orchestrator.worker``, which sets the same signal on itself. ``--signal TERM`` sends SIGTERM
instead, for a COMMAND that must tear down what it started itself (``ray start --block``: a
private Ray head dies with the Ray driver that started it). Standard library only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits. With
    ``parent_pid``, exit at once if the parent is already gone (it may have died before the
    request). False where the call is not available (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(137)  # the parent died between our fork and the prctl: it will never signal us
    return True


def main(argv: list[str]) -> None:
    """Set the parent-death signal, then exec the command (never returns)."""
    sig = signal.SIGKILL
    if len(argv) >= 3 and argv[1] == "--signal":
        try:
            sig = signal.Signals[f"SIG{argv[2].upper().removeprefix('SIG')}"]
        except KeyError:
            print(f"cluster.pdeath: unknown signal {argv[2]!r}", file=sys.stderr)
            sys.exit(2)
        argv = [argv[0], *argv[3:]]
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m cluster.pdeath PARENT_PID [--signal NAME] -- COMMAND...", file=sys.stderr)
        sys.exit(2)
    die_with_parent(int(argv[0]), sig)
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
