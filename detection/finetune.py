"""Fine-tuning from pretrained weights, set up as torchvision's detection builders set it up.

orch builds every detector without weights (:mod:`detection.models`), which gives torchvision's
from-scratch layout: plain BatchNorm everywhere and every backbone stage trainable. When
torchvision's builders get weights (``weights`` or ``weights_backbone``) they build another layout:

- the ResNet and MobileNetV3 FPN backbones use ``FrozenBatchNorm2d`` (statistics fixed to the
  loaded ones: batch statistics over 2 images per GPU are noise); the v2 models (BatchNorm by
  design), SSD300 (VGG has no norm layers) and SSDlite keep theirs;
- only the last ``trainable_backbone_layers`` stages of the backbone train (default 3 of 5 for
  ResNet, 3 of 6 for MobileNetV3, 4 of 5 for VGG, 6 of 6 for SSDlite's MobileNetV3).

:func:`setup_finetuning` turns a from-scratch model into that layout *after* the weights are loaded
(so the frozen statistics are the loaded ones). The stages are taken from the built model in
torchvision's order (``_resnet_fpn_extractor``, ``_mobilenet_extractor``, ``_vgg_extractor`` and
SSDlite's extractor, which split the backbone into other containers); a test compares the result
with torchvision's own builders given weights. Never for a model trained from scratch: a
FrozenBatchNorm2d that never saw weights stays an identity.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from cluster.errors import ConfigError

log = logging.getLogger(__name__)


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every ``BatchNorm2d`` below ``module`` by a ``FrozenBatchNorm2d`` holding its weight,
    bias and running statistics; return how many were replaced."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).to(child.running_mean.device)
            with torch.no_grad():
                frozen.weight.copy_(child.weight if child.affine else torch.ones_like(frozen.weight))
                frozen.bias.copy_(child.bias if child.affine else torch.zeros_like(frozen.bias))
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
            count += 1
        else:
            count += freeze_batchnorm(child)
    return count


def _stages(blocks: list[list[nn.Module]], starts: list[int]) -> list[list[nn.Module]]:
    """Group ``blocks`` (each a list of modules) into stages beginning at the indices ``starts``."""
    bounds = [*starts, len(blocks)]
    return [[m for block in blocks[a:b] for m in block] for a, b in zip(bounds, bounds[1:])]


def _is_cn(module: nn.Module) -> bool:
    """MobileNet's marker of a strided block (torchvision's ``_is_cn``): a stage begins there."""
    return bool(getattr(module, "_is_cn", False))


def resnet_stages(body: nn.Module) -> list[list[nn.Module]]:
    """The 5 stages of a ResNet FPN body: stem (conv1 + bn1), layer1..layer4 (torchvision freezes
    by these names; bn1 trains only with all 5 stages)."""
    return [[body.conv1, body.bn1], [body.layer1], [body.layer2], [body.layer3], [body.layer4]]


def mobilenet_stages(blocks: list[list[nn.Module]], strided: list[int]) -> list[list[nn.Module]]:
    """MobileNetV3 stages: from block 0, from every strided block, and the last block alone."""
    return _stages(blocks, [0, *strided, len(blocks) - 1])


def backbone_stages(model: nn.Module, kind: str) -> list[list[nn.Module]]:
    """The backbone of ``model`` as torchvision's stages, first (nearest the image) to last.
    ``kind`` is the model table's ``backbone`` family: resnet, mobilenet, vgg or ssdlite."""
    backbone = model.backbone
    if kind == "resnet":
        return resnet_stages(backbone.body)
    if kind == "mobilenet":  # the FPN body holds MobileNet's `features` blocks unchanged
        blocks = [[b] for b in backbone.body.children()]
        return mobilenet_stages(blocks, [i for i, b in enumerate(blocks) if _is_cn(b[0])])
    if kind == "ssdlite":
        # SSDlite cuts block C4 in two: features[0] = blocks[:c4] + C4's expansion layer,
        # features[1] = the rest of C4 + the blocks after it.
        head, tail = list(backbone.features[0]), list(backbone.features[1])
        blocks = [[b] for b in head[:-1]] + [[head[-1], tail[0]]] + [[b] for b in tail[1:]]
        c4 = len(head) - 1
        return mobilenet_stages(blocks, [i for i in range(c4) if _is_cn(blocks[i][0])] + [c4])
    if kind == "vgg":
        # SSD keeps VGG's features up to maxpool4 in `features` and the rest (minus the last
        # maxpool, which has no weights) before fc6/fc7 in extra[0]; a stage begins at each maxpool.
        blocks = [[b] for b in [*backbone.features, *list(backbone.extra[0])[:-1]]]
        pools = [i for i, b in enumerate(blocks) if isinstance(b[0], nn.MaxPool2d)]
        return _stages(blocks, [0, *pools])
    raise ValueError(f"unknown backbone kind {kind!r}")


def freeze_stages(stages: list[list[nn.Module]], trainable: int) -> int:
    """Stop gradients in all but the last ``trainable`` stages; return the number frozen."""
    frozen = stages[: len(stages) - trainable]
    for stage in frozen:
        for module in stage:
            for parameter in module.parameters():
                parameter.requires_grad_(False)
    return len(frozen)


def setup_finetuning(model: nn.Module, entry: Any, trainable: int | None, model_type: str) -> None:
    """Give ``model`` (weights loaded) torchvision's fine-tuning layout for its table ``entry``
    (:class:`detection.models.ModelEntry`): FrozenBatchNorm2d in the backbone where torchvision
    uses it, and only the last ``trainable`` backbone stages trainable (None: torchvision's
    default for the model)."""
    maximum, default = entry.trainable_layers
    layers = default if trainable is None else trainable
    if not 0 <= layers <= maximum:  # orch config checks it too; this is for direct callers
        raise ConfigError(f"model.trainable_backbone_layers must be in 0..{maximum} for {model_type}, got {layers}")
    replaced = 0
    if entry.frozen_bn:
        replaced = freeze_batchnorm(model.backbone.body)
    stages = backbone_stages(model, entry.backbone_kind)
    assert len(stages) == maximum, (model_type, len(stages), maximum)
    frozen = freeze_stages(stages, layers)
    log.info("fine-tuning %s as torchvision does with pretrained weights: %s, %s (model.trainable_backbone_layers=%d)",
             model_type, f"{replaced} BatchNorm2d -> FrozenBatchNorm2d" if replaced else "norm layers kept",
             _frozen_text(frozen, maximum), layers)


def _frozen_text(frozen: int, stages: int) -> str:
    if frozen == 0:
        return f"all {stages} backbone stages train"
    return f"backbone stage{' 1' if frozen == 1 else f's 1-{frozen}'} of {stages} frozen"
