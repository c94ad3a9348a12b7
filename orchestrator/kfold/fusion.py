"""Box fusion of several models' COCO results, image by image, with ``ensemble-boxes``.

A *member* is one model's results under one TTA view (``fold-2``, ``fold-2 hflip``); members are
fused per image with :func:`ensemble_boxes.weighted_boxes_fusion` (WBF: overlapping boxes of a
class become one box, their coordinates averaged weighted by score), :func:`ensemble_boxes.nms`
or :func:`ensemble_boxes.soft_nms` (gaussian). The library wants, per image, one list per member
of boxes normalised to [0, 1] (xyxy); here boxes are clipped to the image and zero-area boxes
dropped first, so it never warns or "fixes" anything behind our back.

Each member enters with its :data:`MAX_PER_IMAGE` best boxes per image, and the fused result keeps
as many: the ``max_per_img`` of MMDetection's and detectron2's test settings. WBF's cost grows
faster than linearly with the boxes of an image, and the boxes beyond a model's best 100 on an
image are the ones that least change its AP. Pure numpy: no torch.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from cluster.errors import ConfigError

METHODS = ("wbf", "nms", "soft-nms")
CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")
MAX_PER_IMAGE = 100


@dataclass(frozen=True)
class FusionSettings:
    """How members are fused. ``skip_thr``: boxes scoring below it are dropped first (every
    method); ``iou_thr``: overlap at which two boxes are the same object (WBF, NMS);
    ``conf_type``: WBF's fused score; ``sigma``: soft-NMS's gaussian width."""

    method: str = "wbf"
    iou_thr: float = 0.55
    skip_thr: float = 0.0
    conf_type: str = "avg"
    sigma: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        if self.conf_type not in CONF_TYPES:
            raise ConfigError(f"conf_type {self.conf_type}: choose one of {', '.join(CONF_TYPES)}")

    def params(self) -> dict[str, Any]:
        """The settings that matter for this method (what is logged and printed)."""
        used = {"wbf": ("iou_thr", "skip_thr", "conf_type"), "nms": ("iou_thr", "skip_thr"),
                "soft-nms": ("sigma", "skip_thr")}[self.method]
        return {"method": self.method, **{k: v for k, v in asdict(self).items() if k in used}}


class Boxes(NamedTuple):
    """One image's detections: ``boxes`` xyxy in pixels ``[n, 4]``, ``scores`` ``[n]``,
    ``labels`` (COCO category ids) ``[n]``."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


EMPTY = Boxes(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))


def _top(b: Boxes, limit: int = MAX_PER_IMAGE) -> Boxes:
    """The ``limit`` best-scoring boxes, sorted by score."""
    order = np.argsort(-b.scores, kind="stable")[:limit]
    return Boxes(b.boxes[order], b.scores[order], b.labels[order])


def index_results(results: Sequence[Mapping[str, Any]]) -> dict[int, Boxes]:
    """COCO result dicts (``bbox`` xywh) grouped by image id, as :class:`Boxes` (xyxy)."""
    grouped: dict[int, list[Mapping[str, Any]]] = {}
    for r in results:
        grouped.setdefault(int(r["image_id"]), []).append(r)
    out = {}
    for image_id, rows in grouped.items():
        xywh = np.array([r["bbox"] for r in rows], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        out[image_id] = _top(Boxes(boxes, np.array([r["score"] for r in rows], dtype=np.float64),
                                             np.array([r["category_id"] for r in rows], dtype=np.int64)))
    return out


def to_results(image_id: int, b: Boxes) -> list[dict[str, Any]]:
    """:class:`Boxes` of one image as COCO result dicts."""
    return [{"image_id": int(image_id), "category_id": int(label), "score": float(score),
             "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}
            for (x0, y0, x1, y1), score, label in zip(b.boxes, b.scores, b.labels)]


def _normalised(b: Boxes, width: int, height: int, skip_thr: float) -> Boxes:
    scale = np.array([width, height, width, height], dtype=np.float64)
    boxes = np.clip(b.boxes / scale, 0.0, 1.0)
    keep = (b.scores >= skip_thr) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return Boxes(boxes[keep], b.scores[keep], b.labels[keep])


def fuse_image(members: Sequence[Boxes], weights: Sequence[float], width: int, height: int,
               settings: FusionSettings) -> Boxes:
    """Fuse one image's members (pixel boxes) into one set of boxes (pixels)."""
    from ensemble_boxes import nms, soft_nms, weighted_boxes_fusion

    parts = [_normalised(m, width, height, settings.skip_thr) for m in members]
    if not any(len(p.scores) for p in parts):
        return EMPTY
    boxes = [p.boxes for p in parts]
    scores = [p.scores for p in parts]
    labels = [p.labels for p in parts]
    # the library prints (never logs) what it repairs; our inputs need no repair
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if settings.method == "wbf":
            out = weighted_boxes_fusion(boxes, scores, labels, weights=list(weights), iou_thr=settings.iou_thr,
                                        skip_box_thr=settings.skip_thr, conf_type=settings.conf_type)
        elif settings.method == "nms":
            out = nms(boxes, scores, labels, weights=list(weights), iou_thr=settings.iou_thr)
        else:
            out = soft_nms(boxes, scores, labels, weights=list(weights), sigma=settings.sigma,
                           thresh=max(settings.skip_thr, 1e-3))
    fused_boxes, fused_scores, fused_labels = (np.asarray(a) for a in out)
    scale = np.array([width, height, width, height], dtype=np.float64)
    return _top(Boxes(fused_boxes.reshape(-1, 4) * scale, fused_scores.astype(np.float64),
                                fused_labels.astype(np.int64)))


def fuse(members: Sequence[Mapping[int, Boxes]], weights: Sequence[float], sizes: Mapping[int, tuple[int, int]],
         settings: FusionSettings) -> list[dict[str, Any]]:
    """Fuse ``members`` (each: image id -> :class:`Boxes`; an image a member has no boxes for
    counts as predicted empty) on every image of ``sizes`` (image id -> ``(width, height)``);
    returns COCO result dicts sorted by image id."""
    if len(weights) != len(members):
        raise ValueError(f"fuse: {len(weights)} weights for {len(members)} members")
    results: list[dict[str, Any]] = []
    for image_id in sorted(sizes):
        width, height = sizes[image_id]
        fused = fuse_image([m.get(image_id, EMPTY) for m in members], weights, width, height, settings)
        results.extend(to_results(image_id, fused))
    return results
