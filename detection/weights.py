"""Pretrained weights by name: torchvision's weights names, one cache, a download with a hash check.

``model.weights`` and ``model.backbone_weights`` take a local file or a torchvision weights name:
a member such as ``COCO_V1``, ``IMAGENET1K_V2`` or ``DEFAULT``, or the full enum name
(``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``). A name is looked up in the weights enum of the
model type (for ``fasterrcnn`` + ``backbone: resnet18|34|50``, the ResNet enum of that backbone).

Names resolve to ONE cache folder, chosen and filled on the submitting machine
(:mod:`orchestrator.downloads`: ``$ORCH_WEIGHTS_DIR`` if set, shared storage on a cluster, else
torch's hub cache ``$TORCH_HOME/hub/checkpoints``) and handed to the job as ``model.weights_dir``;
jobs only read the cache (:func:`cached_file`) and never download, so offline compute nodes work.

:data:`ENUMS` is torchvision's table (member names, defaults, file names) written out, so that
``orch config`` and ``orch submit`` need no torch import (3-6 s); a test compares it with the
installed torchvision. The file names carry the first hex digits of the file's sha256, checked on
download as ``torch.hub.load_state_dict_from_url(check_hash=True)`` does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from cluster.errors import ConfigError

TORCHVISION_URL = "https://download.pytorch.org/models"
WEIGHT_KEYS = ("model.weights", "model.backbone_weights")


@dataclass(frozen=True)
class WeightsEnum:
    """One torchvision weights enum: its members' file names (under :data:`TORCHVISION_URL`)
    and the member ``DEFAULT`` stands for."""

    default: str
    files: Mapping[str, str]


ENUMS: dict[str, WeightsEnum] = {
    "FasterRCNN_ResNet50_FPN_Weights": WeightsEnum("COCO_V1", {"COCO_V1": "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"}),
    "FasterRCNN_ResNet50_FPN_V2_Weights": WeightsEnum(
        "COCO_V1", {"COCO_V1": "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth"}),
    "FasterRCNN_MobileNet_V3_Large_FPN_Weights": WeightsEnum(
        "COCO_V1", {"COCO_V1": "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth"}),
    "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights": WeightsEnum(
        "COCO_V1", {"COCO_V1": "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"}),
    "RetinaNet_ResNet50_FPN_Weights": WeightsEnum("COCO_V1", {"COCO_V1": "retinanet_resnet50_fpn_coco-eeacb38b.pth"}),
    "RetinaNet_ResNet50_FPN_V2_Weights": WeightsEnum(
        "COCO_V1", {"COCO_V1": "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth"}),
    "FCOS_ResNet50_FPN_Weights": WeightsEnum("COCO_V1", {"COCO_V1": "fcos_resnet50_fpn_coco-99b0c9b7.pth"}),
    "SSD300_VGG16_Weights": WeightsEnum("COCO_V1", {"COCO_V1": "ssd300_vgg16_coco-b556d3b4.pth"}),
    "SSDLite320_MobileNet_V3_Large_Weights": WeightsEnum(
        "COCO_V1", {"COCO_V1": "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"}),
    "MaskRCNN_ResNet50_FPN_Weights": WeightsEnum("COCO_V1", {"COCO_V1": "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"}),
    "ResNet18_Weights": WeightsEnum("IMAGENET1K_V1", {"IMAGENET1K_V1": "resnet18-f37072fd.pth"}),
    "ResNet34_Weights": WeightsEnum("IMAGENET1K_V1", {"IMAGENET1K_V1": "resnet34-b627a593.pth"}),
    "ResNet50_Weights": WeightsEnum("IMAGENET1K_V2", {"IMAGENET1K_V1": "resnet50-0676ba61.pth",
                                                      "IMAGENET1K_V2": "resnet50-11ad3fa6.pth"}),
    "MobileNet_V3_Large_Weights": WeightsEnum("IMAGENET1K_V2", {"IMAGENET1K_V1": "mobilenet_v3_large-8738ca79.pth",
                                                                "IMAGENET1K_V2": "mobilenet_v3_large-5c1a4163.pth"}),
    "VGG16_Weights": WeightsEnum("IMAGENET1K_V1", {"IMAGENET1K_V1": "vgg16-397923af.pth",
                                                   "IMAGENET1K_FEATURES": "vgg16_features-amdegroot-88682ab5.pth"}),
}

# model.type -> the enum of its whole-detector weights (only where torchvision has them).
DETECTOR_ENUMS: dict[str, str] = {
    "fasterrcnn_resnet50_fpn": "FasterRCNN_ResNet50_FPN_Weights",
    "fasterrcnn_resnet50_fpn_v2": "FasterRCNN_ResNet50_FPN_V2_Weights",
    "fasterrcnn_mobilenet_v3_large_fpn": "FasterRCNN_MobileNet_V3_Large_FPN_Weights",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights",
    "retinanet_resnet50_fpn": "RetinaNet_ResNet50_FPN_Weights",
    "retinanet_resnet50_fpn_v2": "RetinaNet_ResNet50_FPN_V2_Weights",
    "fcos_resnet50_fpn": "FCOS_ResNet50_FPN_Weights",
    "ssd300_vgg16": "SSD300_VGG16_Weights",
    "ssdlite320_mobilenet_v3_large": "SSDLite320_MobileNet_V3_Large_Weights",
    "maskrcnn_resnet50_fpn": "MaskRCNN_ResNet50_FPN_Weights",
}
# model.type -> the enum of its backbone's ImageNet weights (torchvision's weights_backbone);
# fasterrcnn picks it by model.backbone. Not ssdlite320_mobilenet_v3_large: built without backbone
# weights (as orch builds every model), torchvision gives it a MobileNet with a reduced tail, which
# the ImageNet files do not fit (its COCO_V1 weights do: torchvision trained it that way).
BACKBONE_ENUMS: dict[str, str] = {
    "fasterrcnn_resnet50_fpn": "ResNet50_Weights",
    "fasterrcnn_resnet50_fpn_v2": "ResNet50_Weights",
    "fasterrcnn_mobilenet_v3_large_fpn": "MobileNet_V3_Large_Weights",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "MobileNet_V3_Large_Weights",
    "retinanet_resnet50_fpn": "ResNet50_Weights",
    "retinanet_resnet50_fpn_v2": "ResNet50_Weights",
    "fcos_resnet50_fpn": "ResNet50_Weights",
    "ssd300_vgg16": "VGG16_Weights",
    "maskrcnn_resnet50_fpn": "ResNet50_Weights",
}
RESNET_ENUMS: dict[str, str] = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights",
                                "resnet50": "ResNet50_Weights"}

_MEMBER = re.compile(r"^[A-Z][A-Z0-9_]*$")
_FULL = re.compile(r"^([A-Za-z][A-Za-z0-9_]*_Weights)\.([A-Z][A-Z0-9_]*)$")
_HASH = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's rule: the hex digits after a '-' in the file name


@dataclass(frozen=True)
class WeightsFile:
    """One downloadable weights file: its full name (``ResNet50_Weights.IMAGENET1K_V2``) and URL.
    The URL's file name carries the sha256 prefix the download is checked against."""

    name: str
    url: str

    @property
    def file_name(self) -> str:
        """The file's name in the cache (the URL's last part, as torch.hub names it)."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> Optional[str]:
        """The leading hex digits of the file's sha256 given in its name, or None."""
        match = _HASH.search(self.file_name)
        return match.group(1) if match else None


