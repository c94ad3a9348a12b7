"""``orch why JOB``: one screen on why a job ended the way it did (or what it does now).

The state and its one-line reason; the first rank to fail, by time, with its host and exit
status or signal ("out of memory" when the kernel's OOM killer named its pid); the lines of its
output around the exception; the hang report when the watchdog wrote one; what ran (the command
lines, or the sbatch script) with its resources; the next step. Everything comes from the job's
record, its log files and its output folder (no MLflow, no torch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import click

from orchestrator.jobs import refresh_record
from orchestrator.progress import read_progress
from orchestrator.records import load_record
from orchestrator.spec import JobRecord, JobState

if TYPE_CHECKING:
    from orchestrator.watchdog import HangReport

# The local launcher's and the watchdog's modules are imported where used: every `orch` command
# (`orch status` too) imports this module.

CONTEXT_LINES = 12
TRACEBACK = re.compile(r"Traceback \(most recent call last\):")
BAD_INPUT = re.compile(r"\b(cluster\.errors\.)?(ConfigError|DataError)\b")  # the user's input, not a crash


@dataclass(frozen=True)
class Failure:
    """The first process of a job to fail: ``who`` ("rank 1", "task 3"), ``host``, the exit
    status (negative: a signal) and whether the kernel's OOM killer did it."""

    who: str
    host: str
    code: Optional[int]
    oom: Optional[bool] = False  # None: a SIGKILL, and the kernel log could not be read
    died: bool = False  # its process vanished, and what ended it is not known (Ray does not say)
    rank: Optional[int] = None  # its rank (or Slurm task), where known: its own output is shown
    pid: Optional[int] = None
    log: Optional[str] = None  # the file that holds its own output, where it has one

    def describe(self) -> str:
        text = self.who + (f" on {self.host}" if self.host else "")
        if self.died and self.oom:
            return f"{text} was killed by SIGKILL (signal 9) - out of memory (the kernel's OOM killer)"
        if self.died:
            return (f"{text} died without an error of its own: killed by a signal (kill -9, or the out-of-memory "
                    "killer) or crashed; Ray does not record which")
        if self.code is None:
            return text + " failed"
        if self.code < 0:
            try:
                name = signal.Signals(-self.code).name
            except ValueError:
                name = f"signal {-self.code}"
            cause = (" - out of memory (the kernel's OOM killer)" if self.oom
                     else " (kill -9, or the out-of-memory killer: no kernel log readable here says which)"
                     if self.oom is None else " (not by the out-of-memory killer: the kernel log does not name it)"
                     if -self.code == signal.SIGKILL else "")
            return f"{text} was killed by {name} (signal {-self.code}){cause}"
        return f"{text} exited with status {self.code}" + (" (bad input)" if self.code == 2 else "")


@click.command("why")
@click.argument("job")
def why_cmd(job: str) -> None:
    """Say why JOB failed (or where it is): first failing rank, its output, hang report, what ran, next step."""
    click.echo(explain(refresh_record(load_record(job))))


def explain(record: JobRecord) -> str:
    """The whole screen for ``record``."""
    out = [f"job {record.job_id} ({record.name}, {record.backend}"
           + (f" {record.native_id}" if record.native_id else "") + f"): {record.state.value}"]
    if record.error:
        out.append(f"reason: {record.error}")
    if not record.state.finished:
        progress = read_progress(record.output_dir)
        out.append("progress: " + (progress.describe() + f", last beat {time.time() - progress.last_beat:.0f} s ago"
                                   if progress else "no heartbeat yet"))
    failure, lines = first_failure(record), []
    if failure is not None:
        out.append(f"first failure: {failure.describe()}")
    log_file = failure_log(record)
    if failure is not None and failure.rank is not None and (failure.died or (failure.code or 0) < 0):
        own = own_output(failure, failure.log or log_file)  # killed: no traceback; what it did last
        out.append(f"output of {failure.who} ({failure.log or log_file}): "
                   + ("its last lines:" if own else "none of its own; the job's last lines:"))
        out.extend("  " + line for line in (own or read_tail(log_file).splitlines()[-CONTEXT_LINES:]))
    elif record.state is JobState.FAILED and log_file:
        lines = around_error(read_tail(log_file))
        if lines:
            out.append(f"output ({log_file}):")
            out.extend("  " + line for line in lines)
    hang = hang_report(record)
    if hang is not None:
        out.append(f"hang report: {hang.folder}")
        if hang.reason and hang.reason != record.error:
            out.append(f"  {hang.reason}")
        out.extend(f"  {name}" for name in sorted(os.listdir(hang.folder)) if name.startswith("rank-"))
    if record.extra.get("kind") == "sweep":
        out.extend(sweep_trials(record.output_dir))
    out.append("what ran:")
    out.extend("  " + line for line in what_ran(record))
    out.append("next: " + next_step(record, failure, hang, lines))
    return "\n".join(out)


