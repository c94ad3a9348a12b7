"""Pascal VOC XML annotations -> :class:`~detection.data.formats.base.Sample` records.

One ``<annotation>`` file per image: ``<filename>``, ``<size><width><height>``, and per object
``<name>``, ``<difficult>``, ``<truncated>`` and ``<bndbox><xmin><ymin><xmax><ymax>``.

Coordinates: VOC boxes are 1-based pixel indices and ``xmax``/``ymax`` are inclusive (the box
covers pixels ``xmin..xmax``; ``xmin=1, xmax=W`` is the whole image). In COCO's continuous
0-based coordinates pixel ``i`` (1-based) spans ``[i - 1, i)``, so the box spans
``[xmin - 1, xmax]``: ``x = xmin - 1`` and ``w = xmax - xmin + 1`` (detectron2's VOC loader
makes the same choice). ``difficult=1`` objects become ignore regions (``iscrowd: 1``: COCOeval
neither rewards nor penalises detections on them, as VOC's own evaluation does); ``truncated``
and ``occluded`` are not used.

The image: as torchvision, MMDetection and detectron2 read VOC, the one named by the XML file's
stem (``Annotations/000005.xml`` -> ``JPEGImages/000005.jpg``, any image suffix); ``<filename>``
only when no image has that stem, and a ``<filename>`` without suffix (ILSVRC writes them so)
gets the one found on disk. Each folder is listed once, not probed per file.

EXIF orientation (:mod:`detection.data.orientation`): where ``<size>`` is the stored size of an
image that turns sideways when shown upright (orientations 5-8; labelImg draws on the stored
frame), the boxes are turned upright with it; orientations 2-4 cannot be told from the size and
are counted in the summary.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Optional

from cluster.errors import DataError
from detection.data.formats.base import (
    IMAGE_SUFFIXES,
    Sample,
    Shape,
    Source,
    image_header,
    read_lines,
    require_dir,
)
from detection.data.orientation import upright_box


def read_voc(src: Path, img_dir: Optional[Path] = None, split: Optional[str] = None, exif: bool = True) -> Source:
    """Read a VOC root (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``) or a
    plain folder of ``.xml`` files. Images are looked for in ``img_dir`` (default: the root's
    ``JPEGImages/``, or the XML folder itself) by the rule of the module docstring; ``exif``
    false keeps every box in the stored frame (``data.exif: ignore``)."""
    src = require_dir(Path(src), "VOC folder", "give a VOC root (with Annotations/) or a folder of .xml files")
    if (src / "Annotations").is_dir():
        ann_dir, default_img_dir = src / "Annotations", src / "JPEGImages"
        xml_files = _split_files(src, ann_dir, split) if split else sorted(ann_dir.glob("*.xml"))
    else:
        if split:
            raise DataError(f"--split {split}: {src} is not a VOC root (no Annotations/ and ImageSets/Main/); "
                            "drop --split or give the VOC root")
        ann_dir, default_img_dir = src, src
        xml_files = sorted(src.glob("*.xml"))
    if not xml_files:
        raise DataError(f"no .xml files in {ann_dir}; give a folder of Pascal VOC annotation files")
    img_dir = Path(img_dir) if img_dir else default_img_dir
    skipped: Counter = Counter()
    notes: Counter = Counter()
    images = _ImageNames(img_dir)
    samples = [_read_file(path, img_dir, images, exif, skipped, notes) for path in xml_files]
    return Source(samples=samples, img_dir=img_dir, skipped=skipped, notes=notes)


class _ImageNames:
    """The image files of a folder, listed once: by name and by stem."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            names = [e.name for e in os.scandir(folder) if e.is_file()]
        except OSError:  # no such folder: every image is "not found", reported per file
            names = []
        self.names = set(names)
        self.by_stem: dict[str, list[str]] = {}
        rank = {suffix: i for i, suffix in enumerate(IMAGE_SUFFIXES)}
        for name in sorted(names, key=lambda n: (rank.get(Path(n).suffix.lower(), 99), n)):
            if Path(name).suffix.lower() in rank:
                self.by_stem.setdefault(Path(name).stem, []).append(name)

    def find(self, stem: str, filename: str) -> tuple[Optional[str], str]:
        """The image of an XML file with this ``stem`` and ``<filename>``, and how it was found
        (``stem``, ``filename``, ``suffix`` or ``missing``)."""
        if stem in self.by_stem:
            return self.by_stem[stem][0], "stem"
        if filename and (filename in self.names or ("/" in filename and (self.folder / filename).is_file())):
            return filename, "filename"
        if filename and Path(filename).suffix.lower() not in IMAGE_SUFFIXES and filename in self.by_stem:
            return self.by_stem[filename][0], "suffix"
        return None, "missing"


