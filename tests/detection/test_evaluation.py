"""evaluate_coco against pycocotools run directly; conversion, gathering and writing predictions."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cluster.errors import ConfigError, DataError
from detection.data import CocoDetection
from detection.evaluation import (
    ABSENT,
    STAT_NAMES,
    evaluate_coco,
    gather_predictions,
    load_ground_truth,
    per_class_table,
    predictions_to_coco,
    write_predictions,
)
from detection.shapes import make_shapes


@pytest.fixture(scope="module")
def val_set(tmp_path_factory) -> CocoDetection:
    paths = make_shapes(str(tmp_path_factory.mktemp("evalshapes")), n_train=0, n_val=24, size=96, seed=4)
    return CocoDetection(*paths["val"], train=False, keep_empty=True, with_masks=True)


def _model_outputs(dataset: CocoDetection, noise: float, seed: int = 0):
    """Outputs shaped like torchvision's: perturbed true boxes and masks plus false positives."""
    rng = np.random.default_rng(seed)
    outputs, image_ids = [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        boxes = target["boxes"].numpy() + rng.normal(0, noise, size=target["boxes"].shape)
        labels = target["labels"].numpy().copy()
        labels[rng.random(len(labels)) < 0.15] = 1  # some wrong classes
        masks = target["masks"].numpy().astype(np.float32)
        masks = np.roll(masks, int(rng.integers(-2, 3)), axis=2)  # shifted masks: IoU < 1
        extra = rng.uniform(0, 60, size=(2, 2))
        boxes = np.concatenate([boxes, np.concatenate([extra, extra + 20], axis=1)])
        labels = np.concatenate([labels, [2, 3]])
        masks = np.concatenate([masks, np.zeros((2, *masks.shape[1:]), np.float32)])
        masks[-2:, 10:20, 10:20] = 0.9
        outputs.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(rng.uniform(0.05, 1, size=len(labels)), dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.tensor(masks)[:, None],
        })
        image_ids.append(target["image_id"])
    return outputs, image_ids


