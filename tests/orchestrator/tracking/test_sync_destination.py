"""A journal records the store its run is made for: a job trained while its tracking server was
down, then ``orch sync DIR`` from a shell whose ``$MLFLOW_TRACKING_URI`` names another store,
ends as exactly one run on the job's own server (not a second one elsewhere), while this
host's shipper, still waiting for that server, ships the same journal at the same time."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from detection.journal import destination, read_events
from orchestrator.cli import main as cli
from orchestrator.tracking import registry
from orchestrator.tracking.pending import pending_shipments
from orchestrator.tracking.sync import find_journals
from ship_helpers import REPO, values_of


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_job_trained_while_its_server_was_down_syncs_to_its_own_server(make_experiment, own_server, tmp_path,
                                                                          monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = make_experiment(**{"tracking.uri": own_server.uri, "schedule.iterations": 6, "eval.interval": 6,
                              "eval.classwise": False, "checkpoint.interval": 6})
    own_server.stop(hold_port=True)
    done = subprocess.run([sys.executable, "-m", "orchestrator.worker", str(path)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-3000:]
    [journal] = find_journals([str(tmp_path / "work")])
    assert destination(journal) == own_server.uri
    [waiting] = pending_shipments()  # the host shipper waits for the server (the job has ended)
    assert waiting.journal == journal and waiting.uri == own_server.uri and waiting.shipper_pid
    assert not waiting.job_running and waiting.shipped_bytes == 0

    own_server.start()
    other = tmp_path / "elsewhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    monkeypatch.chdir(tmp_path)
    assert cli(["sync", str(tmp_path / "work")]) == 0
    assert f"-> {own_server.uri}:" in capsys.readouterr().out
    deadline = time.monotonic() + 120
    while registry.shipper_alive():  # it finds the journal shipped (by itself or by orch sync) and exits
        assert time.monotonic() < deadline, "the host shipper did not exit"
        time.sleep(0.2)

    client = MlflowClient(own_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    found = values_of(own_server.uri, run.info.run_id)
    assert found["run"].info.status == "FINISHED"
    steps = sorted(step for event in read_events(journal)[0] if event.get("t") == "metrics"
                   for _, step, values in event["v"] if "loss" in values)
    assert [step for step, _, _ in found["metrics"]["loss"]] == steps == list(range(1, 7))  # every step once
    assert not other.exists()  # nothing in the other store
