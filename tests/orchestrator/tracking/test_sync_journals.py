"""``orch sync``: every journal under a folder, parents first, any number of times, to any
destination, with the parent/child links rebuilt there."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from click.testing import CliRunner

from cluster.errors import ConfigError
from detection.journal import Journal
from orchestrator.commands.sync import sync_cmd
from orchestrator.tracking.shipper import ShipPending, ship
from orchestrator.tracking.store import PARENT_TAG
from orchestrator.tracking.sync import find_journals, order_parents_first, sync
from ship_helpers import expected_metrics, make_journal, step_values, values_of


def make_tree(root, experiment):
    """A k-fold-like tree: a set parent with two fold children (which name another experiment:
    they must still land in the parent's) and one unrelated run."""
    parent = make_journal(root / "set" / "journal", experiment=experiment, run_name="set", steps=3)
    children = [make_journal(root / "set" / f"fold{i}" / "journal", experiment="elsewhere", run_name=f"fold{i}",
                             steps=20, parent=parent) for i in range(2)]
    single = make_journal(root / "single" / "journal", experiment=experiment, run_name="single", steps=20)
    return parent, children, single


def test_find_and_order_parents_first(tmp_path):
    parent, children, single = make_tree(tmp_path, "order")
    (tmp_path / "noise").mkdir()
    (tmp_path / "noise" / "meta.json").write_text("{}")  # not a journal
    found = find_journals([str(tmp_path)])
    assert sorted(found) == sorted([parent.folder, single.folder] + [c.folder for c in children])
    ordered = order_parents_first(list(reversed(found)))
    assert ordered.index(parent.folder) < min(ordered.index(c.folder) for c in children)
    assert find_journals([parent.folder]) == [parent.folder]
    with pytest.raises(ConfigError, match="not a folder"):
        find_journals([str(tmp_path / "missing")])


def test_sync_five_times_then_to_a_new_destination(tmp_path, mlflow_server, sqlite_uri):
    from mlflow.tracking import MlflowClient

    experiment = f"kfold-{time.time_ns()}"
    parent, children, single = make_tree(tmp_path / "work", experiment)
    summaries = [sync([str(tmp_path / "work")], mlflow_server.uri) for _ in range(5)]
    assert [s.runs_created for s in summaries] == [4, 0, 0, 0, 0]
    assert summaries[0].values == 4 * (1 + 2) + 4 * (3 + 20 + 20 + 20) and summaries[1].values == 0
    assert all(not s.failed and not s.pending for s in summaries)

    for uri in (mlflow_server.uri, sqlite_uri):
        if uri == sqlite_uri:  # the same tree to a destination that has never seen it
            assert sync([str(tmp_path / "work")], uri).runs_created == 4
        client = MlflowClient(tracking_uri=uri)
        runs = {r.info.run_name: r for r in client.search_runs(
            [client.get_experiment_by_name(experiment).experiment_id])}
        assert sorted(runs) == ["fold0", "fold1", "set", "single"]
        assert client.get_experiment_by_name("elsewhere") is None  # children live with their parent
        for name in ("fold0", "fold1"):
            assert runs[name].data.tags[PARENT_TAG] == runs["set"].info.run_id
        assert PARENT_TAG not in runs["single"].data.tags
        for name, steps in (("set", 3), ("fold0", 20), ("fold1", 20), ("single", 20)):
            found = values_of(uri, runs[name].info.run_id)
            assert step_values(found) == expected_metrics(steps), name  # each value exactly once
            assert found["run"].info.status == "FINISHED"


def test_shipping_a_child_ships_its_parent_first(tmp_path, sqlite_uri):
    parent, children, _ = make_tree(tmp_path, "child-first")
    result = ship(children[1].folder, sqlite_uri)
    parent_run = ship(parent.folder, sqlite_uri)
    assert not parent_run.created_run and parent_run.values == 0  # already shipped by the child
    from mlflow.tracking import MlflowClient

    child = MlflowClient(tracking_uri=sqlite_uri).get_run(result.run_id)
    assert child.data.tags[PARENT_TAG] == parent_run.run_id
    assert child.info.experiment_id == parent_run.experiment_id


def test_a_child_without_its_parent_waits(tmp_path, sqlite_uri):
    parent, children, _ = make_tree(tmp_path / "cluster", "orphans")
    laptop = tmp_path / "laptop" / "fold0"
    shutil.copytree(children[0].folder, laptop / "journal")
    shutil.rmtree(tmp_path / "cluster")  # the parent's folder was not copied
    with pytest.raises(ShipPending, match="sync the parent's folder first"):
        ship(laptop / "journal", sqlite_uri)
    summary = sync([str(laptop)], sqlite_uri)
    assert summary.runs_created == 0 and len(summary.pending) == 1 and not summary.failed
    assert "parent journal" in summary.lines()[1]


def test_watch_until_the_running_job_ends(tmp_path, sqlite_uri):
    journal = make_journal(tmp_path / "job" / "journal", experiment="watch", steps=5, status=None)
    first = sync([str(tmp_path)], sqlite_uri)
    assert len(first.pending) == 1 and "RUNNING" in first.pending[0].problem

    def finish():
        time.sleep(1.0)
        journal.log_metrics({"loss": 0.0}, step=99)
        journal.set_status("FINISHED")
        journal.close()

    thread = threading.Thread(target=finish)
    thread.start()
    passes = []
    summary = sync([str(tmp_path)], sqlite_uri, watch=True, poll_s=0.2, on_pass=passes.append)
    thread.join()
    assert len(passes) >= 2 and summary.outcomes[0].done and summary.outcomes[0].status == "FINISHED"
    assert summary.values == 1


def test_sync_command(tmp_path, sqlite_uri):
    make_journal(tmp_path / "work" / "a" / "journal", experiment="cli", steps=4)
    runner = CliRunner()
    result = runner.invoke(sync_cmd, [str(tmp_path / "work"), "--uri", sqlite_uri], standalone_mode=False)
    assert result.exception is None and result.return_value == 0, result.output
    assert result.output.splitlines()[0] == (f"1 journal(s) -> {sqlite_uri}: 1 run(s) created, "
                                             f"{1 + 2 + 4 * 4} value(s) sent, 0 pending, 0 failed")
    again = runner.invoke(sync_cmd, [str(tmp_path / "work"), "--uri", sqlite_uri], standalone_mode=False)
    assert "0 run(s) created, 0 value(s) sent" in again.output
    empty = runner.invoke(sync_cmd, [], standalone_mode=False)
    assert isinstance(empty.exception, ConfigError)
    (tmp_path / "nothing").mkdir()
    none = runner.invoke(sync_cmd, [str(tmp_path / "nothing"), "--uri", sqlite_uri], standalone_mode=False)
    assert isinstance(none.exception, ConfigError) and "no run journal" in str(none.exception)


def test_journal_written_by_a_resumed_job_of_a_nested_run(tmp_path, sqlite_uri):
    """A requeued fold appends to its journal; the next sync ships the rest into the same run."""
    parent, children, _ = make_tree(tmp_path, "requeue")
    first = sync([str(tmp_path)], sqlite_uri)
    resumed = Journal.open(children[0].folder)
    resumed.set_status("RUNNING")
    resumed.log_metrics({"loss": 100.0}, step=100)
    resumed.set_status("FINISHED")
    resumed.close()
    second = sync([str(tmp_path)], sqlite_uri)
    assert second.runs_created == 0 and second.values == 1
    fold0 = next(o for o in first.outcomes if o.journal_dir == children[0].folder)
    assert values_of(sqlite_uri, fold0.run_id)["metrics"]["loss"][-1][::2] == (100, 100.0)
