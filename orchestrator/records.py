"""The job-record store: what ``orch status/logs/cancel`` know of a job, from any shell.

One folder a job, ``$ORCH_HOME/jobs/<job_id>/`` (``ORCH_HOME`` defaults to ``~/.orch``), holding
``record.json`` (a :class:`~orchestrator.spec.JobRecord`, written atomically under the folder's
lock) and ``log.txt`` (every rank's output and orch's own lines).

Listing 10,000 records must not open 10,000 files: every write of a record also appends the whole
record as one line to ``$ORCH_HOME/jobs-index.jsonl`` (under ``jobs-index.lock``, while the
record's own folder lock is still held, so the index's order of versions is the files' order;
the newest line of a job wins). :func:`list_records` reads that one file, adds the job folders it
does not name (an ``ORCH_HOME`` written before the index existed, a writer that died between
the two writes: their ``record.json`` is read and appended once), drops jobs whose folder is
gone, re-reads ``record.json`` of the jobs not yet finished (the file is the truth; the index is
a cache of it), and rewrites the file without superseded lines (atomic replace) when they
outnumber or outweigh the live ones (a sweep's record grows with its trials). Deleting the index is always safe: the next listing rebuilds it.
Parsing 10,000 JSON lines and making records of them costs a listing ~0.08 s; the index parsed up
to a line is therefore kept in ``jobs-index.snapshot`` (:func:`_load_snapshot`, five times
faster), and a listing parses only the lines after it.

Records are made in one place (:func:`create_record`) and change state in one place
(:func:`transition`), which is therefore where "what happens when a job ends" is written once:
the first terminal state wins (a job cancelled by the user stays CANCELLED whatever its processes
exit with), and a job that ends without succeeding gets its MLflow run closed (FAILED / KILLED)
when its training could not close it itself (:func:`orchestrator.tracking.runs.end_job_run`). Other fields change through :func:`annotate`;
:func:`reopen` (``orch sweep --resume`` only) is the one way back from a finished state.
This module knows no backend; :mod:`orchestrator.jobs` asks the launchers for fresh states.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from cluster.errors import ConfigError, JobNotFound
from cluster.files import file_lock, read_json, write_bytes_atomic, write_json_atomic, write_text_atomic
from orchestrator.home import orch_home
from orchestrator.spec import JobRecord, JobState

log = logging.getLogger(__name__)


_MADE: set[Path] = set()  # jobs folders this process made or found


def jobs_dir() -> Path:
    """Folder holding one sub-folder per job (created on first use)."""
    path = orch_home() / "jobs"
    if path in _MADE and path.is_dir():  # one stat, not a mkdir per record
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot use {path} for job records ({err.strerror}); point ORCH_HOME at a writable folder"
        ) from None
    _MADE.add(path)
    return path


def job_dir(job_id: str) -> Path:
    """Folder of one job."""
    return jobs_dir() / job_id


def log_path(job_id: str) -> Path:
    """Where the job's processes write stdout and stderr."""
    return job_dir(job_id) / "log.txt"


def new_job_id(name: str) -> str:
    """``<name>-<yyyymmdd-hhmmss>-<4 hex>``: readable, sortable, unique (the hex breaks ties of
    jobs submitted in the same second). Also creates the job's folder, so the id is taken."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "job"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    while True:
        job_id = f"{slug[:40]}-{stamp}-{os.urandom(2).hex()}"
        try:
            job_dir(job_id).mkdir(parents=True)
            return job_id
        except FileExistsError:
            continue


def create_record(*, name: str, backend: str, output_dir: str, config_path: str, job_id: Optional[str] = None,
                  log_file: Optional[str] = None, native_id: Optional[str] = None,
                  mlflow_run_id: Optional[str] = None, tracking_uri: Optional[str] = None,
                  state: JobState = JobState.PENDING, extra: Optional[dict[str, Any]] = None) -> JobRecord:
    """Make and store the record of a newly submitted job (a new id unless ``job_id`` was taken
    already with :func:`new_job_id`); its log file exists afterwards."""
    job_id = job_id or new_job_id(name)
    record = JobRecord(
        job_id=job_id, name=name, backend=backend, state=state, output_dir=str(output_dir),
        config_path=str(config_path), log_path=str(log_file or log_path(job_id)), submitted_at=time.time(),
        native_id=native_id, mlflow_run_id=mlflow_run_id, tracking_uri=tracking_uri, extra=dict(extra or {}),
    )
    folder = job_dir(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_locked(folder):
        _store(folder, _to_dict(record))
    Path(record.log_path).touch()
    return record


def _folder_locked(folder: Path):
    """The lock of one job's folder (``<folder>/.lock``, :func:`cluster.lease.locked`'s file)."""
    return file_lock(folder / ".lock")


INDEX_FILE = "jobs-index.jsonl"
INDEX_LOCK = "jobs-index.lock"


def index_path() -> Path:
    """The index of every record (one JSON line per record write)."""
    return orch_home() / INDEX_FILE


@contextlib.contextmanager
def _index_locked() -> Iterator[None]:
    with file_lock(orch_home() / INDEX_LOCK):
        yield


def _append_index(rows: list[dict]) -> None:
    """Append records to the index; the caller holds the index lock."""
    text = "".join(json.dumps(row, separators=(",", ":"), default=str) + "\n" for row in rows)
    with open(index_path(), "a") as handle:
        handle.write(text)


def _store(folder: Path, data: dict) -> None:
    """Write ``record.json`` and its index line; the caller holds the folder's lock."""
    write_json_atomic(folder / "record.json", data)
    try:
        with _index_locked():
            _append_index([data])
    except OSError as err:  # the record itself is written; the next listing reads it from its file
        log.warning("could not append to the record index %s: %s", index_path(), err)


