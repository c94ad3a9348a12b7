"""One live job per output folder: a second submission into the folder of a pending or running
job is refused before it writes anything (its config, journal and checkpoints would mix with the
live job's); once that job has ended the folder is free again."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.errors import LaunchError
from orchestrator import records
from orchestrator.launch import ResourceFlags
from orchestrator.spec import JobState
from orchestrator.submit import submit

pytestmark = pytest.mark.usefixtures("local_orch_env")


def test_a_second_job_into_a_live_jobs_folder_is_refused(make_experiment, tmp_path):
    path = make_experiment(**{"schedule.iterations": 100000, "eval.interval": 100000})
    _, [first] = submit([str(path)], (), ResourceFlags(backend="local"))
    config = tmp_path / "work" / "config.yaml"
    before = config.read_text()
    journal_events = (tmp_path / "work" / "journal" / "events.jsonl")
    with pytest.raises(LaunchError, match=rf"output folder {tmp_path / 'work'} belongs to job {first.job_id} "
                                          r"\((PENDING|RUNNING)\).*orch cancel") as err:
        submit([str(path)], (), ResourceFlags(backend="local"), dry_run=False)
    assert "\n" not in str(err.value)
    assert config.read_text() == before  # nothing of the refused job was written
    assert len(records.list_records()) == 1
    # `orch train` in this process would train into the same folder: refused alike
    from orchestrator.cli import main as orch

    assert orch(["train", str(path)]) == 2
    assert config.read_text() == before and len(records.list_records()) == 1
    first.cancel()
    assert first.wait(60) == JobState.CANCELLED
    # The folder is free again: a resumed run of the same experiment may use it.
    _, [second] = submit([str(path)], ("runtime.resume=auto", "schedule.iterations=2"), ResourceFlags(backend="local"))
    assert second.wait(300) == JobState.SUCCEEDED, Path(second.record().log_path).read_text()[-2000:]
    assert journal_events.exists()


def test_a_dead_submitter_does_not_hold_the_folder(make_experiment, tmp_path):
    import subprocess
    import sys

    from cluster.files import write_json_atomic
    from orchestrator.outputs import OWNER_FILE, check_free

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    folder = tmp_path / "work"
    folder.mkdir()
    import socket

    write_json_atomic(folder / OWNER_FILE, {"submitter": proc.pid, "host": socket.gethostname(), "start": "1"})
    check_free(folder)  # a submission that died half-way holds nothing
    write_json_atomic(folder / OWNER_FILE, {"submitter": 1, "host": socket.gethostname(), "start": None})
    with pytest.raises(LaunchError, match="being submitted by process 1"):  # pid 1 is alive
        check_free(folder)
