"""Real k-fold sets of the tiny model on the local backend, tracked in a SQLite MLflow store."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    # job records and the set index in this test's folder; one thread per training process
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "orch_home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _runs(tracking_uri: str, root):
    """Every run of the store, after a sync of the journals under ``root`` (idempotent with the
    shippers beside the jobs and the set: whatever they already sent is not sent again)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.sync import sync

    summary = sync([str(root)], tracking_uri)
    assert not summary.failed and not summary.pending, summary.lines()
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("tiny-tests")
    # one experiment for the whole set (MLflow always has its "Default" one)
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == ["tiny-tests"]
    return client, client.search_runs([exp.experiment_id], max_results=100)


def _children(runs, parent_id):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_folds_two_slots_then_resume(make_experiment, tracking_uri, tmp_path, capsys):
    from orchestrator.kfold.runner import run_kfold

    exp = make_experiment(**{"kfold.folds": 3, "kfold.allow_small_classes": True})
    outcome = run_kfold(str(exp), backend="local", max_parallel=2, echo=lambda s: None, poll_s=0.5)
    assert len(outcome.launched) == 3 and outcome.skipped == []
    state = json.loads((outcome.set_dir / "set.json").read_text())
    assert {r["status"] for r in state["trials"].values()} == {"SUCCEEDED"}

    from orchestrator.tracking.runs import run_id_of

    client, runs = _runs(tracking_uri, tmp_path / "work")
    parent_id = run_id_of(state["parents"]["points"][""], tracking_uri)
    parent = client.get_run(parent_id)
    children = _children(runs, parent_id)
    assert sorted(c.data.tags["fold"] for c in children) == ["0", "1", "2"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.info.status == "FINISHED"
    metrics = parent.data.metrics
    for key in ("mean/bbox_mAP", "std/bbox_mAP", "oof/bbox_mAP", "mean/bbox_mAP_50", "oof/bbox_AR_100"):
        assert key in metrics, key
    assert any(k.startswith("mean/bbox_AP/") for k in metrics)
    artifacts = {a.path for a in client.list_artifacts(parent_id, "kfold")}
    assert {"kfold/comparison.md", "kfold/comparison.csv", "kfold/boxplot.png"} <= artifacts
    # the parent's mean is the mean of the per-fold scores recomputed from the predictions
    summary = json.loads((outcome.set_dir / "report" / "summary.json").read_text())
    fold_maps = [summary["points"][0]["folds"][str(f)]["bbox_mAP"] for f in range(3)]
    assert metrics["mean/bbox_mAP"] == pytest.approx(sum(fold_maps) / 3)

    # the same command again: nothing retrained, same set, same runs
    first_mtime = {n: (outcome.set_dir / n / "config.yaml").stat().st_mtime
                   for n in ("fold-0", "fold-1", "fold-2")}
    again = run_kfold(str(exp), backend="local", max_parallel=1, echo=lambda s: None, poll_s=0.5)
    assert again.set_id == outcome.set_id and again.launched == [] and len(again.skipped) == 3
    assert {n: (again.set_dir / n / "config.yaml").stat().st_mtime for n in first_mtime} == first_mtime
    _, runs_after = _runs(tracking_uri, tmp_path / "work")
    assert len(runs_after) == len(runs) == 4

    # a missing fold (deleted predictions = failed evaluation) is retrained, alone, in its own run
    (outcome.set_dir / "fold-1" / "predictions_val.json").unlink()
    third = run_kfold(str(exp), backend="local", echo=lambda s: None, poll_s=0.5)
    assert third.launched == ["fold-1"]
    _, runs_third = _runs(tracking_uri, tmp_path / "work")
    assert len(runs_third) == 4

    # orch report finds the set by id and by folder
    capsys.readouterr()
    assert main(["report", outcome.set_id]) == 0
    out = capsys.readouterr().out
    assert "out-of-fold" in out and "bbox_mAP" in out
    assert main(["report", str(outcome.set_dir)]) == 0

    # a changed config is a new set
    changed = make_experiment(**{"kfold.folds": 3, "kfold.allow_small_classes": True, "optim.lr": 0.002})
    dry = run_kfold(str(changed), backend="local", dry_run=True, echo=lambda s: None)
    assert dry.set_id != outcome.set_id and len(dry.launched) == 3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_grid_of_two_points_times_two_folds(make_experiment, tracking_uri, tmp_path, capsys):
    exp = make_experiment(**{"kfold.folds": 2, "kfold.allow_small_classes": True,
                             "grid": {"optim.lr": [0.001, 0.002]}})
    assert main(["kfold", str(exp), "--backend", "local", "--max-parallel", "2"]) == 0
    out = capsys.readouterr().out
    assert "| **lr=0.00" in out and "| lr=0.00" in out and "p (paired t)" in out

    client, runs = _runs(tracking_uri, tmp_path / "work")
    grid = [r for r in runs if r.data.tags.get("orch.kind") == "kfold-grid"]
    assert len(grid) == 1 and grid[0].info.status == "FINISHED"
    points = _children(runs, grid[0].info.run_id)
    assert sorted(p.info.run_name for p in points) == ["lr=0.001", "lr=0.002"]
    for p in points:
        folds = _children(runs, p.info.run_id)
        assert sorted(f.data.tags["fold"] for f in folds) == ["0", "1"]
        assert {f.data.tags["optim.lr"] for f in folds} == {p.info.run_name.split("=")[1]}
        assert {"mean/bbox_mAP", "std/bbox_mAP", "oof/bbox_mAP"} <= set(p.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(grid[0].info.run_id, "kfold")}
    assert "kfold/comparison.md" in artifacts
    assert grid[0].data.tags["best_point"] in {"lr=0.001", "lr=0.002"}
    assert "best/mean/bbox_mAP" in grid[0].data.metrics


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_failed_folds_are_reported_and_retried_alone(make_experiment, tracking_uri, tmp_path):
    from cluster.errors import JobFailed
    from orchestrator.kfold.runner import run_kfold

    # the second grid point cannot load its weights: its folds fail in the worker, the first's succeed
    exp = make_experiment(**{"kfold.folds": 2, "kfold.allow_small_classes": True,
                             "grid": {"runtime.load_from": [None, str(tmp_path / "missing.pt")]}})
    with pytest.raises(JobFailed, match="2 trial"):
        run_kfold(str(exp), backend="local", max_parallel=2, echo=lambda s: None, poll_s=0.5)
    set_dir = next((tmp_path / "work").glob("kfold-*"))
    state = json.loads((set_dir / "set.json").read_text())
    status = {name: r["status"] for name, r in state["trials"].items()}
    assert status["load_from=null/fold-0"] == status["load_from=null/fold-1"] == "SUCCEEDED"
    assert {s for n, s in status.items() if "missing" in n} == {"FAILED"}
    summary = json.loads((set_dir / "report" / "summary.json").read_text())
    assert [p["name"] for p in summary["points"]] == ["load_from=null"]  # only complete points

    client, runs = _runs(tracking_uri, tmp_path / "work")
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["load_from=null"].info.status == "FINISHED"
    assert by_name[f"load_from={tmp_path / 'missing.pt'}"].info.status == "FAILED"

    with pytest.raises(JobFailed):
        run_kfold(str(exp), backend="local", max_parallel=2, echo=lambda s: None, poll_s=0.5)
    state_again = json.loads((set_dir / "set.json").read_text())
    # only the failed trials ran again, in their own runs (no new runs)
    assert {n for n, r in state_again["trials"].items() if r.get("job_id") != state["trials"][n].get("job_id")} == {
        n for n in status if "missing" in n}
    assert len(_runs(tracking_uri, tmp_path / "work")[1]) == len(runs)


def test_resume_waits_for_jobs_of_an_interrupted_run_instead_of_relaunching(tmp_path):
    import os
    import subprocess
    import sys
    from types import SimpleNamespace

    from orchestrator import records
    from orchestrator.kfold.runner import _still_running
    from orchestrator.spec import JobState

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for job_id, pid in (("alive-1", os.getpid()), ("dead-1", dead.pid)):
        records.create_record(job_id=job_id, name="tiny", backend="local", output_dir=str(tmp_path), config_path="",
                              state=JobState.RUNNING)
        records.annotate(job_id, pid=pid)
    state = {"trials": {"fold-0": {"status": "RUNNING", "job_id": "alive-1"},
                        "fold-1": {"status": "RUNNING", "job_id": "dead-1"},
                        "fold-2": {"status": "PENDING", "job_id": "never-recorded"},
                        "fold-3": {"status": "SUCCEEDED", "job_id": "alive-1"}}}
    trials = [SimpleNamespace(name=f"fold-{i}") for i in range(5)]
    running = _still_running(state, trials)
    assert list(running) == ["fold-0"] and running["fold-0"].job_id == "alive-1"
