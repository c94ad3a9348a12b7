"""orch ensemble: box fusion, the coordinate search, flip TTA, and a whole ensemble of a k-fold set
whose test annotations must stay unread until tuning has ended."""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import shutil

import numpy as np
import pytest
import yaml

from cluster.errors import ConfigError, DataError, OrchError
from orchestrator.kfold.fusion import Boxes, FusionSettings, fuse, fuse_image, index_results
from orchestrator.kfold.tune import coordinate_search


def _gt(n_images: int = 40, seed: int = 0) -> dict:
    rng = random.Random(seed)
    images, anns = [], []
    for i in range(n_images):
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 100, "height": 80})
        for _ in range(rng.randint(1, 3)):
            w, h = rng.uniform(15, 40), rng.uniform(15, 35)
            x, y = rng.uniform(0, 100 - w), rng.uniform(0, 80 - h)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": rng.choice([1, 2]),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def _member(gt: dict, seed: int, noise: float = 4.0) -> list[dict]:
    """A model's results: every object found with its own localisation noise, plus false boxes."""
    rng = random.Random(seed)
    out = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": rng.uniform(0.5, 1.0),
                    "bbox": [x + rng.gauss(0, noise), y + rng.gauss(0, noise), w + rng.gauss(0, noise), h]})
    for img in gt["images"]:
        out.append({"image_id": img["id"], "category_id": rng.choice([1, 2]), "score": rng.uniform(0.05, 0.6),
                    "bbox": [rng.uniform(0, 60), rng.uniform(0, 40), 20.0, 20.0]})
    return out


def _coco(gt: dict, tmp_path):
    from detection.evaluation import load_ground_truth

    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return load_ground_truth(str(path))


def _map(coco, results) -> float:
    from detection.evaluation import evaluate_coco

    return evaluate_coco(coco, results, engine="pycocotools")["bbox_mAP"]


def test_fusion_of_noisy_members_beats_each_member(tmp_path):
    gt = _gt()
    coco = _coco(gt, tmp_path)
    members = [_member(gt, seed) for seed in range(5)]
    sizes = {img["id"]: (img["width"], img["height"]) for img in gt["images"]}
    singles = [_map(coco, m) for m in members]
    indexed = [index_results(m) for m in members]
    wbf = _map(coco, fuse(indexed, [1.0] * 5, sizes, FusionSettings("wbf", iou_thr=0.5)))
    nms = _map(coco, fuse(indexed, [1.0] * 5, sizes, FusionSettings("nms", iou_thr=0.5)))
    soft = _map(coco, fuse(indexed, [1.0] * 5, sizes, FusionSettings("soft-nms", sigma=0.5)))
    # averaging five independent localisation errors is what WBF is for
    assert wbf > max(singles) + 0.05, (wbf, singles)
    assert 0.0 < nms and 0.0 < soft
    assert wbf > nms


def test_fuse_image_boxes_in_pixels_clipped_and_capped():
    box = Boxes(np.array([[10.0, 20.0, 50.0, 60.0]]), np.array([0.9]), np.array([3]))
    same = fuse_image([box, box], [1.0, 1.0], 100, 80, FusionSettings("wbf"))
    assert np.allclose(same.boxes, box.boxes) and same.scores == pytest.approx([0.9]) and same.labels.tolist() == [3]
    # outside the image: clipped; zero area after clipping: dropped; below skip_thr: dropped
    odd = Boxes(np.array([[-10.0, 0.0, 30.0, 90.0], [120.0, 0, 130.0, 10.0], [0, 0, 10.0, 10.0]]),
                np.array([0.8, 0.9, 0.05]), np.array([1, 1, 1]))
    out = fuse_image([odd], [1.0], 100, 80, FusionSettings("nms", skip_thr=0.1))
    assert out.boxes.tolist() == [[0.0, 0.0, 30.0, 80.0]]
    empty = Boxes(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))
    assert len(fuse_image([empty, empty], [1.0, 1.0], 100, 80, FusionSettings("soft-nms")).scores) == 0
    many = [{"image_id": 1, "category_id": 1 + i % 2, "score": i / 300, "bbox": [i % 50, 0, 10, 10]} for i in range(300)]
    capped = index_results(many)[1]
    assert len(capped.scores) == 100 and capped.scores[0] == pytest.approx(299 / 300)  # the best 100, best first
    assert capped.scores[-1] == pytest.approx(200 / 300) and sorted(set(capped.labels.tolist())) == [1, 2]
    with pytest.raises(ConfigError, match="--method"):
        FusionSettings("vote")


