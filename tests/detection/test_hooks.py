"""Hooks get their settings when built: they fire at the right steps on a trainer that has no
config at all; ``build_hooks`` hands each one its period from the experiment."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cluster.env import DistEnv
from detection.hooks import (CheckpointHook, EvalHook, HeartbeatHook, LoggerHook, LRSchedulerHook, SystemMetricsHook,
                             lr_schedule)
from detection.lr_scaling import scale_lr
from orchestrator.config import load_experiment


class Saves:
    """A checkpointer that only records when it was asked to save."""

    def __init__(self):
        self.saved: list[int] = []
        self.best: list[int] = []

    def save(self, trainer):
        self.saved.append(trainer.iter)

    def update_best(self, trainer, metrics):
        self.best.append(trainer.iter)


def drive(hooks, max_iters, iters_per_epoch=4):
    """Call the hooks as the trainer does, on a trainer without ``config``."""
    model = torch.nn.Linear(1, 1)
    trainer = SimpleNamespace(
        iter=0, epoch=0, max_iters=max_iters, iters_per_epoch=iters_per_epoch, checkpointer=Saves(),
        optimizer=torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr_mult": 0.5}], lr=1.0),
        lr_scaling=SimpleNamespace(describe=lambda: "lr 1"), lrs=[], stopping=False, pending_eval=False,
    )
    for hook in hooks:
        hook.before_train(trainer)
    while trainer.iter < max_iters:
        trainer.epoch = trainer.iter // iters_per_epoch
        trainer.lrs.append([g["lr"] for g in trainer.optimizer.param_groups])
        trainer.iter += 1
        for hook in hooks:
            hook.after_iter(trainer, {"loss": 1.0, "lr": 0.1, "time": 0.01, "images": 2.0})
        if trainer.iter % iters_per_epoch == 0:
            for hook in hooks:
                hook.after_epoch(trainer)
    return trainer


class CountingEval(EvalHook):
    """EvalHook's timing, with the evaluation itself replaced by a record of when it ran."""

    def __init__(self, **kw):
        super().__init__(loader=None, dataset=None, **kw)
        self.at: list[int] = []

    def evaluate(self, trainer):
        if not self.at or self.at[-1] != trainer.iter:  # EvalHook.evaluate runs once per step too
            self.at.append(trainer.iter)
        return {}


@pytest.mark.parametrize("period, unit, max_iters, expected", [
    (3, "iter", 10, [3, 6, 9, 10]),  # every 3 steps, and the last
    (2, "epoch", 16, [8, 16]),  # every 2 epochs of 4 steps; the last one once
    (3, "epoch", 10, [10]),  # a partial last epoch still ends in a checkpoint
])
def test_checkpoint_hook_fires_at_its_period(period, unit, max_iters, expected):
    trainer = drive([CheckpointHook(period, unit)], max_iters)
    assert trainer.checkpointer.saved == expected


@pytest.mark.parametrize("period, unit, max_iters, expected", [
    (4, "iter", 10, [4, 8, 10]),
    (1, "epoch", 12, [4, 8, 12]),
])
def test_eval_hook_fires_at_its_period(period, unit, max_iters, expected):
    hook = CountingEval(period=period, unit=unit)
    drive([hook], max_iters)
    assert hook.at == expected


def test_logger_hook_logs_every_interval(caplog):
    with caplog.at_level(logging.INFO, logger="detection.train"):
        drive([LoggerHook(interval=3, name="exp", tty=False)], max_iters=7)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter ")]
    assert [line.split()[1] for line in lines] == ["3/7", "6/7", "7/7"]
    assert caplog.records[0].getMessage().startswith("training exp: 7 iterations")


def test_lr_hook_applies_its_schedule_with_group_multipliers():
    trainer = drive([LRSchedulerHook(lambda it: 0.1 * (it + 1))], max_iters=3)
    assert [lr for step in trainer.lrs for lr in step] == pytest.approx([0.1, 0.05, 0.2, 0.1, 0.3, 0.15])


