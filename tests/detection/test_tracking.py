"""What a training run records: its journal (``detection.journal``), shipped to a real SQLite
MLflow store and read back with ``MlflowClient``. Training itself never talks to MLflow."""

from __future__ import annotations

import re
import time

import pytest
from mlflow.tracking import MlflowClient

from cluster.env import DistEnv
from cluster.errors import TrainingError
from detection.engine import Preempted
from detection.hooks import Hook
from detection.journal import last_status, read_events
from detection.journal_hook import MAX_PARAM_VALUE, flatten_params
from detection.train import main
from orchestrator.config import load_experiment
from orchestrator.tracking.runs import resolve_tracking_uri


def test_run_records_params_metrics_tags_and_artifacts(make_experiment, tracking_uri, monkeypatch, ship):
    monkeypatch.setenv("ORCH_BACKEND", "slurm")  # ignored: the orchestrator puts the backend in the tags
    exp = load_experiment(make_experiment(**{"tracking.log_checkpoints": True,
                                             "tracking.tags": {"fold": "3", "backend": "torchrun"}}))
    result = main(exp, DistEnv.single())
    client = MlflowClient(tracking_uri)
    run = ship(result.output_dir)["tiny"]
    run_id = run.info.run_id
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
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert steps == [1, 2, 3, 4]  # runtime.log_interval=1: every step, written in batches

    tags = run.data.tags
    assert tags["backend"] == "torchrun" and tags["world_size"] == "1" and tags["fold"] == "3"
    assert tags["hosts"] and tags["device"].startswith("cpu")
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["git_commit"])
    assert re.fullmatch(r"[0-9a-f]{12}", tags["config_hash"]) and tags["orch_version"] == "0.1.0"

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "eval_val.json", "per_class_ap.md", "curves.png", "checkpoints"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best_bbox_mAP.pth"]
    local = client.download_artifacts(run_id, "per_class_ap.md")
    assert "| ellipse |" in open(local).read()
    config_text = open(client.download_artifacts(run_id, "config.yaml")).read()
    assert "ssdlite320_mobilenet_v3_large" in config_text and "_base_" not in config_text
    # Artifacts live beside the SQLite file, not in the current directory's ./mlruns.
    assert str(tracking_uri[len("sqlite:///"):]).rsplit("/", 1)[0] in run.info.artifact_uri


