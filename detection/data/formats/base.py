"""What every annotation reader returns, and the small file helpers they share.

A reader turns one source format into :class:`Sample` records (one per image) holding
:class:`Shape` objects in COCO's continuous, 0-based pixel coordinates: ``x, y`` is the top-left
corner of the box and ``(x + w, y + h)`` its bottom-right corner, so a box covering the whole
``W x H`` image is ``(0, 0, W, H)``. Each reader says in a comment how its format maps onto
that. Standard library + Pillow only (the ``orch`` CLI imports this).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cluster.errors import DataError
from detection.data.orientation import ImageHeader, read_header

#: Suffixes of the image files the YOLO reader looks for (what Pillow reads and detectors use).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Shape:
    """One object: ``box`` is ``(x, y, w, h)``; ``polygons`` are flat ``[x1, y1, x2, y2, ...]``
    lists (empty for box-only objects); ``rle`` a COCO RLE mask of the whole image (``size``,
    ``counts``; LabelMe's mask shapes) with its pixel count ``rle_area``; ``crowd`` marks an
    ignore region (COCO ``iscrowd: 1``) and ``everything`` one that ignores every category
    (LabelMe's ``__ignore__``: written once per category). ``where`` names the file (and line)
    it came from, for error messages."""

    label: str
    box: tuple[float, float, float, float]
    where: str
    crowd: bool = False
    polygons: tuple[tuple[float, ...], ...] = ()
    rle: Optional[dict[str, Any]] = None
    rle_area: float = 0.0
    everything: bool = False


@dataclass(frozen=True)
class Sample:
    """One image: ``file_name`` relative to the image folder, its size, its objects."""

    file_name: str
    width: int
    height: int
    shapes: tuple[Shape, ...]


@dataclass
class Source:
    """What a reader found: the samples, the folder their ``file_name`` is relative to, the
    class list the source itself declares (YOLO's ``data.yaml``; else ``None``), what it
    skipped, counted by reason, and what else it did or assumed (``notes``), counted."""

    samples: list[Sample]
    img_dir: Path
    classes: Optional[list[str]] = None
    classes_origin: str = ""
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)


def require_dir(path: Path, what: str, hint: str) -> Path:
    """``path`` if it is a folder, else a one-line :class:`DataError`."""
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a folder; {hint}")
    return path


def image_size(path: Path, where: str, exif: bool = True) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (Pillow opens lazily: no decode),
    upright by its EXIF orientation with ``exif`` (see :mod:`detection.data.orientation`)."""
    return image_header(path, where).size(exif)


def image_header(path: Path, where: str) -> ImageHeader:
    """The stored size and EXIF orientation of an image file; a one-line DataError when it is
    missing or not an image."""
    from PIL import UnidentifiedImageError

    try:
        return read_header(path)
    except FileNotFoundError:
        raise DataError(f"{where}: image {path} does not exist; check --img-dir") from None
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{where}: cannot read the size of image {path} ({err}); replace or remove it") from None


def read_json_file(path: Path) -> Any:
    """The parsed JSON in ``path``; unreadable or broken JSON is a one-line DataError."""
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: Windows tools write a BOM
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: broken JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the file ({err})") from None


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a BOM, as Windows tools write, is dropped); unreadable is
    a one-line DataError."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the file ({err})") from None


def read_class_file(path: Path) -> list[str]:
    """Class names, one a line (blank lines ignored); duplicates or none are a DataError."""
    names = [line.strip() for line in read_lines(path) if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names; write one class name a line")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{path}: class {name!r} is listed twice; each class once, one a line")
        seen.add(name)
    return names


def posix_relpath(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` with ``/`` separators (COCO ``file_name``)."""
    import os

    return Path(os.path.relpath(path, start)).as_posix()


def box_of_points(xs: list[float], ys: list[float]) -> tuple[float, float, float, float]:
    """The ``(x, y, w, h)`` box around points."""
    x0, y0 = min(xs), min(ys)
    return (x0, y0, max(xs) - x0, max(ys) - y0)
