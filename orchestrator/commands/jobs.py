"""``orch status``, ``orch logs``, ``orch cancel``: jobs of every backend, from any shell.

They read the records under ``$ORCH_HOME/jobs`` (:mod:`orchestrator.records`, through its index)
and ask each backend once for the fresh states of its unfinished jobs (:mod:`orchestrator.jobs`);
the rows, groups and filters are :mod:`orchestrator.jobview`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import click

from cluster.errors import ConfigError
from orchestrator.jobs import cancel_job, refresh_record, refresh_records
from orchestrator.jobview import (Row, elapsed_s, elapsed_text, expand, job_row, parse_since, parse_states,
                                  progress_of, recent, rows_of, select, to_json)
from orchestrator.records import list_records, load_record
from orchestrator.spec import JobRecord, JobState

RECENT_S = 24 * 3600
# Up to this many rows a rich table; beyond, plain formatted lines (rich lays out every cell,
# ~3 ms a row here: 10,000 rows took tens of seconds).
RICH_ROWS = 60
STATE_STYLE = {
    JobState.PENDING: "yellow", JobState.RUNNING: "cyan", JobState.SUCCEEDED: "green",
    JobState.FAILED: "red", JobState.CANCELLED: "magenta", JobState.UNKNOWN: "dim",
}
COLUMNS = ("JOB ID", "NAME", "BACKEND", "STATE", "ELAPSED", "OUTPUT", "MLFLOW")


def elapsed(record: JobRecord, now: Optional[float] = None) -> str:
    """Run time (``1h02m``, ``3m05s``, ``12s``); queue time while pending shows as ``-``."""
    return elapsed_text(elapsed_s(record.started_at, record.ended_at, now))


def _console():
    from rich.console import Console

    # Piped output (grep, a file) gets wide lines instead of wrapped job ids.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)


@click.command("status")
@click.argument("job", required=False)
@click.option("--all", "show_all", is_flag=True, help="Every job ever recorded (default: active or ended in the last 24 h).")
@click.option("--state", "states", multiple=True, metavar="STATE[,STATE]",
              help="Only jobs in these states (pending, running, succeeded, failed, cancelled, unknown).")
@click.option("--backend", "backends", multiple=True, help="Only jobs of this backend (repeatable).")
@click.option("--name", default=None, help="Only jobs whose name contains NAME (or matches it, with * ? [).")
@click.option("--since", default=None, help="Only jobs submitted since: 30m, 2h, 3d, 1w, or a date (2026-12-01).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job (see the README for the keys).")
@click.option("--watch", "watch_s", type=float, default=None, is_flag=False, flag_value=5.0, metavar="[SECONDS]",
              help="Refresh in place every SECONDS (default 5) until Ctrl-C.")
def status_cmd(job: Optional[str], show_all: bool, states: tuple[str, ...], backends: tuple[str, ...],
               name: Optional[str], since: Optional[str], as_json: bool, watch_s: Optional[float]) -> None:
    """Show jobs: one line per job, Slurm array, k-fold set and sweep, with their states counted,
    and a running job's step, images per second and ETA (from its ranks' heartbeats).
    JOB: the details of one job (an id or a unique prefix of one), or every job of a k-fold set
    or array (kfold-<set id>, array-<Slurm id>, as listed)."""
    if watch_s is None:
        _status_once(job, show_all, states, backends, name, since, as_json)
        return
    if watch_s <= 0 or as_json:
        raise ConfigError("--watch takes a number of seconds above 0, and no --json (a script polls on its own)")
    try:
        while True:
            click.clear()
            click.echo(time.strftime("%H:%M:%S") + f"  (every {watch_s:g} s; Ctrl-C ends)")
            _status_once(job, show_all, states, backends, name, since, as_json)
            time.sleep(watch_s)
    except KeyboardInterrupt:
        click.echo("")


def _status_once(job: Optional[str], show_all: bool, states: tuple[str, ...], backends: tuple[str, ...],
                 name: Optional[str], since: Optional[str], as_json: bool) -> None:
    now = time.time()
    wanted = parse_states(states)
    start = parse_since(since, now) if since else None
    records = list_records()
    if job:
        members = expand(rows_of(records), job)
        if members is None:
            record = refresh_record(load_record(job))
            if as_json:
                _print_json([to_json(record, now)])
            else:
                _show_one(record)
            return
        records = [row.members[0] for row in members]
    elif not (show_all or start is not None):
        records = recent(records, RECENT_S, now)
    if start is not None:
        records = select(records, since=start)
    records = refresh_records(records)
    records = select(records, states=wanted, backends=set(backends), name=name)
    if as_json:
        _print_json([to_json(r, now) for r in records])
        return
    if not records:
        filtered = wanted or backends or name or start is not None
        click.echo("no jobs" + (" match" if filtered else "")
                   + ("" if show_all or job or filtered else " in the last 24 h (orch status --all shows older ones)"))
        return
    rows = [job_row(r) for r in records] if job else rows_of(records)
    cells = [_cells(row, now, links=len(rows) <= RICH_ROWS) for row in rows]
    if len(rows) <= RICH_ROWS:
        _print_table(rows, cells)
    else:
        _print_lines(cells)
    if not job:
        _print_pending_shipments()


def _print_json(objects: list[dict]) -> None:
    """A JSON array, one object a line (the C encoder: ``indent`` would use the pure-Python one,
    ~0.15 s for 10,000 jobs)."""
    sys.stdout.write("[\n" + ",\n".join(map(json.dumps, objects)) + "\n]\n")


def _print_pending_shipments(shown: int = 5) -> None:
    """What still waits to reach MLflow (journals registered with a host's shipper and not yet
    shipped to their final status): a count, the oldest few, and how to ship them by hand."""
    from orchestrator.tracking.pending import pending_shipments

    pending = pending_shipments()
    if not pending:
        return
    click.echo(f"\nMLflow: {len(pending)} run(s) waiting to be shipped")
    for shipment in pending[:shown]:
        click.echo(f"  {shipment.describe()}")
    if len(pending) > shown:
        click.echo(f"  ... and {len(pending) - shown} more (orch sync DIR ships a folder's runs now)")


def _cells(row: Row, now: float, links: bool) -> tuple[str, ...]:
    """The texts of one row, in :data:`COLUMNS` order (MLflow: the UI page of the run's
    experiment where the view is short enough to look it up, else the run id)."""
    first = row.members[0]
    output = first.output_dir if row.kind in ("job", "sweep") else os.path.commonpath([r.output_dir for r in row.members])
    link = first.mlflow_run_id or "-"
    if first.tracking_uri and (links or row.kind != "job"):
        link = _mlflow_link(first) or link
    return (row.key, row.name, row.backend, row.counts_text(),
            elapsed_text(elapsed_s(row.started_at, row.ended_at, now)), output, link)


def _mlflow_link(record: JobRecord) -> Optional[str]:
    from orchestrator.tracking.runs import experiment_id_of, journal_dir, ui_url

    experiment = experiment_id_of(journal_dir(record.output_dir), record.tracking_uri)
    return ui_url(record.tracking_uri, experiment) if experiment else None


def _print_table(rows: list[Row], cells: list[tuple[str, ...]]) -> None:
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in COLUMNS:
        table.add_column(column, overflow="fold", no_wrap=column != "OUTPUT")
    for row, texts in zip(rows, cells):
        style = STATE_STYLE[row.state]
        table.add_row(*texts[:3], f"[{style}]{texts[3]}[/]", *texts[4:])
    _console().print(table)


def _print_lines(cells: list[tuple[str, ...]]) -> None:
    """Plain aligned lines (a long listing: no per-cell layout); paths and links are not padded."""
    columns = list(zip(COLUMNS, *cells))
    line = "  ".join([*(f"{{:<{max(map(len, column))}}}" for column in columns[:5]), *["{}"] * (len(COLUMNS) - 5)])
    sys.stdout.write("\n".join(line.format(*texts) for texts in [COLUMNS, *cells]) + "\n")


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
    live = progress_of(r)
    if live:
        rows.insert(4, ("progress", live["text"]))
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
