"""A fold model's predictions on the images of a COCO file, per TTA view, cached on disk.

Used by the held-out test evaluation at the end of a set (:mod:`orchestrator.kfold.heldout`) and
by ``orch ensemble`` (:mod:`orchestrator.kfold.ensemble`). A cache file holds the results of
every view and the decoded size of every image, under a key made of the checkpoint (path, size,
modification time), the annotation file's sha256, the image folder and the views: running again
with the same inputs (another fusion method, say) predicts nothing twice; a retrained fold or an
edited annotation file predicts again.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from cluster.errors import DataError
from cluster.files import read_json, write_json_atomic
from orchestrator.kfold.split import file_sha256

POINTER = "last_checkpoint"


@dataclass(frozen=True)
class ViewPredictions:
    """COCO results of one model on one image set: ``views[view]`` lists result dicts; ``sizes``
    maps image id -> ``(width, height)``."""

    views: dict[str, list[dict[str, Any]]]
    sizes: dict[int, tuple[int, int]]


def fold_checkpoint(output_dir: os.PathLike | str, save_best: Optional[str]) -> Path:
    """The checkpoint a fold is judged by: ``checkpoints/best_<metric>.pth`` (``checkpoint.save_best``)
    when it exists, else the newest one (``checkpoints/last_checkpoint``). DataError when the fold
    left neither."""
    folder = Path(output_dir) / "checkpoints"
    if save_best:
        best = folder / f"best_{re.sub(r'[^A-Za-z0-9_.-]', '_', save_best)}.pth"
        if best.is_file():
            return best
    pointer = folder / POINTER
    if pointer.is_file():
        last = folder / pointer.read_text().strip()
        if last.is_file():
            return last
    raise DataError(f"{folder} holds no best_<metric>.pth and no last_checkpoint; the fold did not save a "
                    "checkpoint (checkpoint.interval / checkpoint.save_best), retrain it with orch kfold")


def image_list(ann_file: str, img_dir: str) -> list[tuple[str, int]]:
    """``(path, image id)`` of the images of ``ann_file``, sorted by id; DataError naming the first
    image missing under ``img_dir``."""
    from detection.data.coco import load_coco_json

    images = sorted((img["id"], img["file_name"]) for img in load_coco_json(ann_file)["images"])
    listed = [(os.path.join(img_dir, *name.split("/")), image_id) for image_id, name in images]
    missing = [path for path, _ in listed if not os.path.isfile(path)]
    if missing:
        raise DataError(f"{len(missing)} image(s) of {ann_file} are not under {img_dir} (first: {missing[0]}); "
                        "give the image folder of that file (--img-dir / kfold.test_img_dir)")
    return listed


def _key(checkpoint: Path, ann_file: str, img_dir: str, views: Sequence[str]) -> dict:
    stat = checkpoint.stat()
    return {"checkpoint": str(checkpoint.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "ann_sha256": file_sha256(Path(ann_file)), "img_dir": str(Path(img_dir).resolve()),
            "views": list(views)}


def predict_split(exp: Any, checkpoint: Path, ann_file: str, img_dir: str, views: Sequence[str], cache: Path,
                  device: Optional[str] = None, batch_size: int = 8) -> ViewPredictions:
    """The predictions of ``checkpoint`` (a fold of experiment ``exp``) on the images of
    ``ann_file`` under each of ``views``, from ``cache`` when its key matches, else predicted now
    and cached (written atomically)."""
    key = _key(checkpoint, ann_file, img_dir, views)
    cached = read_json(cache)
    if cached is not None and cached.get("key") == key:
        return ViewPredictions(cached["views"], {int(i): tuple(s) for i, s in cached["sizes"].items()})
    from detection.inference.model import load_predictor
    from detection.inference.tta import predict_views

    images = image_list(ann_file, img_dir)
    predictor = load_predictor(exp, str(checkpoint), device=device)
    views_out, sizes = predict_views(predictor, exp.data, images, views, batch_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache, {"key": key, "sizes": {str(i): list(s) for i, s in sizes.items()}, "views": views_out},
                      indent=None)
    return ViewPredictions(views_out, sizes)

