"""``orch data check --fix``: a cleaned copy of a COCO file, from :func:`detection.data.check.analyse`.

What is dropped or changed (every change is listed, with the ids it touched):

- images: invalid entries and later entries of a repeated id are dropped; with the image folder,
  images whose file is missing or unreadable are dropped with their annotations, and
  ``width``/``height`` that differ from the file are set from it; where they are the stored
  frame of an image its EXIF orientation turns sideways (orch reads it upright), they are set
  upright and the image's boxes and masks are turned upright with them, as drawn on the stored
  frame, unless they already fit only the upright frame (then the size alone was wrong);
- annotations: invalid ones, those of a missing image, of an unknown category and with a
  degenerate box are dropped; a repeated id is dropped when the annotation is an exact copy of the
  first, else given a new id; boxes are clipped to their (corrected) image, and dropped when
  nothing is left inside; the ``area`` of clipped box-only annotations and of inconsistent ones
  is recomputed (the box's area, or for masks the area pycocotools gives them, COCO's rule);
- categories: exact copies of an entry are dropped. Gaps in category ids, unused categories and
  empty images are left as they are: changing them would change what other files refer to.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster.files import write_json_atomic
from detection.data.check import Analysis, CheckReport, analyse, report
from detection.data.orientation import upright_array, upright_box, upright_polygon


@dataclass(frozen=True)
class Change:
    """One kind of change: ``action`` (dropped/changed), what (``images``, ``annotations``,
    ``categories``), why, and the ids of the entries it touched."""

    action: str
    what: str
    reason: str
    ids: tuple[int, ...]

    def line(self, shown: int = 10) -> str:
        """``dropped 3 annotations: degenerate box (ids 4, 9, 12)``."""
        ids = ", ".join(map(str, self.ids[:shown])) + (", ..." if len(self.ids) > shown else "")
        return f"{self.action} {len(self.ids)} {self.what}: {self.reason} (ids {ids})"


def fix_coco(found: Analysis) -> tuple[dict[str, Any], list[Change]]:
    """The cleaned copy of ``found.data`` and the list of changes (see the module docstring).
    Entries that need no change are shared with the input, not copied."""
    data, images, anns = found.data, found.images, found.annotations
    changes: list[Change] = []

    def note(action: str, what: str, reason: str, ids: Any) -> None:
        ids = tuple(int(i) for i in ids)
        if ids:
            changes.append(Change(action, what, reason, ids))

    # Images.
    entries = data["images"]
    keep_image = images["first"].copy()
    # Invalid entries may have no usable id: their positions in the list are shown instead.
    note("dropped", "image entries", "invalid: no integer id, file_name or positive size (positions)",
         np.flatnonzero(~images["valid"]))
    note("dropped", "images", "repeated image id (the first entry is kept)",
         images["ids"][images["valid"] & ~images["first"]])
    width, height = images["width"].copy(), images["height"].copy()
    for status, reason in (("missing_image_file", "image file missing"), ("unreadable_image", "image file unreadable")):
        gone = [p for p, info in found.files.items() if info.status == status]
        keep_image[gone] = False
        note("dropped", "images", f"{reason} (their annotations too)", images["ids"][gone])
    turned = _turned_images(found)
    note("changed", "images", "width/height set upright by the EXIF orientation (the JSON had the stored frame's)",
         images["ids"][sorted(turned)])
    resized = [p for p, info in found.files.items() if info.status == "ok"
               and (info.width, info.height) != (width[p], height[p]) and p not in turned]
    for p in resized + sorted(turned):
        width[p], height[p] = found.files[p].width, found.files[p].height
    note("changed", "images", "width/height set from the image file", images["ids"][resized])
    resized_at = set(resized) | set(turned)
    new_images = [entries[p] if p not in resized_at else {**entries[p], "width": int(width[p]), "height": int(height[p])}
                  for p in np.flatnonzero(keep_image).tolist()]

    # Annotations: the first reason that applies is the one reported.
    masks, valid, ids = anns["masks"], anns["valid"], anns["id"]
    image_pos = anns["image_pos"]
    image_kept = np.append(keep_image, False)[image_pos] & (image_pos >= 0)
    drop = ~valid
    note("dropped", "annotation entries", "invalid: no id, image_id, category_id or 4-number bbox (positions)",
         np.flatnonzero(~valid))
    for reason, mask in (
        ("image_id not in 'images'", masks["annotation_of_missing_image"]),
        ("their image was dropped above", valid & ~image_kept),
        ("category_id not in 'categories'", masks["unknown_category"]),
        ("degenerate box (w or h <= 0, or NaN)", masks["degenerate_box"]),
    ):
        mask = mask & ~drop
        note("dropped", "annotations", reason, ids[mask])
        drop |= mask
    copies, renumber = _duplicates(data["annotations"], ids, masks["duplicate_annotation_id"] & ~drop)
    note("dropped", "annotations", "exact copies of an earlier annotation with the same id", ids[copies])
    drop |= copies

    boxes = anns["boxes"].copy()
    turn = ~drop & np.isin(image_pos, [p for p, boxes_turn in turned.items() if boxes_turn])
    if turn.any():
        boxes[turn] = _upright_boxes(boxes[turn], [found.files[int(p)] for p in image_pos[turn]])
    note("changed", "annotations", "box (and mask) turned upright with its image (EXIF orientation)", ids[turn])
    kept_upright = ~drop & np.isin(image_pos, [p for p, boxes_turn in turned.items() if not boxes_turn])
    note("kept", "annotations", "boxes of EXIF-turned images already upright (they fit only the upright frame)",
         ids[kept_upright])
    W, H = np.append(width, 0)[image_pos], np.append(height, 0)[image_pos]
    x0, y0 = np.maximum(boxes[:, 0], 0), np.maximum(boxes[:, 1], 0)
    x1, y1 = np.minimum(boxes[:, 0] + boxes[:, 2], W), np.minimum(boxes[:, 1] + boxes[:, 3], H)
    with np.errstate(invalid="ignore"):
        nothing_inside = ~drop & ((x1 <= x0) | (y1 <= y0))
        note("dropped", "annotations", "box entirely outside its image", ids[nothing_inside])
        drop |= nothing_inside
        clipped = ~drop & ((x0 != boxes[:, 0]) | (y0 != boxes[:, 1]) | (x1 != boxes[:, 0] + boxes[:, 2])
                           | (y1 != boxes[:, 1] + boxes[:, 3]))
    clipped_note = clipped.copy()
    clipped |= turn  # a turned box is written like a clipped one
    note("changed", "annotations", "box clipped to its image", ids[clipped_note])
    reareas = ~drop & (masks["area_inconsistent"] | (clipped_note & ~anns["has_seg"]))
    note("changed", "annotations", "area recomputed", ids[reareas])

    renumber &= ~drop
    new_ids = dict(zip(np.flatnonzero(renumber).tolist(), range(int(ids[valid].max(initial=0)) + 1, 1 << 62)))
    note("changed", "annotations", "repeated id given a new one (old ids shown)", ids[renumber])
    touched = set(np.flatnonzero(~drop & (clipped | reareas | renumber)).tolist())
    new_anns = []
    for p in np.flatnonzero(~drop).tolist():
        ann = data["annotations"][p]
        if p in touched:
            ann = dict(ann)
            if clipped[p]:
                ann["bbox"] = [float(x0[p]), float(y0[p]), float(x1[p] - x0[p]), float(y1[p] - y0[p])]
            if turn[p] and ann.get("segmentation"):
                info = found.files[int(image_pos[p])]
                ann["segmentation"] = _turn_segmentation(ann["segmentation"], *info.stored, info.orientation)
            if reareas[p]:
                ann["area"] = _area(ann, int(W[p]), int(H[p]))
            if p in new_ids:
                ann["id"] = new_ids[p]
        new_anns.append(ann)

    # Categories.
    copies_at = set(found.categories["exact_copies"])
    note("dropped", "categories", "exact copies of an earlier entry", [data["categories"][p]["id"] for p in sorted(copies_at)])
    new_cats = [c for p, c in enumerate(data["categories"]) if p not in copies_at]
    return {**data, "images": new_images, "annotations": new_anns, "categories": new_cats}, changes


def _turned_images(found: Analysis) -> dict[int, bool]:
    """Image positions whose JSON size is the stored frame of an image that EXIF turns sideways,
    each with whether to turn its boxes too: yes, unless every box fits the upright frame and
    some box does not fit the stored one (then they were drawn upright; only the size was
    wrong). One pass over the annotations, whatever the number of such images."""
    if not found.exif:
        return {}
    images, anns, slack = found.images, found.annotations, found.tolerance
    sideways = {p: info for p, info in found.files.items() if info.status == "ok" and info.orientation in (5, 6, 7, 8)
                and info.stored == (images["width"][p], images["height"][p])}
    if not sideways:
        return {}
    n = len(images["ids"])
    upright, stored = np.zeros((n, 2)), np.zeros((n, 2))
    for p, info in sideways.items():
        upright[p], stored[p] = (info.width, info.height), info.stored
    mine = anns["valid"] & np.isin(anns["image_pos"], list(sideways)) & np.isfinite(anns["boxes"]).all(axis=1)
    at = anns["image_pos"][mine]
    far = anns["boxes"][mine][:, :2] + anns["boxes"][mine][:, 2:]  # right, bottom
    outside_upright = np.bincount(at, (far > upright[at] + slack).any(axis=1), minlength=n)
    outside_stored = np.bincount(at, (far > stored[at] + slack).any(axis=1), minlength=n)
    return {p: not (outside_upright[p] == 0 and outside_stored[p] > 0) for p in sideways}


def _upright_boxes(boxes: np.ndarray, files: list[Any]) -> np.ndarray:
    """``[N, 4]`` xywh boxes of the stored frames of ``files`` (one :class:`ImageFile` each) in
    their upright frames."""
    width, height = (np.array([f.stored[i] for f in files], dtype=np.float64) for i in (0, 1))
    orientation = np.array([f.orientation for f in files])
    out = boxes.copy()
    for value in np.unique(orientation).tolist():
        at = orientation == value
        x, y, w, h = boxes[at].T
        out[at] = np.stack(upright_box((x, y, w, h), width[at], height[at], value), axis=1)
    return out


def _turn_segmentation(seg: Any, width: int, height: int, orientation: int) -> Any:
    """Polygons or an RLE of the stored ``width x height`` frame, turned upright."""
    if isinstance(seg, list):
        return [upright_polygon(polygon, width, height, orientation) if isinstance(polygon, list) else polygon
                for polygon in seg]
    from pycocotools import mask as mask_utils

    try:
        rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg.get("counts"), list) else \
            dict(seg, counts=seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"])
        upright = upright_array(mask_utils.decode(rle), orientation)
    except (TypeError, ValueError, KeyError, AttributeError):
        return seg  # malformed: left for the check to report
    out = mask_utils.encode(np.asfortranarray(upright))
    return {"size": [int(v) for v in out["size"]], "counts": out["counts"].decode("ascii")}


def _duplicates(entries: list[Any], ids: np.ndarray, repeated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split repeated-id annotations into exact copies of the first with that id (dropped)
    and different annotations (renumbered)."""
    if not repeated.any():
        return repeated, repeated.copy()
    first: dict[int, Any] = {}
    for p, ann_id in enumerate(ids.tolist()):
        if not repeated[p] and ann_id not in first:
            first[ann_id] = entries[p]
    copies = np.zeros(len(ids), dtype=bool)
    for p in np.flatnonzero(repeated).tolist():
        copies[p] = entries[p] == first.get(int(ids[p]))
    return copies, repeated & ~copies


