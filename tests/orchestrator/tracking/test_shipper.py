"""Shipping journals to a real SQLite store and a real ``mlflow server``: everything arrives,
once, however often and wherever the shipper is interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from detection.journal import EVENTS, Journal, read_meta
from orchestrator.tracking.cursor import cursor_path, load_cursor, shipped_run_id
from orchestrator.tracking.shipper import ship, ship_forever
from orchestrator.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, JOURNAL_TAG

from ship_helpers import KEYS, expected_metrics, make_journal, shipper_command, shipper_env, step_values, values_of


def test_the_store_keeps_one_row_per_identical_metric(destination):
    """The fact the cursor protocol relies on: MLflow's SQL store (directly and behind the
    server) drops a metric row identical to one it has, and accepts an identical param again."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=destination)
    run = client.create_run(client.create_experiment(f"dedup-{time.time_ns()}"))
    batch = dict(metrics=[Metric("loss", 0.5, 1000, 1), Metric("loss", 0.25, 2000, 2)], params=[Param("lr", "0.1")])
    client.log_batch(run.info.run_id, **batch)
    client.log_batch(run.info.run_id, **batch)  # sent again: a crash before the cursor was saved
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.25)]


def test_ship_records_everything_once(tmp_path, destination):
    journal = make_journal(tmp_path / "out" / "journal", experiment=f"ship-{time.time_ns()}", steps=30)
    first = ship(journal.folder, destination)
    assert first.created_run and first.done and first.status == "FINISHED" and first.warnings == ()
    assert first.values == 1 + 2 + 30 * len(KEYS) and first.artifacts == 1
    assert first.offset == first.size == (Path(journal.folder) / EVENTS).stat().st_size

    found = values_of(destination, first.run_id)
    run = found["run"]
    meta = read_meta(journal.folder)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.info.start_time == meta["created_ms"]
    status_ts = [json.loads(line)["ts"] for line in open(Path(journal.folder) / EVENTS) if '"status"' in line]
    assert run.info.end_time == status_ts[-1]
    assert found["params"] == {"optim.lr": "0.01", "model.type": "ssdlite"}
    assert found["tags"]["backend"] == "test" and found["tags"][JOURNAL_TAG] == journal.id
    assert step_values(found) == expected_metrics(30)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=destination)
    assert client.get_experiment(first.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    local = client.download_artifacts(first.run_id, "config.yaml", str(tmp_path))
    assert Path(local).read_text() == "name: run\n"

    again = ship(journal.folder, destination)
    assert (again.run_id, again.created_run, again.values, again.artifacts) == (first.run_id, False, 0, 0)
    assert shipped_run_id(journal.folder, destination) == first.run_id

    # The job is requeued: it appends to the same journal; only the new lines are shipped.
    resumed = Journal.open(journal.folder)
    resumed.set_status("RUNNING")
    for step in range(30, 40):
        resumed.log_metrics({k: step + i / 10 for i, k in enumerate(KEYS)}, step=step)
    resumed.flush()
    middle = ship(journal.folder, destination)
    assert middle.values == 10 * len(KEYS) and middle.status == "RUNNING" and not middle.done
    assert values_of(destination, first.run_id)["run"].info.status == "RUNNING"
    resumed.set_status("FAILED")
    resumed.close()
    last = ship(journal.folder, destination)
    assert last.done and last.status == "FAILED"
    assert step_values(values_of(destination, first.run_id)) == expected_metrics(40)


def test_a_batch_sent_again_after_a_crash_writes_nothing_twice(tmp_path, destination):
    """The state a crash between ``log_batch`` and the cursor save leaves: the store has the
    batch, the cursor does not. Recreated exactly by putting an older cursor back."""
    folder = tmp_path / "journal"
    journal = make_journal(folder, experiment=f"crash-{time.time_ns()}", steps=20, status=None)
    ship(folder, destination)
    saved = Path(cursor_path(str(folder), destination)).read_bytes()
    for step in range(20, 600):  # > 1000 values: several batches
        journal.log_metrics({k: step + i / 10 for i, k in enumerate(KEYS)}, step=step)
    journal.set_status("FINISHED")
    journal.close()
    done = ship(folder, destination)
    Path(cursor_path(str(folder), destination)).write_bytes(saved)  # "the cursor was never saved"
    again = ship(folder, destination)
    assert again.values == done.values and again.run_id == done.run_id and again.done
    assert step_values(values_of(destination, done.run_id)) == expected_metrics(600)


def test_run_is_found_by_its_journal_id_when_the_cursor_is_lost(tmp_path, sqlite_uri):
    """A crash between creating the run and saving the cursor, or a run folder copied to
    another machine and synced to the same store: the shipper finds the run, makes no other."""
    folder = tmp_path / "journal"
    make_journal(folder, steps=10)
    first = ship(folder, sqlite_uri)
    copy = tmp_path / "laptop" / "journal"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "cursors")
    second = ship(copy, sqlite_uri)
    assert second.run_id == first.run_id and not second.created_run
    assert step_values(values_of(sqlite_uri, first.run_id)) == expected_metrics(10)
    from mlflow.tracking import MlflowClient

    assert len(MlflowClient(tracking_uri=sqlite_uri).search_runs([first.experiment_id])) == 1


