"""The two COCOeval engines behind :func:`detection.evaluation.evaluate_coco`.

- ``pycocotools``: the reference (``COCO.loadRes`` + ``COCOeval``), pure Python per image and
  category; about a minute for 5000 images and 500,000 detections.
- ``faster``: faster-coco-eval's ``COCOeval_faster`` (matching and accumulation in C++), with the
  same numbers: the same greedy matching, stable score sort and 101-point interpolation, so the 12
  stats and the precision array equal pycocotools' (checked in ``tests/detection/test_coco_engine.py``).

``eval.engine: auto`` (the default) takes ``faster`` when faster-coco-eval is importable, else
``pycocotools`` after one warning. Both engines return a :class:`CocoScores`.

On the faster path the detections are not loaded with ``loadRes``: for a box it draws a polygon
per detection that box evaluation never reads, and in pycocotools it is a pure-Python loop too.
We build the result set directly with exactly the fields ``loadRes`` would give
(``id`` = position + 1, ``area`` = w * h for boxes or the mask area for masks, ``iscrowd`` = 0),
one small dict per detection, which is all the evaluator reads.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from cluster.errors import ConfigError

log = logging.getLogger(__name__)

#: Valid values of ``eval.engine``.
ENGINES: tuple[str, ...] = ("auto", "faster", "pycocotools")
_warned_fallback = False


@dataclass(frozen=True)
class CocoScores:
    """What one COCOeval run of one IoU type gives."""

    stats: tuple[float, ...]  # COCOeval's 12 summary numbers, in its order
    precision: np.ndarray  # [iou thr, recall thr, category, area range, max dets]; -1 = no ground truth
    cat_ids: tuple[int, ...]  # category id of each index of precision's category axis
    summary: str  # the evaluator's printed summary, for the debug log


def resolve_engine(engine: str) -> str:
    """``"faster"`` or ``"pycocotools"`` for an ``eval.engine`` value.

    ``auto`` falls back to pycocotools (with one warning per process) when faster-coco-eval is
    not installed; asking for ``faster`` without it is a :class:`ConfigError`.
    """
    global _warned_fallback
    if engine not in ENGINES:
        raise ConfigError(f"eval.engine: {engine!r} is not valid; use one of {', '.join(ENGINES)}")
    if engine == "pycocotools":
        return engine
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        if engine == "faster":
            raise ConfigError("eval.engine: faster needs the faster-coco-eval package; "
                              "pip install faster-coco-eval, or set eval.engine: pycocotools") from None
        if not _warned_fallback:
            _warned_fallback = True
            log.warning("faster-coco-eval is not installed: COCO evaluation uses pycocotools, about 10x slower "
                        "(pip install faster-coco-eval, or set eval.engine: pycocotools to silence this)")
        return "pycocotools"
    return "faster"


def score(engine: str, coco_gt: Any, predictions: Sequence[Mapping[str, Any]], iou_type: str) -> CocoScores:
    """One COCOeval (``iou_type`` ``"bbox"`` or ``"segm"``) of ``predictions`` against
    ``coco_gt`` with a resolved ``engine``. ``predictions`` are not modified."""
    runner = _score_faster if engine == "faster" else _score_pycocotools
    return runner(coco_gt, predictions, iou_type)


# --- pycocotools (the reference) ----------------------------------------------------------------


def _score_pycocotools(coco_gt: Any, predictions: Sequence[Mapping[str, Any]], iou_type: str) -> CocoScores:
    from pycocotools.cocoeval import COCOeval

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_dt = _load_results(coco_gt, _results_for(predictions, iou_type))
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return CocoScores(stats=tuple(float(v) for v in evaluator.stats), precision=evaluator.eval["precision"],
                      cat_ids=tuple(int(c) for c in evaluator.params.catIds), summary=buffer.getvalue().rstrip())


def _results_for(predictions: Sequence[Mapping[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Copies of the predictions holding only what ``iou_type`` reads.

    Segmentation results must not carry a ``bbox``: ``COCO.loadRes`` would then take the area of
    the box, not of the mask, and put detections in the wrong area range (detectron2 drops it too).
    """
    if iou_type == "segm":
        return [{k: v for k, v in p.items() if k != "bbox"} for p in predictions]
    return [{k: v for k, v in p.items() if k != "segmentation"} for p in predictions]


def _load_results(coco_gt: Any, dets: list[dict[str, Any]]) -> Any:
    """``coco_gt.loadRes(dets)``; with no detections an empty result set (loadRes cannot take an
    empty list), which COCOeval scores as 0 recall and precision."""
    from pycocotools.coco import COCO

    if dets:
        return coco_gt.loadRes(dets)
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                       "annotations": []}
    coco_dt.createIndex()
    return coco_dt


# --- faster-coco-eval ---------------------------------------------------------------------------


def _score_faster(coco_gt: Any, predictions: Sequence[Mapping[str, Any]], iou_type: str) -> CocoScores:
    from faster_coco_eval import COCOeval_faster

    lines: list[str] = []
    gt = _faster_gt(coco_gt)
    evaluator = COCOeval_faster(gt, _faster_results(gt, predictions, iou_type), iouType=iou_type,
                                print_function=lambda *args: lines.append(" ".join(map(str, args))))
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return CocoScores(stats=tuple(float(v) for v in evaluator.stats[:12]), precision=evaluator.eval["precision"],
                      cat_ids=tuple(int(c) for c in evaluator.params.catIds), summary="\n".join(lines))


def _faster_gt(coco_gt: Any) -> Any:
    """A faster-coco-eval ``COCO`` of the ground truth in ``coco_gt`` (any object with a COCO
    ``dataset`` dict). The annotations are copied: the evaluator writes ``ignore`` and ``rle``
    into them, and the caller's ground truth (a training dataset's) must stay as it was."""
    from faster_coco_eval import COCO

    data = coco_gt.dataset
    gt = COCO()
    gt.dataset = {**data, "annotations": [dict(ann) for ann in data.get("annotations", [])]}
    gt.createIndex()
    return gt


def _faster_results(gt: Any, predictions: Sequence[Mapping[str, Any]], iou_type: str) -> Any:
    """The result set ``gt.loadRes(predictions)`` would make, built in one pass (see the module
    docstring), without copying or modifying ``predictions``."""
    from faster_coco_eval import COCO
    from faster_coco_eval.core import mask as mask_util

    if iou_type == "segm":
        anns = [{"id": i, "image_id": p["image_id"], "category_id": p["category_id"], "score": p["score"],
                 "segmentation": p["segmentation"], "iscrowd": 0} for i, p in enumerate(predictions, 1)]
        if anns:  # one vectorised call: loadRes takes each mask's area the same way, one by one
            areas = mask_util.area([ann["segmentation"] for ann in anns])
            for ann, area in zip(anns, areas.tolist()):
                ann["area"] = area
    else:
        anns = [{"id": i, "image_id": p["image_id"], "category_id": p["category_id"], "score": p["score"],
                 "bbox": (box := p["bbox"]), "area": box[2] * box[3], "iscrowd": 0}
                for i, p in enumerate(predictions, 1)]
    result = COCO()
    result.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": anns}
    result.createIndex()
    return result
