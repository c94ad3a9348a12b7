"""LabelMe JSON files -> :class:`~detection.data.formats.base.Sample` records.

One JSON file per image: ``imagePath`` (relative to the JSON file), ``imageWidth``,
``imageHeight``, ``imageData`` (the picture, base64; optional) and ``shapes``, each with
``label``, ``points`` (``[[x, y], ...]``), ``shape_type`` and ``group_id``. ``rectangle`` shapes
(two opposite corners) become boxes; ``polygon`` shapes become segmentation polygons with their
bounding box; ``mask`` shapes (LabelMe 5's AI tools: ``points`` are the two corners of a box and
``mask`` a base64 PNG of that box, placed at the integer top-left corner as LabelMe itself does)
become COCO RLE masks of the image, boxed by their nonzero pixels; other types (circle, line,
point, linestrip, ...) are counted and reported as skipped. Shapes sharing a label and a
``group_id`` are one object, as in LabelMe's own ``labelme2coco`` example: its box is the union
and its segmentation lists the polygons (or merges them with the masks into one RLE).

Special labels, as in LabelMe's examples: ``__ignore__`` regions become ignore regions
(``iscrowd: 1``) of every category, so COCOeval neither rewards nor penalises detections there
and training leaves them out of its targets; ``_background_`` shapes are skipped (counted).
A ``--classes`` file may list both (LabelMe's ``labels.txt`` starts with them); they are no
categories.

The image: with ``--img-dir``, ``<img-dir>/<imagePath>``, then ``<img-dir>/<its file name>``;
then ``imagePath`` relative to the JSON file. Where none exists and the file carries
``imageData``, that picture is written out beside the JSON file (or into ``--img-dir``) under
the ``imagePath`` name, or ``<json stem>.<png|jpg>`` when ``imagePath`` names the JSON file or nothing.

Coordinates: LabelMe points are continuous 0-based pixel coordinates, COCO's own convention,
so they are used as they are. LabelMe shows pictures upright (it applies EXIF orientation), and
its ``imageWidth``/``imageHeight`` are the upright sizes, as orch reads them.
"""

from __future__ import annotations

import base64
import binascii
import io
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

IGNORE, BACKGROUND = "__ignore__", "_background_"
#: LabelMe's special labels (its labels.txt starts with them): no categories.
SPECIAL = (IGNORE, BACKGROUND)


def read_labelme(src: Path, img_dir: Optional[Path] = None, exif: bool = True) -> Source:
    """Read every ``*.json`` below ``src``; ``file_name`` is the image path relative to
    ``img_dir`` (default ``src``), found by the rule of the module docstring. ``exif`` (upright
    sizes) matters only for files without ``imageWidth``/``imageHeight``."""
    src = require_dir(Path(src), "LabelMe folder", "give the folder of LabelMe .json files")
    files = sorted(src.rglob("*.json"))
    if not files:
        raise DataError(f"no .json files in {src}; give the folder LabelMe saved its annotation files in")
    given = Path(img_dir) if img_dir else None
    skipped: Counter = Counter()
    notes: Counter = Counter()
    samples = [_read_file(path, given, given or src, exif, skipped, notes) for path in files]
    return Source(samples=samples, img_dir=given or src, skipped=skipped, notes=notes)


def _read_file(path: Path, given: Optional[Path], img_root: Path, exif: bool, skipped: Counter,
               notes: Counter) -> Sample:
    data = read_json_file(path)
    if not (isinstance(data, dict) and isinstance(data.get("shapes"), list)):
        raise DataError(f"{path}: no 'shapes' list; this is not a LabelMe file (move other JSON files out of the folder)")
    image_path = data.get("imagePath")
    if not (isinstance(image_path, str) and image_path) and not data.get("imageData"):
        raise DataError(f"{path}: 'imagePath' is missing; LabelMe files name their image")
    image = _find_image(path, (image_path or "").replace("\\", "/"), given)  # Windows saves backslashes
    if not image.is_file() and data.get("imageData"):
        image = _write_image_data(path, image, data["imageData"])
        notes[f"images written out from LabelMe imageData (beside their .json{' or in --img-dir' if given else ''})"] += 1
    width, height = data.get("imageWidth"), data.get("imageHeight")
    if not (_positive_int(width) and _positive_int(height)):
        width, height = image_size(image, f"{path} (no imageWidth/imageHeight)", exif)
    groups: dict[Any, list[Shape]] = {}
    for index, raw in enumerate(data["shapes"], 1):
        shape = _read_shape(raw, f"{path} shape {index}", int(width), int(height), skipped)
        if shape is not None:
            group = raw.get("group_id")
            key = (shape.label, group) if group is not None else index  # ungrouped: each its own object
            groups.setdefault(key, []).append(shape)
    shapes = tuple(_merge(parts, int(width), int(height)) for parts in groups.values())
    return Sample(posix_relpath(image, img_root), int(width), int(height), shapes)


def _find_image(path: Path, image_path: str, given: Optional[Path]) -> Path:
    """The image of LabelMe file ``path`` (see the module docstring); where none exists, the
    path it should have (``--img-dir`` first), which ``imageData`` may fill."""
    named = bool(image_path) and Path(image_path).suffix.lower() != ".json"  # some tools point it at the JSON
    candidates = [given / image_path, given / Path(image_path).name] if given and named else []
    candidates += [path.parent / image_path] if named else []
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if candidates:
        return candidates[0]
    return (given or path.parent) / f"{path.stem}.png"  # imagePath names no image: imageData may be it


