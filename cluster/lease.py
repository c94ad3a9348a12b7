"""Building blocks of node-local leases shared by independent orch processes (ports, GPUs).

A lease is a small JSON file in a per-user runtime folder naming its owner by pid *and* process
start time, so that a lease whose owner died (even if the pid was reused since) is reclaimed by
the next process that looks. Changes happen under an ``flock`` on one lock file per folder,
which the kernel drops when the holder dies, so a crash never leaves the folder locked.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path
from stat import S_IMODE, S_ISDIR
from typing import Any, Iterator, Mapping, Optional

from cluster.errors import ClusterError
from cluster.files import file_lock


def runtime_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    """Per-user folder for leases, the first that fits of:

    - ``$ORCH_RUNTIME_DIR`` (created when missing): an explicit choice wins, and must be usable;
    - ``$XDG_RUNTIME_DIR/orch``, only when ``$XDG_RUNTIME_DIR`` is a folder of ours that we can
      write: sbatch exports the login node's value, which a compute node may not have;
    - ``/tmp/orch-<uid>`` (the system temp folder): created with mode 0700, or, when it already
      exists, accepted only as a real folder (not a symlink) owned by us, its mode tightened to
      0700, so that another user can neither read our leases nor block them.
    """
    env = os.environ if environ is None else environ
    if env.get("ORCH_RUNTIME_DIR"):
        path = Path(env["ORCH_RUNTIME_DIR"])
        _make_dir(path, parents=True)
        if not (path.is_dir() and os.access(path, os.W_OK | os.X_OK)):
            raise ClusterError(f"ORCH_RUNTIME_DIR={path} is not a folder this user can write; set ORCH_RUNTIME_DIR "
                               "to one that is (or unset it)")
        return path
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and _ours(Path(xdg)) and os.access(xdg, os.W_OK | os.X_OK):
        path = Path(xdg) / "orch"
        _make_dir(path)
        return private_dir(path)
    path = Path(tempfile.gettempdir()) / f"orch-{os.getuid()}"
    _make_dir(path)
    return private_dir(path)


def _ours(path: Path) -> bool:
    """Whether ``path`` is a real folder (a symlink is not followed) owned by this user."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def _make_dir(path: Path, parents: bool = False) -> None:
    try:
        path.mkdir(mode=0o700, parents=parents, exist_ok=True)
    except FileExistsError:
        pass  # a symlink or a file of that name: the caller's check says what is wrong
    except OSError as err:
        raise ClusterError(f"cannot create the orch runtime folder {path}: {err}; set ORCH_RUNTIME_DIR "
                           "to a folder of yours") from None


def private_dir(path: Path) -> Path:
    """``path`` if it is a real folder owned by this user (its mode tightened to 0700), else a
    one-line :class:`ClusterError` naming it: a folder in a shared place like /tmp may have been
    made (or linked elsewhere) by another user to read or block our leases."""
    if not _ours(path):
        raise ClusterError(f"the orch runtime folder {path} is not a folder owned by this user (a symlink, a file, "
                           "or another user's); remove it or set ORCH_RUNTIME_DIR to a folder of yours")
    if S_IMODE(os.lstat(path).st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def lease_dir(kind: str, environ: Optional[Mapping[str, str]] = None) -> Path:
    """``<runtime>/<kind>/<hostname>``: the host is part of the path because a pid can only be
    checked on its own host (the runtime folder may be on a shared file system)."""
    path = runtime_dir(environ) / kind / socket.gethostname()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def process_start_time(pid: int) -> Optional[str]:
    """Start time of ``pid`` in clock ticks since boot (on Linux ``/proc/<pid>/stat`` field 22, the
    form leases and job records have always stored), or None when the process does not exist."""
    import psutil  # here, not at the top: `orch status` imports this module and rarely needs it

    try:
        return _ticks(psutil.Process(pid))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _ticks(process) -> str:
    import psutil

    # psutil gives boot time + ticks / CLK_TCK, with the boot time a whole second: exact back to ticks.
    return str(round((process.create_time() - psutil.boot_time()) * _CLOCK_TICKS))


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def owner_identity(pid: Optional[int] = None) -> dict[str, Any]:
    """``{"pid", "start"}`` of ``pid`` (default: this process), written into every lease."""
    if pid is None or pid == os.getpid():  # read once (a submission of 1000 jobs asks 2000 times)
        return {"pid": os.getpid(), "start": _own_start()}
    return {"pid": pid, "start": process_start_time(pid)}


def is_alive(pid: int, start: Optional[str] = None) -> bool:
    """Whether the process that wrote ``{"pid": pid, "start": start}`` still runs. A zombie
    counts as dead (it holds nothing), and so does a live process with another start time
    (the pid was reused)."""
    if pid == os.getpid():  # our own leases and tickets: the common case in a supervisor
        return start is None or start == _own_start()
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
        return start is None or _ticks(process) == start
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # exists, and this system does not let us look closer


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
    with file_lock(folder / ".lock"):
        yield
