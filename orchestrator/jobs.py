"""Job records: what ``orch status/logs/cancel`` know of a job, from any shell.

One folder a job, ``$ORCH_HOME/jobs/<job_id>/`` (``ORCH_HOME`` defaults to ``~/.orch``), holding
``record.json`` (a :class:`~orchestrator.spec.JobRecord`, written atomically under a lock) and
``log.txt`` (every rank's output). Local and torchrun jobs are refreshed and cancelled here;
Slurm and Ray records go to ``orchestrator.launchers.<backend>.refresh_record`` /
``cancel_record``, imported only when such a record is looked at.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import logging
import os
import re
import secrets
import signal
import time
from pathlib import Path
from typing import Callable, Optional

from cluster.errors import ConfigError, JobNotFound, LaunchError
from cluster.files import read_json, write_json_atomic
from cluster.lease import is_alive, locked
from orchestrator.spec import JobRecord, JobState

log = logging.getLogger(__name__)

LOCAL_BACKENDS = ("local", "torchrun")
CANCEL_GRACE_S = 10.0


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


def log_path(job_id: str) -> Path:
    """Where the job's processes write stdout and stderr."""
    return job_dir(job_id) / "log.txt"


def record_to_dict(record: JobRecord) -> dict:
    data = dataclasses.asdict(record)
    data["state"] = record.state.value
    return data


def record_from_dict(data: dict) -> JobRecord:
    fields = {f.name for f in dataclasses.fields(JobRecord)}
    values = {k: v for k, v in data.items() if k in fields}
    values["state"] = JobState(values.get("state", "UNKNOWN"))
    return JobRecord(**values)


def save_record(record: JobRecord) -> None:
    """Write ``record`` atomically (readers never see half a file)."""
    folder = job_dir(record.job_id)
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder):
        write_json_atomic(folder / "record.json", record_to_dict(record))


def update_record(job_id: str, change: Callable[[JobRecord], None]) -> JobRecord:
    """Read-modify-write of one record under its folder's lock (the supervisor and ``orch
    cancel`` may write at the same moment). A finished state is never overwritten by a
    running one."""
    folder = job_dir(job_id)
    with locked(folder):
        data = read_json(folder / "record.json")
        if data is None:
            raise JobNotFound(f"job {job_id} has no record in {jobs_dir()}")
        record = record_from_dict(data)
        was_finished = record.state.finished
        change(record)
        if was_finished and not record.state.finished:
            record.state = JobState(data["state"])
        write_json_atomic(folder / "record.json", record_to_dict(record))
    return record


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
    return record_from_dict(data)


def list_records() -> list[JobRecord]:
    """Every stored record, newest first."""
    records = []
    for folder in jobs_dir().iterdir():
        data = read_json(folder / "record.json")
        if data is not None:
            records.append(record_from_dict(data))
    return sorted(records, key=lambda r: r.submitted_at, reverse=True)


def _backend_module(backend: str):
    """``orchestrator.launchers.<backend>`` for remote backends, or None when not available."""
    try:
        return importlib.import_module(f"orchestrator.launchers.{backend}")
    except ModuleNotFoundError:
        return None


def refresh_record(record: JobRecord) -> JobRecord:
    """The job's current state. Local jobs: a job whose supervisor died without recording an end
    is marked FAILED. Slurm/Ray: asks the backend (falls back to the stored state)."""
    if record.state.finished:
        return record
    if record.backend in LOCAL_BACKENDS:
        if record.pid and not is_alive(record.pid, record.extra.get("pid_start")):
            def mark(r: JobRecord) -> None:
                if not r.state.finished:
                    r.state = JobState.FAILED
                    r.ended_at = r.ended_at or time.time()
                    where = f"; see {r.extra['supervisor_log']}" if r.extra.get("supervisor_log") else ""
                    r.error = r.error or f"the orch supervisor (pid {r.pid}) ended without recording an exit status{where}"
            return update_record(record.job_id, mark)
        return record
    module = _backend_module(record.backend)
    refresh = getattr(module, "refresh_record", None)
    if refresh is None:
        return record
    try:
        fresh = refresh(record)
    except Exception as err:  # a flaky scheduler must not break `orch status`
        log.warning("could not refresh %s job %s: %s", record.backend, record.job_id, err)
        return record
    if fresh.state.finished:
        close_mlflow_run(fresh)  # first seen ended here: a run its job could not close is closed now
    return fresh


