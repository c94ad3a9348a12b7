"""Cross-field rules of an experiment, checked after the type conversion.

Each error names the file that set the offending key, the key and how to fix it.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from cluster.errors import ConfigError
from detection.models import MODELS, RESNET_BACKBONES, download_refusal  # torch-free table
from detection.weights import WEIGHT_KEYS, is_weights_name, name_problem
from orchestrator.config.schema import Experiment
from orchestrator.config.validate import Context, is_schema_path

# Slurm's --time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_SLURM_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")
_METRICS = ("bbox", "segm")
# The name is one folder under work_dirs ({name} in runtime.output_dir): no '/', no '..', no
# hidden or option-like name.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _get(exp: Experiment, path: str) -> Any:
    value: Any = exp
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _at_least(exp: Experiment, ctx: Context, minimum: float, *paths: str, strict: bool = False) -> None:
    for path in paths:
        value = _get(exp, path)
        if value is None:
            continue
        if value < minimum or (strict and value == minimum):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise ctx.error(path, f"must be {bound}, got {value!r}")


def _installed(package: str) -> bool:
    try:
        __import__(package)
    except ImportError:
        return False
    return True


def check_experiment(exp: Experiment, ctx: Context) -> None:
    """Raise :class:`ConfigError` on the first rule ``exp`` breaks."""
    if not exp.name.strip():
        raise ctx.error("name", "must not be empty")
    if not _SAFE_NAME.fullmatch(exp.name):
        raise ctx.error("name", f"must be a plain folder name (letters, digits, '_', '.', '-'; not starting with "
                        f"'.' or '-'), got {exp.name!r}; set name: to one (it defaults to the file's name) and "
                        "runtime.output_dir to write elsewhere")
    _check_schedule(exp, ctx)
    _at_least(exp, ctx, 1, "data.batch_size_per_gpu", "data.min_size", "data.max_size",
              "optim.accumulation_steps", "optim.auto_scale_lr.base_batch_size",
              "eval.interval", "checkpoint.interval", "checkpoint.max_keep",
              "runtime.log_interval", "runtime.threads", "runtime.collective_timeout_s")
    _at_least(exp, ctx, 0, "data.workers_per_gpu", "data.flip_prob", "optim.momentum",
              "optim.weight_decay", "schedule.warmup_iters", "schedule.min_lr_ratio")
    _at_least(exp, ctx, 0, "optim.lr", "optim.grad_clip", "schedule.gamma",
              "schedule.warmup_ratio", strict=True)
    _at_least(exp, ctx, 1, "runtime.hang_timeout", "runtime.startup_timeout")
    _at_least(exp, ctx, 0, "runtime.system_metrics_interval")
    if exp.data.max_size < exp.data.min_size:
        raise ctx.error("data.max_size", f"must be >= data.min_size ({exp.data.min_size}), got {exp.data.max_size}")
    if exp.data.flip_prob > 1:
        raise ctx.error("data.flip_prob", f"is a probability in [0, 1], got {exp.data.flip_prob}")
    for path in ("schedule.warmup_ratio", "schedule.min_lr_ratio"):
        if _get(exp, path) > 1:
            raise ctx.error(path, f"is a fraction of the LR in [0, 1], got {_get(exp, path)}")
    if not exp.eval.metric or any(m not in _METRICS for m in exp.eval.metric):
        raise ctx.error("eval.metric", f"must list some of {', '.join(_METRICS)}, got {list(exp.eval.metric)}")
    if exp.eval.engine == "faster" and not _installed("faster_coco_eval"):
        # found now rather than at the first evaluation, an epoch into training
        raise ctx.error("eval.engine", "faster needs the faster-coco-eval package: pip install faster-coco-eval, "
                        "or set eval.engine: auto (falls back to pycocotools)")
    if "{" in exp.runtime.output_dir.replace("{name}", ""):
        raise ctx.error("runtime.output_dir", "may only contain the placeholder {name}, got "
                        f"{exp.runtime.output_dir!r}")
    _check_model(exp, ctx)
    _check_gpu_options(exp, ctx)
    _check_train_pipeline(exp, ctx)
    _check_splits(exp, ctx)
    _check_resources(exp, ctx)
    _check_searches(exp, ctx)


def _check_model(exp: Experiment, ctx: Context) -> None:
    """The model rules the worker would otherwise find only after a job starts (string shape only:
    weight files usually exist on the compute nodes, not where the config is resolved; torchvision
    weights names are checked against the model's weights enum)."""
    model = exp.model
    entry = MODELS.get(model.type)
    if entry is None:
        close = difflib.get_close_matches(model.type, list(MODELS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ctx.error("model.type", f"{model.type!r} is not a known detector{hint}; valid: {', '.join(MODELS)}")
    takers = [name for name, row in MODELS.items() if row.takes_backbone]
    if model.backbone is not None and not entry.takes_backbone:
        raise ctx.error("model.backbone", f"is only used by model.type {' / '.join(takers)}, not "
                        f"{model.type!r}; remove it")
    # None is left to the worker: a grid or sweep may still supply the backbone.
    if model.backbone is not None and model.backbone not in RESNET_BACKBONES:
        close = difflib.get_close_matches(model.backbone, RESNET_BACKBONES, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ctx.error("model.backbone", f"{model.backbone!r} is not valid for model.type {model.type}{hint}; "
                        f"valid: {', '.join(RESNET_BACKBONES)}")
    for path in ("model.weights", "model.backbone_weights", "runtime.load_from"):
        value = _get(exp, path)
        if path in WEIGHT_KEYS and is_weights_name(value):
            # A torchvision name must exist for this model; its file is fetched at submit.
            problem = name_problem(model.type, model.backbone, path, value)
            if problem:
                raise ctx.error(path, problem)
            continue
        refusal = download_refusal(value)
        if refusal:
            raise ctx.error(path, refusal)


def _check_gpu_options(exp: Experiment, ctx: Context) -> None:
    """runtime.compile / cudnn_benchmark against runtime.deterministic, and the range of
    model.trainable_backbone_layers for the model type (the rest waits for the GPU: bf16 support,
    triton)."""
    runtime = exp.runtime
    if runtime.compile is True:
        raise ctx.error("runtime.compile", "true is ambiguous; use backbone (the backbone's body, the usual "
                        "choice), model (the whole detector) or false")
    if runtime.deterministic and runtime.cudnn_benchmark:
        raise ctx.error("runtime.cudnn_benchmark", "true picks cuDNN kernels by timing them, which breaks "
                        "runtime.deterministic; set it to null (auto) or false, or runtime.deterministic: false")
    layers = exp.model.trainable_backbone_layers
    entry = MODELS.get(exp.model.type)
    if layers is not None and entry is not None and not 0 <= layers <= entry.trainable_layers[0]:
        maximum, default = entry.trainable_layers
        raise ctx.error("model.trainable_backbone_layers", f"must be in 0..{maximum} for {exp.model.type} "
                        f"({maximum} = every backbone stage trains, null = {default}), got {layers}")


def _check_train_pipeline(exp: Experiment, ctx: Context) -> None:
    """Transform names and argument names of ``data.train_pipeline`` (values are checked when the
    worker builds the pipeline: that needs torchvision), and the loader's prefetch depth."""
    from detection.data.pipeline_spec import pipeline_problem  # a torch-free table

    _at_least(exp, ctx, 1, "data.prefetch_factor")
    problem = pipeline_problem(exp.data.train_pipeline)
    if problem:
        key, message = problem
        raise ctx.error(f"data.train_pipeline{key}", message)


def _check_splits(exp: Experiment, ctx: Context) -> None:
    """Every split that is given names its images; only data.test may lack an annotation file
    (an image folder predicted for an evaluation server). An unset data.train (both empty) is
    left to the worker: a kfold or a --set may still fill it in."""
    for name in ("train", "val", "test"):
        split = getattr(exp.data, name)
        if split is None or (name == "train" and not split.ann_file and not split.img_dir):
            continue
        if not split.img_dir:
            raise ctx.error(f"data.{name}.img_dir", "is empty; give the folder the images are in")
        if not split.ann_file and name != "test":
            raise ctx.error(f"data.{name}.ann_file", "is empty; training and validation need a COCO annotation "
                            "file (only data.test may be an image folder without one, for orch eval --format-only)")


def _check_schedule(exp: Experiment, ctx: Context) -> None:
    schedule = exp.schedule
    if schedule.epochs is not None and schedule.iterations is not None:
        raise ConfigError(
            f"schedule has both epochs ({schedule.epochs}, from {ctx.where('schedule.epochs')}) and "
            f"iterations ({schedule.iterations}, from {ctx.where('schedule.iterations')}); "
            "keep one: set the other to null (e.g. 'epochs: null')"
        )
    if schedule.epochs is None and schedule.iterations is None:
        raise ctx.error("schedule", "needs epochs or iterations; e.g. --set schedule.epochs=12")
    _at_least(exp, ctx, 1, "schedule.epochs", "schedule.iterations")
    milestones = schedule.milestones
    if any(m <= 0 for m in milestones) or any(a >= b for a, b in zip(milestones, milestones[1:])):
        raise ctx.error("schedule.milestones", f"must be positive and strictly increasing, got {list(milestones)}")
    # Milestones past the end are allowed: `--set schedule.epochs=1` is a common smoke test.


def _check_resources(exp: Experiment, ctx: Context) -> None:
    res = exp.resources
    _at_least(exp, ctx, 1, "resources.gpus", "resources.gpus_per_node", "resources.nodes",
              "resources.cpus_per_task", "resources.local.cpu_slots", "resources.local.max_parallel",
              "resources.slurm.array_parallelism")
    _at_least(exp, ctx, 0, "resources.mem_gb", strict=True)
    try:
        res.layout()
    except ConfigError as err:
        key = "resources.nodes" if res.nodes is not None else "resources.gpus"
        raise ctx.error(key, str(err)) from None
    if res.time is not None and not _SLURM_TIME.match(res.time):
        raise ctx.error("resources.time", f"{res.time!r} is not a Slurm time (MM, HH:MM:SS or D-HH:MM:SS)")


def _check_searches(exp: Experiment, ctx: Context) -> None:
    for key, values in exp.grid.items():
        if not is_schema_path(key) or key.split(".", 1)[0] in ("grid", "kfold", "sweep"):
            raise ctx.error(f"grid.{key}", "is not a config key that a grid can vary")
        if not values:
            raise ctx.error(f"grid.{key}", "needs at least one value")
    if exp.kfold is not None:
        _at_least(exp, ctx, 2, "kfold.folds")
    if exp.sweep is not None:
        _at_least(exp, ctx, 1, "sweep.num_samples", "sweep.max_concurrent")
        _at_least(exp, ctx, 0, "sweep.gpus_per_trial", "sweep.cpus_per_trial")
        for key in exp.sweep.space:
            if not is_schema_path(key) or key.split(".", 1)[0] in ("grid", "kfold", "sweep"):
                raise ctx.error(f"sweep.space.{key}", "is not a config key that a sweep can search")
