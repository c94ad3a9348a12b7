"""``orch sync``: ship run journals to an MLflow tracking server or SQLite file, now or again.

Training records everything in ``<output_dir>/journal/`` first; this command sends what is not
yet at the destination (``orchestrator.tracking.sync``). mlflow is imported only when it runs.
"""

from __future__ import annotations

from typing import Optional

import click


@click.command("sync")
@click.argument("targets", nargs=-1, metavar="[JOB|DIR]...")
@click.option("--all", "all_jobs", is_flag=True, help="Every job in the orch records (orch status --all).")
@click.option("--uri", default=None, metavar="URI",
              help="Tracking URI to ship every run to (default: the store each run was made for, as its "
                   "journal records; for older journals the job's, else $MLFLOW_TRACKING_URI, else "
                   "sqlite:///<cwd>/mlflow.db).")
@click.option("--watch", is_flag=True, help="Keep shipping new records until every run has ended (Ctrl-C stops).")
@click.option("--poll", type=float, default=5.0, show_default=True, metavar="S", help="Seconds between passes with --watch.")
def sync_cmd(targets: tuple[str, ...], all_jobs: bool, uri: Optional[str], watch: bool, poll: float) -> int:
    """Ship run journals to MLflow: of JOBs (ids or unique prefixes), or every run under DIRs
    (a job's output folder, a k-fold set, a sweep, or a folder copied home); parents first,
    safe to repeat (nothing is sent twice).

    \b
    Examples:
      orch sync shapes_demo-20261125                     # one job, to the store it was made for
      orch sync work_dirs/shapes_demo                    # the same, by its folder
      orch sync --all                                    # every recorded job
      orch sync work_dirs/ --uri http://mlflow.example:5000   # every run under work_dirs/, to a server
      orch sync /scratch/me/runs --watch                 # follow running jobs (e.g. from a login node)
    """
    from cluster.errors import ConfigError
    from orchestrator.tracking.store import quiet_store_logs
    from orchestrator.tracking.sync import sync

    groups = _targets(targets, all_jobs)
    if not groups and all_jobs and not targets:
        click.echo("no recorded job has a run folder to sync (orch train's runs: orch sync work_dirs/)")
        return 0
    if not groups:
        raise ConfigError("orch sync: give job ids, folders (e.g. orch sync work_dirs/) or --all")
    quiet_store_logs()
    failed = False
    for job_uri, paths in groups.items():
        def show(summary) -> None:
            if watch:
                click.echo(summary.lines()[0])

        summary = sync(paths, uri, watch=watch, poll_s=poll, on_pass=show, default=job_uri)
        for line in summary.lines():
            click.echo(line)
        failed = failed or bool(summary.failed)
    return 1 if failed else 0


def _targets(targets: tuple[str, ...], all_jobs: bool) -> dict[Optional[str], list[str]]:
    """Folders to sync, grouped by the tracking URI their jobs were submitted with (None: a
    folder given by hand)."""
    import os

    from orchestrator.records import list_records, load_record

    groups: dict[Optional[str], list[str]] = {}
    records = list_records() if all_jobs else []
    for target in targets:
        if os.path.isdir(target):
            groups.setdefault(None, []).append(target)
        else:
            records.append(load_record(target))  # JobNotFound: one line naming the target
    for record in records:
        if record.tracking_uri and os.path.isdir(record.output_dir):
            groups.setdefault(record.tracking_uri, []).append(record.output_dir)
    return groups
