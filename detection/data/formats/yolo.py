"""YOLO (Darknet / Ultralytics) text labels -> :class:`~detection.data.formats.base.Sample` records.

Layout: ``images/**/name.jpg`` with ``labels/**/name.txt`` beside (Ultralytics replaces the last
``images`` folder of a path by ``labels``); an image without a label file has no objects. Each
line is ``class cx cy w h`` with the class an index into the class list and the box centre and
size normalised by the image width and height (0..1); a line of ``class x1 y1 x2 y2 ...`` (three
or more points) is a YOLO segmentation polygon. Class names come from ``--classes FILE`` or a
``data.yaml`` (``names:`` list or ``{index: name}`` mapping) / ``classes.txt`` next to the labels.

Coordinates: YOLO's normalised values are continuous, so ``x = (cx - w / 2) * W`` and
``w = w * W`` are already COCO's 0-based xywh (no half-pixel shift). Image sizes are read from
the image headers (Pillow does not decode the pixels) and are the upright sizes (EXIF
orientation applied): Ultralytics and Roboflow label the upright picture, and orch reads it so
(``exif=False``, ``data.exif: ignore``, keeps the stored frame).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Optional

from cluster.errors import DataError
from detection.data.formats.base import (
    IMAGE_SUFFIXES,
    Sample,
    Shape,
    Source,
    box_of_points,
    image_header,
    posix_relpath,
    read_class_file,
    read_lines,
    require_dir,
)

#: Normalised coordinates may overshoot 0..1 by this much (float round-off of exporters).
TOLERANCE = 1e-3


def read_yolo(src: Path, img_dir: Optional[Path] = None, classes: Optional[list[str]] = None,
              exif: bool = True) -> Source:
    """Read ``src`` (a folder holding ``images/`` and ``labels/``, or a labels folder whose
    images are in ``img_dir`` or the matching ``images`` folder). ``classes`` (from
    ``--classes``) names the class indices; else they are looked up next to the labels."""
    src = require_dir(Path(src), "YOLO folder", "give the folder holding images/ and labels/")
    labels_dir = src / "labels" if (src / "labels").is_dir() else src
    if img_dir is None:
        img_dir = src / "images" if (src / "images").is_dir() else _images_beside(labels_dir)
    img_dir = require_dir(Path(img_dir), "image folder", "give the images with --img-dir")
    origin = "--classes"
    if classes is None:
        classes, origin = _find_classes(labels_dir)
    images = sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {img_dir}; give the image folder with --img-dir")
    skipped: Counter = Counter()
    notes: Counter = Counter()
    samples, used = [], set()
    for image in images:
        rel = image.relative_to(img_dir)
        label_file = labels_dir / rel.with_suffix(".txt")
        used.add(label_file)
        header = image_header(image, str(label_file))
        width, height = header.size(exif)
        if header.orientation != 1 and exif:
            notes["YOLO images with an EXIF orientation (labels taken as drawn on the upright picture)"] += 1
        shapes = _read_labels(label_file, width, height, classes) if label_file.is_file() else ()
        samples.append(Sample(posix_relpath(image, img_dir), width, height, tuple(shapes)))
    orphans = [p for p in labels_dir.rglob("*.txt") if p not in used and p.name != "classes.txt"]
    if orphans:
        skipped["label files without an image"] = len(orphans)
    return Source(samples=samples, img_dir=img_dir, classes=classes, classes_origin=origin, skipped=skipped,
                  notes=notes)


def _images_beside(labels_dir: Path) -> Path:
    """``.../labels/train`` -> ``.../images/train`` (the Ultralytics rule), else ``../images``."""
    parts = list(labels_dir.resolve().parts)
    if "labels" in parts:
        index = len(parts) - 1 - parts[::-1].index("labels")
        parts[index] = "images"
        return Path(*parts)
    return labels_dir.parent / "images"


def _find_classes(labels_dir: Path) -> tuple[list[str], str]:
    """Class names from ``data.yaml``/``dataset.yaml``/``classes.txt`` in the labels folder or
    up to two folders above it (``labels/train`` -> the dataset root)."""
    folders = [labels_dir, labels_dir.parent, labels_dir.parent.parent]
    for folder in folders:
        for name in ("data.yaml", "dataset.yaml"):
            if (folder / name).is_file():
                return _yaml_names(folder / name), str(folder / name)
        if (folder / "classes.txt").is_file():
            return read_class_file(folder / "classes.txt"), str(folder / "classes.txt")
    raise DataError(f"YOLO labels in {labels_dir} number their classes, but no data.yaml or classes.txt names them "
                    "(looked in it and two folders up); pass --classes FILE with one class name a line")


def _yaml_names(path: Path) -> list[str]:
    """The ``names`` of an Ultralytics dataset YAML: a list, or a mapping ``index: name``."""
    import yaml  # a dependency of orch already; imported here because only YOLO needs it

    try:
        data = yaml.safe_load("\n".join(read_lines(path)))
    except yaml.YAMLError as err:
        raise DataError(f"{path}: broken YAML ({str(err).splitlines()[0]}); fix it or pass --classes FILE") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict) and all(isinstance(k, int) for k in names):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{path}: 'names' indices {sorted(names)} are not 0..{len(names) - 1}; number them without gaps")
        names = [names[i] for i in range(len(names))]
    if not (isinstance(names, list) and names):
        raise DataError(f"{path}: no 'names' list (or index: name mapping) of classes; add one or pass --classes FILE")
    return [str(name) for name in names]


def _read_labels(path: Path, width: int, height: int, classes: list[str]) -> list[Shape]:
    shapes = []
    for number, line in enumerate(read_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path} line {number}"
        try:
            values = [float(v) for v in fields[1:]]
            index = int(fields[0])
        except ValueError:
            raise DataError(f"{where}: {line.strip()!r} is not 'class cx cy w h' (an integer and 4 numbers)") from None
        if len(values) != 4 and (len(values) < 6 or len(values) % 2):
            raise DataError(f"{where}: {len(fields)} numbers; a YOLO line is 'class cx cy w h' "
                            "(5 numbers) or 'class x1 y1 x2 y2 x3 y3 ...' (a polygon of 3 or more points)")
        if not all(math.isfinite(v) and -TOLERANCE <= v <= 1 + TOLERANCE for v in values):
            raise DataError(f"{where}: coordinates must be normalised to 0..1 by the image size, got "
                            f"{' '.join(fields[1:])}; convert pixel coordinates first")
        label = classes[index] if 0 <= index < len(classes) else str(index)
        if len(values) == 4:
            cx, cy, w, h = values
            box = ((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height)
            shapes.append(Shape(label=label, box=box, where=where))
        else:
            xs, ys = [v * width for v in values[0::2]], [v * height for v in values[1::2]]
            polygon = tuple(v for xy in zip(xs, ys) for v in xy)
            shapes.append(Shape(label=label, box=box_of_points(xs, ys), where=where, polygons=(polygon,)))
    return shapes
