"""How far a journal has been shipped to one destination: ``<journal>/cursors/<sha>.json``.

A cursor names the destination (its normalised URI), the MLflow run there and the position in
``events.jsonl`` up to which everything has been written there: a byte offset of a line start
plus the number of items of that line already sent (a metrics line may hold more values than
one ``log_batch`` takes). It is saved atomically after every batch. Saving it after the send is
enough for exactly-once results: a batch sent again after a crash writes MLflow rows identical
to those already there, and MLflow's stores keep one row per identity (see ``shipper``).

``cursor_lock`` serialises shippers of one journal to one destination (a k-fold child ships its
parent first, while the parent's own shipper may be running).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional

from cluster.files import file_lock, read_json, write_json_atomic

log = logging.getLogger(__name__)
CURSORS = "cursors"


def normalize_uri(uri: str) -> str:
    """One spelling per destination: SQLite paths made absolute, no trailing slash on URLs."""
    uri = uri.strip()
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return uri


@dataclass(frozen=True)
class Cursor:
    """Progress of one journal at one destination (see the module docstring)."""

    uri: str
    run_id: Optional[str] = None
    experiment_id: Optional[str] = None
    offset: int = 0  # byte offset of the first line not completely shipped
    item: int = 0  # items of that line already shipped
    status: Optional[str] = None  # the last run status shipped

    def moved(self, offset: int, item: int = 0, **changes: object) -> "Cursor":
        """This cursor at another position (and other fields changed)."""
        return dataclasses.replace(self, offset=offset, item=item, **changes)


def cursor_path(journal_dir: str, uri: str) -> str:
    """``<journal>/cursors/<first 16 hex of sha256(normalised uri)>.json``."""
    digest = hashlib.sha256(normalize_uri(uri).encode()).hexdigest()[:16]
    return os.path.join(journal_dir, CURSORS, f"{digest}.json")


def _cursors_folder(path: str) -> None:
    """Make the ``cursors`` folder of ``path``'s journal, never the journal folder itself: a journal
    deleted while a shipper is at it stays deleted (FileNotFoundError, and the shipper drops it)
    instead of coming back as an empty ``journal/cursors`` tree."""
    try:
        os.mkdir(os.path.dirname(path))
    except FileExistsError:
        pass


def load_cursor(journal_dir: str, uri: str) -> Cursor:
    """The saved cursor for ``uri``, or a fresh one (nothing shipped, no run yet)."""
    uri = normalize_uri(uri)
    data = read_json(cursor_path(journal_dir, uri))
    if not data or data.get("uri") != uri:
        return Cursor(uri)
    fields = {f.name for f in dataclasses.fields(Cursor)}
    return Cursor(**{k: v for k, v in data.items() if k in fields})


def save_cursor(journal_dir: str, cursor: Cursor) -> None:
    """Write the cursor atomically (readers see the old one or the new one)."""
    path = cursor_path(journal_dir, cursor.uri)
    _cursors_folder(path)
    write_json_atomic(path, dataclasses.asdict(cursor))


def shipped_run_id(journal_dir: str, uri: str) -> Optional[str]:
    """The MLflow run id of this journal at ``uri`` once a shipper has created or found it
    (for ``orch status``), else None."""
    return load_cursor(journal_dir, uri).run_id


@contextlib.contextmanager
def cursor_lock(journal_dir: str, uri: str) -> Iterator[None]:
    """Hold an exclusive lock on this journal's cursor for ``uri`` (blocks while another
    shipper holds it). Where the file system refuses locks, goes on unlocked with a warning."""
    path = cursor_path(journal_dir, uri)[: -len(".json")] + ".lock"
    _cursors_folder(path)
    with file_lock(path, mode=0o644, required=False) as held:
        if not held:  # e.g. ENOLCK on a network file system without lockd
            log.warning("shipper: no lock on %s; do not run two shippers of this journal at once", path)
        yield


__all__ = ["Cursor", "cursor_lock", "cursor_path", "load_cursor", "normalize_uri", "save_cursor", "shipped_run_id"]
