"""``orch sweep``: a Ray Tune search over any config keys, recorded in MLflow as one parent run
with one child run per trial.

Why a function trainable and not ``Tuner(TorchTrainer)``: Train V2 refuses a Trainer inside a
Tuner. A trial of one worker runs ``detection.train.main`` directly inside its Tune actor (no
extra actor, no process group, the lightest thing on a small machine); a trial of several GPUs
builds and fits a ``TorchTrainer`` inside the trial (:mod:`orchestrator.launchers.ray_worker`).
Each evaluation is one Tune iteration, so ASHA's ``grace_period`` and ``max_t`` count evaluations.

Identity is decided up front: the parent MLflow run is created before Ray starts; each trial
creates its child run (``mlflow.parentRunId``) when it starts. At the end the sweep ends every
child that a scheduler stopped (tag ``orch.stopped_early=true``, status KILLED, never left
RUNNING) and writes the best trial's config and metrics plus a table of all trials on the parent
(:mod:`orchestrator.sweep_report`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from cluster.errors import ConfigError, OrchError
from orchestrator.config.schema import Experiment
from orchestrator.spec import JobRecord, JobState
from orchestrator.sweep_space import check_searcher, parse_space, trial_count

log = logging.getLogger("orchestrator.sweep")

DRIVER_CPUS = 0.1  # the Tune trial that only drives a TorchTrainer (FIELD_NOTES: fits on 2 cores)


def evaluations(exp: Experiment) -> int:
    """How many evaluations one trial reports (Tune iterations): every ``eval.interval`` and at
    the end (an estimate for world sizes that rescale the schedule)."""
    total = exp.schedule.iterations if exp.schedule.iterations is not None else (exp.schedule.epochs or 1)
    interval = max(1, exp.eval.interval)
    return max(1, math.ceil(total / interval))


def check_space_values(exp: Experiment, dims: list) -> None:
    """Every value a trial can get must make a valid experiment: choices and grid values each,
    and the bounds of ranges (a float range over an integer key fails here, not in every trial)."""
    from orchestrator.config import with_overrides

    for dim in dims:
        if dim.kind in ("choice", "grid"):
            values = dim.args
        elif dim.kind == "randint":
            values = (dim.args[0], dim.args[1] - 1)
        else:
            values = dim.args
        for value in values:
            with_overrides(exp, {dim.key: value, "sweep": None}, source=f"sweep.space.{dim.key} ({dim.kind} value {value!r})")


def plan_sweep(exp: Experiment, config_path: str = "<experiment>") -> dict[str, Any]:
    """Check the ``sweep:`` section and return the sweep's JSON-able description. Pure."""
    sweep = exp.sweep
    if sweep is None:
        raise ConfigError(f"{config_path} has no `sweep:` section; add one (see `orch sweep --help`)")
    dims = parse_space(sweep.space)
    check_searcher(dims, sweep.searcher)
    check_space_values(exp, dims)
    if not (sweep.metric in ("loss",) or sweep.metric.startswith(("bbox_", "segm_", "loss_"))):
        raise ConfigError(f"sweep.metric={sweep.metric!r} is not a metric orch reports; use an evaluation metric "
                          "(bbox_mAP, bbox_mAP_50, segm_mAP, ...) or loss")
    if sweep.cpus_per_trial <= 0 or sweep.gpus_per_trial < 0:
        raise ConfigError("sweep.cpus_per_trial must be > 0 and sweep.gpus_per_trial >= 0 (fractions allowed)")
    sched = sweep.scheduler
    if sched.type == "pbt":
        raise ConfigError(
            "sweep.scheduler.type=pbt is not supported: PBT changes hyperparameters of a running trial "
            "and resumes it from another trial's checkpoint, but an orch checkpoint restores the "
            "optimizer state (and its LR) exactly, so the mutation would be silently undone; use asha or fifo"
        )
    max_t = sched.max_t or evaluations(exp)
    if sched.type == "asha":
        if sched.grace_period < 1 or sched.grace_period > max_t:
            raise ConfigError(f"sweep.scheduler.grace_period={sched.grace_period} must be in 1..max_t ({max_t} "
                              "evaluations per trial); lower it or evaluate more often (eval.interval)")
        if sched.reduction_factor <= 1:
            raise ConfigError(f"sweep.scheduler.reduction_factor={sched.reduction_factor} must be > 1 (e.g. 2 or 3)")
    gpus = float(sweep.gpus_per_trial)
    if gpus > 1 and gpus != int(gpus):
        raise ConfigError(f"sweep.gpus_per_trial={gpus}: above 1 it is a DDP world size and must be whole")
    workers = int(gpus) if gpus > 1 else 1
    from orchestrator.config import dump_experiment, output_dir_of

    return {
        "name": exp.name,
        "config_path": str(config_path),
        "config_yaml": dump_experiment(exp),
        "output_root": str(Path(output_dir_of(exp)).expanduser().resolve()),
        "address": exp.resources.ray.address,
        "storage_path": exp.resources.ray.storage_path,
        "space": [[d.key, d.kind, list(d.args)] for d in dims],
        "searcher": sweep.searcher,
        "num_samples": sweep.num_samples,
        "trials": trial_count(dims, sweep.searcher, sweep.num_samples),
        "metric": sweep.metric,
        "mode": sweep.mode,
        "scheduler": {"type": sched.type, "grace_period": sched.grace_period,
                      "reduction_factor": sched.reduction_factor, "max_t": max_t},
        "max_concurrent": sweep.max_concurrent,
        "workers_per_trial": workers,
        "gpus_per_trial": gpus,
        "cpus_per_trial": float(sweep.cpus_per_trial),
        "use_gpu": gpus > 0,
        "gpus_per_worker": 1.0 if gpus > 1 else gpus,
        "cpus_per_worker": float(sweep.cpus_per_trial) / workers,
    }


