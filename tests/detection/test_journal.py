"""The run journal: what is written is read back exactly, a writer killed mid-line spoils
nothing, and a resumed job appends to the same journal."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from detection.journal import EVENTS, Journal, is_journal, last_status, read_entries, read_events, read_meta

REPO = Path(__file__).resolve().parents[2]


def test_round_trip(tmp_path):
    folder = tmp_path / "out" / "journal"
    artifact = tmp_path / "out" / "curves.png"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"png")
    with Journal.create(folder, "exp", "run-a", tags={"backend": "local"}) as journal:
        journal.set_status("RUNNING")
        journal.log_params({"optim.lr": 0.01, "model.type": "ssd"})
        journal.log_metrics({"loss": 1.5, "lr": 0.01}, step=1, timestamp_ms=1000)
        journal.log_metrics({"loss": float("nan"), "bbox_mAP": 0.25}, step=2, timestamp_ms=2000)
        journal.log_text("a: 1\n", "config/config.yaml")
        journal.log_artifact(artifact)
        journal.set_status("FINISHED", timestamp_ms=3000)

    meta = read_meta(folder)
    assert meta["experiment"] == "exp" and meta["run_name"] == "run-a" and meta["parent"] is None
    assert len(meta["journal_id"]) == 32 and meta["journal_id"] == journal.id
    events, offset = read_events(folder)
    assert offset == (folder / EVENTS).stat().st_size
    assert [e["t"] for e in events] == ["tags", "status", "params", "metrics", "artifact", "artifact", "status"]
    assert events[0]["tags"] == {"backend": "local"}
    assert events[2]["params"] == {"optim.lr": "0.01", "model.type": "ssd"}
    # Buffered metric values of both steps are one line, written by the next event.
    (ts1, step1, values1), (ts2, step2, values2) = events[3]["v"]
    assert (ts1, step1, values1) == (1000, 1, {"loss": 1.5, "lr": 0.01})
    assert (ts2, step2) == (2000, 2) and math.isnan(values2["loss"]) and values2["bbox_mAP"] == 0.25
    text = events[4]
    assert text["artifact_path"] == "config" and Path(text["path"]).read_text() == "a: 1\n"
    assert text["rel"] == "files/config/config.yaml"
    assert events[5]["path"] == str(artifact) and events[5]["rel"] == "../curves.png"
    assert events[6] == {"t": "status", "ts": 3000, "status": "FINISHED"}
    assert last_status(folder) == "FINISHED" and is_journal(folder) and not is_journal(tmp_path)


def test_metrics_wait_for_flush_and_readers_only_see_complete_lines(tmp_path):
    journal = Journal.create(tmp_path / "j", "exp", "run")
    start = read_events(journal.folder)[1]
    journal.log_metrics({"loss": 1.0}, step=1)
    assert read_events(journal.folder, start) == ([], start)
    journal.flush()
    events, offset = read_events(journal.folder, start)
    assert [e["v"][0][2] for e in events] == [{"loss": 1.0}]
    # A line being written (no newline yet) is left for the next read.
    with open(Path(journal.folder) / EVENTS, "ab") as handle:
        handle.write(b'{"t": "tags", "tags": {"a": "1"}')
    assert read_events(journal.folder, offset) == ([], offset)
    with open(Path(journal.folder) / EVENTS, "ab") as handle:
        handle.write(b"}\n")
    assert read_events(journal.folder, offset)[0] == [{"t": "tags", "tags": {"a": "1"}}]


def test_read_entries_in_bounded_chunks(tmp_path):
    journal = Journal.create(tmp_path / "j", "exp", "run")
    for step in range(200):
        journal.log_metrics({"loss": step}, step=step)
        journal.flush()
    journal.close()
    offset, steps = 0, []
    while True:
        entries, offset = read_entries(journal.folder, offset, max_bytes=100)
        if not entries:
            break
        steps += [e.event["v"][0][1] for e in entries]
    assert steps == list(range(200))


WRITER = textwrap.dedent("""
    import os, sys, time
    from detection.journal import Journal
    journal = Journal.open(sys.argv[1])
    journal.log_metrics({"loss": 1.0}, step=1)
    journal.flush()
    real_write = os.write

    def torn_write(fd, data):  # write half of the next line, then hang until killed
        real_write(fd, bytes(data)[: len(data) // 2])
        print("torn", flush=True)
        time.sleep(600)

    os.write = torn_write
    journal.log_metrics({"loss": 2.0}, step=2)
    journal.flush()
""")


def test_line_torn_by_kill_9_is_ignored_and_later_appends_are_clean(tmp_path):
    folder = tmp_path / "j"
    Journal.create(folder, "exp", "run").close()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout.readline().strip() == "torn"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    raw = (folder / EVENTS).read_bytes()
    assert not raw.endswith(b"\n")  # the writer really died mid-line
    events, offset = read_events(folder)
    assert [e["v"][0][1] for e in events if e["t"] == "metrics"] == [1]
    assert offset < len(raw)

    # The supervisor records the end of the killed job: the fragment becomes a line of its own.
    with Journal.open(folder) as journal:
        journal.log_metrics({"loss": 3.0}, step=3)
        journal.set_status("KILLED")
    entries, _ = read_entries(folder, offset)
    assert entries[0].event is None  # the torn fragment, skipped by readers
    events, _ = read_events(folder)
    assert [e["v"][0][1] for e in events if e["t"] == "metrics"] == [1, 3]
    assert last_status(folder) == "KILLED"


def test_resumed_job_appends_to_the_same_journal(tmp_path):
    parent = Journal.create(tmp_path / "set" / "journal", "exp", "kfold-set")
    first = Journal.create(tmp_path / "fold0" / "journal", "exp", "fold0", parent=parent)
    first.log_metrics({"loss": 1.0}, step=1)
    first.set_status("KILLED")  # preempted
    first.close()
    with pytest.raises(FileExistsError):
        Journal.create(tmp_path / "fold0" / "journal", "exp", "fold0")

    resumed = Journal.open(tmp_path / "fold0" / "journal")
    assert resumed.id == first.id
    resumed.set_status("RUNNING")
    resumed.log_metrics({"loss": 0.5}, step=2)
    resumed.set_status("FINISHED")
    resumed.close()
    events, _ = read_events(resumed.folder)
    assert [e.get("status") for e in events if e["t"] == "status"] == ["KILLED", "RUNNING", "FINISHED"]
    assert [e["v"][0][1] for e in events if e["t"] == "metrics"] == [1, 2]
    meta = read_meta(resumed.folder)
    assert meta["parent"] == {"journal_id": parent.id, "path": parent.folder, "rel": "../../set/journal"}
    assert json.loads((Path(resumed.folder) / "meta.json").read_text()) == meta


def test_bad_input_is_refused_at_the_call(tmp_path):
    journal = Journal.create(tmp_path / "j", "exp", "run")
    with pytest.raises(ValueError, match="RUNNING"):
        journal.set_status("DONE")
    with pytest.raises(FileNotFoundError):
        journal.log_artifact(tmp_path / "missing.png")
    with pytest.raises(ValueError):
        journal.log_text("x", "../escape.txt")
    with pytest.raises(FileNotFoundError, match="no run journal"):
        Journal.open(tmp_path / "nothing")


def test_the_journal_records_the_store_its_run_is_made_for(tmp_path):
    """``orch sync`` sends a journal where its run was meant to go: the URI is in ``meta.json``
    (None when not known, as in journals of older versions)."""
    from detection.journal import destination

    Journal.create(tmp_path / "a", "exp", "run", tracking_uri="http://mlflow.lab:5000").close()
    Journal.create(tmp_path / "b", "exp", "run").close()
    assert destination(tmp_path / "a") == "http://mlflow.lab:5000" == read_meta(tmp_path / "a")["tracking_uri"]
    assert destination(tmp_path / "b") is None
