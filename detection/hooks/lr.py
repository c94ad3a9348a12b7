"""Learning-rate schedule: linear warmup, then step / cosine / constant, set every iteration.

The LR is a pure function of the iteration (:func:`lr_at`), so a resumed run needs only the
iteration count to continue the schedule exactly, and a resume on another world size just
recomputes it from the new :class:`~detection.lr_scaling.LRScaling`.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Sequence

from detection.hooks.base import Hook


def lr_at(
    iteration: int,
    *,
    base_lr: float,
    max_iters: int,
    warmup_iters: int = 0,
    warmup_ratio: float = 0.001,
    policy: str = "step",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_lr_ratio: float = 0.0,
) -> float:
    """The LR of step ``iteration`` (0-based); ``milestones`` are in iterations.

    Warmup multiplies the schedule's LR by a factor rising linearly from ``warmup_ratio`` at
    iteration 0 to 1 at ``warmup_iters`` (torchvision's and MMEngine's linear warmup).
    """
    if policy == "constant":
        lr = base_lr
    elif policy == "step":
        lr = base_lr * gamma ** bisect.bisect_right(list(milestones), iteration)
    elif policy == "cosine":
        progress = min(iteration / max(1, max_iters), 1.0)
        floor = base_lr * min_lr_ratio
        lr = floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # validated by the schema; an assert is for our own invariant
        raise AssertionError(f"unknown LR policy {policy!r}")
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        lr *= warmup_ratio * (1.0 - alpha) + alpha
    return lr


class LRSchedulerHook(Hook):
    """Sets ``param_group["lr"]`` before every step from ``trainer.lr_scaling`` (the LR scaled
    to the real world size at run time) and ``config.schedule``."""

    def before_train(self, trainer: Any) -> None:
        self._apply(trainer)

    def after_iter(self, trainer: Any, log: dict[str, float]) -> None:
        self._apply(trainer)  # for the next step

    @staticmethod
    def schedule_lr(trainer: Any, iteration: int) -> float:
        """The LR of ``iteration`` for this trainer."""
        sched = trainer.config.schedule
        scaling = trainer.lr_scaling
        milestones = scaling.milestones
        if sched.iterations is None:  # epoch milestones -> iterations
            milestones = tuple(m * trainer.iters_per_epoch for m in milestones)
        return lr_at(
            iteration, base_lr=scaling.lr, max_iters=trainer.max_iters, warmup_iters=scaling.warmup_iters,
            warmup_ratio=sched.warmup_ratio, policy=sched.policy, milestones=milestones,
            gamma=sched.gamma, min_lr_ratio=sched.min_lr_ratio,
        )

    def _apply(self, trainer: Any) -> None:
        lr = self.schedule_lr(trainer, trainer.iter)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
