"""The hard days (slow, minutes each): the tracking server goes away while a shipper follows a
running job, and 32 shippers write one SQLite file at once. MLflow's HTTP retries stay at
their defaults, as users run them."""

from __future__ import annotations

import subprocess
import time

import pytest

from detection.journal import Journal
from orchestrator.tracking.cursor import load_cursor
from ship_helpers import KEYS, expected_metrics, make_journal, shipper_command, shipper_env, step_values, values_of

pytestmark = pytest.mark.slow


def test_server_down_for_a_minute_while_shipping(tmp_path, own_server):
    """Stop the server mid-ship; training goes on and ends; restart the server 60 s later on the
    same port: the following shipper delivers every value once and the final status."""
    folder = tmp_path / "journal"
    journal = Journal.create(folder, "outage", "run")
    journal.set_status("RUNNING")
    step = 0

    def train(steps):
        nonlocal step
        for _ in range(steps):
            journal.log_metrics({k: step + i / 10 for i, k in enumerate(KEYS)}, step=step)
            step += 1
        journal.flush()

    train(100)
    shipper = subprocess.Popen(shipper_command(folder, own_server.uri, "--follow", "--poll", "0.5"),
                               env=shipper_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while load_cursor(str(folder), own_server.uri).offset == 0:
            assert time.monotonic() < deadline and shipper.poll() is None, "the shipper never shipped"
            time.sleep(0.2)
        own_server.stop()
        for _ in range(5):  # training goes on while the server is down
            train(100)
            time.sleep(0.5)
        journal.set_status("FINISHED")
        journal.close()
        time.sleep(60)
        assert shipper.poll() is None  # still waiting, nothing lost
        assert load_cursor(str(folder), own_server.uri).status != "FINISHED"
        own_server.start()
        output, _ = shipper.communicate(timeout=420)
    finally:
        if shipper.poll() is None:
            shipper.kill()
    assert shipper.returncode == 0, output[-3000:]
    found = values_of(own_server.uri, load_cursor(str(folder), own_server.uri).run_id)
    assert found["run"].info.status == "FINISHED"
    assert step_values(found) == expected_metrics(600)


def test_32_shippers_into_one_sqlite_file(tmp_path, sqlite_uri):
    """32 jobs of a sweep, each with its own shipper, all writing the default mlflow.db."""
    folders = [make_journal(tmp_path / f"trial{i:02d}" / "journal", experiment="sweep", run_name=f"trial{i:02d}",
                            steps=500, flush_every=50).folder for i in range(32)]
    procs = [subprocess.Popen(shipper_command(f, sqlite_uri, "--follow", "--poll", "0.5"), env=shipper_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for f in folders]
    outputs = [p.communicate(timeout=1500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 32, "\n".join(o[-500:] for o in outputs)
    locked = sum("database is locked" in o for o in outputs)
    print(f"shippers that met 'database is locked' and retried: {locked} of 32")
    run_ids = [load_cursor(f, sqlite_uri).run_id for f in folders]
    assert len(set(run_ids)) == 32
    for run_id in run_ids:
        found = values_of(sqlite_uri, run_id)
        assert step_values(found) == expected_metrics(500) and found["run"].info.status == "FINISHED"