def is_weights_name(value: object) -> bool:
    """Whether ``value`` is a torchvision weights name (``DEFAULT``, ``COCO_V1``,
    ``ResNet50_Weights.IMAGENET1K_V2``) rather than a file. A file that exists here wins: a local
    file named ``DEFAULT`` is still a file."""
    if not isinstance(value, str) or not (_MEMBER.match(value) or _FULL.match(value)):
        return False
    return not os.path.exists(value)


def enum_for(model_type: str, backbone: Optional[str], key: str) -> Optional[str]:
    """The enum whose names ``key`` (``model.weights`` / ``model.backbone_weights``) takes for this
    model; None when torchvision has none (or ``fasterrcnn`` has no valid backbone yet)."""
    if key == "model.weights":
        return DETECTOR_ENUMS.get(model_type)
    if model_type == "fasterrcnn":
        return RESNET_ENUMS.get(backbone or "")
    return BACKBONE_ENUMS.get(model_type)


def _valid_text(enum: str) -> str:
    row = ENUMS[enum]
    return (f"valid: DEFAULT (= {row.default}), {', '.join(row.files)}, or {enum}.<name>; "
            "or a local file")


def _resolve(model_type: str, backbone: Optional[str], key: str, name: str) -> WeightsFile | str:
    """The file ``name`` stands for under ``key`` of this model, or why there is none."""
    enum = enum_for(model_type, backbone, key)
    if enum is None:
        if key == "model.weights":
            return (f"torchvision has no detector weights for model.type {model_type} (names exist for: "
                    f"{', '.join(DETECTOR_ENUMS)}); use one of those types, model.backbone_weights, or a local file")
        if model_type == "fasterrcnn":
            return (f"{name!r} needs model.backbone (one of {', '.join(RESNET_ENUMS)}) for model.type fasterrcnn; "
                    "set model.backbone or give a local file")
        return (f"torchvision has no backbone weights that fit model.type {model_type} (names exist for: "
                f"{', '.join(BACKBONE_ENUMS)}, fasterrcnn); use model.weights or a local file")
    full = _FULL.match(name)
    given_enum, member = (full.group(1), full.group(2)) if full else (enum, name)
    row = ENUMS[enum]
    member = row.default if member == "DEFAULT" else member
    if given_enum != enum or member not in row.files:
        what = f"model.type {model_type}" + (f" with backbone {backbone}" if model_type == "fasterrcnn" else "")
        return f"{name!r} is not a weights name of {what} ({enum}); {_valid_text(enum)}"
    return WeightsFile(f"{enum}.{member}", f"{TORCHVISION_URL}/{row.files[member]}")


