"""What runs in one Ray Tune trial of ``orch sweep``: the trial's experiment (the sweep's base
config with the sampled values, its own folder, a child MLflow run of the sweep's parent), then
one full orch training run through the same worker path as every job
(:func:`orchestrator.worker.run`: resolved ``config.yaml``, ``result.json``). A trial of several
GPUs builds and fits a ``TorchTrainer`` inside the trial (Train V2 takes no Trainer in a Tuner),
reporting through ``TuneReportCallback``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from orchestrator.launchers.ray.worker import StepReporter
from orchestrator.sweep.plan import SweepPlan


class TuneReportHook(StepReporter):
    """Reports each evaluation to Ray Tune (one Tune iteration per evaluation, the unit of ASHA's
    rungs). When the scheduler stops the trial, Tune's ``report`` raises ``SystemExit``; the hook
    turns that into ``should_stop`` so the trainer checkpoints and ends cleanly (``Preempted``):
    the journal hook then ends the run as KILLED instead of leaving it RUNNING."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = False

    def after_checkpoint(self, trainer: Any, path: str) -> None:
        pass  # Tune trials report metrics only

    def after_iter(self, trainer: Any, log_values: dict[str, float]) -> None:
        self.train_log = dict(log_values)
        # The last report may end the trial (ASHA stops at max_t) and Tune then kills the actor:
        # send it from after_train, once the last checkpoint and the MLflow run are written.
        if trainer.iter < trainer.max_iters:
            self._flush(trainer)

    def after_epoch(self, trainer: Any) -> None:
        if trainer.iter < trainer.max_iters:
            self._flush(trainer)

    def send(self, trainer: Any, values: dict[str, Any], checkpoint: Optional[str]) -> None:
        from ray import tune

        try:
            tune.report(values)
        except SystemExit:
            self.stopped = True

    def should_stop(self, trainer: Any) -> bool:
        return self.stopped


def trial_run_name(number: int, params: dict[str, Any]) -> str:
    """``trial 3: lr=0.0012, backbone=resnet18`` (the last component of each searched key)."""
    from orchestrator.kfold.expand import format_value

    shown = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.4g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={format_value(v)}"
                      for k, v in params.items())
    return f"trial {number}: {shown}" if shown else f"trial {number}"


def trial_experiment(params: dict[str, Any], plan: SweepPlan, trial_id: str, trial_name: str):
    """The experiment of one trial: the sweep's base config with the sampled ``params``, its own
    output folder, and a child MLflow run of the sweep's parent run (created here), in the
    sweep's MLflow experiment."""
    import yaml

    from orchestrator.config import build_experiment, with_overrides

    base = build_experiment(yaml.safe_load(plan.config_yaml), source=plan.config_path)
    changes: dict[str, Any] = dict(params)
    changes["runtime.output_dir"] = os.path.join(plan.output_dir, "trials", trial_id)
    changes["sweep"] = None
    # A trial started again (its sweep resumed, or Tune retrying it) continues from its own last
    # checkpoint in its folder (none yet: it starts from the beginning).
    changes["runtime.resume"] = "auto"
    if base.tracking.enable and plan.parent_journal:
        from orchestrator.sweep.report import trial_journal
        from orchestrator.tracking import runs

        tags = {**base.tracking.tags, "orch.sweep_job": plan.job_id, "orch.trial_id": trial_id, "backend": "ray"}
        changes.update({"tracking.parent_journal": plan.parent_journal, "tracking.run_name": trial_name,
                        "tracking.tags": tags})
        exp = with_overrides(base, changes, source=f"sweep trial {trial_id}")
        # A restarted trial continues its run.
        runs.create_journal(trial_journal(plan, trial_id), exp, trial_name, tags=tags, parent=plan.parent_journal,
                            resume=True).close()
        return exp
    return with_overrides(base, changes, source=f"sweep trial {trial_id}")


def write_trial_config(exp: Any) -> str:
    """Write the trial's resolved ``config.yaml`` into its folder; returns its path."""
    from cluster.files import write_text_atomic
    from orchestrator.config import dump_experiment

    os.makedirs(exp.runtime.output_dir, exist_ok=True)
    path = os.path.join(exp.runtime.output_dir, "config.yaml")
    write_text_atomic(path, dump_experiment(exp))
    return path


def run_trial(params: dict[str, Any], plan: SweepPlan) -> None:
    """Ray Tune function trainable: one full orch training run with ``params`` applied."""
    from ray import tune

    from cluster.env import DistEnv
    from detection.engine import Preempted
    from orchestrator.worker import run

    if plan.cwd and os.path.isdir(plan.cwd):
        os.chdir(plan.cwd)  # Tune starts trials in their own folder; paths are the user's
    ctx = tune.get_context()
    done = (plan.finished_trials or {}).get(ctx.get_trial_id())
    if done is not None and done.get(plan.metric) is not None and os.path.exists(os.path.join(plan.output_dir, "trials", ctx.get_trial_id(), "result.json")):
        # Ended before the driver died, after Tune last saved its state: not trained again.
        tune.report({plan.metric: done.get(plan.metric), "resumed_finished": True})
        return
    suffix = ctx.get_trial_name().rsplit("_", 1)[-1]  # run_trial_99ac6_00002 -> trial 3
    number = int(suffix) + 1 if suffix.isdigit() else 0
    exp = trial_experiment(params, plan, ctx.get_trial_id(), trial_run_name(number, params))
    config_path = write_trial_config(exp)
    if plan.workers_per_trial <= 1:
        hook = TuneReportHook()
        try:
            # the sweep driver ships every trial's journal
            run(config_path, hooks=[hook], env=DistEnv.from_values(rank=0, world_size=1, source="ray"), ship=False)
        except Preempted:
            if not hook.stopped:
                raise
        return
    run_trial_ddp(exp, config_path, plan)


def run_trial_ddp(exp: Any, config_path: str, plan: SweepPlan) -> None:
    """A trial of several DDP workers: a ``TorchTrainer`` built and fitted inside the Tune trial,
    reporting through ``TuneReportCallback``."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.launchers.ray.driver import build_trainer
    from orchestrator.launchers.ray.request import RayJobRequest

    out = exp.runtime.output_dir
    request = RayJobRequest(
        name=os.path.basename(out), config_path=config_path, output_dir=out, num_workers=plan.workers_per_trial,
        storage_path=os.path.join(out, "ray"), cpus_per_worker=plan.cpus_per_worker,
        gpus_per_worker=plan.gpus_per_worker, max_failures=0, keep_checkpoints=1, cwd=plan.cwd,
        env={})
    result = build_trainer(request, plan.use_gpu, callbacks=[TuneReportCallback()]).fit()
    if getattr(result, "error", None) is not None:
        raise RuntimeError(f"trial training failed: {result.error}")


__all__ = ["TuneReportHook", "run_trial", "trial_experiment", "trial_run_name"]
