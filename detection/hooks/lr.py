"""Learning-rate schedule: linear warmup, then step / cosine / constant, set every iteration.

The LR is a pure function of the iteration (:func:`lr_at`), so a resumed run needs only the
iteration count to continue the schedule exactly, and a resume on another world size just
recomputes it from the new :class:`~detection.lr_scaling.LRScaling` (the schedule is built
from the scaling of the run's real world size, before the resume).
"""

from __future__ import annotations

import bisect
import functools
import math
from typing import Any, Callable, Sequence

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


def lr_schedule(schedule: Any, scaling: Any, iters_per_epoch: int, max_iters: int) -> Callable[[int], float]:
    """The LR of each iteration for ``schedule`` (a ``ScheduleConfig``) at ``scaling`` (the
    :class:`~detection.lr_scaling.LRScaling` of this run's real world size): :func:`lr_at` with
    every setting bound, epoch milestones turned into iterations."""
    milestones = tuple(scaling.milestones)
    if schedule.iterations is None:  # epoch milestones -> iterations
        milestones = tuple(m * iters_per_epoch for m in milestones)
    return functools.partial(
        lr_at, base_lr=scaling.lr, max_iters=max_iters, warmup_iters=scaling.warmup_iters,
        warmup_ratio=schedule.warmup_ratio, policy=schedule.policy, milestones=milestones,
        gamma=schedule.gamma, min_lr_ratio=schedule.min_lr_ratio,
    )


class LRSchedulerHook(Hook):
    """Sets ``param_group["lr"]`` (times the group's ``lr_mult``) before every step to
    ``schedule(trainer.iter)``, e.g. a :func:`lr_schedule`."""

    def __init__(self, schedule: Callable[[int], float]) -> None:
        self.schedule = schedule

    def before_train(self, trainer: Any) -> None:
        self._apply(trainer)

    def after_iter(self, trainer: Any, log: dict[str, float]) -> None:
        self._apply(trainer)  # for the next step

    def _apply(self, trainer: Any) -> None:
        lr = self.schedule(trainer.iter)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
