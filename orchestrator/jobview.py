"""What ``orch status`` shows of many jobs: one row per job, per Slurm array, per k-fold set and
per sweep, with state counts (``812 SUCCEEDED · 8 RUNNING · 180 PENDING``), and the filters and
JSON objects of ``orch status``. Pure: records in, rows out (no backend asked, nothing written).

A record belongs to a group by what today's records already hold, so an existing ``ORCH_HOME``
groups without a migration: a k-fold trial by its output folder (``.../kfold-<set id>/...``), a
Slurm array task by its native id (``<array id>_<task>``). A sweep is one record (its trials live
in the Ray Tune driver); its row counts the trials' states.
"""

from __future__ import annotations

import fnmatch
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from cluster.errors import ConfigError
from orchestrator.spec import JobRecord, JobState

# Order of the counts in a row (the example: SUCCEEDED, RUNNING, PENDING first).
COUNT_ORDER = (JobState.SUCCEEDED, JobState.RUNNING, JobState.PENDING, JobState.FAILED, JobState.CANCELLED,
               JobState.UNKNOWN)
# Ray Tune's trial states -> orch's words (a sweep's row counts its trials).
TUNE_STATES = {"TERMINATED": JobState.SUCCEEDED, "RUNNING": JobState.RUNNING, "PENDING": JobState.PENDING,
               "PAUSED": JobState.PENDING, "ERROR": JobState.FAILED}
KFOLD_DIR = re.compile(r"/kfold-([0-9a-f]{6,})(?:/|$)")
ARRAY_TASK = re.compile(r"^(\d+)_\d+$")
# Keys of ``orch status --json`` (one object per job); documented in the README, kept stable.
JSON_KEYS = ("job_id", "name", "backend", "state", "group", "native_id", "submitted_at", "started_at", "ended_at",
             "elapsed_s", "exit_code", "error", "output_dir", "log_path", "config_path", "mlflow_run_id",
             "tracking_uri", "progress")


@dataclass
class Row:
    """One line of ``orch status``: a job, or a group of jobs (``kind`` array, kfold or sweep)."""

    kind: str  # job | array | kfold | sweep
    key: str  # what `orch status KEY` expands: the job id, kfold-<set id>, array-<Slurm id>
    name: str
    backend: str
    members: list[JobRecord]
    counts: dict[JobState, int] = field(default_factory=dict)
    # Live progress of a running job (``step 120/400, 35.2 img/s, ETA 0:04:10``) from its ranks'
    # heartbeats; None until the first step, and for groups and ended jobs.
    progress: Optional[str] = None

    @property
    def state(self) -> JobState:
        """The group's state: running while any member runs, pending while any waits, else
        FAILED / CANCELLED if any member ended so, else SUCCEEDED."""
        for state in (JobState.RUNNING, JobState.PENDING, JobState.FAILED, JobState.CANCELLED, JobState.UNKNOWN):
            if self.counts.get(state):
                return state
        return JobState.SUCCEEDED

    @property
    def started_at(self) -> Optional[float]:
        if len(self.members) == 1:  # most rows: said without a loop (a listing has thousands)
            return self.members[0].started_at or None
        starts = [r.started_at for r in self.members if r.started_at]
        return min(starts) if starts else None

    @property
    def ended_at(self) -> Optional[float]:
        if len(self.members) == 1:
            only = self.members[0]
            return (only.ended_at or None) if only.state.finished else None
        if any(not r.state.finished for r in self.members):
            return None
        ends = [r.ended_at for r in self.members if r.ended_at]
        return max(ends) if ends else None

    @property
    def submitted_at(self) -> float:
        return max(r.submitted_at for r in self.members)

    def counts_text(self) -> str:
        """``812 SUCCEEDED · 8 RUNNING · 180 PENDING`` (a single job: its state)."""
        if self.kind == "job":
            state = self.members[0].state._value_  # ``.value`` is a slow descriptor, asked per row
            return f"{state} {self.progress}" if self.progress else state
        return " · ".join(f"{self.counts[s]} {s.value}" for s in COUNT_ORDER if self.counts.get(s))


def group_of(record: JobRecord) -> Optional[tuple[str, str, str]]:
    """``(kind, key, name)`` of the group ``record`` belongs to, or None for a job of its own."""
    kfold = KFOLD_DIR.search(record.output_dir) if "/kfold-" in (record.output_dir or "") else None
    if kfold:
        return "kfold", f"kfold-{kfold.group(1)}", record.name.split("/", 1)[0]
    task = ARRAY_TASK.match(record.native_id) if record.backend == "slurm" and record.native_id else None
    if task:
        return "array", f"array-{task.group(1)}", record.name
    return None


def rows_of(records: Sequence[JobRecord]) -> list[Row]:
    """Records (newest first) as rows, a group where its newest member is."""
    rows: list[Row] = []
    groups: dict[str, Row] = {}
    for record in records:
        group = group_of(record)
        if group is None:
            rows.append(job_row(record))
            continue
        kind, key, name = group
        row = groups.get(key)
        if row is None:
            row = groups[key] = Row(kind, key, name, record.backend, [])
            rows.append(row)
        elif record.backend != row.backend and row.backend != "mixed":
            row.backend = "mixed"
        row.members.append(record)
        row.counts[record.state] = row.counts.get(record.state, 0) + 1
    for row in groups.values():
        if row.kind == "array":
            row.name = _common_name([r.name for r in row.members])
    return rows


