"""A COCO-format detection dataset (pycocotools), checked up front.

Category ids (in real COCO 1..90 with gaps) map to contiguous labels ``1..K``; label 0 is the
background, as torchvision's detectors expect. Everything that can be wrong with the data is
found when the dataset is built, in the main process, so a bad box never surfaces as a crash deep
inside a DataLoader worker: with ``on_bad_data="error"`` the first problem raises
:class:`DataError` naming the file, the image/annotation id and the option that skips it; with
``"skip"`` bad boxes and images are dropped, counted by reason in :attr:`CocoDetection.skipped`
and reported in one warning.

:attr:`CocoDetection.coco` is a pycocotools ``COCO`` of the *cleaned* data (class subset applied,
bad boxes and images dropped, boxes clipped), ready to be the ground truth of
:func:`detection.evaluation.evaluate_coco`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO

from cluster.errors import DataError
from detection.data.decode import read_image
from detection.data.transforms import image_to_float

log = logging.getLogger(__name__)

Transform = Callable[..., tuple[Any, dict[str, Any]]]


class CocoDetection(torch.utils.data.Dataset):
    """COCO detection dataset returning ``(image, target)``.

    ``image`` is what ``transforms`` makes of the decoded RGB image, a ``uint8 [3, H, W]`` tensor
    (:func:`detection.data.decode.read_image`; see :mod:`detection.data.transforms` and
    :mod:`detection.data.pipelines`), as float32 in 0..1 (as ``uint8`` when
    :attr:`float_images` is false: the loader's workers hand over uint8 and convert after). ``target`` holds tensors only
    (so ``{k: v.to(device)}`` works): ``boxes`` float32 ``[N, 4]`` xyxy, ``labels`` int64 ``[N]``
    (1..K), ``image_id`` int64 scalar (the COCO image id), ``area`` float32, ``iscrowd`` int64,
    ``orig_size`` int64 ``[2]`` (height, width in the file) and, with ``with_masks``, ``masks``
    uint8 ``[N, H, W]``.

    Args:
        ann_file: COCO instances JSON.
        img_dir: folder the images' ``file_name`` are relative to.
        classes: category names to keep (a subset); ``None`` keeps all.
        train: training mode drops crowd annotations from the targets (COCOeval still sees them
            in :attr:`coco`); evaluation mode keeps them with ``iscrowd = 1``.
        keep_empty: keep images that have no (non-crowd) annotation left.
        transforms: ``transforms(image, target, generator)`` -> ``(image, target)``.
        with_masks: also return instance masks (from polygons or RLE).
        on_bad_data: ``"error"`` or ``"skip"`` (see the module docstring).
        label_to_cat_id: use this label map (the training set's), so an evaluation split gets
            the same labels and class subset; its categories must be in this file too.
        exif: read images upright by their EXIF orientation (``data.exif: apply``), else in
            the stored frame; the JSON's width/height must be the sizes read.
    """

    def __init__(
        self,
        ann_file: str,
        img_dir: str,
        classes: Optional[Sequence[str]] = None,
        train: bool = True,
        keep_empty: bool = False,
        transforms: Optional[Transform] = None,
        with_masks: bool = False,
        on_bad_data: str = "error",
        label_to_cat_id: Optional[dict[int, int]] = None,
        exif: bool = True,
    ) -> None:
        if on_bad_data not in ("error", "skip"):
            raise DataError(f"data.on_bad_data: {on_bad_data!r} is not valid; use 'error' or 'skip'")
        self.ann_file = ann_file
        self.img_dir = img_dir
        self.train = train
        self.transforms = transforms
        self.with_masks = with_masks
        self.exif = exif
        #: Hand out float images in 0..1 (else uint8 as the transforms leave them).
        self.float_images = True

        raw = load_coco_json(ann_file)
        all_cats = sorted(raw["categories"], key=lambda c: c["id"])
        if label_to_cat_id is None:
            cats = _select_classes(all_cats, classes, ann_file)
        else:
            cats = _same_classes(all_cats, label_to_cat_id, classes, ann_file)
        #: Label (1..K) -> COCO category id, and back. Label 0 is the background.
        self.label_to_cat_id: dict[int, int] = {i + 1: c["id"] for i, c in enumerate(cats)}
        self.cat_id_to_label: dict[int, int] = {c: label for label, c in self.label_to_cat_id.items()}
        #: Class names in label order: ``class_names[label - 1]``.
        self.class_names: tuple[str, ...] = tuple(c["name"] for c in cats)

        clean, skipped = check_annotations(
            raw, ann_file, img_dir, {c["id"] for c in all_cats}, set(self.cat_id_to_label),
            on_bad_data, with_masks,
        )
        #: Bad boxes/images dropped with ``on_bad_data="skip"``, counted by reason.
        self.skipped: dict[str, int] = dict(skipped)
        if skipped:
            summary = ", ".join(f"{reason}={n}" for reason, n in sorted(skipped.items()))
            log.warning("%s: skipped bad data (data.on_bad_data=skip): %s", ann_file, summary)

        clean["categories"] = cats
        self.coco = quiet_coco(clean)
        self._images = {img["id"]: img for img in clean["images"]}
        self._anns: dict[int, list[dict[str, Any]]] = {i: [] for i in self._images}
        for ann in clean["annotations"]:
            if train and ann.get("iscrowd", 0):
                continue  # crowd regions are not objects to learn; COCOeval ignores them itself
            self._anns[ann["image_id"]].append(ann)
        ids = sorted(self._images)
        if not keep_empty:
            ids = [i for i in ids if self._anns[i]]
        #: COCO image ids in dataset order (index -> image id).
        self.ids: list[int] = ids
        if not ids:
            hint = "" if keep_empty else " (images without annotations are dropped: data.keep_empty=false)"
            raise DataError(f"{ann_file}: no usable images left{hint}; check the file and data.train.classes")

    @property
    def num_classes(self) -> int:
        """Number of classes including the background (torchvision's ``num_classes``)."""
        return len(self.class_names) + 1

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """``(width, height)`` of each image from the JSON (no file is opened)."""
        return [(self._images[i]["width"], self._images[i]["height"]) for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """``dataset[index]``, or ``dataset[(index, seed)]`` as yielded by the samplers of
        :mod:`detection.data.samplers`: the seed makes this sample's random transforms
        independent of worker count and of where an epoch was resumed."""
        if isinstance(key, tuple):
            index, seed = key
            generator = torch.Generator().manual_seed(int(seed))
        else:
            index, generator = key, None
        image_id = self.ids[index]
        info = self._images[image_id]
        image = self._load_image(info)
        target = self._target(info)
        if self.transforms is not None:
            image, target = self.transforms(image, target, generator)
        return (image_to_float(image) if self.float_images else image), target

    def annotation_count(self, index: int) -> int:
        """Number of (training: non-crowd) annotations of image ``index`` before any transform."""
        return len(self._anns[self.ids[index]])

    def _load_image(self, info: dict[str, Any]) -> torch.Tensor:
        path = info["path"]
        try:
            image = read_image(path, self.exif)
        except OSError as err:
            raise DataError(f"{path}: cannot read image {info['id']} of {self.ann_file}: {err}") from err
        height, width = image.shape[-2:]
        if (width, height) != (info["width"], info["height"]):
            turned = (height, width) == (info["width"], info["height"])
            how = ("read upright by its EXIF orientation (data.exif=apply)" if self.exif else
                   "read in its stored frame (data.exif=ignore)")
            hint = ("the file has the other frame's size: run orch data check --fix on it, or set "
                    f"data.exif={'ignore' if self.exif else 'apply'} if its boxes are in that frame"
                    if turned else "fix the width/height in the file (orch data check --fix)")
            raise DataError(
                f"{path}: image {info['id']} is {width}x{height} but {self.ann_file} "
                f"says {info['width']}x{info['height']} ({how}); {hint}"
            )
        return image

    def _target(self, info: dict[str, Any]) -> dict[str, torch.Tensor]:
        anns = self._anns[info["id"]]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy (already clipped to the image)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(info["id"], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "orig_size": torch.tensor([info["height"], info["width"]], dtype=torch.int64),
        }
        if self.with_masks:
            masks = [self.coco.annToMask(a) for a in anns]
            shape = (len(masks), info["height"], info["width"])
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(shape, dtype=torch.uint8)
        return target


def _same_classes(
    cats: list[dict[str, Any]], label_to_cat_id: dict[int, int], classes: Optional[Sequence[str]], ann_file: str
) -> list[dict[str, Any]]:
    """The categories of a given label map, checked against this file (an evaluation split
    must label classes as the training split does)."""
    by_id = {c["id"]: c for c in cats}
    missing = [cat_id for cat_id in label_to_cat_id.values() if cat_id not in by_id]
    if missing:
        raise DataError(
            f"{ann_file}: category ids {missing} of the training data are not in this file's 'categories'; "
            "training and evaluation files must list the same categories"
        )
    chosen = [by_id[label_to_cat_id[label]] for label in sorted(label_to_cat_id)]
    if classes is not None and set(classes) != {c["name"] for c in chosen}:
        raise DataError(
            f"{ann_file}: classes {list(classes)} differ from the training classes "
            f"{[c['name'] for c in chosen]}; give evaluation splits the same classes or none"
        )
    return chosen


def _select_classes(
    cats: list[dict[str, Any]], classes: Optional[Sequence[str]], ann_file: str
) -> list[dict[str, Any]]:
    """The categories to train on, in category-id order; unknown names are a DataError."""
    if not cats:
        raise DataError(f"{ann_file}: 'categories' is empty; a COCO file lists its categories")
    names = {c["name"] for c in cats}
    if classes is None:
        return cats
    valid = ", ".join(c["name"] for c in cats)
    unknown = [name for name in classes if name not in names]
    if unknown:
        raise DataError(
            f"data classes: {', '.join(map(repr, unknown))} not in {ann_file}; valid names: {valid}"
        )
    if not classes:
        raise DataError(f"data classes: empty list; name at least one of: {valid}")
    wanted = set(classes)
    return [c for c in cats if c["name"] in wanted]



#: Pixels a box may reach outside its image before it is an error (``orch data check``'s default
#: ``--tolerance``): exports round coordinates; within it the box is clipped.
OUTSIDE_TOLERANCE = 1.0
SKIP_HINT = "fix the file, or set data.on_bad_data=skip to drop bad boxes and images (counted and logged)"


def load_coco_json(ann_file: str) -> dict[str, Any]:
    """Read and shape-check a COCO instances file; any problem is a one-line DataError."""
    if not os.path.isfile(ann_file):
        raise DataError(f"annotation file {ann_file} does not exist; check data.<split>.ann_file")
    try:
        with open(ann_file, encoding="utf-8-sig") as handle:  # -sig: Windows tools write a BOM
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{ann_file}: broken JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            "rewrite or re-export the annotation file"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{ann_file}: cannot read the annotation file: {err}") from err
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: expected a COCO object with 'images' and 'categories', got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{ann_file}: '{key}' is missing or not a list; this is not a COCO instances file")
    data.setdefault("annotations", [])  # image-info files (test-dev) have no annotations
    if not isinstance(data["annotations"], list):
        raise DataError(f"{ann_file}: 'annotations' is not a list")
    seen: set[int] = set()
    for cat in data["categories"]:
        if not (isinstance(cat, dict) and isinstance(cat.get("id"), int) and isinstance(cat.get("name"), str)):
            raise DataError(f"{ann_file}: category {cat!r} needs an integer 'id' and a string 'name'")
        if cat["id"] in seen:
            raise DataError(f"{ann_file}: category id {cat['id']} appears twice in 'categories'")
        seen.add(cat["id"])
    return data


def check_annotations(
    raw: dict[str, Any],
    ann_file: str,
    img_dir: str,
    all_cat_ids: set[int],
    keep_cat_ids: set[int],
    on_bad_data: str,
    with_masks: bool = False,
) -> tuple[dict[str, Any], Counter]:
    """Validate images and annotations; return the cleaned COCO dict and skip counts by reason.

    Images get a ``path``; boxes partly outside their image are clipped (beyond a pixel only with
    ``on_bad_data="skip"``: with ``"error"`` it is an error, as ``orch data check`` says); annotations of
    categories outside ``keep_cat_ids`` are left out (not bad); ``area`` and ``iscrowd`` get
    defaults because COCOeval needs both.
    """
    if not os.path.isdir(img_dir):
        raise DataError(f"image folder {img_dir} does not exist; check data.<split>.img_dir (for {ann_file})")
    skipped: Counter = Counter()

    def bad(reason: str, what: str) -> None:
        if on_bad_data == "error":
            raise DataError(f"{ann_file}: {what}; {SKIP_HINT}")
        skipped[reason] += 1

    images: dict[int, dict[str, Any]] = {}
    for img in raw["images"]:
        if not (isinstance(img, dict) and isinstance(img.get("id"), int) and isinstance(img.get("file_name"), str)
                and _positive_int(img.get("width")) and _positive_int(img.get("height"))):
            bad("invalid_image", f"image entry {_short(img)} needs integer id, file_name and positive width/height")
            continue
        if img["id"] in images:
            bad("invalid_image", f"image id {img['id']} appears twice")
            continue
        path = os.path.join(img_dir, img["file_name"])
        if not os.path.exists(path) or os.path.isdir(path):  # a pipe or device file is read like a file
            bad("missing_image", f"image {img['id']} file {path} does not exist")
            continue
        images[img["id"]] = {**img, "path": path}
    known_images = {img["id"] for img in raw["images"] if isinstance(img, dict)}

    annotations = []
    for ann in raw["annotations"]:
        checked = _check_annotation(ann, images, known_images, all_cat_ids, with_masks, on_bad_data == "error")
        if isinstance(checked, tuple):
            bad(*checked)
        elif checked is not None and checked["category_id"] in keep_cat_ids:
            annotations.append(checked)
    clean = {key: value for key, value in raw.items() if key not in ("images", "annotations")}
    clean["images"] = [images[i] for i in sorted(images)]
    clean["annotations"] = annotations
    return clean, skipped


def _check_annotation(
    ann: Any, images: dict[int, dict[str, Any]], known_images: set[int], all_cat_ids: set[int], with_masks: bool,
    strict: bool = False,
) -> Any:
    """The cleaned annotation, ``None`` (belongs to an image already skipped), or a
    ``(reason, message)`` pair when it is bad. ``strict`` (``on_bad_data=error``): a box partly
    outside its image beyond the tolerance is bad, as ``orch data check`` says; otherwise it is
    clipped."""
    bbox = ann.get("bbox") if isinstance(ann, dict) else None
    if not (isinstance(ann, dict) and "id" in ann and "image_id" in ann and "category_id" in ann
            and isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        return "invalid_annotation", f"annotation {_short(ann)} needs id, image_id, category_id and a bbox of 4 numbers"
    where = f"annotation {ann['id']} (image {ann['image_id']})"
    if ann["image_id"] not in images:
        if ann["image_id"] in known_images:
            return None  # its image was skipped already and counted there
        return "unknown_image", f"{where} refers to an image id that is not in 'images'"
    if ann["category_id"] not in all_cat_ids:
        return "unknown_category", f"{where} has category_id {ann['category_id']}, which is not in 'categories'"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return "zero_area_box", f"{where} has a zero or negative size box {bbox} (xywh)"
    img = images[ann["image_id"]]
    width, height = img["width"], img["height"]
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "box_outside_image", f"{where} box {bbox} (xywh) lies outside the {width}x{height} image"
    if with_masks and not ann.get("segmentation"):
        return "missing_segmentation", f"{where} has no segmentation, which mask training needs"
    if with_masks and not _valid_segmentation(ann["segmentation"], width, height):
        return "invalid_segmentation", f"{where} has a malformed segmentation (polygons or an RLE of the image size)"
    if strict and (x < -OUTSIDE_TOLERANCE or y < -OUTSIDE_TOLERANCE or x + w > width + OUTSIDE_TOLERANCE
                   or y + h > height + OUTSIDE_TOLERANCE):
        # What `orch data check` calls an error is one here too (on_bad_data=error): never clipped silently.
        return ("box_outside_image", f"{where} box {bbox} (xywh) reaches outside the {width}x{height} image by more "
                f"than {OUTSIDE_TOLERANCE:g} px (orch data check --fix writes a copy with it clipped)")
    # Partly outside within the tolerance (rounding), or on_bad_data=skip: clip to the image.
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    clean = {**ann, "bbox": [x0, y0, x1 - x0, y1 - y0]}
    clean.setdefault("area", (x1 - x0) * (y1 - y0))
    clean.setdefault("iscrowd", 0)
    return clean


def _valid_segmentation(seg: Any, width: int, height: int) -> bool:
    """Polygons (lists of >= 3 x,y pairs) or an RLE dict of this image's size; checked here
    because pycocotools would otherwise fail on it inside a DataLoader worker."""
    if isinstance(seg, list):
        return all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                   and all(isinstance(v, (int, float)) for v in p) for p in seg)
    if isinstance(seg, dict) and list(seg.get("size", [])) == [height, width]:
        counts = seg.get("counts")
        if isinstance(counts, list):  # uncompressed RLE: the runs must cover the image exactly
            return all(isinstance(c, int) and c >= 0 for c in counts) and sum(counts) == width * height
        return isinstance(counts, (str, bytes))
    return False


def quiet_coco(dataset: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` built from a dict, its index prints sent to the log at DEBUG."""
    coco = COCO()
    coco.dataset = dataset
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco.createIndex()
    if buffer.getvalue().strip():
        log.debug("pycocotools: %s", buffer.getvalue().strip())
    return coco


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
