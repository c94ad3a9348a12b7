"""COCO-format detection data: dataset, transforms, samplers and loaders.

``build_dataset`` and ``build_loader`` (:mod:`detection.data.loader`) are what the trainer uses;
the pieces are public for tests and tools.

The names below are loaded on first use (PEP 562), so the torch-free tools of this package
(:mod:`detection.data.convert`, :mod:`detection.data.check`, used by ``orch data``, and
:mod:`detection.data.pipeline_spec`, read by ``orch config``) can be imported without importing
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_LAZY = {
    "CocoDetection": "coco",
    "DetectionLoader": "loader",
    "build_dataset": "loader",
    "build_loader": "loader",
    "collate": "loader",
    "GroupedBatchSampler": "samplers",
    "SampleKey": "samplers",
    "ShardSampler": "samplers",
    "aspect_ratio_groups": "samplers",
    "Compose": "transforms",
    "RandomHorizontalFlip": "transforms",
    "Resize": "transforms",
    "ToTensor": "transforms",
    "build_transforms": "transforms",
    "Pipeline": "pipelines",
    "build_pipeline": "pipelines",
    "read_image": "decode",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = sorted(_LAZY)
