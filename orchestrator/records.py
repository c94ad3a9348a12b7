"""The job-record store: what ``orch status/logs/cancel`` know of a job, from any shell.

One folder a job, ``$ORCH_HOME/jobs/<job_id>/`` (``ORCH_HOME`` defaults to ``~/.orch``), holding
``record.json`` (a :class:`~orchestrator.spec.JobRecord`, written atomically under the folder's
lock) and ``log.txt`` (every rank's output and orch's own lines).

Records are made in one place (:func:`create_record`) and change state in one place
(:func:`transition`), which is therefore where "what happens when a job ends" is written once:
the first terminal state wins (a job cancelled by the user stays CANCELLED whatever its processes
exit with), and a job that ends without succeeding gets its MLflow run closed (FAILED / KILLED)
when its training could not close it itself. Other fields change through :func:`annotate`.
This module knows no backend; :mod:`orchestrator.jobs` asks the launchers for fresh states.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Optional

from cluster.errors import ConfigError, JobNotFound
from cluster.files import read_json, write_json_atomic
from cluster.lease import is_alive, locked
from orchestrator.spec import JobRecord, JobState

log = logging.getLogger(__name__)


def orch_home() -> Path:
    """``$ORCH_HOME`` or ``~/.orch``."""
    return Path(os.environ.get("ORCH_HOME") or Path.home() / ".orch").expanduser()


def jobs_dir() -> Path:
    """Folder holding one sub-folder per job (created on first use)."""
    path = orch_home() / "jobs"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot use {path} for job records ({err.strerror}); point ORCH_HOME at a writable folder"
        ) from None
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
        job_id = f"{slug[:40]}-{stamp}-{secrets.token_hex(2)}"
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
    with locked(folder):
        write_json_atomic(folder / "record.json", _to_dict(record))
    Path(record.log_path).touch()
    return record


def _to_dict(record: JobRecord) -> dict:
    data = dataclasses.asdict(record)
    data["state"] = record.state.value
    return data


def _from_dict(data: dict) -> JobRecord:
    fields = {f.name for f in dataclasses.fields(JobRecord)}
    values = {k: v for k, v in data.items() if k in fields}
    values["state"] = JobState(values.get("state", "UNKNOWN"))
    return JobRecord(**values)


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
    """Every stored record, newest first."""
    records = []
    for folder in jobs_dir().iterdir():
        data = read_json(folder / "record.json")
        if data is not None:
            records.append(_from_dict(data))
    return sorted(records, key=lambda r: r.submitted_at, reverse=True)


def _modify(job_id: str, change: Callable[[JobRecord], None]) -> tuple[JobRecord, JobRecord]:
    """Read-modify-write of one record under its folder's lock (a supervisor, a driver and
    ``orch cancel`` may write at the same moment). Returns ``(before, after)``."""
    folder = job_dir(job_id)
    with locked(folder):
        data = read_json(folder / "record.json")
        if data is None:
            raise JobNotFound(f"job {job_id} has no record in {jobs_dir()}")
        before = _from_dict(data)
        after = _from_dict(data)
        change(after)
        write_json_atomic(folder / "record.json", _to_dict(after))
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
    if after.state.finished and not before.state.finished:
        _close_tracking(after)
    return after


def fail_if_owner_died(record: JobRecord, owner: str) -> JobRecord:
    """A job whose owning process (``record.pid``: a local supervisor, a Ray driver) died without
    recording an end is FAILED; ``owner`` names that process in the error."""
    if record.state.finished or not record.pid or is_alive(record.pid, record.extra.get("pid_start")):
        return record
    where = record.extra.get("supervisor_log") or record.log_path
    return transition(record.job_id, JobState.FAILED,
                      error=f"the {owner} (pid {record.pid}) ended without recording an exit status; see {where}")


def say(job_id: str, message: str) -> None:
    """Append a line of orch's own to the job's log (what ``orch logs`` shows beside the ranks)."""
    try:
        with open(log_path(job_id), "a") as handle:
            handle.write(f"[orch {time.strftime('%H:%M:%S')}] {message}\n")
    except OSError:
        pass  # a missing log folder must not hide the state change that wanted to note this


def _close_tracking(record: JobRecord) -> None:
    """A job that failed before its MLflow hook started (bad input found by the worker), or that
    was killed, must not leave its run RUNNING forever. Notes what it did in the job's log."""
    if record.state == JobState.SUCCEEDED or not (record.mlflow_run_id and record.tracking_uri):
        return
    from orchestrator.tracking.runs import close_run

    status = "KILLED" if record.state == JobState.CANCELLED else "FAILED"
    try:
        if close_run(record.tracking_uri, record.mlflow_run_id, status):
            say(record.job_id, f"MLflow run {record.mlflow_run_id} marked {status}")
    except Exception as err:  # noqa: BLE001 - the tracking server may be gone; the job's state is recorded
        say(record.job_id, f"could not close MLflow run {record.mlflow_run_id}: {err}")
