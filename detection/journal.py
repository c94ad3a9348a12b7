"""The run journal: what training wants MLflow to record, appended to a local folder first.

Training never talks to a tracking server. Rank 0 appends params, metric values, tags, artifact
references and run status to ``<output_dir>/journal/`` and a separate shipper process
(``orchestrator.tracking.shipper``) replays the journal to one or more tracking URIs, now or
later (``orch sync``). A server that is down, unreachable from a compute node, or slow costs the
training loop nothing, and nothing is lost when a process dies.

Layout of a journal folder::

    meta.json      written once, atomically: {"format": 1, "journal_id": uuid4 hex,
                   "experiment", "run_name", "created_ms", "parent": null | {"journal_id",
                   "path" (absolute), "rel" (relative to this folder)}, "tracking_uri": the
                   store the run is made for (null: not known; ``orch sync`` then uses
                   ``$MLFLOW_TRACKING_URI`` or its ``--uri``)}
    events.jsonl   one JSON object per line, appended (kinds below); "ts" is Unix time in ms
    files/         texts given to ``log_text``, referenced by artifact events
    cursors/       the shippers' progress per destination (written by the shipper only)

Event kinds (key ``"t"``)::

    {"t": "params",   "ts": ms, "params": {key: str}}
    {"t": "tags",     "ts": ms, "tags": {key: str}}
    {"t": "metrics",  "v": [[ts_ms, step, {key: float}], ...]}        one line per flush
    {"t": "artifact", "ts": ms, "path": abs path, "rel": path relative to the journal folder
                      (when under its parent folder) or null, "artifact_path": str | null}
    {"t": "status",   "ts": ms, "status": "RUNNING" | "FINISHED" | "FAILED" | "KILLED"}

A line is only valid once its ending newline is written; readers ignore a line without one (a
write in progress) and a line that does not parse (torn by kill -9). A writer that opens a file
not ending in a newline first writes one, so the torn fragment stays a line of its own and never
spoils the next append. Standard library only: it runs inside training.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any, Mapping, NamedTuple, Optional, Union

from cluster.files import read_json, write_json_atomic, write_text_atomic

FORMAT = 1
META = "meta.json"
EVENTS = "events.jsonl"
FILES = "files"
STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")
TERMINAL = frozenset({"FINISHED", "FAILED", "KILLED"})
JOURNAL_DIR = "journal"  # the journal's folder in a run's output folder


def journal_dir(output_dir: str) -> str:
    """The journal folder of a run whose outputs go to ``output_dir``."""
    return os.path.join(output_dir, JOURNAL_DIR)


# Buffered metric values beyond which log_metrics flushes by itself (bounded memory when a
# caller forgets to flush; the trainer flushes far more often).
AUTO_FLUSH_VALUES = 20_000
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=True)

PathLike = Union[str, "os.PathLike[str]"]


def _now_ms() -> int:
    return int(time.time() * 1000)


def read_meta(folder: PathLike) -> dict[str, Any]:
    """The ``meta.json`` of the journal in ``folder``; FileNotFoundError when there is none."""
    meta = read_json(os.path.join(folder, META))
    if meta is None or "journal_id" not in meta:
        raise FileNotFoundError(f"no run journal in {folder} ({META} missing or unreadable)")
    return meta


def destination(folder: PathLike) -> Optional[str]:
    """The tracking URI the journal's run is made for (None: not recorded)."""
    return read_meta(folder).get("tracking_uri") or None


def is_journal(folder: PathLike) -> bool:
    """True when ``folder`` holds a journal (a readable ``meta.json`` with a journal id)."""
    try:
        read_meta(folder)
    except FileNotFoundError:
        return False
    return True


class Entry(NamedTuple):
    """One complete line of ``events.jsonl``: its byte range and its event (None if unparsable)."""

    start: int
    end: int
    event: Optional[dict[str, Any]]


