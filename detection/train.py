"""The one training entry point every backend calls: ``main(config, env, hooks) -> TrainResult``.

``config`` is a resolved experiment (:class:`orchestrator.config.schema.Experiment`, read by
attribute only: detection never imports orchestrator); ``env`` a :class:`cluster.env.DistEnv`
(``rank, local_rank, world_size, local_world_size, master_addr, master_port, source``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
from typing import Any, Optional, Sequence

# Before torch loads (the engine import below): spinning OpenMP threads collapse throughput
# (measured 30x on 2 cores) when a shared machine is oversubscribed; sleeping waiters cost little
# when it is quiet. An explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cluster.errors import ConfigError  # noqa: E402
from detection.engine import Preempted, TrainResult  # noqa: E402,F401 - re-exported for callers

log = logging.getLogger("detection.train")

__all__ = ["Preempted", "TrainResult", "evaluate_checkpoint", "main"]


def _setup_logging(rank: int) -> None:
    # Library code does not configure the root logger; give ours a handler if nobody did.
    root = logging.getLogger("detection")
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _device(runtime: Any, env: Any):
    import torch

    wanted = runtime.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda but no CUDA GPU is visible; use runtime.device=auto or cpu")
    if wanted == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    index = env.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _seed_everything(runtime: Any, rank: int, device: Any) -> None:
    import numpy as np
    import torch

    seed = runtime.seed + rank  # every rank its own stream; batch order is seeded separately
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if runtime.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set both ways: the flags are process-wide and a process may train several configs.
    # warn_only: some detection ops (roi_align backward on CUDA) have no deterministic kernel.
    torch.use_deterministic_algorithms(bool(runtime.deterministic), warn_only=True)
    torch.backends.cudnn.deterministic = bool(runtime.deterministic)
    torch.backends.cudnn.benchmark = False


def _init_process_group(env: Any, device: Any) -> bool:
    import datetime

    import torch.distributed as dist

    if env.world_size <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=env.init_method, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(minutes=30))
    return True


def _gather_hosts() -> list[str]:
    import torch.distributed as dist

    host = socket.gethostname()
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, host)
        return out
    return [host]


def _eval_split(config: Any, split: str) -> Optional[Any]:
    return config.data.val if split == "val" else config.data.test


def build_optimizer(config: Any, model: Any, lr: float):
    """SGD (momentum) or AdamW over the trainable parameters, at the scaled LR."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optim = config.optim
    if optim.type == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.type == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay)
    raise ConfigError(f"optim.type {optim.type!r} is not supported; valid: sgd, adamw")


