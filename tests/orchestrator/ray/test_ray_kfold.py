"""``orch kfold --backend ray`` against a real Ray head (see conftest.py): a 2-fold set of the tiny
model whose folds run as two concurrent Ray Train jobs on the same cluster, then aggregated into
one MLflow parent run and a comparison report."""

from __future__ import annotations

import json
import threading
import time

import pytest

from orchestrator.records import load_record

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


def test_two_folds_as_concurrent_ray_jobs(ray_head, orch_home, make_experiment, tracking_uri, train_worker_pids):
    from mlflow.tracking import MlflowClient

    from orchestrator.kfold.runner import run_kfold

    path = make_experiment(**{"kfold.folds": 2, "kfold.allow_small_classes": True, "schedule.iterations": 8,
                              "eval.interval": 8, "checkpoint.interval": 8})
    lines: list[str] = []
    result: dict = {}

    def run() -> None:
        try:
            result["outcome"] = run_kfold(str(path), (f"resources.ray.address={ray_head.address}",), backend="ray",
                                          echo=lines.append, poll_s=0.5)
        except BaseException as err:  # re-raised in the test's thread below
            result["error"] = err

    # run_kfold blocks until the set is aggregated: run it aside and watch this head's workers
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    most_workers = 0
    while thread.is_alive():
        most_workers = max(most_workers, len(train_worker_pids()))
        time.sleep(0.2)
    if "error" in result:
        raise result["error"]
    outcome = result["outcome"]
    log = "\n".join(lines)
    assert sorted(outcome.launched) == ["fold-0", "fold-1"] and outcome.skipped == [], log
    # both folds trained at the same time on the one cluster: two Ray Train workers alive at once
    assert most_workers == 2, log

    state = json.loads((outcome.set_dir / "set.json").read_text())
    assert {r["status"] for r in state["trials"].values()} == {"SUCCEEDED"}, log
    records = [load_record(state["trials"][f"fold-{i}"]["job_id"]) for i in range(2)]
    assert all(r.backend == "ray" and r.extra["address"] == ray_head.address for r in records)
    # their RUNNING intervals overlap too (the records' own view of the same fact)
    assert max(r.started_at for r in records) < min(r.ended_at for r in records)

    from orch_testing import shipped_run
    from orchestrator.tracking.runs import wait_shipped

    fold_runs = [shipped_run(r) for r in records]  # by the shippers of the Ray Train workers
    parent_id = wait_shipped(state["parents"]["points"][""], tracking_uri, 120)  # by the set's shipper
    assert outcome.parent_journal == state["parents"]["points"][""]
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("tiny-tests")
    runs = client.search_runs([experiment.experiment_id], max_results=50)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(c.data.tags["fold"] for c in children) == ["0", "1"]
    assert {c.info.run_id for c in children} == {r.info.run_id for r in fold_runs}
    assert all(c.info.status == "FINISHED" for c in children)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and len(runs) == 3
    assert {"mean/bbox_mAP", "std/bbox_mAP", "oof/bbox_mAP"} <= set(parent.data.metrics)
    assert "kfold/comparison.md" in {a.path for a in client.list_artifacts(parent_id, "kfold")}

    report = outcome.set_dir / "report"
    assert (report / "comparison.md").is_file() and (report / "summary.json").is_file()
    assert "out-of-fold" in outcome.report
