"""COCO-format detection data: dataset, transforms, samplers and loaders.

``build_dataset`` and ``build_loader`` (:mod:`detection.data.loader`) are what the trainer uses;
the pieces are public for tests and tools.
"""

from detection.data.coco import CocoDetection
from detection.data.loader import DetectionLoader, build_dataset, build_loader, collate
from detection.data.samplers import GroupedBatchSampler, SampleKey, ShardSampler, aspect_ratio_groups
from detection.data.transforms import Compose, RandomHorizontalFlip, Resize, ToTensor, build_transforms

__all__ = [
    "CocoDetection",
    "Compose",
    "DetectionLoader",
    "GroupedBatchSampler",
    "RandomHorizontalFlip",
    "Resize",
    "SampleKey",
    "ShardSampler",
    "ToTensor",
    "aspect_ratio_groups",
    "build_dataset",
    "build_loader",
    "build_transforms",
    "collate",
]