def describe_sweep(plan: dict[str, Any]) -> str:
    """Readable description of a sweep (what ``--dry-run`` prints)."""
    from orchestrator.sweep_space import Dimension

    s = plan["scheduler"]
    sched = (f"asha (grace_period {s['grace_period']}, reduction_factor {s['reduction_factor']:g}, "
             f"max_t {s['max_t']} evaluations)" if s["type"] == "asha" else s["type"])
    if plan["workers_per_trial"] > 1:
        per_trial = (f"{plan['workers_per_trial']} DDP workers (TorchTrainer inside the trial, "
                     f"{plan['gpus_per_worker']:g} GPU + {plan['cpus_per_worker']:g} CPU each) + {DRIVER_CPUS} CPU driver")
    else:
        per_trial = f"{plan['cpus_per_trial']:g} CPU, {plan['gpus_per_trial']:g} GPU (training in the trial itself)"
    lines = [
        f"ray tune sweep {plan['name']}",
        f"  cluster address: {plan['address'] or 'none: a private Ray head on 127.0.0.1 for the sweep'}",
        "  search space:",
        *[f"    {Dimension(k, kind, tuple(a)).describe()}" for k, kind, a in plan["space"]],
        f"  searcher:        {plan['searcher']}; {plan['trials']} trials (num_samples {plan['num_samples']})",
        f"  objective:       {plan['mode']} {plan['metric']} (reported at every evaluation)",
        f"  scheduler:       {sched}",
        f"  max concurrent:  {plan['max_concurrent'] or 'as resources allow'}",
        f"  per trial:       {per_trial}",
        f"  outputs:         {plan['output_root']}/<sweep id>/trials/<trial id>",
        "  MLflow:          one parent run, one child run per trial (mlflow.parentRunId)",
    ]
    return "\n".join(lines)


def prepare_sweep(plan: dict[str, Any]) -> dict[str, Any]:
    """Decide the sweep's identity before anything runs: job id and record, output folder,
    parent MLflow run (with the sweep's config). Returns the payload for :func:`run_sweep`."""
    from orchestrator import jobs as records

    job_id = records.new_job_id(f"{plan['name']}-sweep")
    out = Path(plan["output_root"]) / job_id
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(plan["config_yaml"])
    payload = dict(plan, job_id=job_id, output_dir=str(out), cwd=os.getcwd(),
                   storage_path=plan["storage_path"] or str(out / "ray"), parent_run_id=None, tracking_uri=None)
    import yaml

    from orchestrator.config import build_experiment

    exp = build_experiment(yaml.safe_load(plan["config_yaml"]), source=plan["config_path"])
    if exp.tracking.enable:
        from orchestrator.sweep_report import create_parent_run

        payload["tracking_uri"], payload["parent_run_id"] = create_parent_run(exp, payload)
        # Trials write to the same store, whatever their working directory.
        from orchestrator.config import dump_experiment, with_overrides

        payload["config_yaml"] = dump_experiment(with_overrides(exp, {"tracking.uri": payload["tracking_uri"]}))
    (out / "sweep.json").write_text(json.dumps(payload, indent=1))
    records.save_record(JobRecord(
        job_id=job_id, name=plan["name"], backend="ray", state=JobState.PENDING, output_dir=str(out),
        config_path=str(out / "config.yaml"), log_path=str(records.log_path(job_id)), submitted_at=time.time(),
        native_id=job_id, mlflow_run_id=payload["parent_run_id"], tracking_uri=payload["tracking_uri"],
        extra={"kind": "sweep", "address": plan["address"], "metric": plan["metric"], "mode": plan["mode"], "trials": {}},
    ))
    return payload


