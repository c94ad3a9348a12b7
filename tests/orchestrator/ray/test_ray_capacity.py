"""A Ray request the cluster can never give is refused at once, before any record or run exists
(Ray itself would keep it PENDING forever): the shortfall arithmetic on literal resources, then
``orch submit`` / ``orch sweep`` against a real Ray head (conftest.py: 2 CPUs, no GPU)."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from cluster.errors import ConfigError, LaunchError
from orchestrator.cli import main as orch
from orchestrator.commands.common import parse_duration
from orchestrator.launchers.ray.capacity import RayAsk, RayCapacity, place, shortfall
from orchestrator.records import list_records

HINTS = {"CPU": "fewer CPUs", "GPU": "fewer GPUs"}


def cap(total, *nodes) -> RayCapacity:
    return RayCapacity("at 10.0.0.5:6379", dict(total), tuple(dict(n) for n in nodes))


def job(workers, cpu=1.0, gpu=1.0, use_gpu="no", **kw) -> RayAsk:
    return RayAsk("job tiny", workers, {"CPU": cpu, "GPU": gpu}, use_gpu, hints=HINTS, **kw)


# ------------------------------------------------------------------------ arithmetic (no Ray)
def test_totals_name_the_ask_the_cluster_and_the_flag():
    two = cap({"CPU": 2.0}, {"CPU": 2.0})
    assert shortfall(job(3), two) == ("job tiny asks for 3 CPUs (3 workers x 1 CPU) but the Ray cluster has 2 CPUs "
                                      "(at 10.0.0.5:6379); fewer CPUs")
    assert shortfall(job(2), two) is None
    assert shortfall(job(1, use_gpu="yes"), two) == ("job tiny asks for 1 GPU but the Ray cluster has no GPU "
                                                     "(at 10.0.0.5:6379); fewer GPUs")
    assert shortfall(job(2, use_gpu="auto"), two) is None  # auto: CPU on a GPU-less cluster
    gpus = cap({"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 2.0})
    assert "asks for 4 GPUs (4 workers x 1 GPU) but the Ray cluster has 2 GPUs" in shortfall(job(4, use_gpu="auto"), gpus)
    assert shortfall(job(4, gpu=0.5, use_gpu="yes"), gpus) is None


def test_each_worker_must_fit_on_one_node():
    nodes = cap({"CPU": 4.0}, {"CPU": 2.0}, {"CPU": 2.0})
    assert shortfall(job(1, cpu=3.0), nodes) == (
        "job tiny asks for 3 CPUs per worker, on one node, but no node of the Ray cluster has more than 2 CPUs "
        "(at 10.0.0.5:6379); fewer CPUs")
    mixed = cap({"CPU": 3.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 0.0}, {"CPU": 1.0, "GPU": 1.0})
    got = shortfall(job(1, cpu=2.0, use_gpu="yes"), mixed)
    assert "asks for 1 GPU and 2 CPUs per worker, on one node, but no node of the Ray cluster has all of it" in got
    assert "(nodes of no GPU + 2 CPUs, 1 GPU + 1 CPU)" in got


def test_workers_must_fit_on_the_nodes_together():
    nodes = cap({"CPU": 6.0}, {"CPU": 3.0}, {"CPU": 3.0})
    assert place([{"CPU": 2.0}] * 3, nodes.nodes) == 2 and place([{"CPU": 1.5}] * 4, nodes.nodes) == 4
    got = shortfall(job(3, cpu=2.0), nodes)
    assert got.startswith("job tiny asks for 3 workers x 2 CPUs; the Ray cluster has enough in sum but its nodes "
                          "(nodes of 3 CPUs, 3 CPUs) hold at most 2")
    assert shortfall(job(2, cpu=2.0), nodes) is None
    assert shortfall(job(3, cpu=2.0), cap({"CPU": 6.0})) is None  # no per-node answer: totals only


def test_sweep_trials(make_experiment):
    from orchestrator.config import load_experiment
    from orchestrator.sweep import plan_sweep

    def trial(**sweep):
        path = make_experiment(**{"sweep": {"space": {"optim.lr": {"grid": [0.01]}}, **sweep}})
        return plan_sweep(load_experiment(path), str(path)).trial_ask()

    two = cap({"CPU": 2.0}, {"CPU": 2.0})
    assert shortfall(trial(gpus_per_trial=1), two).startswith(
        "each trial of sweep tiny asks for 1 GPU but the Ray cluster has no GPU (at 10.0.0.5:6379); lower "
        "sweep.gpus_per_trial (0 trains on CPU: --set sweep.gpus_per_trial=0)")
    assert shortfall(trial(cpus_per_trial=2), two) is None
    assert "asks for 3 CPUs but the Ray cluster has 2 CPUs" in shortfall(trial(cpus_per_trial=3), two)
    # A DDP trial: its workers plus the 0.1 CPU driver of its TorchTrainer.
    ddp = trial(gpus_per_trial=2, cpus_per_trial=2)
    assert shortfall(ddp, cap({"CPU": 2.0, "GPU": 2.0}, {"CPU": 2.0, "GPU": 2.0})) == (
        "each trial of sweep tiny asks for 2.1 CPUs (2 DDP workers x 1 CPU + 0.1 CPU for its driver) but the Ray "
        "cluster has 2 CPUs (at 10.0.0.5:6379); lower sweep.cpus_per_trial (--set sweep.cpus_per_trial=1), or use a "
        "bigger cluster (--address)")
    assert shortfall(ddp, cap({"CPU": 3.0, "GPU": 2.0}, {"CPU": 3.0, "GPU": 2.0})) is None


def test_durations():
    assert [parse_duration(t) for t in ("90", "90s", "10m", "1h", "1h30m", "2d", "1.5m")] == [
        90, 90, 600, 3600, 5400, 172800, 90]
    for bad in ("", "soon", "10 minutes", "m", "-5s"):
        with pytest.raises(ConfigError, match="is not a duration; use e.g. 90s, 10m, 1h"):
            parse_duration(bad)


def test_a_bad_duration_is_one_line(tiny_experiment, capsys):
    assert orch(["submit", str(tiny_experiment), "--backend", "ray", "--wait-for-resources", "soon"]) == 2
    assert capsys.readouterr().err.strip() == (
        "orch: error: --wait-for-resources 'soon' is not a duration; use e.g. 90s, 10m, 1h or 1h30m")


# ------------------------------------------------------------------------ a real Ray head
def submit_refused(args, capsys) -> tuple[str, float]:
    started = time.monotonic()
    assert orch(args) == 2
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert err.startswith("orch: error: ") and "\n" not in err, err
    return err[len("orch: error: "):], elapsed


@pytest.mark.ray
@pytest.mark.slow
def test_more_workers_than_the_cluster_has_cpus(ray_head, orch_home, tiny_experiment, tmp_path, capsys):
    args = ["submit", str(tiny_experiment), "--backend", "ray", "--address", ray_head.address, "--gpus", "3"]
    line, elapsed = submit_refused(args, capsys)
    assert line.startswith(f"job tiny asks for 3 CPUs (3 workers x 1 CPU) but the Ray cluster has 2 CPUs "
                           f"(at {ray_head.address}); lower --gpus (the number of workers)"), line
    assert elapsed < 60  # at once: one connection, no waiting for Ray to schedule
    assert not orch_home.exists() and not (tmp_path / "work").exists() and list_records() == []


@pytest.mark.ray
@pytest.mark.slow
def test_what_fits_passes_and_auto_means_cpu(ray_head, orch_home, make_experiment):
    from orchestrator.config import load_experiment, with_overrides
    from orchestrator.launch import Launch

    base = load_experiment(make_experiment())
    launch = Launch.for_backend("ray")

    def preflight(**changes):
        launch.preflight(launch.plan([with_overrides(base, {"resources.ray.address": ray_head.address, **changes})]))

    preflight(**{"resources.gpus": 2})
    preflight(**{"resources.gpus": 2, "runtime.device": "auto"})  # GPU-less cluster: the workers use CPUs
    with pytest.raises(LaunchError, match=r"job tiny asks for 1 GPU but the Ray cluster has no GPU \(at "):
        preflight(**{"resources.gpus": 1, "runtime.device": "cuda"})
    assert list_records() == []


@pytest.mark.ray
@pytest.mark.slow
def test_wait_for_resources_polls_then_gives_the_same_line(ray_head, orch_home, tiny_experiment, capsys, caplog):
    args = ["submit", str(tiny_experiment), "--backend", "ray", "--address", ray_head.address, "--gpus", "3"]
    at_once, _ = submit_refused(args, capsys)
    with caplog.at_level(logging.WARNING, logger="orchestrator.launchers.ray.capacity"):
        line, elapsed = submit_refused(args + ["--wait-for-resources", "3s"], capsys)
    ended = time.time()
    assert line == at_once
    [notice] = [r for r in caplog.records if "waiting up to 3 s" in r.getMessage()]
    assert at_once in notice.getMessage()
    waited = ended - notice.created  # from the first answer of the cluster to the refusal
    assert 3.0 <= waited < 9.0, waited
    assert elapsed >= 3.0 and list_records() == []
    # While waiting, the request was shown to Ray's autoscaler as a placement group; it is gone.
    # (The head is the session's: other tests' jobs leave placement groups of other names.)
    shown = [g for g in placement_groups(ray_head.address) if g[0] == "orch-wait-for-resources"]
    assert shown == [["orch-wait-for-resources", "REMOVED"]], shown


def placement_groups(address: str) -> list:
    """``[name, state]`` of every placement group the cluster at ``address`` has known."""
    import json
    import subprocess
    import sys

    code = ("import json, os, sys; os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'] = '0'; import ray; "
            "ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(json.dumps([[g['name'], g['state']] for g in ray.util.placement_group_table().values()]))")
    out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_trial_that_can_never_fit(ray_head, orch_home, make_experiment, tmp_path, capsys):
    sweep = {"space": {"optim.lr": {"grid": [0.01, 0.001]}}, "gpus_per_trial": 1}
    path = make_experiment(**{"sweep": sweep})
    line, elapsed = submit_refused(["sweep", str(path), "--address", ray_head.address], capsys)
    assert line.startswith(f"each trial of sweep tiny asks for 1 GPU but the Ray cluster has no GPU "
                           f"(at {ray_head.address}); lower sweep.gpus_per_trial"), line
    assert elapsed < 60 and list_records() == [] and not (tmp_path / "work").exists()
    # The same sweep with CPU trials fits.
    from orchestrator.config import load_experiment
    from orchestrator.sweep import plan_sweep
    from orchestrator.sweep.driver import preflight_sweep

    fits = make_experiment(_name="cpu.yaml", **{"sweep": {**sweep, "gpus_per_trial": 0, "cpus_per_trial": 2},
                                                "resources.ray.address": ray_head.address})
    preflight_sweep(plan_sweep(load_experiment(fits), str(fits)))


@pytest.mark.ray
@pytest.mark.slow
def test_a_private_head_is_this_machine(orch_home, tiny_experiment, capsys):
    from orchestrator.launchers.ray.capacity import local_resources

    cpus = int(local_resources()["CPU"])
    line, _ = submit_refused(["submit", str(tiny_experiment), "--backend", "ray", "--gpus", str(cpus + 1)], capsys)
    assert line.startswith(f"job tiny asks for {cpus + 1} CPUs ({cpus + 1} workers x 1 CPU) but the Ray cluster has "
                           f"{cpus} CPU"), line
    assert "(the private head orch starts on this machine, with its CPUs and GPUs)" in line


# A Ray cluster that gains a node when told to (Ray's own multi-node test cluster, on loopback; a
# second `ray start` on one machine would bind the machine's other address).
GROWING_CLUSTER = """
import os, sys
os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
try:
    print(cluster.address, flush=True)
    if sys.stdin.readline().strip() == "grow":
        cluster.add_node(num_cpus=1, num_gpus=0)
        print("grown", flush=True)
        sys.stdin.readline()
