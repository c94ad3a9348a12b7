"""The hard days (slow): 32 shippers write one SQLite file at once. (A server that goes away
while a job runs is in ``test_job_outages``, end to end.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from orchestrator.tracking.cursor import load_cursor
from ship_helpers import KEYS, expected_metrics, make_journal, shipper_env, step_values, values_of

pytestmark = pytest.mark.slow


def test_32_shippers_into_one_sqlite_file(tmp_path):
    """32 jobs of a sweep, each with its own shipper process, all writing the default store
    (``sqlite:///<cwd>/mlflow.db``, no URI given) from a fresh start: the first shippers race to
    create its tables, then all of them write while their journals grow, as training writes them."""
    store = tmp_path / "store"
    store.mkdir()
    env = shipper_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    journals = [make_journal(tmp_path / f"trial{i:02d}" / "journal", experiment="sweep", run_name=f"trial{i:02d}",
                             steps=250, flush_every=50, status=None) for i in range(32)]
    procs = [subprocess.Popen([sys.executable, "-m", "orchestrator.tracking.shipper", j.folder, "--follow", "--poll",
                               "0.5"], env=env, cwd=store, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for j in journals]
    for step in range(250, 500, 50):  # training goes on: 50 more steps per job, then a pause
        for journal in journals:
            for s in range(step, step + 50):
                journal.log_metrics({k: s + i / 10 for i, k in enumerate(KEYS)}, step=s)
            journal.flush()
        time.sleep(1.0)
    for journal in journals:
        journal.set_status("FINISHED")
        journal.close()
    outputs = [p.communicate(timeout=1500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 32, "\n".join(o[-500:] for o in outputs)
    locked = sum("database is locked" in o for o in outputs)
    print(f"shippers that met 'database is locked' and retried: {locked} of 32")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    assert os.listdir(store) and os.path.exists(store / "mlflow.db")
    run_ids = [load_cursor(j.folder, uri).run_id for j in journals]
    assert len(set(run_ids)) == 32 and None not in run_ids
    for run_id in run_ids:
        found = values_of(uri, run_id)
        assert step_values(found) == expected_metrics(500) and found["run"].info.status == "FINISHED"
