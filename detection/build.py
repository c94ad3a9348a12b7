"""The parts of a training run, one small builder each, in the order :func:`detection.train.main`
calls them (detectron2's ``DefaultTrainer.build_*`` classmethods, torchtitan's ``build_*``):
process set-up, datasets, model, optimizer, loaders, schedule length, hooks, resume.

Every builder takes the sections it reads and returns what it built; none keeps state.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from cluster.env import several_nodes
from cluster.errors import ConfigError
from detection import models
from detection.config import output_dir_of

log = logging.getLogger("detection.train")


# -- the process -------------------------------------------------------------------------------
def select_device(runtime: Any, env: Any) -> torch.device:
    """``runtime.device`` for this rank: CUDA device ``local_rank`` (modulo the visible ones)
    when CUDA is wanted (``cuda``) or available (``auto``), else the CPU."""
    wanted = runtime.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda but no CUDA GPU is visible; use runtime.device=auto or cpu")
    if wanted == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    index = env.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def setup_process(runtime: Any, env: Any) -> torch.device:
    """Pick the device, set the thread count and seed every RNG of this rank; returns the device."""
    device = select_device(runtime, env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # runtime.threads, else the share the launcher gave this process (OMP_NUM_THREADS, set per
    # GPU/CPU slice by the local backend), else the cores split between this node's processes.
    omp = os.environ.get("OMP_NUM_THREADS", "")
    threads = runtime.threads or (int(omp) if omp.isdigit() and int(omp) > 0 else 0) or max(
        1, cores // max(1, env.local_world_size))
    torch.set_num_threads(threads)
    seed = runtime.seed + env.rank  # every rank its own stream; batch order is seeded separately
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if runtime.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set both ways: the flags are process-wide and a process may train several configs.
    # warn_only: some detection ops (roi_align backward on CUDA) have no deterministic kernel.
    # Left alone when off and asked off: the call imports torch._inductor (its config has the
    # flag too): 1.4-2 CPU-s more at every rank's start, measured on the 2-core machine.
    if runtime.deterministic or torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(bool(runtime.deterministic), warn_only=True)
    torch.backends.cudnn.deterministic = bool(runtime.deterministic)
    torch.backends.cudnn.benchmark = cudnn_benchmark(runtime, device)
    if amp_mode(runtime) and device.type != "cuda":
        # CPU autocast (bfloat16) runs, but is slower than float32 on most CPUs.
        log.warning("runtime.amp=%s is for CUDA only; training in float32 on %s", runtime.amp, device)
    return device


def cudnn_benchmark(runtime: Any, device: torch.device) -> bool:
    """``runtime.cudnn_benchmark``; null = on with CUDA unless ``runtime.deterministic`` (the
    autotuner picks kernels by timing them, so runs differ)."""
    if runtime.cudnn_benchmark is not None:
        return bool(runtime.cudnn_benchmark)
    return device.type == "cuda" and not runtime.deterministic


def amp_mode(runtime: Any) -> Optional[str]:
    """``runtime.amp`` as ``"bf16"``, ``"fp16"`` or None (off); ``true`` is fp16, as the boolean
    meant before bf16 existed."""
    return "fp16" if runtime.amp is True else (runtime.amp or None)


def amp_dtype(runtime: Any, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``runtime.amp`` on ``device``: None (float32) when off or not CUDA.
    bf16 on a GPU without bfloat16 (before Ampere) is a ConfigError."""
    mode = amp_mode(runtime)
    if mode is None or device.type != "cuda":
        return None
    if mode == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(f"runtime.amp=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support "
                          "(Ampere or newer GPUs do); use runtime.amp=fp16")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def init_process_group(env: Any, device: torch.device, collective_timeout_s: int = 600) -> bool:
    """Start the process group of a multi-process run (nccl on CUDA, gloo on CPU) at
    ``env.init_method``; returns whether it was started here (False when one process, or when
    the launcher already started one, as Ray Train does). A collective waiting longer than
    ``collective_timeout_s`` (a rank died) fails instead of hanging."""
    if env.world_size <= 1 or dist.is_initialized():
        return False
    env, export, said = several_nodes(env, os.environ)  # the master as an address; gloo/NCCL's interface
    os.environ.update(export)
    if said and env.local_rank == 0:
        log.info(said)
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=env.init_method,
                            rank=env.rank, world_size=env.world_size, timeout=timeout)
    return True


def output_dir(config: Any, create: bool = False) -> str:
    """``runtime.output_dir`` with ``{name}`` filled in (created when ``create``)."""
    path = output_dir_of(config)
    if create:
        os.makedirs(path, exist_ok=True)
    return path


# -- data, model, optimizer --------------------------------------------------------------------
def eval_split(config: Any, split: str) -> Optional[Any]:
    """The ``data.val`` or ``data.test`` section (None when the experiment has none)."""
    return config.data.val if split == "val" else config.data.test


def with_masks(config: Any) -> bool:
    """Whether ``model.type`` trains on instance masks (Mask R-CNN)."""
    return models.get_entry(config.model.type).masks


