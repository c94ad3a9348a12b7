"""``orch status`` for many jobs: one row per job, Slurm array, k-fold set and sweep with state
counts; expansion of a group; filters; ``--json``; plain lines for a long listing."""

import json
import time

import pytest

from cluster.errors import ConfigError
from orchestrator import jobview, records
from orchestrator.cli import main as cli
from orchestrator.spec import JobState


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", "/nonexistent")  # no Slurm here: its jobs keep their stored states
    return tmp_path / "home"


def make(name, state=JobState.SUCCEEDED, backend="local", output_dir=None, native_id=None, extra=None):
    r = records.create_record(name=name, backend=backend, output_dir=output_dir or f"/out/{name}",
                              config_path="/c.yaml", native_id=native_id, extra=extra)
    if state is not JobState.PENDING:
        records.transition(r.job_id, JobState.RUNNING)
    if state.finished:
        records.transition(r.job_id, state, exit_code=0 if state is JobState.SUCCEEDED else 1)
    return records.load_record(r.job_id)


def kfold_set(states):
    return [make(f"tiny/lr={i // 5}/fold-{i % 5}", s, output_dir=f"/w/kfold-0a1b2c3d4e/lr={i // 5}/fold-{i % 5}")
            for i, s in enumerate(states)]


def test_a_set_reads_as_one_line_with_state_counts(capsys):
    kfold_set([JobState.SUCCEEDED] * 7 + [JobState.RUNNING] * 2 + [JobState.PENDING])
    single = make("alone", JobState.FAILED)
    rows = jobview.rows_of(records.list_records())
    assert [(r.kind, r.key) for r in rows] == [("job", single.job_id), ("kfold", "kfold-0a1b2c3d4e")]
    assert rows[1].counts_text() == "7 SUCCEEDED · 2 RUNNING · 1 PENDING"
    assert rows[1].state is JobState.RUNNING and rows[1].name == "tiny" and rows[1].progress is None
    assert cli(["status"]) == 0
    out = capsys.readouterr().out
    assert "kfold-0a1b2c3d4e" in out and "7 SUCCEEDED · 2 RUNNING · 1 PENDING" in out
    assert "/fold-" not in out and len(out.splitlines()) == 3  # header, the job, the set: no line per trial


def test_set_and_array_expand_to_their_jobs(capsys):
    trials = kfold_set([JobState.SUCCEEDED] * 3)
    tasks = [make(f"grid-{i}", JobState.PENDING, backend="slurm", native_id=f"4711_{i}") for i in range(3)]
    rows = jobview.rows_of(records.list_records())
    assert {r.key: r.counts_text() for r in rows} == {"kfold-0a1b2c3d4e": "3 SUCCEEDED", "array-4711": "3 PENDING"}
    assert [r.name for r in rows if r.kind == "array"] == ["grid"]
    for key in ("kfold-0a1b2c3d4e", "0a1b2c3d4e"):
        assert cli(["status", key]) == 0
        out = capsys.readouterr().out
        assert all(t.job_id in out for t in trials) and not any(t.job_id in out for t in tasks)
    assert cli(["status", "array-4711", "--json"]) == 0
    assert sorted(o["job_id"] for o in json.loads(capsys.readouterr().out)) == sorted(t.job_id for t in tasks)


def test_sweep_row_counts_its_trials():
    make("sweep", JobState.RUNNING, backend="ray",
         extra={"kind": "sweep", "trials": {"a": {"status": "TERMINATED"}, "b": {"status": "RUNNING"},
                                            "c": {"status": "ERROR"}, "d": {"status": "PENDING"}}})
    [row] = jobview.rows_of(records.list_records())
    assert row.kind == "sweep" and row.counts_text() == "1 SUCCEEDED · 1 RUNNING · 1 PENDING · 1 FAILED"


