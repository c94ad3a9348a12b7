"""This host's shipper: one process that ships every journal registered in its registry folder
(:mod:`.registry`), started by the first job that needs it, gone once nothing is left.

``python -m orchestrator.tracking.shipper --host REGISTRY_DIR --lock-fd FD`` (started by
:func:`registry.ensure_shipper`, which hands it the locked ``shipper.lock``). Every ``POLL_S``
seconds it looks at each entry and ships what is new (:func:`shipper.ship`: ``log_batch`` calls,
exactly once, parents first); a journal with nothing new costs a ``stat`` and a cursor read.
An entry is removed when:

- its journal is shipped up to its final status (FINISHED, FAILED, KILLED), unless a live owner
  registered it after that status was written (a requeued run resumes after its KILLED);
- its journal folder is gone (deleted), or never appeared and its owner has ended;
- its owner (the training or driver process) has ended, everything is shipped, and no final
  status came within ``OWNER_GRACE_S`` (orch writes one as it records a job's end; ``orch
  sync`` ships a later one);
- its owner has ended and its tracking server has not answered for ``LINGER_S`` (default one
  hour, ``$ORCH_SHIPPER_LINGER_S``): the journal keeps everything, and ``orch sync DIR`` (or the
  next ``orch status`` of the job) ships it once the server is back. While owners run, their
  entries stay, however long the server is down.

The process exits when no entry is left (decided under ``start.lock``, so a job registering at
that moment either is seen or starts a new shipper) or when its registry folder is deleted.
While the server's port is closed no MLflow call is made: a plain connect probes it each pass.
Each tracking URI is served by a thread of its own, so a store that stalls (a server that died
in the middle of a call: MLflow's HTTP retries last minutes) holds up only its own journals.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from detection.journal import EVENTS, META, TERMINAL, is_journal, read_meta
from orchestrator.tracking import registry
from orchestrator.tracking.cursor import load_cursor

log = logging.getLogger("orchestrator.tracking.host_shipper")

POLL_S = 2.0
OWNER_GRACE_S = 30.0
LINGER_S = 3600.0
MAX_BACKOFF_S = 60.0


def linger_s() -> float:
    """How long an ended job's entry waits for a server that does not answer."""
    try:
        return float(os.environ.get("ORCH_SHIPPER_LINGER_S") or LINGER_S)
    except ValueError:
        return LINGER_S


@dataclass
class _Watch:
    """What the shipper remembers of one entry between passes."""

    seen: bool = False  # the journal was there once
    owner_gone: Optional[float] = None  # monotonic time the owner was first seen ended
    down_since: Optional[float] = None  # the destination has not answered since
    retry_at: float = 0.0  # after an error: not before
    backoff: float = POLL_S
    last_error: str = ""