def main(config: Any, env: Any, hooks: Sequence[Any] = ()) -> TrainResult:
    """Train ``config`` as rank ``env.rank`` of ``env.world_size`` and return the result (on every
    rank). Initialises and destroys the process group itself when ``world_size > 1``. Raises
    :class:`~cluster.errors.TrainingError` on a non-finite loss, :class:`Preempted` when a hook
    asked to stop, :class:`~cluster.errors.ConfigError` / ``DataError`` on bad input."""
    import torch
    import torch.distributed as dist

    from detection.checkpoint import Checkpointer
    from detection.data import build_dataset, build_loader
    from detection.engine import Trainer
    from detection.hooks import CheckpointHook, EvalHook, LoggerHook, LRSchedulerHook
    from detection.lr_scaling import scale_lr
    from detection.models import build_model, check_local_weights, get_entry, load_detector_weights

    _setup_logging(env.rank)
    runtime = config.runtime
    entry = get_entry(config.model.type)
    device = _device(runtime, env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # runtime.threads, else the share the launcher gave this process (OMP_NUM_THREADS, set per
    # GPU/CPU slice by the local backend), else the cores split between this node's processes.
    omp = os.environ.get("OMP_NUM_THREADS", "")
    threads = runtime.threads or (int(omp) if omp.isdigit() and int(omp) > 0 else 0) or max(
        1, cores // max(1, getattr(env, "local_world_size", 1))
    )
    torch.set_num_threads(threads)
    _seed_everything(runtime, env.rank, device)
    if runtime.amp and device.type != "cuda":
        log.warning("runtime.amp is for CUDA only; training in float32 on %s", device)
    created_group = _init_process_group(env, device)
    try:
        output_dir = runtime.output_dir.replace("{name}", config.name)
        if env.rank == 0:
            os.makedirs(output_dir, exist_ok=True)
        with_masks = entry.masks
        train_set = build_dataset(config.data.train, config.data, train=True, with_masks=with_masks)
        split = _eval_split(config, config.eval.split)
        # like=train_set: evaluation labels follow the training label map even when the val file
        # lists its categories in another order.
        eval_set = (build_dataset(split, config.data, train=False, with_masks=with_masks, like=train_set)
                    if split else None)
        if eval_set is None:
            log.warning("no data.%s split: training without evaluation", config.eval.split)

        model = build_model(config.model, train_set.num_classes, config.data)
        if runtime.load_from:
            load_detector_weights(model, check_local_weights(runtime.load_from, "runtime.load_from"), "runtime.load_from")
        model.to(device)
        scaling = scale_lr(config.optim, config.schedule, env.world_size, config.data.batch_size_per_gpu)
        optimizer = build_optimizer(config, model, scaling.lr)

        loader = build_loader(train_set, config.data, env.rank, env.world_size, train=True, seed=runtime.seed)
        iters_per_epoch = len(loader) // config.optim.accumulation_steps
        if iters_per_epoch < 1:
            raise ConfigError(
                f"one epoch has {len(loader)} batches per rank, fewer than optim.accumulation_steps="
                f"{config.optim.accumulation_steps}; lower the accumulation or the batch size"
            )
        max_iters = scaling.iterations if config.schedule.iterations is not None else config.schedule.epochs * iters_per_epoch
        train_model = model
        if created_group or (env.world_size > 1 and dist.is_initialized()):
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        scaler = torch.amp.GradScaler("cuda") if runtime.amp and device.type == "cuda" else None

        unit = "iter" if config.schedule.iterations is not None else "epoch"
        checkpointer = Checkpointer(output_dir, config.checkpoint, rank=env.rank, unit=unit)
        hosts = _gather_hosts()
        all_hooks: list[Any] = [LRSchedulerHook()]
        if env.rank == 0:
            all_hooks.append(LoggerHook())
        if eval_set is not None:
            eval_loader = build_loader(eval_set, config.data, env.rank, env.world_size, train=False, seed=runtime.seed)
            all_hooks.append(EvalHook(eval_loader, eval_set, with_masks=with_masks and "segm" in config.eval.metric))
        all_hooks.append(CheckpointHook())
        if env.rank == 0 and config.tracking.enable:
            from detection.tracking import MlflowHook

            all_hooks.append(MlflowHook(config, hosts=hosts))
        all_hooks.extend(hooks)

        trainer = Trainer(
            config=config, env=env, model=model, train_model=train_model, optimizer=optimizer,
            loader=loader, device=device, max_iters=max_iters, iters_per_epoch=iters_per_epoch,
            output_dir=output_dir, lr_scaling=scaling, hooks=all_hooks, checkpointer=checkpointer,
            scaler=scaler,
        )
        resume_path, problem = None, None
        if env.rank == 0:
            try:
                resume_path = checkpointer.find_resume(runtime.resume)
            except ConfigError as err:
                problem = str(err)
        if dist.is_initialized() and env.world_size > 1:
            # One decision for all ranks (rank 0's view of the shared output folder); an error
            # travels too, so no rank waits for a rank that gave up.
            box = [(resume_path, problem)]
            dist.broadcast_object_list(box, src=0)
            resume_path, problem = box[0]
        if problem:
            raise ConfigError(problem)
        if resume_path:
            checkpointer.resume(trainer, resume_path)
        elif runtime.resume == "auto":
            log.info("runtime.resume=auto: no checkpoint in %s yet, starting fresh", checkpointer.dir)
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
    from detection.hooks.evaluation import evaluate_model
    from detection.models import build_model, check_local_weights, get_entry, read_state_dict

    _setup_logging(0)
    data_split = _eval_split(config, split)
    if data_split is None:
        raise ConfigError(f"data.{split} is not set in the experiment; add data.{split}.ann_file/img_dir or pick --split")
    path = check_local_weights(checkpoint, "--checkpoint")
    entry = get_entry(config.model.type)
    dataset = build_dataset(data_split, config.data, train=False, with_masks=entry.masks)
    # The checkpoint replaces all weights: do not load model.weights/backbone_weights first.
    bare = dataclasses.replace(config.model, weights=None, backbone_weights=None)
    model = build_model(bare, dataset.num_classes, config.data)
    state = read_state_dict(path, "--checkpoint")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"--checkpoint {path}: does not fit model.type {config.model.type} with {dataset.num_classes - 1} classes "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors); use the experiment it was trained with"
        )
    device = _device(config.runtime, _SingleEnv())
    model.to(device)
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    loader = build_loader(dataset, config.data, 0, 1, train=False, seed=config.runtime.seed)
    if out is None:
        out = os.path.join(config.runtime.output_dir.replace("{name}", config.name), f"predictions_{split}.json")
    eval_cfg = config.eval
    return evaluate_model(model, loader, dataset, device, eval_cfg, predictions_path=out,
                          with_masks=entry.masks and "segm" in eval_cfg.metric)


class _SingleEnv:
    rank = local_rank = 0
    world_size = local_world_size = 1