def test_coordinate_search_finds_the_best_and_keeps_defaults_on_ties():
    calls = []

    def score(s: FusionSettings) -> float:
        calls.append(s)
        return -abs(s.iou_thr - 0.7) - abs(s.skip_thr - 0.05) + (0.01 if s.conf_type == "max" else 0.0)

    tuned = coordinate_search(score, "wbf")
    assert tuned.settings == FusionSettings("wbf", iou_thr=0.7, skip_thr=0.05, conf_type="max")
    assert len(calls) == len(set(calls)) == len(tuned.trace)  # each setting scored once
    assert tuned.default_score == score(FusionSettings("wbf")) and tuned.score > tuned.default_score
    flat = coordinate_search(lambda s: 0.5, "soft-nms")
    assert flat.settings == FusionSettings("soft-nms") and set(flat.settings.params()) == {"method", "sigma", "skip_thr"}


def test_cached_search_reuses_only_the_same_key(tmp_path):
    from orchestrator.kfold.tune import cached_search

    calls = []

    def score(s: FusionSettings) -> float:
        calls.append(s)
        return -abs(s.iou_thr - 0.4)

    cache = tmp_path / "cache" / "tuned-nms.json"
    first, reused = cached_search(score, "nms", cache, {"oof": "a"})
    assert not reused and first.settings.iou_thr == 0.4 and calls
    n = len(calls)
    again, reused = cached_search(score, "nms", cache, {"oof": "a"})
    assert reused and again == first and len(calls) == n
    other, reused = cached_search(score, "nms", cache, {"oof": "b"})  # other predictions: searched again
    assert not reused and other == first and len(calls) == 2 * n


def test_hflip_boxes_map_back_onto_the_original():
    import torch

    from detection.inference.tta import hflip_boxes

    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 64.0, 10.0]])
    flipped = hflip_boxes(boxes, 64)
    assert flipped.tolist() == [[34.0, 5.0, 54.0, 25.0], [0.0, 0.0, 64.0, 10.0]]
    assert torch.equal(hflip_boxes(flipped, 64), boxes)