# -- the first failure ----------------------------------------------------------------------------
def first_failure(record: JobRecord) -> Optional[Failure]:
    """The first process to fail by time, from what the supervisor recorded (local), torchrun's
    root cause in the log, or the failed Slurm task's log."""
    if record.state is not JobState.FAILED:
        return None
    host = str(record.extra.get("host") or "")
    if record.backend in ("local", "torchrun"):
        from orchestrator.launchers.local.reasons import TORCHRUN_ROOT

        tail = read_tail(record.log_path)
        roots = TORCHRUN_ROOT.findall(tail)
        if roots:
            rank, code, pid = roots[-1]
            return Failure(f"rank {rank} (pid {pid})", host, int(code),
                           oom_killed(int(pid)) if int(code) == -signal.SIGKILL else False, rank=int(rank), pid=int(pid))
        exits = [e for e in record.extra.get("exits") or [] if e["code"] != 0 and not e.get("stopped")]
        if exits:
            first = exits[0]
            who = f"rank {first['index']}" if record.backend == "local" else f"torchrun agent {first['index']}"
            return Failure(f"{who} (pid {first['pid']})", host, first["code"],
                           oom_killed(first["pid"]) if first["code"] == -signal.SIGKILL else False,
                           rank=first["index"] if record.backend == "local" else None, pid=first["pid"])
        return None
    if record.backend == "slurm":
        ended = srun_task_end(read_tail(record.log_path))
        if ended is not None:
            return dataclasses.replace(ended, log=slurm_task_log(record, ended.rank))
        task = failed_slurm_task(record)
        if task is not None:
            return Failure(f"task {task[0]}", task[1], record.exit_code)
    if record.backend == "ray" and record.extra.get("worker_failures"):
        return ray_worker_failure(record)
    return Failure("the job", host, record.exit_code) if record.exit_code not in (None, 0) else None


def ray_worker_failure(record: JobRecord) -> Failure:
    """The Ray Train worker that failed first: one whose process died (the others then fail in
    their collectives), else the lowest failed rank; its host and pid from its heartbeat."""
    rows = record.extra["worker_failures"]
    first = next((row for row in rows if row["died"]), rows[0])
    progress = read_progress(record.output_dir)
    beat = progress.ranks.get(first["rank"]) if progress else None
    pid, host = (beat.pid, beat.host) if beat else (None, "")
    oom = oom_killed(pid) if first["died"] and pid and host == socket.gethostname() else None
    return Failure(f"rank {first['rank']}" + (f" (pid {pid})" if pid else ""), host, None, oom,
                   died=first["died"], rank=first["rank"], pid=pid)


def own_output(failure: Failure, log_file: Optional[str]) -> list[str]:
    """The last lines that ``failure``'s rank wrote: its own log file (a Slurm task's), else the
    lines of the job's log that name its rank (``[rank 1]``, torch's ``[rank1]:``) or its pid
    (Ray's ``(RayTrainWorker pid=N)``)."""
    lines = read_tail(log_file).splitlines()
    if failure.log is None:
        marks = [f"[rank {failure.rank}]", f"[rank{failure.rank}]"] + ([f"pid={failure.pid})", f"pid={failure.pid},"]
                                                                         if failure.pid else [])
        lines = [line for line in lines if any(mark in line for mark in marks)]
    return [line[:300] for line in lines[-CONTEXT_LINES:]]


