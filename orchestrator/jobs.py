"""Jobs of every backend, from any shell: fresh state, cancel, following a job's log, and the
:class:`JobHandle` of a submitted job.

What ``orch status``, ``orch logs``, ``orch cancel``, ``orch submit --wait`` and the k-fold runner
call. The launchers never import this module: it asks them (one way). Records come from :mod:`orchestrator.records`; the state of a running job comes from its
backend's launcher (:func:`orchestrator.launchers.launcher_for`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional, Sequence

from orchestrator.records import load_record, transition
from orchestrator.spec import JobRecord, JobState

log = logging.getLogger(__name__)


def refresh_records(records: Sequence[JobRecord], run_ids: bool = True) -> list[JobRecord]:
    """``records`` (same order) with their backends' current states: the unfinished ones of each
    backend are asked about in one :meth:`~orchestrator.launchers.Launcher.status` call, and
    every answer that changes something becomes a :func:`~orchestrator.records.transition` here
    (the one place that writes states from answers). A finished record's state is final; a
    backend that cannot answer right now leaves the stored states (and a warning). With
    ``run_ids``, a record's MLflow run id is filled in once its journal was shipped."""
    from orchestrator.launchers import get_launcher

    fresh = {r.job_id: r for r in records}
    by_backend: dict[str, list[JobRecord]] = {}
    for r in records:
        if not r.state.finished:
            by_backend.setdefault(r.backend, []).append(r)
    for backend, group in by_backend.items():
        try:
            launcher = get_launcher(backend)
            answers = launcher.status(group)
        except Exception as err:  # noqa: BLE001 - a flaky scheduler must not break `orch status`
            log.warning("could not refresh %d %s job(s) (%s ...): %s", len(group), backend, group[0].job_id, err)
            continue
        for r in group:
            answer = answers.get(r.job_id)
            if answer is None:
                continue
            fields = answer.changes(r)
            if answer.state == r.state and not fields:
                continue  # nothing new: nothing written
            if answer.state.finished:
                launcher.release(r)
            fresh[r.job_id] = transition(r.job_id, answer.state, **fields)
    if run_ids:
        for job_id, r in fresh.items():
            if r.tracking_uri and not r.mlflow_run_id:
                fresh[job_id] = _with_run_id(r)
    return [fresh[r.job_id] for r in records]


def _with_run_id(record: JobRecord) -> JobRecord:
    from orchestrator.records import annotate
    from orchestrator.tracking.runs import journal_dir, run_id_of

    run_id = run_id_of(journal_dir(record.output_dir), record.tracking_uri)
    return annotate(record.job_id, mlflow_run_id=run_id) if run_id else record


def refresh_record(record: JobRecord) -> JobRecord:
    """``record`` with its backend's current state (stored), and its MLflow run id once its
    journal was shipped (:func:`refresh_records` of one)."""
    return refresh_records([record])[0]


def refresh_job(job: str) -> JobRecord:
    """The fresh record of ``job`` (an id or a unique prefix of one)."""
    return refresh_record(load_record(job))


def cancel_job(job: str) -> JobRecord:
    """Cancel a job (idempotent); returns the updated record. A job already recorded as ended
    keeps its state, but its launcher still stops whatever of it might be left running."""
    from orchestrator.launchers import launcher_for

    record = refresh_job(job)
    launcher_for(record).cancel(record)
    if record.state.finished:
        return record
    return transition(record.job_id, JobState.CANCELLED)


def cancel_jobs(job_ids: Sequence[str]) -> list[JobRecord]:
    """Cancel many jobs at once (an interrupted set): one refresh, then each backend's
    :meth:`~orchestrator.launchers.Launcher.cancel_many` (Slurm: one ``scancel`` for all, not one
    per job); the unfinished ones are recorded CANCELLED."""
    from orchestrator.launchers import get_launcher

    fresh = refresh_records([load_record(j) for j in job_ids], run_ids=False)
    by_backend: dict[str, list[JobRecord]] = {}
    for r in fresh:
        by_backend.setdefault(r.backend, []).append(r)
    for backend, group in by_backend.items():
        get_launcher(backend).cancel_many(group)
    return [r if r.state.finished else transition(r.job_id, JobState.CANCELLED) for r in fresh]


class JobHandle:
    """A submitted job of any backend, seen through its record: works from any process
    (``state`` asks the job's launcher for a fresh state). ``poll_s``: how often :meth:`wait`
    asks (the backend's :attr:`~orchestrator.launchers.Launcher.poll_s`)."""

    def __init__(self, job_id: str, poll_s: float = 1.0) -> None:
        self.job_id = job_id
        self.poll_s = poll_s

    def record(self) -> JobRecord:
        """The refreshed record."""
        return refresh_job(self.job_id)

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

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r})"


def follow_log(job: str, follow: bool = True, out=None, poll_s: float = 0.5) -> JobRecord:
    """Copy the job's log to ``out`` (stdout); with ``follow``, keep copying until the job ends
    (``orch logs -f``, ``orch submit --wait``). Returns the last record seen."""
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
        record = refresh_job(record.job_id)
        # Finished and nothing left to read (the last lines may land just after the state).
        size = os.path.getsize(record.log_path) if os.path.exists(record.log_path) else 0
        if record.state.finished and size <= position:
            print(f"[orch] job {record.job_id} {record.state.value}"
                  + (f" (exit status {record.exit_code})" if record.exit_code is not None else ""),
                  file=sys.stderr, flush=True)
            return record
        time.sleep(poll_s)