def _direct_stats(ann_file: str, dets: list, iou_type: str) -> COCOeval:
    """pycocotools the documented way: load the file, loadRes, evaluate, accumulate, summarize."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        evaluator = COCOeval(gt, gt.loadRes(dets), iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def test_numbers_equal_pycocotools_run_directly(val_set):
    outputs, ids = _model_outputs(val_set, noise=1.5)
    preds = predictions_to_coco(outputs, ids, val_set.label_to_cat_id, with_masks=True)
    metrics = evaluate_coco(val_set.coco, preds, iou_types=("bbox", "segm"), classwise=True)
    from_file = evaluate_coco(load_ground_truth(val_set.ann_file), preds, iou_types=("bbox", "segm"), classwise=True)
    assert from_file == metrics  # shapes data is clean: the checked ground truth is the file's
    bbox = _direct_stats(val_set.ann_file, [{k: v for k, v in p.items() if k != "segmentation"} for p in preds], "bbox")
    segm = _direct_stats(val_set.ann_file, [{k: v for k, v in p.items() if k != "bbox"} for p in preds], "segm")
    for iou_type, direct in (("bbox", bbox), ("segm", segm)):
        ours = [metrics.get(f"{iou_type}_{name}", ABSENT) for name in STAT_NAMES]
        assert ours == pytest.approx(list(direct.stats), abs=1e-12)
        precision = direct.eval["precision"][:, :, :, 0, -1]
        for k, name in enumerate(["rectangle", "ellipse", "triangle"]):
            values = precision[:, :, k]
            assert metrics[f"{iou_type}_AP/{name}"] == pytest.approx(values[values > -1].mean())
    assert 0.2 < metrics["bbox_mAP"] < 0.95 and 0.2 < metrics["segm_mAP"] < 0.95  # a real middle case
    assert all(isinstance(v, float) for v in metrics.values())
    assert "bbox" in preds[0] and "segmentation" in preds[0]  # inputs left as they were


def test_perfect_predictions_score_one(val_set):
    outputs, ids = [], []
    for index in range(len(val_set)):
        _, target = val_set[index]
        outputs.append({"boxes": target["boxes"], "labels": target["labels"],
                        "scores": torch.ones(len(target["labels"])), "masks": target["masks"][:, None].float()})
        ids.append(int(target["image_id"]))
    preds = predictions_to_coco(outputs, ids, val_set.label_to_cat_id, with_masks=True)
    metrics = evaluate_coco(val_set.coco, preds, iou_types=("bbox", "segm"), classwise=True)
    for iou_type in ("bbox", "segm"):
        assert metrics[f"{iou_type}_mAP"] == 1.0 and metrics[f"{iou_type}_mAP_50"] == 1.0
        assert metrics[f"{iou_type}_AR_100"] == 1.0
        # no large object at 96 px: pycocotools says -1 ("absent"), left out rather than logged as a score
        assert f"{iou_type}_mAP_l" not in metrics and f"{iou_type}_AR_l" not in metrics
        assert [metrics[f"{iou_type}_AP/{n}"] for n in val_set.class_names] == [1.0, 1.0, 1.0]


def test_empty_predictions_give_zeros(val_set):
    metrics = evaluate_coco(val_set.coco, [], iou_types=("bbox", "segm"), classwise=True)
    assert set(metrics) == {f"{t}_{n}" for t in ("bbox", "segm") for n in STAT_NAMES if not n.endswith("_l")} | {
        f"{t}_AP/{c}" for t in ("bbox", "segm") for c in val_set.class_names}  # _l: absent (no large object)
    assert set(metrics.values()) == {0.0}


def test_classes_without_ground_truth_are_left_out(tmp_path):
    """Category gaps (1, 7) and a category with no annotation; labels map back to category ids."""
    from PIL import Image

    Image.new("RGB", (50, 40)).save(tmp_path / "a.png")
    data = {"images": [{"id": 3, "file_name": "a.png", "width": 50, "height": 40}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 9, "name": "yak"}],
            "annotations": [{"id": 1, "image_id": 3, "category_id": 7, "bbox": [5, 5, 20, 10], "area": 200, "iscrowd": 0}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = CocoDetection(str(tmp_path / "ann.json"), str(tmp_path), train=False)
    outputs = [{"boxes": torch.tensor([[5.0, 5.0, 25.0, 15.0], [0, 0, 9, 9]]), "scores": torch.tensor([0.9, 0.8]),
                "labels": torch.tensor([2, 3])}]
    preds = predictions_to_coco(outputs, [3], ds.label_to_cat_id)
    assert [p["category_id"] for p in preds] == [7, 9]
    assert preds[0]["bbox"] == [5.0, 5.0, 20.0, 10.0]
    metrics = evaluate_coco(ds.coco, preds, classwise=True, class_names={7: "Dog"})
    assert metrics["bbox_AP/Dog"] == pytest.approx(1.0)
    assert not any(k.startswith("bbox_AP/") and "Dog" not in k for k in metrics)
    table = per_class_table(metrics)
    assert table.splitlines() == ["| class | bbox AP |", "|---|---:|", "| Dog | 1.000 |"]
    with pytest.raises(DataError, match="not in the ground truth"):
        evaluate_coco(ds.coco, [{**preds[0], "image_id": 4}])
    with pytest.raises(ConfigError, match="no masks"):
        evaluate_coco(ds.coco, preds, iou_types=("segm",))
    with pytest.raises(DataError, match="predicted label 4 but the dataset has labels 1..3"):
        predictions_to_coco([{**outputs[0], "labels": torch.tensor([4, 1])}], [3], ds.label_to_cat_id)


def test_predictions_are_json_and_masks_round_trip(tmp_path, val_set):
    outputs, ids = _model_outputs(val_set, noise=0.0)
    preds = predictions_to_coco(outputs[:2], ids[:2], val_set.label_to_cat_id, with_masks=True)
    mask = mask_util.decode({**preds[0]["segmentation"], "counts": preds[0]["segmentation"]["counts"].encode()})
    assert np.array_equal(mask, (outputs[0]["masks"][0, 0] > 0.5).numpy().astype(np.uint8))
    path = write_predictions(str(tmp_path / "out" / "predictions_val.json"), preds)
    assert json.loads(open(path).read()) == preds
    assert os.listdir(tmp_path / "out") == ["predictions_val.json"]
    with pytest.raises(TypeError):  # a value JSON cannot hold: the old file stays, no temporary file is left
        write_predictions(path, [{"image_id": 1, "bbox": object()}])
    assert json.loads(open(path).read()) == preds and os.listdir(tmp_path / "out") == ["predictions_val.json"]


def test_gather_single_process_sorts_by_image():
    preds = [{"image_id": 2, "score": 0.1}, {"image_id": 1, "score": 0.5}, {"image_id": 2, "score": 0.3}]
    assert [(p["image_id"], p["score"]) for p in gather_predictions(preds, 1)] == [(1, 0.5), (2, 0.1), (2, 0.3)]


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Rank r predicted images r, r+2, ...; image 0 was also padded onto rank 1.
        preds = [{"image_id": i, "score": float(rank)} for i in range(rank, 6, world)]
        if rank == 1:
            preds.append({"image_id": 0, "score": 9.0})
        gathered = gather_predictions(preds, world)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(gathered, handle)
    finally:
        dist.destroy_process_group()


def test_gather_across_two_real_processes(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children only gather Python objects, and spawn would re-import torch (~10 s each).
    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    assert [(p["image_id"], p["score"]) for p in results[0]] == [(0, 0.0), (1, 1.0), (2, 0.0), (3, 1.0), (4, 0.0), (5, 1.0)]


def test_load_ground_truth_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_ground_truth(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="bad.json: not a readable COCO"):
        load_ground_truth(str(tmp_path / "bad.json"))


def test_per_class_table_shows_missing_values():
    table = per_class_table({"bbox_AP/a": 0.5, "segm_AP/a": 0.25, "bbox_AP/b": float("nan"), "bbox_mAP": 0.1})
    assert table.splitlines()[2:] == ["| a | 0.500 | 0.250 |", "| b | - | - |"]
    assert "eval.classwise" in per_class_table({"bbox_mAP": 0.3})
