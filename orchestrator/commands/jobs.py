"""``orch status``, ``orch logs``, ``orch cancel``: jobs of every backend, from any shell.

They read the records under ``$ORCH_HOME/jobs`` (:mod:`orchestrator.records`) and ask each job's
launcher for a fresh state (:mod:`orchestrator.jobs`).
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import click

from orchestrator.jobs import cancel_job, refresh_record
from orchestrator.records import list_records, load_record
from orchestrator.spec import JobRecord, JobState

RECENT_S = 24 * 3600
STATE_STYLE = {
    JobState.PENDING: "yellow", JobState.RUNNING: "cyan", JobState.SUCCEEDED: "green",
    JobState.FAILED: "red", JobState.CANCELLED: "magenta", JobState.UNKNOWN: "dim",
}


def elapsed(record: JobRecord, now: Optional[float] = None) -> str:
    """Run time (``1h02m``, ``3m05s``, ``12s``); queue time while pending shows as ``-``."""
    if record.started_at is None:
        return "-"
    seconds = int((record.ended_at or now or time.time()) - record.started_at)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _console():
    from rich.console import Console

    # Piped output (grep, a file) gets wide lines instead of wrapped job ids.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)


@click.command("status")
@click.argument("job", required=False)
@click.option("--all", "show_all", is_flag=True, help="Every job ever recorded (default: active or ended in the last 24 h).")
def status_cmd(job: Optional[str], show_all: bool) -> None:
    """Show jobs as a table, or the details of one JOB (an id or a unique prefix of one)."""
    if job:
        _show_one(refresh_record(load_record(job)))
        return
    from rich.table import Table

    now = time.time()
    records = [refresh_record(r) for r in list_records()]
    if not show_all:
        records = [r for r in records if not r.state.finished or now - (r.ended_at or r.submitted_at) < RECENT_S]
    console = _console()
    if not records:
        console.print("no jobs" + ("" if show_all else " in the last 24 h (orch status --all shows older ones)"))
        return
    table = Table(box=None, header_style="bold")
    for column in ("JOB ID", "NAME", "BACKEND", "STATE", "ELAPSED", "OUTPUT", "MLFLOW RUN"):
        table.add_column(column, overflow="fold", no_wrap=column != "OUTPUT")
    for r in records:
        state = f"[{STATE_STYLE[r.state]}]{r.state.value}[/]"
        table.add_row(r.job_id, r.name, r.backend, state, elapsed(r, now), r.output_dir, r.mlflow_run_id or "-")
    console.print(table)


def _show_one(r: JobRecord) -> None:
    console = _console()
    fmt = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"  # noqa: E731
    rows = [
        ("job", r.job_id), ("name", r.name), ("backend", r.backend + (f" ({r.native_id})" if r.native_id else "")),
        ("state", f"[{STATE_STYLE[r.state]}]{r.state.value}[/]"),
        ("submitted", fmt(r.submitted_at)), ("started", fmt(r.started_at)), ("ended", fmt(r.ended_at)),
        ("elapsed", elapsed(r)),
        ("exit status", "-" if r.exit_code is None else str(r.exit_code)),
        ("output", r.output_dir), ("config", r.config_path), ("log", r.log_path),
        ("mlflow run", r.mlflow_run_id or "-"),
    ]
    from orchestrator.launchers import launcher_for

    rows += launcher_for(r).describe(r)  # devices and port, Slurm state, a sweep's trials, ...
    if r.error:
        rows.append(("error", f"[red]{r.error}[/]"))
    for key, value in rows:
        console.print(f"[bold]{key:>12}[/]  {value}")
    if r.mlflow_run_id:
        uri = r.tracking_uri or "sqlite:///mlflow.db"
        console.print(f"\n  compare runs:  mlflow ui --backend-store-uri {uri}")
    if not r.state.finished:
        console.print(f"  follow:        orch logs -f {r.job_id}")


@click.command("logs")
@click.argument("job")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
def logs_cmd(job: str, follow: bool) -> None:
    """Print the log of JOB (every rank's output and orch's own lines)."""
    from orchestrator.jobs import follow_log

    follow_log(job, follow=follow)


@click.command("cancel")
@click.argument("job")
def cancel_cmd(job: str) -> None:
    """Cancel JOB: stop its processes (the whole process group), free its GPUs/slots and port.
    Cancelling a finished job does nothing."""
    before = load_record(job)
    record = cancel_job(before.job_id)
    if before.state.finished:
        click.echo(f"job {record.job_id} had already ended: {record.state.value}")
    else:
        click.echo(f"job {record.job_id}: {record.state.value}")
