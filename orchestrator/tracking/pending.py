"""What waits to be shipped to MLflow, for ``orch status``: every journal registered with a
host's shipper (:mod:`.registry`) and not yet shipped to its final status, with how far it is.

Reads files only (registry entries, cursors, journal sizes): no MLflow import, no network. On a
shared ``ORCH_HOME`` it lists every host's registry; whether a shipper serves it is known for
this host's only (another host's lock cannot be probed from here).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional

from detection.journal import EVENTS, TERMINAL
from orchestrator.tracking import registry
from orchestrator.tracking.cursor import load_cursor


@dataclass(frozen=True)
class PendingShipment:
    """One journal waiting for a shipper. ``shipper_pid``: the shipper serving it now (None:
    none runs; -1: unknown, another host's); ``shipped_bytes`` of ``size_bytes`` of its events
    are at ``uri``; ``status``: the last run status shipped; ``job_running``: its owner (training
    or driver process) still runs."""

    journal: str
    uri: str
    host: str
    shipper_pid: Optional[int]
    job_running: Optional[bool]  # None: another host's (its processes are not visible here)
    run_id: Optional[str]
    status: Optional[str]
    shipped_bytes: int
    size_bytes: int

    @property
    def output_dir(self) -> str:
        """The job's output folder (what ``orch sync`` takes)."""
        return os.path.dirname(self.journal)

    def describe(self) -> str:
        """One line: ``<folder> -> <uri>: 12 of 40 kB shipped (RUNNING), shipper 1234``."""
        shipper = {None: "no shipper running: `orch sync " + self.output_dir + "`", -1: f"shipper on {self.host}"}.get(
            self.shipper_pid, f"shipper {self.shipper_pid}")
        return (f"{self.output_dir} -> {self.uri}: {self.shipped_bytes // 1024} of {self.size_bytes // 1024} kB "
                f"shipped ({self.status or 'no run yet'}), {shipper}")


def pending_shipments() -> list[PendingShipment]:
    """Every registered journal not yet shipped to its final status, oldest first."""
    here = socket.gethostname()
    found = []
    for folder in registry.hosts():
        host = folder.name
        shipper = registry.shipper_alive(folder) if host == here else -1
        for entry in registry.entries(folder):
            try:
                size = os.path.getsize(os.path.join(entry.journal, EVENTS))
            except FileNotFoundError:
                size = 0
            cursor = load_cursor(entry.journal, entry.uri)
            if cursor.status in TERMINAL and cursor.offset >= size:
                continue  # done: the shipper removes the entry on its next pass
            found.append(PendingShipment(entry.journal, entry.uri, host, shipper,
                                         entry.owner_alive() if host == here else None,
                                         cursor.run_id, cursor.status, min(cursor.offset, size), size))
    return found


__all__ = ["PendingShipment", "pending_shipments"]
