"""The explicit table of torchvision detectors orch can train, built without any download.

Every builder is called with ``weights=None, weights_backbone=None``: this machine (and most
clusters' compute nodes) cannot download, and a silent download inside 64 ranks is the wrong
place to find that out. Pretrained weights (``model.weights``: a whole detector,
``model.backbone_weights``: a backbone) are loaded after the build, from a local file or, for a
torchvision weights name (``COCO_V1``, ``ResNet50_Weights.IMAGENET1K_V2``), from the weights cache
that ``orch submit`` / ``orch weights fetch`` filled (:mod:`detection.weights`). A model given
weights is then set up for fine-tuning as torchvision's builders set it up with weights
(FrozenBatchNorm2d, frozen early backbone stages: :mod:`detection.finetune`).

Input size: the detector's own transform resizes images, so ``data.min_size/max_size`` are passed
to it. SSD and SSDlite have a fixed input size (300/320); orch forces it to ``data.min_size`` so
that small images stay small (SSDlite at 128-160 px trains several times faster than at 320).

``model.options`` are passed to the torchvision builder as keyword arguments, so every knob of
torchvision's classes is reachable (e.g. ``rpn_batch_size_per_image``, ``box_batch_size_per_image``,
``rpn_pre_nms_top_n_train``; shrinking these makes Faster R-CNN 3-10x faster on small images, see
``experiments/``). The table keeps torchvision's defaults so published recipes reproduce.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from cluster.errors import ConfigError
from detection.weights import cached_file, is_weights_name, lookup

log = logging.getLogger(__name__)

RESNET_BACKBONES = ("resnet18", "resnet34", "resnet50")
# SSD/SSDlite builders pass **kwargs to the backbone as well, so options are set as attributes.
SSD_ATTRIBUTE_OPTIONS = ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates")


@dataclass(frozen=True)
class ModelEntry:
    """One row of :data:`MODELS`: how to build a detector and what it needs."""

    builder: str  # torchvision.models.detection function name, or "custom_fasterrcnn"
    fixed_size: bool = False  # SSD family: one square input size, forced to data.min_size
    masks: bool = False  # needs instance masks in the targets (Mask R-CNN)
    takes_backbone: bool = False  # model.backbone selects the FPN backbone
    min_input: int = 0  # smallest data.min_size whose feature maps stay valid
    description: str = ""
    # Fine-tuning layout torchvision's builder gives with weights (detection.finetune): the backbone
    # family, whether its BatchNorm becomes FrozenBatchNorm2d, (stages, trainable stages by default).
    backbone_kind: str = "resnet"
    frozen_bn: bool = True
    trainable_layers: tuple[int, int] = (5, 3)


MODELS: dict[str, ModelEntry] = {
    "fasterrcnn_resnet50_fpn": ModelEntry("fasterrcnn_resnet50_fpn", description="Faster R-CNN R50-FPN v1"),
    "fasterrcnn_resnet50_fpn_v2": ModelEntry("fasterrcnn_resnet50_fpn_v2", description="Faster R-CNN R50-FPN v2",
                                             frozen_bn=False),
    "fasterrcnn_mobilenet_v3_large_fpn": ModelEntry(
        "fasterrcnn_mobilenet_v3_large_fpn", description="Faster R-CNN MobileNetV3-Large FPN",
        backbone_kind="mobilenet", trainable_layers=(6, 3),
    ),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ModelEntry(
        "fasterrcnn_mobilenet_v3_large_320_fpn", description="Faster R-CNN MobileNetV3-Large 320 FPN",
        backbone_kind="mobilenet", trainable_layers=(6, 3),
    ),
    "fasterrcnn": ModelEntry(
        "custom_fasterrcnn", takes_backbone=True, description="Faster R-CNN, ResNet-18/34/50 FPN (model.backbone)"
    ),
    "retinanet_resnet50_fpn": ModelEntry("retinanet_resnet50_fpn", description="RetinaNet R50-FPN v1"),
    "retinanet_resnet50_fpn_v2": ModelEntry("retinanet_resnet50_fpn_v2", description="RetinaNet R50-FPN v2",
                                            frozen_bn=False),
    "fcos_resnet50_fpn": ModelEntry("fcos_resnet50_fpn", description="FCOS R50-FPN"),
    "ssd300_vgg16": ModelEntry(
        # VGG's extra blocks are unpadded 3x3 convs: below 268 px a feature map reaches 0x0.
        "ssd300_vgg16", fixed_size=True, min_input=268, description="SSD300 VGG16",
        backbone_kind="vgg", frozen_bn=False, trainable_layers=(5, 4),
    ),
    "ssdlite320_mobilenet_v3_large": ModelEntry(
        "ssdlite320_mobilenet_v3_large", fixed_size=True, description="SSDlite320 MobileNetV3-Large",
        backbone_kind="ssdlite", frozen_bn=False, trainable_layers=(6, 6),
    ),
    "maskrcnn_resnet50_fpn": ModelEntry("maskrcnn_resnet50_fpn", masks=True, description="Mask R-CNN R50-FPN"),
}


def get_entry(name: str) -> ModelEntry:
    """The table row of ``name``; :class:`ConfigError` naming the valid types otherwise."""
    if name not in MODELS:
        raise ConfigError(f"model.type {name!r} is not a known detector; valid: {', '.join(MODELS)}")
    return MODELS[name]


def is_pretrained(model_cfg) -> bool:
    """Whether ``model.weights`` or ``model.backbone_weights`` is given: the model is then set up
    for fine-tuning as torchvision's builders do with weights (:mod:`detection.finetune`)."""
    return bool(model_cfg.weights or model_cfg.backbone_weights)


