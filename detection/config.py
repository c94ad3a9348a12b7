"""Typed, frozen sections of an experiment that the training program reads.

These are plain dataclasses (no torch import) so that ``orch config`` can validate an experiment
without loading torch. The orchestrator's :class:`orchestrator.config.schema.Experiment` composes
them with the launch-side sections (resources, grid, kfold, sweep).

Field comments are the schema documentation: the README's schema table is written from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


@dataclass(frozen=True)
class ModelConfig:
    """Which detector to build (a name from ``detection.models.MODELS``) and how."""

    # fasterrcnn_resnet50_fpn | fasterrcnn_resnet50_fpn_v2 | fasterrcnn_mobilenet_v3_large_fpn |
    # fasterrcnn_mobilenet_v3_large_320_fpn | fasterrcnn (with `backbone`) | retinanet_resnet50_fpn |
    # retinanet_resnet50_fpn_v2 | fcos_resnet50_fpn | ssd300_vgg16 | ssdlite320_mobilenet_v3_large |
    # maskrcnn_resnet50_fpn
    type: str = "ssdlite320_mobilenet_v3_large"
    backbone: Optional[str] = None  # resnet18 | resnet34 | resnet50 (FPN backbones)
    # A local file (an orch checkpoint or a torchvision state dict) or a torchvision weights name
    # (COCO_V1, DEFAULT, FasterRCNN_ResNet50_FPN_Weights.COCO_V1), fetched into the weights cache at submit.
    weights: Optional[str] = None
    backbone_weights: Optional[str] = None  # the same for the backbone (IMAGENET1K_V1, ResNet50_Weights.DEFAULT)
    # Folder of the weights cache that names resolve to; set by orch submit ($ORCH_WEIGHTS_DIR, else
    # $TORCH_HOME/hub/checkpoints). null = torch's hub cache.
    weights_dir: Optional[str] = None
    # Backbone stages that train, from the last one, when model.weights or model.backbone_weights is
    # given (torchvision's fine-tuning setup, with FrozenBatchNorm2d where torchvision uses it);
    # null = torchvision's default (3; 4 for ssd300_vgg16, 6 = all for ssdlite). Without weights
    # every stage trains (in BatchNorm) and this is ignored with a warning.
    trainable_backbone_layers: Optional[int] = None
    # Extra keyword arguments for the torchvision builder (e.g. rpn_batch_size_per_image).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSplit:
    """One split of a COCO-format dataset."""

    # COCO instances JSON. data.test alone may leave it empty (or null): the test split is then
    # every image under img_dir, for `orch eval --split test --format-only` (no metrics).
    ann_file: Optional[str] = ""
    img_dir: str = ""
    classes: Optional[tuple[str, ...]] = None  # subset of category names; None = all


@dataclass(frozen=True)
class DataConfig:
    """Datasets, batching and input sizes."""

    train: DataSplit = field(default_factory=DataSplit)
    val: Optional[DataSplit] = None
    test: Optional[DataSplit] = None
    batch_size_per_gpu: int = 2
    workers_per_gpu: int = 2
    min_size: int = 800  # resize: shorter side
    max_size: int = 1333  # resize: longer side cap
    flip_prob: float = 0.5
    keep_empty: bool = False  # keep training images that have no annotations
    aspect_ratio_grouping: bool = True
    on_bad_data: Literal["error", "skip"] = "error"  # skip = drop and count bad boxes/images
    # apply = read images upright by their EXIF orientation, as annotation tools show them (COCO
    # width/height are the upright sizes); ignore = read the stored frame (datasets labelled in it).
    exif: Literal["apply", "ignore"] = "apply"
    # Training augmentation on torchvision.transforms.v2: a preset of torchvision's detection
    # references (hflip | lsj | multiscale | ssd | ssdlite; their flip uses flip_prob) or a list
    # of {type: <v2 transform>, <argument>: value, ...}; SanitizeBoundingBoxes is added at the end.
    # null = resize to min_size/max_size and flip with flip_prob. The model still resizes its
    # input to min_size/max_size either way.
    train_pipeline: Union[str, tuple[dict[str, Any], ...], None] = None
    prefetch_factor: int = 2  # batches each loader worker prepares ahead


@dataclass(frozen=True)
class AutoScaleLR:
    """Scale the LR to the real batch size (effective batch = world x per-GPU x accumulation)."""

    enable: bool = True
    base_batch_size: int = 16
    rule: Literal["linear", "sqrt"] = "linear"


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer."""

    type: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: Optional[float] = None  # max global grad norm; None = off
    accumulation_steps: int = 1
    auto_scale_lr: AutoScaleLR = field(default_factory=AutoScaleLR)