def test_predict_views_hflip_predicts_the_mirrored_image_and_maps_boxes_back(tmp_path):
    """A detector that boxes the brightest pixel column: real images decoded from disk, the
    hflip view mirrored before the model and its box mirrored back onto the original. (A real
    CNN is not exactly mirror-equivariant, so it could not tell a wrong mapping from its own
    asymmetry.)"""
    import torch
    from PIL import Image

    from detection.config import DataConfig
    from detection.inference.classes import ClassMap
    from detection.inference.tta import predict_views

    class ColumnDetector:
        classes = ClassMap(("stripe",), (7,), "test")
        seen: list = []

        def __call__(self, images):
            self.seen.append(len(images))
            outputs = []
            for image in images:
                column = int(image.sum(dim=(0, 1)).argmax())
                outputs.append({"boxes": torch.tensor([[column, 2.0, column + 1.0, 9.0]]),
                                "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
            return outputs

    paths = []
    for i, column in enumerate((10, 40, 63)):
        pixels = np.zeros((12, 64, 3), dtype=np.uint8)
        pixels[:, column] = 255
        paths.append((str(tmp_path / f"{i}.png"), 100 + i))
        Image.fromarray(pixels).save(paths[-1][0])
    detector = ColumnDetector()
    views, sizes = predict_views(detector, DataConfig(), paths, ("none", "hflip"), batch_size=2)
    assert sizes == {100: (64, 12), 101: (64, 12), 102: (64, 12)}
    assert detector.seen == [4, 2]  # both views of a batch in one model call
    for view in ("none", "hflip"):
        assert [(r["image_id"], r["category_id"], r["bbox"]) for r in views[view]] == [
            (100, 7, [10.0, 2.0, 1.0, 7.0]), (101, 7, [40.0, 2.0, 1.0, 7.0]), (102, 7, [63.0, 2.0, 1.0, 7.0])]
    with pytest.raises(ConfigError, match="--tta"):
        predict_views(detector, DataConfig(), paths, ("vflip",))


# -- a whole ensemble of a (hand-made) k-fold set: two folds sharing the tiny checkpoint ----------

def _fake_set(tmp_path, shapes_data, checkpoint, tracking_uri) -> tuple:
    """A finished 2-fold set as ``orch kfold`` leaves it: set.json, fold folders with config.yaml
    and a best checkpoint, the folds' files, the parent run's journal."""
    from orch_testing import root_conftest
    from orchestrator.config import load_experiment
    from orchestrator.kfold.split import split_folds, write_folds
    from orchestrator.tracking import runs

    ann = shapes_data / "annotations" / "instances_train.json"
    coco = json.loads(ann.read_text())
    set_dir = tmp_path / "work" / "kfold-fake"
    folds = split_folds(coco, 2, allow_small_classes=True)
    write_folds(coco, folds, set_dir.parent / "folds", ann_file=ann)
    trials = {}
    for f in (0, 1):
        folder = set_dir / f"fold-{f}"
        exp = root_conftest().tiny_experiment_dict(shapes_data, folder, tracking_uri)
        exp["data"]["train"]["ann_file"] = str(set_dir.parent / "folds" / f"train_{f}.json")
        exp["data"]["val"] = {"ann_file": str(set_dir.parent / "folds" / f"val_{f}.json"),
                              "img_dir": str(shapes_data / "train")}
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(exp))
        shutil.copy(checkpoint, folder / "checkpoints" / "best_bbox_mAP.pth")
        trials[f"fold-{f}"] = {"status": "SUCCEEDED", "fold": f, "point": "", "output_dir": str(folder)}
    parent = runs.create_journal(str(set_dir / "journal"), load_experiment(str(folder / "config.yaml")), "tiny k-fold")
    parent.set_status("FINISHED")
    parent.close()
    state = {"set_id": "fake", "ann_file": str(ann), "folds_dir": str(set_dir.parent / "folds"),
             "parents": {"points": {"": parent.folder}}, "trials": trials, "test": None}
    (set_dir / "set.json").write_text(json.dumps(state))
    return set_dir, parent.folder


def test_ensemble_reads_the_test_annotations_only_after_tuning(tmp_path, shapes_data, tiny_checkpoint,
                                                               tracking_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    from orchestrator.kfold.ensemble import run_ensemble
    from orchestrator.tracking.runs import run_id_of

    set_dir, parent = _fake_set(tmp_path, shapes_data, tiny_checkpoint[1], tracking_uri)
    # the test file exists from the start (it is named up front) but holds no annotations until
    # the tuning has ended: any earlier read would fail, and the spy would see it
    test_file = tmp_path / "test.json"
    test_file.write_text("not yet: the test annotations are written when tuning has ended")
    phase, opened = ["tuning"], []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == str(test_file):
            opened.append(phase[0])
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)

    def tuned(result):
        assert opened == [] and phase == ["tuning"]
        phase[0] = "test"
        shutil.copy(shapes_data / "annotations" / "instances_val.json", test_file)

    lines = []
    outcome = run_ensemble(str(set_dir), test=str(test_file), img_dir=str(shapes_data / "val"), tta="hflip",
                           echo=lines.append, on_tuned=tuned)
    assert phase == ["test"] and opened and set(opened) == {"test"}
    # the table: both folds, their mean and the ensemble, without and with TTA
    assert list(outcome.rows) == ["fold-0", "fold-1", "mean of folds", "ensemble"]
    assert all(set(r) == {"none", "hflip"} for r in outcome.rows.values())
    assert outcome.rows["fold-0"]["none"] == outcome.rows["fold-1"]["none"]  # the same checkpoint
    assert "| **ensemble** |" in outcome.table and "tuned on out-of-fold" in outcome.table.replace("Fusion settings ", "")
    results = json.loads(outcome.results.read_text())
    assert results and {r["image_id"] for r in results} <= {img["id"] for img in json.loads(test_file.read_text())["images"]}
    saved = json.loads((outcome.out_dir / "ensemble.json").read_text())
    assert saved["settings"] == outcome.tuned.settings.params() and len(saved["tried"]) == len(outcome.tuned.trace)
    assert saved["weights"] == {"rule": "equal", "fold-0": 1.0, "fold-1": 1.0}
    # the MLflow run, nested under the set's parent, FINISHED, with its settings and files
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id_of(outcome.journal, tracking_uri))
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == run_id_of(parent, tracking_uri)
    assert run.data.params["fusion.method"] == "wbf" and "fusion.iou_thr" in run.data.params
    assert run.data.metrics["ensemble/bbox_mAP"] == pytest.approx(outcome.rows["ensemble"]["hflip"]["bbox_mAP"])
    assert {"ensemble/table.md", "ensemble/results_test.json", "ensemble/ensemble.json"} <= \
        {a.path for a in client.list_artifacts(run.info.run_id, "ensemble")}

    # again without TTA: from the cached predictions and tuning, nothing predicted or tuned twice
    # (NMS would cost a numba compilation here; the fusion tests above run every method)
    import detection.inference.tta
    import orchestrator.kfold.tune

    def no_prediction(*args, **kwargs):
        raise AssertionError("predicted or tuned again although the cache matches")

    monkeypatch.setattr(detection.inference.tta, "predict_views", no_prediction)
    monkeypatch.setattr(orchestrator.kfold.tune, "coordinate_search", no_prediction)
    again = run_ensemble(str(set_dir), test=str(test_file), img_dir=str(shapes_data / "val"), tta="none",
                         echo=lines.append)
    assert again.out_dir != outcome.out_dir and again.out_dir.name == "wbf-tta_none"
    assert again.rows == outcome.rows and again.tuned == outcome.tuned  # the same numbers: only --tta differs
    assert any("settings tried; reused)" in line for line in lines)