def build_model(model_cfg, num_classes: int, data_cfg, load_weights: bool = True):
    """Build the detector of ``model_cfg`` (a :class:`detection.config.ModelConfig`) for
    ``num_classes`` labels including background, sized by ``data_cfg`` (``DataConfig``), then load
    ``model.backbone_weights`` and ``model.weights`` when given and set the model up for
    fine-tuning from them (FrozenBatchNorm2d, frozen early stages: :mod:`detection.finetune`).
    ``load_weights=False`` (a checkpoint's weights come next) reads no weight file but keeps that
    layout, so that the checkpoint fits. Never downloads."""
    entry = get_entry(model_cfg.type)
    if model_cfg.backbone is not None and not entry.takes_backbone:
        raise ConfigError(
            f"model.backbone is only used by model.type fasterrcnn, not {model_cfg.type!r}; remove it"
        )
    # Check the weight files before the (slow) build, so a typo fails in milliseconds.
    weights = weights_file(model_cfg, "model.weights") if load_weights else None
    backbone_weights = weights_file(model_cfg, "model.backbone_weights") if load_weights else None
    if data_cfg.min_size < entry.min_input:
        raise ConfigError(
            f"model.type {model_cfg.type} needs data.min_size >= {entry.min_input} "
            f"(got {data_cfg.min_size}); raise data.min_size or pick ssdlite320_mobilenet_v3_large"
        )
    options = dict(model_cfg.options or {})
    try:
        model = _construct(entry, model_cfg, num_classes, data_cfg, options)
    except TypeError as err:
        raise ConfigError(
            f"model.options {sorted(options)} not accepted by {model_cfg.type}: {err}; "
            "see the torchvision class's keyword arguments"
        ) from None
    if backbone_weights:
        load_backbone_weights(model, backbone_weights)
    if weights:
        load_detector_weights(model, weights)
    if is_pretrained(model_cfg):
        from detection.finetune import setup_finetuning

        setup_finetuning(model, entry, model_cfg.trainable_backbone_layers, model_cfg.type)
    elif model_cfg.trainable_backbone_layers is not None:
        log.warning("model.trainable_backbone_layers=%d has no effect without model.weights or "
                    "model.backbone_weights: every backbone stage trains (as in torchvision)",
                    model_cfg.trainable_backbone_layers)
    return model


def _construct(entry: ModelEntry, model_cfg, num_classes: int, data_cfg, options: dict[str, Any]):
    import torch.nn as nn
    from torchvision.models import detection as tvd

    # torchvision's from-scratch layout (BatchNorm, every stage trainable); the fine-tuning layout
    # follows once weights are loaded (build_model), so trainable_backbone_layers is not passed.
    common: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": num_classes}

    if entry.builder == "custom_fasterrcnn":
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        if model_cfg.backbone not in RESNET_BACKBONES:
            raise ConfigError(
                f"model.backbone {model_cfg.backbone!r} is not valid for model.type fasterrcnn; "
                f"valid: {', '.join(RESNET_BACKBONES)}"
            )
        # From scratch, FrozenBatchNorm2d (the default) stays an identity: use real BatchNorm.
        backbone = resnet_fpn_backbone(
            backbone_name=model_cfg.backbone, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5
        )
        _check_options(tvd.FasterRCNN, options, model_cfg.type)
        return tvd.FasterRCNN(
            backbone, num_classes=num_classes, min_size=data_cfg.min_size, max_size=data_cfg.max_size, **options
        )

    builder: Callable = getattr(tvd, entry.builder)
    if not entry.fixed_size:
        _check_options(builder, options, model_cfg.type)
        return builder(**common, min_size=data_cfg.min_size, max_size=data_cfg.max_size, **options)

    _check_options(builder, options, model_cfg.type)
    attrs = {k: options.pop(k) for k in list(options) if k in SSD_ATTRIBUTE_OPTIONS}
    if entry.builder == "ssdlite320_mobilenet_v3_large" and options:
        raise ConfigError(
            f"model.options {sorted(options)} not supported for {model_cfg.type}; "
            f"valid: {', '.join(SSD_ATTRIBUTE_OPTIONS)}"
        )
    model = builder(**common, **options)
    for key, value in attrs.items():
        setattr(model, key, value)
    size = int(data_cfg.min_size)
    # The SSD builders fix the size (300/320) and warn on `size`; set the transform directly.
    model.transform.min_size = (size,)
    model.transform.max_size = size
    model.transform.fixed_size = (size, size)
    return model


