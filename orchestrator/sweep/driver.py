"""The driver of ``orch sweep``: a Ray Tune search over any config keys, recorded in MLflow as one
parent run with one child run per trial, in the experiment file's MLflow experiment.

Why a function trainable and not ``Tuner(TorchTrainer)``: Train V2 refuses a Trainer inside a
Tuner. Each trial (:mod:`orchestrator.sweep.trial`) runs one full orch training through the
worker path; each evaluation is one Tune iteration, so ASHA's ``grace_period`` and ``max_t``
count evaluations.

Identity is decided up front (:func:`prepare_sweep`): the job record, the output folder and the
parent MLflow run exist before Ray starts; each trial creates its child run when it starts. At the
end the sweep ends every child that a scheduler stopped (tag ``orch.stopped_early=true``, status
KILLED, never left RUNNING) and writes the best trial's config and metrics plus a table of all
trials on the parent (:mod:`orchestrator.sweep.report`). ``python -m orchestrator.sweep.driver
SWEEP.json`` is the detached process ``orch sweep`` starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from cluster.errors import OrchError
from cluster.files import write_json_atomic, write_text_atomic
from orchestrator import records
from orchestrator.spec import JobState
from orchestrator.sweep.plan import DRIVER_CPUS, SweepPlan

log = logging.getLogger("orchestrator.sweep")


def preflight_sweep(plan: SweepPlan, wait_s: float = 0.0) -> None:
    """Before the sweep's record, folder or MLflow run exists: the named Ray cluster answers and
    one trial fits it (Ray would keep every trial PENDING forever otherwise). ``wait_s``
    (``--wait-for-resources``): poll a named cluster that long for it to grow first."""
    from orchestrator.launchers.ray import check_addresses
    from orchestrator.launchers.ray.capacity import require_capacity

    address = check_addresses([plan.address])[plan.address]
    require_capacity(address, [plan.trial_ask()], wait_s)


def prepare_sweep(plan: SweepPlan) -> SweepPlan:
    """Decide the sweep's identity before anything runs: job id and record, output folder,
    parent MLflow run (with the sweep's config). Returns the plan with them filled in, also
    written to ``<output>/sweep.json`` for the driver."""
    import yaml

    from orchestrator.config import build_experiment, dump_experiment, with_overrides

    job_id = records.new_job_id(f"{plan.name}-sweep")
    out = Path(plan.output_root) / job_id
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", plan.config_yaml)
    plan = dataclasses.replace(plan, job_id=job_id, output_dir=str(out), cwd=os.getcwd(),
                               storage_path=plan.storage_path or str(out / "ray"))
    exp = build_experiment(yaml.safe_load(plan.config_yaml), source=plan.config_path)
    if exp.tracking.enable:
        from orchestrator.sweep.report import create_parent_journal
        from orchestrator.tracking.runs import tracking_uri_of

        # Trials write to the same store, whatever their working directory.
        uri = tracking_uri_of(exp)
        plan = dataclasses.replace(plan, tracking_uri=uri,
                                   config_yaml=dump_experiment(with_overrides(exp, {"tracking.uri": uri})))
        plan = dataclasses.replace(plan, parent_journal=create_parent_journal(exp, plan))
    write_json_atomic(out / "sweep.json", plan.to_json())
    records.create_record(
        job_id=job_id, name=plan.name, backend="ray", output_dir=str(out), config_path=str(out / "config.yaml"),
        native_id=job_id, tracking_uri=plan.tracking_uri,
        extra={"kind": "sweep", "address": plan.address, "metric": plan.metric, "mode": plan.mode, "trials": {}})
    return plan


def build_tuner(plan: SweepPlan, callbacks: list, resume: bool = False):
    """The ``tune.Tuner`` of the sweep; with ``resume``, the one restored from the experiment
    folder ``<storage_path>/<job_id>`` (``Tuner.restore``: finished trials kept, the searcher's
    saved state restored so no trial is drawn twice, unfinished and errored trials started again
    under their trial ids, i.e. their folders, journals and checkpoints)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from orchestrator.sweep.space import to_tune
    from orchestrator.sweep.trial import run_trial

    s = plan.scheduler
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=s.max_t, grace_period=s.grace_period,
                               reduction_factor=s.reduction_factor) if s.type == "asha" else FIFOScheduler())
    search_alg = None
    if plan.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch()
    if plan.workers_per_trial > 1:
        resources = {"cpu": DRIVER_CPUS}  # the TorchTrainer's workers ask for their own
    else:
        resources = {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), resources)
    if resume:
        path = os.path.join(plan.storage_path, plan.job_id)
        if not tune.Tuner.can_restore(path):
            raise OrchError(f"sweep {plan.job_id} cannot be resumed: {path} holds no Ray Tune experiment state "
                            "(the driver died before its first trial started); start it again with `orch sweep`")
        # The restored Tuner keeps the run config it was created with (callbacks included).
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=to_tune(list(plan.space), plan.searcher),
        tune_config=tune.TuneConfig(metric=plan.metric, mode=plan.mode, scheduler=scheduler,
                                    search_alg=search_alg, num_samples=plan.num_samples,
                                    max_concurrent_trials=plan.max_concurrent),
        run_config=tune.RunConfig(name=plan.job_id, storage_path=plan.storage_path, callbacks=callbacks, verbose=1),
    )