def build_datasets(config: Any) -> tuple[Any, Optional[Any]]:
    """The training set and the ``eval.split`` set (None, with a warning, when there is none)."""
    from detection.data import build_dataset

    masks = with_masks(config)
    train_set = build_dataset(config.data.train, config.data, train=True, with_masks=masks)
    split = eval_split(config, config.eval.split)
    # like=train_set: evaluation labels follow the training label map even when the val file
    # lists its categories in another order.
    eval_set = build_dataset(split, config.data, train=False, with_masks=masks, like=train_set) if split else None
    if eval_set is None:
        log.warning("no data.%s split: training without evaluation", config.eval.split)
    return train_set, eval_set


def build_model(config: Any, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The detector of ``config.model`` (:func:`detection.models.build_model`) with the weights of
    ``runtime.load_from`` when set, on ``device``."""
    model = models.build_model(config.model, num_classes, config.data)
    if config.runtime.load_from:
        path = models.check_local_weights(config.runtime.load_from, "runtime.load_from")
        models.load_detector_weights(model, path, "runtime.load_from")
    model.to(device)
    if config.runtime.channels_last:
        use_channels_last(model)
    if config.runtime.compile:
        compile_model(model, config.runtime.compile, device)
    return model


def _channels_last_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def use_channels_last(model: torch.nn.Module) -> None:
    """Weights and the backbone's input in channels_last memory format (``runtime.channels_last``).
    The input is converted where the backbone receives it: the detector's transform resizes the
    images and batches them into a new (contiguous) tensor, so converting the loader's images
    would be undone."""
    model.to(memory_format=torch.channels_last)
    model.backbone.register_forward_pre_hook(_channels_last_input)


def compile_model(model: torch.nn.Module, what: str, device: torch.device) -> None:
    """``torch.compile`` the backbone's body (``what="backbone"``; the whole backbone for SSD and
    SSDlite) or the whole detector (``"model"``), in place (``Module.compile``: parameter names and
    checkpoints stay as without compile). Compilation happens at the first iterations."""
    import shutil

    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("runtime.compile needs triton for CUDA (pip install triton); set runtime.compile: false")
    elif not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise ConfigError("runtime.compile on the CPU needs a C++ compiler (g++ or $CXX) on the PATH; "
                          "install one or set runtime.compile: false")
    target = model if what == "model" else getattr(model.backbone, "body", model.backbone)
    target.compile()
    log.info("runtime.compile=%s: compiling %s at the first iterations", what, type(target).__name__)


def build_model_from_checkpoint(config: Any, path: str, num_classes: int) -> torch.nn.Module:
    """The detector of ``config.model`` with all weights from ``path`` (an orch checkpoint or a
    state dict; ``model.weights`` / ``backbone_weights`` are not read, but a model trained from them
    gets their fine-tuning layout, FrozenBatchNorm2d included)."""
    model = models.build_model(config.model, num_classes, config.data, load_weights=False)
    try:
        missing, unexpected = model.load_state_dict(models.read_state_dict(path, "--checkpoint"), strict=False)
    except RuntimeError as err:  # shapes differ (another class count): torch lists every tensor
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise ConfigError(
            f"--checkpoint {path}: does not fit model.type {config.model.type} with {num_classes - 1} classes "
            f"({lines[0] if lines else 'tensor shapes differ'}); use the experiment it was trained with"
        ) from None
    if missing or unexpected:
        raise ConfigError(
            f"--checkpoint {path}: does not fit model.type {config.model.type} with {num_classes - 1} classes "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors); use the experiment it was trained with"
        )
    return model


def build_optimizer(optim: Any, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW of the ``optim`` section over the trainable parameters, at ``lr``
    (the LR scaled to the real world size)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.type == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.type == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay)
    raise ConfigError(f"optim.type {optim.type!r} is not supported; valid: sgd, adamw")


def build_loaders(config: Any, env: Any, train_set: Any, eval_set: Optional[Any],
                  device: Any = None) -> tuple[Any, Optional[Any]]:
    """This rank's training loader and evaluation loader (None without an eval set); batches
    for a CUDA ``device`` come in pinned memory."""
    from detection.data import build_loader

    seed = config.runtime.seed
    loader = build_loader(train_set, config.data, env.rank, env.world_size, train=True, seed=seed, device=device)
    eval_loader = (build_loader(eval_set, config.data, env.rank, env.world_size, train=False, seed=seed,
                                device=device) if eval_set is not None else None)
    return loader, eval_loader


def schedule_unit(config: Any) -> str:
    """``"iter"`` for an iteration schedule, else ``"epoch"``: the unit of ``eval.interval``,
    ``checkpoint.interval`` and the periodic checkpoint names."""
    return "iter" if config.schedule.iterations is not None else "epoch"


def schedule_length(config: Any, scaling: Any, batches_per_epoch: int) -> tuple[int, int]:
    """``(iters_per_epoch, max_iters)``: optimizer steps in one epoch of ``batches_per_epoch``
    batches per rank, and in the whole (scaled) schedule."""
    accumulation = config.optim.accumulation_steps
    iters_per_epoch = batches_per_epoch // accumulation
    if iters_per_epoch < 1:
        raise ConfigError(
            f"one epoch has {batches_per_epoch} batches per rank, fewer than optim.accumulation_steps="
            f"{accumulation}; lower the accumulation or the batch size"
        )
    if config.schedule.iterations is not None:
        return iters_per_epoch, scaling.iterations
    return iters_per_epoch, config.schedule.epochs * iters_per_epoch


def wrap_model(model: torch.nn.Module, env: Any, device: torch.device) -> torch.nn.Module:
    """What the loop calls: ``model`` in DistributedDataParallel when a process group runs."""
    if env.world_size > 1 and dist.is_initialized():
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def build_scaler(runtime: Any, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A gradient scaler for float16 autocast (``runtime.amp=fp16`` on CUDA), else None: bfloat16
    has float32's exponent range and needs no loss scaling."""
    return torch.amp.GradScaler("cuda") if amp_dtype(runtime, device) == torch.float16 else None


