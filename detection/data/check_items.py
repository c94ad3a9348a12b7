"""The per-item tests of :mod:`detection.data.check`: images, categories, annotations, files.

Each ``collect_*`` returns the file's list as position-aligned numpy arrays (so the fixer can
act on the same positions) plus ``problems``: ``code -> (count, first examples)``. Annotation
tests run on whole arrays; only pulling the fields out of the JSON objects is a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Examples kept per problem (the report shows fewer).
KEEP = 20

Problems = dict[str, tuple[int, list[str]]]


@dataclass(frozen=True)
class ImageFile:
    """What an image file says: ``status`` is ``ok``, ``missing_image_file`` or
    ``unreadable_image``; ``width``/``height`` the size orch reads it at (upright by its EXIF
    ``orientation`` unless ``data.exif: ignore``), ``stored`` the size of the stored frame;
    ``truncated`` marks a JPEG without its end marker."""

    status: str
    width: int = 0
    height: int = 0
    detail: str = ""
    truncated: bool = False
    orientation: int = 1
    stored: tuple[int, int] = (0, 0)


def inspect_image(path: Path, exif: bool = True) -> ImageFile:
    """Open ``path`` with Pillow (header and EXIF only), ``verify()`` it and, for JPEG, look
    for the end-of-image marker a truncated download lacks (``verify`` does not decode JPEG
    data)."""
    from PIL import Image

    from detection.data.orientation import ImageHeader, orientation_of

    try:
        with Image.open(path) as image:
            header = ImageHeader(*image.size, orientation_of(image, header_only=True))
            width, height = header.size(exif)
            kind = image.format
            image.verify()
    except FileNotFoundError:
        return ImageFile("missing_image_file")
    except Exception as err:  # Pillow reports broken files as OSError, SyntaxError, ValueError, ...
        return ImageFile("unreadable_image", detail=(str(err) or type(err).__name__)[:80])
    truncated = False
    if kind == "JPEG":
        with open(path, "rb") as handle:
            handle.seek(-2, 2)
            truncated = handle.read(2) != b"\xff\xd9"
    return ImageFile("ok", width, height, truncated=truncated, orientation=header.orientation,
                     stored=(header.width, header.height))


def later_duplicates(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask of the positions (among ``mask``) whose value appeared at an earlier position."""
    positions = np.flatnonzero(mask)
    order = positions[np.argsort(values[positions], kind="stable")]  # stable: earliest first
    ordered = values[order]
    repeats = np.zeros(len(values), dtype=bool)
    repeats[order[1:][ordered[1:] == ordered[:-1]]] = True
    return repeats


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _add(problems: Problems, code: str, examples: list[str], count: int | None = None) -> None:
    if examples:
        problems[code] = (len(examples) if count is None else count, examples[:KEEP])


def _examples(mask: np.ndarray, describe) -> list[str]:
    return [describe(p) for p in np.flatnonzero(mask)[:KEEP].tolist()]


def collect_images(entries: list[Any]) -> dict[str, Any]:
    """Images: ``valid``, ``first`` (valid and first of its id), ``ids``, ``width``/``height``,
    ``all_ids`` (ids of every entry that has one) and ``problems``."""
    n = len(entries)
    valid = np.array([isinstance(e, dict) and _is_int(e.get("id")) and isinstance(e.get("file_name"), str)
                      and _is_int(e.get("width")) and _is_int(e.get("height")) and e["width"] > 0 and e["height"] > 0
                      for e in entries], dtype=bool).reshape(n)
    ids = np.array([e["id"] if v else -1 for e, v in zip(entries, valid)], dtype=np.int64).reshape(n)
    width = np.array([e["width"] if v else 0 for e, v in zip(entries, valid)], dtype=np.float64).reshape(n)
    height = np.array([e["height"] if v else 0 for e, v in zip(entries, valid)], dtype=np.float64).reshape(n)
    repeated = later_duplicates(ids, valid)
    problems: Problems = {}
    _add(problems, "invalid_image", [repr(entries[p])[:60] for p in np.flatnonzero(~valid)[:KEEP]], int((~valid).sum()))
    _add(problems, "duplicate_image_id", _examples(repeated, lambda p: f"image {ids[p]} (entry {p})"), int(repeated.sum()))
    names = np.array([entries[p]["file_name"] for p in range(n) if valid[p]], dtype=object)
    same_file = later_duplicates(names, np.ones(len(names), dtype=bool)) if len(names) else np.zeros(0, bool)
    _add(problems, "duplicate_file_name", [str(f) for f in names[same_file][:KEEP]], int(same_file.sum()))
    all_ids = np.array(sorted({e["id"] for e in entries if isinstance(e, dict) and _is_int(e.get("id"))}), dtype=np.int64)
    first = valid & ~repeated
    return {"valid": valid, "first": first, "ids": ids, "width": width, "height": height,
            "all_ids": all_ids, "problems": problems}


