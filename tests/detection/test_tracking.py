"""The MLflow run of a training job holds the params, metrics, tags and artifacts, read back
with ``MlflowClient`` from a real SQLite store."""

from __future__ import annotations

import re

import pytest
from mlflow.tracking import MlflowClient

from cluster.env import DistEnv
from cluster.errors import TrainingError
from detection.engine import Preempted
from detection.hooks import Hook
from detection.tracking import (
    MAX_PARAM_VALUE,
    create_run,
    flatten_params,
    resolve_tracking_uri,
)
from detection.train import main
from orchestrator.config import load_experiment


def test_run_records_params_metrics_tags_and_artifacts(make_experiment, tracking_uri, monkeypatch):
    monkeypatch.setenv("ORCH_BACKEND", "slurm")  # ignored: the orchestrator puts the backend in the tags
    exp = load_experiment(make_experiment(**{"tracking.log_checkpoints": True,
                                             "tracking.tags": {"fold": "3", "backend": "torchrun"}}))
    result = main(exp, DistEnv.single())
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["optim.lr"] == "0.001" and params["model.type"] == "ssdlite320_mobilenet_v3_large"
    assert params["schedule.iterations"] == "4" and params["tracking.uri"] == tracking_uri
    assert params == flatten_params(exp)  # every key of the resolved config

    metrics = run.data.metrics
    for key in ("loss", "loss_classification", "loss_bbox_regression", "lr", "images_per_s", "bbox_mAP",
                "bbox_mAP_50", "bbox_AR_100", "bbox_AP/ellipse", "best/bbox_mAP", "best_epoch"):
        assert key in metrics, key
    assert metrics["bbox_mAP"] == pytest.approx(result.metrics["bbox_mAP"])
    assert metrics["best/bbox_mAP"] == pytest.approx(result.best["value"])
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
    assert steps == [1, 2, 3, 4]  # runtime.log_interval=1: every step, written in batches

    tags = run.data.tags
    assert tags["backend"] == "torchrun" and tags["world_size"] == "1" and tags["fold"] == "3"
    assert tags["hosts"] and tags["device"].startswith("cpu")
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["git_commit"])
    assert re.fullmatch(r"[0-9a-f]{12}", tags["config_hash"]) and tags["orch_version"] == "0.1.0"

    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "eval_val.json", "per_class_ap.md", "curves.png", "checkpoints"} <= artifacts
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoints")] == ["checkpoints/best_bbox_mAP.pth"]
    local = client.download_artifacts(result.run_id, "per_class_ap.md")
    assert "| ellipse |" in open(local).read()
    config_text = open(client.download_artifacts(result.run_id, "config.yaml")).read()
    assert "ssdlite320_mobilenet_v3_large" in config_text and "_base_" not in config_text
    # Artifacts live beside the SQLite file, not in the current directory's ./mlruns.
    assert str(tracking_uri[len("sqlite:///"):]).rsplit("/", 1)[0] in run.info.artifact_uri


def test_worker_continues_the_run_created_at_submit_time(make_experiment, tracking_uri):
    exp = load_experiment(make_experiment())
    run_id = create_run(exp.tracking, exp.name, tags={"submitted_by": "orch"})
    exp = load_experiment(make_experiment(**{"tracking.run_id": run_id}))
    result = main(exp, DistEnv.single())
    assert result.run_id == run_id
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["submitted_by"] == "orch" and "loss" in run.data.metrics


def test_metrics_are_logged_every_log_interval_and_at_the_end(make_experiment, tracking_uri):
    result = main(load_experiment(make_experiment(**{"runtime.log_interval": 3})), DistEnv.single())
    client = MlflowClient(tracking_uri)
    assert [m.step for m in client.get_metric_history(result.run_id, "loss")] == [3, 4]
    assert "backend" not in client.get_run(result.run_id).data.tags  # no tag unless the orchestrator gave one


class Poison(Hook):
    def before_train(self, trainer):
        import torch

        with torch.no_grad():
            next(trainer.model.parameters()).fill_(float("nan"))


class StopNow(Hook):
    def should_stop(self, trainer):
        return True


@pytest.mark.parametrize("hook, error, status", [(Poison(), TrainingError, "FAILED"), (StopNow(), Preempted, "KILLED")])
def test_failed_and_preempted_runs_get_their_status(make_experiment, tracking_uri, hook, error, status):
    exp = load_experiment(make_experiment())
    with pytest.raises(error):
        main(exp, DistEnv.single(), hooks=[hook])
    runs = MlflowClient(tracking_uri).search_runs([MlflowClient(tracking_uri).get_experiment_by_name("tiny-tests").experiment_id])
    assert [r.info.status for r in runs] == [status]


def test_resume_continues_the_same_run(make_experiment, tracking_uri):
    exp = load_experiment(make_experiment())
    with pytest.raises(Preempted):
        main(exp, DistEnv.single(), hooks=[StopNow()])
    exp = load_experiment(make_experiment(**{"runtime.resume": "auto"}))
    result = main(exp, DistEnv.single())
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id] and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "loss")] == [1, 2, 3, 4]


def test_long_params_are_truncated_and_uri_resolution(monkeypatch):
    from types import SimpleNamespace

    params = flatten_params({"a": {"b": "x" * 7000, "c": [1, 2]}, "d": None})
    assert len(params["a.b"]) == MAX_PARAM_VALUE and params["a.b"].endswith("[truncated]")
    assert params["a.c"] == "[1, 2]" and params["d"] == "None"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(SimpleNamespace(uri=None)) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(SimpleNamespace(uri="sqlite:///x.db")) == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir("/tmp")
    assert resolve_tracking_uri(SimpleNamespace(uri=None)) == "sqlite:////tmp/mlflow.db"


def test_unreachable_tracking_server_is_one_clear_error(make_experiment, monkeypatch):
    import socket

    from cluster.errors import ConfigError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exp = load_experiment(make_experiment(**{"tracking.uri": f"http://127.0.0.1:{port}"}))
    with pytest.raises(ConfigError, match=rf"MLflow tracking at http://127.0.0.1:{port} failed: .*tracking.enable=false") as err:
        main(exp, DistEnv.single())
    assert "\n" not in str(err.value)


def test_config_hash_tag_equals_what_orch_config_prints(make_experiment, tracking_uri, capsys):
    """One serialisation for both sides: the hash on the MLflow run is the one `orch config --json`
    shows for the same file (they used to be computed by two drifted copies)."""
    import json

    from orchestrator.cli import main as cli_main

    path = make_experiment()
    result = main(load_experiment(path), DistEnv.single())
    tag = MlflowClient(tracking_uri).get_run(result.run_id).data.tags["config_hash"]
    capsys.readouterr()
    assert cli_main(["config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["derived"]["config_hash"] == tag
