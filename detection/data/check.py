"""``orch data check``: find what is wrong with a COCO instances file (and its images).

:func:`analyse` looks at every image, annotation and category once: the per-annotation tests
are numpy operations over all boxes at once (COCO train2017 has 860k annotations), and image
files are opened by a thread pool (header and Pillow's ``verify()``, no decode).
:func:`check_coco` turns the result into a :class:`CheckReport` of problems, each an error,
a warning or information; :mod:`detection.data.fix` writes a cleaned copy from the same
analysis. Standard library + numpy + Pillow (the CLI imports it without torch).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cluster.errors import DataError
from detection.data.check_items import (
    KEEP,
    ImageFile,
    Problems,
    collect_annotations,
    collect_categories,
    collect_images,
    inspect_image,
)
from detection.data.orientation import TURNS

#: code -> (severity, what it means, what ``--fix`` does about it)
PROBLEMS: dict[str, tuple[str, str, str]] = {
    "invalid_image": ("error", "image entry without integer id, file_name and positive width/height", "dropped"),
    "duplicate_image_id": ("error", "image id used by more than one image entry", "later entries dropped"),
    "missing_image_file": ("error", "image file does not exist in the image folder", "image and its annotations dropped"),
    "unreadable_image": ("error", "Pillow cannot open or verify the image file", "image and its annotations dropped"),
    "size_mismatch": ("error", "width/height in the JSON differ from the image file", "set from the file"),
    "exif_rotated": ("error", "width/height in the JSON are the stored frame of an image its EXIF orientation turns "
                     "sideways; orch reads it upright (data.exif=apply)",
                     "size set upright; boxes turned upright with it, unless they fit only the upright frame"),
    "exif_mirrored": ("warning", "EXIF orientation 2-4 mirrors or turns the image 180° when read upright; its size "
                      "cannot show which frame its boxes were drawn in (look with orch data browse)", "not fixed"),
    "invalid_category": ("error", "category entry without integer id and string name", "not fixed"),
    "duplicate_category_id": ("error", "category id used by more than one category entry", "exact copies dropped, others not fixed"),
    "invalid_annotation": ("error", "annotation without id, image_id, category_id or a bbox of 4 numbers", "dropped"),
    "duplicate_annotation_id": ("error", "annotation id used more than once", "exact copies dropped, others renumbered"),
    "annotation_of_missing_image": ("error", "annotation whose image_id is not in 'images'", "dropped"),
    "unknown_category": ("error", "annotation whose category_id is not in 'categories'", "dropped"),
    "degenerate_box": ("error", "box width or height <= 0, or not a number", "dropped"),
    "box_outside_image": ("error", "box reaches outside its image (beyond the tolerance)", "clipped to the image"),
    "truncated_jpeg": ("warning", "JPEG file without its end marker (truncated download?)", "not fixed"),
    "duplicate_file_name": ("warning", "one file named by several image entries", "not fixed"),
    "gapped_category_ids": ("warning", "category ids are not consecutive (missing ids shown)", "not fixed"),
    "duplicate_category_name": ("warning", "one category name under several ids", "not fixed"),
    "unused_category": ("warning", "category with no annotation", "not fixed"),
    "area_inconsistent": ("warning", "annotation area missing or not what its box allows", "recomputed"),
    "empty_image": ("info", "image without annotations", "kept"),
}
SEVERITIES = ("error", "warning", "info")


@dataclass
class Analysis:
    """Per-item findings of :func:`analyse`, shared by the report and the fixer. ``images`` and
    ``annotations`` are position-aligned masks/arrays over the file's lists."""

    data: dict[str, Any]
    tolerance: float
    images: dict[str, Any]  # see check_items.collect_images
    annotations: dict[str, Any]  # see check_items.collect_annotations
    categories: dict[str, Any]  # see check_items.collect_categories
    files: dict[int, ImageFile] = field(default_factory=dict)  # image position -> what the file says
    files_checked: bool = False
    img_dir: Optional[Path] = None
    exif: bool = True  # images read upright by EXIF orientation (data.exif=apply)
    problems: Problems = field(default_factory=dict)  # code -> (count, first examples)


@dataclass(frozen=True)
class Problem:
    """One kind of problem: its code, severity, how many and the first examples."""

    code: str
    severity: str
    count: int
    examples: tuple[str, ...]


@dataclass(frozen=True)
class CheckReport:
    """The result of :func:`check_coco`."""

    ann_file: str
    images: int
    annotations: int
    categories: int
    problems: tuple[Problem, ...]
    seconds: float
    files_checked: bool

    @property
    def has_errors(self) -> bool:
        """Whether any problem is an error (``orch data check`` then exits 1)."""
        return any(p.severity == "error" for p in self.problems)

    def table(self) -> str:
        """The report ``orch data check`` prints: a table, then what each problem means."""
        head = (f"{self.ann_file}: {self.images} images, {self.annotations} annotations, "
                f"{self.categories} categories; checked in {self.seconds:.2f} s"
                + ("" if self.files_checked else " (image files not checked: no --img-dir)"))
        if not self.problems:
            return head + "\nno problems found"
        width = max(len(p.code) for p in self.problems)
        lines = [head, f"{'severity':<8}  {'problem':<{width}}  {'count':>7}  examples"]
        lines += [f"{p.severity:<8}  {p.code:<{width}}  {p.count:>7}  {', '.join(p.examples)}" for p in self.problems]
        lines.append("")
        lines += [f"{p.code}: {PROBLEMS[p.code][1]} (--fix: {PROBLEMS[p.code][2]})" for p in self.problems]
        errors = sum(p.count for p in self.problems if p.severity == "error")
        lines.append(f"{errors} errors" if errors else "no errors (warnings and information only)")
        return "\n".join(lines)


