"""``orch kfold --backend slurm`` (the command, through :func:`orchestrator.cli.main`) on the real
2-node local cluster (see conftest.py): a 2-fold set of the tiny model submitted as ONE job array,
its folds logging to a real MLflow server over HTTP as compute nodes would, then aggregated into
one parent run and a comparison report; run again, the finished set is resumed without a job."""

from __future__ import annotations

import json
import subprocess

import pytest

from orchestrator.records import load_record

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(300)]


def test_two_folds_as_one_job_array(slurm_cluster, write_experiment, module_orch_home, mlflow_server, tmp_path,
                                    capsys):
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main

    slurm_cluster.up(accounting=True)  # test_slurm_jobs.py ends with accounting turned off
    path = write_experiment(tmp_path, "kf", **{"kfold.folds": 2, "kfold.allow_small_classes": True,
                                               "tracking.experiment": "slurm-kfold"})
    code = main(["kfold", str(path), "--backend", "slurm", "--max-parallel", "2", "--set", "resources.partition=dev"])
    out = capsys.readouterr()
    log = out.out + out.err
    assert code == 0, log
    assert "launching 2 trial(s) on slurm" in log and "2 trained now, 0 already finished" in log, log
    [set_dir] = (tmp_path / "work").glob("kfold-*")

    # one submission: both folds are tasks of the same job array, in fold order
    state = json.loads((set_dir / "set.json").read_text())
    assert {r["status"] for r in state["trials"].values()} == {"SUCCEEDED"}, log
    records = {name: load_record(state["trials"][name]["job_id"]) for name in ("fold-0", "fold-1")}
    native = [records[n].native_id for n in ("fold-0", "fold-1")]
    array_id = native[0].split("_")[0]
    assert native == [f"{array_id}_0", f"{array_id}_1"], native
    assert all(r.backend == "slurm" for r in records.values())
    # Slurm's own accounting agrees: the two tasks belong to one array job, both COMPLETED.
    sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", array_id, "--format=JobID,State"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert sorted(sacct) == [f"{array_id}_0|COMPLETED", f"{array_id}_1|COMPLETED"], sacct

    # MLflow over HTTP: one parent FINISHED with the set's metrics, its two children FINISHED
    from orch_testing import shipped_run
    from orchestrator.tracking.runs import wait_shipped

    fold_runs = {n: shipped_run(r) for n, r in records.items()}  # by the shippers the Slurm tasks started
    parent_id = wait_shipped(state["parents"]["points"][""], mlflow_server, 120)  # by the set's shipper
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("slurm-kfold")
    runs = client.search_runs([experiment.experiment_id], max_results=50)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(c.data.tags["fold"] for c in children) == ["0", "1"]
    assert {c.info.run_id for c in children} == {r.info.run_id for r in fold_runs.values()}
    assert all(c.info.status == "FINISHED" for c in children)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and len(runs) == 3
    assert {"mean/bbox_mAP", "std/bbox_mAP", "oof/bbox_mAP"} <= set(parent.data.metrics)
    assert "kfold/comparison.md" in {a.path for a in client.list_artifacts(parent_id, "kfold")}

    report = set_dir / "report"
    assert (report / "comparison.md").is_file() and (report / "summary.json").is_file()
    assert "out-of-fold" in log and "out-of-fold" in (report / "comparison.md").read_text()

    # the same command again resumes the set: nothing is submitted, the same parent is re-aggregated
    assert main(["kfold", str(path), "--backend", "slurm", "--set", "resources.partition=dev"]) == 0
    assert "0 trained now, 2 already finished" in capsys.readouterr().out
    assert len(client.search_runs([experiment.experiment_id], max_results=50)) == 3
