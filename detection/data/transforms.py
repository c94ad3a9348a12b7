"""Detection transforms that keep the image, boxes and masks consistent.

Every transform is called as ``transform(image, target, generator=None)`` and returns
``(image, target)``. Random choices draw from ``generator`` (a ``torch.Generator``) when one is
given: the samplers hand each sample its own seed, so an augmentation depends only on
``(seed, epoch, index)``, not on the DataLoader worker that ran it or on where a run resumed.

These make the default pipeline (no ``data.train_pipeline``): resize to ``data.min_size`` /
``data.max_size`` and flip with ``data.flip_prob``, with exactly the values orch always gave.
Images arrive as decoded ``uint8`` tensors; :class:`Resize` makes them ``float`` before it
interpolates (as before: resizing ``uint8`` is ~3x faster but rounds every pixel to 1/255, and
the shapes demo then ended 0.02 mAP lower on both seeds tried), while an image that needs no
resize stays ``uint8``, flips as ``uint8`` (bit-identical), and becomes ``float`` at the very end
(:func:`image_to_float`): in the dataset, or in the training process after the loader's workers
handed it over as ``uint8``. ``data.train_pipeline`` pipelines are in
:mod:`detection.data.pipelines`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import pil_to_tensor

Target = dict[str, torch.Tensor]


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target, generator: Optional[torch.Generator] = None) -> tuple[Any, Target]:
        for transform in self.transforms:
            image, target = transform(image, target, generator)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.transforms))})"


def image_to_float(image: torch.Tensor) -> torch.Tensor:
    """A ``uint8`` image as contiguous float32 in 0..1 (``x / 255``); a float image as it is, made
    contiguous. Contiguous always: a flip or crop leaves strided views, and the same values in
    another layout sum in another order, so batches from workers (copied contiguous) and from
    this process would differ in the last bit."""
    image = image.contiguous()
    return image if image.is_floating_point() else image.float().div_(255.0)


class ToTensor:
    """PIL image or ``uint8`` tensor -> float tensor ``[3, H, W]`` in 0..1 (float tensors pass)."""

    def __call__(self, image: Any, target: Target, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, Target]:
        return image_to_float(_as_tensor(image)), target

    def __repr__(self) -> str:
        return "ToTensor()"


class Resize:
    """Scale so the shorter side is ``min_size``, unless the longer side would then exceed
    ``max_size`` (then the longer side is ``max_size``), like torchvision's detection transform.

    Boxes and areas are scaled with the image; masks are resized with nearest neighbour so they
    stay binary. Interpolates in ``float``: a ``uint8`` (or PIL) image that needs resizing is made
    float in 0..1 first; one that does not is returned unchanged.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        if min_size <= 0 or max_size < min_size:
            raise ValueError(f"Resize: need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(height, width)`` an image of this size is resized to."""
        scale = min(self.min_size / min(height, width), self.max_size / max(height, width))
        return max(1, round(height * scale)), max(1, round(width * scale))

    def __call__(self, image: Any, target: Target, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, Target]:
        image = _as_tensor(image)
        height, width = image.shape[-2:]
        new_h, new_w = self.output_size(height, width)
        if (new_h, new_w) == (height, width):
            return image, target
        image = image_to_float(image)
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
        sx, sy = new_w / width, new_h / height
        target = dict(target)
        if "boxes" in target:
            target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
        if "area" in target:
            target["area"] = target["area"] * (sx * sy)
        if "masks" in target:
            masks = target["masks"]
            if masks.shape[0]:
                masks = F.interpolate(masks[:, None].float(), size=(new_h, new_w), mode="nearest")[:, 0]
                target["masks"] = masks.to(target["masks"].dtype)
            else:
                target["masks"] = masks.new_zeros((0, new_h, new_w))
        return image, target

    def __repr__(self) -> str:
        return f"Resize(min_size={self.min_size}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror the image, boxes and masks left-right with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: prob must be in [0, 1], got {prob}")
        self.prob = prob

    def __call__(self, image: torch.Tensor, target: Target, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, Target]:
        # Always draw, even for prob 0 or 1, so later transforms see the same random stream.
        if torch.rand((), generator=generator).item() >= self.prob:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        if "boxes" in target:
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(prob={self.prob})"


def build_transforms(data_cfg: Any, train: bool, resize_eval: bool = False) -> Any:
    """The transforms of a split, on ``uint8`` images: ``data.train_pipeline`` for training when
    it is set (see :func:`detection.data.pipelines.build_pipeline`), else the standard pipeline:
    resize by ``data.min_size``/``data.max_size`` and (in training) flip with ``data.flip_prob``.

    Evaluation images are not resized unless ``resize_eval``: torchvision detectors resize
    internally and map their predictions back to the size of the image they were given, so
    predictions come out in the original image coordinates the COCO ground truth uses.
    """
    pipeline = getattr(data_cfg, "train_pipeline", None)
    if train and pipeline is not None:
        from detection.data.pipelines import build_pipeline

        return build_pipeline(pipeline, data_cfg.flip_prob, data_cfg.keep_empty)
    steps: list[Any] = []
    if train or resize_eval:
        steps.append(Resize(data_cfg.min_size, data_cfg.max_size))
    if train and data_cfg.flip_prob > 0:
        steps.append(RandomHorizontalFlip(data_cfg.flip_prob))
    return Compose(steps)


def _as_tensor(image: Any) -> torch.Tensor:
    return image if isinstance(image, torch.Tensor) else pil_to_tensor(image)