def test_the_run_goes_to_the_experiment_files_mlflow_experiment(make_experiment, tracking_uri, ship):
    exp = load_experiment(make_experiment(**{"tracking.experiment": None}))
    result = main(exp, DistEnv.single())
    run = ship(result.output_dir)["tiny"]
    experiment = MlflowClient(tracking_uri).get_experiment(run.info.experiment_id)
    assert experiment.name == "tiny" and run.info.status == "FINISHED"
    # The kind earlier MLflow 3 UIs open on the runs table (3.17 needs the link's view too: runs.ui_url).
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_metrics_are_logged_every_log_interval_and_at_the_end(make_experiment, tracking_uri, ship):
    result = main(load_experiment(make_experiment(**{"runtime.log_interval": 3})), DistEnv.single())
    run = ship(result.output_dir)["tiny"]
    client = MlflowClient(tracking_uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [3, 4]
    assert "backend" not in run.data.tags  # no tag unless the orchestrator gave one


class Poison(Hook):
    def before_train(self, trainer):
        import torch

        with torch.no_grad():
            next(trainer.model.parameters()).fill_(float("nan"))


class StopNow(Hook):
    def should_stop(self, trainer):
        return True


@pytest.mark.parametrize("hook, error, status", [(Poison(), TrainingError, "FAILED"), (StopNow(), Preempted, "KILLED")])
def test_failed_and_preempted_runs_get_their_status(make_experiment, tmp_path, ship, hook, error, status):
    exp = load_experiment(make_experiment())
    with pytest.raises(error):
        main(exp, DistEnv.single(), hooks=[hook])
    assert last_status(tmp_path / "work" / "journal") == status  # durable before the exception left
    assert [r.info.status for r in ship(tmp_path / "work").values()] == [status]


def test_resume_continues_the_same_run(make_experiment, tracking_uri, ship):
    exp = load_experiment(make_experiment())
    with pytest.raises(Preempted):
        main(exp, DistEnv.single(), hooks=[StopNow()])
    first = ship(exp.runtime.output_dir)  # shipped in between, as a shipper beside the job would
    assert [r.info.status for r in first.values()] == ["KILLED"]
    exp = load_experiment(make_experiment(**{"runtime.resume": "auto"}))
    main(exp, DistEnv.single())
    runs = ship(exp.runtime.output_dir)
    assert list(runs) == ["tiny"] and runs["tiny"].info.run_id == first["tiny"].info.run_id
    assert runs["tiny"].info.status == "FINISHED"
    history = MlflowClient(tracking_uri).get_metric_history(runs["tiny"].info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]


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


def test_an_unreachable_tracking_server_costs_training_nothing(make_experiment, ship, tmp_path):
    """Before, a closed port cost 4 min 10 s of HTTP retries and then failed the job: training now
    only writes its journal; the values reach any store later (here a SQLite file)."""
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exp = load_experiment(make_experiment(**{"tracking.uri": f"http://127.0.0.1:{port}"}))
    started = time.monotonic()
    result = main(exp, DistEnv.single())
    assert time.monotonic() - started < 120 and result.metrics["bbox_mAP"] >= 0
    events, _ = read_events(tmp_path / "work" / "journal")
    assert {e["t"] for e in events} >= {"params", "tags", "metrics", "artifact", "status"}
    run = ship(tmp_path / "work")["tiny"]
    assert run.info.status == "FINISHED" and "bbox_mAP" in run.data.metrics


def test_config_hash_tag_equals_what_orch_config_prints(make_experiment, ship, capsys):
    """One serialisation for both sides: the hash on the MLflow run is the one `orch config --json`
    shows for the same file (they used to be computed by two drifted copies)."""
    import json

    from orchestrator.cli import main as cli_main

    path = make_experiment()
    result = main(load_experiment(path), DistEnv.single())
    tag = ship(result.output_dir)["tiny"].data.tags["config_hash"]
    capsys.readouterr()
    assert cli_main(["config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["derived"]["config_hash"] == tag


class FlushThenDie(Hook):
    """At iteration ``at``: the journal is flushed (its 10 s timer fired), then the process dies
    (in-process: an interrupt; the journal then ends KILLED, as orch ends a killed job's run)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.durable_steps: dict[int, int] = {}  # checkpointed iteration -> last step on disk then

    def after_checkpoint(self, trainer, path):
        self.checkpointed = trainer.iter

    def after_iter(self, trainer, log_values):
        from detection.journal import last_steps

        journal = next(h.journal for h in trainer.hooks if hasattr(h, "journal"))
        if getattr(self, "checkpointed", None) == trainer.iter:  # the end of a checkpointed step
            self.durable_steps[trainer.iter] = last_steps(journal.folder).get("loss", 0)
        if trainer.iter == self.at:
            journal.flush()
            raise KeyboardInterrupt


def test_a_resumed_run_logs_each_step_once(make_experiment, tracking_uri, ship):
    """Killed at step 6 with steps 5-6 in the journal and the last checkpoint at step 4: the
    checkpointed step's values were on disk with the checkpoint, and the resumed run (from step 4)
    does not log steps 5-6 again."""
    exp = load_experiment(make_experiment(**{"schedule.iterations": 8, "checkpoint.interval": 4,
                                             "eval.interval": 8}))
    dying = FlushThenDie(at=6)
    with pytest.raises(KeyboardInterrupt):
        main(exp, DistEnv.single(), hooks=[dying])
    assert dying.durable_steps == {4: 4}
    exp = load_experiment(make_experiment(**{"schedule.iterations": 8, "checkpoint.interval": 4,
                                             "eval.interval": 8, "runtime.resume": "auto"}))
    main(exp, DistEnv.single())
    run = ship(exp.runtime.output_dir)["tiny"]
    client = MlflowClient(tracking_uri)
    for key in ("loss", "lr", "images_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, 9)), key
    assert run.info.status == "FINISHED"
