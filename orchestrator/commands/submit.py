"""``orch submit``: resolve, plan, launch on a backend."""

from __future__ import annotations

import click

from orchestrator.commands.common import resource_options, set_option


@click.command("submit")
@click.argument("experiments", nargs=-1, required=True, type=click.Path(dir_okay=False))
@resource_options
@set_option
@click.option("--dry-run", is_flag=True, help="Print exactly what would run; start and write nothing.")
@click.option("--wait", "wait_", is_flag=True, help="Block until the jobs end, streaming the log.")
@click.option("--no-data-check", is_flag=True,
              help="Do not check here that annotation files and image folders exist (data only on compute nodes).")
def submit_cmd(experiments, flags, overrides, dry_run, wait_, no_data_check) -> int:
    """Launch EXPERIMENTS on a backend and return at once (job ids printed).

    \b
    Examples:
      orch submit exp.yaml                                # local, this machine
      orch submit a.yaml b.yaml c.yaml --gpus 4           # 2 at a time on an 8-GPU node
      orch submit exp.yaml --backend torchrun --nodes 2 --gpus-per-node 8 --dry-run
      orch submit exp.yaml --partition dev --gpus 16      # Slurm, 2 nodes x 8 GPUs
      orch submit exp.yaml --backend ray --address auto --gpus 4
      orch submit exp.yaml --dry-run                      # show the plan only
    """
    from orchestrator.submit import submit

    plan, handles = submit(list(experiments), tuple(overrides), flags, dry_run=dry_run, check_data=not no_data_check)
    if dry_run:
        click.echo(str(plan))
        return 0
    for job, handle in zip(plan.jobs, handles):
        click.echo(f"submitted {handle.job_id} ({plan.backend}), outputs in {job.output_dir}")
    if not wait_:
        click.echo("follow with: orch status / orch logs -f JOB")
        return 0
    return _wait(handles)


def _wait(handles) -> int:
    """Block until every job ends, streaming the first job's log; exit 1 if any failed."""
    from orchestrator.jobs import follow_log
    from orchestrator.records import load_record
    from orchestrator.spec import JobState

    try:
        if len(handles) == 1:
            follow_log(handles[0].job_id)
        states = [handle.wait() for handle in handles]
    except KeyboardInterrupt:
        # Ctrl-C stops the waiting, not the jobs: say so, and how to stop them too.
        cancel = "; ".join(f"orch cancel {handle.job_id}" for handle in handles)
        click.echo(f"\norch: stopped waiting; the job{'s go' if len(handles) > 1 else ' goes'} on. "
                   f"Follow with: orch logs -f {handles[0].job_id}   cancel with: {cancel}", err=True)
        return 130
    failed = 0
    for handle, state in zip(handles, states):
        record = load_record(handle.job_id)
        click.echo(f"{handle.job_id}: {state.value}" + (f" ({record.error})" if record.error else ""))
        failed += state != JobState.SUCCEEDED
        _print_outcome(record)
    return 1 if failed else 0


def _print_outcome(record) -> None:
    """Final metrics (from the job's result.json) and the `mlflow ui` command that shows the run
    (its shipper sends it in the background: waited for a little, not forever)."""
    import json
    from pathlib import Path

    from orchestrator.commands.report_util import mlflow_ui_hint, print_metrics
    from orchestrator.tracking.runs import journal_dir, wait_shipped

    result_file = Path(record.output_dir) / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
        print_metrics(result.get("metrics", {}), title=f"{record.name}: final metrics")
    run_id = record.mlflow_run_id or wait_shipped(journal_dir(record.output_dir), record.tracking_uri, SHIP_WAIT_S)
    hint = mlflow_ui_hint(record.tracking_uri, run_id, journal_dir(record.output_dir))
    if hint:
        click.echo(hint + ("" if run_id else f"   (still shipping; `orch sync {record.output_dir}` sends it now)"))


SHIP_WAIT_S = 60.0
