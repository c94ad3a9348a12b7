"""Which classes a checkpoint predicts: names and the dataset's original COCO category ids.

The label map is the training set's (:class:`detection.data.coco.CocoDetection`: the categories of
``data.train.ann_file`` in category-id order, narrowed to ``data.train.classes``), read from the
annotation file alone (no image is opened), or, when that file is not on this machine, from the
checkpoint (orch stores ``classes`` in checkpoints; :func:`detection.checkpoint.read_classes`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from cluster.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassMap:
    """Class ``names`` and COCO ``cat_ids`` in label order (label ``i + 1`` is ``names[i]``)."""

    names: tuple[str, ...]
    cat_ids: tuple[int, ...]
    source: str  # where they were read, for messages

    @property
    def label_to_cat_id(self) -> dict[int, int]:
        """Label (1..K) -> COCO category id, as :func:`detection.evaluation.predictions_to_coco` takes it."""
        return {i + 1: cat_id for i, cat_id in enumerate(self.cat_ids)}

    @property
    def num_classes(self) -> int:
        """Classes including the background (torchvision's ``num_classes``)."""
        return len(self.names) + 1

    @property
    def categories(self) -> list[dict[str, Any]]:
        """``[{"id", "name"}, ...]`` as in a COCO file's ``categories``."""
        return [{"id": cat_id, "name": name} for cat_id, name in zip(self.cat_ids, self.names)]


def class_map_from_ann(ann_file: str, classes: Optional[tuple[str, ...]] = None) -> ClassMap:
    """The training label map of ``ann_file`` narrowed to ``classes`` (``data.train.classes``)."""
    from detection.data.coco import load_coco_json

    cats = sorted(load_coco_json(ann_file)["categories"], key=lambda c: c["id"])
    if classes is not None:
        unknown = [name for name in classes if name not in {c["name"] for c in cats}]
        if unknown or not classes:
            raise DataError(f"data.train.classes: {list(unknown or classes)} not in {ann_file}; "
                            f"valid names: {', '.join(c['name'] for c in cats)}")
        cats = [c for c in cats if c["name"] in set(classes)]
    if not cats:
        raise DataError(f"{ann_file}: 'categories' is empty; a COCO file lists its categories")
    return ClassMap(tuple(c["name"] for c in cats), tuple(c["id"] for c in cats), ann_file)


def resolve_class_map(config: Any, checkpoint: str) -> ClassMap:
    """The label map of ``checkpoint`` for experiment ``config``: from ``data.train.ann_file``
    when the file exists here, else from the checkpoint. ConfigError when the checkpoint was
    trained on another number of classes; a warning when only names or ids differ."""
    from detection.checkpoint import read_classes

    train = config.data.train
    stored = read_classes(checkpoint)
    if train.ann_file and os.path.isfile(train.ann_file):
        classes = class_map_from_ann(train.ann_file, train.classes)
        if stored is not None and len(stored[0]) != len(classes.names):
            raise ConfigError(
                f"--checkpoint {checkpoint} was trained on {len(stored[0])} classes ({_names(stored[0])}) but "
                f"data.train.ann_file {train.ann_file} gives {len(classes.names)} ({_names(classes.names)}); "
                "use the experiment the checkpoint was trained with"
            )
        if stored is not None and stored != (classes.names, classes.cat_ids):
            log.warning("--checkpoint %s names its classes %s (ids %s); %s names them %s (ids %s): using the latter",
                        checkpoint, list(stored[0]), list(stored[1]), train.ann_file,
                        list(classes.names), list(classes.cat_ids))
        return classes
    if stored is not None:
        log.info("class names from %s (data.train.ann_file %s is not here)", checkpoint, train.ann_file or "unset")
        return ClassMap(stored[0], stored[1], checkpoint)
    raise DataError(
        f"data.train.ann_file {train.ann_file or '(unset)'} is not on this machine and --checkpoint {checkpoint} "
        "does not name its classes (saved by an older orch); copy the training annotation file here or point "
        "--set data.train.ann_file=PATH at it"
    )


def read_image_info(path: str, classes: ClassMap) -> dict[str, int]:
    """``file_name -> image id`` of a COCO image-info file (``images`` and ``categories``, such
    as COCO's ``image_info_test-dev2017.json``); DataError when it is unreadable or its
    categories lack one of the training category ids (a server would reject those results)."""
    from detection.data.coco import load_coco_json

    info = load_coco_json(path)
    known = {c["id"] for c in info["categories"]}
    missing = [c for c in classes.cat_ids if c not in known]
    if missing:
        raise DataError(f"--image-info {path}: category ids {missing} of the training data ({classes.source}) "
                        "are not in its 'categories'; results must use the server's category ids")
    ids: dict[str, int] = {}
    for image in info["images"]:
        if not (isinstance(image, dict) and isinstance(image.get("id"), int) and isinstance(image.get("file_name"), str)):
            raise DataError(f"--image-info {path}: image entry {str(image)[:80]} needs an integer id and a file_name")
        ids[image["file_name"]] = image["id"]
    if not ids:
        raise DataError(f"--image-info {path}: 'images' is empty")
    return ids


def _names(names: tuple[str, ...], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "")
