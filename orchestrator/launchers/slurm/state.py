"""What Slurm says about jobs, with or without accounting: one query for many jobs.

``sacct`` is the only source that remembers finished jobs for long, but many clusters run without
accounting (``sacct`` then exits 1: "Slurm accounting storage is disabled"). submitit relies on
sacct alone and waits forever on a cancelled job there, so orch asks, in order, each source only
about the jobs the ones before did not know:

1. ``sacct -X -j id1,id2,...`` (allocation lines only; long lists in chunks of
   :data:`SACCT_CHUNK` ids; an array asked about by several of its tasks is asked for as one
   id), when accounting answers;
2. ``squeue -r -j ...`` (pending or running jobs; ``-r`` expands pending array tasks);
3. without accounting only: ``scontrol show job -o`` once (the controller's memory of every
   recent job, ``MinJobAge`` seconds: 300 by default);
4. submitit's result pickle in the job folder (success or error, written by the job itself).

One ``orch status`` therefore costs one ``sacct`` (per chunk) and at most one ``squeue``, however
many jobs it shows, never one command per job (FIELD_NOTES "Many jobs": per-job polling gets a
tool banned on a shared cluster). And however many ``orch status`` / ``--wait`` processes run, a
job is asked about at most once per :func:`poll_interval` seconds (``ORCH_SLURM_POLL_S``, default
:data:`POLL_S`): :func:`query_cached` keeps the answers in ``$ORCH_HOME/slurm-status.json``
(written under ``slurm-status.lock``; the holder of the lock asks, the others read its answers).

Standard library only; every query has a timeout so that a stuck controller cannot hang ``orch
status``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from cluster.files import file_lock, write_text_atomic
from orchestrator.spec import JobState

QUERY_TIMEOUT_S = 20
POLL_S = 5.0  # a job is asked about at most once per this many seconds (ORCH_SLURM_POLL_S)
SACCT_CHUNK = 500  # ids per sacct command line
CACHE_KEEP_S = 3600  # answers older than this are dropped from the cache file

# Slurm's job states (sacct/squeue/scontrol spell them alike) -> orch's words.
SLURM_STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "SPECIAL_EXIT": JobState.PENDING,
    "RESIZING": JobState.RUNNING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "SUSPENDED": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "COMPLETED": JobState.SUCCEEDED,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "FAILED": JobState.FAILED,
    "TIMEOUT": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,  # final only when the job was not requeued
}


@dataclass(frozen=True)
class SlurmStatus:
    """One answer about one job. ``raw`` is Slurm's own word (e.g. ``OUT_OF_MEMORY``),
    ``source`` says who answered (sacct, squeue, scontrol, result, none)."""

    state: JobState
    raw: str = ""
    exit_code: Optional[int] = None
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    source: str = "none"


def to_state(raw: str) -> JobState:
    """Slurm state word (``CANCELLED by 0``, ``RUNNING``, ``OUT_OF_MEMORY``) -> :class:`JobState`."""
    word = raw.strip().split()[0].rstrip("+").upper() if raw.strip() else ""
    return SLURM_STATES.get(word, JobState.UNKNOWN)


def parse_exit_code(text: str) -> Optional[int]:
    """Slurm's ``code:signal`` -> an exit status (``-signal`` when a signal killed it)."""
    match = re.fullmatch(r"\s*(\d+):(\d+)\s*", text or "")
    if not match:
        return None
    code, sig = int(match.group(1)), int(match.group(2))
    return -sig if sig and not code else code


def _timestamp(text: str) -> Optional[float]:
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, AttributeError):
        return None  # "Unknown", "None" for jobs that have not started or ended


def _run(cmd: list[str]) -> Optional[subprocess.CompletedProcess]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (subprocess.TimeoutExpired, OSError):
        return None


def read_result(result_path: Optional[str]) -> Optional[tuple[str, object]]:
    """submitit's ``(outcome, value)`` from the job folder, or None when the job has not written it."""
    if not result_path or not Path(result_path).exists():
        return None
    try:
        with open(result_path, "rb") as fh:
            return pickle.load(fh)
    except Exception:  # a half-written or unreadable pickle: as if absent (the job may still write it)
        return None


def query(native_id: str, result_path: Optional[str] = None) -> SlurmStatus:
    """The best available answer about job ``native_id`` (``123`` or an array task ``123_4``);
    uncached (:func:`query_many` of one)."""
    return query_many([native_id], {native_id: result_path})[native_id]


def poll_interval() -> float:
    """Seconds between two questions about the same job (``ORCH_SLURM_POLL_S``, else :data:`POLL_S`)."""
    try:
        return max(0.0, float(os.environ.get("ORCH_SLURM_POLL_S", POLL_S)))
    except ValueError:
        return POLL_S