SNAPSHOT_FILE = "jobs-index.snapshot"
SNAPSHOT_VERSION = 1
# The snapshot is rewritten once the index has grown this much past it (parsing the lines after
# it costs about 10 us a line).
SNAPSHOT_LAG_BYTES = 256 << 10
_EDGE = 64  # bytes at both ends of the snapshot's part of the index, checked before it is used
_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))
_REQUIRED = frozenset(f.name for f in dataclasses.fields(JobRecord)
                      if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
_STATE_AT, _EXTRA_AT = _FIELDS.index("state"), _FIELDS.index("extra")
_FIELD_SET = frozenset(_FIELDS)
_STATES = {state.value: state for state in JobState}


@dataclasses.dataclass
class _Index:
    """What the index file holds: the newest record of each job, the length of its line, and the
    file's number of lines and size (to tell when superseded lines should be dropped); ``extra``
    keeps the keys of a line that this version's :class:`JobRecord` does not know (an orch newer
    than this one wrote them), so that compaction keeps them."""

    records: dict[str, JobRecord]
    sizes: dict[str, int]
    lines: int
    size: int
    unknown: dict[str, dict] = dataclasses.field(default_factory=dict)

    def bloated(self, live: Iterable[str]) -> bool:
        """More superseded lines than live ones (plus slack), by count or by size (a sweep's
        record grows with its trials and is rewritten at each of their reports)."""
        live = list(live)
        live_size = sum(self.sizes.get(job_id, 0) + 1 for job_id in live)
        return self.lines > 2 * len(live) + 1000 or self.size > 2 * live_size + (1 << 20)

    def add(self, text: str) -> None:
        """Parse complete lines (``text`` ends with a newline) into the index; the newest line of
        a job wins. A torn line (a writer killed mid-line) is skipped."""
        lines = text.split("\n")[:-1]
        try:
            parsed = list(zip(json.loads("[" + ",".join(lines) + "]"), lines))
        except ValueError:
            parsed = []
            for line in lines:
                try:
                    parsed.append((json.loads(line), line))
                except ValueError:
                    continue
        for row, line in parsed:
            if isinstance(row, dict) and "job_id" in row:
                job_id = row["job_id"]
                try:
                    self.records[job_id] = _from_dict(row)
                except (KeyError, TypeError, ValueError):
                    continue
                self.sizes[job_id] = len(line)
                unknown = {k: v for k, v in row.items() if k not in _FIELD_SET} if len(row) != len(_FIELDS) else None
                if unknown:
                    self.unknown[job_id] = unknown
                else:
                    self.unknown.pop(job_id, None)
        self.lines += len(lines)

    def row(self, job_id: str) -> dict:
        """The record of ``job_id`` as its index line holds it."""
        return {**_to_dict(self.records[job_id]), **self.unknown.get(job_id, {})}


def _read_index() -> _Index:
    """The index (empty when absent): its snapshot (:func:`_load_snapshot`) and the lines written
    after it. A line being written right now (no newline yet) is skipped."""
    try:
        handle = open(index_path(), "rb")
    except FileNotFoundError:
        return _Index({}, {}, 0, 0)
    with handle:
        stat = os.fstat(handle.fileno())
        index, start = _load_snapshot(handle, stat)
        handle.seek(start)
        data = handle.read()
    end = data.rfind(b"\n") + 1
    index.add(data[:end].decode("utf-8", "replace"))
    index.size = start + len(data)
    if end > SNAPSHOT_LAG_BYTES:
        _save_snapshot(index, stat, start + end)
    return index


def _snapshot_path() -> Path:
    return orch_home() / SNAPSHOT_FILE


def _load_snapshot(handle, stat: os.stat_result) -> tuple[_Index, int]:
    """The index as parsed up to some offset, kept in ``jobs-index.snapshot`` (Python's
    ``marshal`` of plain values: about five times faster to load than the JSON lines, and
    nothing in it is executed) and that offset; an empty index and 0 when there is none, or when
    it belongs to another index file (compacted, deleted and rebuilt: another inode, or other
    bytes at either end of its part)."""
    import marshal

    try:
        with open(_snapshot_path(), "rb") as snap:
            (version, fields, dev, ino, offset, head, tail, lines, ids, values, sizes, unknown) = marshal.loads(snap.read())
        if (version, tuple(fields), dev, ino) != (SNAPSHOT_VERSION, _FIELDS, stat.st_dev, stat.st_ino) \
                or not _EDGE <= offset <= stat.st_size \
                or os.pread(handle.fileno(), _EDGE, 0) != head \
                or os.pread(handle.fileno(), _EDGE, offset - _EDGE) != tail:
            raise ValueError("another index")
        made = []
        for row in values:
            row = list(row)
            row[_STATE_AT] = _STATES.get(row[_STATE_AT], JobState.UNKNOWN)
            made.append(JobRecord(*row))
        return _Index(dict(zip(ids, made)), dict(zip(ids, sizes)), lines, offset, dict(unknown)), offset
    except (OSError, ValueError, TypeError, EOFError):
        return _Index({}, {}, 0, 0), 0


def _save_snapshot(index: _Index, stat: os.stat_result, offset: int) -> None:
    """Write the snapshot of ``index`` (the index file's first ``offset`` bytes); best effort."""
    import marshal

    try:
        with open(index_path(), "rb") as handle:
            head, tail = os.pread(handle.fileno(), _EDGE, 0), os.pread(handle.fileno(), _EDGE, offset - _EDGE)
        ids = list(index.records)
        values = []
        for record in index.records.values():
            row = [getattr(record, name) for name in _FIELDS]
            row[_STATE_AT] = record.state._value_
            values.append(tuple(row))
        data = marshal.dumps((SNAPSHOT_VERSION, list(_FIELDS), stat.st_dev, stat.st_ino, offset, head, tail,
                              index.lines, ids, values, [index.sizes[i] for i in ids], index.unknown))
        write_bytes_atomic(_snapshot_path(), data)
    except (OSError, ValueError):  # ValueError: a value marshal cannot write (the index works without)
        pass


def _index_records() -> dict[str, JobRecord]:
    """Every stored record by job id, from the index (rebuilt where it is missing or stale; see
    the module docstring)."""
    base = jobs_dir()
    folders = {entry.name for entry in os.scandir(base) if entry.is_dir()}
    index = _read_index()
    if folders.difference(index.records):
        # Read and append under the index lock: a writer that changes one of these records now
        # appends after us, so its newer line wins.
        with _index_locked():
            index = _read_index()
            found = [data for data in (read_json(base / j / "record.json")
                                       for j in sorted(folders.difference(index.records)))
                     if data is not None and "job_id" in data]
            if found:
                _append_index(found)
                index = _read_index()
    live = {job_id: record for job_id, record in index.records.items() if job_id in folders}
    if index.bloated(live):
        _compact()
    for job_id, record in live.items():
        if not record.state.finished:
            fresh = read_json(base / job_id / "record.json")  # the file is the truth for live jobs
            if fresh is not None:
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    live[job_id] = _from_dict(fresh)
    return live


def _compact() -> None:
    """Rewrite the index with one line per live job (atomic replace, under the index lock); its
    snapshot goes with the old file."""
    with _index_locked():
        index = _read_index()
        folders = {entry.name for entry in os.scandir(jobs_dir()) if entry.is_dir()}
        text = "".join(json.dumps(index.row(job_id), separators=(",", ":"), default=str) + "\n"
                       for job_id in index.records if job_id in folders)
        write_text_atomic(index_path(), text)
        with contextlib.suppress(FileNotFoundError):
            _snapshot_path().unlink()


def _to_dict(record: JobRecord) -> dict:
    data = dataclasses.asdict(record)
    data["state"] = record.state._value_
    return data


def _from_dict(data: dict) -> JobRecord:
    """A record from its JSON object; keys this version does not know (a newer orch wrote them)
    are left out, a missing required one raises KeyError."""
    if not _REQUIRED <= data.keys():
        raise KeyError(", ".join(sorted(_REQUIRED.difference(data))))
    values = [data.get(name) for name in _FIELDS]
    values[_STATE_AT] = _STATES.get(values[_STATE_AT], JobState.UNKNOWN)
    if values[_EXTRA_AT] is None:
        values[_EXTRA_AT] = {}
    return JobRecord(*values)


def resolve_job_id(job: str) -> str:
    """Exact id, else the one id starting with ``job``; JobNotFound (with a hint) otherwise."""
    if not job or "/" in job:
        raise JobNotFound(f"{job!r} is not a job id; see `orch status --all`")
    if (job_dir(job) / "record.json").exists():
        return job
    matches = sorted(p.name for p in jobs_dir().iterdir() if p.name.startswith(job) and (p / "record.json").exists())
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(matches[:5]) + (" ..." if len(matches) > 5 else "")
        raise JobNotFound(f"job id {job!r} matches {len(matches)} jobs ({shown}); give more of the id")
    raise JobNotFound(f"no job {job!r} in {jobs_dir()}; see `orch status --all` (ORCH_HOME={orch_home()})")


def load_record(job: str) -> JobRecord:
    """The stored record of ``job`` (an id or a unique prefix of one)."""
    job_id = resolve_job_id(job)
    data = read_json(job_dir(job_id) / "record.json")
    if data is None:
        raise JobNotFound(f"the record of job {job_id} is unreadable: {job_dir(job_id) / 'record.json'}")
    return _from_dict(data)


def list_records() -> list[JobRecord]:
    """Every stored record, newest first (from the index: one file read, not one per job)."""
    return sorted(_index_records().values(), key=lambda r: r.submitted_at, reverse=True)


def _modify(job_id: str, change: Callable[[JobRecord], None]) -> tuple[JobRecord, JobRecord]:
    """Read-modify-write of one record under its folder's lock (a supervisor, a driver and
    ``orch cancel`` may write at the same moment). Returns ``(before, after)``."""
    folder = job_dir(job_id)
    with _folder_locked(folder):
        data = read_json(folder / "record.json")
        if data is None:
            raise JobNotFound(f"job {job_id} has no record in {jobs_dir()}")
        before = _from_dict(data)
        after = _from_dict(data)
        change(after)
        _store(folder, _to_dict(after))
    return before, after


def annotate(job_id: str, *, extra: Optional[dict[str, Any]] = None, **fields: Any) -> JobRecord:
    """Set record fields other than the state (``pid``, ``mlflow_run_id``, ``extra`` entries)."""
    if "state" in fields:
        raise TypeError("annotate() does not change the state; use transition()")

    def change(r: JobRecord) -> None:
        for key, value in fields.items():
            setattr(r, key, value)
        r.extra.update(extra or {})

    return _modify(job_id, change)[1]


def transition(job_id: str, state: JobState, *, extra: Optional[dict[str, Any]] = None,
               **fields: Any) -> JobRecord:
    """Move job ``job_id`` to ``state`` and set ``fields`` (``exit_code``, ``error``, ``ended_at``,
    ...). Rules: a finished job never becomes unfinished again, and the first finished state
    wins (later ones only fill fields still empty); RUNNING stamps ``started_at``, a finished
    state ``ended_at``. The first time a job is seen ending without success, its MLflow run is
    closed here if it is still RUNNING."""

    def change(r: JobRecord) -> None:
        if r.state.finished:
            for key, value in fields.items():
                if getattr(r, key) is None:
                    setattr(r, key, value)
            r.extra.update(extra or {})
            return
        r.state = state
        for key, value in fields.items():
            setattr(r, key, value)
        now = time.time()
        if state == JobState.RUNNING:
            r.started_at = r.started_at or now
        if state.finished:
            r.ended_at = r.ended_at or now
        r.extra.update(extra or {})

    before, after = _modify(job_id, change)
    if after.state.finished and not before.state.finished and after.tracking_uri:
        from orchestrator.tracking.runs import end_job_run

        note = end_job_run(after)
        if note:
            append_to_log(job_id, note)
    return after


def reopen(job_id: str) -> JobRecord:
    """The one way back from a finished state, for ``orch sweep --resume`` only: a sweep whose
    driver died (FAILED) or was cancelled goes back to PENDING under the same job id (its output
    folder, MLflow parent run and trials are kept), with ``ended_at``, ``exit_code`` and ``error``
    cleared and ``extra["resumes"]`` counted; its new driver then records RUNNING and the end as
    usual. Written through the same lock and index as every other change."""

    def change(r: JobRecord) -> None:
        r.state = JobState.PENDING
        r.ended_at = r.exit_code = r.error = None
        r.extra["resumes"] = int(r.extra.get("resumes") or 0) + 1

    return _modify(job_id, change)[1]


def append_to_log(job_id: str, message: str) -> None:
    """Append a line of orch's own to the job's log (what ``orch logs`` shows beside the ranks)."""
    try:
        with open(log_path(job_id), "a") as handle:
            handle.write(f"[orch {time.strftime('%H:%M:%S')}] {message}\n")
    except OSError:
        pass  # a missing log folder must not hide the state change that wanted to note this