# -- hooks and resume ---------------------------------------------------------------------------
def gather_places() -> list[tuple[str, int]]:
    """Every rank's host name and process group, in rank order (a collective: all ranks call it)."""
    place = (socket.gethostname(), os.getpgid(0))
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, place)
        return [tuple(p) for p in out]
    return [place]


def build_hooks(config: Any, env: Any, scaling: Any, iters_per_epoch: int, max_iters: int,
                eval_loader: Optional[Any], eval_set: Optional[Any], extra: Sequence[Any] = ()) -> list[Any]:
    """The trainer's own hooks, each given its settings now, then ``extra`` (a launcher's hooks
    run after the trainer's own: the Ray report hooks rely on it). Every rank calls it."""
    from detection.hooks import CheckpointHook, EvalHook, HeartbeatHook, LoggerHook, LRSchedulerHook, lr_schedule

    unit = schedule_unit(config)
    places = gather_places()
    # First: it announces an evaluation or checkpoint before the hooks that run it.
    hooks: list[Any] = [HeartbeatHook(output_dir(config), env.rank, unit=unit,
                                      eval_period=config.eval.interval if eval_loader is not None else 0,
                                      checkpoint_period=config.checkpoint.interval,
                                      max_phase_s=config.runtime.collective_timeout_s)]
    hooks.append(LRSchedulerHook(lr_schedule(config.schedule, scaling, iters_per_epoch, max_iters)))
    if env.rank == 0:
        hooks.append(LoggerHook(config.runtime.log_interval, name=config.name))
    if eval_loader is not None:
        hooks.append(EvalHook(eval_loader, eval_set, period=config.eval.interval, unit=unit, split=config.eval.split,
                              iou_types=config.eval.metric, classwise=config.eval.classwise,
                              with_masks=with_masks(config) and "segm" in config.eval.metric,
                              engine=config.eval.engine))
    hooks.append(CheckpointHook(config.checkpoint.interval, unit))
    if config.tracking.enable and config.runtime.system_metrics_interval > 0:
        # The lowest rank of each host samples it; rank 0's before the journal hook (its last sample precedes the end status).
        from detection.hooks.system_metrics import RELAY_DIR, SystemMetricsHook, samplers
        from detection.journal_hook import journal_dir

        groups = samplers(places).get(env.rank)
        if groups is not None:
            relay = os.path.join(output_dir(config), RELAY_DIR)
            others = sorted({host for host, _ in places} - {places[env.rank][0]}) if env.rank == 0 else ()
            hooks.append(SystemMetricsHook(journal_dir(output_dir(config)), config.runtime.system_metrics_interval,
                                           pgid=groups, relay_dir=relay if env.rank else None, relay_from=relay,
                                           relay_hosts=others))
    if env.rank == 0 and config.tracking.enable:
        from detection.journal_hook import JournalHook

        hooks.append(JournalHook(config, hosts=[host for host, _ in places], log_interval=config.runtime.log_interval))
    return [*hooks, *extra]


def resume(trainer: Any, spec: Optional[str]) -> None:
    """Restore ``trainer`` from the checkpoint ``runtime.resume`` names (``auto``: the newest in
    the output folder, none yet = a fresh start). Rank 0 decides for every rank."""
    checkpointer = trainer.checkpointer
    path, problem = None, None
    if trainer.env.rank == 0:
        try:
            path = checkpointer.find_resume(spec)
        except ConfigError as err:
            problem = str(err)
    if dist.is_initialized() and trainer.env.world_size > 1:
        # One decision for all ranks (rank 0's view of the shared output folder); an error
        # travels too, so no rank waits for a rank that gave up.
        box = [(path, problem)]
        dist.broadcast_object_list(box, src=0)
        path, problem = box[0]
    if problem:
        raise ConfigError(problem)
    if path:
        checkpointer.resume(trainer, path)
    elif spec == "auto":
        log.info("runtime.resume=auto: no checkpoint in %s yet, starting fresh", checkpointer.dir)