def load_coco(path: str | Path) -> dict[str, Any]:
    """A COCO instances file as a dict with ``images``, ``annotations`` and ``categories``
    lists; anything else is a one-line :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist; give the path of a COCO instances .json")
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: Windows tools write a BOM
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: broken JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the file ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a COCO object with 'images' and 'categories', got a {type(data).__name__}")
    data.setdefault("annotations", [])  # image-info files (COCO test-dev) have none
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: '{key}' is missing or not a list; this is not a COCO instances file")
    return data


def analyse(data: dict[str, Any], img_dir: Optional[str | Path] = None, tolerance: float = 1.0,
            files: Optional[dict[str, ImageFile]] = None, exif: bool = True) -> Analysis:
    """Find every problem of ``data`` (see :data:`PROBLEMS`). With ``img_dir`` the image files
    are inspected too, at their upright sizes unless ``exif`` is false; ``files``
    (``file_name`` -> :class:`ImageFile`) reuses earlier inspections."""
    images = collect_images(data["images"])
    categories = collect_categories(data["categories"])
    found = Analysis(data, tolerance, images, {}, categories, files_checked=img_dir is not None,
                     img_dir=Path(img_dir) if img_dir is not None else None, exif=exif)
    if img_dir is not None:
        found.files = _inspect_files(data["images"], images["first"], Path(img_dir), files or {}, exif)
    annotations = collect_annotations(data["annotations"], images, categories, tolerance)
    found.annotations = annotations
    problems = {**images["problems"], **categories["problems"], **annotations["problems"]}
    file_problems: dict[str, list[str]] = {}
    for position, info in found.files.items():
        entry = data["images"][position]
        if info.status != "ok":
            file_problems.setdefault(info.status, []).append(_image_example(entry, info.detail))
        elif exif and info.orientation in (5, 6, 7, 8) and info.stored == (entry["width"], entry["height"]):
            file_problems.setdefault("exif_rotated", []).append(
                f"image {entry['id']} {entry['file_name']} (EXIF orientation {info.orientation}: "
                f"{TURNS[info.orientation]}) is {info.width}x{info.height} upright, JSON says "
                f"{entry['width']}x{entry['height']}")
        elif (info.width, info.height) != (entry["width"], entry["height"]):
            file_problems.setdefault("size_mismatch", []).append(
                f"image {entry['id']} is {info.width}x{info.height}, JSON says {entry['width']}x{entry['height']}")
        elif exif and info.orientation in (2, 3, 4):
            file_problems.setdefault("exif_mirrored", []).append(
                f"image {entry['id']} {entry['file_name']} (EXIF orientation {info.orientation}: "
                f"{TURNS[info.orientation]})")
        if info.truncated:
            file_problems.setdefault("truncated_jpeg", []).append(_image_example(entry))
    problems.update({code: (len(items), items[:KEEP]) for code, items in file_problems.items()})
    used = set(np.unique(annotations["category_id"][annotations["valid"]]).tolist())
    unused = [f"category {c} {n!r}" for c, n in categories["names"].items() if c not in used]
    if unused:
        problems["unused_category"] = (len(unused), unused[:KEEP])
    found.problems = problems
    return found


def check_coco(ann_file: str | Path, img_dir: Optional[str | Path] = None, tolerance: float = 1.0,
               examples: int = 3, exif: bool = True) -> tuple[CheckReport, Analysis]:
    """Load and analyse ``ann_file``; the report (problems in :data:`PROBLEMS` order, the first
    ``examples`` of each) and the analysis (for :func:`detection.data.fix.fix_coco`). ``exif``
    false compares the stored frames' sizes (``data.exif: ignore``)."""
    if img_dir is not None and not Path(img_dir).is_dir():
        raise DataError(f"--img-dir {img_dir} is not a folder; give the folder the images' file_name are relative to")
    start = time.perf_counter()
    data = load_coco(ann_file)
    found = analyse(data, img_dir, tolerance, exif=exif)
    return report(found, str(ann_file), time.perf_counter() - start, examples), found


def report(found: Analysis, ann_file: str, seconds: float, examples: int = 3) -> CheckReport:
    """The :class:`CheckReport` of an analysis."""
    problems = tuple(
        Problem(code, PROBLEMS[code][0], found.problems[code][0], tuple(found.problems[code][1][:examples]))
        for code in PROBLEMS if code in found.problems
    )
    data = found.data
    return CheckReport(ann_file, len(data["images"]), len(data["annotations"]), len(data["categories"]),
                       problems, seconds, found.files_checked)


def _inspect_files(entries: list[Any], first: np.ndarray, img_dir: Path,
                   known: dict[str, ImageFile], exif: bool) -> dict[int, ImageFile]:
    """Inspect the file of each valid, first-of-its-id image entry (``first`` mask), several
    at once: the work is file I/O and Pillow's header parsing."""
    positions = np.flatnonzero(first).tolist()
    todo = [p for p in positions if entries[p]["file_name"] not in known]
    workers = min(16, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        inspected = dict(zip(todo, pool.map(lambda p: inspect_image(img_dir / entries[p]["file_name"], exif), todo)))
    return {p: inspected[p] if p in inspected else known[entries[p]["file_name"]] for p in positions}


def _image_example(entry: dict[str, Any], detail: str = "") -> str:
    return f"image {entry['id']} {entry['file_name']}" + (f" ({detail})" if detail else "")
