"""Checkpoint timing: every ``checkpoint.interval`` epochs (iterations for iteration schedules),
at the end, and a best-metric copy after each evaluation (:class:`detection.checkpoint.Checkpointer`
does the writing)."""

from __future__ import annotations

from typing import Any

from detection.hooks.base import Hook


class CheckpointHook(Hook):
    """Calls ``trainer.checkpointer`` at the right steps. Put it after :class:`EvalHook` so the
    checkpoint of an evaluated step carries that evaluation's best metric."""

    def after_iter(self, trainer: Any, log_values: dict[str, float]) -> None:
        by_iter = trainer.config.schedule.iterations is not None
        interval = max(1, trainer.config.checkpoint.interval)
        if (by_iter and trainer.iter % interval == 0) or trainer.iter == trainer.max_iters:
            trainer.checkpointer.save(trainer)

    def after_epoch(self, trainer: Any) -> None:
        if trainer.config.schedule.iterations is not None or trainer.iter == trainer.max_iters:
            return  # iteration units, or already saved as the final checkpoint in after_iter
        if (trainer.epoch + 1) % max(1, trainer.config.checkpoint.interval) == 0:
            trainer.checkpointer.save(trainer)

    def after_eval(self, trainer: Any, metrics: dict[str, float]) -> None:
        trainer.checkpointer.update_best(trainer, metrics)