def read_entries(folder: PathLike, offset: int = 0, max_bytes: Optional[int] = None) -> tuple[list[Entry], int]:
    """Complete lines of ``events.jsonl`` from byte ``offset``, and the offset after the last one.

    A trailing line without its newline is left for a later call. ``max_bytes`` bounds how much
    is read (a longer single line is still returned whole)."""
    path = os.path.join(folder, EVENTS)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return [], offset
    with handle:
        handle.seek(offset)
        data = handle.read() if max_bytes is None else handle.read(max_bytes)
        while max_bytes is not None and data and b"\n" not in data:
            more = handle.read(max_bytes)  # one line longer than max_bytes: read on to its end
            if not more:
                break
            data += more
    entries: list[Entry] = []
    pos = 0
    while True:
        newline = data.find(b"\n", pos)
        if newline < 0:
            break
        raw = data[pos:newline]
        try:
            event = json.loads(raw) if raw.strip() else None
        except ValueError:
            event = None  # torn by a killed writer
        if event is not None and not isinstance(event, dict):
            event = None
        entries.append(Entry(offset + pos, offset + newline + 1, event))
        pos = newline + 1
    return entries, offset + pos


def read_events(folder: PathLike, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The valid events of complete lines from byte ``offset``, and the offset to read from next."""
    entries, new_offset = read_entries(folder, offset)
    return [e.event for e in entries if e.event is not None], new_offset


def last_status(folder: PathLike) -> Optional[str]:
    """The status of the journal's last status event (None when it has none)."""
    status = None
    for event in read_events(folder)[0]:
        if event.get("t") == "status":
            status = event.get("status")
    return status


def last_steps(folder: PathLike) -> dict[str, int]:
    """The highest step of each metric key in the journal (``{}`` when it holds none): what a
    resumed run has logged already."""
    steps: dict[str, int] = {}
    for event in read_events(folder)[0]:
        if event.get("t") == "metrics":
            for _, step, values in event.get("v", ()):
                for key in values:
                    steps[key] = max(step, steps.get(key, step))
    return steps


class Journal:
    """Appends one run's records to a journal folder (see the module docstring).

    Not thread-safe: one writer (rank 0's training thread) per process. Every method but
    ``log_metrics`` writes its line at once; metric values wait in memory for ``flush``.
    """

    def __init__(self, folder: PathLike, meta: dict[str, Any]) -> None:
        """Use :meth:`create` or :meth:`open`."""
        self.folder = os.path.abspath(folder)
        self.meta = meta
        self._pending: list = []  # [ts, step, {key: value}] per log_metrics call
        self._pending_values = 0
        path = os.path.join(self.folder, EVENTS)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # A writer killed mid-line left a fragment: end it, so that it stays a line of its own.
        size = os.fstat(self._fd).st_size
        if size:
            with open(path, "rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    self._write(b"\n")

    @property
    def id(self) -> str:
        """The journal id (uuid4 hex); the shipper tags the MLflow run with it."""
        return self.meta["journal_id"]

    @classmethod
    def create(cls, folder: PathLike, experiment: str, run_name: str, tags: Optional[Mapping[str, Any]] = None,
               parent: Union["Journal", PathLike, None] = None, tracking_uri: Optional[str] = None,
               durable: bool = True) -> "Journal":
        """A new journal in ``folder`` (created if needed; FileExistsError if it holds one).

        ``parent``: the parent run's journal (or its folder) for nested runs (a k-fold set, a
        sweep); the shipper records the child in the parent's MLflow experiment.
        ``tracking_uri``: the store the run is made for (``orch sync`` sends it there).
        ``durable=False``: the caller makes the journal durable itself, with others at once
        (``cluster.files.fsync_paths`` of :meth:`paths_to_sync`)."""
        folder = os.path.abspath(folder)
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(os.path.join(folder, META)):
            raise FileExistsError(f"{folder} already holds a run journal; use Journal.open to append to it")
        parent_ref = None
        if parent is not None:
            parent_dir = parent.folder if isinstance(parent, Journal) else os.path.abspath(parent)
            parent_ref = {"journal_id": read_meta(parent_dir)["journal_id"], "path": parent_dir,
                          "rel": os.path.relpath(parent_dir, folder)}
        meta = {"format": FORMAT, "journal_id": uuid.uuid4().hex, "experiment": str(experiment),
                "run_name": str(run_name), "created_ms": _now_ms(), "parent": parent_ref,
                "tracking_uri": str(tracking_uri) if tracking_uri else None}
        write_json_atomic(os.path.join(folder, META), meta, durable=durable)
        journal = cls(folder, meta)
        if tags:
            journal.set_tags(tags)
        return journal

    @staticmethod
    def paths_to_sync(folder: PathLike) -> list[str]:
        """What makes a journal created with ``durable=False`` durable: its meta file and folder."""
        folder = os.path.abspath(folder)
        return [os.path.join(folder, META), folder]

    @classmethod
    def open(cls, folder: PathLike) -> "Journal":
        """The existing journal in ``folder``, to append to (a resumed or requeued job)."""
        return cls(folder, read_meta(folder))

    # -- records -----------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record params (MLflow keeps the first value of a key; later ones are reported)."""
        self._event({"t": "params", "ts": _now_ms(), "params": {str(k): str(v) for k, v in params.items()}})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Record run tags (the last value of a key wins)."""
        self._event({"t": "tags", "ts": _now_ms(), "tags": {str(k): str(v) for k, v in tags.items()}})

    def log_metrics(self, values: Mapping[str, float], step: int, timestamp_ms: Optional[int] = None) -> None:
        """Buffer metric values of one step in memory (written by the next :meth:`flush`).

        The timestamp is taken now, once: a value replayed twice is the same MLflow row."""
        ts = _now_ms() if timestamp_ms is None else int(timestamp_ms)
        self._pending.append([ts, int(step), {str(k): float(v) for k, v in values.items()}])
        self._pending_values += len(values)
        if self._pending_values >= AUTO_FLUSH_VALUES:
            self.flush()

    def log_artifact(self, path: PathLike, artifact_path: Optional[str] = None) -> None:
        """Record a file (or folder) to upload as an artifact. The shipper reads it when it
        ships this event, so the file must stay in place; it is looked up relative to the
        journal first (a run folder copied elsewhere), then at its absolute path."""
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"artifact {path} does not exist")
        parent = os.path.dirname(self.folder)
        rel = os.path.relpath(path, self.folder) if path.startswith(parent + os.sep) else None
        self._event({"t": "artifact", "ts": _now_ms(), "path": path, "rel": rel, "artifact_path": artifact_path})

    def log_text(self, text: str, name: str) -> None:
        """Record ``text`` as the artifact ``name`` (e.g. ``config.yaml``, ``eval/table.md``):
        written into the journal's ``files/`` folder, then referenced."""
        name = name.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"artifact name {name!r} must be a relative path inside the run")
        target = os.path.join(self.folder, FILES, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write_text_atomic(target, text)
        self.log_artifact(target, os.path.dirname(name) or None)

    def set_status(self, status: str, timestamp_ms: Optional[int] = None) -> None:
        """Record the run status; a terminal one (FINISHED, FAILED, KILLED) is made durable."""
        if status not in STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(STATUSES)}")
        ts = _now_ms() if timestamp_ms is None else int(timestamp_ms)
        self._event({"t": "status", "ts": ts, "status": status}, durable=status in TERMINAL)

    # -- writing -----------------------------------------------------------------------------
    def flush(self, durable: bool = False) -> None:
        """Write buffered metric values as one line in one write; ``durable`` also fsyncs
        (the trainer asks for it at checkpoints and at the end)."""
        if self._pending:
            line = _JSON.encode({"t": "metrics", "v": self._pending}) + "\n"
            self._pending, self._pending_values = [], 0
            self._write(line.encode())
        if durable:
            os.fsync(self._fd)

    def close(self) -> None:
        """Flush (durably) and close the file; closing twice is fine."""
        if self._fd >= 0:
            self.flush(durable=True)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _event(self, event: dict[str, Any], durable: bool = False) -> None:
        self.flush()  # keep the file in call order
        self._write((_JSON.encode(event) + "\n").encode())
        if durable:
            os.fsync(self._fd)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # os.write may write less than asked (signals, full disks)
            view = view[os.write(self._fd, view):]


__all__ = ["Entry", "Journal", "STATUSES", "TERMINAL", "destination", "is_journal", "last_status", "last_steps",
           "read_entries",
           "read_events", "read_meta"]