@dataclass
class HostShipper:
    """The loop (see the module docstring); ``pass_once`` is one look at every entry."""

    folder: Path
    poll_s: float = POLL_S
    grace_s: float = OWNER_GRACE_S
    linger: float = field(default_factory=linger_s)
    watches: dict[str, _Watch] = field(default_factory=dict)
    metas: dict[str, dict] = field(default_factory=dict)
    shipped: int = 0  # journals shipped to their final status
    stopping: bool = False
    _busy: dict[str, threading.Thread] = field(default_factory=dict)  # URI -> its pass's thread
    _lock: threading.Lock = field(default_factory=threading.Lock)  # metas, shipped

    def run(self, lock_fd: int) -> int:
        log.info("host shipper %d: following the journals registered in %s", os.getpid(), self.folder)
        while True:
            if not self.folder.is_dir():
                log.info("host shipper: %s is gone; exiting", self.folder)
                return 0
            self.pass_once()
            if self.stopping or not (registry.entries(self.folder) or self.busy()):
                if self.stopping or registry.release(lock_fd, self.folder):
                    usage = resource.getrusage(resource.RUSAGE_SELF)
                    log.info("host shipper: %s (%d journal(s) shipped, %.2f CPU-s); exiting",
                             "stopped" if self.stopping else "nothing left to ship", self.shipped,
                             usage.ru_utime + usage.ru_stime)
                    return 0
            deadline = time.monotonic() + self.poll_s
            while time.monotonic() < deadline and not self.stopping:
                time.sleep(min(0.2, self.poll_s))

    def pass_once(self, wait_s: Optional[float] = None) -> None:
        """Look at every entry: one thread per tracking URI, so that a store that stalls (a
        server that died mid-call sits in MLflow's HTTP retries for minutes) holds up only its
        own journals; a URI whose thread of an earlier pass still runs is skipped. Waits up to
        ``wait_s`` (default: the poll interval) for this pass's threads."""
        current = registry.entries(self.folder)
        with self._lock:
            index = self._index(current)
        groups: dict[str, list[registry.Entry]] = {}
        for entry in current:
            groups.setdefault(entry.uri, []).append(entry)
        started = []
        for uri, group in groups.items():
            if uri in self._busy and self._busy[uri].is_alive():
                continue
            thread = threading.Thread(target=self._pass_uri, args=(uri, group, index), name=f"ship {uri}", daemon=True)
            self._busy[uri] = thread
            thread.start()
            started.append(thread)
        deadline = time.monotonic() + (self.poll_s if wait_s is None else wait_s)
        for thread in started:
            thread.join(max(0.0, deadline - time.monotonic()))

    def busy(self) -> bool:
        """Whether a pass's thread still works."""
        return any(thread.is_alive() for thread in self._busy.values())

    def _pass_uri(self, uri: str, group: list[registry.Entry], index: dict[str, str]) -> None:
        from orchestrator.tracking.runs import reachable

        try:
            up = reachable(uri)
            for entry in group:
                if self.stopping:
                    return
                self._look_at(entry, up, index)
        except Exception:  # noqa: BLE001 - a bug here must not end the host's shipping silently
            log.exception("host shipper: pass over %s failed", uri)

    def _look_at(self, entry: registry.Entry, up: bool, index: dict[str, str]) -> None:
        watch = self.watches.setdefault(entry.path, _Watch())
        now = time.monotonic()
        if not entry.owner_alive():
            watch.owner_gone = watch.owner_gone or now
        if not self._is_journal(entry.journal):  # deleted, or not written yet (training makes it)
            if watch.seen or watch.owner_gone is not None:
                self._drop(entry, "its folder is gone" if watch.seen else "no journal there and its job has ended")
            return
        watch.seen = True
        if not up:
            if watch.down_since is None:
                watch.down_since = now
                log.warning("host shipper: %s does not answer; %s waits in its journal", entry.uri, entry.journal)
            gone_for = now - max(watch.owner_gone or now, watch.down_since)
            if watch.owner_gone is not None and gone_for >= self.linger:
                self._drop(entry, f"{entry.uri} did not answer for {self.linger:.0f} s after the job ended; "
                                  f"`orch sync {os.path.dirname(entry.journal)}` ships it")
            return
        watch.down_since = None
        if now >= watch.retry_at:
            self._ship(entry, watch, index)

    def _ship(self, entry: registry.Entry, watch: _Watch, index: dict[str, str]) -> None:
        from orchestrator.tracking.replay import ShipPending
        from orchestrator.tracking.shipper import _one_line, ship

        cursor = load_cursor(entry.journal, entry.uri)
        try:
            size = os.path.getsize(os.path.join(entry.journal, EVENTS))
        except FileNotFoundError:
            size = 0
        if cursor.run_id and cursor.offset >= size and not cursor.item:  # nothing new
            if cursor.status in TERMINAL:
                if not _written_on(entry):  # else a requeued run: followed until it writes on or ends
                    self._done(entry, cursor.run_id, cursor.status)
            elif watch.owner_gone is not None and time.monotonic() - watch.owner_gone >= self.grace_s:
                self._drop(entry, f"its job ended without a final status (run {cursor.status or 'open'}); "
                                  f"`orch sync {os.path.dirname(entry.journal)}` ships a later one")
            return
        try:
            result = ship(entry.journal, entry.uri, journals=index)
        except ShipPending as err:
            self._retry(watch, str(err))
            return
        except Exception as err:  # noqa: BLE001 - the journal keeps everything: try again later
            self._retry(watch, _one_line(err))
            return
        watch.backoff, watch.last_error = self.poll_s, ""
        for warning in result.warnings:
            log.warning("host shipper: %s: %s", entry.journal, warning)
        if result.done and not _written_on(entry):
            self._done(entry, result.run_id, result.status)

    def _retry(self, watch: _Watch, error: str) -> None:
        if error != watch.last_error:
            log.warning("host shipper: %s; retrying in %.0f s", error, watch.backoff)
        watch.last_error = error
        watch.retry_at = time.monotonic() + watch.backoff
        watch.backoff = min(watch.backoff * 2, MAX_BACKOFF_S)

    def _done(self, entry: registry.Entry, run_id: Optional[str], status: Optional[str]) -> None:
        with self._lock:
            self.shipped += 1
        log.info("host shipper: %s -> %s run %s %s", entry.journal, entry.uri, run_id, status)
        self._forget(entry)

    def _drop(self, entry: registry.Entry, why: str) -> None:
        log.warning("host shipper: %s no longer followed: %s", entry.journal, why)
        self._forget(entry)

    def _forget(self, entry: registry.Entry) -> None:
        registry.drop(entry)
        self.watches.pop(entry.path, None)
        with self._lock:
            self.metas.pop(entry.journal, None)

    def _is_journal(self, folder: str) -> bool:
        """Whether ``folder`` holds a journal (a ``stat`` once its ``meta.json`` was read)."""
        if folder in self.metas:
            return os.path.exists(os.path.join(folder, META))
        return is_journal(folder)

    def _index(self, current: list[registry.Entry]) -> dict[str, str]:
        """journal id -> folder of the registered journals (``meta.json`` never changes)."""
        for entry in current:
            if entry.journal not in self.metas and os.path.exists(os.path.join(entry.journal, META)):
                try:
                    self.metas[entry.journal] = read_meta(entry.journal)
                except FileNotFoundError:
                    continue
        return {meta["journal_id"]: folder for folder, meta in self.metas.items()}


def _written_on(entry: registry.Entry) -> bool:
    """Whether a live owner registered the journal after its last line was written, which ends
    with a final status: a requeued or restarted run (Slurm requeues a preempted job: it tags
    the run with its restart, registers, and resumes into the same journal after its KILLED).
    Its entry stays until it writes on or its owner ends."""
    if not entry.owner_alive():
        return False
    try:
        written_ns = os.stat(os.path.join(entry.journal, EVENTS)).st_mtime_ns
    except OSError:
        return False
    return entry.registered_ms * 1_000_000 > written_ns


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.tracking.shipper --host",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("registry", help="the registry folder ($ORCH_HOME/shipping/<host>)")
    parser.add_argument("--lock-fd", type=int, required=True, help="descriptor of the locked shipper.lock")
    parser.add_argument("--poll", type=float, default=POLL_S, help="seconds between passes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from orchestrator.tracking.store import quiet_store_logs

    quiet_store_logs()
    shipper = HostShipper(Path(args.registry), poll_s=args.poll)

    def stop(*_: object) -> None:
        shipper.stopping = True  # the journal being shipped is finished first; the rest stay registered

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return shipper.run(args.lock_fd)


__all__ = ["HostShipper", "LINGER_S", "OWNER_GRACE_S", "POLL_S", "linger_s", "main"]