def test_values_the_store_refuses_do_not_block_the_journal(tmp_path, sqlite_uri):
    journal = Journal.create(tmp_path / "journal", "refusals", "run")
    journal.log_params({"optim.lr": "0.01"})
    journal.log_metrics({"loss": 1.0, "bad/../key": 2.0}, step=1)
    journal.log_params({"optim.lr": "0.02", "runtime.resume": "True"})  # a resumed job, edited
    journal.set_status("FINISHED")
    journal.close()
    result = ship(journal.folder, sqlite_uri)
    assert result.done
    assert any("bad/../key" in w for w in result.warnings)
    assert any("optim.lr kept its first value '0.01'" in w for w in result.warnings)
    found = values_of(sqlite_uri, result.run_id)
    assert found["params"] == {"optim.lr": "0.01", "runtime.resume": "True"}
    assert step_values(found) == {"loss": [(1, 1.0)]}


def test_a_line_over_one_batch_and_a_torn_line(tmp_path, sqlite_uri):
    keys = tuple(f"k{i}" for i in range(25))
    journal = Journal.create(tmp_path / "journal", "big-lines", "run")
    for step in range(100):  # 2500 values in one line: the cursor moves inside it
        journal.log_metrics({k: step + i / 10 for i, k in enumerate(keys)}, step=step)
    journal.flush()
    journal.close()
    with open(Path(journal.folder) / EVENTS, "ab") as handle:
        handle.write(b'{"t": "metrics", "v": [[1, 1, {"torn')  # a writer killed mid-line
    with Journal.open(journal.folder) as resumed:
        resumed.log_metrics({"k0": -1.0}, step=100)
        resumed.set_status("FINISHED")
    result = ship(journal.folder, sqlite_uri)
    assert result.done and result.values == 2501
    expected = expected_metrics(100, keys)
    expected["k0"].append((100, -1.0))
    assert step_values(values_of(sqlite_uri, result.run_id)) == expected


def test_missing_artifact_is_reported(tmp_path, sqlite_uri):
    journal = Journal.create(tmp_path / "out" / "journal", "artifacts", "run")
    plot = tmp_path / "out" / "curves.png"
    plot.write_bytes(b"png")
    journal.log_artifact(plot)
    journal.set_status("FINISHED")
    journal.close()
    plot.unlink()
    result = ship(journal.folder, sqlite_uri)
    assert result.done and result.artifacts == 0
    assert result.warnings == (f"artifact {plot} is gone; not uploaded",)


def test_follow_ships_while_training_writes(tmp_path, sqlite_uri):
    folder = tmp_path / "journal"
    journal = Journal.create(folder, "follow", "run")

    def train():
        journal.set_status("RUNNING")
        for step in range(40):
            journal.log_metrics({"loss": 1 / (step + 1)}, step=step)
            if step % 10 == 9:
                journal.flush()
                time.sleep(0.3)
        journal.set_status("FINISHED")
        journal.close()

    writer = threading.Thread(target=train)
    writer.start()
    result = ship_forever(str(folder), sqlite_uri, poll_s=0.1)
    writer.join()
    assert result.done and result.status == "FINISHED"
    history = values_of(sqlite_uri, result.run_id)["metrics"]["loss"]
    assert [s for s, _, _ in history] == list(range(40))


def test_follow_stops_when_told(tmp_path, sqlite_uri):
    folder = tmp_path / "journal"
    Journal.create(folder, "follow", "run").close()  # training never ends its run
    started = time.monotonic()
    result = ship_forever(str(folder), sqlite_uri, stop_when=lambda: time.monotonic() - started > 1.0, poll_s=0.1)
    assert result is not None and not result.done and result.run_id