def _area(ann: dict[str, Any], width: int, height: int) -> float:
    """COCO's area: a mask's pixel count when there is a segmentation, else the box's area."""
    seg = ann.get("segmentation")
    if seg:
        from pycocotools import (
            mask as mask_utils,  # C extension, no torch; needed only here
        )

        try:
            rle = mask_utils.frPyObjects(seg, height, width)
            return float(mask_utils.area(mask_utils.merge(rle) if isinstance(rle, list) else rle))
        except (TypeError, ValueError, KeyError, IndexError):
            pass  # a malformed segmentation: fall back to the box
    return float(ann["bbox"][2] * ann["bbox"][3])


def write_fixed(found: Analysis, out: str | Path, examples: int = 3) -> tuple[list[Change], CheckReport]:
    """Write the cleaned copy of ``found`` to ``out`` and every change, with all the ids it
    touched, to ``<out stem>.changes.json`` beside it (both atomically); return the changes and
    the check of the cleaned copy (image files are not opened again)."""
    start = time.perf_counter()
    fixed, changes = fix_coco(found)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, fixed, indent=None, sort_keys=False)
    write_json_atomic(changes_path(out), [asdict(change) for change in changes], indent=None, sort_keys=False)
    known = {found.data["images"][p]["file_name"]: info for p, info in found.files.items()}
    img_dir = found.img_dir if found.files_checked else None
    after = analyse(fixed, img_dir, found.tolerance, files=known, exif=found.exif)
    return changes, report(after, str(out), time.perf_counter() - start, examples)


def changes_path(out: str | Path) -> Path:
    """Where :func:`write_fixed` lists its changes: ``clean.json`` -> ``clean.changes.json``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.changes.json")