def test_filters_and_json_keys(capsys):
    make("alpha-1", JobState.SUCCEEDED)
    make("alpha-2", JobState.FAILED)
    make("beta", JobState.RUNNING, backend="slurm", native_id="12")
    assert cli(["status", "--json", "--state", "failed,succeeded", "--name", "alpha"]) == 0
    objs = json.loads(capsys.readouterr().out)
    assert sorted(o["name"] for o in objs) == ["alpha-1", "alpha-2"]
    assert all(tuple(o) == jobview.JSON_KEYS for o in objs)
    assert cli(["status", "--json", "--backend", "slurm"]) == 0
    [beta] = json.loads(capsys.readouterr().out)
    assert beta["name"] == "beta" and beta["state"] == "RUNNING" and beta["native_id"] == "12"
    assert cli(["status", "--json", "--name", "alpha-?"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert cli(["status", "--since", "1h", "--state", "cancelled"]) == 0
    assert capsys.readouterr().out.strip() == "no jobs match"
    assert cli(["status", "--state", "done"]) == 2
    assert "not a job state" in capsys.readouterr().err


def test_since_parses_durations_and_dates():
    now = 1_000_000.0
    assert jobview.parse_since("2h", now) == now - 7200
    assert jobview.parse_since("3d", now) == now - 3 * 86400
    assert jobview.parse_since("2026-12-01") == time.mktime(time.strptime("2026-12-01", "%Y-%m-%d"))
    with pytest.raises(ConfigError, match="--since"):
        jobview.parse_since("yesterday")


def test_a_long_listing_is_plain_lines(capsys, monkeypatch):
    from orchestrator.commands import jobs as jobs_cmd

    monkeypatch.setattr(jobs_cmd, "RICH_ROWS", 3)
    for i in range(5):
        make(f"job-{i}")
    monkeypatch.setattr("rich.table.Table.add_row", lambda *a, **k: pytest.fail("rich used for a long listing"))
    assert cli(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["JOB", "ID", "NAME", "BACKEND", "STATE"] and len(lines) == 6
    assert all("SUCCEEDED" in line for line in lines[1:])


def test_a_running_job_shows_its_step_speed_and_eta(tmp_path, capsys):
    """The STATE cell and --json of a running job carry its ranks' heartbeat progress (issue 20's
    live progress in issue 18's view); an ended job's folder is not read."""
    from types import SimpleNamespace

    from detection.hooks import HeartbeatHook

    out_dir = tmp_path / "run"
    hook = HeartbeatHook(str(out_dir), 0, unit="iter", eval_period=100, tick_s=0.05)
    hook.before_train(SimpleNamespace(iter=0, max_iters=400, iters_per_epoch=100, epoch=0))
    for step in range(1, 121):
        hook.after_iter(SimpleNamespace(iter=step, max_iters=400, iters_per_epoch=100, epoch=0),
                        {"time": 0.25, "images": 8.0})
    running = make("live", JobState.RUNNING, output_dir=str(out_dir))
    ended = make("done", JobState.SUCCEEDED, output_dir=str(out_dir))
    assert cli(["status"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if running.job_id in l)
    # 280 steps left at 0.25 s; img/s is measured over the beats' wall times (here written at once)
    assert "RUNNING step 120/400" in line and "ETA 0:01:10" in line
    assert cli(["status", "--json"]) == 0
    rows = {r["job_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[running.job_id]["progress"]["step"] == 120 and rows[running.job_id]["progress"]["total"] == 400
    assert rows[ended.job_id]["progress"] is None
    assert cli(["status", running.job_id]) == 0
    assert "step 120/400" in capsys.readouterr().out


def test_runs_waiting_for_the_shipper_are_listed(tmp_path, capsys):
    """A journal registered with this host's shipper and not shipped yet shows under the jobs
    (issue 18: `orch status` shows what is waiting to be shipped)."""
    from detection.journal import Journal
    from orchestrator.tracking import registry

    make("one", JobState.SUCCEEDED)
    assert cli(["status"]) == 0
    assert "waiting to be shipped" not in capsys.readouterr().out
    run = tmp_path / "run"
    Journal.create(str(run / "journal"), experiment="tiny", run_name="one").close()
    registry.register(str(run / "journal"), f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert cli(["status"]) == 0
    out = capsys.readouterr().out
    assert "MLflow: 1 run(s) waiting to be shipped" in out and str(run) in out
