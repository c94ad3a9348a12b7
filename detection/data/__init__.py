"""COCO-format detection data: dataset, transforms, samplers and loaders.

``build_dataset`` and ``build_loader`` (:mod:`detection.data.loader`) are what the trainer uses;
the pieces are public for tests and tools.

The names below are imported on first use, so that the torch-free
:mod:`detection.data.pipeline_spec` (read by ``orch config``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CocoDetection": "detection.data.coco",
    "Compose": "detection.data.transforms",
    "DetectionLoader": "detection.data.loader",
    "GroupedBatchSampler": "detection.data.samplers",
    "Pipeline": "detection.data.pipelines",
    "RandomHorizontalFlip": "detection.data.transforms",
    "Resize": "detection.data.transforms",
    "SampleKey": "detection.data.samplers",
    "ShardSampler": "detection.data.samplers",
    "ToTensor": "detection.data.transforms",
    "aspect_ratio_groups": "detection.data.samplers",
    "build_dataset": "detection.data.loader",
    "build_loader": "detection.data.loader",
    "build_pipeline": "detection.data.pipelines",
    "build_transforms": "detection.data.transforms",
    "collate": "detection.data.loader",
    "read_image": "detection.data.decode",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'detection.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
