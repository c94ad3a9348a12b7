"""The journals this host's shipper follows: ``$ORCH_HOME/shipping/<host>/``.

One shipper process per host (per ``ORCH_HOME``) ships every journal registered here, so a
sweep or a 1000-trial set costs one MLflow import and one process, not one per trial::

    journals/<key>.json   one per (journal folder, tracking URI): {"journal", "uri", "owner":
                          {"pid", "start"} | null, "registered_ms"}; the shipper removes it once
                          the journal is shipped, its folder is gone, or it gave up (see
                          ``host_shipper``)
    shipper.lock          held (flock) by the live shipper for its whole life: it dies with it
    start.lock            serialises "register, then start a shipper unless one holds
                          shipper.lock" with the shipper's "nothing left: exit", so that a
                          journal registered while the shipper exits is never left alone
    shipper.json          {"pid", "start"} of the shipper now running (for ``orch status``)
    shipper.log           what the shipper did

The starting process takes ``shipper.lock`` itself and hands the locked file to the shipper it
starts (an inherited descriptor shares the lock), so two jobs starting at once cannot both start
one. A Slurm allocation ends every process it started, its shipper too: a training process still
running on the host starts it again within 30 s (``keep_shipper``); entries of ended jobs are
picked up by the next ``orch status`` on the login node (``runs.ensure_shipping``) or ``orch sync``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from cluster.files import LOCKS_REFUSED, file_lock, lock_fd, read_json, write_json_atomic
from cluster.lease import is_alive, owner_identity

log = logging.getLogger(__name__)

SHIPPING = "shipping"
JOURNALS = "journals"
SHIPPER_LOCK = "shipper.lock"
START_LOCK = "start.lock"
SHIPPER_INFO = "shipper.json"
SHIPPER_LOG = "shipper.log"


@dataclass(frozen=True)
class Entry:
    """One journal to ship to one tracking URI, registered by ``owner`` (the training or driver
    process whose end means no more lines will come; None: already ended)."""

    path: str  # the entry's own file
    journal: str
    uri: str
    owner_pid: Optional[int] = None
    owner_start: Optional[str] = None
    registered_ms: int = 0

    def owner_alive(self) -> bool:
        return self.owner_pid is not None and is_alive(self.owner_pid, self.owner_start)


def shipping_root() -> Path:
    """``$ORCH_HOME/shipping``: one registry folder per host below it."""
    from orchestrator.home import orch_home

    return orch_home() / SHIPPING


def registry_dir(host: Optional[str] = None) -> Path:
    """This host's registry folder (``host``: another host's, as seen on a shared ``ORCH_HOME``)."""
    return shipping_root() / (host or socket.gethostname())


def _key(journal: str, uri: str) -> str:
    return hashlib.sha256(f"{journal}\0{uri}".encode()).hexdigest()[:20]


def register(journal: str, uri: str, owner_pid: Optional[int] = None, folder: Optional[Path] = None) -> Entry:
    """Add journal folder ``journal`` (it may not exist yet: training creates it) to the shipper's
    list, for ``uri``; ``owner_pid``: the process writing it. Registering again replaces the entry."""
    from orchestrator.tracking.cursor import normalize_uri

    folder = folder or registry_dir()
    journal, uri = os.path.abspath(journal), normalize_uri(uri)
    owner = owner_identity(owner_pid) if owner_pid is not None else None
    if owner is not None and owner.get("start") is None and not is_alive(owner_pid):
        owner = None
    path = folder / JOURNALS / f"{_key(journal, uri)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"journal": journal, "uri": uri, "owner": owner, "registered_ms": int(time.time() * 1000)}
    write_json_atomic(str(path), data)
    return _entry(path, data)


def _entry(path: Path, data: dict) -> Entry:
    owner = data.get("owner") or {}
    return Entry(str(path), data["journal"], data["uri"], owner.get("pid"), owner.get("start"),
                 int(data.get("registered_ms") or 0))


_listed: dict[Path, tuple[int, list[Entry]]] = {}  # folder -> (mtime of journals/, its entries)


def entries(folder: Optional[Path] = None) -> list[Entry]:
    """The registered entries of a registry folder (this host's by default), oldest first. Read
    again only when ``journals/`` changed (every register and drop renames or removes a file in
    it): a shipper following 1000 journals does not reread 1000 files every pass."""
    folder = folder or registry_dir()
    try:
        mtime = os.stat(folder / JOURNALS).st_mtime_ns
    except FileNotFoundError:
        return []
    cached = _listed.get(folder)
    if cached and cached[0] == mtime:
        return list(cached[1])
    listed_at = time.time_ns()
    found = []
    try:
        names = sorted(os.listdir(folder / JOURNALS))
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(".json"):
            continue
        data = read_json(str(folder / JOURNALS / name))
        if data and data.get("journal") and data.get("uri"):
            found.append(_entry(folder / JOURNALS / name, data))
    found.sort(key=lambda e: (e.registered_ms, e.journal))
    # Kept only when listed well after the last change: a change within the file system's
    # timestamp granularity (a few ms) of it could carry the same mtime.
    if listed_at - mtime > 100_000_000:
        _listed[folder] = (mtime, found)
    return list(found)


def drop(entry: Entry) -> None:
    """Remove an entry (the shipper is done with it), unless another owner registered the
    journal again since it was read (a requeued job's new process, while the shipper ends the
    journal's first part)."""
    now = read_json(entry.path) or {}
    if (now.get("owner") or {}).get("pid") not in (None, entry.owner_pid):
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(entry.path)


@contextlib.contextmanager
def start_lock(folder: Path) -> Iterator[None]:
    """Hold ``start.lock`` of a registry folder (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / START_LOCK, mode=0o644, required=False):  # no locks here: go on unserialised
        yield


def _try_shipper_lock(folder: Path) -> Optional[int]:
    """An open descriptor holding ``shipper.lock``, or None when a live shipper holds it."""
    try:
        return lock_fd(folder / SHIPPER_LOCK, blocking=False, mode=0o644)
    except OSError as err:
        if err.errno not in LOCKS_REFUSED:
            raise
    # No flock here (a network file system without lockd): the recorded pid decides.
    info = read_json(str(folder / SHIPPER_INFO)) or {}
    if info.get("pid") and is_alive(info["pid"], info.get("start")):
        return None
    return os.open(folder / SHIPPER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)


def shipper_alive(folder: Optional[Path] = None) -> Optional[int]:
    """The pid of the shipper that now serves a registry folder, else None."""
    folder = folder or registry_dir()
    if not (folder / SHIPPER_LOCK).exists():
        return None
    fd = _try_shipper_lock(folder)
    if fd is not None:
        os.close(fd)
        return None
    info = read_json(str(folder / SHIPPER_INFO)) or {}
    return info.get("pid") or -1


def ensure_shipper(folder: Optional[Path] = None) -> Optional[int]:
    """Start this host's shipper unless one runs; returns the pid started (None: one runs)."""
    folder = folder or registry_dir()
    with start_lock(folder):
        fd = _try_shipper_lock(folder)
        if fd is None:
            return None
        try:
            # Started as `shipper --host`: what looks for shipper processes by name finds it too.
            argv = [sys.executable, "-m", "orchestrator.tracking.shipper", "--host", str(folder), "--lock-fd", str(fd)]
            with open(folder / SHIPPER_LOG, "ab") as out:
                launcher = subprocess.run([sys.executable, "-c", _DETACH, str(out.fileno()), *argv], text=True,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, pass_fds=(fd, out.fileno()),
                                          cwd=str(folder), check=True, timeout=60)
            pid = int(launcher.stdout.split()[-1])
            write_json_atomic(str(folder / SHIPPER_INFO), owner_identity(pid))
        finally:
            os.close(fd)  # the shipper's inherited descriptor keeps the lock
    return pid


# The shipper is started by a launcher that exits at once, so it is no process's direct child:
# Ray kills the direct children of its worker processes when they exit
# (RAY_kill_child_processes_on_worker_exit, on by default), which killed a host shipper started
# by a Ray job's rank 0 while it created MLflow's tables (a SQLite store left half-migrated).
_DETACH = ("import subprocess, sys; log = int(sys.argv[1]); print(subprocess.Popen(sys.argv[2:], "
           "stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=False).pid)")


_keeper: list[threading.Thread] = []


def keep_shipper(interval_s: float = 30.0) -> threading.Thread:
    """A daemon thread of a long-lived owner (a training process) that starts this host's shipper
    again whenever none runs (every ``interval_s``: one lock attempt): a shipper started inside a
    Slurm allocation ends with it, while jobs of other allocations on the host still write. One
    per process (Ray reuses its worker processes for many trainings)."""
    if _keeper and _keeper[0].is_alive():
        return _keeper[0]

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            folder = registry_dir()
            try:
                if folder.is_dir() and entries(folder):  # never recreates a deleted ORCH_HOME
                    ensure_shipper(folder)
            except OSError as err:  # e.g. ORCH_HOME gone: the next try may work
                log.debug("shipper not restarted: %s", err)

    thread = threading.Thread(target=loop, name="orch-keep-shipper", daemon=True)
    thread.start()
    _keeper[:] = [thread]
    return thread


def release(lock_fd: int, folder: Path) -> bool:
    """The shipper's exit: under ``start.lock``, give ``shipper.lock`` up when nothing is
    registered (True: exit now); False when an entry arrived meanwhile (go on)."""
    with start_lock(folder):
        if entries(folder):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / SHIPPER_INFO)
        os.close(lock_fd)  # before start.lock is released: a registrant then sees no shipper
    return True


def hosts() -> list[Path]:
    """Every host's registry folder under ``$ORCH_HOME/shipping``."""
    root = shipping_root()
    try:
        return sorted(p for p in root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


__all__ = ["Entry", "drop", "ensure_shipper", "entries", "hosts", "keep_shipper", "register", "registry_dir", "release",
           "shipper_alive", "shipping_root", "start_lock"]
