"""Shipping beside a driver process (a sweep's, a k-fold set's): one thread syncs every journal
under a folder every few seconds while the driver works; at the end a last pass (when the
server answers) and whatever is not fully shipped is handed to this host's shipper
(:mod:`.host_shipper`), which keeps trying after the driver has exited (``orch sync`` does the
same by hand)."""

from __future__ import annotations

import logging
import threading
from typing import Optional

log = logging.getLogger(__name__)

POLL_S = 5.0


class FolderShipper:
    """``with FolderShipper(root, uri):`` ships the journals under ``root`` to ``uri`` in a
    background thread (a no-op when not ``enabled``)."""

    def __init__(self, root: str, uri: Optional[str], enabled: bool = True, poll_s: float = POLL_S) -> None:
        self.root, self.uri, self.enabled, self.poll_s = root, uri, enabled and bool(uri), poll_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()  # one pass at a time
        self.last = None  # the last SyncSummary

    def __enter__(self) -> "FolderShipper":
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, name="orch-shipper", daemon=True)
            self._thread.start()
        return self

    def pass_now(self) -> None:
        """Ship what is there now (waits for a pass in progress)."""
        if not self.enabled:
            return
        from orchestrator.tracking.runs import reachable
        from orchestrator.tracking.sync import sync

        if not reachable(self.uri):
            return
        with self._lock:
            try:
                self.last = sync([self.root], self.uri)
            except Exception as err:  # noqa: BLE001 - the journals keep everything; retried later
                log.warning("shipping %s to %s: %s", self.root, self.uri, err)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.pass_now()

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.pass_now()
        from orchestrator.tracking.runs import start_shipper
        from orchestrator.tracking.sync import find_journals

        done = {o.journal_dir for o in (self.last.outcomes if self.last else ()) if o.done}
        for folder in find_journals([self.root]):
            if folder not in done:
                start_shipper(folder, self.uri)
