"""The training program's entry points: ``main(config, env, hooks) -> TrainResult``, the one call
every backend ends in, and ``evaluate_checkpoint`` (``orch eval``).

``config`` is a resolved experiment (:class:`orchestrator.config.schema.Experiment`, read by
attribute only: detection never imports orchestrator); ``env`` a :class:`cluster.env.DistEnv`.
How the process was launched reaches training only through these two and the ``hooks``.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

# Before torch loads (the imports below): spinning OpenMP threads collapse throughput (measured
# 30x on 2 cores) when a shared machine is oversubscribed; sleeping waiters cost little when it
# is quiet. An explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cluster.env import DistEnv  # noqa: E402
from cluster.errors import ConfigError  # noqa: E402
from cluster.logs import setup_logging  # noqa: E402
from detection import build  # noqa: E402
from detection.engine import Preempted, TrainResult  # noqa: E402,F401 - re-exported for callers

__all__ = ["Preempted", "TrainResult", "evaluate_checkpoint", "main"]


def main(config: Any, env: DistEnv, hooks: Sequence[Any] = ()) -> TrainResult:
    """Train ``config`` as rank ``env.rank`` of ``env.world_size`` and return the result (on every
    rank). Initialises and destroys the process group itself when ``world_size > 1``. Raises
    :class:`~cluster.errors.TrainingError` on a non-finite loss, :class:`Preempted` when a hook
    asked to stop, :class:`~cluster.errors.ConfigError` / ``DataError`` on bad input."""
    import torch.distributed as dist

    from detection.checkpoint import Checkpointer
    from detection.engine import Trainer
    from detection.lr_scaling import scale_lr

    setup_logging(env.rank)
    device = build.setup_process(config.runtime, env)
    created_group = build.init_process_group(env, device, config.runtime.collective_timeout_s)
    try:
        output_dir = build.output_dir(config, create=env.rank == 0)
        train_set, eval_set = build.build_datasets(config)
        model = build.build_model(config, train_set.num_classes, device)
        scaling = scale_lr(config.optim, config.schedule, env.world_size, config.data.batch_size_per_gpu)
        optimizer = build.build_optimizer(config.optim, model, scaling.lr)
        loader, eval_loader = build.build_loaders(config, env, train_set, eval_set, device)
        iters_per_epoch, max_iters = build.schedule_length(config, scaling, len(loader))
        checkpointer = Checkpointer(output_dir, config.checkpoint, rank=env.rank,
                                    unit=build.schedule_unit(config), seed=config.runtime.seed)
        trainer = Trainer(
            env=env, model=model, train_model=build.wrap_model(model, env, device), optimizer=optimizer,
            loader=loader, device=device, max_iters=max_iters, iters_per_epoch=iters_per_epoch,
            output_dir=output_dir, lr_scaling=scaling, checkpointer=checkpointer,
            scaler=build.build_scaler(config.runtime, device), amp_dtype=build.amp_dtype(config.runtime, device),
            accumulation_steps=config.optim.accumulation_steps,
            grad_clip=config.optim.grad_clip, log_interval=config.runtime.log_interval,
            hooks=build.build_hooks(config, env, scaling, iters_per_epoch, max_iters, eval_loader, eval_set, hooks),
        )
        build.resume(trainer, config.runtime.resume)
        return trainer.train()
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


def evaluate_checkpoint(config: Any, checkpoint: str, split: str = "val", out: Optional[str] = None) -> dict[str, float]:
    """Evaluate the model of ``checkpoint`` (an orch checkpoint or a state dict) on ``split`` of
    ``config`` in this process; write COCO-format predictions to ``out`` (default
    ``<output_dir>/predictions_<split>.json``) and return the metrics."""
    import torch

    from detection.data import build_dataset, build_loader
    from detection.evaluation import evaluate_model
    from detection.models import check_local_weights

    setup_logging()
    data_split = build.eval_split(config, split)
    if data_split is None:
        raise ConfigError(f"data.{split} is not set in the experiment; add data.{split}.ann_file/img_dir or pick --split")
    path = check_local_weights(checkpoint, "--checkpoint")
    masks = build.with_masks(config)
    dataset = build_dataset(data_split, config.data, train=False, with_masks=masks)
    model = build.build_model_from_checkpoint(config, path, dataset.num_classes)
    device = build.select_device(config.runtime, DistEnv.single())
    model.to(device)
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    loader = build_loader(dataset, config.data, 0, 1, train=False, seed=config.runtime.seed, device=device)
    if out is None:
        out = os.path.join(build.output_dir(config), f"predictions_{split}.json")
    return evaluate_model(model, loader, dataset, device, iou_types=config.eval.metric,
                          classwise=config.eval.classwise, predictions_path=out,
                          with_masks=masks and "segm" in config.eval.metric, engine=config.eval.engine)
