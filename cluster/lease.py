"""Building blocks of node-local leases shared by independent orch processes (ports, GPUs).

A lease is a small JSON file in a per-user runtime folder naming its owner by pid *and* process
start time, so that a lease whose owner died (even if the pid was reused since) is reclaimed by
the next process that looks. Changes happen under an ``flock`` on one lock file per folder,
which the kernel drops when the holder dies, so a crash never leaves the folder locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from cluster.errors import ClusterError


def runtime_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    """Per-user folder for leases: ``$ORCH_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/orch``, else
    ``/tmp/orch-<uid>`` (created with mode 0700)."""
    env = os.environ if environ is None else environ
    if env.get("ORCH_RUNTIME_DIR"):
        path = Path(env["ORCH_RUNTIME_DIR"])
    elif env.get("XDG_RUNTIME_DIR"):
        path = Path(env["XDG_RUNTIME_DIR"]) / "orch"
    else:
        path = Path(tempfile.gettempdir()) / f"orch-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise ClusterError(f"cannot create the orch runtime folder {path}: {err}; set ORCH_RUNTIME_DIR") from None
    return path


def lease_dir(kind: str, environ: Optional[Mapping[str, str]] = None) -> Path:
    """``<runtime>/<kind>/<hostname>``: the host is part of the path because a pid can only be
    checked on its own host (the runtime folder may be on a shared file system)."""
    path = runtime_dir(environ) / kind / socket.gethostname()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def process_start_time(pid: int) -> Optional[str]:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None
    when the process does not exist or /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and ')', so split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19]


def owner_identity(pid: Optional[int] = None) -> dict[str, Any]:
    """``{"pid", "start"}`` of ``pid`` (default: this process), written into every lease."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": process_start_time(pid)}


def is_alive(pid: int, start: Optional[str] = None) -> bool:
    """Whether the process that wrote ``{"pid": pid, "start": start}`` still runs. A zombie
    counts as dead (it holds nothing), and so does a live process with another start time
    (the pid was reused)."""
    if pid == os.getpid():  # our own leases and tickets: the common case in a supervisor
        return start is None or start == _own_start()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): the kill(0) answer is all we have
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return False
    return start is None or fields[19] == start


_OWN: dict[int, Optional[str]] = {}


def _own_start() -> Optional[str]:
    """This process's start time, read once per pid (a forked child has a new pid)."""
    pid = os.getpid()
    if pid not in _OWN:
        _OWN[pid] = process_start_time(pid)
    return _OWN[pid]


def owner_alive(record: Mapping[str, Any]) -> bool:
    """``is_alive`` of a lease record's owner."""
    return is_alive(int(record["pid"]), record.get("start"))


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` (``folder/.lock``) for the block."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock
