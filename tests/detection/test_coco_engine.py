"""eval.engine: faster-coco-eval gives pycocotools' numbers on inputs that trip evaluators up.

Every comparison runs ``evaluate_coco`` once per engine on a fresh ground truth ``COCO`` (the
pycocotools path rewrites polygons as RLE inside it) and asserts the 12 numbers and every
per-class AP equal to 1e-9, per IoU type.
"""

from __future__ import annotations

import copy
import json
import logging
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from cluster.errors import ConfigError
from detection.coco_engines import ENGINES, resolve_engine
from detection.data.coco import quiet_coco
from detection.evaluation import ABSENT, STAT_NAMES, evaluate_coco
from detection.shapes import make_shapes

TOL = 1e-9
GAPPED = {1: 1, 2: 5, 3: 90}  # shapes' category ids -> gapped ids, as in real COCO


def _both(gt: dict, preds: list, iou_types=("bbox", "segm")) -> dict[str, dict[str, float]]:
    """evaluate_coco with each engine (classwise), checked equal; returns {engine: metrics}."""
    results = {}
    for engine in ("pycocotools", "faster"):
        results[engine] = evaluate_coco(quiet_coco(copy.deepcopy(gt)), preds, iou_types=iou_types,
                                        classwise=True, engine=engine)
    ref, fast = results["pycocotools"], results["faster"]
    assert set(fast) == set(ref)
    for iou_type in iou_types:
        assert [fast.get(f"{iou_type}_{n}", ABSENT) for n in STAT_NAMES] == pytest.approx(
            [ref.get(f"{iou_type}_{n}", ABSENT) for n in STAT_NAMES], abs=TOL), iou_type
    per_class = sorted(k for k in ref if "/" in k)
    assert [fast[k] for k in per_class] == pytest.approx([ref[k] for k in per_class], abs=TOL)
    return results


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths (zeros first) over the column-major pixels."""
    flat = mask.ravel(order="F")
    runs = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size]).tolist()
    rle = {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}
    assert (mask_util.decode(mask_util.frPyObjects(rle, *mask.shape)) == mask).all()
    return rle


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


@pytest.fixture(scope="module")
def tricky(tmp_path_factory) -> tuple[dict, list]:
    """Shapes ground truth made awkward, and predictions that exercise every rule of COCOeval.

    Ground truth: gapped category ids (1, 5, 90) plus one (42) without annotations; polygons,
    a two-part polygon, compressed RLE (str counts), crowd regions in uncompressed RLE; images
    without annotations; a 640x480 image with a large object (shapes are at most medium).
    Predictions: two jittered copies of every object (box and RLE mask), 10 % with a wrong
    class, scores rounded to 0.1 (ties everywhere); false positives; detections inside a crowd
    region; 150 detections on one image (the maxDets=100 cut); predictions of category 42 and of
    a category the ground truth does not list; images without any prediction.
    """
    ann_file, _ = make_shapes(str(tmp_path_factory.mktemp("tricky")), n_train=0, n_val=30, size=128, seed=3)["val"]
    with open(ann_file, encoding="utf-8") as handle:
        gt = json.load(handle)
    gt["categories"] = [{**c, "id": GAPPED[c["id"]]} for c in gt["categories"]] + [{"id": 42, "name": "unused"}]
    for ann in gt["annotations"]:
        ann["category_id"] = GAPPED[ann["category_id"]]
    plain = quiet_coco(copy.deepcopy(gt))
    for ann in gt["annotations"][::4]:  # a quarter of the masks as compressed RLE instead of polygons
        ann["segmentation"] = _rle(plain.annToMask(ann))
    x, y, w, h = gt["annotations"][1]["bbox"]
    gt["annotations"][1]["segmentation"].append([x, y, x + w / 3, y, x, y + h / 3])  # a second part
    gt["images"] += [{"id": 901, "file_name": "e1.png", "width": 128, "height": 128},   # no objects, predictions
                     {"id": 902, "file_name": "e2.png", "width": 128, "height": 128},   # no objects, no predictions
                     {"id": 903, "file_name": "big.png", "width": 640, "height": 480}]  # a large object and a crowd
    next_id = max(a["id"] for a in gt["annotations"]) + 1
    crowd = np.zeros((128, 128), np.uint8)
    crowd[80:120, 5:60] = 1
    big = np.zeros((480, 640), np.uint8)
    big[100:400, 50:500] = 1
    gt["annotations"] += [
        {"id": next_id, "image_id": 1, "category_id": 5, "bbox": [5, 80, 55, 40], "area": float(crowd.sum()),
         "iscrowd": 1, "segmentation": _uncompressed_rle(crowd)},
        {"id": next_id + 1, "image_id": 903, "category_id": 90, "bbox": [50, 100, 450, 300], "area": 135000.0,
         "iscrowd": 0, "segmentation": _rle(big)},
    ]
    gt_coco = quiet_coco(copy.deepcopy(gt))

    rng = np.random.default_rng(7)
    preds = []

    def add(image_id, category_id, mask, box, score):
        preds.append({"image_id": image_id, "category_id": category_id, "bbox": [float(v) for v in box],
                      "score": float(score), "segmentation": _rle(mask)})

    for ann in gt["annotations"]:
        if ann["iscrowd"]:
            continue
        mask = gt_coco.annToMask(ann)
        for _ in range(2):
            shifted = np.roll(mask, int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2)))
            box = np.array(ann["bbox"]) + rng.normal(0, 2, 4)
            category = ann["category_id"] if rng.random() > 0.1 else int(rng.choice([1, 5, 90]))
            add(ann["image_id"], category, shifted, box, round(rng.random(), 1))
    for image_id in (1, 2, 3, 901):  # false positives
        square = np.zeros((128, 128), np.uint8)
        square[2:20, 100:125] = 1
        add(image_id, int(rng.choice([1, 5, 90])), square, [100, 2, 25, 18], round(rng.random(), 1))
    for _ in range(3):  # inside the crowd region: ignored, not false positives
        add(1, 5, crowd, [5, 80, 55, 40], 0.8)
    for i in range(150):  # image 4 gets 150 detections; its real objects' copies compete with these
        box = [float(rng.uniform(0, 100)), float(rng.uniform(0, 100)), 12.0, 12.0]
        square = np.zeros((128, 128), np.uint8)
        square[int(box[1]):int(box[1]) + 12, int(box[0]):int(box[0]) + 12] = 1
        add(4, int(rng.choice([1, 5, 90])), square, box, round(rng.random(), 1))
    square = np.zeros((128, 128), np.uint8)
    square[10:30, 10:30] = 1
    add(5, 42, square, [10, 10, 20, 20], 0.7)  # a listed category with no ground truth
    add(5, 7, square, [10, 10, 20, 20], 0.7)  # a category the ground truth does not list
    assert not any(p["image_id"] == 902 for p in preds)
    return gt, preds


def test_tricky_inputs_same_numbers(tricky):
    gt, preds = tricky
    before = copy.deepcopy(preds)
    results = _both(gt, preds)
    fast = results["faster"]
    assert preds == before  # the predictions are not modified
    for iou_type in ("bbox", "segm"):  # a real middle case, every area range populated
        assert 0.2 < fast[f"{iou_type}_mAP"] < 0.95
        assert all(fast[f"{iou_type}_{n}"] > 0 for n in ("mAP_s", "mAP_m", "mAP_l"))
    assert {k.split("/")[1] for k in fast if "/" in k} == {"rectangle", "ellipse", "triangle"}  # not "unused"


def test_faster_leaves_ground_truth_as_it_was(tricky):
    gt, preds = tricky
    coco = quiet_coco(copy.deepcopy(gt))
    before = copy.deepcopy(coco.dataset)
    evaluate_coco(coco, preds, iou_types=("bbox", "segm"), engine="faster")
    assert coco.dataset == before


def test_class_subset_same_numbers(tricky, tmp_path):
    """orch evaluates data.*.classes by giving COCOeval a ground truth of those categories only
    (CocoDetection.coco); detections of the other classes are then not scored."""
    from PIL import Image

    from detection.data import CocoDetection

    gt, preds = tricky
    for img in gt["images"]:
        Image.new("RGB", (img["width"], img["height"])).save(tmp_path / img["file_name"])
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    subset = CocoDetection(str(tmp_path / "ann.json"), str(tmp_path), classes=["ellipse", "triangle"],
                           train=False, keep_empty=True, with_masks=True)
    results = _both(subset.coco.dataset, preds)
    fast = results["faster"]
    assert {k.split("/")[1] for k in fast if "/" in k} == {"ellipse", "triangle"}
    full = _both(gt, preds)["faster"]
    assert fast["bbox_mAP"] != full["bbox_mAP"]  # the subset really changed what was scored


def _one_object(n_before: int, tp_score: float, n_after: int = 0) -> tuple[dict, list]:
    """One image with one object; the true detection comes after ``n_before`` false ones and
    before ``n_after`` more, all of score 0.9."""
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 200}],
          "categories": [{"id": 3, "name": "thing"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40], "area": 1600.0,
                           "iscrowd": 0, "segmentation": [[10, 10, 50, 10, 50, 50, 10, 50]]}]}
    false = [{"image_id": 1, "category_id": 3, "bbox": [120, 120, 30, 30], "score": 0.9}]
    true = [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40], "score": tp_score}]
    return gt, false * n_before + true + false * n_after


@pytest.mark.parametrize("n_before, tp_score, recall", [
    (150, 0.5, 0.0),   # ranked 151st: cut by maxDets=100
    (99, 0.9, 1.0),    # tied with the false ones, 100th in list order: kept
    (100, 0.9, 0.0),   # tied, 101st in list order: cut (stable sort, both engines)
])
def test_max_dets_cut_and_ties(n_before, tp_score, recall):
    gt, preds = _one_object(n_before, tp_score, n_after=20)
    results = _both(gt, preds, iou_types=("bbox",))
    assert results["faster"]["bbox_AR_100"] == recall
    assert results["faster"]["bbox_AR_1"] == 0.0


def test_empty_predictions_same_numbers(tricky):
    gt, _ = tricky
    results = _both(gt, [])
    assert set(results["faster"].values()) == {0.0}  # every area range has objects: no -1
    gt_no_objects = {**gt, "annotations": []}
    results = _both(gt_no_objects, [], iou_types=("bbox",))
    assert results["faster"] == {}  # nothing to find: every number absent (COCOeval's -1), none reported


def test_resolve_engine(monkeypatch, caplog):
    assert resolve_engine("auto") == "faster" and resolve_engine("pycocotools") == "pycocotools"
    with pytest.raises(ConfigError, match="eval.engine: 'fast' is not valid; use one of auto, faster, pycocotools"):
        resolve_engine("fast")
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # as if it were not installed
    monkeypatch.setattr("detection.coco_engines._warned_fallback", False)
    with pytest.raises(ConfigError, match="pip install faster-coco-eval"):
        resolve_engine("faster")
    with caplog.at_level(logging.WARNING, logger="detection.coco_engines"):
        assert resolve_engine("auto") == "pycocotools"
        assert resolve_engine("auto") == "pycocotools"
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["faster-coco-eval is not installed"]  # once


def test_engine_is_a_config_key(monkeypatch):
    from orchestrator.config import build_experiment

    base = {"name": "x", "model": {"type": "fasterrcnn_mobilenet_v3_large_fpn"}}
    assert build_experiment(base, source="t").eval.engine == "auto"
    assert build_experiment({**base, "eval": {"engine": "pycocotools"}}, source="t").eval.engine == "pycocotools"
    with pytest.raises(ConfigError, match="eval.engine"):
        build_experiment({**base, "eval": {"engine": "fast"}}, source="t")
    assert set(ENGINES) == {"auto", "faster", "pycocotools"}
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # not installed: found when the config is read
    with pytest.raises(ConfigError, match="eval.engine: faster needs the faster-coco-eval package"):
        build_experiment({**base, "eval": {"engine": "faster"}}, source="t")
    assert build_experiment({**base, "eval": {"engine": "auto"}}, source="t").eval.engine == "auto"


def test_reference_is_pycocotools_itself(tricky):
    """engine=pycocotools is COCOeval run the documented way (so the comparisons above compare
    with the real reference, not with a copy of it)."""
    from pycocotools.cocoeval import COCOeval

    gt, preds = tricky
    ours = evaluate_coco(quiet_coco(copy.deepcopy(gt)), preds, engine="pycocotools")
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes([{k: v for k, v in p.items() if k != "segmentation"} for p in preds]), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert [ours.get(f"bbox_{n}", ABSENT) for n in STAT_NAMES] == list(evaluator.stats)  # -1 = left out
