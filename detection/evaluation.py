"""COCO evaluation (pycocotools' COCOeval, or faster-coco-eval with the same numbers), and the
predictions it reads.

:func:`evaluate_coco` returns the 12 standard COCOeval numbers per IoU type under fixed names
(``bbox_mAP``, ``bbox_mAP_50``, ..., ``segm_AR_l``), exactly the values COCOeval's ``stats``
holds, less the "absent" ones (COCOeval's ``-1``: no ground truth in that area range, e.g.
``bbox_mAP_l`` on small images; left out, never a value of -1), plus per-class AP
(``bbox_AP/<class name>``) when asked; classes without ground truth are left out of the
per-class numbers. COCOeval's prints go to this module's logger at DEBUG. ``eval.engine`` picks
the engine (:mod:`detection.coco_engines`).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import math
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from cluster.errors import ConfigError, DataError
from cluster.files import atomic_write

log = logging.getLogger(__name__)

#: Names of COCOeval's 12 ``stats`` entries, in order; a metric is ``f"{iou_type}_{name}"``.
STAT_NAMES: tuple[str, ...] = (
    "mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l",
    "AR_1", "AR_10", "AR_100", "AR_s", "AR_m", "AR_l",
)
IOU_TYPES = ("bbox", "segm")
#: COCOeval's value for "absent" (no ground truth in that area range): left out of the metrics,
#: so that it is never logged or averaged as a score; tables show it as "–".
ABSENT = -1.0


def load_ground_truth(ann_file: str) -> Any:
    """A pycocotools ``COCO`` of ``ann_file`` without its prints (and without torch), e.g. for
    scoring predictions written earlier. Training code uses ``CocoDetection.coco`` instead
    (the cleaned, class-subset ground truth)."""
    from pycocotools.coco import COCO

    if not os.path.isfile(ann_file):
        raise DataError(f"annotation file {ann_file} does not exist")
    buffer = io.StringIO()
    try:
        # Read here, not by COCO(path): Windows tools write a BOM, which json.load refuses.
        with open(ann_file, encoding="utf-8-sig") as handle:
            data = json.load(handle)
        with contextlib.redirect_stdout(buffer):
            coco = COCO()
            coco.dataset = data
            coco.createIndex()
    except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise DataError(f"{ann_file}: not a readable COCO annotation file: {err}") from err
    log.debug("pycocotools: %s", buffer.getvalue().strip())
    return coco


def evaluate_coco(
    coco_gt: Any,
    predictions: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = ("bbox",),
    classwise: bool = False,
    class_names: Optional[Mapping[int, str]] = None,
    engine: str = "auto",
) -> dict[str, float]:
    """COCOeval of ``predictions`` (COCO result dicts) against ``coco_gt`` (a pycocotools COCO).

    Args:
        coco_gt: ground truth, e.g. ``CocoDetection.coco``.
        predictions: ``{"image_id", "category_id", "bbox" (xywh), "score"[, "segmentation"]}``
            with original COCO category ids (see :func:`predictions_to_coco`). Not modified.
        iou_types: ``"bbox"`` and/or ``"segm"``.
        classwise: add ``<iou_type>_AP/<class name>`` (AP at IoU .50:.95, all areas, 100 dets).
        class_names: category id -> display name; default: the names in ``coco_gt``.
        engine: ``eval.engine``: ``"auto"`` (faster-coco-eval when installed), ``"faster"`` or
            ``"pycocotools"``; both give the same numbers (:mod:`detection.coco_engines`).

    Only the categories of ``coco_gt`` are scored (predictions of other categories are ignored),
    on all of its images. Empty predictions give 0 for every number (left out where there is no
    ground truth).
    """
    from detection.coco_engines import resolve_engine, score

    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ConfigError(f"eval.metric: {unknown} not supported; use {list(IOU_TYPES)}")
    engine = resolve_engine(engine)
    known_images = set(coco_gt.getImgIds())
    stray = sorted({int(p["image_id"]) for p in predictions} - known_images)
    if stray:
        raise DataError(
            f"predictions name {len(stray)} image id(s) not in the ground truth (first: {stray[0]}); "
            "evaluate against the annotation file the predictions were made on"
        )
    if "segm" in iou_types and any("segmentation" not in p for p in predictions):
        raise ConfigError("eval.metric includes segm but the predictions have no masks; use a mask model or metric [bbox]")
    names = dict(class_names) if class_names is not None else {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        with _gc_paused():
            scores = score(engine, coco_gt, predictions, iou_type)
        log.debug("COCOeval %s (%s):\n%s", iou_type, engine, scores.summary)
        for name, value in zip(STAT_NAMES, scores.stats):
            if value != ABSENT:  # no ground truth in that range: no number, not a score of -1
                metrics[f"{iou_type}_{name}"] = value
        if classwise:
            metrics.update(_per_class_ap(scores, iou_type, names))
    return metrics


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: an evaluation makes a million small dicts and lists
    that live until it ends, and each automatic collection walks all of them (measured: half
    the time of faster-coco-eval's run on 500,000 detections). Reference counting still frees
    everything; the collector runs again afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _per_class_ap(scores: Any, iou_type: str, names: Mapping[int, str]) -> dict[str, float]:
    """AP per category from the precision array [iou, recall, class, area, max dets]."""
    precision = scores.precision
    result = {}
    for k, cat_id in enumerate(scores.cat_ids):
        values = precision[:, :, k, 0, -1]  # all IoUs and recalls, area "all", maxDets 100
        values = values[values > -1]
        if values.size:  # -1 everywhere = no ground truth of this class: no AP to report
            result[f"{iou_type}_AP/{names.get(cat_id, str(cat_id))}"] = float(np.mean(values))
    return result


def predictions_to_coco(
    outputs: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int],
    with_masks: bool = False,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """torchvision detector outputs -> JSON-serialisable COCO result dicts.

    ``outputs[i]`` (``boxes`` xyxy, ``scores``, ``labels``[, ``masks`` ``[N, 1, H, W]``
    probabilities]) belongs to ``image_ids[i]`` (an int or a scalar tensor). Boxes become xywh,
    labels become COCO category ids, masks become RLE (thresholded at ``mask_threshold``).
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"predictions_to_coco: {len(outputs)} outputs for {len(image_ids)} image ids")
    results: list[dict[str, Any]] = []
    for output, image_id in zip(outputs, image_ids):
        boxes = _numpy(output["boxes"]).reshape(-1, 4).astype(np.float64)
        scores = _numpy(output["scores"]).reshape(-1)
        labels = _numpy(output["labels"]).reshape(-1)
        rles = _encode_masks(output["masks"], mask_threshold) if with_masks else None
        for i in range(len(scores)):
            label = int(labels[i])
            if label not in label_to_cat_id:
                raise DataError(
                    f"the model predicted label {label} but the dataset has labels 1..{len(label_to_cat_id)}; "
                    "the model's num_classes does not match the data (check model.weights / runtime.load_from)"
                )
            x0, y0, x1, y1 = boxes[i]
            result = {
                "image_id": int(image_id),
                "category_id": int(label_to_cat_id[label]),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "score": float(scores[i]),
            }
            if rles is not None:
                result["segmentation"] = rles[i]
            results.append(result)
    return results


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _encode_masks(masks: Any, threshold: float) -> list[dict[str, Any]]:
    """``[N, 1, H, W]`` (or ``[N, H, W]``) probabilities -> RLE dicts with str counts."""
    from pycocotools import mask as mask_util

    array = _numpy(masks)
    if array.ndim == 4:
        array = array[:, 0]
    binary = np.asfortranarray((array > threshold).transpose(1, 2, 0).astype(np.uint8))
    rles = mask_util.encode(binary) if array.shape[0] else []
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]


