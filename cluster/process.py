"""Processes of this node: start one detached, signal and stop a whole process group.
Standard library and psutil (process facts) only."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Mapping, Optional, Sequence

import psutil

from cluster.errors import ClusterError
from cluster.lease import owner_identity


def start_detached(argv: Sequence[str], log_file: str, env: Optional[Mapping[str, str]] = None,
                   cwd: Optional[str] = None) -> dict:
    """Start ``argv`` in its own session (it outlives the shell and Ctrl-C of the caller), output
    appended to ``log_file``. Returns ``{"pid", "start"}`` (its identity, see
    :func:`cluster.lease.owner_identity`); its process group id is its pid."""
    with open(log_file, "ab") as out:
        process = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, close_fds=True, env=dict(env or os.environ),
                                   cwd=cwd or os.getcwd())
    return owner_identity(process.pid)


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when the group is gone (or not ours)."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which hold nothing, do not
    count; ``killpg(pgid, 0)`` would count them until their parent reaps them)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() not in _GONE:
                return True
        except (OSError, psutil.Error):
            continue  # ended while we looked
    return False


_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def stop_group(pgid: int, grace_s: float = 10.0, poll_s: float = 0.1) -> bool:
    """SIGTERM process group ``pgid``; SIGKILL what is left after ``grace_s``. Returns True when
    the group was gone within the grace period (or already), False when it had to be killed.
    ClusterError when the group belongs to someone else."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    except PermissionError:
        raise ClusterError(f"no permission to signal process group {pgid}; was it started by another user?") from None
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(poll_s)
    signal_group(pgid, signal.SIGKILL)
    return False