def close_mlflow_run(record: JobRecord) -> None:
    """A job that failed before its MLflow hook started (bad input found in the worker), or that
    was killed, must not leave its run RUNNING forever. Notes what it did in the job's log."""
    if record.state == JobState.SUCCEEDED or not (record.mlflow_run_id and record.tracking_uri):
        return
    status = "KILLED" if record.state == JobState.CANCELLED else "FAILED"
    try:
        from detection.tracking import end_run_if_running

        note = f"MLflow run {record.mlflow_run_id} marked {status}" if end_run_if_running(
            record.tracking_uri, record.mlflow_run_id, status) else None
    except Exception as err:  # the tracking server may be gone; the job's own state is recorded
        note = f"could not close MLflow run {record.mlflow_run_id}: {err}"
    if note:
        try:
            with open(record.log_path, "a") as handle:
                handle.write(f"[orch {time.strftime('%H:%M:%S')}] {note}\n")
        except OSError:
            pass


def cancel_job(job: str) -> JobRecord:
    """Cancel a job (idempotent): local jobs get SIGTERM on their whole process group, SIGKILL
    after a grace period; the supervisor frees their leases. Returns the updated record."""
    record = refresh_record(load_record(job))
    if record.state.finished:
        return record
    if record.backend not in LOCAL_BACKENDS:
        module = _backend_module(record.backend)
        cancel = getattr(module, "cancel_record", None)
        if cancel is None:
            raise LaunchError(f"cannot cancel {record.backend} job {record.job_id}: the {record.backend} backend is not available")
        cancel(record)
    else:
        # The marker tells the supervisor not to start the job, and to record CANCELLED.
        (job_dir(record.job_id) / "cancel").touch()
        _kill_group(record)

    def mark(r: JobRecord) -> None:
        if not r.state.finished:
            r.state = JobState.CANCELLED
            r.ended_at = time.time()
    return update_record(record.job_id, mark)


def cancel_requested(job_id: str) -> bool:
    """Whether ``orch cancel`` was run on the job."""
    return (job_dir(job_id) / "cancel").exists()


def _kill_group(record: JobRecord) -> None:
    """SIGTERM the job's process group (workers, torchrun agents, ssh), SIGKILL if it lingers."""
    record = load_record(record.job_id)
    pgid = record.extra.get("pgid")
    if not pgid:
        return  # not started yet: the cancel marker keeps it from starting
    deadline = time.monotonic() + CANCEL_GRACE_S
    sig = signal.SIGTERM
    while True:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            raise LaunchError(f"no permission to signal process group {pgid} of job {record.job_id}") from None
        if sig == signal.SIGKILL:
            return
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if not _group_alive(pgid):
                return
        sig = signal.SIGKILL


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which hold nothing, do not
    count; ``killpg(pgid, 0)`` would count them until their parent reaps them)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def follow_log(job: str, follow: bool = True, out=None, poll_s: float = 0.5) -> JobRecord:
    """Copy the job's log to ``out`` (stdout); with ``follow``, keep copying until the job ends
    (``orch logs -f``, ``orch submit --wait``). Returns the last record seen."""
    import sys

    out = out or sys.stdout.buffer
    record = load_record(job)
    position = 0
    while True:
        try:
            with open(record.log_path, "rb") as handle:
                handle.seek(position)
                chunk = handle.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            out.write(chunk)
            out.flush()
            position += len(chunk)
        if not follow:
            return record
        record = refresh_record(load_record(record.job_id))
        # Finished and nothing left to read (the last lines may land just after the state).
        size = os.path.getsize(record.log_path) if os.path.exists(record.log_path) else 0
        if record.state.finished and size <= position:
            print(f"[orch] job {record.job_id} {record.state.value}"
                  + (f" (exit status {record.exit_code})" if record.exit_code is not None else ""),
                  file=sys.stderr, flush=True)
            return record
        time.sleep(poll_s)


class JobHandle:
    """A submitted job of any backend, seen through its record: works from any process
    (``state`` asks the backend through :func:`refresh_record`)."""

    poll_s = 1.0

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def record(self) -> JobRecord:
        """The refreshed record."""
        return refresh_record(load_record(self.job_id))

    def state(self) -> JobState:
        """Current state."""
        return self.record().state

    def wait(self, timeout_s: Optional[float] = None, poll_s: Optional[float] = None) -> JobState:
        """Poll until the job has finished (or ``timeout_s`` passed); returns the last state."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            state = self.state()
            if state.finished or (deadline is not None and time.monotonic() >= deadline):
                return state
            time.sleep(self.poll_s if poll_s is None else poll_s)

    def cancel(self) -> None:
        """Stop the job (idempotent)."""
        cancel_job(self.job_id)
