"""``orch sync``: ship run journals to an MLflow tracking server or SQLite file, now or again.

Training records everything in ``<output_dir>/journal/`` first; this command sends what is not
yet at the destination (``orchestrator.tracking.sync``). mlflow is imported only when it runs.
"""

from __future__ import annotations

from typing import Optional

import click


@click.command("sync")
@click.argument("paths", nargs=-1, type=click.Path(file_okay=False), metavar="DIR...")
@click.option("--uri", default=None, metavar="URI",
              help="Tracking URI to ship to (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db).")
@click.option("--watch", is_flag=True, help="Keep shipping new records until every run has ended (Ctrl-C stops).")
@click.option("--poll", type=float, default=5.0, show_default=True, metavar="S", help="Seconds between passes with --watch.")
def sync_cmd(paths: tuple[str, ...], uri: Optional[str], watch: bool, poll: float) -> int:
    """Ship the run journals under each DIR to MLflow (parents first; safe to repeat).

    \b
    Examples:
      orch sync work/shapes_demo                         # to $MLFLOW_TRACKING_URI or ./mlflow.db
      orch sync work/ --uri http://mlflow.example:5000   # every run under work/, to a server
      orch sync /scratch/me/runs --watch                 # follow running jobs (e.g. from a login node)
    """
    from cluster.errors import ConfigError
    from detection.tracking import resolve_tracking_uri
    from orchestrator.tracking.store import quiet_store_logs
    from orchestrator.tracking.sync import sync

    if not paths:
        raise ConfigError("orch sync: give at least one folder, e.g. orch sync work/ (a job's output folder or above)")
    target = uri or resolve_tracking_uri(None)
    quiet_store_logs()

    def show(summary) -> None:
        if watch:
            click.echo(summary.lines()[0])

    summary = sync(paths, target, watch=watch, poll_s=poll, on_pass=show)
    for line in summary.lines():
        click.echo(line)
    return 1 if summary.failed else 0