def _split_files(root: Path, ann_dir: Path, split: str) -> list[Path]:
    """The annotation files named by ``ImageSets/Main/<split>.txt`` (one image id a line; a
    class file's ``id -1`` lines, images without that class, are left out)."""
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        available = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
        raise DataError(f"--split {split}: {list_file} does not exist; available splits: "
                        f"{', '.join(available) or 'none'}")
    files = []
    for number, line in enumerate(read_lines(list_file), 1):
        tokens = line.split()
        if not tokens or (len(tokens) > 1 and tokens[1] == "-1"):
            continue
        path = ann_dir / f"{tokens[0]}.xml"
        if not path.is_file():
            raise DataError(f"{list_file} line {number}: {path} does not exist; fix the list or the Annotations/ folder")
        files.append(path)
    return files


def _read_file(path: Path, img_dir: Path, images: _ImageNames, exif: bool, skipped: Counter,
               notes: Counter) -> Sample:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(f"{path}: broken XML ({err}); fix or re-export the file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err})") from None
    if root.tag != "annotation":
        raise DataError(f"{path}: root element is <{root.tag}>, not <annotation>; this is not a Pascal VOC file")
    filename = (root.findtext("filename") or "").strip()
    found, how = images.find(path.stem, filename)
    if how == "filename" and Path(filename).stem != path.stem:
        notes["VOC images named by <filename> (no image has the XML file's stem)"] += 1
    elif how == "stem" and filename and filename not in (found, path.stem):
        notes["VOC files whose <filename> differs from their stem (image taken from the stem)"] += 1
    elif how == "suffix" or (how == "stem" and filename == path.stem):
        notes["VOC <filename>s without suffix (suffix found on disk)"] += 1
    elif how == "missing":
        notes[f"VOC files without an image in {img_dir}"] += 1
    file_name = found or f"{path.stem}{Path(filename).suffix or '.jpg'}"
    header = image_header(img_dir / found, str(path)) if found and exif else None
    width = _number(root, "size/width", path, required=False)
    height = _number(root, "size/height", path, required=False)
    if not (width and height and width > 0 and height > 0):
        # Some exporters write <size> as 0 or leave it out: the image header knows.
        header = header or image_header(img_dir / file_name, f"{path} (no <size>)")
        width, height = header.size(exif)
    turn = 1
    if header is not None and header.orientation != 1:
        if header.swaps and (width, height) == (header.width, header.height):
            turn = header.orientation  # <size> is the stored frame's: so are the boxes
            notes["VOC files drawn on the stored frame of an EXIF-turned image (boxes turned upright)"] += 1
            width, height = header.upright
        elif not header.swaps:
            notes["VOC images with EXIF orientation 2-4 (mirrored or 180°: boxes taken as upright; "
                  "look with orch data browse)"] += 1
    shapes = []
    for index, obj in enumerate(root.iter("object"), 1):
        where = f"{path} object {index}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataError(f"{where}: <name> is missing or empty; every object needs its class name")
        if obj.find("bndbox") is None:
            skipped["VOC object without <bndbox>"] += 1
            continue
        xmin, ymin, xmax, ymax = (_number(obj, f"bndbox/{tag}", path) for tag in ("xmin", "ymin", "xmax", "ymax"))
        # 1-based inclusive pixel indices -> 0-based continuous xywh (see the module docstring).
        box = (xmin - 1.0, ymin - 1.0, xmax - xmin + 1.0, ymax - ymin + 1.0)
        if turn != 1:
            box = upright_box(box, header.width, header.height, turn)
        difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true", "True")
        shapes.append(Shape(label=name, box=box, where=where, crowd=difficult))
    return Sample(file_name=file_name, width=int(width), height=int(height), shapes=tuple(shapes))


def _number(element: ET.Element, tag: str, path: Path, required: bool = True) -> Optional[float]:
    """The number in ``element/tag`` (VOC writes integers; some tools write ``45.0``)."""
    text = element.findtext(tag)
    if text is None or not text.strip():
        if required:
            raise DataError(f"{path}: <{tag}> is missing; each <bndbox> needs xmin, ymin, xmax and ymax")
        return None
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{path}: <{tag}> is {text.strip()!r}, not a number") from None
