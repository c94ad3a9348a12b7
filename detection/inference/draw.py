"""Detections drawn onto images: masks (Mask R-CNN), boxes, and ``<class> <score>`` labels, one
colour per class, with torchvision's ``draw_segmentation_masks`` / ``draw_bounding_boxes``."""

from __future__ import annotations

import colorsys
import functools
import inspect
from typing import Any, Sequence

import torch
from torchvision.io import encode_jpeg, encode_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

MASK_THRESHOLD = 0.5  # mask probability that counts as the object (as in the COCO results)
MASK_ALPHA = 0.45


@functools.lru_cache(maxsize=None)
def class_color(label: int) -> tuple[int, int, int]:
    """A bright RGB colour for class ``label`` (1..K): hues a golden-ratio step apart, so
    neighbouring labels differ and any number of classes gets colours."""
    red, green, blue = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return round(red * 255), round(green * 255), round(blue * 255)


@functools.lru_cache(maxsize=None)
def _label_fill_supported() -> bool:
    # ``fill_labels`` (text on a box-coloured background) arrived in torchvision 0.21.
    return "fill_labels" in inspect.signature(draw_bounding_boxes).parameters


def draw_detections(image: torch.Tensor, output: dict[str, Any], class_names: Sequence[str],
                    score_thr: float) -> torch.Tensor:
    """``image`` (``uint8 [3, H, W]``) with the detections of ``output`` (a torchvision detector's
    output on CPU: ``boxes`` xyxy, ``labels`` 1..K, ``scores``[, ``masks``]) whose score is at
    least ``score_thr``; a new tensor."""
    keep = output["scores"] >= score_thr
    if not bool(keep.any()):
        return image
    labels = output["labels"][keep].tolist()
    colors = [class_color(label) for label in labels]
    if "masks" in output:
        masks = output["masks"][keep]
        masks = masks[:, 0] if masks.dim() == 4 else masks
        image = draw_segmentation_masks(image, masks > MASK_THRESHOLD, alpha=MASK_ALPHA, colors=colors)
    texts = [f"{_name(class_names, label)} {score:.2f}" for label, score in zip(labels, output["scores"][keep].tolist())]
    width = max(2, round(max(image.shape[-2:]) / 320))  # 2 px lines up to 800 px, 6 at 1920
    extra = {"fill_labels": True, "label_colors": "black"} if _label_fill_supported() else {}
    return draw_bounding_boxes(image, output["boxes"][keep], labels=texts, colors=colors, width=width, **extra)


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"


def encode_image(image: torch.Tensor, name: str) -> bytes:
    """``image`` (``uint8 [3, H, W]``) as JPEG (quality 95) when ``name`` ends in .jpg/.jpeg,
    else as PNG."""
    if name.lower().endswith((".jpg", ".jpeg")):
        return encode_jpeg(image, quality=95).numpy().tobytes()
    return encode_png(image).numpy().tobytes()
