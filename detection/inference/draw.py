"""Detections drawn onto images: masks (Mask R-CNN), boxes, and ``<class> <score>`` labels, one
colour per class, with torchvision's ``draw_segmentation_masks`` / ``draw_bounding_boxes``.

Class names are drawn in a font that covers CJK as well as Latin (:func:`label_font`): the first
of :data:`CJK_FONTS` on this machine (Debian's ``fonts-wqy-zenhei`` or ``fonts-noto-cjk``, macOS's
and Windows' own), else what fontconfig's ``fc-list :lang=zh`` finds; without one, Pillow's
built-in font, which draws non-Latin names as empty boxes (one warning says so).
"""

from __future__ import annotations

import colorsys
import functools
import inspect
import logging
import os
import shutil
import subprocess
from typing import Any, Optional, Sequence

import torch
from torchvision.io import encode_jpeg, encode_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

log = logging.getLogger(__name__)

#: Fonts with CJK glyphs, looked for in this order (Debian/Ubuntu packages, macOS, Windows).
CJK_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",  # Debian fonts-wqy-zenhei
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",  # Debian fonts-noto-cjk
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",  # Fedora, Arch
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",  # Debian fonts-wqy-microhei
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",  # Debian fonts-droid-fallback
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)

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
    extra.update(label_font_options(texts, size=6 * width))
    return draw_bounding_boxes(image, output["boxes"][keep], labels=texts, colors=colors, width=width, **extra)


@functools.lru_cache(maxsize=None)
def label_font() -> Optional[str]:
    """Path of a font that draws CJK class names (see the module docstring), or None."""
    for path in CJK_FONTS:
        if os.path.isfile(path):
            return path
    if shutil.which("fc-list"):
        try:
            found = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            found = ""
        files = sorted(line.split(":")[0].strip() for line in found.splitlines() if line.strip())
        if files:
            return files[0]
    return None


def label_font_options(names: Sequence[str], size: int) -> dict[str, Any]:
    """``font``/``font_size`` arguments of ``draw_bounding_boxes`` for labels ``names``; empty
    (Pillow's built-in font) when no CJK font exists, with one warning if a name needs one."""
    font = label_font()
    if font is not None:
        return {"font": font, "font_size": size}
    if any(not name.isascii() for name in names):
        _warn_no_font()
    return {}


@functools.lru_cache(maxsize=None)
def _warn_no_font() -> None:
    log.warning("no font with CJK glyphs found (looked for %s and fc-list :lang=zh); non-Latin class names "
                "are drawn as empty boxes: install fonts-wqy-zenhei or fonts-noto-cjk", ", ".join(CJK_FONTS[:2]))


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"


def encode_image(image: torch.Tensor, name: str) -> bytes:
    """``image`` (``uint8 [3, H, W]``) as JPEG (quality 95) when ``name`` ends in .jpg/.jpeg,
    else as PNG."""
    if name.lower().endswith((".jpg", ".jpeg")):
        return encode_jpeg(image, quality=95).numpy().tobytes()
    return encode_png(image).numpy().tobytes()
