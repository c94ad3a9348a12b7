"""What Slurm says about a job, with or without accounting.

``sacct`` is the only source that remembers finished jobs for long, but many clusters run without
accounting (``sacct`` then exits 1: "Slurm accounting storage is disabled"). submitit relies on
sacct alone and waits forever on a cancelled job there, so orch asks, in order:

1. ``sacct -X`` (allocation line only), when accounting answers;
2. ``squeue`` (pending or running jobs);
3. ``scontrol show job`` (finished jobs for ``MinJobAge`` seconds, 300 by default);
4. submitit's result pickle in the job folder (success or error, written by the job itself).

Standard library only; every query has a timeout so that a stuck controller cannot hang ``orch
status``.
"""

from __future__ import annotations

import pickle
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator.spec import JobState

QUERY_TIMEOUT_S = 20

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


def from_sacct(native_id: str) -> Optional[SlurmStatus]:
    """Ask accounting; None when accounting is off or does not know the job yet."""
    proc = _run(["sacct", "-j", native_id, "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Start,End"])
    if proc is None or proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        fields = line.split("|")
        if len(fields) >= 5 and fields[0] == native_id:
            return SlurmStatus(to_state(fields[1]), fields[1], parse_exit_code(fields[2]),
                               _timestamp(fields[3]), _timestamp(fields[4]), "sacct")
    return None


def from_squeue(native_id: str) -> Optional[SlurmStatus]:
    """Ask the queue (pending and running jobs); ``-r`` expands pending array tasks."""
    proc = _run(["squeue", "-h", "-r", "-j", native_id, "-o", "%i|%T|%S"])
    if proc is None or proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3 and fields[0] == native_id:
            return SlurmStatus(to_state(fields[1]), fields[1], None, _timestamp(fields[2]), None, "squeue")
    return None


def from_scontrol(native_id: str) -> Optional[SlurmStatus]:
    """Ask the controller's memory of recent jobs (``MinJobAge``)."""
    proc = _run(["scontrol", "show", "job", "-o", native_id])
    if proc is None or proc.returncode != 0:
        return None
    # Array tasks show as ArrayJobId=123 ArrayTaskId=1; plain jobs as JobId=123.
    for line in proc.stdout.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        task = fields.get("ArrayTaskId")
        own_id = f"{fields.get('ArrayJobId')}_{task}" if task and task != "N/A" else fields.get("JobId")
        if own_id == native_id or fields.get("JobId") == native_id:
            raw = fields.get("JobState", "")
            return SlurmStatus(to_state(raw), raw, parse_exit_code(fields.get("ExitCode", "")),
                               _timestamp(fields.get("StartTime", "")), _timestamp(fields.get("EndTime", "")),
                               "scontrol")
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
    """The best available answer about job ``native_id`` (``123`` or an array task ``123_4``)."""
    for source in (from_sacct, from_squeue, from_scontrol):
        status = source(native_id)
        if status is not None:
            return status
    outcome = read_result(result_path)
    if outcome is not None:
        state = JobState.SUCCEEDED if outcome[0] == "success" else JobState.FAILED
        return SlurmStatus(state, outcome[0], 0 if state is JobState.SUCCEEDED else None, source="result")
    return SlurmStatus(JobState.UNKNOWN)


def accounting_enabled() -> bool:
    """True when ``sacct`` answers (slurmdbd configured and reachable)."""
    proc = _run(["sacct", "-n", "-X", "-j", "1", "-o", "JobID"])
    return proc is not None and proc.returncode == 0


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