def collect_categories(entries: list[Any]) -> dict[str, Any]:
    """Categories: ``names`` (id -> name of the first entry of each id), ``exact_copies``
    (positions repeating an earlier entry exactly) and ``problems``."""
    names: dict[int, str] = {}
    by_name: dict[str, list[int]] = {}
    problems: Problems = {}
    invalid, duplicate, copies = [], [], []
    for position, cat in enumerate(entries):
        if not (isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str)):
            invalid.append(repr(cat)[:60])
        elif cat["id"] not in names:
            names[cat["id"]] = cat["name"]
            by_name.setdefault(cat["name"], []).append(cat["id"])
        elif any(e == cat for e in entries[:position]):
            copies.append(position)
            duplicate.append(f"category {cat['id']} {cat['name']!r} (an exact copy)")
        else:
            duplicate.append(f"category {cat['id']} {names[cat['id']]!r} and {cat['name']!r}")
    _add(problems, "invalid_category", invalid)
    _add(problems, "duplicate_category_id", duplicate)
    _add(problems, "duplicate_category_name", [f"{n!r}: ids {ids}" for n, ids in by_name.items() if len(ids) > 1])
    if names:
        gaps = sorted(set(range(min(1, min(names)), max(names) + 1)) - set(names))
        _add(problems, "gapped_category_ids", [f"no id {i}" for i in gaps])
    return {"names": names, "ids": np.array(sorted(names), dtype=np.int64), "exact_copies": copies,
            "problems": problems}


