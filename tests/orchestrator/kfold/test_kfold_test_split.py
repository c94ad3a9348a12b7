"""The held-out test split of a k-fold set (kfold.test): checks, report columns, the test numbers
on the parent run, orch data shapes --test, and (slow) a real set ending with orch ensemble."""

from __future__ import annotations

import csv
import json

import pytest

from cluster.errors import DataError
from orchestrator.kfold.aggregate import PointSummary
from orchestrator.kfold.heldout import HeldOutSplit, check_held_out, held_out_split
from orchestrator.kfold.report import comparison_markdown, read_report, write_report


def test_shapes_writes_a_test_split(tmp_path, capsys):
    from orchestrator.cli import main

    out = tmp_path / "s"
    assert main(["data", "shapes", "--out", str(out), "--train", "3", "--val", "0", "--test", "2", "--size", "32"]) == 0
    assert "test:" in capsys.readouterr().out
    test = json.loads((out / "annotations" / "instances_test.json").read_text())
    assert len(test["images"]) == 2 and sorted(p.name for p in (out / "test").iterdir()) == ["000001.png", "000002.png"]
    assert not (out / "annotations" / "instances_val.json").exists()
    assert main(["data", "shapes", "--out", str(out), "--test", "-1"]) == 2


def test_held_out_split_resolution_and_leak_check(make_experiment, shapes_data, tmp_path, monkeypatch):
    from orchestrator.config import load_experiment

    exp = load_experiment(str(make_experiment()))
    train_ann = str(shapes_data / "annotations" / "instances_train.json")
    val_ann = str(shapes_data / "annotations" / "instances_val.json")
    assert held_out_split(exp, None) is None
    split = held_out_split(exp, val_ann, str(shapes_data / "val"))
    assert split == HeldOutSplit(val_ann, str(shapes_data / "val"))
    assert held_out_split(exp, val_ann).img_dir == exp.data.train.img_dir  # no data.test: the training folder
    monkeypatch.chdir(shapes_data)  # relative paths become absolute: set.json records them
    assert held_out_split(exp, "annotations/instances_val.json", "val") == split
    with pytest.raises(DataError, match="kfold.test"):
        held_out_split(exp, str(tmp_path / "none.json"))
    with pytest.raises(DataError, match="test_img_dir"):
        held_out_split(exp, val_ann, str(tmp_path / "nowhere"))
    check_held_out(split, train_ann, str(shapes_data / "train"))  # other files: fine
    # the val file read from the training folder names training images: a leak
    with pytest.raises(DataError, match="shares 8 image"):
        check_held_out(HeldOutSplit(val_ann, str(shapes_data / "train")), train_ann, str(shapes_data / "train"))


def test_a_fold_without_checkpoint_leaves_the_point_without_test_scores(make_experiment, shapes_data, tmp_path):
    from types import SimpleNamespace

    from orchestrator.config import load_experiment
    from orchestrator.kfold.heldout import evaluate_test

    exp = load_experiment(str(make_experiment()))
    (tmp_path / "fold-0").mkdir()
    trial = SimpleNamespace(name="fold-0", fold=0, experiment=exp)
    summary = _summary("", False)
    lines = []
    evaluate_test(exp, HeldOutSplit(str(shapes_data / "annotations" / "instances_val.json"), str(shapes_data / "val")),
                  [summary], {"": [trial]}, {"trials": {"fold-0": {"output_dir": str(tmp_path / "fold-0")}}},
                  lines.append)
    assert summary.test == {} and summary.test_mean == {}
    assert "no test scores" in lines[0] and "no best_<metric>.pth" in lines[0]


def _summary(name: str, test: bool) -> PointSummary:
    folds = {0: {"bbox_mAP": 0.5, "bbox_AP/a": 0.4}, 1: {"bbox_mAP": 0.7, "bbox_AP/a": 0.6}}
    s = PointSummary(name=name, point={"optim.lr": name}, folds=folds, mean={"bbox_mAP": 0.6, "bbox_AP/a": 0.5},
                     std={"bbox_mAP": 0.14, "bbox_AP/a": 0.14}, oof={"bbox_mAP": 0.61, "bbox_AP/a": 0.52})
    if test:
        s.test = {0: {"bbox_mAP": 0.41, "bbox_AP/a": 0.3}, 1: {"bbox_mAP": 0.43, "bbox_AP/a": 0.35}}
        s.test_mean, s.test_std = {"bbox_mAP": 0.42, "bbox_AP/a": 0.325}, {"bbox_mAP": 0.0141, "bbox_AP/a": 0.035}
    return s


