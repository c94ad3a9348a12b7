"""Aggregation: mean/std, the out-of-fold COCOeval, the paired comparison and the report files."""

from __future__ import annotations

import json
import random

import pytest

from cluster.errors import DataError
from detection.evaluation import evaluate_coco
from orchestrator.kfold.aggregate import (
    PointSummary,
    compare_points,
    load_coco,
    mean_std,
    out_of_fold,
    summarize_point,
)
from orchestrator.kfold.report import comparison_markdown, read_report, write_report
from orchestrator.kfold.split import split_folds, write_folds


def make_gt(n_images: int = 12, seed: int = 0) -> dict:
    rng = random.Random(seed)
    images, anns = [], []
    for i in range(n_images):
        images.append({"id": 10 + i, "file_name": f"{i}.png", "width": 64, "height": 64})
        for _ in range(rng.randint(1, 3)):
            x, y, w, h = rng.randint(0, 30), rng.randint(0, 30), rng.randint(8, 30), rng.randint(8, 30)
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": rng.choice([1, 2]),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]}


def predict(gt: dict, image_ids, quality: float, seed: int) -> list[dict]:
    """Noisy detections of the ground truth of ``image_ids``: some missed, some shifted."""
    rng = random.Random(seed)
    wanted, preds = set(image_ids), []
    for a in gt["annotations"]:
        if a["image_id"] not in wanted or rng.random() > quality:
            continue
        x, y, w, h = a["bbox"]
        shift = rng.uniform(0, 6) * (1 - quality)
        preds.append({"image_id": a["image_id"], "category_id": a["category_id"],
                      "bbox": [x + shift, y + shift, w, h], "score": rng.uniform(0.3, 1.0)})
    return preds


def test_mean_std_skips_undefined_values():
    mean, std = mean_std({0: {"m": 0.2, "s": -1.0, "u": -1.0}, 1: {"m": 0.4, "s": 0.5, "u": -1.0},
                          2: {"m": 0.6, "s": 0.7, "u": -1.0}})
    assert mean["m"] == pytest.approx(0.4) and std["m"] == pytest.approx(0.2)  # ddof=1
    assert mean["s"] == pytest.approx(0.6) and std["s"] == pytest.approx(0.1414213, rel=1e-5)
    assert (mean["u"], std["u"]) == (-1.0, 0.0)
    assert mean_std({0: {"m": 0.3}}) == ({"m": 0.3}, {"m": 0.0})


def test_out_of_fold_equals_one_cocoeval_over_concatenated_predictions(tmp_path):
    gt = make_gt()
    full = tmp_path / "ann.json"
    full.write_text(json.dumps(gt))
    folds = split_folds(gt, 3, seed=0)
    fold_preds = [predict(gt, f.val_ids, quality=0.5 + 0.2 * f.fold, seed=f.fold) for f in folds]
    oof = out_of_fold(full, fold_preds)
    expected = evaluate_coco(load_coco(full), [p for preds in fold_preds for p in preds], classwise=True)
    assert oof == expected
    assert "bbox_AP/circle" in oof and 0 < oof["bbox_mAP"] < 1
    with pytest.raises(DataError, match="the folds leak"):
        out_of_fold(full, [fold_preds[0], fold_preds[0]])


def test_summarize_point_from_fold_files(tmp_path):
    gt = make_gt()
    full = tmp_path / "ann.json"
    full.write_text(json.dumps(gt))
    folds = split_folds(gt, 3, seed=0)
    write_folds(gt, folds, tmp_path / "folds", ann_file=full, seed=0)
    files = {}
    for f in folds:
        pred_file = tmp_path / f"pred_{f.fold}.json"
        pred_file.write_text(json.dumps(predict(gt, f.val_ids, 0.7, f.fold)))
        files[f.fold] = (tmp_path / "folds" / f"val_{f.fold}.json", pred_file)
    s = summarize_point("lr=0.1", {"optim.lr": 0.1}, files, full)
    assert sorted(s.folds) == [0, 1, 2]
    per_fold = [s.folds[f]["bbox_mAP"] for f in range(3)]
    assert s.mean["bbox_mAP"] == pytest.approx(sum(per_fold) / 3)
    assert s.std["bbox_mAP"] > 0 and "bbox_AP/square" in s.mean and "bbox_mAP" in s.oof
    with pytest.raises(DataError, match="did not finish"):
        summarize_point("x", {}, {0: (files[0][0], tmp_path / "missing.json")}, full)


def _point(name: str, values: list[float]) -> PointSummary:
    folds = {f: {"bbox_mAP": v, "bbox_AP/circle": v / 2} for f, v in enumerate(values)}
    mean, std = mean_std(folds)
    return PointSummary(name, {"optim.lr": name}, folds, mean, std, {"bbox_mAP": sum(values) / len(values) + 0.01})


def test_paired_comparison_ranks_and_tests_against_the_best():
    good = _point("lr=0.01", [0.50, 0.60, 0.55, 0.58])
    worse = _point("lr=0.1", [0.40, 0.52, 0.44, 0.49])  # lower on every fold by 0.08-0.11
    noisy = _point("lr=1.0", [0.60, 0.40, 0.58, 0.55])
    rows = compare_points([worse, noisy, good], "bbox_mAP")
    assert [r["point"] for r in rows] == ["lr=0.01", "lr=1.0", "lr=0.1"]
    assert rows[0]["best"] and rows[0]["p_value"] is None and rows[0]["diff"] == 0
    assert rows[2]["diff"] == pytest.approx(-0.095)
    assert rows[2]["p_value"] < 0.01 < rows[1]["p_value"]
    assert compare_points([worse, good], "bbox_mAP", mode="min")[0]["point"] == "lr=0.1"


def test_report_files_and_round_trip(tmp_path):
    points = [_point("lr=0.01", [0.5, 0.6]), _point("lr=0.1", [0.4, 0.45])]
    paths = write_report(tmp_path / "report", points, "bbox_mAP", meta={"set_id": "abc"})
    text = paths["markdown"].read_text()
    assert "| **lr=0.01** | 0.5500 ± 0.0707 | 0.5600 | best |" in text
    assert "| lr=0.1 | 0.4250 ± 0.0354 | 0.4350 | -0.1250 |" in text
    assert "| circle |" in text
    assert paths["boxplot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = paths["csv"].read_text().splitlines()[0]
    assert header == "point,metric,mean,std,oof,diff_vs_best,p_value,fold_0,fold_1"
    meta, again = read_report(tmp_path / "report")
    assert meta["set_id"] == "abc" and [p.to_dict() for p in again] == [p.to_dict() for p in points]
    assert comparison_markdown(again, "bbox_mAP") == text
