"""The record index ($ORCH_HOME/jobs-index.jsonl): records listed without opening every file,
right under concurrent writers (real processes), and an ORCH_HOME written before the index
existed read without a migration step."""

import json
import multiprocessing
import os

import pytest

from orchestrator import records
from orchestrator.spec import JobState


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make(name, state=JobState.PENDING):
    record = records.create_record(name=name, backend="local", output_dir=f"/out/{name}", config_path="/c.yaml")
    if state is not JobState.PENDING:
        records.transition(record.job_id, state)
    return records.load_record(record.job_id)


def file_records():
    """The truth: every record.json, read one by one."""
    out = {}
    for folder in (records.jobs_dir()).iterdir():
        data = json.loads((folder / "record.json").read_text())
        out[data["job_id"]] = data
    return out


def test_listing_reads_the_index_not_the_files(home, monkeypatch):
    done = [make(f"done-{i}", JobState.SUCCEEDED) for i in range(5)]
    live = make("live", JobState.RUNNING)
    opened = []
    real = records.read_json
    monkeypatch.setattr(records, "read_json", lambda path: opened.append(path) or real(path))
    listed = records.list_records()
    assert {r.job_id for r in listed} == {r.job_id for r in done + [live]}
    # only the unfinished job's file is read again (the file is the truth while a job runs)
    assert opened == [records.job_dir(live.job_id) / "record.json"]


def test_an_orch_home_without_index_is_read_and_indexed(home):
    made = [make(f"old-{i}", JobState.FAILED) for i in range(4)]
    records.index_path().unlink()  # the format before the index: folders only
    assert sorted(r.job_id for r in records.list_records()) == sorted(r.job_id for r in made)
    lines = records.index_path().read_text().splitlines()
    assert len(lines) == 4  # rebuilt once from the files
    records.list_records()
    assert len(records.index_path().read_text().splitlines()) == 4  # and not again


def test_stale_index_lines_lose_to_newer_ones_and_deleted_jobs_drop(home):
    a, b = make("a"), make("b")
    records.transition(a.job_id, JobState.RUNNING)
    records.transition(a.job_id, JobState.SUCCEEDED, exit_code=0)
    records.annotate(b.job_id, mlflow_run_id="r1")
    import shutil

    shutil.rmtree(records.job_dir(b.job_id))
    [only] = records.list_records()
    assert only.job_id == a.job_id and only.state is JobState.SUCCEEDED and only.exit_code == 0


def test_a_torn_last_line_is_skipped(home):
    a = make("a", JobState.SUCCEEDED)
    with open(records.index_path(), "a") as handle:
        handle.write('{"job_id": "half')  # a writer killed mid-line
    assert [r.job_id for r in records.list_records()] == [a.job_id]
    with open(records.index_path(), "a") as handle:
        handle.write('\n')  # the torn piece now ends in a newline: one unparseable line
    make("b", JobState.SUCCEEDED)
    assert {r.name for r in records.list_records()} == {"a", "b"}


def test_compaction_keeps_one_line_per_job(home):
    a = make("a")
    for _ in range(1100):
        records.annotate(a.job_id, extra={"n": 1})
    records.list_records()  # more than 2 x jobs + 1000 lines: rewritten
    lines = records.index_path().read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["job_id"] == a.job_id


def test_a_growing_record_rewritten_often_is_compacted_by_size(home):
    """A sweep's record grows with its trials and is rewritten at each report: the index is
    compacted when superseded lines outweigh the live ones, not only when they outnumber them."""
    sweep = make("sweep")
    for n in range(80):
        records.annotate(sweep.job_id, extra={"trials": {f"t{i}": {"status": "RUNNING"} for i in range(n * 20)}})
    before = records.index_path().stat().st_size
    assert before > (1 << 20) and len(records.index_path().read_text().splitlines()) < 1000
    records.list_records()
    lines = records.index_path().read_text().splitlines()
    assert len(lines) == 1 and records.index_path().stat().st_size < before / 10


def _writer(home: str, job_ids: list, rounds: int, seed: int) -> None:
    os.environ["ORCH_HOME"] = home
    for n in range(rounds):
        for job_id in job_ids:
            records.annotate(job_id, extra={f"w{seed}": n})


def test_concurrent_writers_leave_the_index_equal_to_the_files(home):
    """Four processes rewriting the same records at once (supervisors, Slurm tasks on compute
    nodes, orch status): the index's newest line of each job equals its record.json."""
    ids = [make(f"j{i}").job_id for i in range(6)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(home), ids, 15, seed)) for seed in range(4)]
    for p in procs:
        p.start()
    listings = 0
    while any(p.is_alive() for p in procs):
        assert len(records.list_records()) == 6  # a reader never sees a job missing
        listings += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    indexed = records._read_index()
    truth = file_records()
    assert {k: indexed.row(k) for k in truth} == truth
    assert all(truth[i]["extra"] == {f"w{s}": 14 for s in range(4)} for i in ids)


def test_the_snapshot_and_the_lines_after_it_equal_the_files(home, monkeypatch):
    """The parsed index is kept in a snapshot once it is large; a listing reads the snapshot
    and parses only the lines written after it, and sees every change made since."""
    monkeypatch.setattr(records, "SNAPSHOT_LAG_BYTES", 3000)
    made = [make(f"s{i}", JobState.SUCCEEDED) for i in range(6)]
    records.list_records()
    assert records._snapshot_path().exists()
    snapshot = records._snapshot_path().read_bytes()
    late = make("late", JobState.RUNNING)
    records.transition(made[0].job_id, JobState.FAILED)  # finished stays: only its fields may fill
    records.annotate(made[1].job_id, mlflow_run_id="r-after-the-snapshot")
    listed = {r.job_id: records._to_dict(r) for r in records.list_records()}
    assert records._snapshot_path().read_bytes() == snapshot  # fewer new bytes than the lag: kept
    assert listed == file_records() and late.job_id in listed
    assert listed[made[1].job_id]["mlflow_run_id"] == "r-after-the-snapshot"


def test_a_snapshot_of_another_index_file_is_not_used(home, monkeypatch):
    """The index deleted (and rebuilt from the folders) or compacted: the old snapshot describes
    another file and is ignored, whatever its offset."""
    monkeypatch.setattr(records, "SNAPSHOT_LAG_BYTES", 100)
    a = make("a", JobState.SUCCEEDED)
    records.list_records()
    old = records._snapshot_path().read_bytes()
    import shutil

    shutil.rmtree(records.job_dir(a.job_id))
    records.index_path().unlink()
    b, c = make("b", JobState.SUCCEEDED), make("c", JobState.SUCCEEDED)
    records._snapshot_path().write_bytes(old)  # as if left over from the file before
    assert {r.name for r in records.list_records()} == {"b", "c"}
    assert records._read_index().records.keys() == {b.job_id, c.job_id}


def test_keys_of_a_newer_orch_survive_compaction(home):
    a = make("a", JobState.SUCCEEDED)
    line = json.loads(records.index_path().read_text().splitlines()[-1])
    with open(records.index_path(), "a") as handle:
        for _ in range(1100):
            handle.write(json.dumps({**line, "queue_s": 12.5}) + "\n")
    [listed] = records.list_records()  # compacted: more than 2 x jobs + 1000 lines
    assert listed.job_id == a.job_id
    [kept] = records.index_path().read_text().splitlines()
    assert json.loads(kept)["queue_s"] == 12.5