def expand_ids(job_id: str) -> list[str]:
    """Slurm's compressed array ids as single ids: ``123_[1-3,7%2]`` -> ``123_1 123_2 123_3
    123_7``; anything else unchanged."""
    match = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job_id)
    if not match:
        return [job_id]
    base, ranges = match.groups()
    out = []
    for part in ranges.split(","):
        first, _, last = part.partition("-")
        out += [f"{base}_{i}" for i in range(int(first), int(last or first) + 1)]
    return out


def _ask_ids(native_ids: Sequence[str]) -> list[str]:
    """The ids to put on a command line: an array asked about by several of its tasks is asked
    for once, by its own id (Slurm answers with every task)."""
    tasks: dict[str, int] = {}
    for job_id in native_ids:
        if "_" in job_id:
            tasks[job_id.split("_")[0]] = tasks.get(job_id.split("_")[0], 0) + 1
    asked, seen = [], set()
    for job_id in native_ids:
        key = job_id.split("_")[0] if "_" in job_id and tasks[job_id.split("_")[0]] > 1 else job_id
        if key not in seen:
            seen.add(key)
            asked.append(key)
    return asked


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def sacct_many(native_ids: Sequence[str]) -> Optional[dict[str, SlurmStatus]]:
    """Accounting's answer for every job it knows among ``native_ids`` (one ``sacct`` per
    :data:`SACCT_CHUNK` ids); None when accounting is off or does not answer."""
    wanted = set(native_ids)
    answers: dict[str, SlurmStatus] = {}
    for chunk in _chunks(_ask_ids(native_ids), SACCT_CHUNK):
        proc = _run(["sacct", "-j", ",".join(chunk), "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Start,End"])
        if proc is None or proc.returncode != 0:
            return None
        for line in proc.stdout.splitlines():
            fields = line.split("|")
            if len(fields) < 5:
                continue
            status = SlurmStatus(to_state(fields[1]), fields[1], parse_exit_code(fields[2]),
                                 _timestamp(fields[3]), _timestamp(fields[4]), "sacct")
            for job_id in expand_ids(fields[0]):
                if job_id in wanted:
                    answers[job_id] = status
    return answers


def squeue_many(native_ids: Sequence[str]) -> dict[str, SlurmStatus]:
    """The queue's answer for the pending or running jobs among ``native_ids`` (one ``squeue``)."""
    if not native_ids:
        return {}
    wanted = set(native_ids)
    proc = _run(["squeue", "-h", "-r", "-j", ",".join(_ask_ids(native_ids)), "-o", "%i|%T|%S"])
    if proc is None or proc.returncode != 0:  # every id unknown to the queue ("Invalid job id")
        return {}
    answers = {}
    for line in proc.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3:
            for job_id in expand_ids(fields[0]):
                if job_id in wanted:
                    answers[job_id] = SlurmStatus(to_state(fields[1]), fields[1], None, _timestamp(fields[2]), None,
                                                  "squeue")
    return answers


def scontrol_many(native_ids: Sequence[str]) -> dict[str, SlurmStatus]:
    """The controller's memory of recent jobs (``MinJobAge``) for ``native_ids``: one
    ``scontrol show job -o`` for all of them."""
    if not native_ids:
        return {}
    proc = _run(["scontrol", "show", "job", "-o"])
    if proc is None or proc.returncode != 0:
        return {}
    wanted = set(native_ids)
    answers = {}
    for line in proc.stdout.splitlines():
        status, ids = _scontrol_line(line)
        for job_id in ids:
            if job_id in wanted:
                answers[job_id] = status
    return answers


def _scontrol_line(line: str) -> tuple[SlurmStatus, list[str]]:
    """One ``scontrol show job -o`` line: its status and the ids it answers for (an array task
    shows as ArrayJobId=123 ArrayTaskId=1, a plain job as JobId=123)."""
    fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
    task = fields.get("ArrayTaskId")
    ids = [fields.get("JobId", "")]
    if task and task != "N/A":
        ids += expand_ids(f"{fields.get('ArrayJobId')}_{task if task.isdigit() else '[' + task + ']'}")
    raw = fields.get("JobState", "")
    status = SlurmStatus(to_state(raw), raw, parse_exit_code(fields.get("ExitCode", "")),
                         _timestamp(fields.get("StartTime", "")), _timestamp(fields.get("EndTime", "")), "scontrol")
    return status, ids


