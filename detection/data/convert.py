"""``orch data convert``: Pascal VOC, YOLO or LabelMe annotations -> one COCO instances file.

The readers of :mod:`detection.data.formats` turn each format into samples in COCO's 0-based
continuous ``xywh`` coordinates (each says how in its docstring); this module fixes the category
list, numbers images (1..N, in file order) and annotations (1..M), and writes the file
atomically, so a failed conversion leaves nothing behind. Standard library + Pillow: the CLI
imports it without torch.

Categories: ``--classes FILE`` (one name a line) fixes their list and order (ids 1..N) and a
label outside it is an error naming the file and label, unless ``skip_unknown``; YOLO's
``data.yaml``/``classes.txt`` plays the same part for YOLO; otherwise the sorted names seen.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cluster.errors import ConfigError, DataError
from cluster.files import write_json_atomic
from detection.data.formats import Source, read_labelme, read_voc, read_yolo
from detection.data.formats.labelme import SPECIAL as LABELME_SPECIAL
from detection.data.formats.base import read_class_file

FORMATS = ("voc", "yolo", "labelme")

#: Decimals kept in ``bbox``/``segmentation`` (0.001 px; YOLO's normalised floats would
#: otherwise fill the file with 17-digit numbers).
DECIMALS = 3


@dataclass(frozen=True)
class ConvertSummary:
    """What a conversion wrote: counts per category ``(id, name, objects, ignore regions)``,
    and what it skipped, by reason."""

    out: str
    img_dir: str
    images: int
    annotations: int
    crowd: int
    categories: tuple[tuple[int, str, int, int], ...]
    skipped: tuple[tuple[str, int], ...]
    notes: tuple[tuple[str, int], ...] = ()

    def text(self) -> str:
        """The summary ``orch data convert`` prints."""
        lines = [
            f"wrote {self.out}: {self.images} images, {self.annotations} annotations "
            f"({self.crowd} ignore regions, iscrowd=1), {len(self.categories)} categories",
            f"file_name is relative to {self.img_dir} (use it as the img_dir of this split)",
        ]
        width = max([len("class")] + [len(name) for _, name, _, _ in self.categories])
        lines.append(f"{'id':>4}  {'class':<{width}}  {'objects':>8}  {'ignore':>6}")
        lines += [f"{i:>4}  {name:<{width}}  {n:>8}  {c:>6}" for i, name, n, c in self.categories]
        if self.skipped:
            lines.append("skipped: " + "; ".join(f"{n} {reason}" for reason, n in self.skipped))
        else:
            lines.append("skipped: nothing")
        if self.notes:
            lines.append("also: " + "; ".join(f"{n} {what}" for what, n in self.notes))
        return "\n".join(lines)


def convert(
    fmt: str,
    src: str | Path,
    out: str | Path,
    classes_file: Optional[str | Path] = None,
    img_dir: Optional[str | Path] = None,
    split: Optional[str] = None,
    skip_unknown: bool = False,
    exif: bool = True,
) -> ConvertSummary:
    """Convert the ``fmt`` annotations in ``src`` into the COCO file ``out`` (see the module
    docstring); ``img_dir`` is the image folder ``file_name`` is made relative to (each reader
    has a default), ``split`` a VOC ``ImageSets/Main`` list. Sizes and boxes are those of the
    upright pictures (EXIF orientation applied), or of the stored frames with ``exif`` false."""
    if fmt not in FORMATS:
        raise ConfigError(f"--from {fmt!r} is not a format orch converts; use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the path of the .json file to write")
    if split and fmt != "voc":
        raise ConfigError(f"--split is for VOC roots (ImageSets/Main/<split>.txt), not --from {fmt}")
    if classes_file and not Path(classes_file).is_file():
        raise ConfigError(f"--classes {classes_file} does not exist; give a text file with one class name a line")
    classes = read_class_file(Path(classes_file)) if classes_file else None
    if classes is not None and fmt == "labelme":
        # LabelMe's labels.txt starts with its special labels, which are no categories.
        classes = [name for name in classes if name not in LABELME_SPECIAL]
        if not classes:
            raise ConfigError(f"--classes {classes_file} lists only {', '.join(LABELME_SPECIAL)}; add the class names")
    img = Path(img_dir) if img_dir else None
    if fmt == "voc":
        source = read_voc(Path(src), img, split, exif)
    elif fmt == "yolo":
        source = read_yolo(Path(src), img, classes, exif)
    else:
        source = read_labelme(Path(src), img, exif)
    if classes is not None:
        origin = f"--classes {classes_file}"
    elif source.classes is not None:
        classes, origin = source.classes, source.classes_origin
    else:
        classes = sorted({shape.label for sample in source.samples for shape in sample.shapes if not shape.everything})
        origin = "the labels found"
        if not classes:
            skipped = "; ".join(f"{n} {reason}" for reason, n in sorted(source.skipped.items()))
            raise DataError(f"{src}: no labelled objects found, so no categories"
                            + (f" (skipped: {skipped})" if skipped else "") + "; pass --classes FILE to name them")
    coco, summary = to_coco(source, classes, origin, skip_unknown)
    summary["notes"] = tuple(sorted(source.notes.items()))
    coco["info"] = {"description": f"converted from {fmt} annotations in {src} by orch data convert"}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, coco, indent=None, sort_keys=False)
    return ConvertSummary(out=str(out), img_dir=str(source.img_dir), **summary)


def to_coco(source: Source, classes: list[str], origin: str, skip_unknown: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The COCO dict of ``source`` with categories ``classes`` (ids 1..N), and the counts for
    :class:`ConvertSummary`. ``origin`` names where the classes came from, for errors."""
    cat_ids = {name: index for index, name in enumerate(classes, 1)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    objects: Counter = Counter()
    crowd: Counter = Counter()
    skipped: Counter = Counter(source.skipped)
    for image_id, sample in enumerate(source.samples, 1):
        images.append({"id": image_id, "file_name": sample.file_name, "width": sample.width, "height": sample.height})
        for shape in sample.shapes:
            if shape.everything:  # an ignore region of every category (COCOeval matches crowds per category)
                categories = list(cat_ids.values())
            elif shape.label in cat_ids:
                categories = [cat_ids[shape.label]]
            else:
                if not skip_unknown:
                    raise DataError(f"{shape.where}: label {shape.label!r} is not in {origin}; "
                                    "add it there or pass --skip-unknown to leave such objects out")
                skipped[f"objects labelled {shape.label!r} (not in {origin})"] += 1
                continue
            box = [round(v, DECIMALS) for v in shape.box]
            if not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
                skipped["zero-size or NaN boxes"] += 1
                continue
            for category in categories:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                    "bbox": box, **_segmentation(shape), "iscrowd": int(shape.crowd)})
                objects[category] += 1
                crowd[category] += shape.crowd
    coco = {
        "info": {},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": ""} for name, i in cat_ids.items()],
    }
    summary = {
        "images": len(images),
        "annotations": len(annotations),
        "crowd": sum(crowd.values()),
        "categories": tuple((i, name, objects[i], crowd[i]) for name, i in cat_ids.items()),
        "skipped": tuple(sorted(skipped.items())),
    }
    return coco, summary


def _segmentation(shape: Any) -> dict[str, Any]:
    """``segmentation`` and ``area`` of a shape: COCO's area of a masked object is its mask's
    area, not its box's."""
    if shape.rle is not None:
        return {"segmentation": shape.rle, "area": shape.rle_area}
    if shape.polygons:
        return {"segmentation": [[round(v, DECIMALS) for v in polygon] for polygon in shape.polygons],
                "area": round(sum(polygon_area(p) for p in shape.polygons), DECIMALS)}
    return {"area": round(shape.box[2] * shape.box[3], DECIMALS)}


def polygon_area(flat: tuple[float, ...] | list[float]) -> float:
    """Area of a simple polygon ``[x1, y1, x2, y2, ...]`` (the shoelace formula)."""
    xs, ys = flat[0::2], flat[1::2]
    n = len(xs)
    twice = sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))
    return abs(twice) / 2.0