@dataclass(frozen=True)
class ScheduleConfig:
    """Length of training and the LR policy. Give ``epochs`` or ``iterations`` (not both);
    ``milestones`` are in the same unit."""

    epochs: Optional[int] = 12
    iterations: Optional[int] = None
    warmup_iters: int = 500
    warmup_ratio: float = 0.001  # LR at iteration 0 = lr * warmup_ratio
    policy: Literal["step", "cosine", "constant"] = "step"
    milestones: tuple[int, ...] = (8, 11)
    gamma: float = 0.1
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the LR


@dataclass(frozen=True)
class EvalConfig:
    """COCO evaluation."""

    interval: int = 1  # epochs (or iterations when the schedule is in iterations)
    metric: tuple[str, ...] = ("bbox",)  # bbox and/or segm
    classwise: bool = False
    split: Literal["val", "test"] = "val"
    # COCOeval implementation, same numbers: faster-coco-eval (C++, ~10x faster) or pycocotools;
    # auto = faster when installed, else pycocotools with one warning
    engine: Literal["auto", "faster", "pycocotools"] = "auto"


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints: every ``interval`` epochs (or iterations), newest ``max_keep`` kept."""

    interval: int = 1
    max_keep: int = 3
    save_best: Optional[str] = "bbox_mAP"  # metric name, or None
    rule: Literal["greater", "less"] = "greater"


@dataclass(frozen=True)
class RuntimeConfig:
    """Seeds, precision, where outputs go, resume."""

    seed: int = 0
    deterministic: bool = False
    # Mixed precision on CUDA: false | bf16 (bfloat16 autocast, no loss scaling; needs an Ampere or
    # newer GPU) | fp16 (float16 autocast + GradScaler: torchvision's --amp); true = fp16 (older
    # files). On the CPU training stays float32 (one warning).
    amp: Union[bool, Literal["bf16", "fp16"]] = False
    # Model weights and the batched images the backbone sees in channels_last memory format (faster
    # convolutions on tensor-core GPUs; on the CPU the same conversion runs, for no gain).
    channels_last: bool = False
    # torch.compile: false | backbone (the backbone's body: its shapes follow the image batch) |
    # model (the whole detector: its heads have data-dependent shapes, expect graph breaks).
    compile: Union[bool, Literal["backbone", "model"]] = False
    # cuDNN autotuner (per input shape); null = on with CUDA unless runtime.deterministic.
    cudnn_benchmark: Optional[bool] = None
    output_dir: str = "work_dirs/{name}"  # {name} is replaced by the experiment name
    resume: Optional[str] = None  # "auto" | path of a checkpoint
    load_from: Optional[str] = None  # weights only (fine-tuning)
    log_interval: int = 10  # iterations between logged metrics
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = None  # torch intra-op threads per process; None = share of cores
    # A collective that waits longer than this fails the run (a dead rank must not hang the
    # others for torch's default 30 minutes); long enough for rank 0's COCO evaluation.
    collective_timeout_s: int = 600
    # Hang watchdog (the job's supervisor reads every rank's heartbeat): no rank advancing for
    # hang_timeout s (null = max(300, 20 x the median step time)) is a hang; before training
    # starts startup_timeout applies. on_hang: fail (stop, free the devices) | requeue (restart
    # from the last checkpoint) | wait (report only). Every rank's stack goes to <output_dir>/hang-*/.
    hang_timeout: Optional[float] = None
    startup_timeout: float = 1800.0
    on_hang: Literal["fail", "requeue", "wait"] = "fail"
    system_metrics_interval: float = 30.0  # s between system/... metrics (CPU, RSS, GPU); 0 = off


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow. Training writes a journal in its output folder; a shipper sends it to ``uri``
    (``MLFLOW_TRACKING_URI`` or the local SQLite default when null) beside training or later."""

    enable: bool = True
    # auto: ship when the server answers, keep journaling (one warning) when not; online: refuse
    # to submit when it does not answer; offline: never ship during the job (orch sync later).
    mode: Literal["auto", "online", "offline"] = "auto"
    uri: Optional[str] = None
    experiment: Optional[str] = None  # MLflow experiment; None = the experiment name
    log_checkpoints: bool = False
    run_name: Optional[str] = None
    # Set by orch for nested runs (a fold under its set, a trial under its sweep); leave empty.
    parent_journal: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)  # extra tags (fold, grid point, trial)


def output_dir_of(config: Any) -> str:
    """``runtime.output_dir`` of an experiment (anything with ``name`` and ``runtime``) with
    ``{name}`` replaced by its name: the one place the output folder's name is built."""
    return config.runtime.output_dir.replace("{name}", config.name)