def build_tuner(payload: dict[str, Any], callbacks: list):
    """The ``tune.Tuner`` of the sweep."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from orchestrator.launchers.ray_worker import run_trial
    from orchestrator.sweep_space import Dimension, to_tune

    dims = [Dimension(k, kind, tuple(a)) for k, kind, a in payload["space"]]
    s = payload["scheduler"]
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=s["max_t"], grace_period=s["grace_period"],
                               reduction_factor=s["reduction_factor"]) if s["type"] == "asha" else FIFOScheduler())
    search_alg = None
    if payload["searcher"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch()
    if payload["workers_per_trial"] > 1:
        resources = {"cpu": DRIVER_CPUS}  # the TorchTrainer's workers ask for their own
    else:
        resources = {"cpu": payload["cpus_per_trial"], "gpu": payload["gpus_per_trial"]}
    trainable = tune.with_resources(tune.with_parameters(run_trial, payload=payload), resources)
    return tune.Tuner(
        trainable,
        param_space=to_tune(dims, payload["searcher"]),
        tune_config=tune.TuneConfig(metric=payload["metric"], mode=payload["mode"], scheduler=scheduler,
                                    search_alg=search_alg, num_samples=payload["num_samples"],
                                    max_concurrent_trials=payload["max_concurrent"]),
        run_config=tune.RunConfig(name=payload["job_id"], storage_path=payload["storage_path"],
                                  callbacks=callbacks, verbose=1),
    )


def run_sweep(payload: dict[str, Any]) -> dict[str, Any]:
    """Run the sweep to its end (this process is its driver); record the outcome and return the
    summary (``best``, ``trials``). SIGTERM / Ctrl-C cancel it."""
    from orchestrator.launchers.ray_driver import Cancelled, ray_connection, set_state
    from orchestrator.sweep_report import RecordCallback, end_running_children, finish_parent_run, summarize

    job_id = payload["job_id"]
    status = "FAILED"
    try:
        with ray_connection(payload["address"], job_id):
            set_state(job_id, JobState.RUNNING, pid=os.getpid())
            results = build_tuner(payload, [RecordCallback(job_id)]).fit()
            summary = summarize(payload, results)
        status = "FINISHED" if summary["best"] else "FAILED"
    except (Cancelled, KeyboardInterrupt):
        end_running_children(payload, "KILLED")
        finish_parent_run(payload, None, "KILLED")
        set_state(job_id, JobState.CANCELLED)
        raise
    except Exception as err:
        end_running_children(payload, "FAILED")
        finish_parent_run(payload, None, "FAILED")
        set_state(job_id, JobState.FAILED, error=str(err).strip().splitlines()[-1][:500] if str(err).strip() else repr(err))
        raise
    finish_parent_run(payload, summary, status)
    state = JobState.SUCCEEDED if status == "FINISHED" else JobState.FAILED
    set_state(job_id, state, extra={"best": summary["best"]},
              error=None if summary["best"] else f"no trial reported {payload['metric']}; see {payload['output_dir']}")
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m orchestrator.sweep SWEEP.json``: the detached driver of ``orch sweep --detach``."""
    import signal

    from orchestrator.launchers.ray_driver import Cancelled, _raise_cancelled

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _raise_cancelled)
    payload = json.loads(Path(args[0]).read_text())
    try:
        summary = run_sweep(payload)
    except Cancelled:
        return 1
    except OrchError as err:
        print(f"orch sweep: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0 if summary["best"] else 1


if __name__ == "__main__":
    sys.exit(main())