def oom_killed(pid: int) -> Optional[bool]:
    """Whether the kernel log says its OOM killer killed ``pid`` (None where it cannot be read)."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    pattern = re.compile(rf"(Out of memory|oom-kill|Killed process)\D*\b{pid}\b", re.I)
    return any(pattern.search(line) for line in out.stdout.splitlines())


SRUN_SIGNALS = {"Killed": signal.SIGKILL, "Aborted": signal.SIGABRT, "Segmentation fault": signal.SIGSEGV,
                "Bus error": signal.SIGBUS, "Terminated": signal.SIGTERM}
SRUN_EXIT = re.compile(r"Exited with exit code (\d+)")
SLURM_OOM = re.compile(r"oom[-_ ]kill", re.I)  # slurmstepd: "Detected 1 oom_kill event in StepId=..."


def srun_task_end(log_tail: str) -> Optional[Failure]:
    """The first task srun reported ended badly ("srun: error: node2: task 1: Killed"): srun
    reports them as it sees them, and with --kill-on-bad-exit the others only after it."""
    from orchestrator.launchers.slurm.state import TASK_ENDED

    line = next((line.strip() for line in log_tail.splitlines() if TASK_ENDED.match(line.strip())), None)
    if line is None:
        return None
    node, tasks, how = line[len("srun: error: "):].split(": ", 2)
    task = int(re.split(r"[,-]", tasks.split()[-1])[0])
    if how in SRUN_SIGNALS:
        code = -int(SRUN_SIGNALS[how])
        oom = (True if SLURM_OOM.search(log_tail) else None) if how == "Killed" else False
        return Failure(f"task {task}", node, code, oom, rank=task)
    exited = SRUN_EXIT.search(how)
    return Failure(f"task {task}", node, int(exited.group(1)) if exited else None, rank=task)


def slurm_task_log(record: JobRecord, task: Optional[int]) -> Optional[str]:
    """Task ``task``'s own log (submitit's ``<id>_<task>_log.out``), where it exists."""
    return next((str(p) for p in slurm_task_logs(record) if p.name.endswith(f"_{task}_log.out")), None)


def slurm_task_logs(record: JobRecord) -> list[Path]:
    """The per-task logs submitit wrote for the job (``<id>_<task>_log.out``)."""
    folder = record.extra.get("slurm_folder")
    if not folder or not record.native_id or not os.path.isdir(folder):
        return []
    pattern = re.compile(rf"{re.escape(record.native_id)}_(\d+)_log\.(out|err)$")
    return sorted((Path(folder) / n for n in os.listdir(folder) if pattern.match(n)),
                  key=lambda p: int(pattern.match(p.name).group(1)))


def failed_slurm_task(record: JobRecord) -> Optional[tuple[int, str, Path]]:
    """(task, host, log) of the Slurm task whose log holds an error, the earliest written first."""
    from orchestrator.launchers.local.reasons import error_line

    bad = []
    for path in slurm_task_logs(record):
        tail = read_tail(str(path))
        if error_line(tail.splitlines()):
            task = int(path.name.split("_")[-2])
            host = re.search(r"(?:on|host(?:name)?)[ =:]+([\w.-]+)", tail)
            bad.append((path.stat().st_mtime, task, host.group(1) if host else "", path))
    return min(bad)[1:] if bad else None


def failure_log(record: JobRecord) -> Optional[str]:
    """The log holding the first failure's output."""
    if record.backend == "slurm":
        task = failed_slurm_task(record)
        if task is not None:
            return str(task[2])
    return record.log_path if record.log_path and os.path.exists(record.log_path) else None