def query_many(native_ids: Sequence[str], result_paths: Mapping[str, Optional[str]] = {}) -> dict[str, SlurmStatus]:
    """The best available answer about each of ``native_ids`` (see the module docstring for
    the order); ``result_paths`` names each job's submitit result pickle, the last resort."""
    ids = list(dict.fromkeys(native_ids))
    accounting = sacct_many(ids) if ids else {}
    answers = dict(accounting or {})
    missing = [i for i in ids if i not in answers]
    answers.update(squeue_many(missing))
    missing = [i for i in missing if i not in answers]
    if missing and accounting is None:
        answers.update(scontrol_many(missing))
        missing = [i for i in missing if i not in answers]
    for job_id in missing:
        outcome = read_result(result_paths.get(job_id))
        if outcome is not None:
            state = JobState.SUCCEEDED if outcome[0] == "success" else JobState.FAILED
            answers[job_id] = SlurmStatus(state, outcome[0], 0 if state is JobState.SUCCEEDED else None,
                                          source="result")
        else:
            answers[job_id] = SlurmStatus(JobState.UNKNOWN)
    return answers


def query_cached(native_ids: Sequence[str], result_paths: Mapping[str, Optional[str]], home: Path,
                 submitted: Mapping[str, float] = {}) -> dict[str, SlurmStatus]:
    """:func:`query_many`, asking Slurm only about the jobs whose last answer (kept in
    ``home/slurm-status.json``) is older than :func:`poll_interval`, or older than the job's
    submission (``submitted``: a cluster whose state was wiped reuses job ids). The lock is held
    while asking: a second ``orch status`` waits for the first one's answers instead of asking."""
    interval = poll_interval()
    home.mkdir(parents=True, exist_ok=True)
    cache_file = home / "slurm-status.json"
    with file_lock(home / "slurm-status.lock"):
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        now = time.time()
        stale = [i for i in dict.fromkeys(native_ids) if i not in cache or now - cache[i].get("at", 0) >= interval
                 or cache[i].get("at", 0) < submitted.get(i, 0)]
        if stale:
            fresh = query_many(stale, result_paths)
            cache = {k: v for k, v in cache.items() if now - v.get("at", 0) < CACHE_KEEP_S}
            for job_id, status in fresh.items():
                cache[job_id] = {**asdict(status), "state": status.state.value, "at": now}
            write_text_atomic(cache_file, json.dumps(cache))
    answers = {}
    for job_id in native_ids:
        entry = {k: v for k, v in cache.get(job_id, {}).items() if k != "at"}
        if entry:
            answers[job_id] = SlurmStatus(**{**entry, "state": JobState(entry["state"])})
    return answers


# srun's line for a task that died of a signal (not SIGTERM: orch then says itself what it did,
# e.g. "checkpoint written"): "srun: error: node1: task 0: Killed".
TASK_ENDED = re.compile(r"srun: error: \S+: tasks? [\d,-]+: ")
KILLED_TASK = re.compile(r"srun: error: (\S+): tasks? ([\d,-]+): (Killed|Aborted|Segmentation fault|Bus error)$")


def error_line(result_path: Optional[str], stderr_path: Optional[str]) -> Optional[str]:
    """One line saying why a job failed: a task srun saw killed by a signal (the cause, whatever
    the other ranks then raised: a gloo "connection closed"), else the last line of the
    traceback the job pickled, else the last non-empty line of its stderr file."""
    stderr = Path(stderr_path).read_text(errors="replace")[-20000:] if stderr_path and Path(stderr_path).exists() else ""
    # Only the first task srun reports: with --kill-on-bad-exit it kills the others after it.
    first = next((line.strip() for line in stderr.splitlines() if TASK_ENDED.match(line.strip())), "")
    killed = KILLED_TASK.match(first)
    if killed:
        node, task, how = killed.groups()
        hint = " (SIGKILL: kill -9, or the out-of-memory killer)" if how == "Killed" else ""
        return f"task {task} on {node}: {how}{hint}"
    outcome = read_result(result_path)
    text = outcome[1] if outcome and outcome[0] == "error" and isinstance(outcome[1], str) else None
    text = text or stderr
    if not text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Skip srun's trailing chatter ("srun: error: node1: task 0: Exited with exit code 1").
    useful = [line for line in lines if not line.startswith(("srun:", "slurmstepd:"))]
    return (useful or lines)[-1][:500] if lines else None


def lost_nodes() -> list[str]:
    """Nodes Slurm holds down or not responding (``sinfo``): after a NODE_FAIL, the hosts the job lost."""
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-t", "down,fail,no_respond", "-o", "%N"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted(set(proc.stdout.split())) if proc.returncode == 0 else []
