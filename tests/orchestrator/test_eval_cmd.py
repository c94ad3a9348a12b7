"""``orch eval``: a trained checkpoint evaluated from the command line gives the numbers that
pycocotools computes on the predictions it wrote."""

from __future__ import annotations

import json

import pytest

from cluster.env import DistEnv
from detection.evaluation import evaluate_coco
from detection.train import main
from orchestrator.cli import main as orch
from orchestrator.config import load_experiment


@pytest.fixture
def trained(make_experiment):
    path = make_experiment(**{"tracking.enable": False})
    result = main(load_experiment(path), DistEnv.single())
    return path, result


def test_eval_prints_metrics_and_writes_predictions(trained, tmp_path, capsys):
    path, result = trained
    out = tmp_path / "preds.json"
    code = orch(["eval", str(path), "--checkpoint", result.best["path"], "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "bbox_mAP_50" in printed and "bbox_AP/ellipse" in printed and str(out) in printed
    preds = json.loads(out.read_text())
    # Same model, same data as the end-of-training evaluation: same numbers.
    assert f"{result.metrics['bbox_mAP']:.4f}" in printed
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(load_experiment(path).data.val.ann_file)
    ev = COCOeval(gt, gt.loadRes(preds), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(result.metrics["bbox_mAP"])
    assert evaluate_coco(gt, preds)["bbox_mAP"] == pytest.approx(ev.stats[0])


def test_eval_errors_are_one_line(trained, tmp_path, capsys):
    path, result = trained
    assert orch(["eval", str(path), "--checkpoint", str(tmp_path / "none.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert orch(["eval", str(path), "--checkpoint", result.best["path"], "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orch: error: data.test is not set") and err.count("\n") == 1
    # A checkpoint of another model type does not fit.
    code = orch(["eval", str(path), "--checkpoint", result.best["path"], "--set", "model.type=fasterrcnn",
                 "--set", "model.backbone=resnet18"])
    assert code == 2 and "does not fit model.type fasterrcnn" in capsys.readouterr().err