def run_sweep(plan: SweepPlan, resume: bool = False) -> dict[str, Any]:
    """Run the sweep to its end (this process is its driver); record the outcome and return the
    summary (``best``, ``trials``). SIGTERM / Ctrl-C cancel it. ``resume``: continue the sweep
    of a driver that died (``orch sweep --resume``, :func:`build_tuner`)."""
    from orchestrator.launchers.ray.driver import ray_connection
    from orchestrator.sweep.report import RecordCallback, end_running_children, finish_parent_run, summarize
    from orchestrator.tracking.background import FolderShipper

    job_id = plan.job_id
    status = "FAILED"
    # What `--resume` restores is Tune's last saved experiment state; by default ("auto") it is
    # saved every 10 s or more (over a minute seen on a loaded machine): save it every second.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    if resume:  # what the record saw end: never trained again (build_tuner's restore may not know it)
        trials = records.load_record(job_id).extra.get("trials") or {}
        plan = dataclasses.replace(plan, finished_trials={
            trial_id: entry for trial_id, entry in trials.items() if entry.get("status") == "TERMINATED"})
    # One shipper for the parent and every trial (trials do not start their own).
    with FolderShipper(plan.output_dir, plan.tracking_uri, enabled=bool(plan.parent_journal) and plan_mode(plan) != "offline") as shipper:
        try:
            with ray_connection(plan.address, job_id):
                records.transition(job_id, JobState.RUNNING, pid=os.getpid())
                results = build_tuner(plan, [RecordCallback(job_id)], resume).fit()
            shipper.pass_now()  # so that the trial table can name each trial's MLflow run
            summary = summarize(plan, results)
            status = "FINISHED" if summary["best"] else "FAILED"
            finish_parent_run(plan, summary, status)
        except KeyboardInterrupt:  # SIGTERM (orch cancel: driver.Cancelled) or Ctrl-C, as ray.get passes it on
            end_running_children(plan, "KILLED")
            finish_parent_run(plan, None, "KILLED")
            records.transition(job_id, JobState.CANCELLED)
            raise
        except Exception as err:
            end_running_children(plan, "FAILED")
            finish_parent_run(plan, None, "FAILED")
            records.transition(job_id, JobState.FAILED,
                               error=str(err).strip().splitlines()[-1][:500] if str(err).strip() else repr(err))
            raise
    state = JobState.SUCCEEDED if status == "FINISHED" else JobState.FAILED
    records.transition(job_id, state, extra={"best": summary["best"]},
                       error=None if summary["best"] else f"no trial reported {plan.metric}; see {plan.output_dir}")
    return summary


def plan_mode(plan: SweepPlan) -> str:
    """``tracking.mode`` of the sweep's experiment."""
    from orchestrator.config.loader import section_of

    return section_of(plan.config_yaml, "tracking").get("mode") or "auto"


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m orchestrator.sweep.driver SWEEP.json [--resume]``: the detached driver ``orch
    sweep`` (``--resume``: ``orch sweep --resume JOB``) starts."""
    import json
    import signal

    from cluster.logs import setup_logging
    from orchestrator.launchers.ray.driver import _raise_cancelled

    args = sys.argv[1:] if argv is None else argv
    setup_logging()
    signal.signal(signal.SIGTERM, _raise_cancelled)
    plan = SweepPlan.from_json(json.loads(Path(args[0]).read_text()))
    try:
        summary = run_sweep(plan, resume="--resume" in args[1:])
    except KeyboardInterrupt:
        return 1
    except OrchError as err:
        print(f"orch sweep: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0 if summary["best"] else 1


if __name__ == "__main__":
    sys.exit(main())