def _write_image_data(path: Path, image: Path, text: Any) -> Path:
    """Write the base64 picture of ``imageData`` to ``image`` (its suffix set by the picture's
    format when the name was made up); the path written."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(text, validate=False)
        with Image.open(io.BytesIO(raw)) as picture:
            kind = (picture.format or "PNG").lower()
    except (TypeError, ValueError, binascii.Error, UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: 'imageData' is not a base64 image ({err}) and {image} does not exist; "
                        "give the image with --img-dir") from None
    if image.name == f"{path.stem}.png" and kind != "png":
        image = image.with_suffix(".jpg" if kind in ("jpeg", "mpo") else f".{kind}")
    try:
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(raw)
    except OSError as err:
        raise DataError(f"{path}: cannot write its imageData to {image} ({err}); give a writable --img-dir") from None
    return image


def _read_shape(raw: Any, where: str, width: int, height: int, skipped: Counter) -> Optional[Shape]:
    if not isinstance(raw, dict) or not isinstance(raw.get("label"), str):
        raise DataError(f"{where}: needs a 'label' string and 'points'; this is not a LabelMe shape")
    kind = raw.get("shape_type") or "polygon"  # LabelMe before 3.x wrote polygons without a type
    if raw["label"] == BACKGROUND:
        skipped[f"LabelMe {BACKGROUND} shapes"] += 1
        return None
    if kind not in ("rectangle", "polygon", "mask"):
        skipped[f"LabelMe {kind} shapes"] += 1
        return None
    ignore = raw["label"] == IGNORE
    points = raw.get("points")
    try:
        xs = [float(p[0]) for p in points]
        ys = [float(p[1]) for p in points]
    except (TypeError, ValueError, IndexError, KeyError):
        raise DataError(f"{where}: 'points' must be a list of [x, y] pairs, got {str(points)[:60]}") from None
    if kind == "mask":
        return _mask_shape(raw, xs, ys, where, width, height, skipped)
    if kind == "rectangle":
        if len(xs) < 2:
            skipped["LabelMe rectangles with fewer than 2 points"] += 1
            return None
        box = box_of_points(xs, ys)
        # An ignore rectangle gets its outline too: mask training needs every region's mask.
        outline = ((box[0], box[1], box[0] + box[2], box[1], box[0] + box[2], box[1] + box[3], box[0], box[1] + box[3]),)
        return Shape(label=raw["label"], box=box, where=where, crowd=ignore, everything=ignore,
                     polygons=outline if ignore else ())
    if len(xs) < 3:
        skipped["LabelMe polygons with fewer than 3 points"] += 1
        return None
    polygon = tuple(v for xy in zip(xs, ys) for v in xy)
    return Shape(label=raw["label"], box=box_of_points(xs, ys), where=where, polygons=(polygon,),
                 crowd=ignore, everything=ignore)


def _mask_shape(raw: dict[str, Any], xs: list[float], ys: list[float], where: str, width: int, height: int,
                skipped: Counter) -> Optional[Shape]:
    """A LabelMe ``mask`` shape: the PNG in ``mask`` covers the box whose corners are ``points``,
    its top-left pixel at the integer corner (LabelMe's own ``shapes_to_label``)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if len(xs) < 2 or not isinstance(raw.get("mask"), str):
        raise DataError(f"{where}: a mask shape needs 'points' (two box corners) and 'mask' (a base64 PNG)")
    try:
        with Image.open(io.BytesIO(base64.b64decode(raw["mask"]))) as picture:
            patch = np.asarray(picture.convert("L")) > 0
    except (ValueError, binascii.Error, UnidentifiedImageError, OSError) as err:
        raise DataError(f"{where}: 'mask' is not a base64 PNG ({err})") from None
    left, top = int(min(xs)), int(min(ys))
    full = np.zeros((height, width), dtype=np.uint8)
    x0, y0 = max(left, 0), max(top, 0)
    part = patch[y0 - top : height - top, x0 - left : width - left]
    full[y0 : y0 + part.shape[0], x0 : x0 + part.shape[1]] = part
    rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
    if not len(rows):
        skipped["LabelMe masks without a pixel inside the image"] += 1
        return None
    # Pixel i spans [i, i + 1): the box runs to the far edge of the last pixel.
    box = (float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0]))
    ignore = raw["label"] == IGNORE
    return Shape(label=raw["label"], box=box, where=where, rle=_encode(full), rle_area=float(full.sum()),
                 crowd=ignore, everything=ignore)


def _encode(mask: Any) -> dict[str, Any]:
    """A ``uint8 [H, W]`` mask as COCO's compressed RLE, JSON-ready."""
    import numpy as np
    from pycocotools import mask as mask_utils  # C extension, no torch

    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _merge(parts: list[Shape], width: int, height: int) -> Shape:
    """One object from the shapes of a group: the union box, all polygons, or one RLE of all
    of them when one is a mask."""
    if len(parts) == 1:
        return parts[0]
    xs = [v for s in parts for v in (s.box[0], s.box[0] + s.box[2])]
    ys = [v for s in parts for v in (s.box[1], s.box[1] + s.box[3])]
    polygons = tuple(p for s in parts for p in s.polygons)
    first = parts[0]
    if not any(s.rle for s in parts):
        return Shape(label=first.label, box=box_of_points(xs, ys), where=first.where, polygons=polygons,
                     crowd=first.crowd, everything=first.everything)
    from pycocotools import mask as mask_utils

    rles = [dict(s.rle, counts=s.rle["counts"].encode("ascii")) for s in parts if s.rle]
    if polygons:
        rles += mask_utils.frPyObjects([list(p) for p in polygons], height, width)
    merged = mask_utils.merge(rles)
    rle = {"size": [int(v) for v in merged["size"]], "counts": merged["counts"].decode("ascii")}
    return Shape(label=first.label, box=box_of_points(xs, ys), where=first.where, rle=rle,
                 rle_area=float(mask_utils.area(merged)), crowd=first.crowd, everything=first.everything)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