def job_row(record: JobRecord) -> Row:
    """One job as a row of its own (a sweep: its trials counted)."""
    trials = record.extra.get("trials") if record.extra.get("kind") == "sweep" else None
    if trials is None:
        live = progress_of(record)
        return Row("job", record.job_id, record.name, record.backend, [record], {record.state: 1},
                   progress=live["text"] if live else None)
    counts: dict[JobState, int] = {}
    for trial in trials.values():
        state = TUNE_STATES.get(str(trial.get("status", "")).upper(), JobState.UNKNOWN)
        counts[state] = counts.get(state, 0) + 1
    return Row("sweep", record.job_id, record.name, record.backend, [record], counts)


def _common_name(names: list[str]) -> str:
    """What an array's jobs' names share (submitit names the array after it too)."""
    prefix = os.path.commonprefix(names).rstrip("-_./=,")
    return prefix or names[0]


def expand(rows: Iterable[Row], key: str) -> Optional[list[Row]]:
    """The member jobs of the group ``key`` (``kfold-<id>``, a set id, ``array-<id>``, a
    Slurm array id), one row each; None when no group answers to ``key``."""
    for row in rows:
        if row.kind in ("kfold", "array") and key in (row.key, row.key.split("-", 1)[1]):
            return [job_row(r) for r in row.members]
    return None


def parse_since(text: str, now: Optional[float] = None) -> float:
    """``--since``: ``30m``, ``2h``, ``3d``, ``1w`` ago, or a date ``YYYY-MM-DD[THH:MM]`` -> epoch seconds."""
    now = time.time() if now is None else now
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return now - float(match.group(1)) * unit
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            return time.mktime(time.strptime(text.strip(), fmt))
        except ValueError:
            continue
    raise ConfigError(f"--since {text!r}: give a duration (30m, 2h, 3d, 1w) or a date (2026-12-01, 2026-12-01T08:00)")


def parse_states(values: Sequence[str]) -> set[JobState]:
    """``--state running,failed`` (repeatable, any case) -> states."""
    states = set()
    for value in values:
        for word in value.split(","):
            word = word.strip().upper()
            if not word:
                continue
            try:
                states.add(JobState(word))
            except ValueError:
                valid = ", ".join(s.value.lower() for s in JobState)
                raise ConfigError(f"--state {word.lower()!r}: not a job state; valid states: {valid}") from None
    return states


def select(records: Iterable[JobRecord], *, states: Optional[set[JobState]] = None,
           backends: Optional[set[str]] = None, name: Optional[str] = None,
           since: Optional[float] = None) -> list[JobRecord]:
    """The records that pass every filter given: state, backend, name (a substring, or a shell
    pattern with ``*?[``), submitted at or after ``since``."""
    pattern = name if name and any(c in name for c in "*?[") else None
    out = []
    for r in records:
        if states and r.state not in states:
            continue
        if backends and r.backend not in backends:
            continue
        if name and not (fnmatch.fnmatchcase(r.name, pattern) if pattern else name in r.name):
            continue
        if since is not None and r.submitted_at < since:
            continue
        out.append(r)
    return out


def recent(records: Iterable[JobRecord], window_s: float, now: Optional[float] = None) -> list[JobRecord]:
    """Unfinished records, and those that ended (or were submitted) within ``window_s``."""
    now = time.time() if now is None else now
    return [r for r in records if not r.state.finished or now - (r.ended_at or r.submitted_at) < window_s]


def elapsed_s(started_at: Optional[float], ended_at: Optional[float], now: Optional[float] = None) -> Optional[float]:
    """Run time in seconds (None before the start)."""
    if started_at is None:
        return None
    return max(0.0, (ended_at or now or time.time()) - started_at)


def elapsed_text(seconds: Optional[float]) -> str:
    """``1h02m``, ``3m05s``, ``12s``; ``-`` before the start."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 48:
        return f"{hours // 24}d{hours % 24:02d}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def to_json(record: JobRecord, now: Optional[float] = None) -> dict[str, Any]:
    """One job as ``orch status --json`` writes it (keys: :data:`JSON_KEYS`)."""
    group = group_of(record)
    return {
        "job_id": record.job_id, "name": record.name, "backend": record.backend, "state": record.state._value_,
        "group": group[1] if group else None, "native_id": record.native_id,
        "submitted_at": record.submitted_at, "started_at": record.started_at, "ended_at": record.ended_at,
        "elapsed_s": elapsed_s(record.started_at, record.ended_at, now), "exit_code": record.exit_code,
        "error": record.error, "output_dir": record.output_dir, "log_path": record.log_path,
        "config_path": record.config_path, "mlflow_run_id": record.mlflow_run_id,
        "tracking_uri": record.tracking_uri, "progress": progress_of(record),
    }


def progress_of(record: JobRecord) -> Optional[dict[str, Any]]:
    """A running job's live progress from its ranks' heartbeats (``step``, ``total``,
    ``images_per_s``, ``eta_s``, ``last_beat``); None for a job not running or not yet stepping.
    Only running jobs' folders are read, so a long listing of ended jobs costs nothing more."""
    if record.state is not JobState.RUNNING or not record.output_dir:
        return None
    from orchestrator.progress import read_progress

    progress = read_progress(record.output_dir)
    if progress is None:
        return None
    return {"step": progress.step, "total": progress.total, "images_per_s": progress.images_per_s,
            "eta_s": progress.eta_s, "last_beat": progress.last_beat, "text": progress.describe()}