def read_tail(path: Optional[str], size: int = 131072) -> str:
    """The last ``size`` bytes of a text file ('' when unreadable)."""
    try:
        with open(path or "", "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def around_error(text: str) -> list[str]:
    """The lines around the first failure's exception: from the traceback that leads to the
    job's error line (orch's one-line reason, else the last error) to just after it."""
    from orchestrator.launchers.local.reasons import error_line

    lines = text.splitlines()
    wanted = error_line(lines)
    if wanted is None:
        return lines[-CONTEXT_LINES:]
    at = max(i for i, line in enumerate(lines) if line.strip()[:500] == wanted)
    start = at - CONTEXT_LINES
    for i in range(at, max(-1, at - 200), -1):
        if TRACEBACK.search(lines[i]):
            start = i
            break
    if at - start > 2 * CONTEXT_LINES:  # a long traceback: its head and its end
        lines_out = lines[start:start + 3] + ["..."] + lines[at - CONTEXT_LINES:at + 2]
    else:
        lines_out = lines[max(0, start):at + 2]
    return [line[:300] for line in lines_out]


def hang_report(record: JobRecord) -> Optional[HangReport]:
    """The job's hang report (one written by this run, not an earlier one in the same folder)."""
    from orchestrator.watchdog import latest_report

    if record.extra.get("hang") and os.path.isdir(record.extra["hang"]):
        return latest_report(os.path.dirname(record.extra["hang"]))
    report = latest_report(record.output_dir)
    if report is None or (record.started_at and os.path.getmtime(report.folder) < record.started_at):
        return None
    return report


def sweep_trials(output_dir: str) -> list[str]:
    """One line per trial of a sweep (its progress, hang or Tune's error), then the first failed
    trial's error."""
    from orchestrator.watchdog import latest_report

    trials_dir = Path(output_dir) / "trials"
    trials = sorted(p.name for p in trials_dir.iterdir()) if trials_dir.is_dir() else []
    errors = {}
    for path in Path(output_dir).glob("**/error.txt"):
        trial = next((t for t in trials if t in str(path.parent)), None)
        if trial is not None:
            errors.setdefault(trial, path)
    lines = [f"trials: {len(trials)}"]
    for trial in trials:
        progress = read_progress(str(trials_dir / trial))
        hang = latest_report(str(trials_dir / trial))
        state = "failed" if trial in errors else "hung" if hang else "ok"
        lines.append(f"  {trial}: {state}" + (f", {progress.describe()}" if progress else "")
                     + (f"; {hang.reason}" if hang else ""))
    failed = next((t for t in trials if t in errors), None)
    if failed is not None:
        lines.append(f"first failed trial {failed} ({errors[failed]}):")
        lines.extend("  " + line for line in around_error(read_tail(str(errors[failed]))))
    return lines


# -- what ran ------------------------------------------------------------------------------------
def what_ran(record: JobRecord) -> list[str]:
    """The command lines (local, torchrun) or sbatch script (Slurm) and the resources."""
    lines = [f"config {record.config_path}", f"output {record.output_dir}", f"log {record.log_path}"]
    if record.backend in ("local", "torchrun"):
        from orchestrator.launchers.local.plan import format_command

        supervisor = record.extra.get("supervisor_log")
        payload = Path(supervisor).with_name("supervisor.json") if supervisor else None
        try:
            jobs = json.loads(payload.read_text())["jobs"] if payload else []
        except (OSError, ValueError, KeyError):
            jobs = []
        for job in (j for j in jobs if j.get("job_id") == record.job_id):
            for command in job["commands"]:
                lines.append("$ " + format_command(command["argv"], command["env"]))
        devices = ",".join(record.extra.get("devices") or []) or "-"
        lines.append(f"resources: devices {devices}, port {record.extra.get('port') or '-'}, "
                     f"world size {record.extra.get('world_size') or record.extra.get('slots') or '-'}")
    elif record.backend == "slurm":
        script = record.extra.get("submission_file")
        if script and os.path.exists(script):
            lines.append(f"sbatch script {script}:")
            text = Path(script).read_text(errors="replace").splitlines()
            lines.extend("  " + line for line in text if line.startswith("#SBATCH") or line.startswith("srun"))
        if record.extra.get("slurm_state"):
            lines.append(f"slurm state {record.extra['slurm_state']}")
    elif record.backend == "ray":
        lines.append(f"ray address {record.extra.get('address') or 'auto'}, job {record.native_id or '-'}")
    return lines


def next_step(record: JobRecord, failure: Optional[Failure], hang: Optional[HangReport], lines: list[str]) -> str:
    """The one thing to do next."""
    resume = f"orch submit {shlex.quote(record.config_path)} --set runtime.resume=auto"
    if record.state is JobState.SUCCEEDED:
        return "nothing: the job succeeded"
    if record.state is JobState.CANCELLED:
        return f"it was cancelled; continue it with: {resume}"
    if not record.state.finished:
        return f"follow it with: orch logs -f {record.job_id}"
    if hang is not None:
        return (f"see the stacks in {hang.folder}; fix what the blocked rank waits for (a file system, a "
                f"deadlock), or raise runtime.hang_timeout if a step is that slow; then: {resume}")
    if failure is not None and failure.oom:
        return f"lower data.batch_size_per_gpu (or ask for more memory: --mem-gb), then: {resume}"
    text = "\n".join([record.error or "", *lines])
    if "orch worker: error:" in text or BAD_INPUT.search(text) or (failure is not None and failure.code == 2):
        return (f"fix what the error names (a config key or file: `orch config {shlex.quote(record.config_path)}` "
                "checks the file), then submit again")
    return f"fix the cause above, then continue from the last checkpoint: {resume}"
