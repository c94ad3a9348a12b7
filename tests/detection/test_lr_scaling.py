"""LR scaling: a table of worked examples, the schedule rescaling and bad inputs."""

from __future__ import annotations

import math

import pytest

from cluster.errors import ConfigError
from detection.config import AutoScaleLR, OptimConfig, ScheduleConfig
from detection.lr_scaling import scale_lr

EPOCHS = ScheduleConfig(epochs=12, iterations=None, warmup_iters=500, milestones=(8, 11))
ITERS = ScheduleConfig(epochs=None, iterations=90000, warmup_iters=1000, milestones=(60000, 80000))


def optim(lr=0.02, base=16, rule="linear", accum=1, enable=True) -> OptimConfig:
    return OptimConfig(
        lr=lr, accumulation_steps=accum,
        auto_scale_lr=AutoScaleLR(enable=enable, base_batch_size=base, rule=rule),
    )


# (optim, world, per-GPU) -> (effective batch, factor, lr)
TABLE = [
    # The worked examples.
    (optim(), 4, 1, 4, 0.25, 0.005),
    (optim(), 16, 2, 32, 2.0, 0.04),
    (optim(accum=2), 4, 2, 16, 1.0, 0.02),
    # The reference setting itself: unchanged.
    (optim(), 8, 2, 16, 1.0, 0.02),
    (optim(), 1, 1, 1, 1 / 16, 0.00125),
    (optim(lr=0.01, base=32, accum=4), 2, 2, 16, 0.5, 0.005),
    # sqrt rule: factor = sqrt(effective / base).
    (optim(rule="sqrt"), 16, 4, 64, 2.0, 0.04),
    (optim(rule="sqrt"), 4, 1, 4, 0.5, 0.01),
    (optim(lr=1e-3, rule="sqrt", base=8), 2, 1, 2, 0.5, 5e-4),
    (optim(rule="sqrt", accum=2), 4, 2, 16, 1.0, 0.02),
    (optim(rule="sqrt"), 8, 1, 8, math.sqrt(0.5), 0.02 * math.sqrt(0.5)),
    # Disabled: factor 1 whatever the batch.
    (optim(enable=False), 4, 1, 4, 1.0, 0.02),
    (optim(enable=False, rule="sqrt"), 64, 2, 128, 1.0, 0.02),
]


@pytest.mark.parametrize("opt, world, per_gpu, effective, factor, lr", TABLE)
def test_scale_lr_table(opt, world, per_gpu, effective, factor, lr):
    result = scale_lr(opt, EPOCHS, world, per_gpu)
    assert result.effective_batch == effective
    assert result.factor == pytest.approx(factor)
    assert result.lr == pytest.approx(lr)
    assert result.base_lr == opt.lr
    assert result.base_batch_size == opt.auto_scale_lr.base_batch_size
    assert result.rule == opt.auto_scale_lr.rule
    assert result.enabled == opt.auto_scale_lr.enable


def test_epoch_schedule_is_unchanged():
    result = scale_lr(optim(), EPOCHS, 4, 1)
    assert (result.epochs, result.iterations) == (12, None)
    assert result.warmup_iters == 500 and result.milestones == (8, 11)
    assert not result.schedule_scaled


# (world, per-GPU, accum, rule) -> (iterations, warmup, milestones): same samples seen.
ITER_TABLE = [
    (8, 2, 1, "linear", 90000, 1000, (60000, 80000)),  # reference batch: unchanged
    (16, 2, 1, "linear", 45000, 500, (30000, 40000)),  # twice the batch: half the steps
    (4, 2, 1, "linear", 180000, 2000, (120000, 160000)),
    (4, 2, 2, "linear", 90000, 1000, (60000, 80000)),  # accumulation restores the batch
    (3, 2, 1, "sqrt", 240000, 2667, (160000, 213333)),  # 16/6 = 2.667; the rule does not matter
]


@pytest.mark.parametrize("world, per_gpu, accum, rule, iterations, warmup, milestones", ITER_TABLE)
def test_iteration_schedule_is_rescaled(world, per_gpu, accum, rule, iterations, warmup, milestones):
    result = scale_lr(optim(rule=rule, accum=accum), ITERS, world, per_gpu)
    assert (result.iterations, result.warmup_iters, result.milestones) == (iterations, warmup, milestones)
    assert result.epochs is None
    assert result.schedule_scaled == (result.effective_batch != 16)
    # Same number of samples within rounding.
    assert abs(result.iterations * result.effective_batch - 90000 * 16) <= result.effective_batch


def test_rounding_is_half_up_and_never_zero_iterations():
    tiny = ScheduleConfig(epochs=None, iterations=5, warmup_iters=3, milestones=(1, 3))
    result = scale_lr(optim(base=2), tiny, 4, 1)  # factor 2: 2.5 -> 3, 1.5 -> 2, 0.5 -> 1
    assert (result.iterations, result.warmup_iters, result.milestones) == (3, 2, (1, 2))
    one = ScheduleConfig(epochs=None, iterations=1, warmup_iters=0, milestones=())
    assert scale_lr(optim(base=1), one, 64, 1).iterations == 1


def test_disabled_scaling_keeps_iteration_schedule():
    result = scale_lr(optim(enable=False), ITERS, 16, 2)
    assert (result.iterations, result.warmup_iters, result.milestones) == (90000, 1000, (60000, 80000))
    assert result.factor == 1.0 and not result.schedule_scaled


def test_describe_is_one_line_with_the_numbers():
    line = scale_lr(optim(), ITERS, 4, 1).describe()
    assert "\n" not in line
    for part in ("lr 0.005", "0.02", "linear", "effective batch 4", "base batch 16", "360000 iterations"):
        assert part in line
    assert "auto_scale_lr off" in scale_lr(optim(enable=False), EPOCHS, 4, 1).describe()


@pytest.mark.parametrize("world, per_gpu", [(0, 2), (2, 0), (-1, 1), (1.5, 2), (True, 2)])
def test_bad_sizes_are_config_errors(world, per_gpu):
    with pytest.raises(ConfigError, match="positive integer"):
        scale_lr(optim(), EPOCHS, world, per_gpu)


def test_module_is_pure():
    import subprocess
    import sys

    code = "import sys, detection.lr_scaling; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