def test_report_gets_test_columns_only_with_a_test_split(tmp_path):
    plain = comparison_markdown([_summary("x", False)], "bbox_mAP")
    assert "test" not in plain
    text = comparison_markdown([_summary("x", True)], "bbox_mAP")
    assert "| point | mean ± std | out-of-fold | test mean ± std | diff vs best |" in text
    assert "| **x** | 0.6000 ± 0.1400 | 0.6100 | 0.4200 ± 0.0141 | best |" in text
    assert "| a | 0.5000 ± 0.1400 | 0.5200 | 0.3250 ± 0.0350 |" in text
    paths = write_report(tmp_path / "report", [_summary("x", True)], "bbox_mAP")
    rows = {r["metric"]: r for r in csv.DictReader(paths["csv"].open())}
    assert float(rows["bbox_mAP"]["test_mean"]) == 0.42 and float(rows["bbox_mAP"]["test_fold_1"]) == 0.43
    _, back = read_report(tmp_path / "report")
    assert back[0].test == {0: {"bbox_mAP": 0.41, "bbox_AP/a": 0.3}, 1: {"bbox_mAP": 0.43, "bbox_AP/a": 0.35}}
    # a summary.json written before test splits existed still reads
    old = {k: v for k, v in _summary("y", False).to_dict().items() if not k.startswith("test")}
    assert PointSummary.from_dict(old).test == {}


def test_set_identity_changes_only_when_stratifying_more(make_experiment):
    import dataclasses

    from orchestrator.config import load_experiment
    from orchestrator.kfold.runner import set_identity

    exp = load_experiment(str(make_experiment(**{"kfold.folds": 2})))
    base = set_identity(exp, exp.kfold, "sha")
    assert set_identity(exp, dataclasses.replace(exp.kfold, stratify=("classes",)), "sha") == base
    assert set_identity(exp, dataclasses.replace(exp.kfold, test="t.json"), "sha") == base  # scoring only
    assert set_identity(exp, dataclasses.replace(exp.kfold, stratify=("classes", "count")), "sha") != base


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_set_scores_its_folds_on_the_test_file_then_ensembles(make_experiment, shapes_data, tracking_uri, tmp_path,
                                                              monkeypatch, capsys):
    """2 folds x 4 iterations: test_mean/test_std on the parent, test columns, then orch ensemble
    nested under the parent."""
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main
    from orchestrator.tracking.runs import run_id_of
    from orchestrator.tracking.sync import sync

    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "orch_home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    exp = make_experiment(**{"kfold.folds": 2, "kfold.allow_small_classes": True, "kfold.stratify": ["classes", "count"],
                             "kfold.test": str(shapes_data / "annotations" / "instances_val.json"),
                             "kfold.test_img_dir": str(shapes_data / "val")})
    assert main(["kfold", str(exp), "--backend", "local", "--max-parallel", "2"]) == 0
    out = capsys.readouterr().out
    assert "test mean ± std" in out and "box count" in out
    set_dir = next((tmp_path / "work").glob("kfold-*"))
    state = json.loads((set_dir / "set.json").read_text())
    assert state["test"]["ann_file"].endswith("instances_val.json")
    assert json.loads((set_dir.parent / "folds" / "manifest.json").read_text())["stratify"] == ["classes", "count"]
    summary = json.loads((set_dir / "report" / "summary.json").read_text())["points"][0]
    assert set(summary["test"]) == {"0", "1"} and "bbox_mAP" in summary["test_mean"]

    assert main(["ensemble", state["set_id"], "--tta", "hflip"]) == 0
    out = capsys.readouterr().out
    assert "| **ensemble** |" in out and "tuned on out-of-fold" in out.replace("Fusion settings ", "")

    assert not sync([str(set_dir)], tracking_uri).failed
    client = MlflowClient(tracking_uri)
    parent = client.get_run(run_id_of(state["parents"]["points"][""], tracking_uri))
    assert parent.data.metrics["test_mean/bbox_mAP"] == pytest.approx(summary["test_mean"]["bbox_mAP"])
    assert "test_std/bbox_mAP" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    ensemble = [r for r in children if r.data.tags.get("orch.kind") == "kfold-ensemble"]
    assert len(ensemble) == 1 and ensemble[0].info.status == "FINISHED"
    assert {"ensemble/bbox_mAP", "ensemble_none/bbox_mAP", "folds_mean/bbox_mAP"} <= set(ensemble[0].data.metrics)
    assert sorted(r.data.tags.get("fold") for r in children if "fold" in r.data.tags) == ["0", "1"]