def _fields(entries: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``valid, id, image_id, category_id, bbox`` arrays; one fast pass when every annotation
    is well formed (the common case), else a per-annotation pass."""
    n = len(entries)
    try:
        ids = np.array([a["id"] for a in entries])
        image_ids = np.array([a["image_id"] for a in entries])
        cat_ids = np.array([a["category_id"] for a in entries])
        boxes = np.array([a["bbox"] for a in entries])
        if n and all(v.dtype.kind == "i" for v in (ids, image_ids, cat_ids)) and boxes.shape == (n, 4) \
                and boxes.dtype.kind in "if":
            return np.ones(n, dtype=bool), ids, image_ids, cat_ids, boxes.astype(np.float64)
    except (KeyError, TypeError, ValueError, IndexError):
        pass
    rows = []
    for a in entries:
        ok = isinstance(a, dict) and all(_is_int(a.get(k)) for k in ("id", "image_id", "category_id")) \
            and isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4 and all(_is_number(v) for v in a["bbox"])
        rows.append((True, a["id"], a["image_id"], a["category_id"], a["bbox"]) if ok else (False, 0, 0, 0, [np.nan] * 4))
    valid, ids, image_ids, cat_ids, boxes = zip(*rows) if rows else ((), (), (), (), ())
    return (np.array(valid, dtype=bool), np.array(ids, dtype=np.int64), np.array(image_ids, dtype=np.int64),
            np.array(cat_ids, dtype=np.int64), np.array(boxes, dtype=np.float64).reshape(n, 4))


def _areas(entries: list[Any], valid: np.ndarray) -> np.ndarray:
    """The ``area`` of each annotation, NaN where missing or not a number."""
    if valid.all():  # the common case: every area a number, read in one pass
        fast = np.array([a.get("area") for a in entries])
        if fast.shape == (len(entries),) and fast.dtype.kind in "if":
            return fast.astype(np.float64)
    return np.array([a["area"] if v and _is_number(a.get("area")) else np.nan for a, v in zip(entries, valid)],
                    dtype=np.float64).reshape(len(entries))


def collect_annotations(entries: list[Any], images: dict[str, Any], categories: dict[str, Any],
                        tolerance: float) -> dict[str, Any]:
    """Annotations: field arrays, ``image_pos`` (position of the image entry, -1 if none), one
    mask per problem and ``problems``. Boxes are tested against the JSON's image sizes (what a
    loader uses; a file of another size is reported as ``size_mismatch``)."""
    valid, ids, image_ids, cat_ids, boxes = _fields(entries)
    area = _areas(entries, valid)
    has_seg = np.array([bool(v and a.get("segmentation")) for a, v in zip(entries, valid)], dtype=bool).reshape(len(entries))

    first = np.flatnonzero(images["first"])
    order = np.argsort(images["ids"][first])
    sorted_ids, sorted_pos = images["ids"][first][order], first[order]
    slot = np.clip(np.searchsorted(sorted_ids, image_ids), 0, max(len(sorted_ids) - 1, 0))
    found = valid & (len(sorted_ids) > 0) & (sorted_ids[slot] == image_ids if len(sorted_ids) else False)
    image_pos = np.where(found, sorted_pos[slot] if len(sorted_pos) else -1, -1)

    masks = {
        "duplicate_annotation_id": later_duplicates(ids, valid),
        "annotation_of_missing_image": valid & ~np.isin(image_ids, images["all_ids"]),
        "unknown_category": valid & ~np.isin(cat_ids, categories["ids"]),
    }
    x, y, w, h = boxes.T
    with np.errstate(invalid="ignore"):
        degenerate = valid & (~np.isfinite(boxes).all(axis=1) | (w <= 0) | (h <= 0))
        sized = valid & ~degenerate & found
        # image_pos -1 (no image) picks the appended 0: such boxes are not "sized" anyway
        W, H = np.append(images["width"], 0)[image_pos], np.append(images["height"], 0)[image_pos]
        outside = sized & ((x < -tolerance) | (y < -tolerance) | (x + w > W + tolerance) | (y + h > H + tolerance))
        box_area = w * h
        # Without a mask the area is the box's; a mask's area cannot exceed its box (2% slack:
        # rasterised masks of tiny objects round up).
        off = np.where(has_seg, area > 1.02 * box_area + 2.0, np.abs(area - box_area) > 0.01 * box_area + 1.0)
        area_bad = valid & ~degenerate & (~np.isfinite(area) | (area <= 0) | off)
    masks.update(degenerate_box=degenerate, box_outside_image=outside, area_inconsistent=area_bad)

    problems: Problems = {}
    _add(problems, "invalid_annotation", [repr(entries[p])[:60] for p in np.flatnonzero(~valid)[:KEEP]],
         int((~valid).sum()))
    for code, mask in masks.items():
        _add(problems, code, _examples(mask, lambda p: f"ann {ids[p]} (image {image_ids[p]}) {_box(boxes[p])}"),
             int(mask.sum()))
    counted = np.bincount(image_pos[valid & (image_pos >= 0)], minlength=len(images["ids"]))
    empty = images["first"] & (counted[: len(images["ids"])] == 0)
    _add(problems, "empty_image", _examples(empty, lambda p: f"image {images['ids'][p]}"), int(empty.sum()))
    return {"valid": valid, "id": ids, "image_id": image_ids, "category_id": cat_ids, "boxes": boxes,
            "area": area, "has_seg": has_seg, "image_pos": image_pos, "masks": masks, "problems": problems}


def _box(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box.tolist()) + "]"
