"""Scale the learning rate (and an iteration schedule) to the batch size actually used.

Pure arithmetic, no torch: ``orch config`` shows the result without loading the trainer, and the
trainer computes it again from the real world size at run time (also after resuming on a
different number of GPUs).

- Effective batch = world size x batch per GPU x gradient-accumulation steps (MMEngine's
  ``auto_scale_lr`` forgets the accumulation, open-mmlab/mmengine#894).
- Rules: ``linear`` (Goyal et al. 2017, factor = effective / base) and ``sqrt``
  (factor = sqrt(effective / base), common for adaptive optimizers).
- When the schedule is in iterations, the iteration count, warmup and milestones are scaled by
  base / effective so that training sees the same number of samples (detectron2's
  ``REFERENCE_WORLD_SIZE`` rule). An epoch schedule already adapts: fewer, larger steps per epoch.
- When ``auto_scale_lr.enable`` is false, nothing changes (factor 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from cluster.errors import ConfigError
from detection.config import OptimConfig, ScheduleConfig


@dataclass(frozen=True)
class LRScaling:
    """The result of :func:`scale_lr`: what was assumed, what was used, and why."""

    rule: str  # linear | sqrt
    enabled: bool
    base_lr: float
    base_batch_size: int
    world_size: int
    batch_per_gpu: int
    accumulation_steps: int
    effective_batch: int
    factor: float  # lr / base_lr
    lr: float
    epochs: Optional[int]  # unchanged
    iterations: Optional[int]  # rescaled when the schedule is in iterations
    warmup_iters: int
    milestones: tuple[int, ...]

    @property
    def schedule_scaled(self) -> bool:
        """Whether iterations, warmup and milestones were rescaled."""
        return self.enabled and self.iterations is not None and self.effective_batch != self.base_batch_size

    def describe(self) -> str:
        """One line for logs: final LR, how it was derived, and the schedule used."""
        batch = (
            f"effective batch {self.effective_batch} = {self.world_size} GPUs x "
            f"{self.batch_per_gpu} images x {self.accumulation_steps} accumulation"
        )
        if self.enabled:
            how = f"lr {self.lr:.6g} = {self.base_lr:.6g} x {self.factor:.6g} ({self.rule} rule, {batch}, base batch {self.base_batch_size})"
        else:
            how = f"lr {self.lr:.6g} (auto_scale_lr off, {batch})"
        if self.iterations is not None:
            length = f"{self.iterations} iterations"
            if self.schedule_scaled:
                length += f" (rescaled for base batch {self.base_batch_size})"
        else:
            length = f"{self.epochs} epochs"
        milestones = ", ".join(str(m) for m in self.milestones) or "none"
        return f"{how}; schedule {length}, warmup {self.warmup_iters} iterations, milestones [{milestones}]"


def _round(value: float) -> int:
    # Half up, not Python's banker's rounding: 2.5 iterations -> 3.
    return int(math.floor(value + 0.5))


def scale_lr(optim: OptimConfig, schedule: ScheduleConfig, world_size: int, batch_per_gpu: int) -> LRScaling:
    """Scale ``optim.lr`` from ``optim.auto_scale_lr.base_batch_size`` to the effective batch.

    >>> from detection.config import OptimConfig, ScheduleConfig
    >>> scale_lr(OptimConfig(lr=0.02), ScheduleConfig(), world_size=4, batch_per_gpu=1).lr
    0.005
    """
    for label, value in (("world size (GPUs)", world_size), ("batch per GPU", batch_per_gpu),
                         ("optim.accumulation_steps", optim.accumulation_steps),
                         ("optim.auto_scale_lr.base_batch_size", optim.auto_scale_lr.base_batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"LR scaling: {label} must be a positive integer, got {value!r}")
    auto = optim.auto_scale_lr
    effective = world_size * batch_per_gpu * optim.accumulation_steps
    ratio = effective / auto.base_batch_size
    if not auto.enable:
        factor = 1.0
    elif auto.rule == "linear":
        factor = ratio
    elif auto.rule == "sqrt":
        factor = math.sqrt(ratio)
    else:
        raise ConfigError(f"optim.auto_scale_lr.rule: unknown rule {auto.rule!r}; valid rules: linear, sqrt")
    iterations, warmup, milestones = schedule.iterations, schedule.warmup_iters, tuple(schedule.milestones)
    if auto.enable and iterations is not None:
        samples = 1 / ratio  # same number of samples: iterations x effective = base x base iterations
        iterations = max(1, _round(iterations * samples))
        warmup = _round(warmup * samples)
        milestones = tuple(max(1, _round(m * samples)) for m in milestones)
    return LRScaling(
        rule=auto.rule, enabled=auto.enable, base_lr=optim.lr, base_batch_size=auto.base_batch_size,
        world_size=world_size, batch_per_gpu=batch_per_gpu, accumulation_steps=optim.accumulation_steps,
        effective_batch=effective, factor=factor, lr=optim.lr * factor, epochs=schedule.epochs,
        iterations=iterations, warmup_iters=warmup, milestones=milestones,
    )