def test_lr_schedule_turns_epoch_milestones_into_iterations():
    from detection.config import AutoScaleLR, OptimConfig, ScheduleConfig

    sched = ScheduleConfig(epochs=3, policy="step", milestones=[2], gamma=0.1, warmup_iters=0)
    fn = lr_schedule(sched, scale_lr(OptimConfig(lr=0.02, auto_scale_lr=AutoScaleLR(enable=False)), sched, 1, 2), iters_per_epoch=5, max_iters=15)
    assert [fn(i) for i in (0, 9, 10, 14)] == pytest.approx([0.02, 0.02, 0.002, 0.002])


def test_build_hooks_passes_each_hook_its_settings(make_experiment):
    from detection.build import build_hooks
    from detection.journal_hook import JournalHook

    exp = load_experiment(make_experiment(**{"eval.interval": 3, "checkpoint.interval": 5, "runtime.log_interval": 7}))
    scaling = scale_lr(exp.optim, exp.schedule, 1, 2)
    extra = CountingEval()
    hooks = build_hooks(exp, DistEnv.single(), scaling, 8, 4, eval_loader=object(), eval_set=object(), extra=[extra])
    assert [type(h) for h in hooks] == [HeartbeatHook, LRSchedulerHook, LoggerHook, EvalHook, CheckpointHook,
                                        SystemMetricsHook, JournalHook, CountingEval]
    heartbeat, _, logger, evaluation, checkpoint, system, mlflow, _ = hooks
    assert system.interval == 30.0 and system.folder.endswith("journal")
    assert (heartbeat.eval_period, heartbeat.checkpoint_period, heartbeat.unit) == (3, 5, "iter")
    assert (evaluation.period, evaluation.unit, evaluation.split, evaluation.iou_types) == (3, "iter", "val", ("bbox",))
    assert (checkpoint.period, checkpoint.unit, logger.interval, mlflow.log_interval) == (5, "iter", 7, 7)
    rank1 = DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2, master_port=1)
    others = build_hooks(exp, rank1, scaling, 8, 4, eval_loader=None, eval_set=None)
    assert [type(h) for h in others] == [HeartbeatHook, LRSchedulerHook, CheckpointHook]  # rank 0 logs; no eval set
    assert others[0].path.endswith("rank-1.jsonl") and others[0].eval_period == 0


def test_training_code_does_not_know_how_it_was_launched():
    root = Path(__file__).resolve().parents[2] / "detection"
    for path in root.rglob("*.py"):
        code = path.read_text()
        reads = re.search(r"""(environ(\.get|\.pop|\.setdefault)?\s*[\[(]|getenv\()\s*["']ORCH_""", code)
        assert not reads, f"{path} reads an orch variable: {reads.group(0)}"
        assert not re.search(r"env\.source|\.source ==", code), f"{path} branches on the backend"


def test_hooks_report_to_the_trainer_and_never_write_its_fields():
    from detection.engine import Trainer
    from detection.hooks import Hook

    class Heard(Hook):
        def __init__(self):
            self.metrics = []

        def after_eval(self, trainer, metrics):
            self.metrics.append((trainer.iter, metrics))

    model = torch.nn.Linear(1, 1)
    heard = Heard()
    trainer = Trainer(env=DistEnv.single(), model=model, train_model=model, optimizer=torch.optim.SGD(model.parameters()),
                      loader=None, device=torch.device("cpu"), max_iters=8, iters_per_epoch=4, hooks=[heard])
    trainer.iter, trainer.stopping = 4, True
    evaluation = EvalHook(loader=None, dataset=None, period=4, unit="iter")
    evaluation.after_iter(trainer, {})  # due, but the run is stopping: deferred, nothing evaluated
    assert trainer.pending_eval and heard.metrics == [] and trainer.history["eval"] == []
    trainer.report_eval({"bbox_mAP": 0.5})  # what EvalHook.evaluate reports
    assert trainer.metrics == {"bbox_mAP": 0.5} and not trainer.pending_eval
    assert trainer.history["eval"] == [{"iter": 4, "epoch": 1.0, "metrics": {"bbox_mAP": 0.5}}]
    assert heard.metrics == [(4, {"bbox_mAP": 0.5})]
    values = {"loss": 1.0, "lr": 0.1, "time": 0.5, "images": 2.0, "images_per_s": 3.0}
    LoggerHook(interval=4, tty=False).after_iter(trainer, values)
    assert values == {"loss": 1.0, "lr": 0.1, "time": 0.5, "images": 2.0, "images_per_s": 3.0}