def gather_predictions(preds: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """All ranks' predictions on every rank, one copy per image, sorted by image id.

    Uses ``torch.distributed.all_gather_object`` when a process group is running and
    ``world_size > 1``; otherwise returns ``preds`` sorted. An image predicted on two ranks
    (padding) keeps the predictions of the lowest rank.
    """
    per_rank = [preds]
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            per_rank = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, preds)
    merged: list[dict[str, Any]] = []
    owner: dict[int, int] = {}
    for rank, rank_preds in enumerate(per_rank):
        for pred in rank_preds or []:
            image_id = int(pred["image_id"])
            if owner.setdefault(image_id, rank) == rank:
                merged.append(pred)
    merged.sort(key=lambda p: int(p["image_id"]))  # stable: keeps each image's own order
    return merged


def write_predictions(path: str, preds: Sequence[Mapping[str, Any]]) -> str:
    """Write COCO result dicts as JSON, atomically (temporary file + rename); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(list(preds), handle)
    return path


def per_class_table(metrics: Mapping[str, float]) -> str:
    """A markdown table of the per-class AP in ``metrics`` (one column per IoU type)."""
    columns = [t for t in IOU_TYPES if any(k.startswith(f"{t}_AP/") for k in metrics)]
    classes: list[str] = []
    for key in metrics:
        for iou_type in columns:
            prefix = f"{iou_type}_AP/"
            if key.startswith(prefix) and key[len(prefix):] not in classes:
                classes.append(key[len(prefix):])
    if not columns:
        return "(no per-class AP: set eval.classwise: true)\n"
    lines = ["| class | " + " | ".join(f"{t} AP" for t in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name in classes:
        cells = []
        for iou_type in columns:
            value = metrics.get(f"{iou_type}_AP/{name}")
            cells.append("-" if value is None or math.isnan(value) else f"{value:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def predict(model: Any, loader: Any, device: Any, dataset: Any, with_masks: bool = False) -> list[dict[str, Any]]:
    """COCO result dicts of ``model`` on every batch of ``loader`` (this rank's shard).

    The evaluation dataset is not resized (the detector resizes internally and maps its boxes
    back to the input size), so boxes are in original image coordinates.
    """
    import torch  # here, not at the top: scoring saved predictions needs no torch

    was_training = model.training
    model.eval()
    preds: list[dict[str, Any]] = []
    try:
        with torch.inference_mode():
            for images, targets in loader:
                outputs = model([img.to(device, non_blocking=True) for img in images])
                ids = [int(t["image_id"]) for t in targets]
                preds.extend(predictions_to_coco(outputs, ids, dataset.label_to_cat_id, with_masks=with_masks))
    finally:
        model.train(was_training)
    return preds


def evaluate_model(
    model: Any, loader: Any, dataset: Any, device: Any, *, iou_types: Sequence[str] = ("bbox",),
    classwise: bool = False, world_size: int = 1, rank: int = 0, predictions_path: Optional[str] = None,
    with_masks: bool = False, engine: str = "auto",
) -> dict[str, float]:
    """Predict on every rank, gather, evaluate on rank 0 with ``engine`` (writing
    ``predictions_path``), and return the metrics on every rank (``world_size > 1`` needs a
    running process group)."""
    preds = gather_predictions(predict(model, loader, device, dataset, with_masks), world_size)
    metrics: dict[str, float] = {}
    if rank == 0:
        if predictions_path:
            write_predictions(predictions_path, preds)
        metrics = evaluate_coco(dataset.coco, preds, iou_types=tuple(iou_types), classwise=classwise, engine=engine)
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
    return metrics