def _accepted_options(builder: Callable) -> set[str]:
    """Keyword arguments a builder (or detector class) really uses. torchvision's detectors pass
    ``**kwargs`` on to a transform that silently ignores unknown names, so orch checks them."""
    import inspect

    from torchvision.models import detection as tvd
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    names: set[str] = set()
    classes = [tvd.FasterRCNN, tvd.MaskRCNN, tvd.RetinaNet, tvd.FCOS, tvd.ssd.SSD]
    target = builder if isinstance(builder, type) else None
    if target is None:
        module = inspect.getmodule(builder)
        target = next((c for c in classes if inspect.getmodule(c) is module), None)
        names |= set(inspect.signature(builder).parameters)
    for cls in (target.__mro__ if target is not None else ()):
        if "__init__" in vars(cls):
            names |= set(inspect.signature(cls.__init__).parameters)
    names |= set(inspect.signature(GeneralizedRCNNTransform.__init__).parameters)
    return {n for n in names if n not in ("self", "kwargs", "args", "weights", "weights_backbone",
                                          "num_classes", "backbone", "progress", "min_size", "max_size")}


def _check_options(builder: Callable, options: dict[str, Any], model_type: str) -> None:
    unknown = sorted(set(options) - _accepted_options(builder) - set(SSD_ATTRIBUTE_OPTIONS))
    if unknown:
        valid = ", ".join(sorted(_accepted_options(builder)))
        raise ConfigError(f"model.options {unknown} not accepted by {model_type}; valid: {valid}")


def download_refusal(value: str | None) -> str | None:
    """Why ``value`` cannot be a local weights file: a URL (orch downloads torchvision's files by
    name only, with their hash check) or a torchvision weights name (which only ``model.weights``
    and ``model.backbone_weights`` take); None otherwise. String shape only: configs are often
    checked on a login node where the weight files are not, so file existence is left to the worker."""
    if not value:
        return None
    text = str(value)
    if "://" in text:
        return (f"{text!r} is a URL; orch does not download URLs: use a torchvision weights name in "
                "model.weights / model.backbone_weights (`orch weights list MODEL_TYPE`), or download the "
                "file yourself and give its local path")
    if is_weights_name(text):
        return (f"{text!r} is a torchvision weights name; names go in model.weights / model.backbone_weights "
                "(fetched into the weights cache at submit); give a local file path here")
    return None


def weights_file(model_cfg, key: str) -> str | None:
    """The local file of ``model.weights`` / ``model.backbone_weights`` (``key``) of ``model_cfg``:
    a torchvision weights name is looked up in the weights cache (never downloaded), anything
    else must be an existing local file."""
    value = getattr(model_cfg, key.split(".", 1)[1])
    if not is_weights_name(value):
        return check_local_weights(value, key)
    entry = lookup(model_cfg.type, model_cfg.backbone, key, value)
    path = cached_file(entry, key, model_cfg.weights_dir)
    log.info("%s: %s is %s", key, entry.name, path)
    return path


def check_local_weights(value: str | None, key: str) -> str | None:
    """Return ``value`` if it names an existing local file; refuse URLs, torchvision weights
    names, directories and missing files with a :class:`ConfigError` saying how to fix it."""
    if not value:
        return None
    text = str(value)
    # A local file that happens to be named like an enum (e.g. ./DEFAULT) is still accepted here.
    refusal = None if os.path.exists(text) and "://" not in text else download_refusal(text)
    if refusal:
        raise ConfigError(f"{key}: {refusal}")
    if os.path.isdir(text):
        raise ConfigError(f"{key}: {text!r} is a directory, not a file; give the path of a .pth file in it")
    if not os.path.isfile(text):
        raise ConfigError(f"{key}: file {text!r} does not exist; give the path of a local .pth file")
    return text