finally:
    cluster.shutdown()
"""


@pytest.mark.ray
@pytest.mark.slow
def test_wait_for_resources_ends_when_the_cluster_grows(orch_home, make_experiment):
    """A node joins while `--wait-for-resources` waits (what an autoscaler does): the wait ends
    there, with the request fitting, long before its limit."""
    import subprocess
    import sys
    import threading

    from orchestrator.config import load_experiment, with_overrides
    from orchestrator.launch import Launch

    helper = subprocess.Popen([sys.executable, "-c", GROWING_CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    asked = threading.Event()

    class Notice(logging.Handler):
        def emit(self, record):
            if "waiting up to" in record.getMessage():
                asked.set()

    handler = Notice()
    logger = logging.getLogger("orchestrator.launchers.ray.capacity")
    logger.addHandler(handler)
    outcome: dict = {}
    try:
        address = helper.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        exp = with_overrides(load_experiment(make_experiment()), {"resources.ray.address": address, "resources.gpus": 3})
        launch = Launch.for_backend("ray")
        plan = launch.plan([exp])

        def wait() -> None:
            try:
                launch.preflight(plan, wait_s=240)
                outcome["error"] = None
            except LaunchError as err:
                outcome["error"] = str(err)

        waiter = threading.Thread(target=wait, daemon=True)
        started = time.monotonic()
        waiter.start()
        assert asked.wait(120), "the wait never started"
        time.sleep(2)
        assert waiter.is_alive() and outcome == {}  # still waiting: 3 CPUs asked, 2 there
        helper.stdin.write("grow\n")
        helper.stdin.flush()
        assert helper.stdout.readline().strip() == "grown"
        waiter.join(120)
        assert outcome == {"error": None}
        assert time.monotonic() - started < 200  # ended by the new node, not by the 240 s limit
    finally:
        logger.removeHandler(handler)
        helper.stdin.close()  # the helper shuts its cluster down
        try:
            helper.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(helper.pid, signal.SIGKILL)
