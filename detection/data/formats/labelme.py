"""LabelMe JSON files -> :class:`~detection.data.formats.base.Sample` records.

One JSON file per image: ``imagePath`` (relative to the JSON file), ``imageWidth``,
``imageHeight`` and ``shapes``, each with ``label``, ``points`` (``[[x, y], ...]``),
``shape_type`` and ``group_id``. ``rectangle`` shapes (two opposite corners) become boxes;
``polygon`` shapes become segmentation polygons with their bounding box; other types (circle,
line, point, linestrip, mask, ...) are counted and reported as skipped. Shapes sharing a label
and a ``group_id`` are one object, as in LabelMe's own ``labelme2coco`` example: its box is the
union and its segmentation lists the polygons.

Coordinates: LabelMe points are continuous 0-based pixel coordinates, COCO's own convention,
so they are used as they are.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Optional

from cluster.errors import DataError
from detection.data.formats.base import (
    Sample,
    Shape,
    Source,
    box_of_points,
    image_size,
    posix_relpath,
    read_json_file,
    require_dir,
)


def read_labelme(src: Path, img_dir: Optional[Path] = None) -> Source:
    """Read every ``*.json`` below ``src``; ``file_name`` is the image path relative to
    ``img_dir`` (default ``src``)."""
    src = require_dir(Path(src), "LabelMe folder", "give the folder of LabelMe .json files")
    files = sorted(src.rglob("*.json"))
    if not files:
        raise DataError(f"no .json files in {src}; give the folder LabelMe saved its annotation files in")
    img_dir = Path(img_dir) if img_dir else src
    skipped: Counter = Counter()
    samples = [_read_file(path, img_dir, skipped) for path in files]
    return Source(samples=samples, img_dir=img_dir, skipped=skipped)


def _read_file(path: Path, img_dir: Path, skipped: Counter) -> Sample:
    data = read_json_file(path)
    if not (isinstance(data, dict) and isinstance(data.get("shapes"), list)):
        raise DataError(f"{path}: no 'shapes' list; this is not a LabelMe file (move other JSON files out of the folder)")
    image_path = data.get("imagePath")
    if not isinstance(image_path, str) or not image_path:
        raise DataError(f"{path}: 'imagePath' is missing; LabelMe files name their image")
    image = path.parent / image_path.replace("\\", "/")  # files saved on Windows use backslashes
    width, height = data.get("imageWidth"), data.get("imageHeight")
    if not (_positive_int(width) and _positive_int(height)):
        width, height = image_size(image, f"{path} (no imageWidth/imageHeight)")
    groups: dict[Any, list[Shape]] = {}
    for index, raw in enumerate(data["shapes"], 1):
        shape = _read_shape(raw, f"{path} shape {index}", skipped)
        if shape is not None:
            group = raw.get("group_id")
            key = (shape.label, group) if group is not None else index  # ungrouped: each its own object
            groups.setdefault(key, []).append(shape)
    shapes = tuple(_merge(parts) for parts in groups.values())
    return Sample(posix_relpath(image, img_dir), int(width), int(height), shapes)


def _read_shape(raw: Any, where: str, skipped: Counter) -> Optional[Shape]:
    if not isinstance(raw, dict) or not isinstance(raw.get("label"), str):
        raise DataError(f"{where}: needs a 'label' string and 'points'; this is not a LabelMe shape")
    kind = raw.get("shape_type") or "polygon"  # LabelMe before 3.x wrote polygons without a type
    if kind not in ("rectangle", "polygon"):
        skipped[f"LabelMe {kind} shapes"] += 1
        return None
    points = raw.get("points")
    try:
        xs = [float(p[0]) for p in points]
        ys = [float(p[1]) for p in points]
    except (TypeError, ValueError, IndexError, KeyError):
        raise DataError(f"{where}: 'points' must be a list of [x, y] pairs, got {str(points)[:60]}") from None
    if kind == "rectangle":
        if len(xs) < 2:
            skipped["LabelMe rectangles with fewer than 2 points"] += 1
            return None
        return Shape(label=raw["label"], box=box_of_points(xs, ys), where=where)
    if len(xs) < 3:
        skipped["LabelMe polygons with fewer than 3 points"] += 1
        return None
    polygon = tuple(v for xy in zip(xs, ys) for v in xy)
    return Shape(label=raw["label"], box=box_of_points(xs, ys), where=where, polygons=(polygon,))


def _merge(parts: list[Shape]) -> Shape:
    """One object from the shapes of a group: the union box, all polygons."""
    if len(parts) == 1:
        return parts[0]
    xs = [v for s in parts for v in (s.box[0], s.box[0] + s.box[2])]
    ys = [v for s in parts for v in (s.box[1], s.box[1] + s.box[3])]
    polygons = tuple(p for s in parts for p in s.polygons)
    return Shape(label=parts[0].label, box=box_of_points(xs, ys), where=parts[0].where, polygons=polygons)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
