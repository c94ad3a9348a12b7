"""Per-slice system metrics: CPU and RSS of the job's own process group, as ``system/<host>/...``
series of its run (a real training run, shipped to a SQLite MLflow store); GPU devices are the
job's CUDA_VISIBLE_DEVICES only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from cluster.env import DistEnv
from detection.hooks.system_metrics import GpuProbe, GroupProbe, SystemMetricsHook, own_devices, samplers
from detection.train import main
from orchestrator.config import load_experiment


def test_group_probe_counts_the_whole_group_only():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], process_group=0)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # in our group
    try:
        probe = GroupProbe(busy.pid)
        probe.sample()
        time.sleep(1.0)
        values = probe.sample()
        assert values["processes"] == 1 and values["cpu_percent"] > 0 and values["rss_mb"] > 1
        mine = GroupProbe(os.getpgid(0)).sample()
        assert mine["processes"] >= 2  # this test and `other`, not `busy`
    finally:
        for proc in (busy, other):
            proc.kill()
            proc.wait()


def test_the_lowest_rank_of_each_host_samples_its_ranks_groups():
    places = [("h1", 10), ("h1", 11), ("h2", 20), ("h2", 20), ("h1", 12)]
    assert samplers(places) == {0: {10, 11, 12}, 2: {20}}
    assert samplers([("h", 5)]) == {0: {5}}


def test_other_hosts_samples_reach_the_journal_through_rank_0(tmp_path):
    from detection.journal import Journal, read_events

    journal = Journal.create(tmp_path / "journal", "exp", "run")
    journal.close()
    relay = str(tmp_path / "system")
    other = SystemMetricsHook(str(tmp_path / "journal"), 60, host="h2", relay_dir=relay, relay_from=relay)
    first = SystemMetricsHook(str(tmp_path / "journal"), 60, host="h1", relay_from=relay)
    other.sample()
    with open(os.path.join(relay, "h2.jsonl"), "a") as handle:
        handle.write('{"ts": 5, "step": 3, "values": {"system/h2/cpu_pe')  # a line being written: not relayed yet
    first.sample()
    first._close()
    metrics = [v for e in read_events(str(tmp_path / "journal"))[0] if e["t"] == "metrics" for v in e["v"]]
    keys = {key for _, _, values in metrics for key in values}
    assert {"system/h1/cpu_percent", "system/h1/rss_mb", "system/h2/cpu_percent", "system/h2/rss_mb"} <= keys
    assert sum("system/h2/rss_mb" in values for _, _, values in metrics) == 1  # relayed once, the torn line not at all
    assert not os.path.exists(os.path.join(relay, "h1.jsonl"))  # rank 0 writes the journal only


def test_own_devices_are_the_visible_ones():
    assert own_devices({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert own_devices({"CUDA_VISIBLE_DEVICES": "GPU-1234abcd-aa"}) == ["GPU-1234abcd-aa"]
    assert own_devices({"CUDA_VISIBLE_DEVICES": ""}) == [] and own_devices({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert own_devices({}, local_world_size=2) == ["0", "1"]  # the devices its ranks pick
    assert GpuProbe(["0"]).sample() == {} or os.path.exists("/dev/nvidiactl")  # no GPU here: nothing


def test_a_run_has_cpu_and_rss_series(make_experiment, tracking_uri, ship):
    exp = load_experiment(make_experiment(**{"runtime.system_metrics_interval": 0.5}))
    result = main(exp, DistEnv.single())
    run = ship(result.output_dir)["tiny"]
    client = MlflowClient(tracking_uri)
    host = socket.gethostname()
    cpu = client.get_metric_history(run.info.run_id, f"system/{host}/cpu_percent")
    rss = client.get_metric_history(run.info.run_id, f"system/{host}/rss_mb")
    assert len(cpu) >= 2 and len(rss) >= 2  # at the start, every interval, at the end
    assert all(m.value > 50 for m in rss)  # a process with torch loaded
    assert run.data.metrics[f"system/{host}/processes"] >= 1
    from detection.journal import read_events

    events, _ = read_events(os.path.join(result.output_dir, "journal"))
    assert events[-1] == {**events[-1], "t": "status", "status": "FINISHED"}  # nothing after the end (the shipper stops there)
