"""Checkpoint timing: every ``period`` epochs or iterations, at the end, and a best-metric copy
after each evaluation (:class:`detection.checkpoint.Checkpointer` does the writing)."""

from __future__ import annotations

from typing import Any

from detection.hooks.base import Hook, due


class CheckpointHook(Hook):
    """Calls ``trainer.checkpointer`` every ``period`` ``unit``\\ s (``"epoch"`` or ``"iter"``)
    and on the last step. Put it after :class:`EvalHook` so the checkpoint of an evaluated step
    carries that evaluation's best metric."""

    def __init__(self, period: int = 1, unit: str = "epoch") -> None:
        assert unit in ("epoch", "iter"), unit
        self.period, self.unit = max(1, int(period)), unit

    def after_iter(self, trainer: Any, log_values: dict[str, float]) -> None:
        if due(trainer, self.period, self.unit) and not trainer.stopping:  # a stop saves its own
            trainer.checkpointer.save(trainer)

    def after_epoch(self, trainer: Any) -> None:
        if self.unit == "iter" or trainer.iter == trainer.max_iters or trainer.stopping:
            return  # iteration units, already saved as the final checkpoint, or the stop's own save
        if (trainer.epoch + 1) % self.period == 0:
            trainer.checkpointer.save(trainer)

    def after_eval(self, trainer: Any, metrics: dict[str, float]) -> None:
        trainer.checkpointer.update_best(trainer, metrics)