def test_ensemble_errors_are_one_line(tmp_path, shapes_data, tiny_checkpoint, tracking_uri, capsys):
    from orchestrator.cli import main
    from orchestrator.kfold.ensemble import run_ensemble

    set_dir, _ = _fake_set(tmp_path, shapes_data, tiny_checkpoint[1], tracking_uri)
    with pytest.raises(ConfigError, match="has no test file"):
        run_ensemble(str(set_dir), echo=lambda s: None)
    with pytest.raises(DataError, match="does not exist"):
        run_ensemble(str(set_dir), test=str(tmp_path / "nope.json"), img_dir=str(shapes_data / "val"), echo=lambda s: None)
    with pytest.raises(ConfigError, match="not a grid point"):
        run_ensemble(str(set_dir), test=str(shapes_data / "annotations" / "instances_val.json"), point="lr=1",
                     img_dir=str(shapes_data / "val"),
                     echo=lambda s: None)
    val = str(shapes_data / "annotations" / "instances_val.json")
    with pytest.raises(ConfigError, match="needs --img-dir"):
        run_ensemble(str(set_dir), test=val, echo=lambda s: None)
    assert main(["ensemble", str(set_dir), "--method", "vote"]) == 2
    assert main(["ensemble", str(tmp_path / "elsewhere")]) == 2
    assert "no k-fold set" in capsys.readouterr().err
    assert main(["ensemble", str(set_dir), "--test", val]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0

    # a fold without a checkpoint, then a set whose folds did not finish: one line, exit 2
    (set_dir / "fold-1" / "checkpoints" / "best_bbox_mAP.pth").unlink()
    assert main(["ensemble", str(set_dir), "--test", val, "--img-dir", str(shapes_data / "val")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orch: error: ") and "no best_<metric>.pth" in err and err.strip().count("\n") == 0
    state = json.loads((set_dir / "set.json").read_text())
    for record in state["trials"].values():
        record["status"] = "FAILED"
    (set_dir / "set.json").write_text(json.dumps(state))
    assert main(["ensemble", str(set_dir), "--test", val, "--img-dir", str(shapes_data / "val")]) == 2
    err = capsys.readouterr().err
    assert "is FAILED, not SUCCEEDED" in err and err.strip().count("\n") == 0


def test_points_of_a_grid_set(tmp_path):
    from orchestrator.kfold.ensemble import pick_points
    from orchestrator.kfold.report import write_report

    trials = {f"{p}/fold-{f}": {"point": p, "fold": f, "status": "SUCCEEDED"} for p in ("lr=0.1", "lr=0.2") for f in (0, 1)}
    state = {"trials": trials}
    assert pick_points(tmp_path, state, "all") == ["lr=0.1", "lr=0.2"]
    assert pick_points(tmp_path, state, "lr=0.2") == ["lr=0.2"]
    with pytest.raises(ConfigError, match="choose best, all or one of: lr=0.1, lr=0.2"):
        pick_points(tmp_path, state, "lr=0.3")
    with pytest.raises(OrchError, match="has not finished"):  # best needs the set's report
        pick_points(tmp_path, state, "best")
    summaries = [_point_summary("lr=0.1", 0.3), _point_summary("lr=0.2", 0.6)]
    write_report(tmp_path / "report", summaries, "bbox_mAP")
    assert pick_points(tmp_path, state, "best") == ["lr=0.2"]
    assert pick_points(tmp_path, {"trials": {"fold-0": {"point": ""}}}, "best") == [""]
    with pytest.raises(DataError, match="lists no trials"):
        pick_points(tmp_path, {"trials": {}}, "all")


def _point_summary(name: str, value: float):
    from orchestrator.kfold.aggregate import PointSummary

    folds = {0: {"bbox_mAP": value - 0.01}, 1: {"bbox_mAP": value + 0.01}}
    return PointSummary(name=name, point={"optim.lr": name}, folds=folds, mean={"bbox_mAP": value},
                        std={"bbox_mAP": 0.014}, oof={"bbox_mAP": value})