def test_shipper_killed_9_mid_ship_then_restarted(tmp_path, destination):
    """The shipper process is killed -9 while it ships (between and inside lines); the next
    one resumes from the cursor: every value once, final status right."""
    keys = tuple(f"k{i}" for i in range(10))
    folder = tmp_path / "journal"
    journal = Journal.create(folder, f"kill9-{time.time_ns()}", "run")
    journal.set_status("RUNNING")
    for step in range(1200):  # 12000 values in lines of 1500: 12 batches
        journal.log_metrics({k: step + i / 10 for i, k in enumerate(keys)}, step=step)
        if step % 150 == 149:
            journal.flush()
    journal.set_status("FINISHED")
    journal.close()
    size = (folder / EVENTS).stat().st_size

    proc = subprocess.Popen(shipper_command(folder, destination), env=shipper_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while load_cursor(str(folder), destination).offset < size // 3 and proc.poll() is None:
            assert time.monotonic() < deadline, "the shipper made no progress"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    cut = load_cursor(str(folder), destination)
    assert 0 < cut.offset < size, "killed too late to test anything"
    rerun = subprocess.run(shipper_command(folder, destination), env=shipper_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    found = values_of(destination, cut.run_id)
    assert found["run"].info.status == "FINISHED"
    assert step_values(found) == expected_metrics(1200, keys)


def test_shipper_process_stops_with_the_process_it_watches_or_on_sigterm(tmp_path, sqlite_uri):
    """A launcher's two ways to end a shipper whose run never got a final status: the watched
    process (``--until-pid``) exits, or SIGTERM. Either way one last pass ships what is there."""
    watched = subprocess.Popen(["sleep", "600"])
    journals = [make_journal(tmp_path / name / "journal", run_name=name, steps=5, status=None)
                for name in ("until_pid", "sigterm")]
    shippers = [subprocess.Popen(shipper_command(journals[0].folder, sqlite_uri, "--follow", "--poll", "0.2",
                                                 "--until-pid", str(watched.pid)), env=shipper_env()),
                subprocess.Popen(shipper_command(journals[1].folder, sqlite_uri, "--follow", "--poll", "0.2"),
                                 env=shipper_env())]
    try:
        deadline = time.monotonic() + 300
        while not all(load_cursor(j.folder, sqlite_uri).offset for j in journals):
            assert time.monotonic() < deadline, "the shippers never shipped"
            time.sleep(0.2)
        for journal in journals:  # training logs a last value, then dies without a final status
            journal.log_metrics({"loss": -1.0}, step=99)
            journal.flush()
        time.sleep(1.0)
        assert [s.poll() for s in shippers] == [None, None]  # following: no final status yet
        watched.kill()
        watched.wait()
        shippers[1].send_signal(signal.SIGTERM)
        assert [s.wait(timeout=120) for s in shippers] == [0, 0]
    finally:
        for proc in shippers + [watched]:
            if proc.poll() is None:
                proc.kill()
    for journal in journals:
        found = values_of(sqlite_uri, load_cursor(journal.folder, sqlite_uri).run_id)
        assert found["run"].info.status == "RUNNING" and found["metrics"]["loss"][-1][0] == 99


def test_follow_probes_a_closed_port_instead_of_waiting_in_http_retries(tmp_path, caplog):
    """A server that is down: no MLflow call waits minutes in its HTTP retries; the shipper looks
    at the port every few seconds, and stops at once when told (the values stay in the journal)."""
    import logging

    from ship_helpers import _free_port

    folder = make_journal(tmp_path / "journal", steps=5).folder
    uri = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking.shipper"):
        result = ship_forever(folder, uri, stop_when=lambda: time.monotonic() - started > 7.0, poll_s=0.1)
    assert result is None and time.monotonic() - started < 60  # MLflow's own retries: 4 min
    assert len([r for r in caplog.records if "does not answer; the journal keeps" in r.message]) == 1
    assert not os.path.exists(cursor_path(folder, uri))  # nothing was sent


def test_a_cursor_is_never_saved_into_a_deleted_journal(tmp_path):
    """A shipper between passes over a journal that was just deleted gets FileNotFoundError (and
    drops the journal) instead of making ``journal/cursors`` again where the user deleted it."""
    import pytest

    from orchestrator.tracking.cursor import Cursor, cursor_lock, save_cursor

    journal, uri = tmp_path / "run" / "journal", f"sqlite:///{tmp_path}/x.db"
    with pytest.raises(FileNotFoundError):
        save_cursor(str(journal), Cursor(uri))
    with pytest.raises(FileNotFoundError):
        with cursor_lock(str(journal), uri):
            pass
    assert not (tmp_path / "run").exists()
    journal.mkdir(parents=True)  # an existing journal gets its cursors folder
    save_cursor(str(journal), Cursor(uri, run_id="r1"))
    assert load_cursor(str(journal), uri).run_id == "r1"
