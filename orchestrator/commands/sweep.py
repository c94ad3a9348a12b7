"""``orch sweep``: a Ray Tune search described by the experiment's ``sweep:`` section."""

from __future__ import annotations

import os
import sys

import click

from orchestrator.commands.common import set_option, wait_for_resources_option


@click.command("sweep")
@click.argument("experiment", type=click.Path(dir_okay=False), required=False)
@click.option("--resume", "resume", metavar="JOB", default=None,
              help="Finish sweep JOB whose driver died (or was cancelled): same job, same MLflow parent.")
@click.option("--address", default=None, help="Ray cluster: auto | HOST:PORT (default: a private local Ray).")
@click.option("--num-samples", type=int, default=None, help="Override sweep.num_samples.")
@click.option("--max-concurrent", type=int, default=None, help="Override sweep.max_concurrent.")
@click.option("--detach", is_flag=True, help="Return once the sweep is submitted; `orch status SWEEP` shows it.")
@click.option("--dry-run", is_flag=True, help="Print the search (space, scheduler, resources); start nothing.")
@wait_for_resources_option
@set_option
def sweep_cmd(experiment, resume, address, num_samples, max_concurrent, detach, dry_run, wait_for_resources,
              overrides) -> int:
    """Search hyperparameters of EXPERIMENT with Ray Tune; every trial is a full training run.

    \b
    The experiment needs a `sweep:` section, e.g.:
      sweep:
        space:
          optim.lr: {loguniform: [1.0e-4, 1.0e-2]}     # kinds: choice grid uniform loguniform randint
          model.backbone: {choice: [resnet18, resnet34]}
        num_samples: 8
        metric: bbox_mAP                               # any evaluation metric, or loss
        mode: max
        scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or fifo
        searcher: random                               # grid | optuna (if installed)
        max_concurrent: 4
        gpus_per_trial: 0.5                            # fractions share a GPU; 2+ = DDP per trial
        cpus_per_trial: 2
    \b
    MLflow: one parent run `<name>-sweep` with one child run per trial; the parent holds the
    best trial's params, metrics and best_config.yaml, and trials.md / trials.csv.
    \b
    Examples:
      orch sweep exp.yaml --dry-run
      orch sweep exp.yaml --num-samples 16 --address auto --detach
      orch sweep exp.yaml --address auto --wait-for-resources 10m   # an autoscaling cluster
      orch status SWEEP_ID                             # trials so far
      orch sweep --resume SWEEP_ID                     # its driver died: finish the sweep
    """
    if resume:
        if experiment or address or num_samples or max_concurrent or dry_run or overrides:
            raise click.UsageError("--resume JOB takes no experiment and no other option but --detach")
        return resume_sweep(resume, detach)
    if not experiment:
        raise click.UsageError("give an EXPERIMENT file (or --resume JOB)")
    from orchestrator.config import load_experiment
    from orchestrator.sweep import plan_sweep
    from orchestrator.sweep.driver import preflight_sweep, prepare_sweep
    from orchestrator.weights import resolve_weights

    extra = {"resources.ray.address": address, "sweep.num_samples": num_samples, "sweep.max_concurrent": max_concurrent}
    exp = load_experiment(experiment, overrides, extra=extra)
    plan = plan_sweep(exp, experiment)
    click.echo(plan.text)
    resolve_weights(exp, download=not dry_run, echo=click.echo)  # weights names -> the cache, before anything runs
    if dry_run:
        return 0
    preflight_sweep(plan, wait_for_resources or 0.0)  # a trial that can never fit: refused before anything exists
    plan = prepare_sweep(plan)
    job_id = plan.job_id
    from orchestrator.launchers.ray import start_driver

    # The sweep's driver always runs detached (its output goes to the job log), so closing the
    # terminal never kills a sweep; without --detach this command follows it.
    start_driver([sys.executable, "-m", "orchestrator.sweep.driver", os.path.join(plan.output_dir, "sweep.json")], job_id)
    click.echo(f"submitted sweep {job_id} (MLflow: {plan.tracking_uri or 'off'}; parent run journal "
               f"{plan.parent_journal or '-'})")
    if detach:
        click.echo(f"follow with: orch status {job_id} / orch logs -f {job_id}")
        return 0
    return attach(job_id)


def resume_sweep(job: str, detach: bool) -> int:
    """``orch sweep --resume JOB``: start a new driver for a sweep whose driver died (or that was
    cancelled). The job id, output folder and MLflow parent run stay; the record is reopened
    (:func:`orchestrator.records.reopen`), the parent run set RUNNING again, and Ray Tune restores
    the experiment (finished trials kept, the searcher's state, unfinished trials continued in
    their own folders from their last checkpoints)."""
    import json

    from cluster.errors import ConfigError, LaunchError
    from orchestrator import records
    from orchestrator.jobs import refresh_job
    from orchestrator.launchers.ray import start_driver
    from orchestrator.spec import JobState
    from orchestrator.sweep.plan import SweepPlan
    from orchestrator.sweep.report import reopen_parent_journal

    record = refresh_job(job)  # a driver found dead here is recorded FAILED first
    if record.extra.get("kind") != "sweep":
        raise ConfigError(f"job {record.job_id} is not a sweep; --resume finishes sweeps (other jobs: "
                          "resubmit with --set runtime.resume=auto)")
    if not record.state.finished:
        raise LaunchError(f"sweep {record.job_id} is {record.state.value}: its driver still runs; "
                          f"`orch cancel {record.job_id}` first to restart it")
    if record.state == JobState.SUCCEEDED:
        raise ConfigError(f"sweep {record.job_id} already finished; nothing to resume")
    sweep_json = os.path.join(record.output_dir, "sweep.json")
    try:
        with open(sweep_json) as handle:
            plan = SweepPlan.from_json(json.load(handle))
    except (OSError, ValueError) as err:
        raise ConfigError(f"sweep {record.job_id} cannot be resumed: {sweep_json}: {err}") from None
    records.reopen(record.job_id)
    reopen_parent_journal(plan)
    start_driver([sys.executable, "-m", "orchestrator.sweep.driver", sweep_json, "--resume"], record.job_id)
    click.echo(f"resuming sweep {record.job_id} (trials in {record.output_dir}/trials)")
    if detach:
        click.echo(f"follow with: orch status {record.job_id} / orch logs -f {record.job_id}")
        return 0
    return attach(record.job_id)


def attach(job_id: str) -> int:
    """Stream the sweep's log until it ends, then print the trial table. Ctrl-C cancels it."""
    from orchestrator.jobs import cancel_job, follow_log
    from orchestrator.spec import JobState
    from orchestrator.sweep.report import trial_table

    try:
        record = follow_log(job_id)
    except KeyboardInterrupt:
        click.echo(f"\ncancelling sweep {job_id} ...", err=True)
        record = cancel_job(job_id)
    click.echo(trial_table(record))
    return 0 if record.state == JobState.SUCCEEDED else 1