def lookup(model_type: str, backbone: Optional[str], key: str, name: str) -> WeightsFile:
    """The file a weights ``name`` stands for under ``key`` (``model.weights`` /
    ``model.backbone_weights``) of this model; a one-line :class:`ConfigError` listing the valid
    names otherwise."""
    found = _resolve(model_type, backbone, key, name)
    if isinstance(found, str):
        raise ConfigError(f"{key}: {found}")
    return found


def name_problem(model_type: str, backbone: Optional[str], key: str, name: str) -> Optional[str]:
    """Config-time check of a weights name: why it is not valid for this model, or None. With
    ``fasterrcnn`` and no backbone yet (a grid or sweep may set it), a name valid for any of its
    ResNet backbones passes."""
    if key == "model.backbone_weights" and model_type == "fasterrcnn" and backbone is None:
        if any(isinstance(_resolve(model_type, b, key, name), WeightsFile) for b in RESNET_ENUMS):
            return None
    found = _resolve(model_type, backbone, key, name)
    return found if isinstance(found, str) else None


def default_cache_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    """torch's hub cache, ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub``, else
    ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``), found without importing torch."""
    env = os.environ if environ is None else environ
    torch_home = env.get("TORCH_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "torch")
    return Path(os.path.abspath(os.path.expanduser(torch_home))) / "hub" / "checkpoints"


def cached_file(entry: WeightsFile, key: str, folder: Optional[str] = None) -> str:
    """The path of ``entry`` in the weights cache ``folder`` (``model.weights_dir``, which orch
    submit sets; default torch's hub cache), for training: never downloads; a one-line
    :class:`ConfigError` saying how to fill the cache when the file is not there."""
    cache = Path(folder) if folder else default_cache_dir()
    path = cache / entry.file_name
    if not path.is_file():
        raise ConfigError(
            f"{key}: weights {entry.name} are not in the cache {cache} ({entry.file_name}); run "
            "`orch weights fetch exp.yaml` on a machine with network or copy the file there "
            "(the cache is $ORCH_WEIGHTS_DIR, else $TORCH_HOME/hub/checkpoints)")
    return str(path)