def not_a_checkpoint(path: str, err: BaseException) -> str:
    """One line ``"<path> is not a PyTorch checkpoint (<short reason>)"`` for a ``torch.load``
    failure; torch's own message spans several lines (the ``weights_only`` notice)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        head = b""
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (0x80 protocol).
    if not head:
        reason = "the file is empty"
    elif not (head.startswith(b"PK") or head[:1] == b"\x80"):
        text = all(32 <= b < 127 or b in (9, 10, 13) for b in head)
        reason = "it is a text file, not a torch.save file" if text else "it is not a torch.save file"
    else:
        message = str(err)
        if "WeightsUnpickler error:" in message:  # holds objects weights_only loading refuses
            message = message.split("WeightsUnpickler error:", 1)[1]
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        reason = f"{type(err).__name__}: {lines[0] if lines else 'unreadable'}"
    return f"{path} is not a PyTorch checkpoint ({reason})"


def read_state_dict(path: str, key: str) -> dict:
    """The tensor dict in ``path``: an orch checkpoint (its ``model`` entry) or a plain state dict.
    DDP ``module.`` prefixes are stripped."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is the user's file
        raise ConfigError(f"{key}: {not_a_checkpoint(path, err)}; give a file written by torch.save") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ConfigError(f"{key}: {path!r} holds no state dict (expected a dict of tensors)")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def _load_matching(module, state: dict, key: str, path: str) -> int:
    """Load the entries of ``state`` whose name and shape match ``module``; return the count.
    Shape mismatches (e.g. a 91-class COCO head into a 4-class model) are skipped and logged."""
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if skipped:
        # The usual case is fine-tuning: a head for another class count starts from scratch.
        log.warning("%s: %d tensors with other shapes not loaded (e.g. %s: %s in the file, %s here)", key,
                    len(skipped), skipped[0], tuple(state[skipped[0]].shape), tuple(own[skipped[0]].shape))
    module.load_state_dict(usable, strict=False)
    log.info("%s: loaded %d/%d tensors from %s", key, len(usable), len(own), path)
    return len(usable)


def load_detector_weights(model, path: str, key: str = "model.weights") -> None:
    """Load a whole detector's weights (fine-tuning); heads of another class count are skipped."""
    state = read_state_dict(path, key)
    if _load_matching(model, state, key, path) == 0:
        raise ConfigError(f"{key}: no tensor of {path!r} matches this model; is it for another model.type?")


def load_backbone_weights(model, path: str, key: str = "model.backbone_weights") -> None:
    """Load a backbone state dict (e.g. torchvision's ImageNet file) into the part of the model it
    fits best: ``backbone.body`` (FPN models), ``backbone.features`` or ``backbone``.

    Tensors match by name (ResNet bodies keep torchvision's names). torchvision's detectors re-wrap
    MobileNet's and VGG's ``features`` in their own containers (an FPN body, SSDlite's two stages,
    SSD's ``features`` + ``extra``) in the same order, so where the names do not cover the file
    its tensors are placed in order, by shape, as long as every one of them finds its place."""
    state = read_state_dict(path, key)
    candidates = [model.backbone]
    for name in ("body", "features"):
        if hasattr(model.backbone, name):
            candidates.insert(0, getattr(model.backbone, name))

    def matches(module) -> int:
        own = module.state_dict()
        return sum(1 for k, v in state.items() if k in own and own[k].shape == v.shape)

    best = max(candidates, key=matches)
    if matches(best) < len(_backbone_tensors(state)):
        for module in candidates:
            placed = _placed_in_order(state, module.state_dict())
            if placed:
                log.info("%s: %s matched by order (the detector renames the backbone's layers)", key, path)
                _load_matching(module, placed, key, path)
                return
    if matches(best) == 0:
        raise ConfigError(f"{key}: no tensor of {path!r} matches the backbone of this model")
    _load_matching(best, state, key, path)


def _backbone_tensors(state: dict) -> list:
    """The file's ``(name, tensor)`` pairs that a detector backbone can hold: not the classifier
    (``fc`` / ``classifier``), not BatchNorm's step counters."""
    return [(k, v) for k, v in state.items()
            if not k.startswith(("fc.", "classifier.")) and not k.endswith("num_batches_tracked")]


def _placed_in_order(state: dict, own: dict) -> dict:
    """``{own key: file tensor}`` placing the file's backbone tensors on ``own``'s tensors in
    order, skipping own tensors of another shape (e.g. SSD's ``scale_weight``); empty unless every
    file tensor is placed."""
    targets = [(k, v) for k, v in own.items() if not k.endswith("num_batches_tracked")]
    placed, j = {}, 0
    for _, value in _backbone_tensors(state):
        while j < len(targets) and targets[j][1].shape != value.shape:
            j += 1
        if j == len(targets):
            return {}
        placed[targets[j][0]] = value
        j += 1
    return placed
